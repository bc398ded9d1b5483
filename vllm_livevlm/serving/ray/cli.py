"""`vllm-livevlm serve-ray MODEL --replicas N [vllm args]`: replicas on a Ray cluster behind one router."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys

from vllm_livevlm.config import LiveVLMConfig


def replica_gpus(vllm_args: list[str], cluster_gpus: float) -> int:
    """GPUs a replica actor reserves: none on CPU clusters, none with vLLM's Ray executor (vLLM reserves
    its workers' GPUs itself, possibly on several nodes), else its tensor x pipeline parallel size."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    parser.add_argument("--distributed-executor-backend", default=None)
    known, _ = parser.parse_known_args(vllm_args)
    if not cluster_gpus or known.distributed_executor_backend == "ray":
        return 0
    return known.tensor_parallel_size * known.pipeline_parallel_size


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="vllm-livevlm serve-ray",
        description="Serve LiveVLM from N replicas on a Ray cluster behind one router with stream affinity "
                    "(the same HTTP API as `vllm-livevlm serve`). Unknown flags go to every replica's vLLM.")
    parser.add_argument("model")
    parser.add_argument("--replicas", type=int, default=1, help="engine replicas (Ray actors)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join ('auto' or HOST:PORT); default: start a local one")
    parser.add_argument("--host", default="0.0.0.0", help="the router's address")
    parser.add_argument("--port", type=int, default=8000, help="the router's port")
    parser.add_argument("--replica-cpus", type=float, default=1, help="CPUs reserved per replica actor")
    parser.add_argument("--replica-timeout", type=float, default=900, help="seconds a replica may take to start")
    parser.add_argument("--livevlm-limits", default=None, help="JSON server limits of each replica (see README)")
    parser.add_argument("--router-limits", default=None,
                        help="JSON router limits (see README); max_upload_bytes defaults to the replicas'")
    parser.add_argument("--api-key", nargs="+", default=None,
                        help="the key the router and every replica require (better: the VLLM_API_KEY variable, "
                             "which no process listing shows)")
    LiveVLMConfig.add_cli_args(parser)
    args, vllm_args = parser.parse_known_args(argv)
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    for flag in ("--host", "--port"):
        if any(a == flag or a.startswith(flag + "=") for a in vllm_args):
            parser.error(f"{flag} is the router's; replicas pick their own ports")
    if args.api_key and len(args.api_key) > 1:
        parser.error("serve-ray takes one --api-key (replicas read it from VLLM_API_KEY, which holds one)")
    api_key = args.api_key[0] if args.api_key else os.environ.get("VLLM_API_KEY") or None
    config = LiveVLMConfig.from_cli_args(args)
    limits = json.loads(args.livevlm_limits) if args.livevlm_limits else None

    import ray
    import uvicorn

    from vllm_livevlm.serving.ray.replica import start_replicas, stop_replicas
    from vllm_livevlm.serving.console import console_url
    from vllm_livevlm.serving.ray.router import RouterLimits, StreamRouter

    router_limits = RouterLimits(**{"max_upload_bytes": (limits or {}).get("max_upload_bytes",
                                                                            RouterLimits.max_upload_bytes),
                                    **(json.loads(args.router_limits) if args.router_limits else {})})

    if args.address:
        ray.init(address=args.address)
    else:  # a new local cluster (never one `ray start` left running), sized so that the replicas fit
        cpus = max(os.cpu_count() or 1, math.ceil(args.replicas * args.replica_cpus))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False)
    progress(f"Ray cluster at {ray.get_runtime_context().gcs_address}: {ray.cluster_resources()}")
    signal.signal(signal.SIGTERM, _interrupt)  # stop the replicas on SIGTERM while they start, too
    replicas = []
    try:
        replicas = start_replicas(args.model, args.replicas, config, vllm_args, limits, api_key,
                                  num_cpus=args.replica_cpus,
                                  num_gpus=replica_gpus(vllm_args, ray.cluster_resources().get("GPU", 0)),
                                  timeout=args.replica_timeout, progress=progress)
        progress(f"router listening on http://{args.host}:{args.port}")
        progress(f"LiveVLM console: {console_url(args.host, args.port)}")
        router = StreamRouter(replicas, api_key, router_limits)
        uvicorn.run(router.app(), host=args.host, port=args.port, log_level="info")
    finally:
        stop_replicas(replicas)
        ray.shutdown()


def progress(message: str) -> None:
    print(f"[serve-ray] {message}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
