"""LiveVLM streams on Qwen3-VL (tiny random checkpoint, CPU, float32): interleaved M-RoPE, q/k norm,
deepstack and a timestamp before each temporal group, end to end.

One engine serves the streams and, as plain requests (vLLM's Qwen3-VL), the vanilla answers: the same clips
as one video item per clip, same prompt layout, each clip's frames at their stream time (`sample_fps`).
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import (QUESTION, assert_lossless_streams_answer_as_vanilla, greedy, qwen_video_metadata, random_video,
                     vanilla_qwen_vl_answer)

pytestmark = pytest.mark.slow

LOSSLESS = {"long_term_budget_tokens": None, "retrieve_ratio": 1.0, "encode_context": "all"}
FPS = 1.0  # the default `sample_fps`: clip frames k.. are declared at k seconds


def test_engine_arguments_batch_the_video_item_vllm_profiles(tiny_qwen3vl_dir):
    """vLLM sizes a Qwen3-VL video item by its processor's 768-frame volume (12,288 tokens on the tiny
    checkpoint) and refuses to start when one step cannot batch it (chunked multimodal input is off)."""
    from vllm_livevlm.config import LiveVLMConfig
    from vllm_livevlm.model.adapter import adapter_for_model
    from vllm_livevlm.streams import engine_args_for, tokens_per_frame_of

    assert adapter_for_model(tiny_qwen3vl_dir).profiled_item_tokens() == 12288
    args = engine_args_for(tiny_qwen3vl_dir, LiveVLMConfig(), tokens_per_frame_of(tiny_qwen3vl_dir))
    assert args["max_num_batched_tokens"] == 12800


@pytest.fixture(scope="module")
def lv(tiny_qwen3vl_dir):
    from vllm_livevlm import LiveVLM

    # No max_num_batched_tokens: the engine arguments cover the video item vLLM profiles (below).
    engine = LiveVLM(tiny_qwen3vl_dir, LOSSLESS, dtype="float32", max_model_len=16384,
                     limit_mm_per_prompt={"video": 8, "image": 0})
    yield engine
    engine.shutdown()


def _clips(video: np.ndarray, clip_frames: int) -> list[np.ndarray]:
    return [video[i:i + clip_frames] for i in range(0, len(video), clip_frames)]


def _vanilla_answer(lv, clips: list[np.ndarray], stream_time: bool = True) -> list[int]:
    starts = np.cumsum([0] + [len(c) for c in clips[:-1]]) if stream_time else [0] * len(clips)
    return vanilla_qwen_vl_answer(lv, [(c, qwen_video_metadata(len(c), FPS, int(s))) for c, s in zip(clips, starts)],
                                  QUESTION)


@pytest.mark.parametrize("clip_frames, frames", [(4, 12), (4, 10), (2, 6)])
def test_lossless_answers_equal_vanilla_vllm(lv, clip_frames, frames):
    """Token for token, greedy, 2 seeds; (4, 10) flushes a 2-frame clip, (2, 6) makes one-group clips."""
    assert_lossless_streams_answer_as_vanilla(lv, clip_frames, frames, 2, lambda clips: _vanilla_answer(lv, clips))


def test_the_comparison_can_fail(lv):
    """One changed frame, or clip-local instead of stream timestamps, changes vanilla's answer: the
    equality above checks the frames and the timestamps."""
    clips = _clips(random_video(0, 12), 4)
    changed = [c.copy() for c in clips]
    changed[0][0] = 255 - changed[0][0]
    answer = _vanilla_answer(lv, clips)
    assert answer != _vanilla_answer(lv, changed)
    assert answer != _vanilla_answer(lv, clips, stream_time=False)


def _clip_tokens(lv, first_frame: int, frames: int) -> int:
    """Tokens of a clip of 48 px frames: its outer vision_start/vision_end and, per temporal group of 2
    frames, "<t seconds>" (t: the mean stream time of its frames), vision_start, 2 x 2 tokens, vision_end."""
    stamps = [f"<{(i + i + 1) / 2 / FPS:.1f} seconds>" for i in range(first_frame, first_frame + frames, 2)]
    return 2 + sum(len(lv.tokenizer.encode(t, add_special_tokens=False)) + 2 + 4 for t in stamps)


def test_clip_tokens_carry_a_timestamp_per_temporal_group(lv):
    stream = lv.open_stream({"clip_frames": 4})
    results = stream.append(random_video(0, 8))
    assert [r.prompt_tokens_computed for r in results] == [_clip_tokens(lv, 0, 4), _clip_tokens(lv, 4, 4)] == [28, 28]
    stream.close()


def test_bounded_memory_and_one_prefill_per_clip_when_compressing(lv):
    """Default-style config (VSB, paged long-term memory, 40 % retrieved) over 128 frames: memory within the
    spec's bound, every clip prefilled once (exactly its tokens, timestamps included)."""
    from vllm_livevlm.memory.budget import ModelShape, memory_bound_bytes

    config = {"clip_frames": 16, "short_term_frames": 2, "long_term_budget_tokens": 64, "page_tokens": 16,
              "retrieve_ratio": 0.4}
    free_at_start = lv.engine_stats()["free_blocks"]
    stream = lv.open_stream(config)
    shape = ModelShape.of(lv.engine.model_config, lv.core.tokens_per_frame, lv.core.adapter.position_axes)
    bound = memory_bound_bytes(lv.core.resolve_config(config), shape, stream.stats()["sink_tokens"])
    rng = np.random.default_rng(0)
    results = []
    for _ in range(2):
        results += stream.append(rng.integers(0, 256, size=(64, 48, 48, 3), dtype=np.uint8))
        stats = stream.stats()
        assert stats["long_term_tokens"] <= 64 and stats["bytes"] <= bound
        assert lv.engine_stats()["free_blocks"] == free_at_start
    assert [r.prompt_tokens_computed for r in results] == [_clip_tokens(lv, s, 16) for s in range(0, 128, 16)]
    assert stream.stats()["long_term_tokens"] == 64
    turn = lv.tokenizer.encode(f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    answer = stream.ask(QUESTION, greedy(8))
    assert answer.prompt_tokens_computed == len(turn) and len(answer.token_ids) == 8
    assert all(len(pages) == 2 for pages in answer.retrieved_pages.values())  # ceil(0.4 * 4 pages)
    assert lv.engine_stats()["free_blocks"] == free_at_start
    stream.close()
