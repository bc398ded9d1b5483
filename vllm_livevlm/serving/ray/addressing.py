"""Which stream an HTTP request names: the `{id}` of `/v1/video/streams/{id}[/...]` (HTTP and websocket),
else the `X-Session-ID` header. A chat completion may name it in its JSON body instead (`session_id`, or
`vllm_xargs.session_id`): the proxy gate reads that (`body_session`) and sets the header to the stream the
replica will answer from, so that the router, which reads only the head, sends it there. Stream creations
and imports name none: they are placed by load."""

from __future__ import annotations

import json
from collections.abc import Iterable

STREAMS_PATH = "/v1/video/streams"
CHAT_PATH = "/v1/chat/completions"
CREATIONS = frozenset({STREAMS_PATH, STREAMS_PATH + "/import"})
SESSION_HEADER = "x-session-id"


def named_stream(path: str, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The stream id the request names, or None (creations name none, whatever their headers say)."""
    if path.rstrip("/") in CREATIONS:
        return None
    if path.startswith(STREAMS_PATH + "/"):
        return path[len(STREAMS_PATH) + 1:].split("/", 1)[0] or None
    for name, value in headers:
        if name.lower() == SESSION_HEADER.encode():
            return value.decode("latin-1").strip() or None
    return None


def is_creation(method: str, path: str) -> bool:
    """A request that opens a stream (placed on the least-loaded replica)."""
    return method == "POST" and path.rstrip("/") in CREATIONS


def body_session(body: bytes, header: str | None) -> str | None:
    """The stream a chat completion's body makes the replica answer from, as vLLM picks it
    (`GenerateBaseServing._get_session_id`: the body's `session_id`, else the header, else
    `vllm_xargs.session_id`); None when it names none or is not a JSON object (the replica refuses it).
    Bodies that cannot spell the key (no `session_id`, no `\\u` escape, plain UTF-8) are not parsed."""
    if b"session_id" not in body and b"\\u" not in body and b"\x00" not in body:
        return header
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return header
    if not isinstance(data, dict):
        return header
    xargs = data.get("vllm_xargs")
    for candidate in (data.get("session_id"), header, xargs.get("session_id") if isinstance(xargs, dict) else None):
        if isinstance(candidate, str) and candidate:
            return candidate
    return None
