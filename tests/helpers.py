"""Helpers shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

QUESTION = "what is happening in the video?"


def greedy(max_tokens: int = 32):
    """Greedy sampling that always decodes `max_tokens` tokens (answers comparable token by token)."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def random_video(seed: int, frames: int, size: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(frames, size, size, 3), dtype=np.uint8)


def live_engine(model_dir: str, config: dict) -> Iterator:
    """A float32 LiveVLM engine for a module-scoped fixture (shut down after the module)."""
    from vllm_livevlm import LiveVLM

    engine = LiveVLM(model_dir, config, dtype="float32", max_model_len=16384)
    yield engine
    engine.shutdown()
