"""`ForgedStreamGate`: an ASGI middleware in every Serve HTTP proxy that answers 404 to a request naming a
stream id that is not an authentic id of this cluster (`ids.StreamIds`), before the request is routed: a
forged or foreign id never reaches a replica. A chat completion's body is read first (with the API key
only: the key is checked from the head first; up to the replicas' `max_request_body_bytes`, 413 past it,
before more is buffered; within `RayLimits.body_read_seconds`, 408 past it) for the stream it names
(`addressing.body_session`), which becomes its `X-Session-ID`: the router sends it to that stream's home,
whatever header it came with. It also rewrites the proxy's own plain-text 503 (a stream being restored,
`router.HomeUnavailable`) into the single server's JSON error, keeping its Retry-After. Installed through
Serve's proxy callback:
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=vllm_livevlm.serving.ray.gate.proxy_middlewares` in the
environment of every node's `ray start` (`serve-ray` sets it for the clusters it starts).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.websockets import WebSocket

from vllm_livevlm.serving.errors import error_body, error_response
from vllm_livevlm.serving.access import bearer_matches, key_digests
from vllm_livevlm.serving.boundary import TooLarge, TooSlow, read_capped, replaying
from vllm_livevlm.serving.ray.addressing import CHAT_PATH, SESSION_HEADER, body_session, named_stream
from vllm_livevlm.serving.ray.ids import StreamIds
from vllm_livevlm.serving.ray.secret import cluster_secret

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "vllm_livevlm.serving.ray.gate.proxy_middlewares"
REFUSED_HEADER = "X-LiveVLM-Refused-By"  # "proxy": the answer came from the gate, no replica saw the request
_LIMIT_TTL_S = 10.0  # how long a proxy uses the body limit it read from the cluster's store


class ForgedStreamGate:
    def __init__(self, app: Any):
        self.app = app
        self._ids: StreamIds | None = None  # the cluster secret is read at the first request
        # body limit, key digests, body read seconds, when read
        self._settings: tuple[int, list[bytes], float, float] = (0, [], 0.0, -_LIMIT_TTL_S)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST" and \
                scope.get("path", "").rstrip("/") == CHAT_PATH:
            readdressed = await self._readdressed(scope, receive, send)
            if readdressed is None:  # answered (413, 408) or the client went away
                return
            scope, receive = readdressed
        if scope["type"] in ("http", "websocket"):
            stream_id = named_stream(scope.get("path", ""), scope.get("headers", []))
            if stream_id is not None:
                self._ids = self._ids or StreamIds(cluster_secret())
                if self._ids.home(stream_id) is None:
                    refusal = error_response(404, f"no video stream with id {stream_id!r}", "stream_id")
                    refusal.headers[REFUSED_HEADER] = "proxy"
                    if scope["type"] == "websocket":
                        await WebSocket(scope, receive, send).send_denial_response(refusal)
                    else:
                        await refusal(scope, receive, send)
                    return
                if scope["type"] == "http":
                    send = _json_unavailable(send)
        await self.app(scope, receive, send)

    async def _cluster_settings(self) -> tuple[int, list[bytes], float]:
        """The replicas' body limit, the digests of the API key and `RayLimits.body_read_seconds`, read from
        the cluster's store at most every `_LIMIT_TTL_S`."""
        limit, digests, read_s, read_at = self._settings
        if time.monotonic() - read_at > _LIMIT_TTL_S:
            from vllm_livevlm.serving.ray.limits import body_limit, recorded
            from vllm_livevlm.serving.ray.secret import api_key

            limit, key, read_s = await asyncio.to_thread(lambda: (body_limit(), api_key(),
                                                                  recorded().body_read_seconds))
            digests = key_digests([key] if key else [])
            self._settings = (limit, digests, read_s, time.monotonic())
        return limit, digests, read_s

    async def _readdressed(self, scope: dict, receive: Any, send: Any) -> tuple[dict, Any] | None:
        """The chat completion with `X-Session-ID` naming the stream its body makes the replica answer from.
        Without the API key the body is not read: the replica refuses the request (401) from its head."""
        limit, digests, read_s = await self._cluster_settings()
        if digests and not bearer_matches(Headers(scope=scope), digests):
            return scope, receive
        body = await read_capped(scope, receive, limit, read_s)
        if isinstance(body, (TooLarge, TooSlow)):
            refusal = error_response(413 if isinstance(body, TooLarge) else 408, body.message)
            refusal.headers[REFUSED_HEADER] = "proxy"
            await refusal(scope, receive, send)
            return None
        if body is None:
            return None
        header = named_stream(scope["path"], scope.get("headers", []))
        session = await asyncio.to_thread(body_session, body, header)
        if session is not None and session != header:
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != SESSION_HEADER.encode()]
            scope = {**scope, "headers": [*headers, (SESSION_HEADER.encode(), session.encode())]}
        return scope, replaying(body, receive)


def _json_unavailable(send: Any) -> Any:
    """`send` with the proxy's plain-text 503 (its body is the message) turned into a JSON error."""
    start: dict | None = None

    async def sending(message: dict) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and message["status"] == 503 and \
                dict(message.get("headers") or []).get(b"content-type", b"").startswith(b"text/plain"):
            start = message  # Serve's error: one body message follows
            return
        if start is not None and message["type"] == "http.response.body":
            body = json.dumps(error_body(503, message.get("body", b"").decode("utf-8", "replace"),
                                         "stream_id")).encode()
            headers = [(k, v) for k, v in start.get("headers") or [] if k.lower() not in (b"content-type",
                                                                                             b"content-length")]
            start = {**start, "headers": [*headers, (b"content-type", b"application/json"),
                                          (b"content-length", str(len(body)).encode())]}
            await send(start)
            message, start = {"type": "http.response.body", "body": body}, None
        await send(message)

    return sending


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy callback: the middlewares every proxy wraps its routes in."""
    return [Middleware(ForgedStreamGate)]
