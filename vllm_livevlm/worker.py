"""Worker RPCs for the LiveVLM session store (`--worker-extension-cls vllm_livevlm.worker.LiveVLMWorkerExtension`).

vLLM mixes this class into its worker; the front end reaches the methods with `collective_rpc`, so every
tensor-parallel rank opens, pins and frees the same streams.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import torch
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

from vllm_livevlm.config import LiveVLMConfig
from vllm_livevlm.connector.connector import LiveVLMConnector, scheduler_connector
from vllm_livevlm.connector.params import RequestKind
from vllm_livevlm.connector.store import SessionStore
from vllm_livevlm.measure import process_memory, reachable_storage_bytes
from vllm_livevlm.memory.stream import COUNTERS, StreamMemory
from vllm_livevlm.portable.format import MEMORY_TENSORS
from vllm_livevlm.portable.wire import from_wire, to_wire


def _connector() -> LiveVLMConnector:
    if not has_kv_transfer_group() or not isinstance(get_kv_transfer_group(), LiveVLMConnector):
        raise RuntimeError("this engine runs without the LiveVLM connector: start it with "
                           "--kv-transfer-config '{\"kv_connector\": \"LiveVLMConnector\", "
                           "\"kv_connector_module_path\": \"vllm_livevlm.connector\", \"kv_role\": \"kv_both\"}'")
    return get_kv_transfer_group()


def _store() -> SessionStore:
    store = _connector().store
    if store is None:
        raise RuntimeError("the LiveVLM session store lives on the workers (this is the scheduler's connector)")
    return store


class LiveVLMWorkerExtension:
    def livevlm_open_stream(self, stream_id: str, config: dict[str, Any]) -> None:
        _store().open(stream_id, LiveVLMConfig.from_dict(config))

    def livevlm_prepare(self, stream_id: str, kind: str, req_id: str) -> dict[str, int]:
        return _store().prepare(stream_id, RequestKind(kind), req_id)

    def livevlm_release(self, req_ids: list[str]) -> dict[str, Any]:
        """Unpin finished requests; returns their reports: retrieval (questions), `repinned_version` (a
        question that read another version than it was prepared on), `error` and `reask` (failed)."""
        store = _store()
        reports = store.take_retrieval_reports(req_ids)
        for req_id in req_ids:
            failure = store.take_failure(req_id)
            if failure is not None:
                reports.setdefault(req_id, {}).update(error=failure[0], reask=failure[1])
        store.release(req_ids)
        return reports

    def livevlm_failed(self, req_id: str) -> bool:
        """Whether a request in flight was failed (its output must not reach anyone); nothing is consumed."""
        return _store().has_failed(req_id)

    def livevlm_close_stream(self, stream_id: str) -> int:
        return _store().close(stream_id)

    def livevlm_stats(self, stream_id: str) -> dict[str, Any]:
        return _store().stats(stream_id)

    def livevlm_kept_tokens(self, stream_id: str) -> dict[str, Any]:
        """Stream token ids in memory: long-term per layer (and KV head), short-term; and their stream frames."""
        store = _store()
        memory = store.snapshot(stream_id, store.stats(stream_id)["version"])
        return {"long_term": memory.ltm_ids.tolist(), "short_term": memory.stm_ids.tolist(),
                "long_term_frames": memory.ltm_frames.tolist(), "short_term_frames": memory.stm_frames.tolist()}

    def livevlm_memory_snapshot(self, stream_id: str) -> dict[str, Any]:
        """The stream's latest memory (raw keys/values, token ids, frames, multi-axis position records and
        the stream's temporal stride), what the fidelity measures read (`vllm_livevlm.eval.fidelity`). Tensors
        travel as `(dtype, shape, bytes)`: utility results from the engine process lose tensor types."""
        store = _store()
        memory = store.snapshot(stream_id, store.stats(stream_id)["version"])
        names = ("sinks_k", "sinks_v", "ltm_k", "ltm_v", "ltm_ids", "ltm_frames", "ltm_pos", "stm_k", "stm_v",
                 "stm_ids", "stm_frames", "stm_pos")
        return {"tensors": {name: to_wire(getattr(memory, name)) for name in names},
                "page_tokens": memory.config.page_tokens, "retrieve_ratio": memory.config.retrieve_ratio,
                "tokens_seen": memory.tokens_seen, "stride": store.stride(memory.config)}

    def livevlm_fingerprint(self) -> dict[str, Any]:
        """The model a stream file must come from (`vllm_livevlm.portable`): architecture, KV shape and dtype,
        tensor-parallel size, and a hash of the weights' metadata (names, dtypes, shapes and first values of
        this rank's parameters: another checkpoint of the same architecture differs there)."""
        model_config = self.vllm_config.model_config
        digest = hashlib.sha256()
        for name, param in sorted(self.get_model().named_parameters()):
            head = param.detach().flatten()[:16].to("cpu", torch.float64)
            digest.update(f"{name}|{param.dtype}|{list(param.shape)}|".encode() + head.numpy().tobytes())
        layers, kv_heads, head_dim = self._kv_shape()
        return {"architecture": (model_config.architectures or ["?"])[0], "layers": layers, "kv_heads": kv_heads,
                "head_dim": head_dim, "dtype": str(model_config.dtype).removeprefix("torch."),
                "weights_sha256": digest.hexdigest(), "tp_size": get_tensor_model_parallel_world_size()}

    def _kv_shape(self) -> tuple[int, int, int]:
        """Layers, KV heads (all ranks) and head dim of the language model."""
        text = self.vllm_config.model_config.hf_config.get_text_config()
        return (text.num_hidden_layers, text.num_key_value_heads,
                getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)

    def livevlm_export_stream(self, stream_id: str) -> dict[str, Any]:
        """This rank's shard of everything the stream's memory holds (every snapshot tensor, its version and
        counters), as copies in wire form (`to_wire`), and `blocked_seconds`, what the copies took (measured: the
        engine waits for them). Copies only, no serialisation."""
        start = time.perf_counter()
        memory = _store().export_state(stream_id)
        tensors = {name: to_wire(getattr(memory, name)) for name in MEMORY_TENSORS}
        return {"rank": get_tensor_model_parallel_rank(), "version": memory.version,
                "counters": {name: getattr(memory, name) for name in COUNTERS}, "tensors": tensors,
                "blocked_seconds": time.perf_counter() - start}

    def livevlm_import_stream(self, stream_id: str, config: dict[str, Any], payload: dict[str, Any]) -> None:
        """Install stream `stream_id` with the memory of an export: `payload` = {"version", "counters",
        "shards": one `tensors` dict (wire form) per tensor-parallel rank}. Refused (ValueError) unless the
        shapes fit this model and `config`; an existing id is refused."""
        size, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        if len(payload["shards"]) != size:
            raise ValueError(f"the stream has {len(payload['shards'])} tensor-parallel shards; this engine runs {size}")
        layers, kv_heads, head_dim = self._kv_shape()
        shape = (layers, kv_heads // size, head_dim)
        tensors = {name: from_wire(wire, self.device) for name, wire in payload["shards"][rank].items()}
        memory = StreamMemory.from_tensors(LiveVLMConfig.from_dict(config), payload["version"], tensors,
                                           payload["counters"], shape, self.vllm_config.model_config.dtype)
        if memory.position_axes != _store().axes:
            raise ValueError(f"the stream's position records have {memory.position_axes} axes; this model's "
                             f"{_store().axes}")
        _store().import_state(stream_id, memory)

    def livevlm_memory_probe(self, reset_peak: bool = False) -> dict[str, int]:
        """Measured, not computed (the benchmark's "measured" column): the distinct tensor storages the
        session store holds, this process's RSS and, with CUDA, allocated / peak bytes."""
        return {"store_storage_bytes": reachable_storage_bytes(_store()), **process_memory(reset_peak)}

    def livevlm_engine_stats(self) -> dict[str, Any]:
        """Store bytes and, when the scheduler shares this process (single-process engines), the paged
        pool's free block count."""
        store = _store()
        stats: dict[str, Any] = {"streams": len(store.stream_ids()), "store_bytes": store.total_bytes()}
        scheduler = scheduler_connector()
        if scheduler is not None and scheduler.kv_cache_manager is not None:
            stats["free_blocks"] = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
        return stats
