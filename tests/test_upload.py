"""Upload bytes are counted as they arrive (chunked bodies included): the read stops with 413 at the first
chunk past the limit, and multipart forms are parsed from the counted stream. Real Starlette requests fed
by an ASGI receive channel; no server."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from vllm_livevlm.serving import upload
from vllm_livevlm.serving.errors import APIError

MiB = 2**20


def request(chunks: list[bytes], headers: dict[str, str] | None = None) -> tuple[Request, list[int]]:
    """A request whose body arrives as `chunks` (no Content-Length unless given: a chunked body); the list
    counts the chunks the server side has read."""
    read: list[int] = []

    async def receive() -> dict:
        index = len(read)
        read.append(index)
        if index < len(chunks):
            return {"type": "http.request", "body": chunks[index], "more_body": index + 1 < len(chunks)}
        return {"type": "http.disconnect"}

    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw, "query_string": b""}, receive), read


def test_body_under_the_limit():
    req, _ = request([b"a" * MiB, b"b" * MiB])
    assert asyncio.run(upload.read_body(req, 2 * MiB)) == b"a" * MiB + b"b" * MiB


def test_chunked_body_stops_at_the_first_chunk_past_the_limit():
    req, read = request([bytes(MiB)] * 100)
    with pytest.raises(APIError) as info:
        asyncio.run(upload.read_body(req, int(2.5 * MiB)))
    assert info.value.status == 413
    assert info.value.message == f"the upload is over max_upload_bytes ({int(2.5 * MiB)} bytes)"
    assert len(read) == 3  # 3 MiB read, 97 chunks never pulled


def test_declared_length_over_the_limit_refused_before_reading():
    req, read = request([bytes(MiB)], {"content-length": str(10 * MiB)})
    with pytest.raises(APIError) as info:
        asyncio.run(upload.read_body(req, MiB))
    assert info.value.status == 413 and read == []
    assert info.value.message == f"the upload declares {10 * MiB} bytes, over max_upload_bytes ({MiB} bytes)"


@pytest.mark.parametrize("value", ["abc", "-5", "1e9"])
def test_invalid_content_length(value):
    req, _ = request([b""], {"content-length": value})
    with pytest.raises(APIError) as info:
        asyncio.run(upload.read_body(req, MiB))
    assert info.value.status == 400


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, dict[str, str]]:
    boundary = "xyzBOUNDARYxyz"
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        body += (b"Content-Type: image/png\r\n" if filename else b"") + b"\r\n" + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def test_form_parsed_from_the_counted_stream():
    body, headers = multipart([("frames", "a.png", b"A" * 1000), ("frames", "b.png", b"B" * 10),
                               ("timestamps", None, b"[1, 2]")])
    req, _ = request([body[i:i + 100] for i in range(0, len(body), 100)], headers)

    async def parse() -> list:
        form = await upload.read_form(req, len(body), max_files=2)
        return [(k, await v.read() if hasattr(v, "read") else v) for k, v in form.multi_items()]

    assert asyncio.run(parse()) == [("frames", b"A" * 1000), ("frames", b"B" * 10), ("timestamps", "[1, 2]")]


def test_chunked_form_past_the_limit_refused_while_parsing():
    body, headers = multipart([("frames", f"{i}.png", bytes(MiB)) for i in range(10)])
    chunks = [body[i:i + 64 * 1024] for i in range(0, len(body), 64 * 1024)]
    req, read = request(chunks, headers)
    with pytest.raises(APIError) as info:
        asyncio.run(upload.read_form(req, 4 * MiB, max_files=100))
    assert info.value.status == 413
    assert len(read) == 4 * 16 + 1  # stopped at the first chunk past 4 MiB, not after 10 MiB


def test_too_many_files_or_a_malformed_form():
    body, headers = multipart([("frames", f"{i}.png", b"x") for i in range(5)])
    req, _ = request([body], headers)
    with pytest.raises(APIError) as info:
        asyncio.run(upload.read_form(req, MiB, max_files=4))
    assert info.value.status == 413 and "4" in info.value.message
    req, _ = request([b"garbage without boundary"], {"content-type": "multipart/form-data; boundary=zz"})
    with pytest.raises(APIError) as info:
        asyncio.run(upload.read_form(req, MiB, max_files=4))
    assert info.value.status == 400
