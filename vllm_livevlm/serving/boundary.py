"""The trust boundary of the stream protocol: an ASGI middleware that refuses client-supplied engine transfer
fields before any of vLLM's handlers sees the request.

vLLM copies a request's `kv_transfer_params` and `ec_transfer_params` (top-level fields, or keys of
`vllm_xargs`, which become `SamplingParams.extra_args`) into the engine request, where the LiveVLM connector
reads its protocol. Every stock route that builds an engine request (`/v1/completions`,
`/v1/chat/completions`, `/v1/responses`, `/v1/messages`, `/invocations`, which wraps the others and sits
outside `--api-key`'s prefixes, the scale-out `/inference/...` routes, ...) parses a JSON body, so the
middleware refuses (400) any JSON body that holds one of `RESERVED_KEYS` as an object key at any depth,
whether or not the caller is authenticated. Requests minted by our own front end never cross HTTP: they
reach the engine signed (`vllm_livevlm.connector.params`).

Reusable: `TrustBoundary(app, max_body_bytes)` wraps any ASGI app (the Ray router mounts it too).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from vllm_livevlm.serving.errors import error_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# What vLLM moves from a request body into the engine request (`vllm.v1.request.Request` reads these keys
# of `extra_args`; the OpenAI protocols copy the two transfer fields there).
RESERVED_KEYS = frozenset({"kv_transfer_params", "ec_transfer_params", "kv_cache_report_mode"})
# Frame uploads: the one large body, handled by our own route, which never forwards client fields.
EXEMPT_PATH = re.compile(r"^/v1/video/streams/[^/]+/frames$")


class ReservedField(ValueError):
    """The body holds a field that only the server may set."""


def reserved_key_in(body: bytes) -> str | None:
    """The first reserved key the body holds as a JSON object key (any depth), else None.

    Cheap for ordinary requests: in UTF-8 JSON without `\\u` escapes a key can only be spelled literally,
    so a body that does not contain any reserved name is not parsed. Anything else is parsed exactly as
    the handlers parse it (`json.loads`, which also reads UTF-16/32), every duplicate key included."""
    utf8 = json.detect_encoding(body) == "utf-8"
    if utf8 and b"\\u" not in body and not any(key.encode() in body for key in RESERVED_KEYS):
        return None
    found: list[str] = []

    def check(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        found.extend(key for key, _ in pairs if key in RESERVED_KEYS)
        return dict(pairs)

    try:
        json.loads(body, object_pairs_hook=check)
    except (ValueError, RecursionError):
        return None  # not JSON: no handler that reads JSON accepts it either
    return found[0] if found else None


class TrustBoundary:
    """ASGI middleware: bodies are read with a byte cap (413 past it), checked (`reserved_key_in`, 400),
    and handed on unchanged. Websockets and frame uploads pass through untouched."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or EXEMPT_PATH.match(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(413, f"request body of {declared} bytes exceeds the limit of {self.max_body_bytes}",
                               scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._refuse(413, f"request body exceeds the limit of {self.max_body_bytes} bytes",
                                   scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        key = reserved_key_in(body) if body else None
        if key is not None:
            await self._refuse(400, f"`{key}` is set by the server only; clients may not send it", scope,
                               receive, send, key)
            return
        replay: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    @staticmethod
    async def _refuse(status: int, message: str, scope: Scope, receive: Receive, send: Send,
                      param: str | None = None) -> None:
        await error_response(status, message, param)(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
