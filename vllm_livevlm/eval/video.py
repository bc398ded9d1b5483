"""Decode a video file with OpenCV at a fixed sampling rate: frame k is the source frame shown at k / fps s."""

from __future__ import annotations

import math

import numpy as np


def frames_until(query_time: float, fps: float) -> int:
    """Frames a stream sampled at `fps` has received by `query_time` s: those at 0, 1/fps, ... <= query_time."""
    return math.floor(query_time * fps + 1e-9) + 1


def decode_video(path: str, fps: float, until: float | None = None, size: int | None = None) -> np.ndarray:
    """RGB uint8 frames [T, H, W, 3] sampled at `fps` from the start up to `until` seconds (default: the end),
    optionally resized to `size` x `size`."""
    import cv2

    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise ValueError(f"cannot open video {path}")
    source_fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
    if source_fps <= 0:
        raise ValueError(f"video {path} does not report its frame rate")
    frames, index, wanted = [], 0, 0
    try:
        while until is None or wanted / fps <= until + 1e-9:
            ok, frame = capture.read()
            if not ok:
                break
            # Keep the source frames on screen at each sampling time (several when fps > source fps).
            while wanted / fps < (index + 1) / source_fps - 1e-9 and (until is None or wanted / fps <= until + 1e-9):
                frame_rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                if size is not None:
                    frame_rgb = cv2.resize(frame_rgb, (size, size), interpolation=cv2.INTER_AREA)
                frames.append(frame_rgb)
                wanted += 1
            index += 1
    finally:
        capture.release()
    if not frames:
        raise ValueError(f"video {path} has no frames")
    return np.stack(frames)


def video_duration(path: str) -> float:
    import cv2

    capture = cv2.VideoCapture(path)
    try:
        fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
        count = capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0.0
    finally:
        capture.release()
    if fps <= 0 or count <= 0:
        raise ValueError(f"cannot read the duration of {path}")
    return count / fps
