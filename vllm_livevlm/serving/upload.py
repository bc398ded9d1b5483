"""Request bodies read with their bytes counted as they arrive: a declared Content-Length over the limit is
refused before anything is read, and a chunked body (no Content-Length) stops at the first chunk that passes
the limit. Multipart forms are parsed from the counted stream (files past 1 MiB spool to disk)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from vllm_livevlm.serving.errors import APIError


async def counted_chunks(request: Request, limit: int, name: str = "max_upload_bytes") -> AsyncIterator[bytes]:
    """The body's chunks; 413 (naming the limit `name`) as soon as more than `limit` bytes were declared or
    have arrived."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, f"invalid Content-Length {declared!r}")
        if int(declared) > limit:
            raise APIError(413, f"the upload declares {declared} bytes, over {name} ({limit} bytes)")
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise APIError(413, f"the upload is over {name} ({limit} bytes)")
            yield chunk
    except ClientDisconnect:
        raise APIError(400, "the client disconnected before the upload was complete") from None


async def read_body(request: Request, limit: int, name: str = "max_upload_bytes") -> bytes:
    return b"".join([chunk async for chunk in counted_chunks(request, limit, name)])


async def read_form(request: Request, limit: int, max_files: int, name: str = "max_upload_bytes") -> FormData:
    """A multipart/form-data body of at most `limit` bytes (the limit `name`) and `max_files` files."""
    parser = MultiPartParser(request.headers, counted_chunks(request, limit, name), max_files=max_files)
    try:
        return await parser.parse()
    except MultiPartException as e:
        status = 413 if "Too many files" in e.message else 400
        raise APIError(status, f"invalid multipart body: {e.message}", "frames") from None
