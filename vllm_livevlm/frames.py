"""Turn what users pass as frames (numpy, PIL, torch) into one `[T, H, W, 3]` uint8 array, or say why not."""

from __future__ import annotations

from typing import Any

import numpy as np


class FrameError(ValueError):
    """Frames of the wrong type, shape or dtype."""


def to_frame_array(frames: Any) -> np.ndarray:
    if frames is None:
        raise FrameError("append() got no frames")
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise FrameError("append() got an empty list of frames")
        frames = np.stack([to_frame_array(f)[0] if not _is_pil(f) else np.asarray(f.convert("RGB"))
                           for f in frames])
    elif _is_pil(frames):
        frames = np.asarray(frames.convert("RGB"))[None]
    elif type(frames).__module__.startswith("torch"):
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise FrameError(f"frames must be a numpy array, a torch tensor or PIL images, got {type(frames).__name__}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise FrameError(f"frames must have shape [T, H, W, 3] (RGB), got {list(frames.shape)}")
    if frames.dtype != np.uint8:
        raise FrameError(f"frames must be uint8 (0..255), got dtype {frames.dtype}")
    if frames.shape[0] == 0:
        raise FrameError("append() got no frames (T = 0)")
    if frames.shape[1] < 2 or frames.shape[2] < 2:
        raise FrameError(f"frames are too small: {frames.shape[1]}x{frames.shape[2]} pixels")
    return frames


def _is_pil(obj: Any) -> bool:
    return type(obj).__module__.startswith("PIL.")
