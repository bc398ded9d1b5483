"""vLLM endpoint plugin (`vllm.endpoint_plugins` entry point `livevlm_streams`; enable it with
`VLLM_PLUGINS=livevlm,livevlm_streams`): adds the stream routes and answers chat completions from streams."""

from __future__ import annotations

import os
from argparse import Namespace
from typing import Any

from fastapi import FastAPI

from vllm_livevlm.memory.budget import ModelShape
from vllm_livevlm.portable.checkpoints import Checkpointer, check_state_dir
from vllm_livevlm.serving import console, redact, routes
from vllm_livevlm.serving.access import APIKeyGate
from vllm_livevlm.serving.boundary import TrustBoundary
from vllm_livevlm.serving.media import FrameDecoder
from vllm_livevlm.serving.restore_gate import RestoreGate
from vllm_livevlm.serving.service import ServerLimits, StreamService, config_from_env
from vllm_livevlm.service_env import STATE_DIR_ENV
from vllm_livevlm.model.adapter import adapter_class
from vllm_livevlm.streams import StreamEngine

SOCKET_AUTH = "vllm_livevlm.serving.socket_auth.SubprotocolCredentials"


class LiveVLMEndpoints:
    name = "livevlm_streams"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        args = app.state.args
        keys = [key for key in (args.api_key or [os.environ.get("VLLM_API_KEY", "")]) if key]  # as vLLM reads them
        redact.install([*keys, os.environ.get("VLLM_API_KEY", "")])
        # vLLM adds its `--api-key` middleware after the plugins; `--middleware` ones are added last, outermost,
        # so the browser's websocket credentials are in the headers before any key is checked.
        if SOCKET_AUTH not in args.middleware:
            args.middleware.append(SOCKET_AUTH)
        limits = ServerLimits.from_env()
        # Around every route, inside vLLM's own middleware (CORS, --api-key): no handler sees a client's
        # engine transfer fields or media parts, with or without the key.
        app.add_middleware(TrustBoundary, max_body_bytes=limits.max_request_body_bytes,
                           max_json_depth=limits.max_json_depth)
        # Inside the key check, before any body is read: 503 + Retry-After while streams are restored.
        app.add_middleware(RestoreGate)
        # Outside the boundary (added later = outer): every route but the open probes needs the key before its
        # body is read (vLLM's check covers /v1, /v2, /inference, /cohere only); engine control is not served.
        app.add_middleware(APIKeyGate, keys=keys)
        routes.attach(app)
        console.attach(app, bool(keys), args.host, args.port)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is None:
            return
        vllm_config = engine_client.vllm_config
        kv = vllm_config.kv_transfer_config
        if kv is None or kv.kv_connector != "LiveVLMConnector":
            raise RuntimeError("the livevlm_streams endpoint plugin needs the LiveVLM engine settings: start the "
                               "server with `vllm-livevlm serve MODEL` (or pass the flags listed in the README)")
        architecture = adapter_class(vllm_config.model_config.hf_config.architectures).livevlm_architecture
        if architecture not in (vllm_config.model_config.architectures or []):
            raise RuntimeError(f"the model must run as {architecture} (--hf-overrides)")
        from patches.async_llm_pre_shutdown_hooks import add_pre_shutdown_hook

        names = getattr(args, "served_model_name", None) or [vllm_config.model_config.model]
        core = StreamEngine(engine_client, config_from_env(), vllm_config.model_config.model,
                            vllm_config.scheduler_config.max_num_batched_tokens)
        service = StreamService(core, ServerLimits.from_env(), names[0],
                                ModelShape.of(vllm_config.model_config, core.tokens_per_frame,
                                              core.adapter.position_axes))
        service.checkpointer = _checkpointer(service)
        service.start()
        add_pre_shutdown_hook(engine_client, service.before_engine_shutdown)
        state.livevlm = service
        # Uploads are shrunk to the vision tower's input side (SigLIP `image_size`, Qwen-VL's frame pixels) as
        # they are decoded.
        state.livevlm_decoder = FrameDecoder(service.limits, core.adapter.frame_side, core.adapter.frame_size)
        state.livevlm_websockets = 0  # open stream websockets (`max_websockets`)


def _checkpointer(service: StreamService) -> Checkpointer | None:
    """With a state dir (`--livevlm-state-dir`): its checkpoints, restored once the server runs. A dir that
    cannot be written refuses the start (`StateDirError`)."""
    state_dir = os.environ.get(STATE_DIR_ENV)
    if not state_dir:
        return None
    checkpointer = Checkpointer(service, check_state_dir(state_dir))
    checkpointer.start()
    return checkpointer


def endpoint_plugin() -> LiveVLMEndpoints:
    return LiveVLMEndpoints()
