"""Stream memory end to end on real vLLM (tiny random model, CPU, float32): clips and questions are vLLM
requests, the answer is decoded by vLLM, and the lossless configuration matches vanilla vLLM exactly."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from helpers import QUESTION, greedy, live_engine, random_video
from vllm_livevlm import LiveVLMConfigError, StreamClosed
from vllm_livevlm.frames import FrameError

pytestmark = pytest.mark.slow

LOSSLESS = {"long_term_budget_tokens": None, "retrieve_ratio": 1.0, "encode_context": "all"}
TOKENS_PER_FRAME = 196


@pytest.fixture(scope="module")
def lv(tiny_model_dir):
    yield from live_engine(tiny_model_dir, LOSSLESS)


@pytest.fixture(scope="module")
def vanilla(tiny_model_dir):
    """Stock vLLM (in this process), with the one fix our model variant carries: vLLM 0.32 cannot embed a
    prompt whose videos differ in length (a flushed short clip), see `_process_video_pixels`."""
    from vllm import LLM
    from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration

    from vllm_livevlm.model.llava_onevision import per_video_2d

    stock = LlavaOnevisionForConditionalGeneration._process_video_pixels
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LlavaOnevisionForConditionalGeneration, "_process_video_pixels",
                      lambda self, inputs: per_video_2d(stock(self, inputs)))
        yield LLM(model=tiny_model_dir, dtype="float32", max_model_len=16384, max_num_batched_tokens=16384,
                  limit_mm_per_prompt={"video": 8}, enforce_eager=True, enable_prefix_caching=False, seed=0)


def _vanilla_answer(vanilla, tokenizer, clips: list[np.ndarray], question: str) -> list[int]:
    """Vanilla vLLM over the same clips: one video item per clip, the same chat layout."""
    sink = tokenizer.encode("<|im_start|>user\n", add_special_tokens=False)
    turn = tokenizer.encode(f"{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    video = tokenizer.convert_tokens_to_ids("<video>")
    prompt = {"prompt_token_ids": sink + [video] * len(clips) + turn, "multi_modal_data": {"video": clips}}
    return list(vanilla.generate(prompt, greedy())[0].outputs[0].token_ids)


@pytest.mark.parametrize("clip_frames", [2, 4])
def test_lossless_answers_equal_vanilla_vllm(lv, vanilla, clip_frames):
    for seed in range(3):
        video = random_video(seed, 12)
        stream = lv.open_stream({"clip_frames": clip_frames})
        stream.append(video)
        answer = stream.ask(QUESTION, greedy())
        clips = [video[i:i + clip_frames] for i in range(0, len(video), clip_frames)]
        assert answer.token_ids == _vanilla_answer(vanilla, lv.tokenizer, clips, QUESTION), f"seed {seed}"
        assert answer.frames_covered == 12
        stream.close()


def test_pending_frames_are_flushed_as_a_short_clip(lv, vanilla):
    video = random_video(7, 10)
    stream = lv.open_stream({"clip_frames": 4})
    stream.append(video)  # two clips of 4, 2 frames pending
    assert stream.stats()["pending_frames"] == 2
    answer = stream.ask(QUESTION, greedy())
    assert answer.frames_covered == 10
    clips = [video[0:4], video[4:8], video[8:10]]
    assert answer.token_ids == _vanilla_answer(vanilla, lv.tokenizer, clips, QUESTION)
    stream.close()


def test_one_prefill_per_clip_and_questions_prefill_only_their_turn(lv):
    stream = lv.open_stream({"clip_frames": 4})
    results = stream.append(random_video(3, 16))
    # vLLM's own counters: prompt tokens minus the tokens it reports as already computed.
    assert [r.prompt_tokens_computed for r in results] == [4 * TOKENS_PER_FRAME + 1] * 4
    assert sum(r.prompt_tokens_computed for r in results) == 16 * TOKENS_PER_FRAME + 4  # + one newline per clip
    turn = lv.tokenizer.encode(f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    for _ in range(2):
        answer = stream.ask(QUESTION, greedy(4))
        assert answer.prompt_tokens_computed == len(turn)
        assert answer.prompt_tokens == stream.stats()["tokens_kept"] + len(turn)
    stream.close()


def _bytes_bound(lv, config, sinks: int) -> int:
    """The memory a stream may hold by the spec: sinks + M long-term + the short-term frames, per layer."""
    text = lv.engine.model_config.hf_config.text_config
    layers, kv_heads = text.num_hidden_layers, text.num_key_value_heads
    head_dim = text.hidden_size // text.num_attention_heads
    stm = config["short_term_frames"] * (TOKENS_PER_FRAME + 1)  # a newline may close each short-term frame
    tokens = sinks + config["long_term_budget_tokens"] + stm
    per_token_layer = 2 * kv_heads * head_dim * 4 + kv_heads * 4  # float32 K and V, one score per KV head
    ids = layers * kv_heads * config["long_term_budget_tokens"] * 16 + stm * 16  # token ids + frames (int64)
    summaries = layers * (config["long_term_budget_tokens"] // config["page_tokens"]) * kv_heads * head_dim * 4
    return layers * tokens * per_token_layer + ids + summaries


def test_bounded_memory_on_a_2000_frame_stream(lv):
    config = {"clip_frames": 16, "short_term_frames": 2, "long_term_budget_tokens": 1024, "page_tokens": 16,
              "retrieve_ratio": 1.0}
    free_at_start = lv.engine_stats()["free_blocks"]
    stream = lv.open_stream(config)
    bound = _bytes_bound(lv, config, stream.stats()["sink_tokens"])
    rng = np.random.default_rng(0)
    for _ in range(2000 // 80):
        stream.append(rng.integers(0, 256, size=(80, 16, 16, 3), dtype=np.uint8))
        stats = stream.stats()
        assert stats["long_term_tokens"] <= 1024
        assert stats["bytes"] <= bound
        assert stats["bytes_all_versions"] == stats["bytes"]  # no stale snapshot kept once requests finished
        assert lv.engine_stats()["free_blocks"] == free_at_start
    stats = stream.stats()
    assert stats["frames"] == 2000 and stats["long_term_tokens"] == 1024
    assert stats["compression_ratio"] > 20
    answer = stream.ask(QUESTION, greedy(8))
    assert answer.prompt_tokens_computed < 40
    assert lv.engine_stats()["free_blocks"] == free_at_start
    store_before_close = lv.engine_stats()["store_bytes"]
    assert stream.close() == stats["bytes"]
    assert lv.engine_stats()["store_bytes"] == store_before_close - stats["bytes"]


def test_interleaved_streams_answer_like_streams_run_alone(lv):
    config = {"clip_frames": 4, "long_term_budget_tokens": 256, "retrieve_ratio": 1.0, "page_tokens": 16}
    videos = [random_video(100 + i, 16) for i in range(4)]

    def alone(video):
        stream = lv.open_stream(config)
        stream.append(video[:8])
        first = stream.ask(QUESTION, greedy(16)).token_ids
        stream.append(video[8:])
        second = stream.ask(QUESTION, greedy(16)).token_ids
        stream.close()
        return first, second

    expected = [alone(v) for v in videos]

    async def together():
        streams = [lv.open_stream(config) for _ in videos]
        await asyncio.gather(*(s.append_async(v[:8]) for s, v in zip(streams, videos)))
        first = await asyncio.gather(*(s.ask_async(QUESTION, greedy(16)) for s in streams))
        await asyncio.gather(*(s.append_async(v[8:]) for s, v in zip(streams, videos)))
        second = await asyncio.gather(*(s.ask_async(QUESTION, greedy(16)) for s in streams))
        for s in streams:
            s.close()
        return [(a.token_ids, b.token_ids) for a, b in zip(first, second)]

    assert asyncio.run(together()) == expected


def test_ask_stream_yields_the_answer_text(lv):
    stream = lv.open_stream({"clip_frames": 4})
    stream.append(random_video(11, 4))
    full = stream.ask(QUESTION, greedy(12)).text

    async def collect():
        return [delta async for delta in stream.ask_stream(QUESTION, greedy(12))]

    deltas = asyncio.run(collect())
    assert "".join(deltas) == full and len(deltas) > 1
    stream.close()


def test_bad_input_fails_clearly_and_other_streams_keep_working(lv):
    good = lv.open_stream({"clip_frames": 2})
    bad = lv.open_stream({"clip_frames": 2})
    with pytest.raises(FrameError, match=r"shape \[T, H, W, 3\]"):
        bad.append(np.zeros((2, 32, 32), dtype=np.uint8).reshape(2, 32, 32, 1))
    with pytest.raises(FrameError, match="uint8"):
        bad.append(np.zeros((2, 32, 32, 3), dtype=np.float32))
    with pytest.raises(FrameError, match="no frames"):
        bad.append(np.zeros((0, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(FrameError, match="empty list"):
        bad.append([])
    bad.append(random_video(1, 2, size=32))
    with pytest.raises(ValueError, match=r"frames of this stream are \[32, 32, 3\]"):
        bad.append(random_video(1, 2, size=40))
    with pytest.raises(ValueError, match="non-empty string"):
        bad.ask("   ")
    bad.close()
    with pytest.raises(StreamClosed, match="closed"):
        bad.ask(QUESTION)
    with pytest.raises(StreamClosed):
        bad.append(random_video(1, 2))
    with pytest.raises(LiveVLMConfigError, match="multiple of bucket_capacity"):
        lv.open_stream({"long_term_budget_tokens": 100, "bucket_capacity": 3})
    with pytest.raises(ValueError, match="clip_frames=400 needs"):
        lv.open_stream({"clip_frames": 400})
    good.append(random_video(2, 4))
    assert len(good.ask(QUESTION, greedy(4)).token_ids) == 4
    good.close()


def test_history_turns_precede_the_question_and_never_enter_video_memory(lv):
    stream = lv.open_stream({"clip_frames": 4, "history_turns": 1})
    stream.append(random_video(4, 4))
    kept = stream.stats()["tokens_kept"]
    first = stream.ask("what?", greedy(4))
    second = stream.ask("and then?", greedy(4))
    turn = (f"what?<|im_end|>\n<|im_start|>assistant\n{first.text}<|im_end|>\n<|im_start|>user\n"
            "and then?<|im_end|>\n<|im_start|>assistant\n")
    assert second.prompt_tokens_computed == len(lv.tokenizer.encode(turn, add_special_tokens=False))
    assert stream.stats()["tokens_kept"] == kept
    stream.close()


def test_a_sinks_prefix_prefilled_in_several_steps_is_kept_whole(lv, vanilla):
    """A system prompt longer than the engine's token budget per step (8192) is prefilled in chunks; the
    stream still keeps every sink token and answers like vanilla vLLM."""
    system = "you are a helpful assistant. " * 700
    prefix = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    prefix_tokens = lv.tokenizer.encode(prefix, add_special_tokens=False)
    assert len(prefix_tokens) > 8192
    video = random_video(21, 4)
    stream = lv.open_stream({"clip_frames": 4}, system_prompt=system)
    assert stream.stats()["sink_tokens"] == len(prefix_tokens)
    stream.append(video)
    answer = stream.ask(QUESTION, greedy(16))
    turn = lv.tokenizer.encode(f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    video_token = lv.tokenizer.convert_tokens_to_ids("<video>")
    expected = vanilla.generate({"prompt_token_ids": prefix_tokens + [video_token] + turn,
                                 "multi_modal_data": {"video": [video]}}, greedy(16))[0].outputs[0].token_ids
    assert answer.token_ids == list(expected)
    stream.close()


def _undisturbed_answer(lv, config: dict, video) -> list[int]:
    """The greedy answer of a stream that ingested `video` without interference (the control)."""
    undisturbed = lv.open_stream(config)
    undisturbed.append(video)
    expected = undisturbed.ask(QUESTION, greedy(8)).token_ids
    undisturbed.close()
    return expected


def test_a_clip_aborted_by_the_engine_is_encoded_again_and_answers_do_not_change(lv):
    """An engine abort of a clip request (an operator's abort, a dying client) leaves the stream consistent:
    the clip's frames are queued again, nothing half-committed, the answer equals an undisturbed stream's."""
    config = {"clip_frames": 4, "long_term_budget_tokens": 256, "page_tokens": 16}
    video = random_video(11, 8)
    expected = _undisturbed_answer(lv, config, video)

    stream = lv.open_stream(config)
    stream.append(video[:4])
    free_at_start = lv.engine_stats()["free_blocks"]

    async def abort_the_next_clip() -> int:
        # The scheduler is paused (requests kept, caches kept), so the clip is certainly still waiting when
        # the abort reaches the engine core: aborted before it ran, whatever the machine's speed.
        engine = lv.engine
        await engine.pause_generation(mode="keep", clear_cache=False)
        try:
            stream.core.accept(video[4:])
            encoding = asyncio.create_task(stream.core.encode_ready())
            while not (clips := [r for r in engine.output_processor.external_req_ids
                                 if r.startswith(f"lv-clip-{stream.id}")]):
                await asyncio.sleep(0)
            await engine.abort(clips)
        finally:
            await engine.resume_generation()
        return len(await encoding)

    assert lv._run(abort_the_next_clip()) == 0
    stats = stream.stats()
    assert (stats["frames"], stats["pending_frames"]) == (4, 4)  # nothing committed, nothing lost
    assert lv.engine_stats()["free_blocks"] == free_at_start
    assert len(lv._run(stream.core.encode_ready())) == 1
    assert stream.ask(QUESTION, greedy(8)).token_ids == expected
    stream.close()


def test_a_flush_on_question_is_encoded_in_clips_of_at_most_clip_frames(lv):
    stream = lv.open_stream({"clip_frames": 4})
    stream.core.accept(random_video(5, 10))  # buffered, none encoded yet
    assert stream.ask(QUESTION, greedy(4)).frames_covered == 10
    stats = stream.stats()
    assert (stats["clips"], stats["frames"], stats["pending_frames"], stats["frames_encoded"]) == (3, 10, 0, 10)
    stream.close()


def test_the_flush_clip_of_a_cancelled_question_is_queued_again(lv):
    """A question cancelled (its client went away) while its flush clip waits in the engine: the clip's
    frames go back to the head of the queue and the next answer equals an undisturbed stream's."""
    config = {"clip_frames": 4, "long_term_budget_tokens": 256, "page_tokens": 16}
    video = random_video(17, 6)
    expected = _undisturbed_answer(lv, config, video)

    stream = lv.open_stream(config)
    stream.append(video[:4])
    stream.core.accept(video[4:])  # 2 frames pending: the question flushes them first
    free_at_start = lv.engine_stats()["free_blocks"]

    async def cancel_during_the_flush() -> BaseException | None:
        engine = lv.engine
        await engine.pause_generation(mode="keep", clear_cache=False)  # the clip cannot run meanwhile
        try:
            asking = asyncio.create_task(stream.core.ask(QUESTION, greedy(8)))
            while not any(r.startswith(f"lv-clip-{stream.id}") for r in engine.output_processor.external_req_ids):
                await asyncio.sleep(0)
            asking.cancel()
            # Settled while paused: the abort reaches the engine core before the scheduler may run the clip.
            return (await asyncio.gather(asking, return_exceptions=True))[0]
        finally:
            await engine.resume_generation()

    assert isinstance(lv._run(cancel_during_the_flush()), asyncio.CancelledError)
    stats = stream.stats()
    assert (stats["frames"], stats["pending_frames"], stats["frames_received"], stats["frames_dropped"]) == (4, 2, 6, 0)
    assert lv.engine_stats()["free_blocks"] == free_at_start
    assert stream.ask(QUESTION, greedy(8)).token_ids == expected
    stream.close()


def test_closing_streams_with_requests_in_the_engine_keeps_it_serving(lv):
    """A DELETE racing requests already in the engine (a question decoding, a clip being prefilled): the
    question is answered from the snapshot it pinned, the clip is dropped, the engine keeps serving, and
    every byte and KV block comes back once the requests are gone."""
    config = {"clip_frames": 4, "long_term_budget_tokens": 256, "page_tokens": 16}
    video = random_video(13, 8)
    start = lv.engine_stats()
    asked, clipped = lv.open_stream(config), lv.open_stream(config)
    asked.append(video[:4])
    expected = asked.ask(QUESTION, greedy(16)).token_ids
    clipped.append(video[:4])

    async def close_while_in_the_engine():
        engine = lv.engine
        answering = asyncio.create_task(asked.core.ask(QUESTION, greedy(16)))
        clipped.core.accept(video[4:])
        encoding = asyncio.create_task(clipped.core.encode_ready())
        prefixes = (f"lv-question-{asked.id}", f"lv-clip-{clipped.id}")
        while not all(any(r.startswith(p) for r in engine.output_processor.external_req_ids) for p in prefixes):
            await asyncio.sleep(0)
        await asyncio.gather(asked.core.close(), clipped.core.close())
        return await asyncio.gather(answering, encoding, return_exceptions=True)

    answer, encoded = lv._run(close_while_in_the_engine())
    assert answer.token_ids == expected
    assert isinstance(encoded, StreamClosed) or encoded == [], encoded
    with pytest.raises(StreamClosed):
        asked.ask(QUESTION, greedy(4))
    fresh = lv.open_stream(config)
    fresh.append(video[:4])
    assert fresh.ask(QUESTION, greedy(16)).token_ids == expected  # the engine is alive and unchanged
    fresh.close()
    now = lv.engine_stats()
    assert (now["store_bytes"], now["streams"], now["free_blocks"]) == (start["store_bytes"], start["streams"],
                                                                        start["free_blocks"])
