"""A question whose snapshot went away before its context was filled (it waited behind a clip of its stream, or
vLLM preempted it after its first step and recomputes it) re-pins the stream's latest version when that has
the same context size, or is re-asked once; the answer says which. A real engine with a KV pool so small
that two questions cannot decode together, and retrieval reading half the pages (`retrieve_ratio=0.5`)."""

from __future__ import annotations


import pytest

from helpers import QUESTION, ask_together, greedy, preempting_engine, random_video

pytestmark = pytest.mark.slow

# Two-frame clips; long-term memory (24 pages) is full after 8 frames, so the context size stops changing.
CONFIG = {"clip_frames": 2, "short_term_frames": 1, "long_term_budget_tokens": 384, "page_tokens": 16,
          "retrieve_ratio": 0.5}
BLOCK, STEADY_FRAMES = 128, 8


def _steady_prompt(model_dir: str) -> int:
    """A full stream's question prompt: sinks + 12 of 24 pages + one short-term frame and its newline + turn."""
    from transformers import AutoTokenizer

    from vllm_livevlm.streams import QUESTION_TURN, USER_TURN

    tok = AutoTokenizer.from_pretrained(model_dir)
    return (len(tok.encode(USER_TURN, add_special_tokens=False)) + 12 * 16 + 197
            + len(tok.encode(QUESTION_TURN.format(question=QUESTION), add_special_tokens=False)))


@pytest.fixture(scope="module")
def lv(tiny_model_dir):
    yield from preempting_engine(tiny_model_dir, CONFIG, "float32", _steady_prompt(tiny_model_dir), BLOCK)


def test_a_preempted_question_repins_and_answers_as_when_run_alone(lv):
    streams = [lv.open_stream() for _ in range(2)]
    for seed, stream in enumerate(streams):
        stream.append(random_video(40 + seed, STEADY_FRAMES))
    versions = [s.stats()["version"] for s in streams]
    alone = ask_together(lv, streams[:1], lv.decode) + ask_together(lv, streams[1:], lv.decode)
    assert [(m.num_preemptions, a.repinned_version) for a, m in alone] == [(0, None), (0, None)]
    assert [a.prompt_tokens for a, _ in alone] == [lv.prompt, lv.prompt]
    together = ask_together(lv, streams, lv.decode)
    assert sum(m.num_preemptions for _, m in together) >= 1, "the pool was meant to force a preemption"
    assert [a.token_ids for a, _ in together] == [a.token_ids for a, _ in alone]
    # The recompute re-pinned the latest version: the same one here (no clip landed), and it says so.
    assert [a.repinned_version for a, _ in together] == [v if m.num_preemptions else None
                                                         for (_, m), v in zip(together, versions)]
    assert not any(a.reasked for a, _ in together)
    for stream in streams:
        stream.close()


def _ask_behind_a_clip(lv, stream, frames) -> object:
    """Ask `stream`, with a clip of `frames` committed after the question was prepared and before vLLM runs it."""
    submit = lv.core.submit
    raced = []

    async def submit_behind_a_clip(prompt, sampling_params, request_id, params, on_output=None):
        if not raced:
            raced.append(params.version)
            await stream.core.append(frames)
        return await submit(prompt, sampling_params, request_id, params, on_output)

    lv.core.submit = submit_behind_a_clip
    try:
        answer = stream.ask(QUESTION, greedy(8))
    finally:
        lv.core.submit = submit
    assert stream.stats()["version"] == raced[0] + 1
    return answer


def test_a_question_behind_a_clip_reads_the_new_version_or_is_reasked(lv):
    full = lv.open_stream()
    full.append(random_video(50, STEADY_FRAMES))
    answer = _ask_behind_a_clip(lv, full, random_video(51, 2))
    latest = full.stats()["version"]
    assert (answer.repinned_version, answer.reasked) == (latest, False)
    assert answer.frames_covered == STEADY_FRAMES + 2
    assert answer.token_ids == full.ask(QUESTION, greedy(8)).token_ids  # as asked of that version directly

    filling = lv.open_stream()
    filling.append(random_video(52, 2))  # long-term memory still grows: the next clip changes the context size
    answer = _ask_behind_a_clip(lv, filling, random_video(53, 2))
    assert (answer.repinned_version, answer.reasked) == (None, True)
    assert answer.frames_covered == 4
    assert answer.token_ids == filling.ask(QUESTION, greedy(8)).token_ids
    assert filling.stats()["frames"] == 4  # the stream is fine
    full.close()
    filling.close()
