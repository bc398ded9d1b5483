"""Decode what clients upload as frames (JPEG/PNG images, bytes or base64, and short mp4/webm videos), checking
what each costs before it is decoded: image sizes from the header, video sizes and frame counts from the
container, then every decoded frame again. Frames are shrunk on arrival to what the model's processor
consumes, so a stream's memory is set by the model and not by the client's camera. Decoding runs on a
bounded worker pool, off the event loop that serves every client."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import cv2
import numpy as np

from vllm_livevlm.model.adapter import shorter_side_at
from vllm_livevlm.serving.errors import APIError

if TYPE_CHECKING:
    from vllm_livevlm.serving.service import ServerLimits

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8"  # start of image
EBML_MAGIC = b"\x1a\x45\xdf\xa3"  # webm / mkv
# The box types an ISO-BMFF file (mp4 / mov) starts with. Only these containers are handed to FFmpeg, which
# would otherwise also open playlists and concat scripts that name other files or URLs.
BMFF_FIRST_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide")
# JPEG start-of-frame markers (they carry the frame size); C4, C8 and CC share the range but are not frames.
JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
T = TypeVar("T")


@dataclass(frozen=True)
class Upload:
    """One uploaded file or base64 item, not decoded yet."""

    data: bytes
    name: str     # how errors name it: "file 'a.png'", "frames[3]", "video"
    video: bool


class VideoSpan(NamedTuple):
    """The frames decoded from one video (kept or sampled out) and the time of its last one (seconds)."""

    count: int
    last: float


class Decoded(NamedTuple):
    """A request's frames and, when the request is one video, each frame's container time in seconds from the
    video's first frame (the presentation times FFmpeg reports); None otherwise."""

    frames: np.ndarray  # [T, H, W, 3] RGB uint8
    offsets: list[float] | None
    sampled_out: int = 0         # frames of the video skipped by the stream's sampler while decoding
    until: float | None = None   # offset of the video's last frame (kept or skipped)


def image_dimensions(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from a JPEG or PNG header, without decoding: 415 for any other format, 400 when the
    header is cut short or states no size."""
    if data.startswith(PNG_MAGIC):
        size = _png_size(data)
    elif data.startswith(JPEG_MAGIC):
        size = _jpeg_size(data)
    else:
        raise APIError(415, f"{name} is not a JPEG or PNG image (only those two are accepted)", "frames")
    if size is None or 0 in size:
        raise APIError(400, f"{name} has no readable size in its header (truncated or not a valid image)", "frames")
    return size


def _png_size(data: bytes) -> tuple[int, int] | None:
    """The IHDR chunk, always first: length, b"IHDR", width, height (big-endian)."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Walk the marker segments up to the first start-of-frame; its payload is precision, height, width."""
    i, n = 2, len(data)
    while i + 1 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        i += 2
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers: no length
            continue
        if marker in (0xD9, 0xDA) or i + 2 > n:  # end of image or scan data before any frame size
            return None
        if marker in JPEG_SOF:
            if i + 7 > n:
                return None
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 3:i + 5], "big")
        length = int.from_bytes(data[i:i + 2], "big")
        if length < 2:
            return None
        i += length
    return None


def decode_base64(text: str, name: str) -> bytes:
    if not isinstance(text, str):
        raise APIError(400, f"{name} must be a base64 string", "frames")
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{name} is not valid base64", "frames") from None


def is_video(content_type: str | None, filename: str | None) -> bool:
    content_type = (content_type or "").split(";")[0].strip().lower()
    if content_type.startswith("video/"):
        return True
    return bool(filename) and os.path.splitext(filename)[1].lower() in VIDEO_SUFFIXES


class FrameDecoder:
    """Uploads ⇒ one `[T, H, W, 3]` RGB uint8 array, within the server's limits, on `decode_workers` threads.

    At most `decode_workers + max_decode_queue` requests are decoding or waiting at once; the next one is
    refused with 429, so a flood costs neither unbounded memory nor unbounded queued work."""

    def __init__(self, limits: ServerLimits, processor_side: int,
                 frame_size: Callable[[int, int], tuple[int, int]] | None = None):
        self.limits = limits
        self.processor_side = processor_side  # the model's vision input (SigLIP `image_size`)
        # (height, width) -> the size a frame is kept at (`ModelAdapter.frame_size`); default: the shorter
        # side at `processor_side`, as LLaVA-OneVision's processor sees it.
        self.frame_size = frame_size or functools.partial(shorter_side_at, processor_side)
        self.capacity = limits.decode_workers + limits.max_decode_queue
        self._pool = ThreadPoolExecutor(limits.decode_workers, thread_name_prefix="livevlm-decode")
        self._admitted = 0

    async def decode(self, uploads: list[Upload], keep: Callable[[float], bool] | None = None) -> Decoded:
        return await self.run(self.decode_now, uploads, keep)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the pool; 429 when it is full. A cancelled caller's job is dropped if it has not
        started, and its place is given back only once the job is over (running jobs cannot be stopped)."""
        if self._admitted >= self.capacity:
            raise APIError(429, f"{self._admitted} uploads are being decoded or waiting (decode_workers "
                                f"{self.limits.decode_workers} + max_decode_queue {self.limits.max_decode_queue}): "
                                "retry shortly", "frames")
        loop = asyncio.get_running_loop()
        job = self._pool.submit(fn, *args)
        self._admitted += 1
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        return await asyncio.wrap_future(job)

    def _release(self) -> None:
        self._admitted -= 1

    def decode_now(self, uploads: list[Upload], keep: Callable[[float], bool] | None = None) -> Decoded:
        """Every image header is checked before anything is decoded; videos are checked from their container
        and frame by frame; the frames of one request must share one size (after shrinking). `keep` samples a
        request that is one video (`video`); it is ignored otherwise."""
        max_frames = self.limits.max_frames_per_request
        if sum(not u.video for u in uploads) > max_frames:
            raise APIError(413, f"more than {max_frames} frames in one request (the per-request limit)", "frames")
        for upload in uploads:
            if not upload.video:
                self.check_size(*image_dimensions(upload.data, upload.name), upload.name)
        frames: list[np.ndarray] = []
        images_left = sum(not u.video for u in uploads)
        for upload in uploads:
            if upload.video:
                video, times, decoded = self.video(upload.data, upload.name, max_frames - len(frames) - images_left,
                                                   keep if len(uploads) == 1 else None)
                frames += video
                if len(uploads) == 1:
                    return Decoded(np.stack(frames), [t - times[0] for t in times], decoded.count - len(video),
                                   decoded.last - times[0])
            else:
                frames.append(self.image(upload.data, upload.name))
                images_left -= 1
        if not frames:
            raise APIError(400, "the request carries no frames", "frames")
        shapes = sorted({f.shape[:2] for f in frames})
        if len(shapes) > 1:
            raise APIError(422, f"frames of one request must share one size, got {shapes}", "frames")
        return Decoded(np.stack(frames), None)

    def check_size(self, width: int, height: int, name: str) -> None:
        limits = self.limits
        if max(width, height) > limits.max_frame_side:
            raise APIError(413, f"{name} is {width}x{height} pixels: over max_frame_side ({limits.max_frame_side} "
                                "pixels on a side)", "frames")
        if width * height > limits.max_frame_pixels:
            raise APIError(413, f"{name} is {width}x{height} pixels: over max_frame_pixels "
                                f"({limits.max_frame_pixels} pixels)", "frames")

    def image(self, data: bytes, name: str) -> np.ndarray:
        """A JPEG/PNG ⇒ [H, W, 3] RGB, its header size checked first."""
        self.check_size(*image_dimensions(data, name), name)
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise APIError(400, f"{name} is not a decodable JPEG or PNG image", "frames")
        self.check_size(image.shape[1], image.shape[0], name)  # EXIF orientation may swap the sides
        return cv2.cvtColor(self.shrink(image), cv2.COLOR_BGR2RGB)

    def video(self, data: bytes, name: str, max_frames: int,
              keep: Callable[[float], bool] | None = None) -> tuple[list[np.ndarray], list[float], VideoSpan]:
        """An mp4/mov/webm/mkv file ⇒ at most `max_frames` RGB frames and their presentation times (seconds).
        Its size and frame count are read from the container before any frame is decoded, and every frame is
        checked again (containers can lie). With `keep` (the stream's sampler, by seconds from the video's first
        frame) a frame sampled out is skipped before it is converted or held: `max_frames` counts kept frames,
        `max_video_frames` the frames decoded."""
        if not (data[4:8] in BMFF_FIRST_BOXES or data.startswith(EBML_MAGIC)):
            raise APIError(415, f"{name} is not an mp4/mov or webm/mkv file (only those containers are accepted)",
                           "frames")
        frames: list[np.ndarray] = []
        times: list[float] = []
        decoded, first, at = 0, None, 0.0
        with tempfile.NamedTemporaryFile(suffix=".video") as f:
            f.write(data)
            f.flush()
            capture = cv2.VideoCapture(f.name, cv2.CAP_FFMPEG)
            try:
                if not capture.isOpened():
                    raise APIError(400, f"{name} is not a video that can be decoded (mp4 or webm expected)", "frames")
                self.check_size(int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                                int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), name)
                declared = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
                self._check_decoded(declared, name)
                if keep is None:
                    self._check_frames(declared, max_frames, name)
                while capture.grab():
                    decoded += 1
                    self._check_decoded(decoded, name)
                    at = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000  # the frame just grabbed
                    first = at if first is None else first
                    if keep is not None and not keep(at - first):
                        continue
                    ok, frame = capture.retrieve()
                    if not ok:
                        break
                    self.check_size(frame.shape[1], frame.shape[0], name)
                    self._check_frames(len(frames) + 1, max_frames, name)
                    frames.append(cv2.cvtColor(self.shrink(frame), cv2.COLOR_BGR2RGB))
                    times.append(at)
            finally:
                capture.release()
        if not frames:
            raise APIError(400, f"{name} is not a video that can be decoded (mp4 or webm expected)", "frames")
        return frames, times, VideoSpan(decoded, at)

    def _check_frames(self, count: int, max_frames: int, name: str) -> None:
        if count > max_frames:
            raise APIError(413, f"{name} has {count} frames: over max_frames_per_request "
                                f"({self.limits.max_frames_per_request})", "frames")

    def _check_decoded(self, count: int, name: str) -> None:
        if count > self.limits.max_video_frames:
            raise APIError(413, f"{name} has {count} frames to decode: over max_video_frames "
                                f"({self.limits.max_video_frames})", "frames")

    def shrink(self, frame: np.ndarray) -> np.ndarray:
        """Scale a frame down to the size the model's processor sees (`frame_size`), keeping its aspect ratio,
        so nothing it sees is lost and no frame costs more tokens than the memory bounds count; frames
        already at or below that size are returned as they are (bit for bit). A shape the processor
        refuses is a 400."""
        height, width = frame.shape[:2]
        try:
            size = self.frame_size(height, width)
        except ValueError as e:
            raise APIError(400, str(e), "frames") from None
        if size == (height, width):
            return frame
        return cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_AREA)
