"""`LiveVLMServer`: the Ray Serve deployment. Each replica runs one LiveVLM engine (vLLM + the plugin) in
its own process and serves vLLM's own FastAPI app with the plugin's routes, built exactly as
`vllm-livevlm serve` builds it (`cli.serve_command`'s flags and environment): the same route code, errors,
SSE, websockets, `--api-key` and owner tokens, with no proxy in between. The replica mints the ids of the
streams it opens so that they name it (`ids.StreamIds`), reports its load to the routers (routing stats)
and its engine's health to Serve (`check_health`: a failing engine restarts the replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from vllm_livevlm.config import LiveVLMConfig

ROUTER = "vllm_livevlm.serving.ray.router.StreamAffinityRouter"
DEPLOYMENT = "LiveVLMServer"


# A request in flight holds a slot for as long as it runs (an SSE answer, a `wait=true` push, a websocket):
# the replica's own limits (`ServerLimits`) bound the work, not Serve's queue.
@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=4096, health_check_period_s=5,
                  health_check_timeout_s=30, graceful_shutdown_timeout_s=60,
                  request_router_config=RequestRouterConfig(request_router_class=ROUTER,
                                                            request_routing_stats_period_s=1))
@serve.ingress()
class LiveVLMServer:
    async def __init__(self, model: str, config: dict[str, Any], vllm_args: list[str],
                     limits: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                     state_root: str | None = None, api_key_version: str | None = None):
        self._engine_context = contextlib.AsyncExitStack()  # first: the destructor runs after a failed start too
        from vllm_livevlm.cli import serve_command
        from vllm_livevlm.serving.ray import placement
        from vllm_livevlm.serving.ray.healing import own_dir
        from vllm_livevlm.serving.ray.ids import home_tag
        from vllm_livevlm.serving.ray.limits import recorded
        from vllm_livevlm.serving.ray.secret import api_key, cluster_secret, key_version

        self.limits = recorded()
        replica = serve.get_replica_context().replica_id
        self.tag = tag = home_tag(replica.unique_id)
        placement.record_replica(tag, replica.to_full_id_str())  # its actor's name
        # With a state root: this replica checkpoints into its own dir there (dead replicas' streams are
        # restored from theirs).
        state_dir = str(own_dir(Path(state_root), tag)) if state_root else None
        # Before vLLM is imported: its plugins, the stream config and limits, the user's VLLM_*/HF_* settings.
        command, livevlm = serve_command(model, LiveVLMConfig.from_dict(config), vllm_args, limits, state_dir)
        os.environ.update({**(env or {}), **livevlm})
        key = api_key()
        if key_version(key, cluster_secret()) != api_key_version:  # the config is of another key: a new deploy comes
            raise RuntimeError("the cluster's API key is not the one this deployment was made with: deploy again")
        if key:  # from the cluster's store: vLLM and the plugin read it here, no command line shows it
            os.environ["VLLM_API_KEY"] = key
        self._vllm_app = await self._start(command[3:])  # command = [python, -m, module, *server flags]
        self.service = self._vllm_app.state.livevlm
        await self._join_cluster(Path(state_root) if state_root else None)

    async def _join_cluster(self, state_root: Path | None) -> None:
        """What makes the engine a replica among others: ids naming this replica, the body limit the proxies
        read bodies by, the rebalance route and the gate of moving streams, healing dead replicas."""
        from vllm_livevlm.serving.ray import rebalancing
        from vllm_livevlm.serving.ray.healing import Healer
        from vllm_livevlm.serving.ray.ids import StreamIds
        from vllm_livevlm.serving.ray.limits import record_body_limit
        from vllm_livevlm.serving.ray.moving import MoveGate
        from vllm_livevlm.serving.ray.secret import cluster_secret

        ids, tag = StreamIds(cluster_secret()), self.tag
        self.service.new_stream_id = lambda: ids.mint(tag)
        await asyncio.to_thread(record_body_limit, self.service.limits.max_request_body_bytes)
        self._peers = serve.get_deployment_handle(DEPLOYMENT, serve.get_replica_context().app_name,
                                                  _check_exists=False)
        self._vllm_app.add_api_route(rebalancing.PATH, rebalancing.route(self._peers, self.limits),
                                     methods=["POST"], include_in_schema=False)
        self._gate = MoveGate(self._vllm_app, self.service, self.limits.retry_after_seconds)
        self._moves_announced = False  # routers look up moved streams of a replica that reports moves
        self._healer = Healer(self.service, state_root, tag, self.limits.heal_poll_seconds)
        self._healer.start()

    async def _start(self, server_args: list[str]) -> Any:
        """vLLM's engine and API app from `vllm serve` flags (`launchers.api_server.entry`, minus uvicorn)."""
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        args = make_arg_parser(FlexibleArgumentParser()).parse_args(server_args)
        validate_parsed_serve_args(args)
        self.engine = await self._engine_context.enter_async_context(build_async_engine_client(args))
        tasks = await self.engine.get_supported_tasks()
        app = build_app(args, tasks, self.engine.model_config)
        await init_app_state(self.engine, app.state, args, tasks)
        return app

    def __serve_build_asgi_app__(self) -> Any:
        return self._gate

    async def check_health(self) -> None:
        """Raises when the engine is dead: Serve then replaces this replica."""
        await self.engine.check_health()

    async def record_routing_stats(self) -> dict[str, Any]:
        """The load the routers place new streams by: live (and opening) streams, then store bytes."""
        measured_at = time.time()
        stats = await self.service.core.engine_stats()
        return {"streams": len(self.service.core.streams) + self.service.opening, "store_bytes": stats["store_bytes"],
                "measured_at": measured_at, "moves": self._moves_announced}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """The metric the streams autoscaling policy sizes the deployment by (`autoscaling`)."""
        from vllm_livevlm.serving.ray.autoscaling import METRIC

        return {METRIC: float(len(self.service.core.streams) + self.service.opening)}

    # Deployment-handle calls (no HTTP route); the first argument names the replica that takes the call
    # (`router.TARGETED`; None: any).
    async def held(self, to: str) -> list[str]:
        """The ids of the streams this replica holds (`rebalancing`)."""
        return list(self.service.core.streams)

    async def send(self, to_me: str, to: str, count: int) -> dict[str, list]:
        """Hand `count` of this replica's streams over to the replica `to` (`moving.move`), stopping at the
        first that fails (it stays here); streams another move holds are not picked."""
        from vllm_livevlm.serving.ray.moving import move

        if not self._moves_announced:  # from now on the routers look up where this replica's streams live
            self._moves_announced = True
            await asyncio.sleep(self.limits.move_settle_seconds)
        moved: list[str] = []
        for stream_id in [s for s in self.service.core.streams if s not in self._gate.moving][:count]:
            try:
                await move(self.service, self._gate, self._peers, stream_id, self.tag, to,
                           self.limits.hand_over_seconds)
            except Exception as e:
                return {"moved": moved, "failed": [{"id": stream_id, "error": str(e) or type(e).__name__}]}
            moved.append(stream_id)
        return {"moved": moved, "failed": []}

    async def adopt(self, to: str | None, stream_id: str, data: bytes) -> str:
        """Take over a stream another replica hands over (`moving`): imported with its id, memory and owner
        token, then recorded as at home here. Returns this tag."""
        from vllm_livevlm.portable.checkpoints import owner_digest
        from vllm_livevlm.serving.ray import placement

        await self.service.import_stream(data, stream_id=stream_id, token_digest=owner_digest(data),
                                         max_bytes=self.service.own_file_bytes())
        self._gate.arrived(stream_id)
        await asyncio.to_thread(placement.set_home, stream_id, self.tag)
        return self.tag

    async def __del__(self) -> None:
        """Serve stops the replica: its streams move to the running replicas (`moving`), then the engine stops
        (the plugin's shutdown hook checkpoints any stream that stayed)."""
        if hasattr(self, "_healer"):  # it joined the cluster
            from vllm_livevlm.serving.ray.moving import hand_over

            self._healer.stop()  # a stopping replica takes no dead replica's streams
            await hand_over(self.service, self._peers, self.limits.hand_over_seconds)
        await self._engine_context.aclose()
