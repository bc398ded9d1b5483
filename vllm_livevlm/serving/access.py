"""Who may reach which route: with `--api-key`, every route needs the key except a few open probes, and
engine-control routes are not served at all.

vLLM's own `--api-key` middleware only guards paths under `/v1`, `/v2`, `/inference` and `/cohere`:
`/invocations` (which wraps the generation routes), `/tokenize`, `/generative_scoring`, ... stay open, and
so does `/scale_elastic_ep`, which reconfigures the engine. This ASGI middleware sits outside the trust
boundary, so an unauthenticated request is refused (401) before a byte of its body is read, and answers
404 for `ADMIN_PATHS` whoever asks. Websockets are checked the same way (their browser credentials are
turned into headers by `socket_auth`, mounted outside this).
"""

from __future__ import annotations

import hashlib
import secrets

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from vllm_livevlm.serving.console import PAGE_PATHS
from vllm_livevlm.serving.errors import error_response

# Probes a load balancer or Prometheus reads without credentials (no body, no engine request).
OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/version", "/load"})
# Engine control vLLM 0.32 mounts (some only with VLLM_SERVER_DEV_MODE or a profiler): no client of a
# stream server may scale, pause, sleep, reload or abort the engine that holds every stream.
ADMIN_PATHS = frozenset({
    "/scale_elastic_ep", "/is_scaling_elastic_ep", "/abort_requests", "/inference/v1/abort_requests",
    "/collective_rpc", "/reset_prefix_cache", "/reset_mm_cache", "/reset_encoder_cache",
    "/release_kv_cache_memory", "/sleep", "/wake_up", "/is_sleeping", "/pause", "/resume", "/is_paused",
    "/start_profile", "/stop_profile", "/fault_tolerance/apply", "/fault_tolerance/status",
    "/init_weight_transfer_engine", "/start_weight_update", "/start_draft_weight_update", "/update_weights",
    "/finish_weight_update", "/shutdown_weight_transfer_engine", "/update_weight_version", "/weight_checker",
    "/weight_info", "/get_world_size", "/server_info", "/kv_event_sources", "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter"})


class APIKeyGate:
    """ASGI middleware: 404 for `ADMIN_PATHS`; with keys, 401 (OpenAI error format) for any other path but
    `OPEN_PATHS` and the console's files (`PAGE_PATHS`) whose request lacks `Authorization: Bearer <key>`.
    CORS preflights pass (they carry no credentials by design, and vLLM's CORS middleware, outside this one,
    answers them)."""

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.digests = key_digests(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", "")).rstrip("/") or "/"
        if path in ADMIN_PATHS:
            await error_response(404, "Not Found")(scope, receive, send)
        elif self.digests and path not in OPEN_PATHS | PAGE_PATHS and scope.get("method") != "OPTIONS" \
                and not bearer_matches(Headers(scope=scope), self.digests):
            await error_response(401, "a valid API key is required: send `Authorization: Bearer <key>`")(
                scope, receive, send)
        else:
            await self.app(scope, receive, send)



def key_digests(keys: list[str]) -> list[bytes]:
    """sha256 of each configured API key (compared in constant time, never kept in clear)."""
    return [hashlib.sha256(k.encode()).digest() for k in keys if k]


def bearer_matches(headers: Headers, digests: list[bytes]) -> bool:
    """Whether the request carries `Authorization: Bearer <key>` with one of the keys of `digests`."""
    scheme, _, key = (headers.get("authorization") or "").partition(" ")
    digest = hashlib.sha256(key.encode()).digest()
    return scheme.lower() == "bearer" and any(secrets.compare_digest(digest, d) for d in digests)
