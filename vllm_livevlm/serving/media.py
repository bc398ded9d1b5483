"""Decode what clients upload as frames: JPEG/PNG images (bytes or base64) and short video files."""

from __future__ import annotations

import base64
import binascii
import os
import tempfile

import cv2
import numpy as np

from vllm_livevlm.serving.errors import APIError

VIDEO_TYPES = ("video/mp4", "video/webm", "video/quicktime", "video/x-matroska", "application/octet-stream")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv")


def decode_image(data: bytes, name: str) -> np.ndarray:
    """JPEG/PNG bytes ⇒ [H, W, 3] RGB uint8."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise APIError(400, f"{name} is not a decodable JPEG or PNG image", "frames")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_base64(text: str, name: str) -> bytes:
    if not isinstance(text, str):
        raise APIError(400, f"{name} must be a base64 string", "frames")
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{name} is not valid base64", "frames") from None


def decode_video(data: bytes, name: str, max_frames: int) -> np.ndarray:
    """A short video file (mp4/webm/...) ⇒ [T, H, W, 3] RGB uint8, decoded with OpenCV (FFmpeg)."""
    with tempfile.NamedTemporaryFile(suffix=".video") as f:
        f.write(data)
        f.flush()
        capture = cv2.VideoCapture(f.name)
        frames = []
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
                if len(frames) > max_frames:
                    raise APIError(413, f"{name} has more than {max_frames} frames (the per-request limit)", "frames")
        finally:
            capture.release()
    if not frames:
        raise APIError(400, f"{name} is not a video that can be decoded (mp4 or webm expected)", "frames")
    return np.stack(frames)


def is_video(content_type: str | None, filename: str | None) -> bool:
    content_type = (content_type or "").split(";")[0].strip().lower()
    if content_type.startswith("video/"):
        return True
    return bool(filename) and os.path.splitext(filename)[1].lower() in VIDEO_SUFFIXES
