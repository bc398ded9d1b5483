"""The server on a Qwen2.5-VL checkpoint: a real `vllm-livevlm serve` (tiny random Qwen2.5-VL, CPU), the
same routes as on LLaVA-OneVision (create, push frames, ask through chat completions, stats, delete)."""

from __future__ import annotations

import base64

import cv2
import pytest
import requests

from helpers import QUESTION, Server, random_video

pytestmark = pytest.mark.slow

CONFIG = {"clip_frames": 4, "long_term_budget_tokens": 64, "page_tokens": 16, "sample_fps": None}


@pytest.fixture(scope="module")
def server(tiny_qwen25vl_dir, tmp_path_factory):
    process = Server(tiny_qwen25vl_dir, tmp_path_factory.mktemp("qwen-server") / "server.log", CONFIG).wait_ready()
    yield process.url
    process.stop()


def test_the_server_answers_a_stream_over_http(server, tiny_qwen25vl_dir):
    created = requests.post(f"{server}/v1/video/streams", json={"config": {}}, timeout=60)
    assert created.status_code == 200, created.text
    stream_id, owner = created.json()["id"], {"X-Stream-Token": created.json()["token"]}
    frames = random_video(5, 24)
    pngs = [base64.b64encode(cv2.imencode(".png", cv2.cvtColor(f, cv2.COLOR_RGB2BGR))[1].tobytes()).decode()
            for f in frames]
    pushed = requests.post(f"{server}/v1/video/streams/{stream_id}/frames?wait=true", headers=owner,
                           json={"frames": pngs}, timeout=300)
    assert pushed.status_code == 200, pushed.text
    assert pushed.json() == {"frames_accepted": 24, "frames_sampled_out": 0, "frames_dropped": 0, "clips_encoded": 6,
                             "frames_encoded": 24, "pending_frames": 0}
    reply = requests.post(f"{server}/v1/chat/completions", headers={**owner, "X-Session-ID": stream_id}, timeout=300,
                          json={"model": tiny_qwen25vl_dir, "messages": [{"role": "user", "content": QUESTION}],
                                "max_tokens": 6, "temperature": 0.0, "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["usage"]["completion_tokens"] == 6 and body["choices"][0]["message"]["content"]
    assert body["livevlm"]["frames_covered"] == 24
    assert 0 < body["usage"]["prompt_tokens"] < 30  # only the question turn is prefilled
    stats = requests.get(f"{server}/v1/video/streams/{stream_id}", headers=owner, timeout=30).json()["stats"]
    assert (stats["frames"], stats["clips"], stats["long_term_tokens"]) == (24, 6, 64)
    deleted = requests.delete(f"{server}/v1/video/streams/{stream_id}", headers=owner, timeout=60)
    assert deleted.status_code == 200 and deleted.json()["bytes_freed"] == stats["bytes"]
