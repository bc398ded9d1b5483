"""A stream's clock: the time of every frame it receives, checked, and sampled down to the stream's rate.

Times are seconds on the stream's own clock (any origin: seconds into a recording, or epoch seconds). A push
brings them as absolute timestamps (the client's, or a websocket frame's arrival time) or as offsets from the
push's first frame (a video's container times; frames without times are spaced one sampling period apart), which
are placed one period after the stream's last frame. Sampling keeps, of the frames whose times fall into one
period of the grid anchored at the stream's first frame, the first one: the same frames are kept whatever way
and in whatever pushes they arrive. `sample` changes nothing: a push that fails leaves the clock as it was.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# Times within this of a period boundary count as on it: container times (ms as floats) and i / fps are inexact.
GRID_TOLERANCE = 1e-6


class TimestampError(ValueError):
    """Timestamps that are not finite numbers, not one per frame, or that go back in time."""


@dataclass(frozen=True)
class Sampled:
    """What sampling decided for one push: every frame's time and which frames are kept."""

    times: np.ndarray  # [n] float64 seconds on the stream clock
    keep: np.ndarray   # [n] bool
    last_slot: int     # the grid period of the last kept frame after this push
    skipped: int = 0   # frames of the push sampled out before they were decoded (`video_sampler`)
    end: float | None = None  # time of the push's last frame, kept or skipped (None: no frames)

    @property
    def kept_times(self) -> np.ndarray:
        return self.times[self.keep]

    @property
    def sampled_out(self) -> int:
        return int(len(self.keep) - self.keep.sum()) + self.skipped


class StreamClock:
    """Per stream: its sampling rate, the time of its last frame and the time table of its encoded frames
    (indexed by stream frame number, what the memory's frame indices point at; 8 bytes per frame)."""

    def __init__(self, sample_fps: float | None):
        self.sample_fps = sample_fps
        self.origin: float | None = None   # time of the stream's first frame: the sampling grid's anchor
        self.last: float | None = None     # time of the latest frame received (kept or not)
        self.last_slot = -1                # grid period of the latest kept frame
        self.encoded = array("d")          # time of stream frame i

    @property
    def period(self) -> float:
        """Seconds between two frames at the stream's rate (1 s when every frame is kept)."""
        return 1.0 / self.sample_fps if self.sample_fps else 1.0

    def sample(self, count: int, timestamps: Any = None, offsets: Any = None, skipped: int = 0,
               until: float | None = None) -> Sampled:
        """The times of a push of `count` frames and the frames kept; raises `TimestampError` naming the first
        bad frame. Without either, frames are taken as already at the stream's rate (one period apart). A video
        the decoder sampled brings the `offsets` of its kept frames, how many it `skipped` and the offset of its
        last frame (`until`)."""
        end_step = None
        if timestamps is not None:
            times = _seconds(timestamps, count, "timestamps")
        else:
            steps = _seconds(offsets, count, "offsets") if offsets is not None else np.arange(count) * self.period
            start = 0.0 if self.last is None else self.last + self.period
            times = start + steps - (steps[0] if count else 0.0)
            end_step = None if until is None or not count else start + until - steps[0]
        self._check_order(times)
        end = end_step if end_step is not None else (float(times[-1]) if count else None)
        origin = times[0] if self.origin is None else self.origin
        if not self.sample_fps or not count:
            return Sampled(times, np.ones(count, dtype=bool), self.last_slot, skipped, end)
        # Times never decrease, so neither do their periods: a frame is kept if it opens a new one.
        slots = np.floor((times - origin) * self.sample_fps + GRID_TOLERANCE).astype(np.int64)
        keep = slots > np.concatenate([[self.last_slot], slots[:-1]])
        return Sampled(times, keep, max(self.last_slot, int(slots[-1])), skipped, end)

    def video_sampler(self) -> Callable[[float], bool] | None:
        """For a video decoded frame by frame without client timestamps: whether the frame `offset` seconds after
        the video's first frame is kept, by the rule of `sample` for a push placed after the stream's last
        frame, so the decoder skips what sampling would drop instead of holding it (None: every frame is kept)."""
        if not self.sample_fps:
            return None
        fps, start = self.sample_fps, 0.0 if self.last is None else self.last + self.period
        origin = start if self.origin is None else self.origin
        last_slot = self.last_slot

        def keep(offset: float) -> bool:
            nonlocal last_slot
            slot = math.floor((start + offset - origin) * fps + GRID_TOLERANCE)
            if slot <= last_slot:
                return False
            last_slot = slot
            return True
        return keep

    def advance(self, sampled: Sampled) -> None:
        """Record a push that was accepted."""
        if len(sampled.times):
            self.origin = float(sampled.times[0]) if self.origin is None else self.origin
            self.last = sampled.end
            self.last_slot = sampled.last_slot

    def arrival(self, now: float) -> float:
        """A frame's arrival time as a timestamp: the server's clock, never before the stream's last frame
        (a wall clock stepped back must not make a camera's frames go back in time)."""
        return now if self.last is None else max(now, self.last)

    def covered_until(self) -> float | None:
        return self.encoded[-1] if self.encoded else None

    def _check_order(self, times: np.ndarray) -> None:
        if not len(times):
            return
        previous = np.concatenate([[self.last if self.last is not None else -math.inf], times[:-1]])
        back = np.flatnonzero(times < previous)
        if len(back):
            i = int(back[0])
            before = f"frame {i - 1} of this push" if i else "the stream's last frame"
            raise TimestampError(f"frame {i} of this push goes back in time: its timestamp {float(times[i])!r} s is "
                                 f"before {before} ({float(previous[i])!r} s); a stream's clock only moves forward")


def _seconds(values: Any, count: int, name: str) -> np.ndarray:
    """`values` as float64 seconds, one finite number per frame (booleans are not numbers)."""
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise TimestampError(f"{name} must be a list of numbers (seconds), got {type(values).__name__}")
    if len(values) != count:
        raise TimestampError(f"got {count} frames but {len(values)} {name}")
    for i, value in enumerate(values):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TimestampError(f"{name}[{i}] (frame {i} of this push) must be a number of seconds, got {value!r}")
        if not math.isfinite(value):
            raise TimestampError(f"{name}[{i}] (frame {i} of this push) must be finite, got {value!r}")
    return np.asarray(values, dtype=np.float64).reshape(count)
