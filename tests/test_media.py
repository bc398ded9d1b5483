"""Uploads are checked before they cost memory: image sizes from the header, video sizes and frame counts
from the container, only JPEG/PNG images and mp4/mov/webm/mkv videos, frames shrunk to what the model's
processor consumes, decoding on a bounded pool. No engine: fast."""

from __future__ import annotations

import asyncio
import struct
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from vllm_livevlm.serving import media
from vllm_livevlm.serving.errors import APIError
from vllm_livevlm.serving.media import FrameDecoder, Upload
from vllm_livevlm.serving.service import ServerLimits

EIGHT_K_VIDEO = Path(__file__).parent / "data" / "black-8k-40f.mp4"  # 40 black 7680x4320 frames, VP9


def png_claiming(width: int, height: int, payload: int = 3 * 2**20) -> bytes:
    """A PNG whose header claims `width`x`height` RGB pixels, with `payload` bytes of (never decoded) data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", bytes(payload)) + chunk(b"IEND", b"")


def encoded(frame: np.ndarray, ext: str, *params: int) -> bytes:
    ok, data = cv2.imencode(ext, frame, list(params))
    assert ok
    return data.tobytes()


def image(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def video_file(path: Path, frames: int, width: int = 64, height: int = 64) -> bytes:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (width, height))
    for i in range(frames):
        writer.write(np.full((height, width, 3), i * 5 % 256, np.uint8))
    writer.release()
    return path.read_bytes()


@pytest.fixture(scope="module")
def decoder():
    return FrameDecoder(ServerLimits(max_frames_per_request=32), processor_side=384)


def refusal(call, *args) -> APIError:
    with pytest.raises(APIError) as info:
        call(*args)
    return info.value


# ---- headers -------------------------------------------------------------------------------------------------
def test_png_size_from_ihdr():
    assert media.image_dimensions(encoded(image(50, 30), ".png"), "f") == (50, 30)
    bomb = png_claiming(30000, 30000)
    start = time.perf_counter()
    for _ in range(1000):
        assert media.image_dimensions(bomb, "f") == (30000, 30000)
    assert (time.perf_counter() - start) / 1000 < 1e-4  # microseconds: the 3 MiB body is never touched


def test_jpeg_size_from_sof_baseline_progressive_and_after_app_segments():
    frame = image(50, 30)
    baseline = encoded(frame, ".jpg")
    progressive = encoded(frame, ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1)
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 60000) + bytes(60000)  # a large EXIF-like segment before SOF
    padded = baseline[:2] + app1 * 3 + baseline[2:]
    for data in (baseline, progressive, padded):
        assert media.image_dimensions(data, "f") == (50, 30)
    assert cv2.imdecode(np.frombuffer(padded, np.uint8), cv2.IMREAD_COLOR).shape == (30, 50, 3)


@pytest.mark.parametrize("kind", ["bmp", "gif", "tiff", "webp", "text", "empty"])
def test_only_jpeg_and_png_images(kind):
    data = {"bmp": lambda: encoded(image(8, 8), ".bmp"), "gif": lambda: b"GIF89a\x08\x00\x08\x00" + bytes(32),
            "tiff": lambda: encoded(image(8, 8), ".tiff"), "webp": lambda: encoded(image(8, 8), ".webp"),
            "text": lambda: b"hello world", "empty": lambda: b""}[kind]()
    error = refusal(media.image_dimensions, data, "file 'x'")
    assert error.status == 415
    assert error.message == "file 'x' is not a JPEG or PNG image (only those two are accepted)"


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n" + bytes(16), b"\xff\xd8\xff",
                                  b"\xff\xd8\xff\xe0\x00\x10" + bytes(14) + b"\xff\xda\x00\x02",
                                  b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x00\x00\x10" + bytes(12)])
def test_truncated_or_sizeless_headers(data):
    error = refusal(media.image_dimensions, data, "f")
    assert error.status == 400 and "no readable size" in error.message


# ---- limits before decoding ----------------------------------------------------------------------------------
def test_png_claiming_30000_pixels_refused_before_decoding(decoder):
    bomb = png_claiming(30000, 30000)
    start = time.perf_counter()
    error = refusal(decoder.decode_now, [Upload(bomb, "file 'bomb.png'", video=False)])
    assert time.perf_counter() - start < 0.01
    assert error.status == 413
    assert error.message == "file 'bomb.png' is 30000x30000 pixels: over max_frame_side (4096 pixels on a side)"


def test_pixel_limit():
    limits = ServerLimits(max_frame_side=8192, max_frame_pixels=4096 * 2160)
    error = refusal(FrameDecoder(limits, 384).decode_now, [Upload(png_claiming(4096, 2161, 16), "f", False)])
    assert error.status == 413
    assert error.message == f"f is 4096x2161 pixels: over max_frame_pixels ({4096 * 2160} pixels)"


def test_every_header_checked_before_any_image_is_decoded(decoder, monkeypatch):
    decodes = []
    real = cv2.imdecode
    monkeypatch.setattr(media.cv2, "imdecode", lambda *a: decodes.append(1) or real(*a))
    good = encoded(image(48, 48), ".png")
    uploads = [Upload(good, f"file {i}", False) for i in range(19)]
    uploads.append(Upload(png_claiming(30000, 30000), "last", False))
    assert refusal(decoder.decode_now, uploads).status == 413
    assert decodes == []
    assert decoder.decode_now(uploads[:19]).frames.shape == (19, 48, 48, 3)
    assert len(decodes) == 19


def test_image_count_refused_before_decoding(decoder):
    uploads = [Upload(png_claiming(30000, 30000, payload=16), f"f{i}", False) for i in range(33)]
    error = refusal(decoder.decode_now, uploads)
    assert error.status == 413 and error.message == "more than 32 frames in one request (the per-request limit)"


# ---- frames shrunk to what the processor consumes -------------------------------------------------------------
@pytest.mark.parametrize("width,height", [(48, 48), (384, 384), (500, 384), (384, 700), (200, 100)])
def test_frames_at_or_below_the_processor_size_are_unchanged(decoder, width, height):
    frame = image(width, height, seed=3)
    decoded = decoder.decode_now([Upload(encoded(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), ".png"), "f", False)]).frames
    assert np.array_equal(decoded[0], frame)  # bit-identical: the model sees exactly what was sent


@pytest.mark.parametrize("width,height,expected", [(1000, 800, (384, 480)), (1920, 1080, (384, 683)),
                                                   (800, 1000, (480, 384)), (4096, 385, (384, 4085))])
def test_larger_frames_shrunk_to_the_processor_size_keeping_aspect(decoder, width, height, expected):
    frame = np.zeros((height, width, 3), np.uint8)
    frame[: height // 2] = (255, 0, 0)  # top half red (RGB)
    decoded = decoder.decode_now([Upload(encoded(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), ".png"), "f", False)]).frames
    assert decoded.shape == (1, *expected, 3)
    assert decoded[0, 0, 0].tolist() == [255, 0, 0] and decoded[0, -1, -1].tolist() == [0, 0, 0]


def test_jpeg_decoded_as_rgb(decoder):
    frame = np.zeros((40, 40, 3), np.uint8)
    frame[..., 0] = 200  # red in RGB
    decoded = decoder.decode_now([Upload(encoded(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), ".jpg"), "f", False)]).frames
    assert decoded.shape == (1, 40, 40, 3) and abs(int(decoded[0, 20, 20, 0]) - 200) <= 3


# ---- videos --------------------------------------------------------------------------------------------------
def test_video_decoded(decoder, tmp_path):
    decoded = decoder.decode_now([Upload(video_file(tmp_path / "v.mp4", 10), "video", True)]).frames
    assert decoded.shape == (10, 64, 64, 3)


def test_video_frame_count_from_the_container(decoder, tmp_path, monkeypatch):
    data = video_file(tmp_path / "v.mp4", 40)
    reads = []
    real = cv2.VideoCapture.read
    monkeypatch.setattr(cv2.VideoCapture, "read", lambda self, *a: reads.append(1) or real(self, *a))
    error = refusal(decoder.decode_now, [Upload(data, "video", True)])
    assert error.status == 413 and error.message == "video has 40 frames: over max_frames_per_request (32)"
    assert reads == []


def test_video_frames_count_against_the_images_of_the_same_request(decoder, tmp_path):
    uploads = [Upload(encoded(image(64, 64), ".png"), f"f{i}", False) for i in range(30)]
    uploads.append(Upload(video_file(tmp_path / "v.mp4", 3), "video", True))
    error = refusal(decoder.decode_now, uploads)
    assert error.status == 413 and error.message == "video has 3 frames: over max_frames_per_request (32)"


def test_8k_video_refused_before_decoding(decoder):
    data = EIGHT_K_VIDEO.read_bytes()
    assert len(data) < 64 * 1024
    start = time.perf_counter()
    error = refusal(decoder.decode_now, [Upload(data, "video", True)])
    assert time.perf_counter() - start < 1.0
    assert error.status == 413
    assert error.message == "video is 7680x4320 pixels: over max_frame_side (4096 pixels on a side)"


@pytest.mark.parametrize("data", [b"#EXTM3U\n#EXT-X-VERSION:3\n#EXTINF:1,\nfile:///etc/passwd\n",
                                  b"ffconcat version 1.0\nfile /etc/passwd\n", bytes(64), b""])
def test_only_mp4_and_webm_containers(decoder, data):
    """FFmpeg would open playlists and concat scripts that name other files or URLs."""
    error = refusal(decoder.decode_now, [Upload(data, "video", True)])
    assert error.status == 415
    assert error.message == "video is not an mp4/mov or webm/mkv file (only those containers are accepted)"


def test_mixed_sizes_refused(decoder):
    uploads = [Upload(encoded(image(48, 48), ".png"), "a", False), Upload(encoded(image(64, 48), ".png"), "b", False)]
    error = refusal(decoder.decode_now, uploads)
    assert error.status == 422
    assert error.message == "frames of one request must share one size, got [(48, 48), (48, 64)]"


# ---- the pool ------------------------------------------------------------------------------------------------
def test_pool_is_bounded():
    """decode_workers run, max_decode_queue wait, the next request is refused with 429 (never queued)."""
    decoder = FrameDecoder(ServerLimits(decode_workers=1, max_decode_queue=1), 384)
    release = threading.Event()

    async def scenario() -> None:
        loop_thread = threading.get_ident()
        threads = []
        jobs = [asyncio.create_task(decoder.run(lambda: threads.append(threading.get_ident()) or release.wait(5)))
                for _ in range(2)]
        await asyncio.sleep(0.1)
        with pytest.raises(APIError) as info:
            await decoder.run(lambda: None)
        assert info.value.status == 429
        assert info.value.message == "2 uploads are being decoded or waiting (decode_workers 1 + max_decode_queue " \
                                     "1): retry shortly"
        release.set()
        assert await asyncio.gather(*jobs) == [True, True]
        assert loop_thread not in threads
        assert await decoder.run(lambda: 7) == 7  # capacity is given back

    asyncio.run(scenario())


def test_cancelled_waiter_gives_its_place_back():
    decoder = FrameDecoder(ServerLimits(decode_workers=1, max_decode_queue=1), 384)
    release = threading.Event()

    async def scenario() -> None:
        running = asyncio.create_task(decoder.run(release.wait, 5))
        waiting = asyncio.create_task(decoder.run(lambda: "never"))
        await asyncio.sleep(0.1)
        waiting.cancel()
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(decoder.run(lambda: "ran"))
        await asyncio.sleep(0.05)
        release.set()
        assert await running is True and await queued == "ran"

    asyncio.run(scenario())
