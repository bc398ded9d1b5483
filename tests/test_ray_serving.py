"""LiveVLM on Ray Serve: a real `vllm-livevlm serve-ray MODEL --replicas 2` (local Ray cluster, Serve's HTTP
proxy, two replicas each running one engine, the stream-affinity router), driven over HTTP and websocket and
compared token for token with one plain `vllm-livevlm serve` (CPU, tiny model)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import requests
import yaml

from helpers import QUESTION, Server, free_port

pytestmark = pytest.mark.slow

CONFIG = {"clip_frames": 4, "long_term_budget_tokens": 1024, "page_tokens": 16}
API_KEY = "serve-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
STREAMS = 6
ROUNDS = 3  # per stream: push a clip, then (from the second round on) ask

# Joins the cluster as a second driver and kills one Serve actor: argv = Ray address, "proxy" or a home tag
# (a replica: its streams are claimed first in the name of no replica, so that none heals them until the
# claim is released with argv = Ray address, "release", the tag).
_KILL = """
import sys
import ray
from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put
from vllm_livevlm.serving.ray.ids import home_tag
ray.init(address=sys.argv[1], log_to_driver=False)
names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
if sys.argv[2] == "release":
    _internal_kv_del(f"claim/{sys.argv[3]}", namespace="livevlm")
    sys.exit()
if sys.argv[2] == "proxy":
    name = next(n for n in names if n.startswith("SERVE_PROXY_ACTOR"))
else:
    name = next(n for n in names if n.startswith("SERVE_REPLICA") and home_tag(n.rsplit("#", 1)[1]) == sys.argv[2])
    _internal_kv_put(f"claim/{sys.argv[2]}", b"held-by-the-test", namespace="livevlm")
ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)
print(name)
"""


# Joins the cluster; with a config path, deploys it again with N replicas (what `serve deploy` of the edited
# file does); returns once N replicas run: argv = Ray address, N, [config path].
_REPLICAS = """
import sys, time
import ray, yaml
from ray import serve
from ray.serve._private.api import serve_start
from ray.serve.schema import ServeDeploySchema
ray.init(address=sys.argv[1], log_to_driver=False)
if len(sys.argv) > 3:
    config = yaml.safe_load(open(sys.argv[3]))
    config["applications"][0]["deployments"][0]["num_replicas"] = int(sys.argv[2])
    serve_start().deploy_apps(ServeDeploySchema.model_validate(config))
deployment = lambda: serve.status().applications["livevlm"].deployments["LiveVLMServer"]
while deployment().replica_states != {"RUNNING": int(sys.argv[2])}:
    time.sleep(0.5)
"""


# An operator's driver joining the cluster (Ray-started clusters use token auth: ~/.ray/auth_token).
_DRIVER_ENV = dict(os.environ, RAY_AUTH_MODE="token")


def _kill(address: str, *which: str) -> str:
    done = subprocess.run([sys.executable, "-c", _KILL, address, *which], capture_output=True, text=True,
                          timeout=120, env=_DRIVER_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


class Client:
    """Plain HTTP with the API key and each stream's owner token, the way a user would."""

    def __init__(self, url: str, auth: dict[str, str]):
        self.url, self.auth, self.tokens = url, auth, {}

    def create(self) -> str:
        response = requests.post(f"{self.url}/v1/video/streams", json={"config": {}}, headers=self.auth)
        assert response.status_code == 200, response.text
        body = response.json()
        self.tokens[body["id"]] = {**self.auth, **({"X-Stream-Token": body["token"]} if body.get("token") else {})}
        return body["id"]

    def push(self, stream_id: str, jpegs: list[bytes]) -> requests.Response:
        return requests.post(f"{self.url}/v1/video/streams/{stream_id}/frames?wait=true",
                             headers=self.tokens.get(stream_id, self.auth),
                             files=[("frames", (f"{i}.jpg", j, "image/jpeg")) for i, j in enumerate(jpegs)])

    def ask(self, stream_id: str, max_tokens: int = 8) -> requests.Response:
        return requests.post(f"{self.url}/v1/chat/completions",
                             headers={"X-Session-ID": stream_id, **self.tokens.get(stream_id, self.auth)},
                             json={"model": "m", "messages": [{"role": "user", "content": QUESTION}],
                                   "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True})

    def answer(self, stream_id: str) -> tuple[str, int]:
        response = self.ask(stream_id)
        assert response.status_code == 200, response.text
        body = response.json()
        return body["choices"][0]["message"]["content"], body["livevlm"]["frames_covered"]


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
def reference(tiny_model_dir, tmp_path_factory):
    """Every stream's answers from one plain `vllm-livevlm serve` (streams one after another), before Serve
    starts (at most two engines at a time on this machine)."""
    server = Server(tiny_model_dir, tmp_path_factory.mktemp("plain") / "serve.log", CONFIG).wait_ready()
    try:
        client = Client(server.url, {})
        return [_run_stream(client, client.create(), stream) for stream in range(STREAMS)]
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(reference, tiny_model_dir, tmp_path_factory):
    """`serve-ray` with 2 replicas (1 GiB KV pool each), the API key on its command line and a state root;
    yields (proxy URL, Ray address, the Serve config file it wrote, the state root)."""
    directory = tmp_path_factory.mktemp("serve-ray")
    port, log_path, config_path = free_port(), directory / "serve-ray.log", directory / "serve.yaml"
    state_root = directory / "state"
    log = open(log_path, "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm_livevlm.cli", "serve-ray", tiny_model_dir, "--replicas", "2", "--host",
         "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "16384", "--livevlm-config",
         json.dumps(CONFIG), "--api-key", API_KEY, "--serve-config", str(config_path),
         # a checkpoint after every clip, never by time: the frames of a clip not yet encoded are lost in a crash
         "--livevlm-state-dir", str(state_root), "--livevlm-checkpoint-every-clips", "1",
         "--livevlm-checkpoint-every-seconds", "3600"],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # two engines starting on a busy 2-core machine
    while "LiveVLM on Ray Serve at" not in log_path.read_text():
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"serve-ray did not start:\n{log_path.read_text()[-4000:]}")
        time.sleep(1)
    address = re.search(r"Ray cluster at (\S+)", log_path.read_text()).group(1)
    yield url, address, config_path, state_root
    process.send_signal(signal.SIGINT)  # the CLI deletes the application and stops its Ray cluster
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def placed(cluster):
    """6 streams created through Serve, then run concurrently (pushes and questions of all streams
    interleaved, both replicas busy at once)."""
    client = Client(cluster[0], AUTH)
    ids = [client.create() for _ in range(STREAMS)]
    with ThreadPoolExecutor(STREAMS) as pool:
        answers = list(pool.map(lambda i: _run_stream(client, ids[i], i), range(STREAMS)))
    return client, ids, answers


def test_streams_are_placed_3_3_and_answer_like_one_plain_server(placed, reference):
    client, ids, answers = placed
    homes = Counter(stream_id[:8] for stream_id in ids)  # an id names its home replica
    assert sorted(homes.values()) == [3, 3], homes
    assert answers == reference  # token for token: each stream's memory is on its home, and only there


def test_the_api_key_and_owner_tokens_are_checked_through_serve(placed):
    client, ids, _ = placed
    assert requests.post(f"{client.url}/v1/video/streams", json={}).status_code == 401
    chat = {"model": "m", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2}
    assert requests.post(f"{client.url}/v1/chat/completions", json=chat,
                         headers={"X-Session-ID": ids[0]}).status_code == 401
    other = requests.post(f"{client.url}/v1/chat/completions", json=chat,
                          headers={"X-Session-ID": ids[0], **client.tokens[ids[1]]})
    assert other.status_code == 403, other.text


def test_sse_and_websocket_through_serve(placed, reference):
    import websockets

    client, ids, _ = placed
    response = requests.post(f"{client.url}/v1/chat/completions", stream=True,
                             headers={"X-Session-ID": ids[1], **client.tokens[ids[1]]},
                             json={"model": "m", "messages": [{"role": "user", "content": QUESTION}],
                                   "max_tokens": 8, "temperature": 0.0, "ignore_eos": True, "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in response.iter_lines(decode_unicode=True)
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == reference[1][-1][0]

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
    assert requests.delete(f"{client.url}/v1/video/streams/{fresh}", headers=client.tokens.pop(fresh)).ok


def _forgeries(real: str) -> dict[str, str]:
    flipped = "0" if real[-1] != "0" else "1"
    return {"random 64 digits": "ab" * 32, "a real id's MAC altered": real[:-1] + flipped,
            "a real tag, a new random part": real[:8] + "0" * 24 + real[40:],
            "a single server's id": "0123456789abcdef" * 2, "not hex": "z" * 64}


def test_forged_and_foreign_ids_are_refused_by_the_proxy(placed):
    import websockets

    client, ids, _ = placed
    headers = client.tokens[ids[0]]
    for what, forged in _forgeries(ids[0]).items():
        answers = [requests.get(f"{client.url}/v1/video/streams/{forged}", headers=headers),
                   client.push(forged, _clip(0, 0)), requests.post(
                       f"{client.url}/v1/chat/completions", headers={**headers, "X-Session-ID": forged},
                       json={"model": "m", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2})]
        for response in answers:
            assert response.status_code == 404, (what, response.text)
            assert response.headers.get("x-livevlm-refused-by") == "proxy", what  # no replica saw it
            assert response.json()["error"]["param"] == "stream_id"

        async def handshake():
            url = client.url.replace("http", "ws", 1) + f"/v1/video/streams/{forged}/ws"
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(url, additional_headers=headers):
                    pass
            return refused.value.response

        refused = asyncio.run(handshake())
        assert refused.status_code == 404 and refused.headers.get("x-livevlm-refused-by") == "proxy", what
    # An authentic id the home no longer holds is that replica's 404 (it knows the id, not the stream).
    gone = client.create()
    assert requests.delete(f"{client.url}/v1/video/streams/{gone}", headers=client.tokens[gone]).ok
    response = requests.get(f"{client.url}/v1/video/streams/{gone}", headers=client.tokens[gone])
    assert response.status_code in (404, 410) and "x-livevlm-refused-by" not in response.headers


def test_a_chat_naming_its_stream_in_the_body_is_routed_to_its_home(placed, reference):
    """The single server's API: `session_id` in the JSON body, without the header or with a header naming a
    stream on the other replica (the body wins, as in vLLM: the proxy sends it to the body's stream's home);
    a forged id in the body is refused by the proxy, and so is a body past the limit (413, before more of
    it is buffered)."""
    client, ids, _ = placed
    url = f"{client.url}/v1/chat/completions"
    chat = {"model": "m", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8,
            "temperature": 0.0, "ignore_eos": True}
    elsewhere = next(stream_id for stream_id in ids if stream_id[:8] != ids[0][:8])
    for header in ({}, {"X-Session-ID": elsewhere}):
        response = requests.post(url, json={**chat, "session_id": ids[0]}, headers={**client.tokens[ids[0]], **header})
        assert response.status_code == 200, (header, response.text)
        body = response.json()
        assert (body["choices"][0]["message"]["content"], body["livevlm"]["frames_covered"]) == reference[0][-1]
    forged = requests.post(url, json={**chat, "session_id": "ab" * 32}, headers=client.tokens[ids[0]])
    assert forged.status_code == 404 and forged.headers.get("x-livevlm-refused-by") == "proxy", forged.text
    limit = 8 * 1024 * 1024  # the replicas' max_request_body_bytes (the default)
    declared = requests.post(url, data=b" " * (limit + 1), headers={**AUTH, "Content-Type": "application/json"})
    chunked = requests.post(url, data=(b" " * 2**20 for _ in range(9)),
                            headers={**AUTH, "Content-Type": "application/json"})
    for response in (declared, chunked):
        assert response.status_code == 413 and response.headers.get("x-livevlm-refused-by") == "proxy"
        assert response.json()["error"]["code"] == 413
    # Without the key the proxy reads no body (it would refuse this forged id in it): the replica refuses the
    # request from its head (401), as it does without Serve.
    anonymous = requests.post(url, json={**chat, "session_id": "ab" * 32})
    assert anonymous.status_code == 401 and "x-livevlm-refused-by" not in anonymous.headers, anonymous.text


def test_a_restarted_proxy_routes_every_stream_home(placed, cluster, reference):
    client, ids, _ = placed
    url, address, _, _ = cluster
    killed = _kill(address, "proxy")
    assert killed.startswith("SERVE_PROXY_ACTOR")
    deadline = time.time() + 120
    while True:  # Serve's controller starts a new proxy on the node
        try:
            if requests.get(f"{url}/-/healthz", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.time() < deadline, "no proxy came back"
        time.sleep(0.5)
    for stream, stream_id in enumerate(ids):  # the same question on the same frames: the same answer
        assert client.answer(stream_id) == reference[stream][-1], stream


def _checkpointed(path) -> None:
    """Wait for a stream's checkpoint file."""
    deadline = time.time() + 60
    while not path.exists():
        assert time.time() < deadline, f"{path} not written"
        time.sleep(0.2)


def test_a_killed_replicas_streams_are_restored_on_the_survivor(placed, cluster, reference):
    """Its streams answer 503 + Retry-After, then answer again from their checkpoint on the other replica
    (equal to an uninterrupted twin: the plain server's stream fed the same checkpointed frames) and report
    the frames they lost; the other replica's streams answer throughout."""
    client, ids, _ = placed
    url, address, _, state_root = cluster
    tag = ids[0][:8]
    victims = [i for i, stream_id in enumerate(ids) if stream_id[:8] == tag]
    others = [i for i in range(STREAMS) if i not in victims]
    for i in victims:  # a clip's frames are not checkpointed before the clip is encoded: these 2 are lost
        _checkpointed(state_root / tag / f"{ids[i]}.livevlm")  # after its last clip: written by now
        response = requests.post(f"{url}/v1/video/streams/{ids[i]}/frames", headers=client.tokens[ids[i]],
                                 files=[("frames", (f"{n}.jpg", j, "image/jpeg")) for n, j in
                                        enumerate(_clip(i, ROUNDS)[:2])])
        assert response.status_code == 200 and response.json()["frames_accepted"] == 2, response.text
    statuses: dict[int, list[int]] = {i: [] for i in victims}
    other_answers: list[tuple[int, tuple[str, int]]] = []
    killed_at = time.time()
    _kill(address, tag)  # claimed by the test: the outage lasts until the claim is released
    held = True
    while time.time() - killed_at < 90 and not all(s and s[-1] == 200 for s in statuses.values()):
        if held and all(s.count(503) >= 2 for s in statuses.values()):
            _kill(address, "release", tag)
            held = False
        for i in others:  # never miss an answer
            other_answers.append((i, client.answer(ids[i])))
        for i in victims:
            if statuses[i] and statuses[i][-1] == 200:
                continue
            response = client.ask(ids[i])
            statuses[i].append(response.status_code)
            if response.status_code == 503:  # the single server's error format, from the proxy
                assert response.headers["retry-after"] == "2" and response.json()["error"]["code"] == 503
                assert response.json()["error"]["param"] == "stream_id"
                assert f"video stream '{ids[i]}' is unavailable" in response.json()["error"]["message"]
            elif response.status_code == 200:
                body = response.json()
                assert (body["choices"][0]["message"]["content"], body["livevlm"]["frames_covered"]) == \
                    reference[i][-1], i
        time.sleep(0.2)
    healed_in = time.time() - killed_at
    print(f"\nreplica {tag} killed: its {len(victims)} streams answered again after {healed_in:.1f} s; "
          f"statuses {statuses}")
    assert all(s[-1] == 200 for s in statuses.values()) and healed_in < 60, statuses
    assert all(set(s[:-1]) == {503} for s in statuses.values()), statuses  # 503 until restored, nothing else
    assert all(answer == reference[i][-1] for i, answer in other_answers)
    for i in victims:
        described = requests.get(f"{url}/v1/video/streams/{ids[i]}", headers=client.tokens[ids[i]]).json()
        assert described["restored"] == {"restored_from_frame": ROUNDS * CONFIG["clip_frames"],
                                         "frames_lost_in_restart": 2}, described


def _asked_throughout(client: Client, stream_ids: list[str], busy) -> list[tuple[str, int, object]]:
    """Ask every stream again and again while `busy()`: (stream id, status, answer or error text)."""
    during = []
    while busy():
        for stream_id in stream_ids:
            response = client.ask(stream_id)
            during.append((stream_id, response.status_code,
                           response.json() if response.status_code == 200 else response.text))
    return during


def _answers_unchanged(during: list[tuple[str, int, object]], expected: dict[str, tuple[str, int]]) -> None:
    assert during and [(s, status, body) for s, status, body in during if status != 200] == []  # no 5xx or 4xx
    for stream_id, _, body in during:
        assert (body["choices"][0]["message"]["content"], body["livevlm"]["frames_covered"]) == expected[stream_id]


def test_rebalance_evens_the_streams_without_a_5xx(placed, cluster, reference):
    """After healing one replica holds all 6 streams and Serve's replacement none: the rebalance admin call
    (the API key required) moves 3 to the new one while every stream answers throughout, token for token."""
    client, ids, _ = placed
    url, address, _, _ = cluster
    started = subprocess.run([sys.executable, "-c", _REPLICAS, address, "2"], capture_output=True, text=True,
                             timeout=600, env=_DRIVER_ENV)  # Serve's replacement of the killed replica
    assert started.returncode == 0, started.stderr[-3000:]
    assert requests.post(f"{url}/v1/video/rebalance").status_code == 401
    expected = {stream_id: reference[i][-1] for i, stream_id in enumerate(ids)}
    with ThreadPoolExecutor(1) as pool:
        began = time.time()
        call = pool.submit(requests.post, f"{url}/v1/video/rebalance", headers=AUTH, timeout=300)
        during = _asked_throughout(client, ids, lambda: not call.done())
        response = call.result()
    print(f"\nrebalance took {time.time() - began:.1f} s; {len(during)} questions answered meanwhile")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "video.rebalance" and body["failed"] == [], body
    assert sorted(body["streams"].values()) == [3, 3] and len(body["moved"]) == 3, body
    assert {m["id"] for m in body["moved"]} < set(ids) and len({(m["from"], m["to"]) for m in body["moved"]}) == 1
    _answers_unchanged(during, expected)
    assert {stream_id: client.answer(stream_id) for stream_id in ids} == expected
    again = requests.post(f"{url}/v1/video/rebalance", headers=AUTH, timeout=300).json()
    assert again["moved"] == [] and sorted(again["streams"].values()) == [3, 3]  # even already


def test_scaling_2_to_1_moves_the_streams_without_a_5xx(placed, cluster, reference):
    """After the rebalance each replica holds 3 streams: 2 new streams go one to each (least loaded).
    Deploying the config with 1 replica stops one of them; its streams move to the other before it stops,
    and every stream answers throughout, token for token as before."""
    client, ids, _ = placed
    url, address, config_path, state_root = cluster
    # Placement reads the replicas' routing stats, reported every second (`request_routing_stats_period_s`):
    # right after the rebalance a router may still see 6 / 0; wait for both new counts.
    time.sleep(2.5)
    fresh = [client.create() for _ in range(2)]
    assert len({stream_id[:8] for stream_id in fresh}) == 2
    for n, stream_id in enumerate(fresh):
        assert client.push(stream_id, _clip(50 + n, 0)).status_code == 200
    expected = {**{stream_id: reference[i][-1] for i, stream_id in enumerate(ids)},
                **{stream_id: client.answer(stream_id) for stream_id in fresh}}
    scaling = subprocess.Popen([sys.executable, "-c", _REPLICAS, address, "1", str(config_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_DRIVER_ENV)
    during = _asked_throughout(client, list(expected), lambda: scaling.poll() is None)
    assert scaling.returncode == 0, scaling.stdout.read()[-3000:]
    _answers_unchanged(during, expected)
    assert {stream_id: client.answer(stream_id) for stream_id in expected} == expected
    deadline = time.time() + 30
    while True:  # every stream checkpointed by the one replica left (moved ones within a checkpoint tick)
        holders = [path.parent.name for stream_id in expected for path in state_root.glob(f"*/{stream_id}.livevlm")]
        if len(holders) == len(expected) and len(set(holders)) == 1 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert len(holders) == len(expected) and len(set(holders)) == 1, holders


def test_serve_ray_writes_the_config_serve_deploy_runs(cluster, tiny_model_dir):
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(cluster[2].read_text())

    ServeDeploySchema.model_validate(config)  # what `serve deploy` accepts
    app = config["applications"][0]
    assert app["import_path"] == "vllm_livevlm.serving.ray.app:build" and app["route_prefix"] == "/"
    assert app["args"]["model"] == tiny_model_dir and app["deployments"][0]["num_replicas"] == 2
    assert app["args"]["config"]["clip_frames"] == CONFIG["clip_frames"]
    assert API_KEY not in json.dumps(config)  # the key is in the cluster's store, not in the file
