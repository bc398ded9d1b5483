"""`LiveVLMConnector`: the scheduler half claims placeholder prefixes, the worker half owns the store.

Scheduler side (engine core): a LiveVLM clip or question request starts with P placeholder tokens; the
connector reports them as externally computed so they never run through the model, and ships each
request's slot layout (blocks, computed/scheduled tokens, snapshot version) to the workers with the step.
Streams themselves (their activity, expiry, limits) are the front end's business: it opens, pins and
closes them through worker RPCs.

Worker side: the `SessionStore` holds every stream's memory. The model variant's attention layers use the
step's `StepRequests` to fill context slots and capture clip KV; `wait_for_save` commits captured clips
into the store once all layers ran.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                                KVConnectorRole)

from vllm_livevlm.connector.params import LiveVLMParams, RequestKind
from vllm_livevlm.connector.store import SessionStore
from vllm_livevlm.connector.step import RequestSlots, StepRequests
from vllm_livevlm.log import get_logger

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = get_logger(__name__)
_scheduler_connector: "weakref.ReferenceType[LiveVLMConnector] | None" = None


def scheduler_connector() -> "LiveVLMConnector | None":
    """The scheduler-side connector of this process, if the engine core runs here."""
    return _scheduler_connector() if _scheduler_connector is not None else None


@dataclass
class LiveVLMConnectorMetadata(KVConnectorMetadata):
    requests: list[RequestSlots] = field(default_factory=list)  # first (prefill) step of LiveVLM requests
    finished: list[str] = field(default_factory=list)           # finished LiveVLM requests (front-end ids)


class LiveVLMConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.block_size = vllm_config.cache_config.block_size
        # scheduler side
        self._allocated: dict[str, tuple[LiveVLMParams, list[int], Request]] = {}
        # Sinks requests whose prompt the scheduler split over several steps (its token budget was short).
        self._prefilling: dict[str, tuple[LiveVLMParams, list[int], Request]] = {}
        self._finished: list[str] = []
        self.kv_cache_manager = None
        # worker side
        self.store: SessionStore | None = SessionStore() if role == KVConnectorRole.WORKER else None
        self._step: StepRequests | None = None
        if role == KVConnectorRole.SCHEDULER:
            global _scheduler_connector
            _scheduler_connector = weakref.ref(self)

    # ==== scheduler side ================================================================================
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        params = LiveVLMParams.from_request(request.kv_transfer_params)
        if params is None or params.kind == RequestKind.SINKS:
            return 0, False
        return max(params.context_tokens - num_computed_tokens, 0), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        params = LiveVLMParams.from_request(request.kv_transfer_params)
        if params is not None:
            self._allocated[request.request_id] = (params, list(blocks.get_block_ids()[0]), request)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = LiveVLMConnectorMetadata(finished=self._finished)
        self._finished = []
        # Requests allocated this step: new ones, and preempted ones resumed (recomputed from scratch,
        # so their context slots are filled again). Called before the scheduler advances
        # `num_computed_tokens`, which therefore still counts the claimed placeholders only.
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            entry = self._allocated.pop(req_id, None)
            if entry is None and req_id in self._prefilling:
                # A later chunk: the request has grown blocks since it was allocated.
                params, _, request = self._prefilling.pop(req_id)
                entry = (params, list(self.kv_cache_manager.get_blocks(req_id).get_block_ids()[0]), request)
            if entry is None:
                continue
            params, block_ids, request = entry
            computed = request.num_computed_tokens
            if params.kind == RequestKind.SINKS and computed + num_scheduled < request.num_prompt_tokens:
                self._prefilling[req_id] = entry  # its next chunk is captured too
            meta.requests.append(RequestSlots(
                req_id=req_id, params=params, block_ids=block_ids, num_computed=computed,
                num_scheduled=num_scheduled, num_prompt=request.num_prompt_tokens, block_size=self.block_size))
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        params = LiveVLMParams.from_request(request.kv_transfer_params)
        if params is None:
            return False, None
        self._allocated.pop(request.request_id, None)
        self._prefilling.pop(request.request_id, None)
        self._finished.append(params.request_id)
        return False, None

    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        self.kv_cache_manager = kv_cache_manager

    # ==== worker side ===================================================================================
    def step_requests(self, forward_context: "ForwardContext | None" = None) -> StepRequests | None:
        """This step's LiveVLM requests, with their rows in the batch (built once per step)."""
        if self._step is None:
            if not self.has_connector_metadata():
                return None
            meta = self._get_connector_metadata()
            assert isinstance(meta, LiveVLMConnectorMetadata)
            if not meta.requests:
                return None
            from vllm.forward_context import get_forward_context

            self._step = StepRequests(meta.requests, self.store, forward_context or get_forward_context())
        return self._step

    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]) -> None:
        """Commit a host-memory KV pool at start: CPU tensors get their pages on first write, so without this
        a server's RSS creeps up for hours as the block allocator reaches blocks never used before (and a
        machine short of memory fails under load instead of at start). GPU pools are resident already."""
        seen: set[int] = set()
        for cache in kv_caches.values():
            storage = cache.untyped_storage()  # layers may share one allocation: write each once
            if cache.device.type == "cpu" and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                storage.fill_(0)
        if seen:
            logger.info("LiveVLM: host KV pool committed (%d tensors)", len(seen))

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        """Context slots are filled per layer by the model variant, right before that layer's attention."""

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        assert self.store is not None
        if self.has_connector_metadata():
            meta = self._get_connector_metadata()
            assert isinstance(meta, LiveVLMConnectorMetadata)
            self.store.release(meta.finished)
        if self._step is not None:
            self._step.commit()
            self._step = None
