"""Read a video at a fixed sampling rate: frame k is the source frame shown at k / fps s.

Video files are decoded with OpenCV; `.npy` files are frame arrays [T, H, W, 3] uint8 at 1 fps (RVS-Movie as
ReKV ships it), memory-mapped so that only the sampled frames are read.
"""

from __future__ import annotations

import math

import numpy as np


def frames_until(query_time: float, fps: float) -> int:
    """Frames a stream sampled at `fps` has received by `query_time` s: those at 0, 1/fps, ... <= query_time."""
    return math.floor(query_time * fps + 1e-9) + 1


NPY_FPS = 1.0


def _resize(frame: np.ndarray, size: int | None) -> np.ndarray:
    import cv2

    return frame if size is None else cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)


def decode_npy(path: str, fps: float, until: float | None = None, size: int | None = None) -> np.ndarray:
    """`decode_video` of a 1 fps frame array."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read frame array {path}: {error}") from None
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8 or not len(array):
        raise ValueError(f"frame array {path} has shape {array.shape} {array.dtype}, not [T, H, W, 3] uint8")
    count = math.ceil(len(array) / NPY_FPS * fps - 1e-9)  # sampling times inside the array's duration
    if until is not None:
        count = min(count, frames_until(until, fps))
    index = [int(k / fps * NPY_FPS + 1e-9) for k in range(count)]
    return np.stack([_resize(np.asarray(array[i]), size) for i in index])


def decode_video(path: str, fps: float, until: float | None = None, size: int | None = None) -> np.ndarray:
    """RGB uint8 frames [T, H, W, 3] sampled at `fps` from the start up to `until` seconds (default: the end),
    optionally resized to `size` x `size`."""
    if path.endswith(".npy"):
        return decode_npy(path, fps, until, size)
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
                frames.append(_resize(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), size))
                wanted += 1
            index += 1
    finally:
        capture.release()
    if not frames:
        raise ValueError(f"video {path} has no frames")
    return np.stack(frames)

