"""Scale-out with Ray: a real `vllm-livevlm serve-ray MODEL --replicas 2` (local Ray cluster, two LiveVLM
server replicas behind the router), driven over HTTP and websocket (CPU, tiny model)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

pytestmark = pytest.mark.slow

CONFIG = {"clip_frames": 4, "long_term_budget_tokens": 1024, "page_tokens": 16}
QUESTION = "what is happening in the video?"
API_KEY = "ray-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}  # vLLM's --api-key, checked by each replica
STREAMS = 6
ROUNDS = 3  # per stream: push a clip, then (from the second round on) ask
MAX_UPLOAD = 8 * 1024 * 1024  # the replicas' `max_upload_bytes`, which the router takes as its own
MiB = 1024 * 1024


# Joins the cluster as a second driver and kills a named actor: argv = Ray address, actor name.
_KILL_ACTOR = """
import sys
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == sys.argv[2])
ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deployment(tiny_model_dir, tmp_path_factory):
    """The CLI with 2 replicas; yields (router URL, Ray address, the router's pid). Replicas get a 1 GiB KV
    pool each. The API key is given the way vLLM users give it, on the command line of `serve-ray`."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve-ray") / "serve-ray.log"
    log = open(log_path, "w+")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm_livevlm.cli", "serve-ray", tiny_model_dir, "--replicas", "2",
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "16384",
         "--livevlm-config", json.dumps(CONFIG), "--livevlm-limits", json.dumps({"max_upload_bytes": MAX_UPLOAD}),
         "--api-key", API_KEY],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # two engines starting on a busy 2-core machine
    while time.time() < deadline:
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"serve-ray exited:\n{log.read()[-4000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(1)
    else:
        process.kill()
        pytest.fail("serve-ray did not start in 600 s")
    address = re.search(r"Ray cluster at (\S+):", log_path.read_text()).group(1)
    yield url, address, process.pid  # the router runs in the CLI's process
    process.send_signal(signal.SIGINT)  # the CLI stops its replicas and its Ray cluster
    try:
        process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()


class Client:
    """Plain HTTP against the router or one replica, carrying the API key and each stream's owner token (if
    the server issues them) the way a user would."""

    def __init__(self, url: str, tokens: dict[str, dict[str, str]] | None = None):
        self.url = url
        self.tokens = {} if tokens is None else tokens

    def create(self) -> str:
        response = requests.post(f"{self.url}/v1/video/streams", json={"config": {}}, headers=AUTH)
        assert response.status_code == 200, response.text
        body = response.json()
        self.tokens[body["id"]] = {**AUTH, **({"X-Stream-Token": body["token"]} if body.get("token") else {})}
        return body["id"]

    def push(self, stream_id: str, jpegs: list[bytes]) -> requests.Response:
        return requests.post(f"{self.url}/v1/video/streams/{stream_id}/frames?wait=true",
                             headers=self.tokens.get(stream_id, {}),
                             files=[("frames", (f"{i}.jpg", j, "image/jpeg")) for i, j in enumerate(jpegs)])

    def ask(self, stream_id: str, max_tokens: int = 8) -> requests.Response:
        return requests.post(f"{self.url}/v1/chat/completions",
                             headers={"X-Session-ID": stream_id, **self.tokens.get(stream_id, {})},
                             json={"model": "m", "messages": [{"role": "user", "content": QUESTION}],
                                   "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True})

    def answer(self, stream_id: str) -> tuple[str, int]:
        response = self.ask(stream_id)
        assert response.status_code == 200, response.text
        body = response.json()
        return body["choices"][0]["message"]["content"], body["livevlm"]["frames_covered"]

    def model(self) -> str:
        return requests.get(f"{self.url}/v1/models", headers=AUTH).json()["data"][0]["id"]

    def engine(self) -> dict:
        """The engine view, presenting the owner token of every stream this client created."""
        tokens = ",".join(t["X-Stream-Token"] for t in self.tokens.values() if "X-Stream-Token" in t)
        return requests.get(f"{self.url}/v1/video/engine", headers={**AUTH, "X-Stream-Token": tokens}).json()


def _clip(stream: int, round_: int) -> list[bytes]:
    frames = np.random.default_rng(1000 * stream + round_).integers(0, 256, (CONFIG["clip_frames"], 48, 48, 3),
                                                                    dtype=np.uint8)
    return [cv2.imencode(".jpg", f)[1].tobytes() for f in frames]


def _run_stream(client: Client, stream_id: str, stream: int) -> list[tuple[str, int]]:
    """One stream's life: a clip per round, a question after every round but the first."""
    answers = []
    for round_ in range(ROUNDS):
        response = client.push(stream_id, _clip(stream, round_))
        assert response.status_code == 200, response.text
        if round_:
            answers.append(client.answer(stream_id))
    return answers


@pytest.fixture(scope="module")
def placed(deployment):
    """6 streams created through the router and run concurrently (all streams interleaved, both replicas
    busy at once); their answers, and the router's placement."""
    url, _, _ = deployment
    client = Client(url)
    ids = [client.create() for _ in range(STREAMS)]
    start = time.perf_counter()
    with ThreadPoolExecutor(STREAMS) as pool:
        answers = list(pool.map(lambda i: _run_stream(client, ids[i], i), range(STREAMS)))
    print(f"\n{STREAMS} streams x {ROUNDS} clips + {ROUNDS - 1} questions through the router: "
          f"{time.perf_counter() - start:.1f} s")
    return client, ids, answers


def test_streams_spread_evenly_and_answer_like_a_single_server(placed):
    client, ids, answers = placed
    replicas = client.engine()["replicas"]
    assert [len(r["stream_ids"]) for r in replicas] == [3, 3]
    assert sorted(s for r in replicas for s in r["stream_ids"]) == sorted(ids)
    assert [r["streams"] for r in replicas] == [3, 3]  # the replicas' own count agrees
    for answer in answers:
        assert [covered for _, covered in answer] == [CONFIG["clip_frames"] * (r + 1) for r in range(1, ROUNDS)]

    # The same streams, one after another, on one LiveVLM server directly (no router): same answers.
    single = Client(replicas[0]["url"])
    for stream in range(STREAMS):
        stream_id = single.create()
        assert _run_stream(single, stream_id, stream) == answers[stream], f"stream {stream}"
        assert requests.delete(f"{single.url}/v1/video/streams/{stream_id}", headers=single.tokens[stream_id]).ok


def test_api_key_and_owner_tokens_work_through_the_router(placed):
    client, ids, _ = placed
    assert requests.post(f"{client.url}/v1/video/streams", json={}).status_code == 401
    chat = {"model": "m", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2}
    no_key = requests.post(f"{client.url}/v1/chat/completions", json=chat, headers={"X-Session-ID": ids[0]})
    assert no_key.status_code == 401, no_key.text
    if "X-Stream-Token" in client.tokens[ids[0]]:  # owner tokens (issued at creation) are checked too
        other = requests.post(f"{client.url}/v1/chat/completions", json=chat,
                              headers={"X-Session-ID": ids[0], **client.tokens[ids[1]]})
        assert other.status_code == 403, other.text


def test_sse_and_websocket_through_the_router(placed):
    import websockets

    client, ids, answers = placed
    stream_id = ids[1]
    response = requests.post(f"{client.url}/v1/chat/completions", stream=True,
                             headers={"X-Session-ID": stream_id, **client.tokens[stream_id]},
                             json={"model": "m", "messages": [{"role": "user", "content": QUESTION}],
                                   "max_tokens": 8, "temperature": 0.0, "ignore_eos": True, "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in response.iter_lines(decode_unicode=True)
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == answers[1][-1][0]

    fresh = client.create()  # frames sent over the socket change a stream: not one whose answers we keep
    assert client.push(fresh, _clip(99, 0)).status_code == 200

    async def socket_question():
        url = client.url.replace("http", "ws", 1) + f"/v1/video/streams/{fresh}/ws"
        async with websockets.connect(url, additional_headers=client.tokens[fresh]) as ws:
            await ws.send(_clip(99, 1)[0])
            assert json.loads(await ws.recv())["type"] == "frames.accepted"
            await ws.send(json.dumps({"type": "question", "question": QUESTION, "max_tokens": 4}))
            deltas = []
            while (message := json.loads(await ws.recv()))["type"] == "answer.delta":
                deltas.append(message["delta"])
            return deltas, message

    deltas, done = asyncio.run(socket_question())
    assert done["type"] == "answer.done", done
    assert "".join(deltas) == done["text"] and done["frames_covered"] == CONFIG["clip_frames"] + 1


def test_an_exported_stream_is_imported_through_the_router(placed):
    """Export through the router reaches the stream's home; import is placed like a creation: the copy gets
    a new id the router routes, and answers as the original."""
    client, ids, _ = placed
    exported = requests.get(f"{client.url}/v1/video/streams/{ids[0]}/export", headers=client.tokens[ids[0]])
    assert exported.status_code == 200 and exported.content, exported.text
    imported = requests.post(f"{client.url}/v1/video/streams/import", data=exported.content,
                             headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert imported.status_code == 200, imported.text
    copy = imported.json()["id"]
    assert copy != ids[0]
    client.tokens[copy] = {**AUTH, "X-Stream-Token": imported.json()["token"]}
    try:
        assert client.answer(copy) == client.answer(ids[0])
    finally:
        assert requests.delete(f"{client.url}/v1/video/streams/{copy}", headers=client.tokens.pop(copy)).ok


def _rss(pid: int) -> int:
    """Resident bytes of one process."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


class _PeakRSS(threading.Thread):
    """Samples a process's RSS every 20 ms; `growth` is the peak over the first sample."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.base, self.peak, self.done = pid, _rss(pid), 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, _rss(self.pid))

    @property
    def growth(self) -> int:
        return max(self.peak, _rss(self.pid)) - self.base


def _chunked_upload(url: str, path: str, headers: dict[str, str], total: int, first: bytes = b"",
                    wait_before_body: float = 0.0, give_up: Callable[[], bool] = lambda: False
                    ) -> tuple[int | None, int]:
    """POST a chunked body of `total` bytes (`first`, then zeros, 1 MiB chunks made on the fly: never held
    whole) over a raw socket, like a client that reads the answer while it sends. Stops sending at the first
    byte of a response or a closed connection; returns (the response's status, body bytes sent), or
    (None, bytes sent) as soon as `give_up()`."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Transfer-Encoding: chunked",
            *(f"{k}: {v}" for k, v in headers.items())]
    sent = 0
    zeros = bytes(MiB)
    try:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        select.select([sock], [], [], wait_before_body)
        while sent < total and not select.select([sock], [], [], 0)[0]:
            if give_up():
                sock.close()
                return None, sent
            chunk = first if sent == 0 and first else zeros[:min(MiB, total - sent)]
            sock.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        if sent >= total:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        status_line = sock.makefile("rb").readline()
    except (ConnectionResetError, socket.timeout):
        status_line = b""
    finally:
        sock.close()
    return (int(status_line.split()[1]) if status_line.startswith(b"HTTP/1.1 ") else None), sent


def test_an_unauthenticated_gigabyte_is_refused_before_it_is_read(deployment):
    url, _, router_pid = deployment
    rss = _PeakRSS(router_pid)
    rss.start()
    start = time.perf_counter()
    for path in ("/v1/video/streams", "/v1/chat/completions", "/v1/video/streams/anything/frames"):
        status, sent = _chunked_upload(url, path, {"Content-Type": "application/json"}, 1024 * MiB,
                                       wait_before_body=2.0, give_up=lambda: rss.growth > 300 * MiB)
        assert (status, sent) == (401, 0), path
    rss.done.set()
    print(f"\n3 unauthenticated 1 GiB chunked uploads: 401 in {time.perf_counter() - start:.1f} s, router RSS "
          f"+{rss.growth / MiB:.1f} MiB")
    assert rss.growth < 100 * MiB
    assert requests.get(f"{url}/health").status_code == 200


def test_uploads_are_counted_as_they_arrive(deployment, placed):
    url, _, router_pid = deployment
    client, _, _ = placed
    stream_id = client.create()
    rss = _PeakRSS(router_pid)
    rss.start()
    part = (b'--B\r\nContent-Disposition: form-data; name="frames"; filename="0.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n")
    frames = _chunked_upload(url, f"/v1/video/streams/{stream_id}/frames",
                             {**client.tokens[stream_id], "Content-Type": "multipart/form-data; boundary=B"},
                             8 * MAX_UPLOAD, first=part)
    chat = _chunked_upload(url, "/v1/chat/completions", {**AUTH, "Content-Type": "application/json"},
                           8 * MAX_UPLOAD, first=b'{"model": "m", "messages": "')
    rss.done.set()
    for status, sent in (frames, chat):  # refused once over, not at the end (socket buffers hold some MiB)
        assert status == 413 and MAX_UPLOAD <= sent < 4 * MAX_UPLOAD, (status, sent)
    declared = requests.post(f"{url}/v1/chat/completions", data=b"x" * (MAX_UPLOAD + 1), headers=AUTH)
    assert declared.status_code == 413 and str(MAX_UPLOAD) in declared.json()["error"]["message"]
    print(f"\nchunked uploads past {MAX_UPLOAD // MiB} MiB: 413 after {frames[1] / MiB:.0f} / {chat[1] / MiB:.0f} "
          f"MiB, router RSS +{rss.growth / MiB:.1f} MiB")
    assert rss.growth < 100 * MiB
    assert client.push(stream_id, _clip(7, 0)).status_code == 200  # the stream is unharmed
    assert requests.delete(f"{url}/v1/video/streams/{stream_id}", headers=client.tokens[stream_id]).ok


def _raw_get(url: str, path: str, headers: dict[str, str]) -> int:
    """A GET with the path sent exactly as given (`requests` would remove dot segments first)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_only_plain_paths_of_our_routes_and_the_openai_routes_are_forwarded(placed):
    client, ids, _ = placed
    stream_id = ids[0]
    paths = ["/v1/models/../../metrics", "/v1/models/%2e%2e/%2e%2e/metrics", "/v1/models/%2E%2E%2F%2E%2E%2Fmetrics",
             "/v1/models/..%5c..%5cmetrics", f"/v1/video/streams/{stream_id}/../../../metrics",
             f"/v1/video/streams/{stream_id}/./frames", "//metrics", "/v1//models", "/v1/models/",
             f"/v1/video/streams/{stream_id}%2fframes", "/metrics", "/invocations", "/version", "/tokenize",
             "/docs", "/openapi.json", "/v1/embeddings", "/v1/video"]
    for headers in ({}, {**AUTH, **client.tokens[stream_id]}):
        statuses = {path: _raw_get(client.url, path, headers) for path in paths}
        assert statuses == dict.fromkeys(paths, 404)
    assert _raw_get(client.url, "/v1/models", AUTH) == 200
    assert _raw_get(client.url, "/v1/models", {}) == 401
    assert _raw_get(client.url, f"/v1/video/streams/{stream_id}", client.tokens[stream_id]) == 200
    assert _raw_get(client.url, "/health", {}) == 200


def test_the_engine_view_needs_the_key_and_lists_only_owned_streams(placed):
    client, ids, _ = placed
    anonymous = requests.get(f"{client.url}/v1/video/engine")
    assert anonymous.status_code == 401
    assert "http://" not in anonymous.text and not any(s in anonymous.text for s in ids)

    def listed(tokens: str | None) -> list[str]:
        view = requests.get(f"{client.url}/v1/video/engine",
                            headers={**AUTH, **({"X-Stream-Token": tokens} if tokens is not None else {})}).json()
        assert [r["url"].startswith("http://") for r in view["replicas"]] == [True, True]  # for the key holder
        assert view["streams"] >= len(ids)
        return sorted(s for r in view["replicas"] for s in r["stream_ids"])

    assert listed(None) == []
    assert listed("not-a-token") == []
    mine = [ids[0], ids[3]]
    assert listed(",".join(client.tokens[s]["X-Stream-Token"] for s in mine)) == sorted(mine)


def test_no_api_key_on_any_replica_command_line(deployment):
    from vllm_livevlm.serving.ray.router import RouterLimits
    from vllm_livevlm.serving.service import ServerLimits

    url, _, router_pid = deployment
    leaks = {}
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # not a process, or gone
            continue
        if proc.name.isdigit() and int(proc.name) != router_pid and API_KEY.encode() in cmdline:
            leaks[proc.name] = cmdline.replace(b"\0", b" ").decode(errors="replace")[:300]
    assert leaks == {}
    # The replicas still require the key (they read it from their environment).
    view = requests.get(f"{url}/v1/video/engine", headers=AUTH).json()
    for replica in view["replicas"]:
        assert requests.get(f"{replica['url']}/v1/models").status_code == 401
        assert requests.get(f"{replica['url']}/v1/models", headers=AUTH).status_code == 200
    assert RouterLimits().max_upload_bytes == ServerLimits().max_upload_bytes  # one default for both


def test_client_transfer_fields_are_refused_at_the_router(placed):
    client, ids, _ = placed
    forged = {"model": "m", "prompt": "x", "max_tokens": 1,
              "kv_transfer_params": {"livevlm": {"kind": "question", "stream_id": ids[0]}}}
    assert requests.post(f"{client.url}/v1/completions", json=forged).status_code == 401
    for path, body in (("/v1/completions", forged),
                       ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                 "vllm_xargs": {"kv_transfer_params": {"livevlm": {}}}})):
        refused = requests.post(f"{client.url}{path}", json=body, headers={"X-Session-ID": ids[0], **AUTH,
                                                                           **client.tokens[ids[0]]})
        assert refused.status_code == 400 and "kv_transfer_params" in refused.text, refused.text


def test_browser_websocket_credentials_through_the_router(placed):
    """A browser sends the API key and the owner token as subprotocols; a refusal is the HTTP status."""
    import websockets

    client, ids, _ = placed
    stream_id = client.create()
    url = client.url.replace("http", "ws", 1) + f"/v1/video/streams/{stream_id}/ws"
    token = client.tokens[stream_id]["X-Stream-Token"]

    async def connect(subprotocols: list[str]):
        try:
            async with websockets.connect(url, subprotocols=subprotocols) as ws:
                await ws.send(_clip(5, 0)[0])
                return ws.subprotocol, json.loads(await ws.recv())["type"]
        except websockets.InvalidStatus as e:
            return e.response.status_code, None

    try:
        assert asyncio.run(connect(["livevlm", f"livevlm.key.{API_KEY}", f"livevlm.token.{token}"])) == \
            ("livevlm", "frames.accepted")
        assert asyncio.run(connect(["livevlm", f"livevlm.token.{token}"])) == (401, None)  # no key: the router
        assert asyncio.run(connect(["livevlm", f"livevlm.key.{API_KEY}", "livevlm.token.wrong"])) == (403, None)
    finally:
        assert requests.delete(f"{client.url}/v1/video/streams/{stream_id}", headers=client.tokens[stream_id]).ok


def test_streamed_answers_do_not_block_stream_creation(placed):
    client, _, _ = placed
    answers = 150
    model = client.model()
    started = threading.Semaphore(0)
    stop = threading.Event()

    def long_answer(i: int) -> int:
        """A stock streamed completion that runs until `stop`; how many events it received."""
        events = 0
        with requests.post(f"{client.url}/v1/completions", stream=True, headers=AUTH, timeout=300,
                           json={"model": model, "prompt": f"{QUESTION} {i}", "max_tokens": 4000,
                                 "temperature": 0.0, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200, r.text
            for line in r.iter_lines():
                if line.startswith(b"data: "):
                    events += 1
                    if events == 1:
                        started.release()
                    if stop.is_set():
                        break
        return events

    with ThreadPoolExecutor(answers) as pool:
        futures = [pool.submit(long_answer, i) for i in range(answers)]
        try:
            deadline = time.monotonic() + 180
            running = sum(started.acquire(timeout=max(0.0, deadline - time.monotonic())) for _ in range(answers))
            assert running == answers, f"only {running} of {answers} streamed answers started"
            begin = time.perf_counter()
            stream_id = client.create()
            created_in = time.perf_counter() - begin
        finally:
            stop.set()
        events = [f.result() for f in futures]
    print(f"\n{answers} streamed answers running: stream created in {created_in:.2f} s "
          f"(events per answer: min {min(events)}, max {max(events)})")
    assert created_in < 10
    assert min(events) > 1  # still streaming when the stream was created
    assert requests.delete(f"{client.url}/v1/video/streams/{stream_id}", headers=client.tokens[stream_id]).ok


def test_a_killed_replica_loses_only_its_streams(deployment, placed):
    import websockets

    url, address, _ = deployment
    client, ids, answers = placed
    replicas = client.engine()["replicas"]
    dead, survivor = replicas[0], replicas[1]
    # An operator's `ray.kill` from another driver (Ray-started clusters use token auth: ~/.ray/auth_token).
    kill = subprocess.run(
        [sys.executable, "-c", _KILL_ACTOR, address, f"livevlm-replica-{dead['replica']}"],
        env=dict(os.environ, RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=120)
    assert kill.returncode == 0, kill.stderr[-3000:]
    deadline = time.time() + 60  # the replica's server dies with its actor
    while time.time() < deadline:
        try:
            requests.get(f"{dead['url']}/health", timeout=2)
            time.sleep(0.5)
        except requests.ConnectionError:
            break
    else:
        pytest.fail(f"the killed replica's server at {dead['url']} still answers")

    for stream_id in dead["stream_ids"]:
        for response in (client.ask(stream_id), client.push(stream_id, _clip(0, 0)),
                         requests.get(f"{url}/v1/video/streams/{stream_id}", headers=client.tokens[stream_id])):
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert stream_id in error["message"] and "lost" in error["message"] and error["code"] == 503

    async def socket_error(stream_id):
        async with websockets.connect(url.replace("http", "ws", 1) + f"/v1/video/streams/{stream_id}/ws",
                                      additional_headers=client.tokens[stream_id]) as ws:
            return json.loads(await ws.recv())

    message = asyncio.run(socket_error(dead["stream_ids"][0]))
    assert message["type"] == "error" and message["error"]["code"] == 503
    assert dead["stream_ids"][0] in message["error"]["message"]

    for stream_id in set(survivor["stream_ids"]) & set(ids):  # unchanged memory: the same answer as before
        assert client.answer(stream_id) == answers[ids.index(stream_id)][-1]

    fresh = [client.create() for _ in range(2)]
    replicas = client.engine()["replicas"]
    assert not replicas[0]["alive"] and replicas[1]["alive"]
    assert set(fresh) <= set(replicas[1]["stream_ids"])
    assert _run_stream(client, fresh[0], 0) == answers[0]  # a new stream is served, and answers alike
    assert requests.get(f"{url}/v1/models", headers=AUTH).status_code == 200  # stream-free: the survivor
