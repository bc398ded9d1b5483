"""The server tried as an attacker would: every request here must be refused with a 4xx, and afterwards the
server, its engine and a stream opened before the attacks must be unchanged (same stats, same greedy answer).

One real `vllm-livevlm serve --api-key` process on loopback (CPU, tiny model). The attack tests sit between
`test_victim_baseline` (first) and `test_victim_unchanged_and_rss_bounded` (last); pytest runs them in
file order.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import requests
from helpers import Server

pytestmark = pytest.mark.slow

API_KEY = "security-test-key"
CONFIG = {"clip_frames": 4, "long_term_budget_tokens": 1024, "page_tokens": 16}
QUESTION = "what is happening in the video?"
RSS_GROWTH_LIMIT = 512 * 1024**2
AUTH = {"Authorization": f"Bearer {API_KEY}"}


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
                     {"max_frames_per_request": 32}, "--api-key", API_KEY, "--served-model-name", "tiny")
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


# ==== final check: keep these last ==========================================================================
def test_victim_unchanged_and_rss_bounded(server, victim, rss_before):
    assert_alive(server)
    assert victim.current_stats() == victim.stats
    assert victim.ask() == victim.answer
    growth = process_tree_rss(server.process.pid) - rss_before
    assert growth < RSS_GROWTH_LIMIT, f"server process tree RSS grew by {growth / 2**20:.0f} MiB"
