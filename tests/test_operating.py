"""Operating a stream server for days: limits, auth, expiry, metrics, load, leaks, faults and a
graceful SIGTERM, against a real `vllm-livevlm serve` process on loopback (CPU, tiny model).

Tests run in file order on one server; the SIGTERM test stops it and therefore comes last.
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import time

import cv2
import numpy as np
import psutil
import pytest
import requests
from helpers import Server, async_client, server_reservation, stream_reservation

pytestmark = pytest.mark.slow

API_KEY = "sk-livevlm-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CONFIG = {"clip_frames": 4, "long_term_budget_tokens": 256, "page_tokens": 16, "short_term_frames": 1}
QUESTION = "what is happening in the video?"
LOAD_SECONDS = 75  # two runs: the second must not grow RSS (the mm cache grew ~0.5 GiB a minute)
TTL = 8.0
QUESTIONS_PER_STREAM = 2


@pytest.fixture(scope="module")
def reservation(tiny_model_dir) -> int:
    return stream_reservation(tiny_model_dir, CONFIG)


@pytest.fixture(scope="module")
def limits(tiny_model_dir, reservation) -> dict:
    limits = {"max_streams": 12, "max_stream_bytes": int(1.5 * reservation), "max_frames_per_request": 32,
              "max_pending_frames": 48, "max_frame_side": 256, "max_question_chars": 2000,
              "stream_ttl_seconds": TTL, "max_questions_per_stream": QUESTIONS_PER_STREAM,
              "shutdown_grace_seconds": 60}
    # Room for 10.5 streams besides what the server reserves once (one commit, captures, scoring).
    limits["max_total_store_bytes"] = int(10.5 * reservation) + server_reservation(tiny_model_dir, reservation, limits)
    return limits


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, limits):
    process = Server(tiny_model_dir, tmp_path_factory.mktemp("operating") / "server.log", CONFIG, limits,
                     "--api-key", API_KEY).wait_ready()
    yield process
    process.stop()


def _jpeg(seed: int, size: int = 48) -> bytes:
    frame = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", frame)[1].tobytes()


def _files(seeds, size: int = 48):
    return [("frames", (f"{s}.jpg", _jpeg(s, size), "image/jpeg")) for s in seeds]


def _create(url: str, **body) -> tuple[str, dict[str, str]]:
    r = requests.post(f"{url}/v1/video/streams", json={"config": {}, **body}, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()["id"], {**AUTH, "X-Stream-Token": r.json()["token"]}


def _chat(url: str, stream_id: str, headers: dict, max_tokens: int = 8, **extra) -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions", headers=headers, timeout=120, json={
        "model": "m", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens,
        "temperature": 0.0, "ignore_eos": True, "session_id": stream_id, **extra})


def _engine(url: str) -> dict:
    return requests.get(f"{url}/v1/video/engine", headers=AUTH).json()


def _pool(url: str) -> tuple[int, float]:
    """Store bytes, and the paged KV pool's usage (vLLM's gauge: 1 - free blocks / blocks, refreshed after
    finished requests free their blocks; the worker process cannot see the scheduler's pool here)."""
    return _engine(url)["store_bytes"], _metric(url, "vllm:kv_cache_usage_perc")


def _rss(pid: int) -> dict[str, int]:
    """Resident memory of the server's processes (the API process, its engine core), by process."""
    root = psutil.Process(pid)
    return {f"{p.name()}[{p.pid}]": p.memory_info().rss for p in [root, *root.children(recursive=True)]}


def _metric(url: str, name: str) -> float:
    for line in requests.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not exported")


# ---- load and leaks ------------------------------------------------------------------------------------
async def _load(url: str, limit: int, seconds: float = LOAD_SECONDS, streams: int = 8, fps: float = 2.0,
                ask_every: float = 5.0) -> dict:
    """`streams` cameras pushing one JPEG every 1/fps s, each asked a question every `ask_every` s."""
    async with async_client(url, headers=AUTH, timeout=120) as http:
        owners = []
        for _ in range(streams):
            r = await http.post("/v1/video/streams", json={})
            assert r.status_code == 200, r.text
            owners.append((r.json()["id"], {"X-Stream-Token": r.json()["token"]}))
        statuses: dict[int, int] = {}
        answered, ttfts, latencies, store_peak = 0, [], [], 0
        start = time.monotonic()

        async def at(t: float) -> None:
            await asyncio.sleep(max(0.0, start + t - time.monotonic()))

        async def camera(i: int, stream_id: str, owner: dict) -> None:
            for k in range(int(seconds * fps)):
                await at(k / fps)
                r = await http.post(f"/v1/video/streams/{stream_id}/frames", headers=owner,
                                    files=_files([1000 * i + k]))
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        async def asker(i: int, stream_id: str, owner: dict) -> None:
            nonlocal answered
            for q in range(int(seconds / ask_every)):
                await at(1.0 + q * ask_every + i * ask_every / streams)
                sent = time.monotonic()
                r = await http.post("/v1/chat/completions", headers=owner, json={
                    "model": "m", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8,
                    "temperature": 0.0, "session_id": stream_id})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    answered += 1
                    ttfts.append(r.json()["livevlm"]["timings"]["ttft"])
                    latencies.append(time.monotonic() - sent)

        async def monitor() -> None:
            nonlocal store_peak
            while time.monotonic() - start < seconds + 2:
                store = (await http.get("/v1/video/engine")).json()["store_bytes"]
                assert store <= limit, f"store bytes {store} over the limit {limit}"
                store_peak = max(store_peak, store)
                await asyncio.sleep(1.0)

        try:
            await asyncio.gather(monitor(), *(camera(i, *o) for i, o in enumerate(owners)),
                                 *(asker(i, *o) for i, o in enumerate(owners)))
            frames = [(await http.get(f"/v1/video/streams/{sid}", headers=o)).json()["stats"] for sid, o in owners]
        finally:  # a failed run must not leave its streams holding the store for the tests after it
            deleted = [(await http.delete(f"/v1/video/streams/{sid}", headers=o)).status_code for sid, o in owners]
        assert deleted == [200] * streams, deleted
    ttfts.sort()
    return {"statuses": statuses, "questions": int(seconds / ask_every) * streams, "answered": answered,
            "ttft_p50_ms": 1000 * statistics.median(ttfts), "ttft_p99_ms": 1000 * ttfts[int(0.99 * (len(ttfts) - 1))],
            "latency_p99_ms": 1000 * sorted(latencies)[int(0.99 * (len(latencies) - 1))],
            "store_peak_bytes": store_peak, "frames_encoded": sum(s["frames_encoded"] for s in frames),
            "frames_received": sum(s["frames_received"] for s in frames)}


def test_load_then_no_leaks(server, limits):
    """8 cameras at 2 fps + a question per stream every 5 s, twice: no 5xx, every question answered, store
    under its limit; after deleting the streams, store bytes and free KV blocks are back where they started
    and the second run grows the server's RSS by under 5%."""
    url, limit = server.url, limits["max_total_store_bytes"]
    start = _pool(url)
    assert start == (0, 0.0) and _engine(url)["streams"] == 0
    rss = []
    for _ in range(2):
        report = asyncio.run(_load(url, limit))
        rss.append(_rss(server.process.pid))
        print(f"\nload run: {json.dumps(report)}; server RSS {sum(rss[-1].values()) / 2**20:.0f} MiB "
              f"({', '.join(f'{name} {size / 2**20:.0f}' for name, size in rss[-1].items())})")
        assert not any(code >= 500 for code in report["statuses"]), report
        assert report["answered"] == report["questions"], report
        assert _pool(url) == start and _engine(url)["streams"] == 0
    assert sum(rss[1].values()) < 1.05 * sum(rss[0].values()), f"RSS grew from {rss[0]} to {rss[1]} over an identical run"


# ---- limits ------------------------------------------------------------------------------------------------
def test_store_limit_refuses_streams_with_503_never_oom(server, reservation, limits):
    url = server.url
    held = []
    while True:
        r = requests.post(f"{url}/v1/video/streams", json={}, headers=AUTH)
        if r.status_code != 200:
            break
        held.append((r.json()["id"], {**AUTH, "X-Stream-Token": r.json()["token"]}))
    assert r.status_code == 503 and "session store is full" in r.json()["error"]["message"], r.text
    assert len(held) == 10  # 10.5 reservations fit in the limit
    assert _engine(url)["stream_reserved_bytes"] == 10 * reservation
    assert _engine(url)["reserved_bytes"] + _engine(url)["scoring_reserve_bytes"] <= limits["max_total_store_bytes"]
    for stream_id, owner in held:
        assert requests.delete(f"{url}/v1/video/streams/{stream_id}", headers=owner).status_code == 200
    again, again_owner = _create(url)  # room again
    for s in requests.get(f"{url}/v1/video/streams", headers=AUTH).json()["data"]:
        pytest.fail(f"listing without a token shows stream {s['id']}")
    assert requests.delete(f"{url}/v1/video/streams/{again}", headers=again_owner).status_code == 200


def test_limits_give_clear_4xx(server):
    url = server.url

    def error(response, status, words):
        assert response.status_code == status, response.text
        assert words in response.json()["error"]["message"], response.text

    error(requests.post(f"{url}/v1/video/streams", json={"config": {"long_term_budget_tokens": None}}, headers=AUTH),
          400, "unbounded")
    error(requests.post(f"{url}/v1/video/streams", json={"config": {"long_term_budget_tokens": 4096}}, headers=AUTH),
          400, "per-stream limit")
    stream_id, owner = _create(url)
    frames = f"{url}/v1/video/streams/{stream_id}/frames"
    error(requests.post(frames, files=_files([1], size=300), headers=owner), 413, "over max_frame_side (256 pixels on a side)")
    error(requests.post(frames, files=_files(range(33)), headers=owner), 413, "more than 32 frames")
    error(_chat(url, stream_id, owner, messages=[{"role": "user", "content": "x" * 2001}]), 400, "over the limit of 2000")
    # Backpressure, reject policy: 48 pending frames at most. Clips of 4 frames are encoded in the
    # background, so fill faster than that with 32-frame requests until refused.
    codes = [requests.post(frames, files=_files(range(32)), headers=owner).status_code for _ in range(4)]
    assert 429 in codes and set(codes) <= {200, 429}, codes
    refused = requests.post(frames, files=_files(range(32)), headers=owner)
    if refused.status_code == 429:
        assert "waiting to be encoded" in refused.json()["error"]["message"]
    # drop_oldest policy: nothing refused, the overflow reported as dropped
    dropper, dropper_owner = _create(url, pending_policy="drop_oldest")
    dropped = sum(requests.post(f"{url}/v1/video/streams/{dropper}/frames", files=_files(range(32)),
                                headers=dropper_owner).json()["frames_dropped"] for _ in range(4))
    assert dropped > 0
    stats = requests.get(f"{url}/v1/video/streams/{dropper}", headers=dropper_owner).json()["stats"]
    assert stats["pending_frames"] <= 48 and stats["frames_received"] == 128
    for sid, o in ((stream_id, owner), (dropper, dropper_owner)):
        assert requests.delete(f"{url}/v1/video/streams/{sid}", headers=o).status_code == 200


# ---- auth ------------------------------------------------------------------------------------------------------
def test_api_key_and_owner_tokens(server):
    import websockets
    from websockets.exceptions import InvalidStatus

    url = server.url
    mine, owner = _create(url)
    theirs, their_owner = _create(url)
    assert requests.post(f"{url}/v1/video/streams/{mine}/frames?wait=true", files=_files(range(4)),
                         headers=owner).status_code == 200
    routes = [("post", "/v1/video/streams", {"json": {}}), ("get", "/v1/video/streams", {}),
              ("get", f"/v1/video/streams/{mine}", {}), ("delete", f"/v1/video/streams/{mine}", {}),
              ("post", f"/v1/video/streams/{mine}/frames", {"files": _files([1])}),
              ("get", "/v1/video/engine", {}),
              ("post", "/v1/chat/completions", {"json": {"model": "m", "session_id": mine,
                                                         "messages": [{"role": "user", "content": "hi"}]}})]
    for method, path, kwargs in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-Stream-Token": owner["X-Stream-Token"]}):
            r = getattr(requests, method)(f"{url}{path}", headers=headers, **kwargs)
            assert r.status_code == 401, (method, path, headers, r.status_code)
    stream_routes = [r for r in routes if mine in r[1] or "session_id" in r[2].get("json", {})]
    for method, path, kwargs in stream_routes:
        for headers in (AUTH, {**AUTH, "X-Stream-Token": "not-the-token"}, their_owner):
            r = getattr(requests, method)(f"{url}{path}", headers=headers, **kwargs)
            assert r.status_code == 403 and "owner token" in r.json()["error"]["message"], (method, path, r.text)
    listed = requests.get(f"{url}/v1/video/streams", headers=owner).json()["data"]
    assert [s["id"] for s in listed] == [mine]  # never another client's stream
    assert "stats" not in json.dumps(requests.get(f"{url}/v1/video/engine", headers=AUTH).json())

    async def sockets():
        ws_url = f"{url.replace('http', 'ws')}/v1/video/streams/{mine}/ws"
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(ws_url):
                pass
        assert refused.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as refused:  # a wrong owner token is refused at the handshake
            async with websockets.connect(f"{ws_url}?token=wrong", additional_headers=AUTH):
                pass
        assert refused.value.response.status_code == 403
        async with websockets.connect(f"{ws_url}?token={owner['X-Stream-Token']}", additional_headers=AUTH) as ws:
            await ws.send(json.dumps({"type": "question", "question": QUESTION, "max_tokens": 4}))
            while (message := json.loads(await ws.recv()))["type"] == "answer.delta":
                pass
            assert message["type"] == "answer.done" and message["frames_covered"] == 4

    asyncio.run(sockets())
    for sid, o in ((mine, owner), (theirs, their_owner)):
        assert requests.delete(f"{url}/v1/video/streams/{sid}", headers=o).status_code == 200


# ---- expiry and metrics --------------------------------------------------------------------------------------
def test_idle_streams_expire_and_metrics_are_exported(server):
    url = server.url
    idle, idle_owner = _create(url)
    active, owner = _create(url)
    requests.post(f"{url}/v1/video/streams/{idle}/frames?wait=true", files=_files(range(4)), headers=idle_owner)
    expired_before = _metric(url, "livevlm_streams_expired_total")
    deadline = time.time() + 3 * TTL
    while time.time() < deadline:
        stats = requests.get(f"{url}/v1/video/streams/{active}", headers=owner)  # activity keeps it alive
        assert stats.status_code == 200
        # Listing by the owner token does not touch a stream (reading the idle one would); waiting for the
        # idle stream itself, since a stream left over by an earlier test may expire meanwhile too.
        listed = requests.get(f"{url}/v1/video/streams", headers=idle_owner).json()["data"]
        if not any(s["id"] == idle for s in listed):
            break
        time.sleep(TTL / 4)
    gone = requests.post(f"{url}/v1/video/streams/{idle}/frames", files=_files([9]), headers=idle_owner)
    assert gone.status_code == 410 and "expired after" in gone.json()["error"]["message"], gone.text
    assert _chat(url, idle, idle_owner).status_code == 410
    assert _metric(url, "livevlm_streams_expired_total") >= expired_before + 1
    assert f"stream {idle} expired after" in server.log_text()
    assert _chat(url, active, owner).status_code == 200
    for name in ("livevlm_streams", "livevlm_store_bytes", "livevlm_frames_ingested_total",
                 "livevlm_clips_encoded_total", "livevlm_ingest_lag_frames", "livevlm_question_ttft_seconds_count",
                 "livevlm_pages_retrieved_total"):
        assert _metric(url, name) >= 0
    assert _metric(url, "livevlm_question_ttft_seconds_count") > 0 and _metric(url, "livevlm_streams") >= 1
    assert requests.delete(f"{url}/v1/video/streams/{active}", headers=owner).status_code == 200


# ---- faults ----------------------------------------------------------------------------------------------------
def test_faults_leave_the_server_healthy(server):
    import socket

    import websockets

    url = server.url
    start = _pool(url)
    stream_id, owner = _create(url)
    assert requests.post(f"{url}/v1/video/streams/{stream_id}/frames?wait=true", files=_files(range(8)),
                         headers=owner).status_code == 200
    expected = _chat(url, stream_id, owner).json()["choices"][0]["message"]["content"]

    # 1. a client that disconnects mid-upload: headers promise 1 MB, 1 KB arrives, the socket closes
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall((f"POST /v1/video/streams/{stream_id}/frames HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {API_KEY}\r\nX-Stream-Token: {owner['X-Stream-Token']}\r\n"
                     "Content-Type: video/mp4\r\nContent-Length: 1000000\r\n\r\n").encode() + b"\0" * 1000)
    # 2. a websocket dropped mid-answer
    async def drop_mid_answer():
        ws_url = f"{url.replace('http', 'ws')}/v1/video/streams/{stream_id}/ws?token={owner['X-Stream-Token']}"
        async with websockets.connect(ws_url, additional_headers=AUTH) as ws:
            await ws.send(json.dumps({"type": "question", "question": QUESTION, "max_tokens": 2000}))
            assert json.loads(await ws.recv())["type"] == "answer.delta"

    asyncio.run(drop_mid_answer())
    # 3. a question racing a delete of its stream: answered, or a clean 404/410, never a 5xx
    racer, racer_owner = _create(url)
    requests.post(f"{url}/v1/video/streams/{racer}/frames?wait=true", files=_files(range(4)), headers=racer_owner)

    async def race():
        async with async_client(url, timeout=120) as http:
            ask = http.post("/v1/chat/completions", headers=racer_owner, json={
                "model": "m", "session_id": racer, "max_tokens": 64, "ignore_eos": True,
                "messages": [{"role": "user", "content": QUESTION}]})
            delete = http.delete(f"/v1/video/streams/{racer}", headers=racer_owner)
            return await asyncio.gather(ask, delete)

    asked, deleted = asyncio.run(race())
    assert asked.status_code in (200, 404) and deleted.status_code == 200, (asked.text, deleted.text)
    # the server is healthy, the stream answers as before, nothing leaked
    assert requests.get(f"{url}/health").status_code == 200
    stats = requests.get(f"{url}/v1/video/streams/{stream_id}", headers=owner).json()["stats"]
    assert (stats["frames"], stats["pending_frames"]) == (8, 0)
    assert _chat(url, stream_id, owner).json()["choices"][0]["message"]["content"] == expected
    assert requests.delete(f"{url}/v1/video/streams/{stream_id}", headers=owner).status_code == 200
    deadline = time.time() + 30  # the dropped websocket's decode is aborted asynchronously
    while (now := _pool(url)) != start and time.time() < deadline:
        time.sleep(0.5)
    assert now == start


# ---- graceful shutdown (stops the server: last) -------------------------------------------------------------
def test_sigterm_finishes_questions_and_frees_streams(server):
    url = server.url
    stream_id, owner = _create(url)
    requests.post(f"{url}/v1/video/streams/{stream_id}/frames?wait=true", files=_files(range(4)), headers=owner)
    chunks = []
    with requests.post(f"{url}/v1/chat/completions", headers=owner, stream=True, timeout=120, json={
            "model": "m", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 300,
            "temperature": 0.0, "ignore_eos": True, "session_id": stream_id,
            "stream_options": {"include_usage": True}, "stream": True}) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith(b"data: {"):
                chunks.append(json.loads(line[6:]))
                break
        server.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        refused = None
        try:
            refused = requests.post(f"{url}/v1/video/streams", json={}, headers=AUTH, timeout=10).status_code
        except requests.ConnectionError:
            refused = "closed"
        for line in lines:
            if line.startswith(b"data: {"):
                chunks.append(json.loads(line[6:]))
    assert refused in (503, "closed")
    assert chunks[-1]["usage"]["completion_tokens"] == 300  # the in-flight answer was finished
    server.process.wait(timeout=120)
    log = server.log_text()
    assert "LiveVLM shutdown: closed 1 streams" in log and "(0 questions cut" in log, log[-3000:]
