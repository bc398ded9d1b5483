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

Stock routes carry no media either: vLLM decodes (and fetches, for a URL) a chat message's image, video
and audio parts itself, before and outside our upload checks, so a JSON body holding a media part
(`MEDIA_KEYS`, or a `"type"` in `MEDIA_TYPES`) is refused (400) on every route but our own `/v1/video/...`
routes: video goes through `/v1/video/streams`. A body nesting deeper than `max_json_depth` is refused
(400) too: vLLM's parsers would raise `RecursionError` (500).

Reusable: `TrustBoundary(app, max_body_bytes)` wraps any ASGI app.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, NamedTuple

import numpy as np

from vllm_livevlm.serving.errors import error_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# What vLLM moves from a request body into the engine request (`vllm.v1.request.Request` reads these keys
# of `extra_args`; the OpenAI protocols copy the two transfer fields there).
RESERVED_KEYS = frozenset({"kv_transfer_params", "ec_transfer_params", "kv_cache_report_mode"})
# Media content parts vLLM decodes itself (`vllm/renderers/chat_utils.py` MM_PARSER_MAP and its untyped
# parts, the Anthropic/Cohere/Responses blocks, `/inference/v1/generate`'s `content_parts`/`features`,
# `/v1/systemone`'s `images`/`videos`): refused as object keys at any depth, and as `"type"` values.
MEDIA_KEYS = frozenset({"image_url", "image_pil", "image_embeds", "input_image", "audio_url", "audio_embeds",
                        "input_audio", "video_url", "video_embeds", "input_video", "multi_modal_data",
                        "multi_modal_uuids", "mm_embeds", "mm_features", "features", "content_parts",
                        "images", "videos"})
MEDIA_TYPES = frozenset({*MEDIA_KEYS, "image", "audio", "video", "document", "file", "input_file"})
# Frame uploads and stream files: the large bodies, handled by our own routes, which never forward client
# fields (a stream file is read by `vllm_livevlm.portable`, never by vLLM).
EXEMPT_PATH = re.compile(r"^/v1/video/streams/(?:[^/]+/frames|import)$")
OUR_ROUTES = "/v1/video/"  # read no media part: nothing in their bodies reaches vLLM's media decoding
MAX_JSON_DEPTH = 128
# Sampling values vLLM 0.32 accepts but cannot serve (500 instead of 400): a `top_k` past 64 bits (msgpack
# cannot carry it to the engine) and `structured_outputs` that is not an object. Refused here, named.
INT64 = 2**63 - 1
_NAMES = tuple(name.encode() for name in RESERVED_KEYS | MEDIA_TYPES | {"top_k", "structured_outputs"})
_STRING = re.compile(rb'"(?:[^"\\]+|\\.)*"', re.S)  # runs of plain bytes: one regex step each
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class Refusal(NamedTuple):
    """Why a body is refused (400): the message and the field it names."""

    message: str
    param: str


def json_depth(body: bytes) -> int:
    """How deep a UTF-8 JSON text nests (brackets outside strings), in C-speed passes (regex, translate,
    numpy) so that an 8 MiB body costs milliseconds, never a Python loop or the parser's recursion."""
    brackets = np.frombuffer(_STRING.sub(b"", body).translate(None, _NOT_BRACKETS), np.uint8)
    if brackets.size == 0:
        return 0
    return int(np.cumsum(np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)).max(initial=0))


def refusal_of(body: bytes, media: bool = True, max_depth: int = MAX_JSON_DEPTH) -> Refusal | None:
    """Why the JSON body is refused, else None: a reserved key (any depth) first, then (with `media`) a
    media part, then nesting past `max_depth`.

    Cheap for ordinary requests: in JSON without `\\u` escapes a key or type can only be spelled
    literally, so a body that contains none of the names is only measured for depth, not parsed. Anything
    else is parsed exactly as the handlers parse it (`json.loads`), every duplicate key included."""
    encoding = json.detect_encoding(body)
    if encoding != "utf-8":  # UTF-16/32, as `json.loads` reads them: measured and searched as UTF-8
        try:
            body = body.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")
        except UnicodeError:
            return None  # no JSON handler reads it either
    if (body.lstrip()[:1] in (b"[", b"{") and body.count(b"[") + body.count(b"{") > max_depth
            and json_depth(body) > max_depth):
        return _too_deep(max_depth)
    if b"\\u" not in body and not any(name in body for name in _NAMES):
        return None
    reserved: list[str] = []
    parts: list[str] = []
    unservable: list[str] = []

    def check(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        for key, value in pairs:
            if key in RESERVED_KEYS:
                reserved.append(key)
            elif key in MEDIA_KEYS or (key == "type" and isinstance(value, str) and value in MEDIA_TYPES):
                parts.append(value if key == "type" else key)
            elif ((key == "top_k" and isinstance(value, int) and not -INT64 <= value <= INT64)
                  or (key == "structured_outputs" and value is not None and not isinstance(value, dict))):
                unservable.append(key)
        return dict(pairs)

    try:
        json.loads(body, object_pairs_hook=check)
    except RecursionError:
        return _too_deep(max_depth)
    except ValueError:
        return None  # not JSON: no handler that reads JSON accepts it either
    if reserved:
        return Refusal(f"`{reserved[0]}` is set by the server only; clients may not send it", reserved[0])
    if unservable:
        return Refusal(f"`{unservable[0]}` must be " + ("an integer within 64 bits" if unservable[0] == "top_k"
                                                        else "an object or null"), unservable[0])
    if parts and media:
        return Refusal(f"media content (`{parts[0]}`) is not accepted on this route: send images and video to "
                       "a stream (POST /v1/video/streams, then .../frames); questions are text", parts[0])
    return None


def _too_deep(max_depth: int) -> Refusal:
    return Refusal(f"the JSON body nests deeper than {max_depth} levels (max_json_depth)", "body")


class TrustBoundary:
    """ASGI middleware: bodies are read with a byte cap (413 past it), checked (`refusal_of`, 400),
    and handed on unchanged. Websockets and frame uploads pass through untouched."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_json_depth: int = MAX_JSON_DEPTH):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or EXEMPT_PATH.match(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        body = await read_capped(scope, receive, self.max_body_bytes)
        if isinstance(body, TooLarge):
            await self._refuse(413, body.message, scope, receive, send)
            return
        if body is None:  # the client went away
            return
        refusal = refusal_of(body, not scope.get("path", "").startswith(OUR_ROUTES), self.max_json_depth) \
            if body else None
        if refusal is not None:
            await self._refuse(400, refusal.message, scope, receive, send, refusal.param)
            return
        await self.app(scope, replaying(body, receive), send)

    @staticmethod
    async def _refuse(status: int, message: str, scope: Scope, receive: Receive, send: Send,
                      param: str | None = None) -> None:
        await error_response(status, message, param)(scope, receive, send)


class TooLarge(NamedTuple):
    message: str


class TooSlow(NamedTuple):
    message: str


async def read_capped(scope: Scope, receive: Receive, max_bytes: int,
                      deadline_s: float | None = None) -> bytes | TooLarge | TooSlow | None:
    """A request's body, read no further than `max_bytes` (refused by its declared length first) and, with
    `deadline_s`, within that many seconds in all (a trickled body holds no coroutine past it); None if the
    client went away."""
    declared = _content_length(scope)
    if declared is not None and declared > max_bytes:
        return TooLarge(f"request body of {declared} bytes exceeds the limit of {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    more = True
    try:
        async with asyncio.timeout(deadline_s):
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > max_bytes:
                    return TooLarge(f"request body exceeds the limit of {max_bytes} bytes")
                chunks.append(chunk)
                more = message.get("more_body", False)
    except TimeoutError:
        return TooSlow(f"request body not received within {deadline_s:g} seconds")
    return b"".join(chunks)


def replaying(body: bytes, receive: Receive) -> Receive:
    """`receive` that first hands on the body already read."""
    replay: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return replay.pop() if replay else await receive()

    return replayed


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
