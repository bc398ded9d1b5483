"""Websocket credentials a browser can send: a browser's `WebSocket` cannot set headers, only subprotocols.

A client offers the subprotocols `livevlm`, `livevlm.key.<API key>` and `livevlm.token.<owner token>`; this
ASGI middleware (mounted outside vLLM's `--api-key` middleware) moves the two credentials into the
`Authorization: Bearer` and `X-Stream-Token` headers that vLLM's check and our websocket route read, and
removes them from the offered subprotocols, so the server only ever echoes `livevlm`. Headers are not
logged, unlike a URL's query string.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

SUBPROTOCOL = "livevlm"
KEY_PREFIX = "livevlm.key."
TOKEN_PREFIX = "livevlm.token."
SOCKET_PATHS = "/v1/video/"


class SubprotocolCredentials:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"].startswith(SOCKET_PATHS):
            scope = with_credential_headers(scope)
        await self.app(scope, receive, send)


def with_credential_headers(scope: Scope) -> Scope:
    """`scope` with subprotocol credentials turned into headers (a header the client sent itself wins)."""
    offered = list(scope.get("subprotocols") or [])
    key = next((p.removeprefix(KEY_PREFIX) for p in offered if p.startswith(KEY_PREFIX)), None)
    token = next((p.removeprefix(TOKEN_PREFIX) for p in offered if p.startswith(TOKEN_PREFIX)), None)
    if key is None and token is None:
        return scope
    kept = [p for p in offered if not p.startswith((KEY_PREFIX, TOKEN_PREFIX))]
    headers = [(k, v) for k, v in scope.get("headers", []) if k != b"sec-websocket-protocol"]
    names = {k for k, _ in headers}
    if key and b"authorization" not in names:
        headers.append((b"authorization", f"Bearer {key}".encode("latin-1", "replace")))
    if token and b"x-stream-token" not in names:
        headers.append((b"x-stream-token", token.encode("latin-1", "replace")))
    if kept:
        headers.append((b"sec-websocket-protocol", ", ".join(kept).encode("latin-1", "replace")))
    return {**scope, "headers": headers, "subprotocols": kept}
