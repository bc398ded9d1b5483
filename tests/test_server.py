"""The OpenAI-compatible server with the plugin: a real `vllm-livevlm serve` process on a loopback port,
driven with the `openai` client and plain HTTP (CPU, tiny model)."""

from __future__ import annotations

import base64
import json

import cv2
import numpy as np
import pytest
import requests
from helpers import Server

pytestmark = pytest.mark.slow

# Every frame kept: these tests push a 4 fps mp4 and a burst of websocket frames (sampling: tests/test_time.py).
CONFIG = {"clip_frames": 4, "long_term_budget_tokens": 1024, "page_tokens": 16, "sample_fps": None}
QUESTION = "what is happening in the video?"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    process = Server(tiny_model_dir, tmp_path_factory.mktemp("server") / "server.log", CONFIG,
                     {"max_frames_per_request": 32}).wait_ready()
    yield process.url
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused")


def _frames(seed: int, count: int, size: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def _jpeg(frame: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))[1].tobytes()


def _decoded(data: bytes) -> np.ndarray:
    """What the server sees for a JPEG: the same decoder the server uses."""
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _mp4(frames: np.ndarray, path) -> bytes:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 4, (frames.shape[2], frames.shape[1]))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path.read_bytes()


def _create(server: str, config: dict | None = None) -> tuple[str, dict[str, str]]:
    """A new stream's id and the headers that carry its owner token."""
    response = requests.post(f"{server}/v1/video/streams", json={"config": config or {}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "video.stream" and len(body["id"]) >= 32 and len(body["token"]) >= 32
    return body["id"], {"X-Stream-Token": body["token"]}


def _ask(client, server_model: str, stream_id: str, owner: dict[str, str], max_tokens: int = 8, **kwargs):
    return client.chat.completions.create(
        model=server_model, messages=[{"role": "user", "content": QUESTION}], max_tokens=max_tokens,
        temperature=0.0, extra_body={"session_id": stream_id, "ignore_eos": True}, extra_headers=owner, **kwargs)


def test_stream_lifecycle_over_http(server, client, tiny_model_dir, tmp_path):
    stream_id, owner = _create(server)
    frames = _frames(0, 64)
    jpegs = [_jpeg(f) for f in frames]
    # 1: multipart JPEG files
    r = requests.post(f"{server}/v1/video/streams/{stream_id}/frames", headers=owner,
                      files=[("frames", (f"{i}.jpg", jpegs[i], "image/jpeg")) for i in range(16)])
    assert r.status_code == 200 and r.json()["frames_accepted"] == 16, r.text
    # 2: JSON with base64 images
    r = requests.post(f"{server}/v1/video/streams/{stream_id}/frames", headers=owner,
                      json={"frames": [base64.b64encode(j).decode() for j in jpegs[16:32]]})
    assert r.status_code == 200 and r.json()["frames_accepted"] == 16, r.text
    # 3: an mp4 file, decoded by the server
    r = requests.post(f"{server}/v1/video/streams/{stream_id}/frames", headers=owner,
                      files=[("frames", ("clip.mp4", _mp4(frames[32:48], tmp_path / "c.mp4"), "video/mp4"))])
    assert r.status_code == 200 and r.json()["frames_accepted"] == 16, r.text
    # 4: a raw mp4 body; wait for the encoding
    r = requests.post(f"{server}/v1/video/streams/{stream_id}/frames?wait=true",
                      data=_mp4(frames[48:64], tmp_path / "d.mp4"), headers={"Content-Type": "video/mp4", **owner})
    assert r.status_code == 200, r.text
    assert r.json() == {"frames_accepted": 16, "frames_sampled_out": 0, "frames_dropped": 0, "clips_encoded": 16,
                        "frames_encoded": 64, "pending_frames": 0}

    plain = _ask(client, tiny_model_dir, stream_id, owner)
    assert plain.choices[0].message.content and plain.usage.completion_tokens == 8
    assert 0 < plain.usage.prompt_tokens < 30  # only the question turn is prefilled
    assert plain.model_extra["livevlm"]["frames_covered"] == 64
    # what the answer read: per layer, long-term pages with their frame ranges inside the 64 frames
    read = plain.model_extra["livevlm"]["retrieval"]["pages"]
    assert read and all(pages for pages in read.values()), read
    for pages in read.values():
        assert len({p["page"] for p in pages}) == len(pages)
        assert all(0 <= p["frames"][0] <= p["frames"][1] < 64 for p in pages), pages
    chunks = list(_ask(client, tiny_model_dir, stream_id, owner, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    final = [c.model_extra["livevlm"] for c in chunks if "livevlm" in (c.model_extra or {})]
    assert len(final) == 1 and final[0]["retrieval"]["pages"] == read  # the same memory reads the same
    assert chunks[-1].usage.completion_tokens == 8
    header = client.chat.completions.create(
        model=tiny_model_dir, messages=[{"role": "user", "content": QUESTION}], max_tokens=8, temperature=0.0,
        extra_headers={"X-Session-ID": stream_id, **owner}, extra_body={"ignore_eos": True})
    assert header.choices[0].message.content == plain.choices[0].message.content

    stats = requests.get(f"{server}/v1/video/streams/{stream_id}", headers=owner).json()["stats"]
    assert (stats["frames"], stats["clips"], stats["pending_frames"]) == (64, 16, 0)
    assert stats["long_term_tokens"] <= 1024 and stats["retrievals"] == 3
    assert stream_id in [s["id"] for s in requests.get(f"{server}/v1/video/streams", headers=owner).json()["data"]]
    paths = requests.get(f"{server}/openapi.json").json()["paths"]
    assert {"/v1/video/streams", "/v1/video/streams/{stream_id}", "/v1/video/streams/{stream_id}/frames"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/video/streams/{stream_id}/frames"]["post"]["requestBody"]["content"]
    deleted = requests.delete(f"{server}/v1/video/streams/{stream_id}", headers=owner)
    assert deleted.status_code == 200 and deleted.json()["bytes_freed"] == stats["bytes"]
    assert requests.get(f"{server}/v1/video/streams/{stream_id}", headers=owner).status_code == 404
    gone = requests.post(f"{server}/v1/chat/completions", headers={"X-Session-ID": stream_id, **owner},
                         json={"model": tiny_model_dir, "messages": [{"role": "user", "content": QUESTION}]})
    assert gone.status_code == 404 and stream_id in gone.json()["error"]["message"]


def test_chat_without_a_stream_is_stock_vllm_without_media(server, client, tiny_model_dir):
    response = client.chat.completions.create(model=tiny_model_dir, max_tokens=4, temperature=0.0,
                                              messages=[{"role": "user", "content": QUESTION}])
    assert response.usage.completion_tokens == 4 and "livevlm" not in (response.model_extra or {})
    # vLLM would decode (or fetch) media itself, outside the upload checks: video goes through a stream
    frames = _frames(3, 4)
    url = "data:video/jpeg;base64," + ",".join(base64.b64encode(_jpeg(f)).decode() for f in frames)
    r = requests.post(f"{server}/v1/chat/completions", json={
        "model": tiny_model_dir, "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "video_url", r.text


def test_http_answer_equals_offline_api(server, client, tiny_model_dir):
    from vllm import SamplingParams

    from vllm_livevlm import LiveVLM

    jpegs = [_jpeg(f) for f in _frames(7, 24)]
    stream_id, owner = _create(server)
    r = requests.post(f"{server}/v1/video/streams/{stream_id}/frames?wait=true", headers=owner,
                      files=[("frames", (f"{i}.jpg", j, "image/jpeg")) for i, j in enumerate(jpegs)])
    assert r.status_code == 200
    http = _ask(client, tiny_model_dir, stream_id, owner, max_tokens=16).choices[0].message.content
    requests.delete(f"{server}/v1/video/streams/{stream_id}", headers=owner)

    lv = LiveVLM(tiny_model_dir, CONFIG, dtype="float32", max_model_len=16384)
    try:
        stream = lv.open_stream()
        stream.append(np.stack([_decoded(j) for j in jpegs]))
        offline = stream.ask(QUESTION, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)).text
    finally:
        lv.shutdown()
    assert http == offline


def test_bad_input_gets_clear_4xx_and_the_server_keeps_serving(server, client, tiny_model_dir):
    good, owner = _create(server)
    frames_url = f"{server}/v1/video/streams/{good}/frames"

    def error(response, status, words):
        assert response.status_code == status, response.text
        body = response.json()["error"]
        assert words in body["message"] and body["code"] == status

    error(requests.get(f"{server}/v1/video/streams/nope"), 404, "no video stream with id 'nope'")
    error(requests.post(f"{server}/v1/video/streams/nope/frames", json={"frames": []}), 404, "nope")
    error(requests.post(frames_url, headers=owner, files=[("frames", ("x.jpg", b"\xff\xd8garbage", "image/jpeg"))]),
          400, "has no readable size in its header")
    error(requests.post(frames_url, data=b"not a video", headers={"Content-Type": "video/mp4", **owner}),
          415, "not an mp4/mov or webm/mkv file")
    error(requests.post(frames_url, data=b"hello", headers={"Content-Type": "text/plain", **owner}), 415,
          "unsupported content type")
    error(requests.post(frames_url, headers=owner, files=[("frames", ("a.jpg", _jpeg(_frames(1, 1, 32)[0]), "image/jpeg")),
                                           ("frames", ("b.jpg", _jpeg(_frames(1, 1, 40)[0]), "image/jpeg"))]),
          422, "share one size")
    error(requests.post(frames_url, headers=owner, json={"frames": [base64.b64encode(_jpeg(f)).decode() for f in _frames(2, 33)]}),
          413, "more than 32 frames")
    error(requests.post(frames_url, headers=owner, json={"frames": ["%%%"]}), 400, "not valid base64")
    error(requests.post(f"{server}/v1/chat/completions", headers={"X-Session-ID": good, **owner},
                        json={"model": tiny_model_dir, "messages": []}), 400, "at least one user message")
    error(requests.post(f"{server}/v1/chat/completions", headers={"X-Session-ID": good, **owner},
                        json={"model": tiny_model_dir}), 400, "messages")
    error(requests.post(f"{server}/v1/video/streams", json={"config": {"clip_frames": 400}}), 400, "clip_frames=400")
    error(requests.post(f"{server}/v1/video/streams", json={"config": {"page_tokens": 0}}), 400, "page_tokens")
    error(requests.post(f"{server}/v1/video/streams", json={"config": {"bogus": 1}}), 400, "unknown LiveVLM")
    # frames of another size than the stream's first frames
    assert requests.post(frames_url, headers=owner, json={"frames": [base64.b64encode(_jpeg(_frames(4, 1)[0])).decode()]}).ok
    error(requests.post(frames_url, headers=owner, json={"frames": [base64.b64encode(_jpeg(_frames(4, 1, 64)[0])).decode()]}),
          422, "frames of this stream are [48, 48, 3]")
    # still serving
    r = requests.post(f"{frames_url}?wait=true", headers=owner, files=[("frames", (f"{i}.jpg", _jpeg(f), "image/jpeg"))
                                                       for i, f in enumerate(_frames(5, 3))])
    assert r.status_code == 200 and r.json()["clips_encoded"] == 1
    assert _ask(client, tiny_model_dir, good, owner).usage.completion_tokens == 8
    assert requests.delete(f"{server}/v1/video/streams/{good}", headers=owner).status_code == 200


def test_websocket_frames_and_questions(server, tiny_model_dir):
    import asyncio

    import websockets

    stream_id, owner = _create(server)

    async def session():
        # A browser's credentials: subprotocols (its WebSocket cannot set headers); the server selects `livevlm`.
        async with websockets.connect(f"{server.replace('http', 'ws')}/v1/video/streams/{stream_id}/ws",
                                      subprotocols=["livevlm", f"livevlm.token.{owner['X-Stream-Token']}"]) as ws:
            assert ws.subprotocol == "livevlm"
            for frame in _frames(9, 5):
                await ws.send(_jpeg(frame))
                assert json.loads(await ws.recv())["type"] == "frames.accepted"
            # Questions do not wait for clips being encoded; let the first clip finish so the answer
            # covers all 5 frames (the 5th is flushed as a short clip).
            while requests.get(f"{server}/v1/video/streams/{stream_id}", headers=owner).json()["stats"]["frames_encoded"] < 4:
                await asyncio.sleep(0.1)
            await ws.send(json.dumps({"type": "question", "question": QUESTION, "max_tokens": 6}))
            deltas, done = [], None
            while done is None:
                message = json.loads(await ws.recv())
                if message["type"] == "answer.delta":
                    deltas.append(message["delta"])
                else:
                    done = message
            return deltas, done

    deltas, done = asyncio.run(session())
    assert done["type"] == "answer.done" and "".join(deltas) == done["text"] and done["frames_covered"] == 5
    assert requests.delete(f"{server}/v1/video/streams/{stream_id}", headers=owner).status_code == 200
