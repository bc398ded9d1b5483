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

from vllm_livevlm.serving.access import ADMIN_PATHS, APIKeyGate
from vllm_livevlm.serving.boundary import MAX_JSON_DEPTH, TrustBoundary, json_depth, refusal_of

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
    for encoding in ("utf-8", "utf-16", "utf-32"):
        assert refusal_of(body.encode(encoding)).param == key


@pytest.mark.parametrize("body", [
    json.dumps({"prompt": "what are kv_transfer_params?", "vllm_xargs": {"session_id": "s"}}),
    json.dumps({"prompt": "caf\u00e9"}, ensure_ascii=True),  # a \\u escape, no reserved key
    "kv_transfer_params: not json",
    json.dumps({"prompt": "an image_url, a video and audio", "messages": [{"role": "user", "content": "file"}]}),
    # as deep as allowed, brackets inside strings not counted
    "[" * MAX_JSON_DEPTH + json.dumps("[{" * 500 + '\\"[') + "]" * MAX_JSON_DEPTH,
])
def test_other_bodies_pass(body):
    assert refusal_of(body.encode()) is None


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


VIDEO_HINT = "is not accepted on this route: send images and video to a stream (POST /v1/video/streams, then " \
             ".../frames); questions are text"


@pytest.mark.parametrize("path, body, part", [
    ("/invocations", {"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}]}, "video_url"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]}, "image_url"),  # untyped: vLLM reads it too
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
     "input_image"),
    ("/v1/messages", {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image"),
    ("/v1/systemone", {"state": "s", "videos": ["http://127.0.0.1:9/x.mp4"]}, "videos"),
    ("/inference/v1/generate", {"token_ids": [1], "content_parts": [{"type": "x", "url": "u"}]}, "content_parts"),
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "input_audio"),
])
def test_media_parts_refused_on_stock_routes(client, path, body, part):
    r = client.post(path, json=body)
    assert r.status_code == 400
    assert r.json()["error"] == {"message": f"media content (`{part}`) {VIDEO_HINT}", "type": "BadRequestError",
                                 "param": part, "code": 400}


def test_reserved_key_named_before_media_and_our_routes_carry_no_media_check(client):
    body = {"kv_transfer_params": {}, "messages": [{"content": [{"type": "video_url", "video_url": {}}]}]}
    assert client.post("/invocations", json=body).json()["error"]["param"] == "kv_transfer_params"
    # a stream's config is ours: nothing in it reaches vLLM's media decoding
    assert client.post("/v1/video/streams", json={"config": {"images": 1}}).status_code == 200


def test_too_deep_json_refused(client):
    message = f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels (max_json_depth)"
    deep = MAX_JSON_DEPTH + 1
    for body in ("[" * deep + "]" * deep, '{"a":' * deep + "1" + "}" * deep, '{"p": "x", "q": ' + "[" * deep):
        for encoding in ("utf-8", "utf-16", "utf-32"):
            r = client.post("/invocations", content=body.encode(encoding)[:LIMIT])
            assert r.status_code == 400, (body[:20], encoding, r.text)
            assert r.json()["error"]["message"] == message
    for body in ("[" * 200000 + "]" * 200000, '{"a":' * 200000 + "1" + "}" * 200000):
        assert refusal_of(body.encode()).message == message
    assert json_depth(b'{"a": ["[[[", {"b": "\\"]]"}]}') == 3


class Counting:
    """An ASGI app that records how many body messages it read."""

    def __init__(self) -> None:
        self.reads = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            while (await receive()).get("more_body"):
                self.reads += 1
        await JSONResponse({"ok": True})(scope, receive, send)


@pytest.fixture
def gated() -> tuple[TestClient, Counting]:
    app = Counting()
    return TestClient(APIKeyGate(TrustBoundary(app, max_body_bytes=LIMIT), keys=["k"])), app


def test_every_route_but_the_probes_needs_the_key_before_its_body_is_read(gated):
    client, app = gated

    def chunks():
        for _ in range(64):
            yield b"x" * 1024

    for path in ("/invocations", "/tokenize", "/detokenize", "/generative_scoring", "/openapi.json", "/docs",
                 "/v1/video/streams/s/frames", "/x"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k"}):
            r = client.post(path, content=chunks(), headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError", path
    assert app.reads == 0
    for path in ("/health", "/ping", "/metrics", "/version", "/load"):
        assert client.get(path).status_code == 200
    assert client.post("/invocations", json={"prompt": "x"}, headers={"Authorization": "Bearer k"}).json() == \
        {"ok": True}
    assert client.options("/invocations").status_code == 200  # CORS preflights carry no credentials


def test_engine_control_routes_not_served(gated):
    client, _ = gated
    assert {"/scale_elastic_ep", "/is_scaling_elastic_ep", "/inference/v1/abort_requests"} <= ADMIN_PATHS
    for path in sorted(ADMIN_PATHS):
        for suffix in ("", "/"):
            r = client.post(path + suffix, json={"new_data_parallel_size": 2}, headers={"Authorization": "Bearer k"})
            assert r.status_code == 404, path
    open_app = TestClient(APIKeyGate(Counting(), keys=[]))  # no key configured: still not served
    assert open_app.post("/scale_elastic_ep", json={}).status_code == 404
    assert open_app.post("/invocations", json={}).status_code == 200


def test_sampling_values_vllm_cannot_serve_refused():
    """vLLM 0.32 answers 500 for a `top_k` past 64 bits and for `structured_outputs` that is not an object."""
    for body, param in (({"top_k": 2**64}, "top_k"), ({"top_k": -2**63 - 1}, "top_k"),
                        ({"n": 1, "structured_outputs": ["x"]}, "structured_outputs"),
                        ({"structured_outputs": "regex"}, "structured_outputs")):
        refusal = refusal_of(json.dumps(body).encode())
        assert refusal is not None and refusal.param == param, body
    for body in ({"top_k": 2**63 - 1}, {"top_k": -1}, {"structured_outputs": {"regex": "a"}},
                 {"structured_outputs": None}, {"response_format": {"json_schema": {"properties": {"top_k": {}}}}}):
        assert refusal_of(json.dumps(body).encode()) is None, body
