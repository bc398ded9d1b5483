"""LiveVLM streams on Qwen2.5-VL (tiny random checkpoint, CPU, float32): multi-axis positions end to end.

One engine serves the streams and, as plain requests (no LiveVLM parameters: the model variant runs them
as vLLM's Qwen2.5-VL), the vanilla answers: the same clips as one video item per clip, same prompt layout.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import (QUESTION, assert_lossless_streams_answer_as_vanilla, greedy, qwen_video_metadata, random_video,
                     vanilla_qwen_vl_answer)

pytestmark = pytest.mark.slow

LOSSLESS = {"long_term_budget_tokens": None, "retrieve_ratio": 1.0, "encode_context": "all"}
GROUP_TOKENS = 16  # 48 px frames are resized to 112 x 112: 8 x 8 patches merged 2 x 2, per 2 frames
FPS = 1.0          # the default `sample_fps`, declared in each clip's video metadata


@pytest.fixture(scope="module")
def lv(tiny_qwen25vl_dir):
    from vllm_livevlm import LiveVLM

    engine = LiveVLM(tiny_qwen25vl_dir, LOSSLESS, dtype="float32", max_model_len=16384,
                     limit_mm_per_prompt={"video": 8, "image": 0})
    yield engine
    engine.shutdown()


def _vanilla_answer(lv, clips: list[np.ndarray], question: str) -> list[int]:
    return vanilla_qwen_vl_answer(lv, [(clip, qwen_video_metadata(len(clip), FPS)) for clip in clips], question)


@pytest.mark.parametrize("clip_frames, frames", [(4, 12), (2, 10), (4, 10)])
def test_lossless_answers_equal_vanilla_vllm(lv, clip_frames, frames):
    """Token for token, greedy, 3 seeds; (4, 10) flushes a 2-frame clip, (2, 10) makes 5 one-group clips."""
    assert_lossless_streams_answer_as_vanilla(lv, clip_frames, frames, 3, lambda clips: _vanilla_answer(lv, clips, QUESTION))


def test_the_comparison_can_fail(lv):
    """One changed frame changes vanilla's answer: the equality above is not vacuous."""
    video = random_video(0, 12)
    clips = [video[i:i + 4] for i in range(0, 12, 4)]
    changed = [c.copy() for c in clips]
    changed[0][0] = 255 - changed[0][0]
    assert _vanilla_answer(lv, clips, QUESTION) != _vanilla_answer(lv, changed, QUESTION)


def test_bounded_memory_and_one_prefill_per_clip_over_1024_frames(lv):
    """Default-style config (compressing, retrieving 40 % of the pages): memory bounded by the spec's bound
    over 1,024 frames, every clip prefilled once (exactly its tokens), questions prefill only their turn."""
    from vllm_livevlm.memory.budget import ModelShape, memory_bound_bytes

    config = {"clip_frames": 16, "short_term_frames": 2, "long_term_budget_tokens": 256, "page_tokens": 16,
              "retrieve_ratio": 0.4}
    free_at_start = lv.engine_stats()["free_blocks"]
    stream = lv.open_stream(config)
    shape = ModelShape.of(lv.engine.model_config, lv.core.tokens_per_frame, lv.core.adapter.position_axes)
    bound = memory_bound_bytes(lv.core.resolve_config(config), shape, stream.stats()["sink_tokens"])
    rng = np.random.default_rng(0)
    clip_tokens = []
    for _ in range(1024 // 128):
        results = stream.append(rng.integers(0, 256, size=(128, 48, 48, 3), dtype=np.uint8))
        clip_tokens += [r.prompt_tokens_computed for r in results]
        stats = stream.stats()
        assert stats["long_term_tokens"] <= 256
        assert stats["bytes"] <= bound
        assert stats["bytes_all_versions"] == stats["bytes"]
        assert lv.engine_stats()["free_blocks"] == free_at_start
    assert clip_tokens == [8 * GROUP_TOKENS + 2] * 64  # 8 temporal groups + vision_start/end, once per clip
    stats = stream.stats()
    assert stats["frames"] == 1024 and stats["long_term_tokens"] == 256 and stats["clips"] == 64
    turn = lv.tokenizer.encode(f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    answer = stream.ask(QUESTION, greedy(8))
    assert answer.prompt_tokens_computed == len(turn) and len(answer.token_ids) == 8
    assert all(len(pages) == 7 for pages in answer.retrieved_pages.values())  # ceil(0.4 * 16 pages)
    assert lv.engine_stats()["free_blocks"] == free_at_start
    assert stream.close() == stats["bytes"]


def test_per_head_selection_is_refused(lv):
    with pytest.raises(ValueError, match="per_head_selection is not supported on qwen2.5-vl"):
        lv.open_stream({"per_head_selection": True})
