"""Memory as the allocator sees it, not as a formula computes it: the benchmark's "measured" figures.

`reachable_storage_bytes` walks the object graph from a root (the session store) and sums the storages of
every tensor it reaches, each storage once: a view keeps its whole storage alive, so a view of a larger
concatenation costs the concatenation. `process_memory` adds the process's resident set and, on a GPU, the
CUDA allocator's counters.
"""

from __future__ import annotations

import gc
import types
from typing import Any

import torch

# Objects whose referents are code or interpreter state, never a stream's tensors.
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.CodeType,
           types.FrameType)


def reachable_storage_bytes(root: Any) -> int:
    """Bytes of the distinct tensor storages reachable from `root` (deduplicated by storage)."""
    seen: set[int] = set()
    storages: dict[tuple[str, int], int] = {}
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, _OPAQUE):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[(str(obj.device), storage.data_ptr())] = storage.nbytes()
            continue
        todo.extend(gc.get_referents(obj))
    return sum(storages.values())


def process_memory(reset_peak: bool = False) -> dict[str, int]:
    """This process's resident set and (with CUDA) allocated / peak-allocated bytes; `reset_peak` starts a
    new peak window after reading."""
    import psutil

    out = {"rss_bytes": psutil.Process().memory_info().rss}
    if torch.cuda.is_available():
        out["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        if reset_peak:
            torch.cuda.reset_peak_memory_stats()
    return out


class KVPoolProbe:
    """The peak of vLLM's paged-pool occupancy since `reset`, in bytes: blocks in use (the scheduler's
    `kv_cache_usage`, reported every step) times the bytes of one block. A stat logger appended to an
    `AsyncLLM`'s logger manager, so it sees every step without touching the engine core."""

    def __init__(self, engine: Any, block_bytes: int):
        if engine.logger_manager is None:
            raise RuntimeError("the engine was started with disable_log_stats: its KV usage is not reported")
        self.blocks = engine.vllm_config.cache_config.num_gpu_blocks - 1  # the null block is never handed out
        self.block_bytes = block_bytes
        self.peak_usage = 0.0
        engine.logger_manager.stat_loggers.append(self)

    def reset(self) -> None:
        self.peak_usage = 0.0

    def peak_bytes(self) -> int:
        return round(self.peak_usage * self.blocks) * self.block_bytes

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is not None:
            self.peak_usage = max(self.peak_usage, scheduler_stats.kv_cache_usage)

    # The rest of vLLM's stat-logger interface: nothing to do.
    def log(self) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass

    def record_sleep_state(self, *args: Any) -> None:
        pass

    def record_admission_rejection(self, reason: str) -> None:
        pass
