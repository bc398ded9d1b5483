"""The Serve application: `build(args)` is the import path of the Serve config `vllm-livevlm serve-ray`
writes and deploys (`vllm_livevlm.serving.ray.app:build`, what `serve deploy CONFIG` deploys too). Replica
count, autoscaling and resources are the config's deployment options: changing them and deploying again
scales the running replicas (their streams move, `moving.py`) instead of replacing them."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from vllm_livevlm.serving.ray.deployment import LiveVLMServer

IMPORT_PATH = "vllm_livevlm.serving.ray.app:build"


def build(args: dict[str, Any]) -> Application:
    """`args`: model, config (LiveVLMConfig fields), vllm_args (`vllm serve` flags), limits (`ServerLimits`),
    env (variables every replica sets), state_dir (checkpoints and healing, `healing.py`), api_key_version
    (`secret.key_version`: a new API key redeploys the replicas)."""
    return LiveVLMServer.bind(args["model"], args.get("config") or {}, list(args.get("vllm_args") or []),
                              args.get("limits"), args.get("env"), args.get("state_dir"), args.get("api_key_version"))
