"""Streams under concurrency on a real `vllm-livevlm serve` (CPU, tiny model): creates racing the stream and
store limits, pending-bytes admission, a stream whose ingestion failed, and 200 seeded random interleavings
of push / push?wait=true / ask / delete / expiry. No request may answer 5xx and no frame may be lost.

Tests run in file order on one server; each deletes the streams it opened.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import cv2
import httpx
import numpy as np
import pytest
import requests
from helpers import Server, async_client, server_reservation, stream_reservation

pytestmark = pytest.mark.slow

SIDE = 32
FRAME_BYTES = SIDE * SIDE * 3
TTL = 2.0
CONFIG = {"clip_frames": 4, "long_term_budget_tokens": 256, "page_tokens": 16, "short_term_frames": 1}
# Large long-term memory: its clip prompts outgrow the server's 4096-token model length after a few clips.
BIG = {"clip_frames": 4, "long_term_budget_tokens": 4096, "page_tokens": 16, "short_term_frames": 1}
HOLDING = {"clip_frames": 32}  # frames stay pending (fewer than a clip)
ALLOWED = {200, 404, 409, 410, 429}
QUESTIONS = 1  # max_questions_per_stream


@pytest.fixture(scope="module")
def big_reservation(tiny_model_dir) -> int:
    small = stream_reservation(tiny_model_dir, CONFIG)
    big = stream_reservation(tiny_model_dir, BIG)
    assert 3 * small < 2.5 * big, (small, big)  # three small streams fit where three big ones do not
    return big


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, big_reservation):
    limits = {"max_streams": 3, "stream_ttl_seconds": TTL,
              "max_pending_frames": 64, "max_pending_bytes": 10 * FRAME_BYTES,
              "max_total_pending_bytes": 16 * FRAME_BYTES, "max_questions_per_stream": QUESTIONS}
    # Room for 2.5 big streams besides what the server reserves once (one commit, captures, scoring).
    limits["max_total_store_bytes"] = int(2.5 * big_reservation) + server_reservation(tiny_model_dir, big_reservation,
                                                                                      limits)
    process = Server(tiny_model_dir, tmp_path_factory.mktemp("races") / "server.log", CONFIG, limits,
                     "--max-model-len", "4096").wait_ready()
    yield process
    process.stop()


def _jpeg(seed: int) -> bytes:
    frame = np.random.default_rng(seed).integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", frame)[1].tobytes()


def _files(count: int, seed: int = 0) -> list:
    return [("frames", (f"{seed}-{i}.jpg", _jpeg(seed + i), "image/jpeg")) for i in range(count)]


def _create(url: str, config: dict, **body) -> tuple[str, dict[str, str]]:
    r = requests.post(f"{url}/v1/video/streams", json={"config": config, **body})
    assert r.status_code == 200, r.text
    return r.json()["id"], {"X-Stream-Token": r.json()["token"]}


def _push(url: str, stream_id: str, owner: dict, count: int, wait: bool = False) -> requests.Response:
    return requests.post(f"{url}/v1/video/streams/{stream_id}/frames", params={"wait": "true"} if wait else None,
                         headers=owner, files=_files(count), timeout=120)


def _ask(url: str, stream_id: str, owner: dict) -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions", headers=owner, timeout=120, json={
        "model": "m", "messages": [{"role": "user", "content": "what is here?"}], "max_tokens": 2,
        "temperature": 0.0, "session_id": stream_id})


def _stats(url: str, stream_id: str, owner: dict) -> dict:
    r = requests.get(f"{url}/v1/video/streams/{stream_id}", headers=owner)
    assert r.status_code == 200, r.text
    return r.json()


def _delete(url: str, stream_id: str, owner: dict) -> None:
    r = requests.delete(f"{url}/v1/video/streams/{stream_id}", headers=owner)
    assert r.status_code == 200, r.text


def _no_frame_lost(stats: dict) -> None:
    s = stats["stats"]
    assert s["frames_received"] == s["frames_encoded"] + s["pending_frames"] + s["frames_dropped"], s


def _concurrent_creates(url: str, config: dict, count: int) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with async_client(url, timeout=120) as http:
            return list(await asyncio.gather(*[http.post("/v1/video/streams", json={"config": config})
                                               for _ in range(count)]))
    return asyncio.run(run())


def _delete_created(url: str, responses: list[httpx.Response]) -> None:
    for r in responses:
        if r.status_code == 200:
            _delete(url, r.json()["id"], {"X-Stream-Token": r.json()["token"]})


# ---- limits under concurrent creates --------------------------------------------------------------------------
def test_concurrent_creates_never_pass_max_streams(server):
    responses = _concurrent_creates(server.url, CONFIG, 20)
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 3, 503: 17}, statuses
    assert requests.get(f"{server.url}/v1/video/engine").json()["streams"] == 3
    _delete_created(server.url, responses)
    assert requests.get(f"{server.url}/v1/video/engine").json()["streams"] == 0


def test_concurrent_creates_never_pass_the_store_limit(server, big_reservation):
    responses = _concurrent_creates(server.url, BIG, 6)
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 2, 503: 4}, statuses
    assert requests.get(f"{server.url}/v1/video/engine").json()["stream_reserved_bytes"] == 2 * big_reservation
    _delete_created(server.url, responses)


# ---- pending bytes ----------------------------------------------------------------------------------------------
def test_pending_bytes_are_admitted_per_stream_and_per_server(server):
    url = server.url
    held, held_owner = _create(url, HOLDING)
    r = _push(url, held, held_owner, 8)
    assert r.status_code == 200 and r.json()["pending_frames"] == 8, r.text
    assert _stats(url, held, held_owner)["stats"]["pending_bytes"] == 8 * FRAME_BYTES

    # Per stream (reject): 8 + 3 frames pass max_pending_bytes (10 frames); nothing is kept.
    r = _push(url, held, held_owner, 3)
    assert r.status_code == 429 and "max_pending_bytes" in r.json()["error"]["message"], r.text
    s = _stats(url, held, held_owner)["stats"]
    assert (s["frames_received"], s["pending_frames"], s["pending_bytes"]) == (8, 8, 8 * FRAME_BYTES)

    # Per server (drop_oldest): 8 + 6 + 4 frames pass max_total_pending_bytes (16 frames): the stream that
    # pushes drops its own 2 oldest frames, never another stream's.
    dropping, dropping_owner = _create(url, HOLDING, pending_policy="drop_oldest")
    assert _push(url, dropping, dropping_owner, 6).json()["frames_dropped"] == 0
    r = _push(url, dropping, dropping_owner, 4)
    assert r.status_code == 200 and r.json()["frames_dropped"] == 2 and r.json()["pending_frames"] == 8, r.text
    engine = requests.get(f"{url}/v1/video/engine").json()
    assert (engine["pending_bytes"], engine["max_total_pending_bytes"]) == (16 * FRAME_BYTES, 16 * FRAME_BYTES)

    # Per server (reject): one more frame on the first stream passes the server's limit.
    r = _push(url, held, held_owner, 1)
    assert r.status_code == 429 and "max_total_pending_bytes" in r.json()["error"]["message"], r.text

    # drop_oldest, a request larger than the stream's limit: the newest frames that fit both limits stay
    # (16 - 8 held by the other stream = 8).
    r = _push(url, dropping, dropping_owner, 11)
    assert r.status_code == 200 and r.json()["frames_dropped"] == 11 and r.json()["pending_frames"] == 8, r.text
    for stream_id, owner, expected in ((held, held_owner, (8, 8, 0)), (dropping, dropping_owner, (21, 8, 13))):
        s = _stats(url, stream_id, owner)
        _no_frame_lost(s)
        assert (s["stats"]["frames_received"], s["stats"]["pending_frames"], s["stats"]["frames_dropped"]) == expected
        _delete(url, stream_id, owner)
    assert requests.get(f"{url}/v1/video/engine").json()["pending_bytes"] == 0


# ---- a stream whose ingestion failed ----------------------------------------------------------------------------
def test_a_stream_whose_ingestion_failed_says_so_and_can_be_deleted(server):
    url = server.url
    stream_id, owner = _create(url, BIG)
    for _ in range(12):  # clip prompts grow with the long-term memory until vLLM refuses one (4096 tokens)
        r = _push(url, stream_id, owner, 4, wait=True)
        if r.status_code != 200:
            break
    assert r.status_code == 409, r.text
    assert "failed" in r.json()["error"]["message"]
    body = _stats(url, stream_id, owner)
    assert body["state"] == "failed" and "4096" in body["error"], body
    assert body["stats"]["pending_frames"] == 4  # the refused clip's frames are queued again
    _no_frame_lost(body)
    assert _push(url, stream_id, owner, 1).status_code == 409
    assert _ask(url, stream_id, owner).status_code == 409
    _delete(url, stream_id, owner)
    assert requests.get(f"{url}/v1/video/streams/{stream_id}", headers=owner).status_code == 404
    # The engine serves the next stream.
    fresh, fresh_owner = _create(url, CONFIG)
    assert _push(url, fresh, fresh_owner, 4, wait=True).json()["frames_encoded"] == 4
    assert _ask(url, fresh, fresh_owner).status_code == 200
    _delete(url, fresh, fresh_owner)


# ---- random interleavings ---------------------------------------------------------------------------------------
ROUNDS = 200
SLOTS = 3  # = max_streams: a slot's stream is created again once it is deleted or expired


def test_random_interleavings_answer_no_5xx_and_lose_no_frame(server):
    rng = random.Random(14)
    statuses: Counter = Counter()
    accepted: Counter = Counter()  # frames the server said it accepted, per stream

    async def run() -> dict[int, tuple[str, dict]]:
        slots: dict[int, tuple[str, dict]] = {}
        async with async_client(server.url, timeout=180) as http:

            async def op(kind: str, slot: int, stream_id: str, owner: dict, delay: float, seed: int) -> None:
                await asyncio.sleep(delay)
                path = f"/v1/video/streams/{stream_id}"
                if kind == "idle":  # stop touching the stream for about its TTL (`delay`), then come back
                    kind = "get"
                if kind in ("push", "push_wait"):
                    r = await http.post(f"{path}/frames", headers=owner, files=_files(1 + seed % 3, seed),
                                        params={"wait": "true"} if kind == "push_wait" else None)
                    if r.status_code == 200:
                        accepted[stream_id] += r.json()["frames_accepted"]
                elif kind == "ask":
                    r = await http.post("/v1/chat/completions", headers=owner, json={
                        "model": "m", "messages": [{"role": "user", "content": "what is here?"}],
                        "max_tokens": 2, "temperature": 0.0, "session_id": stream_id})
                elif kind == "delete":
                    r = await http.delete(path, headers=owner)
                else:
                    r = await http.get(path, headers=owner)
                    if r.status_code == 200:
                        _no_frame_lost(r.json())
                statuses[(kind, r.status_code)] += 1
                assert r.status_code in ALLOWED, (kind, r.status_code, r.text)
                if (kind == "delete" and r.status_code == 200) or r.status_code in (404, 410):
                    if slots.get(slot, (None,))[0] == stream_id:
                        del slots[slot]

            kinds = ["push"] * 6 + ["push_wait"] * 3 + ["ask"] * 3 + ["get"] * 2 + ["delete"]
            for round_ in range(ROUNDS):
                for slot in range(SLOTS):
                    if slot not in slots:
                        r = await http.post("/v1/video/streams", json={"config": CONFIG})
                        assert r.status_code == 200, r.text
                        slots[slot] = (r.json()["id"], {"X-Stream-Token": r.json()["token"]})
                ops = []
                for i in range(rng.randint(2, 6)):
                    kind = "idle" if rng.random() < 0.03 else rng.choice(kinds)
                    delay = TTL * (0.8 + 0.7 * rng.random()) if kind == "idle" else 0.05 * rng.random()
                    # Slot 2 is touched rarely: it expires now and then, sometimes while a request reaches it.
                    slot = rng.choices(range(SLOTS), weights=[5, 4, 1])[0]
                    ops.append(op(kind, slot, *slots[slot], delay, 1000 * round_ + 10 * i))
                await asyncio.gather(*ops)
        return slots

    open_streams = asyncio.run(run())
    print(f"\nraces: {sum(statuses.values())} requests, {dict(sorted(statuses.items()))}")
    kinds_seen = {kind for kind, _ in statuses}
    assert {"push", "push_wait", "ask", "delete", "get"} <= kinds_seen
    assert any(status == 410 for _, status in statuses), "no stream expired during the test"
    for stream_id, owner in open_streams.values():
        r = requests.get(f"{server.url}/v1/video/streams/{stream_id}", headers=owner)
        if r.status_code == 410:
            continue
        body = r.json()
        _no_frame_lost(body)
        assert body["stats"]["frames_received"] == accepted[stream_id]
        _delete(server.url, stream_id, owner)
    assert requests.get(f"{server.url}/health").status_code == 200
