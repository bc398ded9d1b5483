"""`vllm-livevlm serve-ray MODEL --replicas N [vllm args]`: LiveVLM on Ray Serve (`app.build`), and the Serve
config file that deploys the same application with `serve deploy`."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from typing import Any, Mapping

from vllm_livevlm.cli import limits_from_args
from vllm_livevlm.config import LiveVLMConfig

APP_NAME = "livevlm"
_FORWARDED_ENV_PREFIXES = ("VLLM_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_", "TOKENIZERS_")
_NOT_FORWARDED = frozenset({"VLLM_HOST_IP", "VLLM_PORT"})  # per node
_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")  # never written into the config: it is not a secret store


def replica_gpus(vllm_args: list[str], cluster_gpus: float) -> int:
    """GPUs a replica reserves: none on CPU clusters, none with vLLM's Ray executor (vLLM reserves its
    workers' GPUs itself, possibly on several nodes), else its tensor x pipeline parallel size."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    parser.add_argument("--distributed-executor-backend", default=None)
    known, _ = parser.parse_known_args(vllm_args)
    if not cluster_gpus or known.distributed_executor_backend == "ray":
        return 0
    return known.tensor_parallel_size * known.pipeline_parallel_size


def serve_config(app_args: dict[str, Any], host: str, port: int, replicas: int, cpus: float,
                 gpus: float, streams_per_replica: int | None = None,
                 max_replicas: int | None = None) -> dict[str, Any]:
    """The `serve deploy` config of the application `serve-ray` runs (no secret in it: those are in the
    cluster's store, `secret.py`): `replicas` of them, or with `streams_per_replica` autoscaled by streams
    (`autoscaling`) from `replicas` to `max_replicas`."""
    from vllm_livevlm.serving.ray.app import IMPORT_PATH
    from vllm_livevlm.serving.ray.autoscaling import POLICY
    from vllm_livevlm.serving.ray.deployment import DEPLOYMENT

    deployment: dict[str, Any] = {"name": DEPLOYMENT, "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus}}
    if streams_per_replica:
        deployment["autoscaling_config"] = {
            "min_replicas": replicas, "max_replicas": max(replicas, max_replicas or replicas),
            "policy": {"policy_function": POLICY, "policy_kwargs": {"streams_per_replica": streams_per_replica}}}
    else:
        deployment["num_replicas"] = replicas
    return {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH,
                              "args": app_args, "deployments": [deployment]}]}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-livevlm serve-ray",
        description="Serve LiveVLM from N Ray Serve replicas with stream affinity (the same HTTP API as "
                    "`vllm-livevlm serve`). Unknown flags go to every replica's vLLM.")
    parser.add_argument("model")
    parser.add_argument("--replicas", type=int, default=1, help="engine replicas")
    parser.add_argument("--streams-per-replica", type=int, default=None, metavar="N",
                        help="autoscale by streams: ceil(streams / N) replicas, from --replicas to --max-replicas")
    parser.add_argument("--max-replicas", type=int, default=None, help="with --streams-per-replica")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join ('auto' or HOST:PORT); default: start a local one")
    parser.add_argument("--host", default="0.0.0.0", help="the Serve proxies' address")
    parser.add_argument("--port", type=int, default=8000, help="the Serve proxies' port")
    parser.add_argument("--replica-cpus", type=float, default=1, help="CPUs reserved per replica")
    parser.add_argument("--livevlm-limits", default=None, help="JSON server limits of each replica (see README)")
    parser.add_argument("--livevlm-ray-limits", default=None, metavar="JSON",
                        help="the Ray layer's timings (RayLimits, see README), recorded in the cluster")
    parser.add_argument("--livevlm-state-dir", default=None, metavar="ROOT",
                        help="checkpoint every replica's streams under ROOT (storage every node reaches) and "
                             "restore a dead replica's streams on the survivors")
    parser.add_argument("--livevlm-checkpoint-every-clips", type=int, default=None, metavar="N",
                        help="limit checkpoint_every_clips")
    parser.add_argument("--livevlm-checkpoint-every-seconds", type=float, default=None, metavar="T",
                        help="limit checkpoint_every_seconds")
    parser.add_argument("--api-key", nargs="+", default=None,
                        help="the key every replica requires (better: the VLLM_API_KEY variable, which no process "
                             "listing shows)")
    parser.add_argument("--serve-config", default=None, metavar="PATH",
                        help="write the Serve config file of this application here (for `serve deploy`)")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --serve-config: record the secrets in the cluster, write the file and exit")
    LiveVLMConfig.add_cli_args(parser)
    return parser


def main(argv: list[str]) -> None:
    parser = _parser()
    args, vllm_args = parser.parse_known_args(argv)
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    if args.streams_per_replica is not None and args.streams_per_replica < 1:
        parser.error("--streams-per-replica must be at least 1")
    if args.max_replicas is not None and not args.streams_per_replica:
        parser.error("--max-replicas needs --streams-per-replica")
    for flag in ("--host", "--port"):
        if any(a == flag or a.startswith(flag + "=") for a in vllm_args):
            parser.error(f"{flag} is the proxies'; replicas serve through them")
    if args.api_key and len(args.api_key) > 1:
        parser.error("serve-ray takes one --api-key")
    if args.dry_run and not args.serve_config:
        parser.error("--dry-run needs --serve-config")
    api_key = args.api_key[0] if args.api_key else os.environ.get("VLLM_API_KEY") or None
    from vllm_livevlm.serving.ray.limits import RayLimits, record

    try:
        ray_limits = RayLimits.from_dict(json.loads(args.livevlm_ray_limits or "{}"))
    except (ValueError, TypeError) as e:
        parser.error(f"--livevlm-ray-limits: {e}")

    import ray

    from vllm_livevlm.serving.ray.gate import CALLBACK, CALLBACK_ENV
    from vllm_livevlm.serving.ray.secret import cluster_secret, key_version, set_api_key

    if args.address:
        if os.environ.get(CALLBACK_ENV) != CALLBACK:
            progress(f"note: forged stream ids are refused in the proxies only if every node's `ray start` ran "
                     f"with {CALLBACK_ENV}={CALLBACK} (else the replicas answer them 404)")
        ray.init(address=args.address)
    else:  # a new local cluster whose proxies refuse forged ids (they inherit this environment)
        os.environ[CALLBACK_ENV] = CALLBACK
        cpus = max(os.cpu_count() or 1, math.ceil(args.replicas * args.replica_cpus) + 1)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False)
    progress(f"Ray cluster at {ray.get_runtime_context().gcs_address}")
    cluster_secret()
    set_api_key(api_key)
    record(ray_limits)
    app_args = {"model": args.model, "config": LiveVLMConfig.from_cli_args(args).to_dict(), "vllm_args": vllm_args,
                "limits": limits_from_args(args), "state_dir": _state_root(parser, args.livevlm_state_dir),
                "env": forwarded_env(os.environ), "api_key_version": key_version(api_key, cluster_secret())}
    config = serve_config(app_args, args.host, args.port, args.replicas, args.replica_cpus,
                          replica_gpus(vllm_args, ray.cluster_resources().get("GPU", 0)), args.streams_per_replica,
                          args.max_replicas)
    if args.serve_config:
        _write_config(args.serve_config, config)
        if args.dry_run:
            return
    _run(config, stop_cluster=not args.address)


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables every replica sets: the vLLM/Hugging Face ones, except per-node ones and any whose name
    says it is a secret (`HF_TOKEN`: the nodes' own environment holds it, never the Serve config)."""
    return {k: v for k, v in environ.items() if k.startswith(_FORWARDED_ENV_PREFIXES) and k not in _NOT_FORWARDED
            and not any(word in k.replace("TOKENIZER", "") for word in _SECRET_WORDS)}


def _state_root(parser: argparse.ArgumentParser, root: str | None) -> str | None:
    """The state root, created and proven writable here (each replica checks its own dir again)."""
    if root is None:
        return None
    from vllm_livevlm.portable.checkpoints import StateDirError, check_state_dir

    try:
        return str(check_state_dir(root))
    except StateDirError as e:
        parser.error(str(e))


def _write_config(path: str, config: dict[str, Any]) -> None:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    progress(f"Serve config written to {path} (deploy it with `serve deploy {path}`)")


def _run(config: dict[str, Any], stop_cluster: bool) -> None:
    """Deploy the config as `serve deploy` does and run until SIGINT/SIGTERM; then delete the application
    (and stop the cluster this command started)."""
    import ray
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        serve_start(http_options=config["http_options"]).deploy_apps(ServeDeploySchema.model_validate(config))
        status = None
        while not stop.wait(1):
            status = serve.status().applications.get(APP_NAME)
            if status is not None and status.status in ("RUNNING", "DEPLOY_FAILED"):
                break
        if status is not None and status.status == "DEPLOY_FAILED":
            raise SystemExit(f"[serve-ray] the application failed to deploy: {status.message}")
        http = config["http_options"]
        progress(f"LiveVLM on Ray Serve at http://{http['host']}:{http['port']}")
        stop.wait()
    finally:
        serve.delete(APP_NAME)
        if stop_cluster:
            serve.shutdown()
            ray.shutdown()


def progress(message: str) -> None:
    print(f"[serve-ray] {message}", file=sys.stderr, flush=True)
