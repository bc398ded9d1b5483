"""vLLM endpoint plugin (`vllm.endpoint_plugins` entry point `livevlm_streams`; enable it with
`VLLM_PLUGINS=livevlm,livevlm_streams`): adds the stream routes and answers chat completions from streams."""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from fastapi import FastAPI

from vllm_livevlm.memory.budget import ModelShape
from vllm_livevlm.serving import routes
from vllm_livevlm.serving.service import ServerLimits, StreamService, config_from_env
from vllm_livevlm.streams import ARCHITECTURE, StreamEngine


class LiveVLMEndpoints:
    name = "livevlm_streams"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        routes.attach(app)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is None:
            return
        vllm_config = engine_client.vllm_config
        kv = vllm_config.kv_transfer_config
        if kv is None or kv.kv_connector != "LiveVLMConnector":
            raise RuntimeError("the livevlm_streams endpoint plugin needs the LiveVLM engine settings: start the "
                               "server with `vllm-livevlm serve MODEL` (or pass the flags listed in the README)")
        if ARCHITECTURE not in (vllm_config.model_config.architectures or []):
            raise RuntimeError(f"the model must run as {ARCHITECTURE} (--hf-overrides)")
        from patches.async_llm_pre_shutdown_hooks import add_pre_shutdown_hook

        names = getattr(args, "served_model_name", None) or [vllm_config.model_config.model]
        core = StreamEngine(engine_client, config_from_env(), vllm_config.model_config.model,
                            vllm_config.scheduler_config.max_num_batched_tokens)
        service = StreamService(core, ServerLimits.from_env(), names[0],
                                ModelShape.of(vllm_config.model_config, core.tokens_per_frame))
        service.start()
        add_pre_shutdown_hook(engine_client, service.before_engine_shutdown)
        state.livevlm = service


def endpoint_plugin() -> LiveVLMEndpoints:
    return LiveVLMEndpoints()
