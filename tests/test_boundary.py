"""The trust boundary middleware on its own (fast): which bodies it refuses, and that everything else reaches
the app byte for byte. The end-to-end checks against a real server are in test_security.py."""

from __future__ import annotations

import json

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from vllm_livevlm.serving.boundary import TrustBoundary, reserved_key_in

LIMIT = 4096


@pytest.fixture(scope="module")
def client() -> TestClient:
    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"bytes": len(body), "body": body.decode("utf-8", "replace")})

    app = Starlette(routes=[Route("/{path:path}", echo, methods=["POST", "GET"])])
    app.add_middleware(TrustBoundary, max_body_bytes=LIMIT)
    return TestClient(app)


FORGED = {"livevlm": {"kind": "nope"}}


@pytest.mark.parametrize("body, key", [
    (json.dumps({"prompt": "x", "kv_transfer_params": FORGED}), "kv_transfer_params"),
    (json.dumps({"prompt": "x", "vllm_xargs": {"kv_transfer_params": "x"}}), "kv_transfer_params"),
    (json.dumps({"vllm_xargs": {"ec_transfer_params": "x"}}), "ec_transfer_params"),
    (json.dumps({"vllm_xargs": {"kv_cache_report_mode": "x"}}), "kv_cache_report_mode"),
    (json.dumps({"a": [{"b": [{"kv_transfer_params": None}]}]}), "kv_transfer_params"),
    ('{"kv\\u005ftransfer_params": 1}', "kv_transfer_params"),
    ('{"kv_transfer_params": 1, "kv_transfer_params": null}', "kv_transfer_params"),
])
def test_reserved_keys_found(body, key):
    assert reserved_key_in(body.encode()) == key
    assert reserved_key_in(body.encode("utf-16")) == key
    assert reserved_key_in(body.encode("utf-32")) == key


@pytest.mark.parametrize("body", [
    json.dumps({"prompt": "what are kv_transfer_params?", "vllm_xargs": {"session_id": "s"}}),
    json.dumps({"prompt": "caf\u00e9"}, ensure_ascii=True),  # a \\u escape, no reserved key
    "kv_transfer_params: not json",
    "[" * 100000,  # nesting deeper than the parser goes: no JSON handler reads it either
])
def test_other_bodies_pass(body):
    assert reserved_key_in(body.encode()) is None


def test_middleware_refuses_with_openai_error(client):
    r = client.post("/invocations", json={"prompt": "x", "kv_transfer_params": FORGED})
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "`kv_transfer_params` is set by the server only; clients may not "
                                             "send it", "type": "BadRequestError", "param": "kv_transfer_params",
                                  "code": 400}}


def test_middleware_passes_bodies_unchanged(client):
    body = json.dumps({"prompt": "kv_transfer_params as text", "n": 1})
    r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json() == {"bytes": len(body), "body": body}
    assert client.get("/health").json() == {"bytes": 0, "body": ""}


def test_frame_uploads_exempt(client):
    body = json.dumps({"kv_transfer_params": FORGED, "pad": "x" * (2 * LIMIT)})
    r = client.post("/v1/video/streams/abc/frames", content=body)
    assert r.status_code == 200 and r.json()["bytes"] == len(body)


def test_body_cap_declared_and_chunked(client):
    r = client.post("/v1/completions", content=b"x" * (LIMIT + 1))
    assert r.status_code == 413
    assert r.json()["error"]["message"] == f"request body of {LIMIT + 1} bytes exceeds the limit of {LIMIT}"

    def chunks():
        for _ in range(3):
            yield b"y" * (LIMIT // 2)

    r = client.post("/v1/completions", content=chunks())  # no Content-Length: counted as it arrives
    assert r.status_code == 413
    assert r.json()["error"]["message"] == f"request body exceeds the limit of {LIMIT} bytes"
