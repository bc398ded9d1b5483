"""A bfloat16 engine on CPU with a KV pool so small that vLLM must preempt questions: answers do not change
when a question is preempted and recomputed, and bfloat16 agrees with float32 (the independent reference,
teacher-forced on the bf16 answer) on the top-1 token for most positions."""

from __future__ import annotations


import pytest

from helpers import QUESTION, ask_together, greedy, preempting_engine, random_video
from reference.livevlm_reference import ReferenceLiveVLM
from vllm_livevlm.config import LiveVLMConfig

pytestmark = pytest.mark.slow

LOSSLESS = {"long_term_budget_tokens": None, "retrieve_ratio": 1.0, "encode_context": "all", "clip_frames": 4}
FRAMES, TOKENS_PER_FRAME, BLOCK = 12, 196, 128


def _question_tokens(model_dir: str) -> int:
    """A lossless FRAMES-frame stream's question prompt: sinks + every clip token + the question turn."""
    from transformers import AutoTokenizer

    from vllm_livevlm.streams import QUESTION_TURN, USER_TURN

    tok = AutoTokenizer.from_pretrained(model_dir)
    clips = FRAMES // LOSSLESS["clip_frames"]
    return (len(tok.encode(USER_TURN, add_special_tokens=False)) + FRAMES * TOKENS_PER_FRAME + clips
            + len(tok.encode(QUESTION_TURN.format(question=QUESTION), add_special_tokens=False)))


@pytest.fixture(scope="module")
def gqa_model_dir(tmp_path_factory) -> str:
    from vllm_livevlm.testing.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-gqa")), preset="tiny-gqa", seed=0)


@pytest.fixture(scope="module")
def lv(gqa_model_dir):
    yield from preempting_engine(gqa_model_dir, LOSSLESS, "bfloat16", _question_tokens(gqa_model_dir), BLOCK)


def test_preempted_questions_answer_as_when_run_alone(lv):
    streams = [lv.open_stream() for _ in range(2)]
    for seed, stream in enumerate(streams):
        stream.append(random_video(20 + seed, FRAMES))
    alone = ask_together(lv, streams[:1], lv.decode) + ask_together(lv, streams[1:], lv.decode)
    assert [m.num_preemptions for _, m in alone] == [0, 0]
    together = ask_together(lv, streams, lv.decode)
    assert sum(m.num_preemptions for _, m in together) >= 1, "the pool was meant to force a preemption"
    assert [a.token_ids for a, _ in together] == [a.token_ids for a, _ in alone]
    for stream in streams:
        stream.close()


def test_bf16_agrees_with_fp32_on_top1(lv, gqa_model_dir):
    agree = total = 0
    for seed in range(3):
        video = random_video(seed, FRAMES)
        stream = lv.open_stream()
        stream.append(video)
        answer = stream.ask(QUESTION, greedy(16))
        assert answer.prompt_tokens == lv.prompt
        stream.close()
        ref = ReferenceLiveVLM(gqa_model_dir, LiveVLMConfig.coerce(LOSSLESS).to_dict())
        ref.open()
        for start in range(0, FRAMES, LOSSLESS["clip_frames"]):
            ref.append_clip(video[start:start + LOSSLESS["clip_frames"]])
        fp32_top1 = ref.ask(QUESTION, 16, forced=answer.token_ids)
        agree += sum(a == b for a, b in zip(fp32_top1, answer.token_ids))
        total += len(answer.token_ids)
    print(f"bf16 vs fp32 top-1 agreement: {agree}/{total}")
    assert agree / total >= 0.8, f"{agree}/{total}"
