"""Scale-out with Ray: a real `vllm-livevlm serve-ray MODEL --replicas 2` (local Ray cluster, two LiveVLM
server replicas behind the router), driven over HTTP and websocket (CPU, tiny model)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

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
    """The CLI with 2 replicas; yields (router URL, Ray address). Replicas get a 1 GiB KV pool each."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve-ray") / "serve-ray.log"
    log = open(log_path, "w+")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm_livevlm.cli", "serve-ray", tiny_model_dir, "--replicas", "2",
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "16384",
         "--livevlm-config", json.dumps(CONFIG), "--api-key", API_KEY],
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
    yield url, address
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

    def engine(self) -> dict:
        return requests.get(f"{self.url}/v1/video/engine", headers=AUTH).json()


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
    url, _ = deployment
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


def test_a_killed_replica_loses_only_its_streams(deployment, placed):
    import websockets

    url, address = deployment
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

    for stream_id in survivor["stream_ids"]:  # unchanged memory: the same answer as before
        assert client.answer(stream_id) == answers[ids.index(stream_id)][-1]

    fresh = [client.create() for _ in range(2)]
    replicas = client.engine()["replicas"]
    assert not replicas[0]["alive"] and replicas[1]["alive"]
    assert set(fresh) <= set(replicas[1]["stream_ids"])
    assert _run_stream(client, fresh[0], 0) == answers[0]  # a new stream is served, and answers alike
    assert requests.get(f"{url}/v1/models", headers=AUTH).status_code == 200  # stream-free: the survivor
