"""A stream costs one bound: a question's snapshot pin lasts until its context is in vLLM's blocks (its first
step), a clip's until it commits, so between engine steps a stream holds one version and a server reserves
one bound per stream plus, once, the version one commit builds and a step's captured clip K/V.

Store-level tests (pure tensors) and a real server with 16 streams, questions in flight and clips committing.
"""

from __future__ import annotations

import asyncio
import threading
import time

import cv2
import httpx
import numpy as np
import pytest
import requests
from helpers import QUESTION, Server, async_client, server_reservation, stream_reservation
from test_memory_bytes import _ingest

from vllm_livevlm.config import LiveVLMConfig
from vllm_livevlm.connector.params import RequestKind
from vllm_livevlm.connector.store import Reask, SessionStore
from vllm_livevlm.serving.keepalive import client_limits

# ---- the store's pins (no engine) -------------------------------------------------------------------------
STEADY = LiveVLMConfig(clip_frames=4, short_term_frames=2, long_term_budget_tokens=64, page_tokens=16,
                       retrieve_ratio=0.5)


def _store(versions) -> SessionStore:
    store = SessionStore()
    store.open("s", STEADY)
    for memory in versions:
        store.commit("s", memory)
    return store


def _versions_held(store: SessionStore) -> list[int]:
    return sorted(store._streams["s"].versions)


def test_a_question_unpins_after_its_first_step():
    versions = _ingest(STEADY, 8)
    store = _store(versions[:6])
    pinned = store.prepare("s", RequestKind.QUESTION, "q")
    assert store.question_snapshot("s", pinned["version"], "q", pinned["context_tokens"]) is versions[5]
    store.settle(["q"])  # its context is in vLLM's blocks now
    store.commit("s", versions[6])
    assert _versions_held(store) == [7]  # the question still decodes, but holds nothing
    assert store.stats("s")["bytes_all_versions"] == versions[6].nbytes


def test_a_waiting_question_moves_to_the_new_version_or_is_reasked():
    versions = _ingest(STEADY, 8)
    store = _store(versions[:6])
    pinned = store.prepare("s", RequestKind.QUESTION, "q")
    store.commit("s", versions[6])  # a clip commits before the question's first step
    assert _versions_held(store) == [7]  # its pin did not keep version 6
    # Long-term memory is full: the new version has the same context size, so the question reads it.
    assert versions[6].question_context_tokens == pinned["context_tokens"]
    assert store.question_snapshot("s", pinned["version"], "q", pinned["context_tokens"]) is versions[6]
    assert store.take_retrieval_reports(["q"])["q"] == {"repinned_version": 7,
                                                        "frames_covered": versions[6].frames_seen}
    # While memory fills up the size changes: the question is re-asked, the stream stays usable.
    filling = _store(versions[:1])
    early = filling.prepare("s", RequestKind.QUESTION, "q2")
    filling.commit("s", versions[1])
    assert versions[1].question_context_tokens != early["context_tokens"]
    with pytest.raises(Reask):
        filling.question_snapshot("s", early["version"], "q2", early["context_tokens"])
    assert filling.prepare("s", RequestKind.QUESTION, "q3")["version"] == 2
    with pytest.raises(ValueError, match="no version 3"):  # never held: fails closed, never re-pins
        filling.question_snapshot("s", 3, "q4", versions[1].question_context_tokens)


def test_a_recomputed_question_repins_and_says_so():
    """vLLM preempted the question after its first step: the recompute reads the latest version."""
    versions = _ingest(STEADY, 8)
    store = _store(versions[:6])
    pinned = store.prepare("s", RequestKind.QUESTION, "q")
    store.question_snapshot("s", pinned["version"], "q", pinned["context_tokens"])
    store.settle(["q"])
    assert store.question_snapshot("s", pinned["version"], "q", pinned["context_tokens"]) is versions[5]
    assert store.take_retrieval_reports(["q"])["q"]["repinned_version"] == 6  # same version, re-pinned
    store.commit("s", versions[6])
    assert store.question_snapshot("s", pinned["version"], "q", pinned["context_tokens"]) is versions[6]
    assert store.take_retrieval_reports(["q"])["q"]["repinned_version"] == 7


def test_a_closed_stream_keeps_a_waiting_questions_version_until_it_ran():
    versions = _ingest(STEADY, 2)
    store = _store(versions)
    pinned = store.prepare("s", RequestKind.QUESTION, "q")
    store.close("s")
    assert store.question_snapshot("s", pinned["version"], "q", pinned["context_tokens"]) is versions[2]
    store.settle(["q"])
    assert store.total_bytes() == 0


# ---- a real server ----------------------------------------------------------------------------------------
STREAMS = 16
# Memory that fills after ~20 frames; clips attend to the short-term window and questions read a quarter of
# the pages, so prompts fit a 2,048-token model length and step (the step's captured clip K/V, reserved once,
# scales with it: with 16 streams it is ~3% of their bounds).
CONFIG = {"clip_frames": 4, "long_term_budget_tokens": 3584, "page_tokens": 16, "short_term_frames": 2,
          "retrieve_ratio": 0.25, "encode_context": "window"}
BATCH = 2048


@pytest.fixture(scope="module")
def bound(tiny_model_dir) -> int:
    return stream_reservation(tiny_model_dir, CONFIG)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, bound):
    limits = {"max_streams": STREAMS + 1, "max_stream_bytes": 2 * bound, "max_clip_frames": 4,
              "max_questions_per_stream": 2}
    limits["max_total_store_bytes"] = (STREAMS + 1) * bound + server_reservation(tiny_model_dir, bound, limits, BATCH)
    process = Server(tiny_model_dir, tmp_path_factory.mktemp("reservations") / "server.log", CONFIG, limits,
                     "--max-num-batched-tokens", str(BATCH), "--max-model-len", str(BATCH)).wait_ready()
    yield process
    process.stop()


def _files(seeds) -> list:
    def jpeg(seed: int) -> bytes:
        frame = np.random.default_rng(seed).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
        return cv2.imencode(".jpg", frame)[1].tobytes()

    return [("frames", (f"{s}.jpg", jpeg(s), "image/jpeg")) for s in seeds]


def _create(url: str) -> tuple[str, dict[str, str]]:
    r = requests.post(f"{url}/v1/video/streams", json={})
    assert r.status_code == 200, r.text
    return r.json()["id"], {"X-Stream-Token": r.json()["token"]}


def _chat(stream_id: str, max_tokens: int, stream: bool = False) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "session_id": stream_id, "stream": stream}


@pytest.mark.slow
def test_a_decoding_question_holds_no_snapshot(server):
    """The question is still streaming its answer when a clip of its stream commits: the stream then holds
    one version (before: the question's pin kept the old one for its whole decode)."""
    url = server.url
    stream_id, owner = _create(url)
    assert requests.post(f"{url}/v1/video/streams/{stream_id}/frames?wait=true", files=_files(range(4)),
                         headers=owner).status_code == 200
    with httpx.Client(base_url=url, timeout=120, limits=client_limits()) as http:
        with http.stream("POST", "/v1/chat/completions", headers=owner, json=_chat(stream_id, 3000, True)) as answer:
            lines = answer.iter_lines()
            assert answer.status_code == 200
            assert next(line for line in lines if line.startswith("data: {"))  # its first step ran
            before = http.get(f"/v1/video/streams/{stream_id}", headers=owner).json()["stats"]
            pushed = http.post(f"/v1/video/streams/{stream_id}/frames?wait=true", files=_files(range(4, 8)),
                               headers=owner)
            assert pushed.status_code == 200
            stats = http.get(f"/v1/video/streams/{stream_id}", headers=owner).json()["stats"]
            still_decoding = next(lines)
            assert still_decoding.startswith("data: {") or not still_decoding, still_decoding
            assert stats["version"] == before["version"] + 1
            assert stats["bytes_all_versions"] == stats["bytes"]
    assert requests.delete(f"{url}/v1/video/streams/{stream_id}", headers=owner).status_code == 200


@pytest.mark.slow
def test_sixteen_streams_reserve_one_bound_each(server, bound):
    url = server.url
    polls: list[dict] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            polls.append(requests.get(f"{url}/v1/video/engine").json())
            time.sleep(0.05)

    streams = [_create(url) for _ in range(STREAMS)]
    poller = threading.Thread(target=poll)
    poller.start()

    async def feed_and_ask(http: httpx.AsyncClient, stream_id: str, owner: dict, seed: int) -> list[dict]:
        frames = f"/v1/video/streams/{stream_id}/frames"
        assert (await http.post(frames, files=_files(range(seed, seed + 12)), headers=owner)).status_code == 200
        # A question in flight while the stream's clips commit, then one over the full memory.
        first = await http.post("/v1/chat/completions", headers=owner, json=_chat(stream_id, 24))
        r = await http.post(f"{frames}?wait=true", files=_files(range(seed + 12, seed + 24)), headers=owner)
        assert r.status_code == 200, r.text
        second = await http.post("/v1/chat/completions", headers=owner, json=_chat(stream_id, 24))
        return [first.json(), second.json()]

    async def run() -> list[list[dict]]:
        async with async_client(url, timeout=600) as http:
            return await asyncio.gather(*(feed_and_ask(http, sid, owner, 100 * i)
                                          for i, (sid, owner) in enumerate(streams)))

    try:
        answers = asyncio.run(run())
    finally:
        done.set()
        poller.join()
    assert all(answer["usage"]["completion_tokens"] == 24 for pair in answers for answer in pair), answers
    engine = polls[-1]
    assert engine["stream_reserved_bytes"] == STREAMS * bound
    ratio = engine["reserved_bytes"] / (STREAMS * bound)
    peak = max(p["store_bytes"] for p in polls)
    print(f"reserved per stream / bound: {ratio:.4f}; peak store bytes / sum of bounds: "
          f"{peak / (STREAMS * bound):.4f} ({len(polls)} polls); scoring reserve {engine['scoring_reserve_bytes']}")
    assert ratio <= 1.1
    assert all(p["store_bytes"] <= p["reserved_bytes"] for p in polls), max(polls, key=lambda p: p["store_bytes"])
    assert peak >= 0.9 * STREAMS * bound  # the memories were full: the check had something to check
    for stream_id, owner in streams:
        assert requests.delete(f"{url}/v1/video/streams/{stream_id}", headers=owner).status_code == 200
