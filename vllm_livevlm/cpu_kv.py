"""Size vLLM's CPU KV pool to the machine, so `vllm-livevlm serve MODEL` and `LiveVLM(model)` start as written.

Without a size, vLLM 0.32's CPU worker reserves `gpu_memory_utilization` (0.92) of the NUMA node's memory
and refuses to start when less than that is free ("Available memory on node 0 ... is less than desired"),
which is the normal case on a small or shared machine. With an explicit `kv_cache_memory_bytes` it only
checks that the pool fits in what is free when the pool is allocated (after the weights are loaded).

A LiveVLM engine's pool holds only the requests in flight (a clip prefill, a question's retrieved context);
the streams' memory lives outside it, in the same host memory. So the pool takes a quarter of what is free
once the weights are loaded, capped at 2 GiB (a 7B model's 32k-token context needs 1.8 GiB):

    pool = min(2 GiB, (available - weights) / 4) / workers      (rounded down to a MiB, at least 64 MiB)

`available` is vLLM's own figure for the node (free + file cache + reclaimable, clamped to the cgroup),
`weights` the checkpoint's weight files, `workers` the tensor-parallel size (each rank allocates its pool).
Nothing is chosen when the user set `VLLM_CPU_KVCACHE_SPACE`, `kv_cache_memory_bytes` or
`gpu_memory_utilization`, or when vLLM runs on a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vllm_livevlm.log import get_logger

logger = get_logger(__name__)

MiB = 1 << 20
GiB = 1 << 30
POOL_CAP = 2 * GiB
POOL_FRACTION = 4          # the pool takes 1/POOL_FRACTION of what is free after the weights
POOL_FLOOR = 64 * MiB
USER_CHOICES = ("kv_cache_memory_bytes", "gpu_memory_utilization")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def kv_pool_bytes(available: int, weights: int, workers: int = 1) -> int:
    """The formula above; raises when the machine cannot hold the weights and a useful pool."""
    pool = min(POOL_CAP, (available - weights) // POOL_FRACTION) // max(1, workers) // MiB * MiB
    if pool < POOL_FLOOR:
        raise ValueError(f"this machine has {available / GiB:.2f} GiB free and the model's weights take "
                         f"{weights / GiB:.2f} GiB: not enough left for vLLM's CPU KV pool (at least "
                         f"{POOL_FLOOR // MiB} MiB per worker); free memory or set VLLM_CPU_KVCACHE_SPACE (GiB)")
    return pool


def weight_bytes(model: str) -> int:
    """Bytes of the checkpoint's weight files (a local directory or the Hugging Face cache; 0 if unknown)."""
    path = Path(model)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(model, local_files_only=True))
        except Exception:  # not downloaded yet: vLLM will download it; we cannot know its size offline
            return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.suffix in WEIGHT_SUFFIXES and f.is_file())


def kv_pool_args(model: str, engine_args: dict[str, Any]) -> dict[str, int]:
    """`{"kv_cache_memory_bytes": N}` for a CPU engine the user did not size, else `{}` (logged when chosen)."""
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE") or any(engine_args.get(k) is not None for k in USER_CHOICES):
        return {}
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    node = get_allowed_cpu_list()[0].numa_node
    available = get_memory_node_info(node).available_memory
    weights = weight_bytes(model)
    workers = int(engine_args.get("tensor_parallel_size") or 1)
    pool = kv_pool_bytes(available, weights, workers)
    from vllm.config.logging import LoggingConfig
    from vllm.logger import configure_logging_if_needed

    configure_logging_if_needed(LoggingConfig())  # vLLM's defaults: it configures logging later, at engine start
    logger.info("LiveVLM: vLLM CPU KV pool %.2f GiB per worker = min(2 GiB, (%.2f GiB free on node %d - %.2f GiB "
                "weights) / %d) / %d workers; set VLLM_CPU_KVCACHE_SPACE or --kv-cache-memory-bytes to choose",
                pool / GiB, available / GiB, node, weights / GiB, POOL_FRACTION, workers)
    return {"kv_cache_memory_bytes": pool}
