"""The shapes users run, end to end on real vLLM (CPU, float32): a grouped-query-attention checkpoint
(`tiny-gqa`: 4 query heads over 2 KV heads, head_dim 64) against vanilla vLLM and against the independent
reference (`tests/reference/`), both `encode_context` modes, and two streams' questions batched in one step."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from helpers import QUESTION, ask_together, greedy, random_video
from reference.livevlm_reference import ReferenceLiveVLM

pytestmark = pytest.mark.slow

# As tests/test_retrieval.py: compression and retrieval really select (1024 tokens kept per layer).
CONFIG = {"clip_frames": 8, "short_term_frames": 2, "encode_context": "all", "score_queries": 196,
          "long_term_budget_tokens": 1024, "bucket_capacity": 1, "score_fraction": 0.5, "page_tokens": 16,
          "retrieve_ratio": 0.4}
LOSSLESS = {"long_term_budget_tokens": None, "retrieve_ratio": 1.0, "encode_context": "all", "clip_frames": 4}


@pytest.fixture(scope="module")
def gqa_model_dir(tmp_path_factory) -> str:
    from vllm_livevlm.testing.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-gqa")), preset="tiny-gqa", seed=0)


@pytest.fixture(scope="module")
def lv(gqa_model_dir):
    from vllm_livevlm import LiveVLM

    # Up to 8 videos per prompt: the same engine answers the vanilla (stream-less, stock vLLM) prompts.
    engine = LiveVLM(gqa_model_dir, CONFIG, dtype="float32", max_model_len=16384, limit_mm_per_prompt={"video": 8})
    yield engine
    engine.shutdown()


def _vanilla_answer(lv, clips: list[np.ndarray], tokens: int = 16) -> list[int]:
    """Stock vLLM on the same engine (a request without a stream): the clips as videos, the same chat layout."""
    tok = lv.tokenizer
    sink = tok.encode("<|im_start|>user\n", add_special_tokens=False)
    turn = tok.encode(f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    prompt = {"prompt_token_ids": sink + [tok.convert_tokens_to_ids("<video>")] * len(clips) + turn,
              "multi_modal_data": {"video": clips}}

    async def run() -> list[int]:
        async for out in lv.engine.generate(prompt, greedy(tokens), request_id=f"vanilla-{uuid.uuid4().hex}"):
            final = out
        return list(final.outputs[0].token_ids)

    return lv._run(run())


def test_checkpoint_has_grouped_query_attention(gqa_model_dir):
    import json
    import os

    with open(os.path.join(gqa_model_dir, "config.json")) as f:
        text = json.load(f)["text_config"]
    assert (text["num_attention_heads"], text["num_key_value_heads"], text["hidden_size"] // 4) == (4, 2, 64)


def test_gqa_lossless_equals_vanilla_and_one_changed_frame_changes_the_answer(lv):
    """The lossless configuration answers exactly as vanilla vLLM, and the comparison can fail: a stream
    whose frame 5 differs answers differently (so the answer depends on the frames)."""
    video = random_video(0, 12)
    changed = video.copy()
    changed[5] = random_video(99, 1)[0]
    answers = []
    for frames in (video, changed):
        stream = lv.open_stream(LOSSLESS)
        stream.append(frames)
        answer = stream.ask(QUESTION, greedy(16))
        stream.close()
        assert answer.token_ids == _vanilla_answer(lv, [frames[i:i + 4] for i in range(0, 12, 4)])
        assert answer.frames_covered == 12
        answers.append(answer.token_ids)
    assert answers[0] != answers[1]


@pytest.mark.parametrize("encode_context,per_head", [("all", False), ("window", False), ("all", True)])
def test_gqa_agrees_with_reference(lv, gqa_model_dir, encode_context, per_head):
    overrides = {"encode_context": encode_context, "per_head_selection": per_head}
    config = dict(CONFIG, **overrides)
    video = np.random.default_rng(3).integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)
    ref = ReferenceLiveVLM.answering(gqa_model_dir, config, video, QUESTION, 16)
    stream = lv.open_stream(overrides)
    stream.append(video)
    answer = stream.ask(QUESTION, greedy(16))
    kept = stream.kept_tokens()["long_term"]
    assert len(ref.kept_ids()[0]) == 1024  # VSB really compressed (24 frames ≈ 4.7k tokens)
    assert [[list(head) for head in heads] for heads in kept] == ref.kept_ids_per_head()
    assert (kept[0][0] != kept[0][1]) == per_head  # per-head selection really differs between the KV heads
    assert answer.retrieved_page_indices == ref.retrieved
    assert all(len(pages) == 26 for pages in ref.retrieved.values())  # ceil(0.4 * 64) of 64 pages
    assert answer.token_ids == ref.answer
    stream.close()


def test_two_streams_questions_batched_in_one_step_equal_each_alone(lv):
    """Two streams' retrieve_ratio=0.4 questions prefilled in the same engine step (vLLM's own scheduling
    timestamp is taken once per step) answer exactly as each alone, with the same pages."""
    streams = [lv.open_stream() for _ in range(2)]
    for seed, stream in enumerate(streams):
        stream.append(np.random.default_rng(10 + seed).integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8))
    alone = [stream.ask(QUESTION, greedy(12)) for stream in streams]
    assert alone[0].retrieved_page_indices != alone[1].retrieved_page_indices  # two different retrievals

    batched = ask_together(lv, streams, 12, pause=True)
    scheduled = [m.scheduled_ts for _, m in batched]
    assert len(scheduled) == 2 and len(set(scheduled)) == 1 and 0 not in scheduled
    for one, (both, _) in zip(alone, batched):
        assert both.token_ids == one.token_ids
        assert both.retrieved_page_indices == one.retrieved_page_indices
    for stream in streams:
        stream.close()


def test_the_store_keeps_raw_keys_whatever_the_stream_position(lv):
    """Position-agnostic memory on the real model: layer 0's keys depend only on a token's embedding, so the
    same clip stored first in one stream and second in another holds the same raw (pre-RoPE) keys. The
    control shows the check can fail: those keys rotated to their stream positions (what vLLM's paged cache
    holds) differ."""
    import torch

    from vllm_livevlm.eval.fidelity import read_memory

    clip, other = random_video(30, 2), random_video(31, 2)
    keys = []
    for frames in (np.concatenate([clip, other]), np.concatenate([other, clip])):
        stream = lv.open_stream({"long_term_budget_tokens": None, "clip_frames": 2})
        stream.append(frames)
        memory = read_memory(lv, stream)
        stream.close()
        keys.append((memory.context(None)[0][0], memory.sinks_k.shape[1]))
    (first, sinks), (second, _) = keys
    n = 2 * 196 + 1  # the clip's tokens, newline included
    early, late = first[sinks:sinks + n], second[sinks + n:sinks + 2 * n]
    torch.testing.assert_close(early, late, rtol=1e-4, atol=1e-5)

    def rope(x: torch.Tensor, start: int) -> torch.Tensor:
        dim = x.shape[-1]
        angles = torch.arange(start, start + x.shape[0]).float()[:, None] / 1e6 ** (torch.arange(0, dim, 2) / dim)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        return torch.cat([x[..., :dim // 2] * cos - x[..., dim // 2:] * sin,
                          x[..., dim // 2:] * cos + x[..., :dim // 2] * sin], dim=-1)

    assert not torch.allclose(rope(early, sinks), rope(late, sinks + n), rtol=1e-2, atol=1e-2)
