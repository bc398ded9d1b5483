"""The server tried as an attacker would: every request here must be refused with a 4xx, and afterwards the
server, its engine and a stream opened before the attacks must be unchanged (same stats, same greedy answer).

One real `vllm-livevlm serve --api-key` process on loopback (CPU, tiny model). The attack tests sit between
`test_victim_baseline` (first) and `test_victim_unchanged_and_rss_bounded` (last); pytest runs them in
file order.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import requests
from helpers import Server

pytestmark = pytest.mark.slow

API_KEY = "security-test-key"
# Every frame kept: websocket frames arrive in bursts here (sampling by arrival time: tests/test_time.py).
CONFIG = {"clip_frames": 4, "long_term_budget_tokens": 1024, "page_tokens": 16, "sample_fps": None}
QUESTION = "what is happening in the video?"
RSS_GROWTH_LIMIT = 512 * 1024**2
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_WEBSOCKETS = 4
MAX_ANSWER_TOKENS = 16000  # the disconnect test needs an answer long enough to leave in the middle of


def process_tree_rss(pid: int) -> int:
    """Resident bytes of a process and all of its descendants (the API server and its engine core)."""
    def children(p: int) -> list[int]:
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                return [int(c) for c in f.read().split()]
        except OSError:
            return []

    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children(p)
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


class Victim:
    """A stream opened before any attack, with what it answered and reported then."""

    def __init__(self, url: str):
        r = requests.post(f"{url}/v1/video/streams", json={"config": CONFIG}, headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        self.url, self.id = url, r.json()["id"]
        self.headers = {**AUTH, "X-Stream-Token": r.json()["token"]}
        frames = np.random.default_rng(7).integers(0, 256, size=(8, 48, 48, 3), dtype=np.uint8)
        import cv2

        files = [("frames", (f"{i}.png", cv2.imencode(".png", f)[1].tobytes(), "image/png"))
                 for i, f in enumerate(frames)]
        r = requests.post(f"{url}/v1/video/streams/{self.id}/frames?wait=true", headers=self.headers, files=files,
                          timeout=300)
        assert r.status_code == 200 and r.json()["frames_encoded"] == 8, r.text
        self.stats = self.current_stats()
        self.answer = self.ask()

    def current_stats(self) -> dict:
        r = requests.get(f"{self.url}/v1/video/streams/{self.id}", headers=self.headers, timeout=60)
        assert r.status_code == 200, r.text
        stats = r.json()["stats"]
        return {k: stats[k] for k in ("version", "bytes", "frames", "frames_received", "frames_encoded",
                                      "pending_frames")}

    def ask(self) -> str:
        r = requests.post(f"{self.url}/v1/chat/completions", headers=self.headers, timeout=300, json={
            "model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8,
            "temperature": 0.0, "ignore_eos": True, "session_id": self.id})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    process = Server(tiny_model_dir, tmp_path_factory.mktemp("security") / "server.log", CONFIG,
                     {"max_frames_per_request": 32, "max_websockets": MAX_WEBSOCKETS,
                      "max_answer_tokens": MAX_ANSWER_TOKENS}, "--api-key", API_KEY,
                     "--served-model-name", "tiny")
    process.wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def victim(server) -> Victim:
    return Victim(server.url)


@pytest.fixture(scope="module")
def rss_before(server, victim) -> int:
    return process_tree_rss(server.process.pid)


def assert_alive(server) -> None:
    """The server answers and its engine is up (a dead engine core makes /health fail)."""
    assert server.process.poll() is None, server.log_text()[-4000:]
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200


def test_victim_baseline(server, victim, rss_before):
    assert victim.stats["frames"] == 8 and victim.answer
    assert_alive(server)


# ==== attack tests go here, above the final check (pytest runs them in file order) ========================
# ---- the attacker review: media on stock routes, routes outside --api-key, bodies, JSON depth, admin routes,
# websocket question values -----------------------------------------------------------------------------------
MEDIA_HINT = "is not accepted on this route: send images and video to a stream (POST /v1/video/streams, then " \
             ".../frames); questions are text"
MAX_REQUEST_BODY_BYTES = 8 * 1024**2  # the server's default max_request_body_bytes


def media_refused(response, part: str) -> None:
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {"message": f"media content (`{part}`) {MEDIA_HINT}",
                                        "type": "BadRequestError", "param": part, "code": 400}


def video_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}]


def test_8k_video_in_a_stock_chat_refused_before_vllm_decodes_it(server):
    """Finding: /invocations with a 16 KB data-URL 8K mp4 answered 200 after 18 s, RSS +6.4 GiB (vLLM decoded
    it itself, outside our upload checks). Now: 401 without the key, 400 with it, in well under a second."""
    import base64
    import time

    with open(EIGHT_K_VIDEO, "rb") as f:
        url = "data:video/mp4;base64," + base64.b64encode(f.read()).decode()
    before = process_tree_rss(server.process.pid)
    for path in ("/invocations", "/v1/chat/completions", "/v1/chat/completions/render", "/tokenize"):
        body = {"model": "tiny", "messages": video_message(url), "max_tokens": 1}
        start = time.perf_counter()
        r = requests.post(f"{server.url}{path}", json=body, timeout=120)
        assert r.status_code == 401, (path, r.text)
        media_refused(requests.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=120), "video_url")
        assert time.perf_counter() - start < 2.0, path
    assert process_tree_rss(server.process.pid) - before < 100 * 2**20
    assert_alive(server)


def test_media_urls_never_fetched(server):
    """Finding (SSRF): a `video_url` naming a loopback URL made the server fetch it; `/v1/systemone` takes
    `videos` too. Every media form on every stock route is refused, and the URL is never requested."""
    import http.server
    import threading
    import time

    fetched: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            fetched.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    target = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=target.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{target.server_address[1]}"
    try:
        requests.get(f"{base}/probe", timeout=10)  # the recorder records
        assert fetched == ["/probe"]
        user = lambda part: [{"role": "user", "content": [part]}]  # noqa: E731
        attempts = [
            ("/invocations", {"messages": video_message(f"{base}/x.mp4"), "max_tokens": 1}, "video_url"),
            ("/v1/chat/completions", {"model": "tiny", "messages": user({"type": "image_url", "image_url": {
                "url": f"{base}/x.png"}}), "max_tokens": 1}, "image_url"),
            ("/v1/chat/completions", {"model": "tiny", "messages": user({"audio_url": {"url": f"{base}/x.wav"}}),
                                      "max_tokens": 1}, "audio_url"),
            ("/v1/responses", {"model": "tiny", "input": [{"role": "user", "content": [
                {"type": "input_image", "image_url": f"{base}/x.png"}]}], "max_output_tokens": 1}, "input_image"),
            ("/v1/messages", {"model": "tiny", "max_tokens": 1, "messages": user({"type": "image", "source": {
                "type": "url", "url": f"{base}/x.png"}})}, "image"),
            ("/v1/systemone", {"model": "tiny", "state": "s", "videos": [f"{base}/x.mp4"],
                               "questions": {"q": {"type": "yes_no"}}}, "videos"),
            ("/v1/systemone", {"model": "tiny", "state": "s", "images": [f"{base}/x.png"],
                               "questions": {"q": {"type": "yes_no"}}}, "images"),
            ("/inference/v1/generate", {"model": "tiny", "token_ids": [1, 2], "sampling_params": {"max_tokens": 1},
                                        "content_parts": [{"type": "video_url", "url": f"{base}/x.mp4"}]},
             "video_url"),  # the innermost part is named first
        ]
        for path, body, part in attempts:
            media_refused(requests.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=60), part)
        time.sleep(1.0)  # a fetch would have arrived by now
        assert fetched == ["/probe"]
    finally:
        target.shutdown()
    assert_alive(server)


def test_every_route_needs_the_key_but_the_probes(server):
    """Finding: /invocations, /tokenize, /detokenize, /generative_scoring (everything outside /v1, /v2,
    /inference, /cohere) answered without the key."""
    unauthorized = {"message": "a valid API key is required: send `Authorization: Bearer <key>`",
                    "type": "AuthenticationError", "param": None, "code": 401}
    posts = {"/invocations": {"prompt": "x", "max_tokens": 1}, "/tokenize": {"model": "tiny", "prompt": "x"},
             "/detokenize": {"model": "tiny", "tokens": [1, 2]},
             "/generative_scoring": {"model": "tiny", "query": "a", "items": ["b"], "label_token_ids": [1, 2]}}
    for path, body in posts.items():
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = requests.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)
            assert r.status_code == 401 and r.json()["error"] == unauthorized, (path, r.text)
    for path in ("/openapi.json", "/docs", "/redoc", "/server_info", "/x"):
        assert requests.get(f"{server.url}{path}", timeout=60).status_code in (401, 404), path
    assert requests.get(f"{server.url}/openapi.json", timeout=60).status_code == 401
    for path in ("/health", "/ping", "/metrics", "/version"):
        assert requests.get(f"{server.url}{path}", timeout=60).status_code == 200, path
    r = requests.post(f"{server.url}/tokenize", json=posts["/tokenize"], headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["count"] >= 1, r.text
    assert_alive(server)


def head_only(server, path: str, length: int, headers: dict[str, str] | None = None, body: bytes = b"") -> int:
    """Send a request head declaring `length` body bytes and only `body` of them; the response's status."""
    import socket

    head = "".join(f"{k}: {v}\r\n" for k, v in {**(headers or {}), "Content-Type": "application/json",
                                                "Content-Length": length}.items())
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as client:
        client.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode() + body)
        return int(client.recv(4096).split(b" ", 2)[1])


def test_bodies_refused_before_they_are_read(server):
    """Finding: on paths outside --api-key the boundary buffered up to 64 MiB per request before any check
    (8 connections x 59 MiB: +455 MiB). Now an unauthenticated request is answered 401 from its head alone,
    and an authenticated JSON body is capped at `max_request_body_bytes`."""
    import concurrent.futures

    before = process_tree_rss(server.process.pid)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        firsts = list(pool.map(lambda _: head_only(server, "/invocations", 59 * 2**20, body=b'{"prompt": "'),
                               range(8)))
    assert firsts == [401] * 8
    assert head_only(server, "/invocations", MAX_REQUEST_BODY_BYTES + 1, AUTH) == 413

    def chunked():
        yield b'{"prompt": "'
        for _ in range(MAX_REQUEST_BODY_BYTES // 2**20 + 1):
            yield b"x" * 2**20

    r = requests.post(f"{server.url}/invocations", data=chunked(), headers={**AUTH, "Content-Type": "application/json"},
                      timeout=60)
    refused(r, 413, f"request body exceeds the limit of {MAX_REQUEST_BODY_BYTES} bytes")
    assert process_tree_rss(server.process.pid) - before < 100 * 2**20
    assert_alive(server)


def test_deep_json_refused_not_500(server):
    """Finding: `'[' * 200000 + ']' * 200000` on /invocations answered 500 (RecursionError inside vLLM)."""
    message = "the JSON body nests deeper than 128 levels (max_json_depth)"
    for body in ("[" * 200000 + "]" * 200000, '{"prompt": "x", "max_tokens": 1, "x": ' + "[" * 129 + "]" * 129 + "}",
                 '{"a":' * 5000 + "1" + "}" * 5000):
        for headers in (AUTH, {}):
            r = requests.post(f"{server.url}/invocations", data=body.encode(), timeout=60,
                              headers={**headers, "Content-Type": "application/json"})
            if headers:
                refused(r, 400, message)
            else:
                assert r.status_code == 401, r.text
    # as deep as allowed: an ordinary request (vLLM ignores the unknown field)
    r = requests.post(f"{server.url}/invocations", headers={**AUTH, "Content-Type": "application/json"}, timeout=120, data=(
        '{"prompt": "x", "max_tokens": 1, "x": ' + "[" * 127 + "]" * 127 + "}").encode())
    assert r.status_code == 200, r.text
    assert_alive(server)


def test_engine_control_routes_not_served(server):
    """Finding: /scale_elastic_ep answered without the key, and `{"new_data_parallel_size": 2}` gave 500."""
    for path in ("/scale_elastic_ep", "/is_scaling_elastic_ep", "/inference/v1/abort_requests", "/scale_elastic_ep/"):
        for headers in ({}, AUTH):
            r = requests.post(f"{server.url}{path}", json={"new_data_parallel_size": 2, "request_ids": ["x"]},
                              headers=headers, timeout=60)
            # vLLM's own key check, outside ours, answers first under /inference
            expected = 401 if not headers and path.startswith("/inference") else 404
            assert r.status_code == expected, (path, headers, r.text)
    assert_alive(server)


def test_question_values_checked_on_the_socket_and_the_chat_route(server):
    """Finding: websocket questions with `max_tokens` 1e400, -1 or nested JSON answered error 500, 1e8 was
    accepted, `question: ["a"]` too. Each is a 400 naming the field now; the socket stays usable."""
    import asyncio

    import websockets

    stream_id, owner = open_stream(server)
    budget = f"max_tokens must be an integer from 1 to {MAX_ANSWER_TOKENS} (max_answer_tokens)"
    question = '{"type": "question", "question": "q", %s}'
    bad = [(question % '"max_tokens": 1e400', "max_tokens", budget), (question % '"max_tokens": -1', "max_tokens", budget),
           (question % '"max_tokens": 0', "max_tokens", budget), (question % '"max_tokens": 1e8', "max_tokens", budget),
           (question % f'"max_tokens": {10**8}', "max_tokens", budget),
           (question % '"max_tokens": "5"', "max_tokens", budget), (question % '"max_tokens": true', "max_tokens", budget),
           (question % '"temperature": NaN', "temperature", "temperature must be a finite number >= 0"),
           (question % '"temperature": 1e400', "temperature", "temperature must be a finite number >= 0"),
           (question % '"temperature": "hot"', "temperature", "temperature must be a finite number >= 0"),
           (question % '"ignore_eos": "yes"', "ignore_eos", "ignore_eos must be true or false"),
           ('{"type": "question", "question": ["a"]}', "question", "question must be a string"),
           ('{"type": "question", "question": {"a": 1}}', "question", "question must be a string"),
           ("[" * 100000 + "]" * 100000, "type", "text messages must be JSON objects"),
           ('{"type": "question", "question": ' + "[" * 100000, "type", "text messages must be JSON objects"),
           ("not json", "type", "text messages must be JSON objects")]

    async def session() -> tuple[list[dict], dict]:
        async with websockets.connect(socket_url(server, stream_id), additional_headers=owner,
                                      max_size=2**24) as ws:
            errors = []
            for text, _, _ in bad:
                await ws.send(text)
                errors.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"type": "question", "question": QUESTION, "max_tokens": 3, "ignore_eos": True}))
            while (reply := json.loads(await ws.recv()))["type"] != "answer.done":
                assert reply["type"] == "answer.delta", reply
            return errors, reply

    errors, done = asyncio.run(session())
    assert [(e["type"], e["error"]["code"], e["error"]["param"], e["error"]["message"]) for e in errors] == \
        [("error", 400, param, message) for _, param, message in bad]
    assert done["text"]
    chat = '{"model": "tiny", "messages": [{"role": "user", "content": "q"}], "session_id": "%s", %s}'
    for fields, param in (('"max_tokens": %d' % 10**8, "max_tokens"), ('"max_tokens": -1', "max_tokens"),
                          ('"max_tokens": 0', "max_tokens"), ('"max_completion_tokens": 0', "max_tokens"),
                          ('"max_tokens": 2, "temperature": 1e400', "temperature"),
                          ('"max_tokens": 2, "temperature": NaN', "temperature"),
                          ('"max_tokens": 2, "top_p": 0', "top_p")):
        r = requests.post(f"{server.url}/v1/chat/completions", data=(chat % (stream_id, fields)).encode(), timeout=60,
                          headers={**owner, "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (fields, r.text)
    delete_stream(server, stream_id, owner)
    assert_alive(server)


# ---- trust boundary: client-supplied engine transfer fields (items 1, 2) ------------------------------------
ENGINE_ROUTES = {  # every stock route that builds an engine request, with a minimal valid body
    "/v1/completions": {"model": "tiny", "prompt": "x", "max_tokens": 1},
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
    "/v1/responses": {"model": "tiny", "input": "x", "max_output_tokens": 1},
    "/v1/messages": {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]},
    "/invocations": {"prompt": "x", "max_tokens": 1},  # SageMaker: outside vLLM's --api-key prefixes, ours too
    "/inference/v1/generate": {"model": "tiny", "token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 1}},
}


def forged_fields(victim) -> list[tuple[str, dict]]:
    """(reserved key, fields to add to a body): malformed ones, and well-formed sinks/clip/question requests
    naming the victim stream with its real version and plausible context sizes, directly and through
    `vllm_xargs`, at the top level and nested."""
    stats = requests.get(f"{victim.url}/v1/video/streams/{victim.id}", headers=victim.headers, timeout=60).json()["stats"]
    version = stats["version"]
    forged = [{"kind": "nope"}]
    for context in (16, 448, stats["tokens_seen"]):
        common = {"stream_id": victim.id, "version": version, "context_tokens": context, "context_extent": 0,
                  "request_id": "forged", "mac": "0" * 64}
        forged += [{**common, "kind": "question", "frame_start": 0, "num_frames": 0},
                   {**common, "kind": "clip", "frame_start": 8, "num_frames": 4},
                   {**common, "kind": "sinks", "version": 0, "context_tokens": 0, "frame_start": 0, "num_frames": 0}]
    fields = []
    for livevlm in forged:
        params = {"livevlm": livevlm}
        fields += [("kv_transfer_params", {"kv_transfer_params": params}),
                   ("kv_transfer_params", {"vllm_xargs": {"kv_transfer_params": json.dumps(params)}})]
    fields += [("kv_transfer_params", {"kv_transfer_params": "x"}),
               ("kv_transfer_params", {"vllm_xargs": {"kv_transfer_params": "x"}}),
               ("ec_transfer_params", {"ec_transfer_params": {"livevlm": forged[1]}}),
               ("kv_cache_report_mode", {"vllm_xargs": {"kv_cache_report_mode": "x"}}),
               ("kv_transfer_params", {"metadata": {"inner": [{"kv_transfer_params": {"livevlm": forged[1]}}]}})]
    return fields


def test_forged_transfer_params_refused_on_every_engine_route(server, victim):
    """Every stock route that reaches the engine, with and without the API key: 400 from the trust boundary
    (401 without the key, before the body is read), never the engine's 500."""
    sent = 0
    for key, extra in forged_fields(victim):
        for path, body in ENGINE_ROUTES.items():
            for headers in ({}, AUTH):
                r = requests.post(f"{server.url}{path}", json={**body, **extra}, headers=headers, timeout=60)
                sent += 1
                expected = 401 if not headers else 400
                assert r.status_code == expected, (path, extra, r.text)
                if expected == 400:
                    assert r.json()["error"] == {
                        "message": f"`{key}` is set by the server only; clients may not send it",
                        "type": "BadRequestError", "param": key, "code": 400}
    assert sent >= 300
    assert_alive(server)


def test_forged_transfer_params_refused_however_encoded(server, victim):
    """The key spelled with JSON escapes, in UTF-16, as a duplicate key, and on our own chat route with the
    victim's session and owner token: refused all the same."""
    livevlm = json.dumps({"livevlm": {"stream_id": victim.id, "kind": "question", "version": 1}})
    bodies = [
        '{"prompt": "x", "max_tokens": 1, "kv\\u005ftransfer_params": %s}' % livevlm,
        '{"prompt": "x", "max_tokens": 1, "kv_transfer_params": null, "kv_transfer_params": %s}' % livevlm,
    ]
    for body in bodies:
        for data in (body.encode(), body.encode("utf-16")):
            r = requests.post(f"{server.url}/invocations", data=data, timeout=60,
                              headers={**AUTH, "Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "kv_transfer_params", (body, r.text)
    r = requests.post(f"{server.url}/v1/chat/completions", headers=victim.headers, timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1,
        "session_id": victim.id, "kv_transfer_params": json.loads(livevlm)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "kv_transfer_params", r.text
    # A prompt that merely mentions the field is an ordinary request.
    r = requests.post(f"{server.url}/invocations", timeout=120, headers=AUTH, json={
        "prompt": "what are kv_transfer_params?", "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert_alive(server)


# ---- uploads: sizes checked before decoding, bytes counted as they arrive (items 4, 5) ------------------------
EIGHT_K_VIDEO = os.path.join(os.path.dirname(__file__), "data", "black-8k-40f.mp4")  # 40 black 7680x4320 frames
MAX_UPLOAD_BYTES = 64 * 1024**2  # the server's default max_upload_bytes


def claimed_png() -> bytes:
    """3 MiB on the wire whose header claims 30000x30000 RGB pixels (2.5 GiB once decoded)."""
    return png_claiming(30000, 30000) + bytes(3 * 1024**2)


def refused(response, status: int, message: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"] == message


def frames_received(server, stream_id: str, headers: dict[str, str]) -> int:
    r = requests.get(f"{server.url}/v1/video/streams/{stream_id}", headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["stats"]["frames_received"]


def test_png_claiming_30000_pixels_refused_before_decoding(server):
    import base64
    import time

    stream_id, owner = open_stream(server)
    url = f"{server.url}/v1/video/streams/{stream_id}/frames"
    bomb = claimed_png()
    too_large = "is 30000x30000 pixels: over max_frame_side (4096 pixels on a side)"
    attempts = [({"files": [("frames", ("bomb.png", bomb, "image/png"))]}, "file 'bomb.png'", 2.0),
                ({"json": {"frames": [base64.b64encode(bomb).decode()]}}, "frames[0]", 2.0),
                # twenty of them in one multipart (60 MiB): every header is read before any image is decoded
                ({"files": [("frames", (f"{i}.png", bomb, "image/png")) for i in range(20)]}, "file '0.png'", 5.0)]
    for body, name, seconds in attempts:
        start = time.perf_counter()
        refused(requests.post(url, headers=owner, timeout=120, **body), 413, f"{name} {too_large}")
        assert time.perf_counter() - start < seconds
    assert frames_received(server, stream_id, owner) == 0
    delete_stream(server, stream_id, owner)


def test_8k_video_of_a_few_kb_refused_before_decoding(server):
    import time

    stream_id, owner = open_stream(server)
    url = f"{server.url}/v1/video/streams/{stream_id}/frames"
    with open(EIGHT_K_VIDEO, "rb") as f:
        video = f.read()
    assert len(video) < 64 * 1024
    too_large = "is 7680x4320 pixels: over max_frame_side (4096 pixels on a side)"
    attempts = [({"data": video, "headers": {**owner, "Content-Type": "video/mp4"}}, "the request body"),
                ({"files": [("frames", ("8k.mp4", video, "video/mp4"))], "headers": owner}, "file '8k.mp4'")]
    for body, name in attempts:
        start = time.perf_counter()
        refused(requests.post(url, timeout=120, **body), 413, f"{name} {too_large}")
        assert time.perf_counter() - start < 3.0  # decoding its 40 frames takes ~1 min (~1.3 s a frame here)
    # FFmpeg also opens playlists and concat scripts naming other files: only mp4/mov/webm/mkv containers
    playlist = b"#EXTM3U\n#EXT-X-VERSION:3\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
    refused(requests.post(url, data=playlist, headers={**owner, "Content-Type": "video/mp4"}, timeout=60), 415,
            "the request body is not an mp4/mov or webm/mkv file (only those containers are accepted)")
    assert frames_received(server, stream_id, owner) == 0
    delete_stream(server, stream_id, owner)


def test_chunked_body_past_max_upload_bytes(server):
    """No Content-Length (Transfer-Encoding: chunked): the read stops at the first chunk past the limit."""
    stream_id, owner = open_stream(server)
    url = f"{server.url}/v1/video/streams/{stream_id}/frames"
    message = f"the upload is over max_upload_bytes ({MAX_UPLOAD_BYTES} bytes)"
    mp4_head = b"\x00\x00\x00\x18ftypmp42"

    def chunked(first: bytes, total: int):
        yield first
        for _ in range(total // 2**20):
            yield bytes(2**20)

    for content_type, first in (("video/mp4", mp4_head), ("multipart/form-data; boundary=b",
                                                           b'--b\r\nContent-Disposition: form-data; name="frames"; '
                                                           b'filename="a.mp4"\r\n\r\n' + mp4_head)):
        r = requests.post(url, data=chunked(first, 2 * MAX_UPLOAD_BYTES),
                          headers={**owner, "Content-Type": content_type}, timeout=120)
        assert r.request.headers.get("Transfer-Encoding") == "chunked" and "Content-Length" not in r.request.headers
        refused(r, 413, message)
    assert frames_received(server, stream_id, owner) == 0
    delete_stream(server, stream_id, owner)


def test_only_jpeg_and_png_images(server):
    import base64

    import cv2

    stream_id, owner = open_stream(server)
    url = f"{server.url}/v1/video/streams/{stream_id}/frames"
    frame = np.zeros((16, 16, 3), np.uint8)
    images = {"x.bmp": cv2.imencode(".bmp", frame)[1].tobytes(), "x.tiff": cv2.imencode(".tiff", frame)[1].tobytes(),
              "x.webp": cv2.imencode(".webp", frame)[1].tobytes(), "x.gif": b"GIF89a\x10\x00\x10\x00" + bytes(64)}
    for filename, data in images.items():
        refused(requests.post(url, headers=owner, files=[("frames", (filename, data, "image/png"))], timeout=60), 415,
                f"file '{filename}' is not a JPEG or PNG image (only those two are accepted)")
        refused(requests.post(url, headers=owner, json={"frames": [base64.b64encode(data).decode()]}, timeout=60),
                415, "frames[0] is not a JPEG or PNG image (only those two are accepted)")
    assert frames_received(server, stream_id, owner) == 0
    delete_stream(server, stream_id, owner)


# ---- websockets (item 8) and errors in answers (item 10) ---------------------------------------------------
def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims `width` x `height` pixels (its pixel data is a few bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
            + chunk(b"IEND", b""))


def small_png(seed: int) -> bytes:
    import cv2

    frame = np.random.default_rng(seed).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    return cv2.imencode(".png", frame)[1].tobytes()


def open_stream(server) -> tuple[str, dict[str, str]]:
    """A stream of its own (never the victim) and the headers with the API key and its owner token."""
    r = requests.post(f"{server.url}/v1/video/streams", json={"config": CONFIG}, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["id"], {**AUTH, "X-Stream-Token": r.json()["token"]}


def delete_stream(server, stream_id: str, headers: dict[str, str]) -> None:
    r = requests.delete(f"{server.url}/v1/video/streams/{stream_id}", headers=headers, timeout=60)
    assert r.status_code == 200, r.text


def socket_url(server, stream_id: str) -> str:
    return f"{server.url.replace('http', 'ws', 1)}/v1/video/streams/{stream_id}/ws"


def browser_protocols(headers: dict[str, str], key: str = API_KEY) -> list[str]:
    """What a browser passes as `new WebSocket(url, protocols)`: it cannot set headers."""
    return ["livevlm", f"livevlm.key.{key}", f"livevlm.token.{headers['X-Stream-Token']}"]


def handshake_status(url: str, **connect) -> int:
    """The HTTP status a refused handshake answers; fails if the server accepts the socket."""
    import asyncio

    import websockets

    async def attempt() -> int:
        try:
            async with websockets.connect(url, open_timeout=60, **connect):
                pass
        except websockets.exceptions.InvalidStatus as e:
            return e.response.status_code
        pytest.fail(f"the websocket handshake to {url} was accepted")

    return asyncio.run(attempt())


def requests_running(server) -> float:
    """vLLM's `vllm:num_requests_running` gauge (requests in the engine's running batch)."""
    import re

    text = requests.get(f"{server.url}/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M))


def test_websocket_refused_at_handshake_without_credentials(server):
    stream_id, owner = open_stream(server)
    url = socket_url(server, stream_id)
    token_only = {"X-Stream-Token": owner["X-Stream-Token"]}
    assert handshake_status(url, additional_headers=token_only) == 401
    assert handshake_status(url, subprotocols=browser_protocols(owner, key="wrong-key")) == 401
    assert handshake_status(url, additional_headers=AUTH) == 403
    assert handshake_status(url, additional_headers={**AUTH, "X-Stream-Token": "wrong"}) == 403
    assert handshake_status(f"{url}?token=wrong", additional_headers=AUTH) == 403
    assert handshake_status(socket_url(server, "0" * 32), additional_headers=owner) == 404
    delete_stream(server, stream_id, owner)


def test_websocket_browser_auth_and_claimed_huge_png(server):
    import asyncio

    import websockets

    stream_id, owner = open_stream(server)

    async def session() -> list[dict]:
        async with websockets.connect(socket_url(server, stream_id), subprotocols=browser_protocols(owner)) as ws:
            assert ws.subprotocol == "livevlm"
            replies = []
            for message in (small_png(1), claimed_png(), small_png(2)):
                await ws.send(message)
                replies.append(json.loads(await ws.recv()))
            return replies

    first, huge, last = asyncio.run(session())
    assert (first["type"], first["pending_frames"], first["frames_dropped"]) == ("frames.accepted", 1, 0)
    assert huge["type"] == "error" and huge["error"]["code"] == 413, huge
    assert (last["type"], last["pending_frames"]) == ("frames.accepted", 2)
    delete_stream(server, stream_id, owner)


def test_websocket_limit(server):
    import asyncio
    import contextlib

    import websockets

    stream_id, owner = open_stream(server)
    url = socket_url(server, stream_id)

    async def fill_then_reuse() -> tuple[int, bool]:
        async with contextlib.AsyncExitStack() as sockets:
            for _ in range(MAX_WEBSOCKETS):
                await sockets.enter_async_context(websockets.connect(url, additional_headers=owner))
            try:
                async with websockets.connect(url, additional_headers=owner):
                    refused = 0
            except websockets.exceptions.InvalidStatus as e:
                refused = e.response.status_code
        for _ in range(50):  # the server frees a slot once it has seen the close
            try:
                async with websockets.connect(url, additional_headers=owner):
                    return refused, True
            except websockets.exceptions.InvalidStatus:
                await asyncio.sleep(0.1)
        return refused, False

    assert asyncio.run(fill_then_reuse()) == (429, True)
    delete_stream(server, stream_id, owner)


def test_tokens_and_keys_redacted_from_the_log(server):
    import asyncio

    import websockets

    stream_id, owner = open_stream(server)
    token = owner["X-Stream-Token"]
    r = requests.get(f"{server.url}/v1/video/streams/{stream_id}?token={token}", headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text

    async def query_token_socket() -> None:
        async with websockets.connect(f"{socket_url(server, stream_id)}?token={token}", additional_headers=AUTH):
            pass

    asyncio.run(query_token_socket())
    delete_stream(server, stream_id, owner)
    log = server.log_text()
    assert f"/v1/video/streams/{stream_id}?token=***" in log
    assert token not in log and API_KEY not in log


def test_frames_flow_while_an_answer_streams(server):
    import asyncio

    import websockets

    stream_id, owner = open_stream(server)
    question = {"type": "question", "question": QUESTION, "max_tokens": 300, "ignore_eos": True}

    async def session() -> list[dict]:
        async with websockets.connect(socket_url(server, stream_id), additional_headers=owner) as ws:
            for seed in range(4):
                await ws.send(small_png(seed))
                assert json.loads(await ws.recv())["type"] == "frames.accepted"
            await ws.send(json.dumps(question))
            await ws.send(small_png(4))
            await ws.send(json.dumps(question))  # one answer at a time per socket: refused, not queued
            messages = []
            while not messages or messages[-1]["type"] != "answer.done":
                messages.append(json.loads(await ws.recv()))
            return messages

    messages = asyncio.run(session())
    kinds = [m["type"] for m in messages]
    assert kinds.index("frames.accepted") < kinds.index("answer.done") and kinds.count("frames.accepted") == 1
    assert [m["error"]["code"] for m in messages if m["type"] == "error"] == [429]
    done = messages[-1]
    assert "".join(m["delta"] for m in messages if m["type"] == "answer.delta") == done["text"]
    delete_stream(server, stream_id, owner)


def test_streamed_answer_of_a_deleted_stream_ends_with_an_error_event(server):
    stream_id, owner = open_stream(server)
    events = []
    with requests.post(f"{server.url}/v1/chat/completions", headers=owner, stream=True, timeout=300, json={
            "model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4000,
            "ignore_eos": True, "stream": True, "session_id": stream_id}) as r:
        assert r.status_code == 200, r.text
        for line in filter(None, r.iter_lines()):
            events.append(line.decode())
            if len(events) == 3:  # the role chunk and two content deltas: the answer is decoding
                delete_stream(server, stream_id, owner)
    # Ended by the delete, before its 4,000 tokens (deltas already in flight while the delete ran still arrive
    # first: how many depends on the machine's speed; on a loaded 2-core machine 1,553 did).
    assert events[-1] == "data: [DONE]" and len(events) < 4000, events[-3:]
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert (error["code"], error["type"], error["param"]) == (404, "NotFoundError", "session_id")
    assert error["message"] == f"stream {stream_id} is closed"


def test_non_streamed_answer_cancelled_when_its_client_disconnects(server):
    import socket
    import time

    stream_id, owner = open_stream(server)
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 15000,
                       "ignore_eos": True, "session_id": stream_id}).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in {**owner, "Content-Type": "application/json",
                                                "Content-Length": len(body)}.items())
    client = socket.create_connection(("127.0.0.1", server.port))
    client.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode() + body)
    deadline = time.time() + 120
    while requests_running(server) < 1:
        assert time.time() < deadline, "the question never ran"
        time.sleep(0.2)
    client.close()
    start = time.time()
    while requests_running(server) > 0:
        assert time.time() - start < 10, "the engine still decodes the answer of a client that left"
        time.sleep(0.2)
    delete_stream(server, stream_id, owner)


# ---- fuzz: every route, with the fields and headers vLLM maps into the engine request (item 2) -------------
FUZZ_CASES = 2000


def sse_errors(text: str) -> list[dict]:
    """The `error` objects of a server-sent event stream (an error after the response started)."""
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    return [e["error"] for e in events if isinstance(e, dict) and isinstance(e.get("error"), dict)]


def test_fuzz_every_route_with_engine_fields(server, victim):
    """Valid bodies of every POST route (and our stream routes' other methods) mixed with reserved,
    engine-mapped and junk fields, engine-mapped headers, other encodings, with and without the API key: a
    JSON body holding a reserved key anywhere is refused by the boundary (400, or the key check's 401 first),
    nothing answers a 5xx (streamed error events included), and the engine, a stock
    completion and the victim (stats and greedy answer) are as before."""
    import urllib.parse

    from engine_fuzz import (ENGINE_ROUTES, FRAMES_ROUTE, NOT_FUZZED, NOT_IMPLEMENTED, OTHER_ROUTES, RESERVED_KEYS,
                             ROUTE_BODIES, a_few, bounded, engine_fields, forged_fields, junk, keys_in, one_in)
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    paths = requests.get(f"{server.url}/openapi.json", headers=AUTH, timeout=30).json()["paths"]
    assert {p for p, item in paths.items() if "post" in item} <= set(ROUTE_BODIES) | set(NOT_FUZZED)
    encodings = {"json": lambda b: json.dumps(b).encode(), "utf-16": lambda b: json.dumps(b).encode("utf-16"),
                 "escaped": lambda b: json.dumps(b).replace("_", "\\u005f").encode(),
                 "form": lambda b: urllib.parse.urlencode({k: json.dumps(v) for k, v in b.items()}).encode()}
    headers = a_few({
        "X-Request-Id": st.sampled_from([f"lv-sinks-{victim.id}", f"lv-question-{victim.id}-0", "x" * 1000]),
        "X-Session-ID": st.sampled_from([victim.id, "nope"]),
        "X-data-parallel-rank": st.sampled_from(["0", "1", "-1", "x", "9" * 30]),
        "Content-Type": st.sampled_from(["text/plain", "multipart/form-data; boundary=x",
                                         "application/x-www-form-urlencoded", "application/json; charset=utf-16"]),
        "Content-Encoding": st.just("gzip"), "X-Stream-Token": st.sampled_from(["wrong", ""])}, most=2)
    ids = {"{stream_id}": st.sampled_from([victim.id, "nope", "..", "a" * 300]),
           "{response_id}": st.sampled_from(["resp_nope", "..", "%00"])}
    statuses: list[int] = []

    routes = [f"POST {route}" for route in sorted(ROUTE_BODIES) + 2 * list(ENGINE_ROUTES)] + list(OTHER_ROUTES)

    @settings(max_examples=FUZZ_CASES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data(), route=st.sampled_from(routes),
           fields=st.tuples(engine_fields(victim.id), one_in(3, forged_fields(victim.id))),
           whole=one_in(10, junk), raw=one_in(20, st.binary(max_size=64)),
           encoding=st.sampled_from(["json"] * 5 + sorted(encodings)), extra=headers,
           keyed=st.sampled_from([True, True, True, False]), wait=st.booleans())
    def fuzz(data, route, fields, whole, encoding, raw, extra, keyed, wait):
        method, route = route.split(" ")
        path = route
        for placeholder, values in ids.items():
            path = path.replace(placeholder, data.draw(values)) if placeholder in path else path
        body = bounded({**ROUTE_BODIES.get(route, {}), **fields[0], **(fields[1] or {})}) if whole is None else whole
        sent = raw if raw is not None else (encodings["json"] if encoding == "form" and not isinstance(body, dict)
                                            else encodings[encoding])(body)
        r = requests.request(method, f"{server.url}{path}{'?wait=true' if wait else ''}", data=sent, timeout=60,
                             headers={"Content-Type": "application/json", **(AUTH if keyed else {}), **extra})
        statuses.append(r.status_code)
        case = (path, encoding, extra, sent[:2000], r.status_code, r.text[:2000])
        if r.status_code == 501 and route in NOT_IMPLEMENTED:
            assert r.json()["error"]["message"] == NOT_IMPLEMENTED[route], case
        else:
            assert r.status_code < 500 and all(e.get("code", 0) < 500 for e in sse_errors(r.text)), case
        reserved = keys_in(body, RESERVED_KEYS) if raw is None and encoding != "form" else set()
        if reserved and route != FRAMES_ROUTE:
            if not keyed:
                assert r.status_code == 401, case
            else:
                assert r.status_code == 400 and r.json()["error"]["param"] in reserved, case
        if (method, route) == ("POST", "/v1/video/streams") and r.status_code == 200:
            delete_stream(server, r.json()["id"], {**AUTH, "X-Stream-Token": r.json()["token"]})

    fuzz()
    print(f"\nfuzz: {len(statuses)} requests, statuses {sorted(set(statuses))}")
    assert len(statuses) >= 1000 and 200 in statuses and 400 in statuses
    assert_alive(server)
    r = requests.post(f"{server.url}/v1/completions", headers=AUTH, timeout=60, json={
        "model": "tiny", "prompt": "x", "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    assert victim.current_stats() == victim.stats and victim.ask() == victim.answer


# ==== final check: keep these last ==========================================================================
def test_victim_unchanged_and_rss_bounded(server, victim, rss_before):
    assert_alive(server)
    assert victim.current_stats() == victim.stats
    assert victim.ask() == victim.answer
    growth = process_tree_rss(server.process.pid) - rss_before
    assert growth < RSS_GROWTH_LIMIT, f"server process tree RSS grew by {growth / 2**20:.0f} MiB"
