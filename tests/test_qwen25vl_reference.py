"""The Qwen2.5-VL reference (`tests/reference/qwen25vl_reference.py`) on its own: its multi-axis placement
on hand-worked contexts, and its lossless stream equal to transformers reading the whole prompt at once."""

from __future__ import annotations

import pytest
import torch

from helpers import QUESTION, random_video
from reference.qwen25vl_reference import ReferenceQwen25VL, transformers_greedy, vanilla_positions

LOSSLESS = {"clip_frames": 4, "short_term_frames": 2, "encode_context": "all", "score_queries": 196,
            "long_term_budget_tokens": None, "bucket_capacity": 1, "score_fraction": 0.5, "page_tokens": 16,
            "retrieve_ratio": 1.0}
FPS = 1.0  # the default sample_fps: temporal stride 2 / 1 x 2 = 4
CLIP = "<|vision_start|><|video_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def two_clips(tiny_qwen25vl_dir) -> ReferenceQwen25VL:
    """A lossless stream of two 4-frame clips: per clip <|vision_start|>, 2 groups x 4 x 4 tokens, <|vision_end|>."""
    ref = ReferenceQwen25VL(tiny_qwen25vl_dir, LOSSLESS)
    ref.open()
    video = random_video(0, 8)
    ref.append_clip(video[:4])
    ref.append_clip(video[4:])
    return ref


def _whole(ref: ReferenceQwen25VL):
    return ref.sinks[0] + ref.ltm[0] + ref.stm[0]


def test_lossless_placement_is_vanillas(two_clips):
    ref = two_clips
    ids = ref.tokenizer.encode("<|im_start|>user\n" + CLIP * 2, add_special_tokens=False)
    video = ref.model.config.video_token_id
    expanded = [t for i in ids for t in ([video] * 32 if i == video else [i])]
    vanilla = vanilla_positions(expanded, video, [(2, 4, 4)] * 2, stride=4.0)
    placed, start = ref.place(_whole(ref), ref.extent([_whole(ref)]))
    assert ref.stride == 4.0 and len(_whole(ref)) == len(expanded)
    assert torch.equal(placed, vanilla)
    assert start == int(vanilla.max()) + 1 == len(ref.sinks[0]) + 2 * (1 + 5 + 1)  # t spans 0, 4: 5 positions


def test_a_thinned_context_compacts_the_temporal_axis_and_keeps_rows_and_columns(two_clips):
    """Clip 0 keeps the (row 0, column 0) token of both groups, clip 1 that of group 1 only (renumbered 0)."""
    ref = two_clips
    whole = _whole(ref)
    s = len(ref.sinks[0])
    first = [s, s + 1, s + 17, s + 33]  # clip 0: vision_start, (g0, 0, 0), (g1, 0, 0), vision_end
    second = [s + 34, s + 34 + 17, s + 34 + 33]  # clip 1: vision_start, (g1, 0, 0), vision_end
    context = whole.take(list(range(s)) + first + second)
    placed, start = ref.place(context, ref.extent([context]))
    expected_t = [*range(s), s, s + 1, s + 5, s + 6, s + 7, s + 8, s + 9]
    assert placed[0].tolist() == expected_t and start == s + 10
    assert placed[1].tolist() == [*range(s), s, s + 1, s + 1, s + 6, s + 7, s + 8, s + 9]
    shifted, start = ref.place(context, s + 13)  # right-aligned to a larger extent: the gap after the sinks
    assert torch.equal(shifted[:, s:], placed[:, s:] + 3) and torch.equal(shifted[:, :s], placed[:, :s])
    assert start == s + 13


def test_lossless_stream_answers_as_transformers_on_the_whole_prompt(tiny_qwen25vl_dir):
    from transformers.video_utils import VideoMetadata

    video = random_video(1, 12)
    ref = ReferenceQwen25VL.answering(tiny_qwen25vl_dir, LOSSLESS, video, QUESTION, 12)
    clips = [video[i:i + 4] for i in range(0, 12, 4)]
    prompt = f"<|im_start|>user\n{CLIP * 3}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    meta = [VideoMetadata(total_num_frames=4, fps=FPS, duration=4 / FPS, frames_indices=list(range(4)))] * 3
    inputs = ref.processor(text=[prompt], videos=clips, video_metadata=meta, return_tensors="pt")
    assert ref.answer == transformers_greedy(ref.model, inputs, FPS, 12)
    changed = video.copy()
    changed[0] = 255 - changed[0]
    assert ReferenceQwen25VL.answering(tiny_qwen25vl_dir, LOSSLESS, changed, QUESTION, 12).answer != ref.answer


def test_per_head_selection_is_refused(tiny_qwen25vl_dir):
    with pytest.raises(NotImplementedError):
        ReferenceQwen25VL(tiny_qwen25vl_dir, dict(LOSSLESS, per_head_selection=True))


# Compressing and retrieving for real on the tiny model (48 frames = 6 clips of 8 x 16 + 2 tokens): a
# 128-token long-term budget, 8-token pages, 40 % of them read.
COMPRESSING = {"clip_frames": 8, "short_term_frames": 2, "encode_context": "all", "score_queries": 64,
               "long_term_budget_tokens": 128, "bucket_capacity": 1, "score_fraction": 0.5, "page_tokens": 8,
               "retrieve_ratio": 0.4}


@pytest.fixture(scope="module")
def lv(tiny_qwen25vl_dir):
    from helpers import live_engine

    yield from live_engine(tiny_qwen25vl_dir, COMPRESSING)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plugin_agrees_with_reference(lv, tiny_qwen25vl_dir, seed):
    from helpers import greedy

    video = random_video(seed, 48, size=32)
    ref = ReferenceQwen25VL.answering(tiny_qwen25vl_dir, COMPRESSING, video, QUESTION, 16)
    stream = lv.open_stream()
    stream.append(video)
    answer = stream.ask(QUESTION, greedy(16))
    kept = stream.kept_tokens()["long_term"]
    assert len(ref.kept_ids()[0]) == 128  # VSB really compressed (48 frames = 396 tokens)
    for layer, heads in enumerate(kept):
        assert all(head == ref.kept_ids()[layer] for head in heads), f"kept tokens differ in layer {layer}"
    assert answer.retrieved_page_indices == ref.retrieved
    assert all(len(pages) == 7 for pages in ref.retrieved.values())  # ceil(0.4 * 16) of 16 pages
    assert answer.token_ids == ref.answer
    stream.close()


@pytest.mark.slow
def test_fidelity_recomputes_vllm_with_multi_axis_placement(lv, tiny_qwen25vl_dir):
    """`vllm-livevlm fidelity` on Qwen2.5-VL: its plain-PyTorch question pass places each snapshot by the
    multi-axis rule and reproduces what vLLM decoded; the 1-D rule (slot i at (i, i, i)) does not."""
    from vllm_livevlm.eval.fidelity import LOSSLESS as FULL, QUESTIONS, SYSTEMS, System, measure
    from vllm_livevlm.eval.fixtures import synthetic_frames
    from vllm_livevlm.eval.question_forward import QuestionForward

    class SlotPositions(QuestionForward):
        def run(self, context, tokens, probe_tokens=0, placement=None):
            slots = [torch.arange(k.shape[0]).expand(3, -1) for k, _ in context]
            return super().run(context, tokens, probe_tokens, (slots, context[0][0].shape[0]))

    frames = synthetic_frames(0, 24, fps=1)
    systems = [System("lossless", FULL), System("livevlm", {"page_tokens": 8, "retrieve_ratio": 0.5}),
               SYSTEMS["sliding-window"]]
    data = measure(lv, QuestionForward(tiny_qwen25vl_dir), frames, list(QUESTIONS[:2]), systems, answer_tokens=8,
                   progress=lambda _: None)
    assert data["reference_check"] == 1.0
    assert all(s["first_token_matches_vllm"] == 1.0 for s in data["systems"].values())
    lossless, compressed = data["systems"]["lossless"], data["systems"]["livevlm"]
    assert lossless["attention_recall"] == pytest.approx(1.0, abs=1e-6) and lossless["kl"] == pytest.approx(0, abs=1e-4)
    assert compressed["token_share"] < 1.0 and compressed["attention_recall"] < 1.0 - 1e-4
    wrong = measure(lv, SlotPositions(tiny_qwen25vl_dir), frames, list(QUESTIONS[:2]), systems[:1], answer_tokens=8,
                    progress=lambda _: None)
    assert wrong["reference_check"] < 1.0
