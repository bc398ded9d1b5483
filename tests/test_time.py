"""Time-aware streams (issue 22): frames sampled to the stream's `sample_fps` by their timestamps (given, a
video's container times, a websocket frame's arrival), a monotonic stream clock kept with every stored token's
frame (kept tokens, retrieval reports, `covered_until`), and LLaVA-Video's time instruction before a question.

Unit tests need no engine; the end-to-end ones share one server (class `TestServer`), then one in-process
engine (class `TestEngine`), never both at once."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import time

import cv2
import numpy as np
import pytest
import requests
from helpers import QUESTION, Server, greedy

from vllm_livevlm.clock import StreamClock, TimestampError
from vllm_livevlm.config import LiveVLMConfig, LiveVLMConfigError
from vllm_livevlm.serving.errors import APIError
from vllm_livevlm.serving.media import FrameDecoder, Upload
from vllm_livevlm.serving.service import ServerLimits
from vllm_livevlm.streams import LiveStream

FPS, SECONDS = 30, 10
HAND_PICKED = list(range(0, FPS * SECONDS, 15))  # 2 fps of a 30 fps video: frames 0, 15, ..., 285
TOKENS_PER_CLIP = 4 * 196 + 1  # clip_frames 4, 196 tokens per frame, one newline closing each clip


def thirty_fps_mp4(path) -> bytes:
    """10 s of 30 fps noise (every frame differs), mp4v."""
    frames = np.random.default_rng(22).integers(0, 256, size=(FPS * SECONDS, 48, 48, 3), dtype=np.uint8)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (48, 48))
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path.read_bytes()


def decoded_mp4(data: bytes, tmp_path) -> np.ndarray:
    """The mp4's frames as the server decodes them (the same FFmpeg), RGB."""
    (tmp_path / "local.mp4").write_bytes(data)
    capture, frames = cv2.VideoCapture(str(tmp_path / "local.mp4"), cv2.CAP_FFMPEG), []
    while (read := capture.read())[0]:
        frames.append(cv2.cvtColor(read[1], cv2.COLOR_BGR2RGB))
    capture.release()
    return np.stack(frames)


def png(frame: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))[1].tobytes()


# ---- the knobs --------------------------------------------------------------------------------------------------
def test_knobs_defaults_validation_json_and_cli():
    config = LiveVLMConfig()
    assert (config.sample_fps, config.time_prompt_frames) == (1.0, 0)
    assert LiveVLMConfig.from_json('{"sample_fps": null, "time_prompt_frames": 8}').sample_fps is None
    for bad in (0, -1, math.nan, math.inf, True, "2"):
        with pytest.raises(LiveVLMConfigError, match="sample_fps must be a positive number"):
            LiveVLMConfig(sample_fps=bad)
    with pytest.raises(LiveVLMConfigError, match="time_prompt_frames must be a non-negative integer"):
        LiveVLMConfig(time_prompt_frames=-1)
    parser = argparse.ArgumentParser()
    LiveVLMConfig.add_cli_args(parser)
    for flag, expected in (("null", None), ("2.5", 2.5)):
        args = parser.parse_args(["--livevlm-sample-fps", flag, "--livevlm-time-prompt-frames", "3"])
        assert (LiveVLMConfig.from_cli_args(args).sample_fps, LiveVLMConfig.from_cli_args(args).time_prompt_frames) \
            == (expected, 3)


# ---- sampling, without an engine --------------------------------------------------------------------------------
def test_thirty_fps_sampled_to_two_keeps_the_first_frame_of_each_half_second_however_it_is_pushed():
    times = [i / FPS for i in range(FPS * SECONDS)]
    whole = StreamClock(2).sample(len(times), times)
    assert np.flatnonzero(whole.keep).tolist() == HAND_PICKED and whole.sampled_out == 280
    clock, kept = StreamClock(2), []
    for start in range(0, len(times), 7):  # the same frames in pushes of 7
        part = clock.sample(len(times[start:start + 7]), times[start:start + 7])
        clock.advance(part)
        kept += (start + np.flatnonzero(part.keep)).tolist()
    assert kept == HAND_PICKED
    container = StreamClock(2).sample(len(times), offsets=[i * 33.333333333333336 / 1000 for i in range(300)])
    assert np.flatnonzero(container.keep).tolist() == HAND_PICKED  # ms as floats: on the grid within 1 us
    assert StreamClock(None).sample(len(times), times).keep.all()


def test_frames_without_times_are_at_the_streams_rate_and_a_video_follows_the_last_frame():
    clock = StreamClock(2)
    untimed = clock.sample(3)
    assert untimed.times.tolist() == [0.0, 0.5, 1.0] and untimed.keep.all()
    clock.advance(untimed)
    video = clock.sample(3, offsets=[0.0, 0.25, 0.5])  # one period after the last frame, then its own times
    assert video.times.tolist() == [1.5, 1.75, 2.0] and video.keep.tolist() == [True, False, True]
    assert StreamClock(None).sample(2).times.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("timestamps, message", [
    ([6.0, 8.0, 7.0], "frame 2 of this push goes back in time: its timestamp 7.0 s is before frame 1 of this push "
                      "(8.0 s); a stream's clock only moves forward"),
    ([4.0], "frame 0 of this push goes back in time: its timestamp 4.0 s is before the stream's last frame (5.0 s)"),
    ([6.0, math.nan], "timestamps[1] (frame 1 of this push) must be finite, got nan"),
    ([math.inf], "timestamps[0] (frame 0 of this push) must be finite, got inf"),
    ([6.0, True], "timestamps[1] (frame 1 of this push) must be a number of seconds, got True"),
    ([6.0, "7"], "timestamps[1] (frame 1 of this push) must be a number of seconds, got '7'"),
])
def test_bad_timestamps_name_the_frame_and_nothing_of_the_push_is_kept(timestamps, message):
    stream = LiveStream(None, "s", LiveVLMConfig(sample_fps=2), None)  # the frame path needs no engine
    frames = np.zeros((len(timestamps), 8, 8, 3), np.uint8)
    assert stream.accept(np.zeros((2, 8, 8, 3), np.uint8), [4.0, 5.0]) == (2, 0)
    before = (stream.frames_received, stream.pending_frames, stream.frames_sampled_out, stream.clock.last,
              stream.clock.last_slot)
    with pytest.raises(TimestampError) as error:
        stream.accept(frames, timestamps)
    assert str(error.value).startswith(message)
    assert (stream.frames_received, stream.pending_frames, stream.frames_sampled_out, stream.clock.last,
            stream.clock.last_slot) == before == (2, 2, 0, 5.0, 2)
    with pytest.raises(TimestampError, match="got 2 frames but 1 timestamps"):
        stream.accept(np.zeros((2, 8, 8, 3), np.uint8), [9.0])


def test_video_upload_carries_its_container_times(tmp_path):
    decoded = FrameDecoder(ServerLimits(max_frames_per_request=300), 384).decode_now(
        [Upload(thirty_fps_mp4(tmp_path / "v.mp4"), "video", True)])
    assert decoded.frames.shape == (300, 48, 48, 3)
    assert np.allclose(decoded.offsets, [i / FPS for i in range(300)], rtol=0, atol=1e-9)


def test_a_video_is_sampled_while_it_is_decoded(tmp_path):
    """A 30 fps upload to a 2 fps stream decodes 300 frames but holds and returns 20: `max_frames_per_request`
    counts kept frames, `max_video_frames` decoded ones; the decoder keeps exactly what the stream's
    sampling keeps, also when the stream already has frames (the grid is the stream's, not the video's)."""
    data = thirty_fps_mp4(tmp_path / "v.mp4")
    decoder = FrameDecoder(ServerLimits(max_frames_per_request=32), 384)
    with pytest.raises(APIError, match="over max_frames_per_request"):  # every frame kept: 300 > 32
        decoder.decode_now([Upload(data, "video", True)])
    clock = StreamClock(2)
    decoded = decoder.decode_now([Upload(data, "video", True)], clock.video_sampler())
    assert decoded.frames.shape == (20, 48, 48, 3)
    assert np.allclose(decoded.offsets, [0.5 * i for i in range(20)], rtol=0, atol=1e-9)
    assert (decoded.sampled_out, decoded.until) == (280, pytest.approx(299 / FPS, abs=1e-9))
    sampled = clock.sample(20, offsets=decoded.offsets, skipped=decoded.sampled_out, until=decoded.until)
    assert sampled.keep.all() and sampled.sampled_out == 280 and sampled.end == pytest.approx(299 / FPS)
    clock = StreamClock(2)
    clock.advance(clock.sample(3, [0.0, 0.3, 0.7]))  # slots 0 and 1 taken; the video starts at 1.2 s
    keep = clock.video_sampler()
    by_decoder = [i for i in range(300) if keep(i / FPS)]
    assert by_decoder == list(np.flatnonzero(clock.sample(300, offsets=[i / FPS for i in range(300)]).keep))
    assert len(by_decoder) == 21 and by_decoder[:3] == [0, 9, 24]  # 1.2 s opens slot 2, 1.5 s slot 3, 2.0 s slot 4
    with pytest.raises(APIError, match="over max_video_frames"):
        FrameDecoder(ServerLimits(max_video_frames=100), 384).decode_now([Upload(data, "video", True)],
                                                                         StreamClock(2).video_sampler())


def test_time_instruction_is_llava_videos_and_off_by_default():
    stream = LiveStream(None, "s", LiveVLMConfig(time_prompt_frames=4), None)
    stream.clock.encoded.extend([100 + 0.5 * i for i in range(20)])
    assert stream.time_instruction(20) == (
        "The video lasts for 9.50 seconds, and 4 frames are uniformly sampled from it. These frames are located "
        "at 0.00s,3.00s,6.50s,9.50s.Please answer the following questions related to this video.\n")
    assert stream.time_instruction(0) == ""
    assert LiveStream(None, "s", LiveVLMConfig(), None).time_instruction(20) == ""


# ---- end to end: one server --------------------------------------------------------------------------------------
SERVER_CONFIG = {"clip_frames": 4, "long_term_budget_tokens": 256, "page_tokens": 16, "short_term_frames": 1,
                 "sample_fps": 2}


@pytest.fixture(scope="class")
def server(tiny_model_dir, tmp_path_factory):
    process = Server(tiny_model_dir, tmp_path_factory.mktemp("time") / "server.log", SERVER_CONFIG).wait_ready()
    yield process.url
    process.stop()


def create(server: str) -> tuple[str, dict[str, str]]:
    body = requests.post(f"{server}/v1/video/streams", json={}).json()
    return body["id"], {"X-Stream-Token": body["token"]}


def ask(server: str, stream_id: str, owner: dict[str, str], model: str) -> dict:
    r = requests.post(f"{server}/v1/chat/completions", headers={"X-Session-ID": stream_id, **owner}, json={
        "model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "temperature": 0.0,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def stats(server: str, stream_id: str, owner: dict[str, str]) -> dict:
    return requests.get(f"{server}/v1/video/streams/{stream_id}", headers=owner).json()["stats"]


@pytest.mark.slow
class TestServer:
    def test_mp4_ingests_the_same_20_frames_as_pushing_them_by_hand(self, server, tiny_model_dir, tmp_path):
        data = thirty_fps_mp4(tmp_path / "v.mp4")
        uploaded, owner = create(server)
        r = requests.post(f"{server}/v1/video/streams/{uploaded}/frames?wait=true", data=data,
                          headers={"Content-Type": "video/mp4", **owner})
        assert r.status_code == 200, r.text
        assert r.json() == {"frames_accepted": 20, "frames_sampled_out": 280, "frames_dropped": 0, "clips_encoded": 5,
                            "frames_encoded": 20, "pending_frames": 0}
        frames = decoded_mp4(data, tmp_path)
        streams = {"uploaded": (uploaded, owner)}
        for name, first in (("by hand", 0), ("one frame later", 1)):  # the frames with their times, two pushes
            stream_id, owner_of = create(server)
            for part in (range(first, 150), range(150, 300)):
                r = requests.post(f"{server}/v1/video/streams/{stream_id}/frames?wait=true", headers=owner_of,
                                  files=[("frames", (f"{i}.png", png(frames[i]), "image/png")) for i in part]
                                  + [("timestamps", (None, json.dumps([i / FPS for i in part])))])
                assert r.status_code == 200, r.text
            streams[name] = (stream_id, owner_of)
        answers = {}
        for name, (stream_id, owner_of) in streams.items():
            s = stats(server, stream_id, owner_of)
            answer = ask(server, stream_id, owner_of, tiny_model_dir)
            answers[name] = (answer["choices"][0]["message"]["content"], answer["livevlm"]["retrieval"])
            requests.delete(f"{server}/v1/video/streams/{stream_id}", headers=owner_of)
            late = name == "one frame later"  # frames 1, 16, ..., 286
            assert (s["frames"], s["frames_received"], s["frames_sampled_out"]) == (20, 300 - late, 280 - late)
            assert s["covered_until"] == pytest.approx((286 if late else 285) / FPS, abs=1e-9), name
        assert answers["by hand"] == answers["uploaded"]
        assert answers["one frame later"][0] != answers["uploaded"][0]  # the comparison sees which frames

    def test_websocket_camera_sampled_by_arrival_time_within_one_frame(self, server, tmp_path):
        import websockets

        frames = decoded_mp4(thirty_fps_mp4(tmp_path / "v.mp4"), tmp_path)
        stream_id, owner = create(server)
        url = f"{server.replace('http', 'ws', 1)}/v1/video/streams/{stream_id}/ws"

        async def camera() -> tuple[list[dict], list[float]]:
            async with websockets.connect(url, additional_headers=owner) as ws:
                acks: list[dict] = []
                sent: list[float] = []

                async def read() -> None:
                    while len(acks) < len(frames):
                        acks.append(json.loads(await ws.recv()))

                reader = asyncio.create_task(read())
                start = time.monotonic()
                for i, frame in enumerate(frames):  # a 30 fps camera: frame i at i / 30 s
                    await asyncio.sleep(max(0.0, start + i / FPS - time.monotonic()))
                    sent.append(time.monotonic())
                    await ws.send(png(frame))
                await reader
                return acks, sent

        wall = time.time() - time.monotonic()  # the camera's monotonic clock on the server's (same machine)
        acks, sent = asyncio.run(camera())
        assert all(a["type"] == "frames.accepted" for a in acks), acks[:3]
        kept = [i for i, a in enumerate(acks) if a["frames_sampled_out"] == 0]
        stamps = [a["timestamp"] for a in acks]
        # Each frame is stamped when it reached the server: after it was sent (and not seconds later)...
        assert all(wall + s - 0.01 <= t <= wall + s + 5 for s, t in zip(sent, stamps)), (sent[:3], stamps[:3])
        # ... and the frames kept are exactly those its stamps pick at 2 fps.
        assert kept == np.flatnonzero(StreamClock(2).sample(len(stamps), stamps).keep).tolist()
        # Against the camera's own timing: if every frame arrives within `jitter` of it (its offset from frame 0)
        # and the camera sends a frame at least every `gap`, the frame kept for a period was sent within
        # jitter + gap of the one the send times pick; for a punctual camera and delivery (gap 1/30 s, jitter
        # under 1/30 s) that is the same frame or its neighbour: within one frame of HAND_PICKED. A period
        # boundary near the last frame may gain or lose the last pick.
        jitter = max(abs((t - stamps[0]) - (s - sent[0])) for s, t in zip(sent, stamps))
        gap = max(np.diff(sent))
        sent_picks = np.flatnonzero(StreamClock(2).sample(len(sent), sent).keep).tolist()
        assert abs(len(kept) - len(sent_picks)) <= 1, f"kept {kept}, the camera's picks {sent_picks}"
        assert all(abs(sent[k] - sent[p]) <= jitter + gap + 1e-6 for k, p in zip(kept, sent_picks)), \
            f"kept {kept}, the camera's picks {sent_picks}, jitter {jitter}, gap {gap}"
        print(f"websocket: arrival jitter {1000 * jitter:.0f} ms, send gap {1000 * gap:.0f} ms; kept {kept}; "
              f"the camera's picks {sent_picks}")
        s = stats(server, stream_id, owner)
        assert (s["frames_received"], s["frames_sampled_out"]) == (300, 300 - len(kept))
        requests.delete(f"{server}/v1/video/streams/{stream_id}", headers=owner)

    def test_timestamps_going_back_or_not_finite_refused_naming_the_frame(self, server):
        stream_id, owner = create(server)
        url = f"{server}/v1/video/streams/{stream_id}/frames"
        image = base64.b64encode(png(np.zeros((48, 48, 3), np.uint8))).decode()

        def push(timestamps: str, count: int) -> requests.Response:  # raw JSON: NaN and Infinity are literals
            body = f'{{"frames": {json.dumps([image] * count)}, "timestamps": {timestamps}}}'
            return requests.post(url, data=body, headers={"Content-Type": "application/json", **owner})

        assert push("[10.0, 10.5]", 2).json()["frames_accepted"] == 2
        refusals = [
            (push("[11.0, 12.0, 11.5]", 3), "frame 2 of this push goes back in time: its timestamp 11.5 s is before "
                                            "frame 1 of this push (12.0 s)"),
            (push("[10.2]", 1), "frame 0 of this push goes back in time: its timestamp 10.2 s is before the "
                                "stream's last frame (10.5 s)"),
            (push("[11.0, NaN]", 2), "timestamps[1] (frame 1 of this push) must be finite, got nan"),
            (push("[Infinity]", 1), "timestamps[0] (frame 0 of this push) must be finite, got inf"),
            (requests.post(url, headers=owner, files=[("frames", ("a.png", png(np.zeros((48, 48, 3), np.uint8)))),
                                                      ("timestamps", (None, "[-Infinity]"))]),
             "timestamps[0] (frame 0 of this push) must be finite, got -inf"),
        ]
        for response, message in refusals:
            assert response.status_code == 400 and response.json()["error"]["message"].startswith(message), \
                response.text
            assert response.json()["error"]["param"] == "timestamps"
        s = stats(server, stream_id, owner)
        assert (s["frames_received"], s["pending_frames"] + s["frames_encoded"], s["frames_sampled_out"]) == (2, 2, 0)
        assert push("[11.0]", 1).json()["frames_accepted"] == 1  # the stream is fine
        requests.delete(url.removesuffix("/frames"), headers=owner)


# ---- end to end: one engine (kept tokens are a Python API view) -------------------------------------------------
ENGINE_CONFIG = {"clip_frames": 4, "long_term_budget_tokens": 64, "page_tokens": 16, "short_term_frames": 1,
                 "retrieve_ratio": 0.5, "sample_fps": 2}
LOSSLESS = {"long_term_budget_tokens": None, "retrieve_ratio": 1.0, "encode_context": "all"}


@pytest.fixture(scope="class")
def lv(tiny_model_dir):
    from vllm_livevlm import LiveVLM

    # Up to 8 videos per prompt: the same engine answers the vanilla (stream-less, stock vLLM) prompts.
    engine = LiveVLM(tiny_model_dir, ENGINE_CONFIG, dtype="float32", max_model_len=16384,
                     limit_mm_per_prompt={"video": 8})
    yield engine
    engine.shutdown()


def noise(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 48, 48, 3), dtype=np.uint8)


def frame_of(token: int) -> int:
    """The stream frame a clip token belongs to (4 frames of 196 tokens per clip; its newline: the last frame)."""
    return token // TOKENS_PER_CLIP * 4 + min(token % TOKENS_PER_CLIP // 196, 3)


@pytest.mark.slow
class TestEngine:
    def test_retrieved_time_ranges_hold_the_frames_of_the_kept_tokens(self, lv):
        from vllm_livevlm.serving.routes import _retrieval_report

        stream = lv.open_stream()
        frames, times = noise(1, 40), [100 + 0.25 * i for i in range(40)]  # 4 fps: every other frame kept
        for start, stop in ((0, 9), (9, 10), (10, 40)):
            stream.append(frames[start:stop], timestamps=times[start:stop])
        answer = stream.ask(QUESTION, greedy(4))
        kept, s = stream.kept_tokens(), stream.stats()
        stream.close()
        assert (s["frames"], s["frames_sampled_out"], s["covered_until"]) == (20, 20, 109.5)
        assert s["tokens_seen"] > s["long_term_tokens"] + s["short_term_tokens"]  # compressed
        time_of = [100 + 0.5 * f for f in range(20)]  # kept frame f is pushed frame 2f
        assert kept["long_term_seconds"] == [[[time_of[frame_of(t)] for t in head] for head in layer]
                                             for layer in kept["long_term"]]
        assert kept["short_term_seconds"] == [time_of[frame_of(t)] for t in kept["short_term"]]
        report = _retrieval_report(answer)
        assert report["covered_until"] == 109.5 and report["pages"]
        for layer, pages in report["pages"].items():
            assert pages
            for page in pages:
                first = 16 * page["page"]
                tokens = [t for head in kept["long_term"][int(layer)] for t in head[first:first + 16]]
                seconds = [time_of[frame_of(t)] for t in tokens]
                assert page["seconds"] == [min(seconds), max(seconds)]  # the range holds every token's frame
                assert page["frames"] == [min(map(frame_of, tokens)), max(map(frame_of, tokens))]

    def test_time_instruction_changes_the_prompt_as_documented_and_stays_lossless(self, lv):
        tok = lv.tokenizer
        frames, times = noise(2, 24), [0.25 * i for i in range(24)]
        kept = frames[::2]  # 12 frames: 3 clips
        line = ("The video lasts for 5.50 seconds, and 3 frames are uniformly sampled from it. These frames are "
                "located at 0.00s,3.00s,5.50s.Please answer the following questions related to this video.\n")
        turn = f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
        answers = {}
        for listed in (0, 3):
            stream = lv.open_stream({**LOSSLESS, "time_prompt_frames": listed})
            stream.append(frames, timestamps=times)
            answers[listed] = stream.ask(QUESTION, greedy(16))
            stream.close()
        assert answers[0].prompt_tokens_computed == len(tok.encode(turn, add_special_tokens=False))
        assert answers[3].prompt_tokens_computed == len(tok.encode(line + turn, add_special_tokens=False))
        sink = tok.encode("<|im_start|>user\n", add_special_tokens=False)
        prompt = {"prompt_token_ids": sink + [tok.convert_tokens_to_ids("<video>")] * 3
                  + tok.encode(line + turn, add_special_tokens=False),
                  "multi_modal_data": {"video": [kept[i:i + 4] for i in range(0, 12, 4)]}}

        async def vanilla() -> list[int]:
            async for out in lv.engine.generate(prompt, greedy(16), request_id="vanilla-time"):
                final = out
            return list(final.outputs[0].token_ids)

        assert answers[3].token_ids == lv._run(vanilla())  # lossless: vanilla vLLM with the same layout
        assert answers[3].token_ids != answers[0].token_ids  # the line reaches the model
