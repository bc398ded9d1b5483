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

from torch.profiler import record_function
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                                KVConnectorRole)

from vllm_livevlm.connector.params import InvalidLiveVLMRequest, LiveVLMParams, RequestKind, request_secret
from vllm_livevlm.connector.store import SessionStore
from vllm_livevlm.connector.step import RequestSlots, StepRequests
from vllm_livevlm.log import get_logger
from vllm_livevlm.model.adapter import adapter_for

if TYPE_CHECKING:
    import torch
    from vllm.config import CompilationConfig, VllmConfig
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
    failed: list[tuple[str, str]] = field(default_factory=list)  # (front-end id, why): scheduler-side failures


def check_engine_settings(vllm_config: "VllmConfig") -> None:
    """Refuse, at start, engine settings under which LiveVLM would serve wrong answers or lose clips. Every
    engine process builds a connector (the workers before they load the model), so this covers every entry
    point: `vllm-livevlm serve`, the Python API, `vllm serve` with the connector flags, Ray replicas."""
    problems = []
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append("--enable-prefix-caching: every stream's placeholder prefix is the same tokens, so "
                        "cached blocks would hand one stream's context to another (--no-enable-prefix-caching)")
    if not vllm_config.scheduler_config.disable_chunked_mm_input:
        problems.append("--disable-chunked-mm-input is required: a clip must be prefilled in one step (its "
                        "vision-to-vision scores need all of its queries)")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        problems.append("--pipeline-parallel-size > 1: the hooks fill and capture every layer on one worker")
    if vllm_config.parallel_config.data_parallel_size > 1:
        problems.append("--data-parallel-size > 1: a stream's memory lives in one engine; run replicas "
                        "(vllm-livevlm serve-ray) instead")
    cudagraph_problem = _cudagraph_problem(vllm_config.compilation_config)
    if cudagraph_problem is not None:
        problems.append(cudagraph_problem)
    if problems:
        raise ValueError("LiveVLM cannot run with these engine settings:\n- " + "\n- ".join(problems))


def _cudagraph_problem(compilation_config: "CompilationConfig") -> str | None:
    """Compiled graphs call the LiveVLM op (`livevlm::rotary_with_hooks`) at every forward, so any
    compilation mode works; a CUDA graph replays only what it captured, so the op must run outside graphs
    wherever a step can carry LiveVLM work: prefills (mixed batches) run eager or piecewise with the op as a
    splitting op. Decode-only batches may replay full graphs: a clip or question's first step computes its
    whole turn (the hooks do nothing on decode steps). The one exception: a sinks prefix the scheduler split
    down to a last single token, batched with decodes only, loses that token's capture; the stream then
    fails loudly at its first clip ("no memory yet"), no other stream is touched."""
    from vllm.config import CompilationMode, CUDAGraphMode

    from vllm_livevlm.model.ops import OP_NAME

    mode = compilation_config.cudagraph_mode
    if mode is None or mode == CUDAGraphMode.NONE:
        return None
    if mode.mixed_mode() == CUDAGraphMode.FULL:
        return (f"-cc.cudagraph_mode={mode.name}: full CUDA graphs of prefill batches would replay LiveVLM "
                "clips and questions without their hooks (use FULL_AND_PIECEWISE, PIECEWISE or --enforce-eager)")
    if mode.has_piecewise_cudagraphs() and (compilation_config.mode != CompilationMode.VLLM_COMPILE
                                            or OP_NAME not in (compilation_config.splitting_ops or [])):
        return (f"-cc.splitting_ops must include {OP_NAME} for piecewise CUDA graphs (the plugin adds it unless "
                "splitting_ops is set explicitly): a captured op would never run")
    return None


class LiveVLMConnector(KVConnectorBase_V1):
    """Scheduler-side methods never raise: a request whose LiveVLM claim fails verification is failed alone
    (see `on_new_request`), and anything that goes wrong with a verified one is reported to the workers,
    which fail that request (its front end gets the error from `livevlm_release`)."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None):
        check_engine_settings(vllm_config)
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.block_size = vllm_config.cache_config.block_size
        model_config = vllm_config.model_config
        self.adapter = adapter_for(model_config.hf_config, model_config.model, model_config.architectures)
        # scheduler side
        self._secret = request_secret() if role == KVConnectorRole.SCHEDULER else b""
        self._requests: dict[str, LiveVLMParams] = {}  # verified LiveVLM requests, by engine request id
        self._rejected: dict[str, str] = {}            # engine request id -> why its claim was refused
        self._allocated: dict[str, tuple[LiveVLMParams, list[int], Request]] = {}
        # Sinks requests whose prompt the scheduler split over several steps (its token budget was short).
        self._prefilling: dict[str, tuple[LiveVLMParams, list[int], Request]] = {}
        self._finished: list[str] = []
        self._failed: list[tuple[str, str]] = []
        self.kv_cache_manager = None
        # worker side
        self.store: SessionStore | None = SessionStore(self.adapter) if role == KVConnectorRole.WORKER else None
        self._step: StepRequests | None = None
        self._step_has_requests = False  # set when the step's metadata is bound: the op asks every layer
        if role == KVConnectorRole.SCHEDULER:
            global _scheduler_connector
            _scheduler_connector = weakref.ref(self)

    # ==== scheduler side ================================================================================
    def on_new_request(self, request: "Request") -> None:
        """Verify a request's LiveVLM claim once, as it enters the scheduler.

        A request whose `kv_transfer_params` are not a well-formed request signed by our front end (forged,
        malformed, foreign) is failed alone: its parameters are stripped, so the scheduler and the workers
        see a plain request that claims no external tokens (it never reads or writes any stream's memory,
        never runs on unfilled slots); it decodes at most one token, and its output's `kv_transfer_params`
        say `{"livevlm_error": why}`. vLLM 0.32 gives a connector no synchronous way to fail a request (load
        failures come back from the workers after a step has run), so this is the cheapest closed path.
        """
        try:
            params = LiveVLMParams.from_request(request.kv_transfer_params, self._secret)
            if params is not None and params.context_tokens >= request.num_prompt_tokens:
                raise InvalidLiveVLMRequest(f"{params.context_tokens} context tokens in a prompt of "
                                            f"{request.num_prompt_tokens}: nothing left to compute")
        except Exception as e:  # anything raised here would end the engine core
            reason = str(e) if isinstance(e, InvalidLiveVLMRequest) else f"invalid LiveVLM request ({type(e).__name__})"
            logger.warning("LiveVLM: request %s refused: %s", request.request_id, reason)
            request.kv_transfer_params = None
            request.max_tokens = min(request.max_tokens, 1)
            self._rejected[request.request_id] = reason
            return
        if params is not None:
            self._requests[request.request_id] = params

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        params = self._requests.get(request.request_id)
        if params is None or params.kind == RequestKind.SINKS:
            return 0, False
        return max(params.context_tokens - num_computed_tokens, 0), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        params = self._requests.get(request.request_id)
        if params is None:
            return
        try:
            self._allocated[request.request_id] = (params, list(blocks.get_block_ids()[0]), request)
        except Exception as e:
            self._fail(params, f"block allocation not readable ({type(e).__name__}: {e})")

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = LiveVLMConnectorMetadata(finished=self._finished)
        self._finished = []
        # Requests allocated this step: new ones, and preempted ones resumed (recomputed from scratch,
        # so their context slots are filled again). Called before the scheduler advances
        # `num_computed_tokens`, which therefore still counts the claimed placeholders only.
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            try:
                slots = self._slots(req_id, num_scheduled)
            except Exception as e:
                params = self._requests.get(req_id)
                if params is not None:
                    self._fail(params, f"could not describe the step ({type(e).__name__}: {e})")
                continue
            if slots is not None:
                meta.requests.append(slots)
        meta.failed, self._failed = self._failed, []
        return meta

    def _slots(self, req_id: str, num_scheduled: int) -> RequestSlots | None:
        """The slot layout of a LiveVLM request scheduled this step (None: not one, or not its first step)."""
        entry = self._allocated.pop(req_id, None)
        if entry is None and req_id in self._prefilling:
            # A later chunk: the request has grown blocks since it was allocated.
            params, _, request = self._prefilling.pop(req_id)
            entry = (params, list(self.kv_cache_manager.get_blocks(req_id).get_block_ids()[0]), request)
        if entry is None:
            return None
        params, block_ids, request = entry
        computed = request.num_computed_tokens
        if params.kind == RequestKind.SINKS and computed + num_scheduled < request.num_prompt_tokens:
            self._prefilling[req_id] = entry  # its next chunk is captured too
        grid = self.adapter.video_grid(request.mm_features) if params.kind == RequestKind.CLIP else None
        return RequestSlots(req_id=req_id, params=params, block_ids=block_ids, num_computed=computed,
                            num_scheduled=num_scheduled, num_prompt=request.num_prompt_tokens,
                            block_size=self.block_size, video_grid=grid)

    def _fail(self, params: LiveVLMParams, reason: str) -> None:
        logger.error("LiveVLM: request %s of stream %s failed: %s", params.request_id, params.stream_id, reason)
        self._failed.append((params.request_id, reason))

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        rejected = self._rejected.pop(req_id, None)
        if rejected is not None:
            return False, {"livevlm_error": rejected}
        params = self._requests.pop(req_id, None)
        if params is None:
            return False, None
        self._allocated.pop(req_id, None)
        self._prefilling.pop(req_id, None)
        self._finished.append(params.request_id)
        return False, None

    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        self.kv_cache_manager = kv_cache_manager

    # ==== worker side ===================================================================================
    def step_requests(self, forward_context: "ForwardContext | None" = None) -> StepRequests | None:
        """This step's LiveVLM requests, with their rows in the batch (built once per step)."""
        if self._step is None:
            if not self._step_has_requests:
                return None
            meta = self._metadata()
            from vllm.forward_context import get_forward_context

            try:
                with record_function("livevlm::step_setup"):
                    self._step = StepRequests(meta.requests, self.store, forward_context or get_forward_context())
            except Exception as e:  # never end the engine: fail this step's LiveVLM requests instead
                logger.exception("LiveVLM: could not prepare the step")
                for req in meta.requests:
                    self.store.fail_request(req.params.request_id, f"step preparation failed: {type(e).__name__}")
                return None
        return self._step

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._step_has_requests = (self.store is not None and isinstance(connector_metadata, LiveVLMConnectorMetadata)
                                   and bool(connector_metadata.requests))

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        self._step_has_requests = False

    def _metadata(self) -> LiveVLMConnectorMetadata | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, LiveVLMConnectorMetadata) else None

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
        """After the last layer: record scheduler-side failures, unpin finished requests, commit this step's
        clips. Never raises (`StepRequests.commit` fails requests one by one)."""
        step, self._step = self._step, None
        if self.store is None:
            return
        try:
            meta = self._metadata()
            if meta is not None:
                for req_id, reason in meta.failed:
                    self.store.fail_request(req_id, reason)
                self.store.release(meta.finished)
            if step is not None:
                with record_function("livevlm::commit"):
                    step.commit()
        except Exception:
            logger.exception("LiveVLM: wait_for_save failed")
