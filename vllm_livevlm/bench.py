"""`vllm-livevlm bench` / `scripts/bench.py`: LiveVLM against the systems users would pick instead.

Every system runs on the same model, frames and questions, on this machine, in one invocation:
- vanilla: stock vLLM, every question re-prefills all frames so far (one video item per clip) + question;
- vanilla-prefix: stock vLLM with prefix caching on; the video so far is a growing prefix (only new frames
  are prefilled when they arrive), its KV grows without bound;
- vllm-streaming: vLLM's own streaming-input session (`StreamingInput`, one resumable request): each clip is
  appended as an input chunk (one sampled token, which vLLM drops) and each question as a chunk that is
  answered; append-only, so its KV (questions and answers included) stays in vLLM's blocks and grows;
- vanilla-32: stock vLLM over 32 uniformly sampled frames; recent-4: stock vLLM over the last 4 frames;
- sliding-window: LiveVLM with no long-term memory (sinks + short-term window, StreamingLLM-style);
- fullkv-retrieval: LiveVLM with compression off and window encoding (ReKV-style: every clip's KV kept,
  top pages retrieved per question);
- livevlm: LiveVLM at its default configuration.
Vanilla, vllm-streaming, vanilla-32 and recent-4 run as ordinary requests on the LiveVLM engine (its model
variant runs vLLM's own Qwen2 math for them; prefix caching off, as vLLM advises for sessions; vLLM's default
compilation like every engine here, `--enforce-eager` with `--eager`); vanilla-prefix needs prefix caching
and runs on a second, stock engine. `--compiled` runs livevlm again on an `--enforce-eager` engine
(`livevlm-eager`) and reports compiled over eager (decode tokens/s, clip and question step time) and what the
LiveVLM op costs on a decode step without LiveVLM work (`decode_op_cost`: calls counted by torch.profiler,
each timed on the engine's own layer).
Memory is reported and measured: "reported" is what the system says it holds (the store's stats for the
LiveVLM systems, tokens x KV bytes per token for the others); "measured" is what is allocated: the distinct
tensor storages the session store holds (`vllm_livevlm.measure`, sampled after every clip) for the LiveVLM
systems, the peak number of vLLM blocks in use (its per-step KV usage) times the block's bytes for the
others. Timings exclude a warm-up; each figure is the median of `--reps` repetitions with min and max
(`--long-prompt-reps` for stock-vLLM prompts over `--long-prompt-tokens`: those take minutes each on a
CPU). Writes `bench_results/<date>-<machine>.json` and PNG plots.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vllm_livevlm.measure import KVPoolProbe

QUESTION = "What is happening in the video right now?"
LIVEVLM_SYSTEMS = {
    "sliding-window": {"long_term_budget_tokens": 0, "encode_context": "window"},
    "fullkv-retrieval": {"long_term_budget_tokens": None, "encode_context": "window"},
    "livevlm": {},
}
VANILLA_SYSTEMS = ("vanilla", "vanilla-32", "recent-4")
BOUNDED_SYSTEMS = ("sliding-window", "livevlm")  # memory bounded by config: the only ones run to --long-lengths
STREAMING_SYSTEM = "vllm-streaming"
ALL_SYSTEMS = ("vanilla", "vanilla-prefix", STREAMING_SYSTEM, "vanilla-32", "recent-4", "sliding-window",
               "fullkv-retrieval", "livevlm")


def uniform_indices(length: int, count: int) -> np.ndarray:
    """Indices of `count` frames spread evenly over `length` frames, first and last included (all if fewer)."""
    if length <= count:
        return np.arange(length)
    return np.linspace(0, length - 1, count).round().astype(int)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


@dataclass
class Point:
    """One system at one stream length."""

    frames: int
    ttft_s: dict[str, float] | None = None
    decode_tokens_per_s: dict[str, float] | None = None
    ingest_s_per_clip: dict[str, float] | None = None
    frames_per_s: float | None = None
    memory_bytes: int = 0  # reported
    measured_memory_bytes: int = 0  # allocated (see the module docstring)
    vision_tokens_prefilled: int = 0  # cumulative, ingestion and questions, since the stream started
    skipped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _timed_answer(engine, prompt: dict, max_tokens: int, request_id: str, runner) -> tuple[float, float, Any]:
    """TTFT and decode rate of one stock request (streamed outputs)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            output_kind=RequestOutputKind.CUMULATIVE)

    async def run():
        start = time.perf_counter()
        first = None
        output = None
        async for output in engine.generate(prompt, params, request_id=request_id):
            if first is None and output.outputs[0].token_ids:
                first = time.perf_counter()
        end = time.perf_counter()
        return first - start, (max_tokens - 1) / max(end - first, 1e-9), output

    return runner(run())


class StreamingSession:
    """One vLLM streaming-input session: chunks (`StreamingInput`) go in through an async generator, each
    answered before the next is sent. vLLM keeps every chunk's KV and the answers' (but each chunk's last
    sampled token) in the session's blocks: `tokens` counts them."""

    def __init__(self, engine, runner, request_id: str):
        self.engine = engine
        self.runner = runner
        self.request_id = request_id
        self.tokens = 0
        self._kept = 0  # answer tokens the session holds (each answer but its last token)
        self._chunks: asyncio.Queue | None = None
        self._outputs = None
        self._failed = False

    async def _inputs(self):
        while (chunk := await self._chunks.get()) is not None:
            yield chunk

    def send(self, prompt: dict, max_tokens: int) -> tuple[float, float, int]:
        """Append one chunk, wait for its `max_tokens`: (seconds to its first token, decode tokens/s, the
        prompt tokens it added with its placeholders expanded)."""
        try:
            return self.runner(self._send(prompt, max_tokens))
        except BaseException:
            self._failed = True
            raise

    async def _send(self, prompt: dict, max_tokens: int) -> tuple[float, float, int]:
        from vllm import SamplingParams
        from vllm.engine.protocol import StreamingInput
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        if self._outputs is None:
            self._chunks = asyncio.Queue()
            self._outputs = self.engine.generate(self._inputs(), params, request_id=self.request_id)
        start = time.perf_counter()
        await self._chunks.put(StreamingInput(prompt=prompt, sampling_params=params))
        first, generated = None, 0
        while True:
            output = await self._outputs.__anext__()
            generated += len(output.outputs[0].token_ids)
            if first is None and generated:
                first = time.perf_counter()
            if output.outputs[0].finish_reason is not None:
                break
        end = time.perf_counter()
        # The front end's prompt grows by each chunk; the kept answer tokens are not in it.
        added = len(output.prompt_token_ids) - (self.tokens - self._kept)
        self._kept += generated - 1
        self.tokens = len(output.prompt_token_ids) + self._kept
        return first - start, (generated - 1) / max(end - first, 1e-9), added

    def close(self) -> None:
        """End the session (its blocks are freed); a session that failed is aborted."""
        if self._outputs is not None:
            self.runner(self._close())

    async def _close(self) -> None:
        if self._failed:  # its input task waits for the next chunk until the loop stops; the request goes now
            await self._outputs.aclose()
            await self.engine.abort(self.request_id)
            return
        await self._chunks.put(None)  # the end of the input stream: vLLM finishes the session
        try:
            await asyncio.wait_for(self._drain(), timeout=60)
        finally:
            await self._outputs.aclose()

    async def _drain(self) -> None:
        async for _ in self._outputs:
            pass


class StoreMemory:
    """What the LiveVLM engine's session store holds, measured in its worker (`livevlm_memory_probe`):
    the distinct storages it reaches, and the peaks since the stream opened of that, of the worker's RSS
    above its level then and, on a GPU, of the CUDA allocator's peak above its level then."""

    def __init__(self, lv):
        self.lv = lv
        self.base = self._probe(reset_peak=True)
        self.peak: dict[str, int] = {}

    def _probe(self, reset_peak: bool = False) -> dict[str, int]:
        return self.lv._run(self.lv.core.rpc("livevlm_memory_probe", reset_peak))

    def sample(self) -> int:
        """The bytes the store holds now (above its level when the stream opened); updates the peaks."""
        now = self._probe()
        held = now["store_storage_bytes"] - self.base["store_storage_bytes"]
        deltas = {"peak_measured_memory_bytes": held, "engine_rss_delta_bytes": now["rss_bytes"] - self.base["rss_bytes"]}
        if "cuda_max_allocated_bytes" in now:
            deltas["cuda_peak_delta_bytes"] = now["cuda_max_allocated_bytes"] - self.base["cuda_allocated_bytes"]
        for key, value in deltas.items():
            self.peak[key] = max(self.peak.get(key, value), value)
        return held

    def peaks(self) -> dict[str, int]:
        return dict(self.peak)


class Bench:
    def __init__(self, args: argparse.Namespace, adapter):
        """`adapter`: the model family's (`vllm_livevlm.model.adapter`): its video prompt, items and sizes."""
        from vllm_livevlm.config import LiveVLMConfig

        self.args = args
        self.adapter = adapter
        self.fps = LiveVLMConfig().sample_fps  # what the LiveVLM streams declare: stock requests declare the same
        self.frames = np.random.default_rng(args.seed).integers(
            0, 256, size=(max(args.lengths + args.long_lengths) + (args.clip_frames if args.profile else 0),
                          args.frame_size, args.frame_size, 3), dtype=np.uint8)
        self.results: dict[str, list[Point]] = {}
        self.request = 0
        self.op_cost: dict[str, float] | None = None  # `decode_op_cost`, with --compiled

    # ---- LiveVLM systems (and stock requests on the same engine) ---------------------------------------
    def run_livevlm_engine(self, model: str, progress, enforce_eager: bool = False) -> None:
        """Every system that runs on a LiveVLM engine; with `enforce_eager` (the `--compiled` comparison) only
        livevlm, stored as `livevlm-eager`."""
        from vllm_livevlm import LiveVLM

        args = self.args
        base = {"clip_frames": args.clip_frames}
        profiling = {"profiler_config": {"profiler": "torch", "torch_profiler_dir": os.path.abspath(args.profile),
                                         "torch_profiler_with_stack": False, "torch_profiler_use_gzip": True}
                     } if args.profile else {}
        lv = LiveVLM(model, base, max_model_len=args.max_model_len, dtype=args.dtype,
                     limit_mm_per_prompt={"video": max(args.lengths) // args.clip_frames + 1, "image": 0},  # vanilla's clips
                     enforce_eager=enforce_eager or args.eager, **(profiling if not enforce_eager else {}))
        self.kv_bytes_per_token = self._kv_bytes_per_token(lv.engine.model_config.hf_config.text_config, args.dtype)
        pool = self._pool_probe(lv.engine)
        try:
            self._warm_up(lv)
            if enforce_eager:
                self.results["livevlm-eager"] = self._run_stream_system(lv, "livevlm", {}, progress, profile=False)
                return
            for name in args.systems:
                if name in LIVEVLM_SYSTEMS:
                    self.results[name] = self._run_stream_system(lv, name, LIVEVLM_SYSTEMS[name], progress)
                elif name in VANILLA_SYSTEMS:
                    self.results[name] = self._run_vanilla(lv.engine, lv._run, lv.tokenizer, pool, name, progress)
                elif name == STREAMING_SYSTEM:
                    self.results[name] = self._run_streaming_session(lv.engine, lv._run, lv.tokenizer, pool, progress)
        finally:
            lv.shutdown()

    def _pool_probe(self, engine) -> KVPoolProbe:
        self.kv_block_tokens = engine.vllm_config.cache_config.block_size
        return KVPoolProbe(engine, self.kv_block_tokens * self.kv_bytes_per_token)

    def _warm_up(self, lv) -> None:
        stream = lv.open_stream()
        stream.append(self.frames[: self.args.clip_frames])
        stream.ask(QUESTION, self._sampling())
        stream.close()

    def _sampling(self):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=self.args.answer_tokens, temperature=0.0, ignore_eos=True)

    def _run_stream_system(self, lv, name: str, overrides: dict, progress, profile: bool = True) -> list[Point]:
        args = self.args
        memory = StoreMemory(lv)
        stream = lv.open_stream(overrides)
        points, ingest, prefilled, encoded, peak = [], [], 0, 0, 0
        for length in self.lengths_for(name):
            start = time.perf_counter()
            results = []
            for clip_start in range(encoded, length, args.clip_frames):  # clip by clip: memory sampled after each
                results += stream.append(self.frames[clip_start:min(clip_start + args.clip_frames, length)])
                peak = max(peak, stream.stats()["bytes"])
                memory.sample()
            elapsed = time.perf_counter() - start
            encoded = length
            ingest += [r.seconds for r in results]
            prefilled += sum(r.prompt_tokens_computed for r in results)
            ttft, rate = [], []
            try:
                answer = stream.ask(QUESTION, self._sampling())
            except Exception as e:  # e.g. the question context outgrew max_model_len (no compression)
                points.append(Point(length, skipped=f"question failed: {str(e)[:160]}",
                                    memory_bytes=stream.stats()["bytes"], measured_memory_bytes=memory.sample()))
                progress(f"{name} {length} frames: skipped")
                continue
            for _ in range(args.reps):
                answer = stream.ask(QUESTION, self._sampling())
                ttft.append(answer.timings["ttft"])
                rate.append((len(answer.token_ids) - 1) / max(answer.timings["total"] - answer.timings["ttft"]
                                                              - answer.timings["flush"], 1e-9))
                prefilled += answer.prompt_tokens_computed
            stats = stream.stats()
            measured = memory.sample()
            points.append(Point(length, spread(ttft), spread(rate), spread(ingest[-max(len(results), 1):]) if ingest else None,
                                (len(results) * args.clip_frames) / elapsed if results else None,
                                stats["bytes"], measured, prefilled,
                                extra={"context_tokens": answer.prompt_tokens - answer.prompt_tokens_computed,
                                       "ingest_s_all_clips": list(ingest), "long_term_tokens": stats["long_term_tokens"],
                                       "peak_memory_bytes": max(peak, stats["bytes"]), **memory.peaks()}))
            progress(f"{name} {length} frames: TTFT {points[-1].ttft_s['median'] * 1000:.0f} ms")
        if args.profile and profile and name == "livevlm":
            self._profile(lv, stream, encoded)
        stream.close()
        return points

    def _profile(self, lv, stream, encoded: int) -> None:
        """torch.profiler traces and op tables (`<prefix>_*.profiler_out.txt` in `--profile`) of one more clip
        and one question of the longest livevlm stream: where an ingest and an answer spend their time."""
        clip = self.frames[encoded:encoded + self.args.clip_frames]
        for prefix, work in (("clip", lambda: stream.append(clip)),
                             ("question", lambda: stream.ask(QUESTION, self._sampling()))):
            lv._run(lv.engine.start_profile(profile_prefix=prefix))
            try:
                work()
            finally:
                lv._run(lv.engine.stop_profile())

    def _run_vanilla(self, engine, runner, tokenizer, pool: KVPoolProbe, name: str, progress) -> list[Point]:
        args = self.args
        points, prefilled = [], 0
        for length in sorted(args.lengths):
            frames = self._frames_for(name, length)
            tokens = self._video_tokens(len(frames))  # upper bound used to skip before running
            if tokens > args.max_vanilla_tokens:
                points.append(Point(length, skipped=f"{tokens} prompt tokens > --max-vanilla-tokens {args.max_vanilla_tokens}"))
                progress(f"{name} {length} frames: skipped")
                continue
            prompt = self._vanilla_prompt(tokenizer, frames)
            ttft, rate = [], []
            output = None
            reps = args.reps if tokens <= args.long_prompt_tokens else min(args.reps, args.long_prompt_reps)
            pool.reset()
            try:
                for _ in range(reps):
                    self.request += 1
                    first, decode, output = _timed_answer(engine, prompt, args.answer_tokens, f"bench-{self.request}",
                                                          runner)
                    ttft.append(first)
                    rate.append(decode)
                    prefilled += len(output.prompt_token_ids)
            except Exception as e:  # e.g. out of KV cache: recorded, the other systems still run
                points.append(Point(length, skipped=f"request failed: {str(e)[:160]}"))
                progress(f"{name} {length} frames: skipped")
                continue
            points.append(Point(length, spread(ttft), spread(rate), None, None,
                                len(output.prompt_token_ids) * self.kv_bytes_per_token, pool.peak_bytes(), prefilled,
                                extra={"prompt_tokens": len(output.prompt_token_ids), "frames_used": len(frames)}))
            progress(f"{name} {length} frames: TTFT {points[-1].ttft_s['median'] * 1000:.0f} ms")
        return points

    def _run_streaming_session(self, engine, runner, tokenizer, pool: KVPoolProbe, progress) -> list[Point]:
        """vllm-streaming: the whole stream is one resumable request; clips are appended as they arrive and
        the questions are asked at the same lengths as the other systems (one turn each)."""
        args = self.args
        self.request += 1
        session = StreamingSession(engine, runner, f"bench-{self.request}-session")
        sink = tokenizer.encode("<|im_start|>user\n", add_special_tokens=False)
        reopen = tokenizer.encode("<|im_end|>\n<|im_start|>user\n", add_special_tokens=False)  # after an answer
        turn = tokenizer.encode(f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
        video = self.adapter.video_prompt(tokenizer)
        points, ingest, prefilled, encoded, answered, failure = [], [], 0, 0, False, None
        try:
            for length in sorted(args.lengths):
                # At most: the frames' clips, the turns, the kept answers.
                need = (session.tokens + len(sink) + self._video_tokens(length - encoded)
                        + args.reps * (len(reopen) + len(turn) + args.answer_tokens))
                if failure is None and need > min(args.max_vanilla_tokens, args.max_model_len):
                    # vLLM 0.32 does not bound a session by max_model_len: one that outgrows it kills the
                    # engine core ("could not broadcast input array from shape (2462,) into shape (1700,)").
                    failure = (f"the session would reach {need} tokens > max_model_len {args.max_model_len} or "
                               f"--max-vanilla-tokens {args.max_vanilla_tokens} (vLLM 0.32 does not stop a "
                               "streaming session at max_model_len: its engine core dies)")
                if failure is not None:
                    points.append(Point(length, skipped=failure))
                    progress(f"{STREAMING_SYSTEM} {length} frames: skipped")
                    continue
                pool.reset()
                clips, ttft, rate, appended = [], [], [], length - encoded
                try:
                    for clip_start in range(encoded, length, args.clip_frames):
                        head = sink if not session.tokens else reopen if answered else []
                        clip = self.frames[clip_start:min(clip_start + args.clip_frames, length)]
                        item = self.adapter.video_item(clip, self.fps, clip_start)  # stream time (Qwen3-VL)
                        seconds, _, added = session.send({"prompt_token_ids": head + video,
                                                          "multi_modal_data": {"video": [item]}}, 1)
                        clips.append(seconds)
                        prefilled += added
                        answered = False
                    encoded = length
                    for _ in range(args.reps):
                        first, decode, added = session.send({"prompt_token_ids": (reopen if answered else []) + turn},
                                                            args.answer_tokens)
                        ttft.append(first)
                        rate.append(decode)
                        prefilled += added
                        answered = True
                except Exception as e:  # recorded with vLLM's error; the other systems still run
                    failure = f"session failed: {type(e).__name__}: {str(e)[:200]}"
                    points.append(Point(length, skipped=failure))
                    progress(f"{STREAMING_SYSTEM} {length} frames: skipped")
                    continue
                ingest += clips
                points.append(Point(length, spread(ttft), spread(rate), spread(clips) if clips else None,
                                    appended / sum(clips) if clips else None,
                                    session.tokens * self.kv_bytes_per_token, pool.peak_bytes(), prefilled,
                                    extra={"session_tokens": session.tokens, "ingest_s_all_clips": list(ingest)}))
                progress(f"{STREAMING_SYSTEM} {length} frames: TTFT {points[-1].ttft_s['median'] * 1000:.0f} ms")
        finally:
            session.close()
        return points

    def lengths_for(self, name: str) -> list[int]:
        """Every system runs `--lengths`; the bounded-memory ones also run `--long-lengths` (the others' memory
        or question context grows with the stream, which the shorter lengths already show)."""
        extra = self.args.long_lengths if name in BOUNDED_SYSTEMS else []
        return sorted(set(self.args.lengths) | set(extra))

    def _frames_for(self, name: str, length: int) -> np.ndarray:
        frames = self.frames[:length]
        if name == "vanilla-32":
            return frames[uniform_indices(length, 32)]
        if name == "recent-4":
            return frames[-4:]
        return frames

    def _vanilla_prompt(self, tokenizer, frames: np.ndarray) -> dict:
        clip = self.args.clip_frames
        starts = range(0, len(frames), clip)
        sink = tokenizer.encode("<|im_start|>user\n", add_special_tokens=False)
        turn = tokenizer.encode(f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
        video = self.adapter.video_prompt(tokenizer)
        # Each item at its place in the stream (Qwen3-VL's prompt shows stream time, as LiveVLM's clips do).
        return {"prompt_token_ids": sink + video * len(starts) + turn,
                "multi_modal_data": {"video": [self.adapter.video_item(frames[i:i + clip], self.fps, i)
                                               for i in starts]}}

    def _video_tokens(self, frames: int) -> int:
        """Prompt tokens of `frames` frames as clips of --clip-frames, at most (the model's video layout)."""
        clip = self.args.clip_frames
        return sum(self.adapter.max_clip_tokens(min(clip, frames - start)) for start in range(0, frames, clip))

    # ---- vanilla with prefix caching (a stock engine) ----------------------------------------------------
    def run_prefix_engine(self, model: str, progress) -> None:
        import asyncio
        import threading

        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self.args
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()

        def runner(coro):
            return asyncio.run_coroutine_threadsafe(coro, loop).result()

        async def start():
            return AsyncLLM.from_engine_args(AsyncEngineArgs(
                model=model, dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=args.eager,
                enable_prefix_caching=True,
                max_num_batched_tokens=max(self.adapter.max_clip_tokens(args.clip_frames) + 512, 8192),
                disable_chunked_mm_input=True,
                limit_mm_per_prompt={"video": max(args.lengths) // args.clip_frames + 1, "image": 0}))

        engine = runner(start())
        tokenizer = engine.get_tokenizer()
        pool = self._pool_probe(engine)
        points, prefilled = [], 0
        try:
            warm = self._vanilla_prompt(tokenizer, self.frames[:args.clip_frames])
            _timed_answer(engine, warm, args.answer_tokens, "bench-prefix-warm", runner)
            for length in sorted(args.lengths):
                if self._video_tokens(length) > args.max_vanilla_tokens:
                    points.append(Point(length, skipped=f"{self._video_tokens(length)} prompt tokens > --max-vanilla-tokens"))
                    continue
                prompt = self._vanilla_prompt(tokenizer, self.frames[:length])
                # Ingest: the frames that arrived since the last question are prefilled once (the rest hit the cache).
                self.request += 1
                start = time.perf_counter()
                _, _, output = _timed_answer(engine, prompt, 2, f"bench-{self.request}", runner)
                ingest = time.perf_counter() - start
                prefilled += len(output.prompt_token_ids) - (output.num_cached_tokens or 0)
                ttft, rate = [], []
                pool.reset()
                for _ in range(args.reps):
                    self.request += 1
                    first, decode, output = _timed_answer(engine, prompt, args.answer_tokens, f"bench-{self.request}", runner)
                    ttft.append(first)
                    rate.append(decode)
                    prefilled += len(output.prompt_token_ids) - (output.num_cached_tokens or 0)
                points.append(Point(length, spread(ttft), spread(rate), None, None,
                                    len(output.prompt_token_ids) * self.kv_bytes_per_token, pool.peak_bytes(), prefilled,
                                    extra={"ingest_new_frames_s": ingest}))
                progress(f"vanilla-prefix {length} frames: TTFT {points[-1].ttft_s['median'] * 1000:.0f} ms")
        finally:
            engine.shutdown()
            loop.call_soon_threadsafe(loop.stop)
        self.results["vanilla-prefix"] = points

    # ---- compiled vs eager (--compiled) --------------------------------------------------------------------
    def compiled_vs_eager(self) -> list[dict[str, Any]]:
        """Per stream length, livevlm on the default (compiled) engine against `livevlm-eager`: medians of
        both and compiled over eager (decode: > 1 is faster; clip and question step times: < 1 is faster)."""
        eager = {p.frames: p for p in self.results.get("livevlm-eager", []) if not p.skipped}
        rows = []
        for p in self.results.get("livevlm", []):
            e = eager.get(p.frames)
            if p.skipped or e is None:
                continue
            row: dict[str, Any] = {"frames": p.frames}
            for key, ours, theirs in (("decode_tokens_per_s", p.decode_tokens_per_s, e.decode_tokens_per_s),
                                      ("clip_step_s", p.ingest_s_per_clip, e.ingest_s_per_clip),
                                      ("question_ttft_s", p.ttft_s, e.ttft_s)):
                if ours and theirs:
                    row[key] = {"compiled": ours["median"], "eager": theirs["median"],
                                "compiled_over_eager": ours["median"] / theirs["median"]}
            rows.append(row)
        return rows

    def compiled_table(self) -> list[str]:
        lines = ["compiled (vLLM's default compilation) vs --enforce-eager, livevlm, medians:",
                 f"  {'frames':>6} {'decode tok/s c / e (x)':>28} {'clip s c / e (x)':>24} {'question TTFT ms c / e (x)':>30}"]
        for row in self.compiled_vs_eager():
            cells = []
            for key, scale, fmt in (("decode_tokens_per_s", 1, ".1f"), ("clip_step_s", 1, ".2f"),
                                    ("question_ttft_s", 1000, ".0f")):
                r = row.get(key)
                cells.append(f"{r['compiled'] * scale:{fmt}} / {r['eager'] * scale:{fmt}} ({r['compiled_over_eager']:.2f})"
                             if r else "-")
            lines.append(f"  {row['frames']:>6} {cells[0]:>28} {cells[1]:>24} {cells[2]:>30}")
        cost = self.op_cost
        if cost:
            lines.append(f"  LiveVLM op on a decode step without LiveVLM work: {cost['op_overhead_us_per_step']:.1f} us "
                         f"of {cost['step_us']:.0f} us ({cost['op_overhead_share'] * 100:.2f}%): {cost['op_calls']} calls "
                         f"in {cost['steps']} steps, {cost['op_call_us']:.2f} us a call of which its RoPE "
                         f"{cost['rope_call_us']:.2f} us")
        return lines

    # ---- summary -------------------------------------------------------------------------------------------
    @staticmethod
    def _kv_bytes_per_token(text_config, dtype: str) -> int:
        head_dim = text_config.hidden_size // text_config.num_attention_heads
        element = 4 if dtype == "float32" else 2
        return 2 * text_config.num_hidden_layers * text_config.num_key_value_heads * head_dim * element

    def max_frames(self) -> dict[str, Any]:
        """The '44x' analogue, from measured (allocated) bytes: the fixed budget is the most memory livevlm's
        stream ever held (measured after every clip of its longest run); livevlm held every frame of that run
        in it. How many frames do the systems that keep every frame's KV hold in that same memory, and in
        `--budget-gib`? The same figures from the reported bytes stand beside them (`*_reported`)."""
        budget = self.args.budget_gib * 2**30
        out: dict[str, Any] = {}
        ours = [p for p in self.results.get("livevlm", []) if not p.skipped]
        for name, points in self.results.items():
            held = [p for p in points if not p.skipped and p.measured_memory_bytes]
            if not held or name == "livevlm-eager":  # livevlm's memory again (--compiled compares its speed)
                continue
            last = held[-1]
            if name in ("vanilla-32", "recent-4"):
                out[name] = {"frames_in_budget": None, "note": "sees a fixed number of frames, drops the rest"}
            elif name in BOUNDED_SYSTEMS:
                out[name] = {"frames_in_budget": None, "frames_held": last.frames,
                             "peak_measured_memory_bytes": last.extra["peak_measured_memory_bytes"],
                             "peak_memory_bytes": last.extra["peak_memory_bytes"],
                             "note": "memory bounded by its config, any stream length"}
            else:
                per_frame = last.measured_memory_bytes / last.frames
                per_frame_reported = last.memory_bytes / last.frames
                entry = {"frames_in_budget": int(budget / per_frame), "bytes_per_frame": per_frame,
                         "bytes_per_frame_reported": per_frame_reported}
                if ours:
                    same_memory = int(ours[-1].extra["peak_measured_memory_bytes"] / per_frame)
                    same_reported = int(ours[-1].extra["peak_memory_bytes"] / per_frame_reported)
                    entry.update(frames_in_livevlm_memory=same_memory,
                                 livevlm_ratio=ours[-1].frames / max(same_memory, 1),
                                 frames_in_livevlm_memory_reported=same_reported,
                                 livevlm_ratio_reported=ours[-1].frames / max(same_reported, 1))
                out[name] = entry
        return out

    def targets(self) -> dict[str, float | None]:
        """The benchmark issue's targets as ratios from this run (None where a point was not measured)."""
        def ttft(name: str, frames: int) -> float | None:
            point = next((p for p in self.results.get(name, []) if p.frames == frames and not p.skipped), None)
            return point.ttft_s["median"] if point else None

        def ratio(a: float | None, b: float | None) -> float | None:
            return a / b if a is not None and b else None

        ours = [p for p in self.results.get("livevlm", []) if not p.skipped]
        clips = ours[-1].extra.get("ingest_s_all_clips", []) if ours else []
        longest = max((p.frames for p in ours), default=None)
        vanilla = self.max_frames().get("vanilla", {})
        return {"vanilla_over_livevlm_ttft_256": ratio(ttft("vanilla", 256), ttft("livevlm", 256)),
                "fullkv_over_livevlm_ttft_256": ratio(ttft("fullkv-retrieval", 256), ttft("livevlm", 256)),
                "livevlm_longest_frames": longest,
                "livevlm_ttft_longest_over_64": ratio(ttft("livevlm", longest), ttft("livevlm", 64)) if longest else None,
                "livevlm_last_over_4th_clip_ingest": ratio(clips[-1], clips[3]) if len(clips) >= 5 else None,
                "livevlm_frames_over_vanilla_frames_same_memory": vanilla.get("livevlm_ratio"),
                "livevlm_frames_over_vanilla_frames_same_memory_reported": vanilla.get("livevlm_ratio_reported"),
                "livevlm_measured_over_reported_bytes": ratio(ours[-1].extra["peak_measured_memory_bytes"],
                                                              ours[-1].extra["peak_memory_bytes"]) if ours else None}

    def table(self) -> str:
        lines = [f"{'system':<17} {'frames':>6} {'TTFT ms (min-max)':>22} {'decode tok/s':>12} {'ingest s/clip':>13} "
                 f"{'reported MiB':>12} {'measured MiB':>12} {'vision tok prefilled':>20}"]
        for name, points in self.results.items():
            for p in points:
                if p.skipped:
                    lines.append(f"{name:<17} {p.frames:>6}  skipped: {p.skipped}")
                    continue
                t = p.ttft_s
                ingest = f"{p.ingest_s_per_clip['median']:.2f}" if p.ingest_s_per_clip else "-"
                lines.append(f"{name:<17} {p.frames:>6} {t['median'] * 1000:>8.0f} ({t['min'] * 1000:.0f}-{t['max'] * 1000:.0f})"
                             f"{'':>3} {p.decode_tokens_per_s['median']:>12.1f} {ingest:>13} "
                             f"{p.memory_bytes / 2**20:>12.1f} {p.measured_memory_bytes / 2**20:>12.1f} "
                             f"{p.vision_tokens_prefilled:>20}"
                             + (f"  (n={t['n']})" if t["n"] != self.args.reps else ""))
        lines.append("")
        lines.append(f"frames held, measured bytes (KV budget {self.args.budget_gib} GiB; 'x' = livevlm's frames / "
                     "frames this system holds in livevlm's peak memory; reported bytes in brackets):")
        for name, entry in self.max_frames().items():
            if entry["frames_in_budget"] is None:
                held = entry["note"] + (f" (held {entry['frames_held']} frames, at most "
                                        f"{entry['peak_measured_memory_bytes'] / 2**20:.1f} MiB "
                                        f"[{entry['peak_memory_bytes'] / 2**20:.1f}])" if "frames_held" in entry else "")
            else:
                held = f"{entry['frames_in_budget']} frames in budget"
                if "livevlm_ratio" in entry:
                    held += (f"; {entry['frames_in_livevlm_memory']} in livevlm's memory -> {entry['livevlm_ratio']:.1f}x "
                             f"[{entry['frames_in_livevlm_memory_reported']} -> {entry['livevlm_ratio_reported']:.1f}x]")
            lines.append(f"  {name:<17} {held}")
        if "livevlm-eager" in self.results:
            lines += [""] + self.compiled_table()
        lines.append("")
        lines.append("targets (ratios from this run):")
        for key, value in self.targets().items():
            lines.append(f"  {key:<56} {'not measured' if value is None else f'{value:.2f}'}")
        return "\n".join(lines)

    def save(self, out_dir: str, machine: str) -> str:
        os.makedirs(out_dir, exist_ok=True)
        stamp = datetime.date.today().isoformat()
        path = os.path.join(out_dir, f"{stamp}-{machine}.json")
        data = {"date": stamp, "machine": machine, "platform": platform.platform(), "args": vars(self.args),
                "results": {n: [p.__dict__ for p in ps] for n, ps in self.results.items()},
                "kv_bytes_per_token": self.kv_bytes_per_token, "kv_block_tokens": self.kv_block_tokens,
                "max_frames": self.max_frames(), "targets": self.targets()}
        if "livevlm-eager" in self.results:
            data["compiled"] = {"vs_eager": self.compiled_vs_eager(), "decode_op_cost": self.op_cost}
        with open(path, "w") as f:
            json.dump(data, f, indent=2, default=str)
        self._plot(path[:-5])
        return path

    def _plot(self, prefix: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for key, label, scale, suffix in (("ttft_s", "TTFT (ms)", 1000, "ttft"),
                                          ("measured_memory_bytes", "session memory, measured (MiB)", 1 / 2**20, "memory")):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for name, points in self.results.items():
                xs = [p.frames for p in points if not p.skipped]
                ys = [(p.ttft_s["median"] if key == "ttft_s" else p.measured_memory_bytes) * scale
                      for p in points if not p.skipped]
                if xs:
                    ax.plot(xs, ys, marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("stream length (frames)")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(f"{prefix}-{suffix}.png", dpi=120)
            plt.close(fig)


def decode_op_cost(model: str, dtype: str, max_model_len: int, tokens: int = 64) -> dict[str, float]:
    """What `livevlm::rotary_with_hooks` costs on steps without LiveVLM work, on an in-process LiveVLM engine
    under vLLM's default compilation: how often a decode step calls it (torch.profiler over one plain request:
    nothing traced away) times what one call costs beyond the RoPE it runs (vLLM's own attention rotates too),
    against the step's wall time. The call is timed outside the profiler (which costs more per event than the
    op itself): the real op, on the engine's own layer, connector and forward context, with no LiveVLM
    requests bound, interleaved with the layer's bare rotation. Run it before any other engine in the process:
    it needs vLLM's in-process engine core."""
    import torch
    from vllm import LLM, SamplingParams

    from vllm_livevlm.config import LiveVLMConfig
    from vllm_livevlm.cpu_kv import kv_pool_args
    from vllm_livevlm.model.ops import OP_NAME
    from vllm_livevlm.streams import engine_args_for, tokens_per_frame_of

    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model runs in this process: the profiler sees it
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    args = engine_args_for(model, LiveVLMConfig(), tokens_per_frame_of(model), dtype=dtype, max_model_len=max_model_len)
    args.update(kv_pool_args(model, args))
    llm = LLM(**args)
    try:
        prompt = {"prompt_token_ids": list(range(100, 132))}
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        llm.generate(prompt, params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        step_us = (time.perf_counter() - start) * 1e6 / tokens
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            llm.generate(prompt, params, use_tqdm=False)
        op_us, rope_us = _op_call_us(llm.llm_engine.vllm_config)
    finally:
        llm.llm_engine.engine_core.shutdown()
        if saved is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved
    calls = next(e.count for e in prof.key_averages() if e.key == OP_NAME)
    overhead = max(op_us - rope_us, 0.0) * calls / tokens
    return {"steps": tokens, "op_calls": calls, "step_us": step_us, "op_call_us": op_us, "rope_call_us": rope_us,
            "op_overhead_us_per_step": overhead, "op_overhead_share": overhead / step_us}


def _op_call_us(vllm_config, calls: int = 2000, rounds: int = 15) -> tuple[float, float]:
    """Median µs of one `livevlm::rotary_with_hooks` call and of the bare rotation it runs, one decode token,
    on the first LiveVLM layer of the engine in this process (rounds of each, interleaved)."""
    import torch
    from vllm.forward_context import set_forward_context

    layers = vllm_config.compilation_config.static_forward_context
    name, attn = next((n, a) for n, a in layers.items() if hasattr(a, "livevlm_hooks"))
    dtype, device = vllm_config.model_config.dtype, vllm_config.device_config.device
    q = torch.randn(1, attn.num_heads * attn.head_size, dtype=dtype, device=device)
    k = torch.randn(1, attn.num_kv_heads * attn.head_size, dtype=dtype, device=device)
    v, positions = torch.randn_like(k), torch.tensor([7], device=device)
    op = torch.ops.livevlm.rotary_with_hooks.default

    def per_call(fn) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) * 1e6 / calls

    samples: dict[str, list[float]] = {"op": [], "rope": []}
    with set_forward_context(None, vllm_config):
        for _ in range(rounds):
            samples["op"].append(per_call(lambda: op(positions, q, k, v, name)))
            samples["rope"].append(per_call(lambda: attn.livevlm_hooks.rope(positions, q, k)))
    return statistics.median(samples["op"]), statistics.median(samples["rope"])


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    from vllm_livevlm.model.adapter import adapter_for_model
    from vllm_livevlm.testing.tiny_model import ensure_tiny_model, preset_names

    parser = argparse.ArgumentParser(prog="vllm-livevlm bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-preset", default="bench", choices=preset_names())
    parser.add_argument("--model", default=None, help="a checkpoint instead of a random preset model")
    parser.add_argument("--systems", default=",".join(ALL_SYSTEMS))
    parser.add_argument("--lengths", default="16,64,256", help="stream lengths in frames, every system")
    parser.add_argument("--long-lengths", default="1024",
                        help="longer stream lengths run only by the bounded-memory systems (livevlm, sliding-window)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--clip-frames", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--frame-size", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's, at most 65536")
    parser.add_argument("--max-vanilla-tokens", type=int, default=52000,
                        help="skip stock-vLLM points whose prompt would exceed this (time and memory)")
    parser.add_argument("--long-prompt-tokens", type=int, default=26000,
                        help="stock-vLLM prompts longer than this run --long-prompt-reps times (minutes each on a CPU)")
    parser.add_argument("--long-prompt-reps", type=int, default=2)
    parser.add_argument("--budget-gib", type=float, default=16.0, help="KV budget for the max-frames figure")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="torch-profile one more clip and one question of livevlm's longest stream into DIR")
    parser.add_argument("--eager", action="store_true", help="every engine with --enforce-eager")
    parser.add_argument("--compiled", action="store_true",
                        help="livevlm also under --enforce-eager: compiled over eager, and the op's decode-step cost")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--machine", default=None, help="name used in the output file (default: cpu-<cores> or the GPU)")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = set(args.systems) - set(ALL_SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {ALL_SYSTEMS}")
    if args.eager and args.compiled:
        parser.error("--compiled compares against --enforce-eager itself: drop --eager")
    args.lengths = sorted(int(x) for x in args.lengths.split(","))
    args.long_lengths = sorted(int(x) for x in args.long_lengths.split(",") if x)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "8")
    model = args.model or ensure_tiny_model(os.path.join(os.path.expanduser("~/.cache/vllm-livevlm"), args.model_preset),
                                            preset=args.model_preset)
    if args.max_model_len is None:
        from transformers import AutoConfig

        args.max_model_len = min(AutoConfig.from_pretrained(model).text_config.max_position_embeddings, 65536)
    machine = args.machine or _machine_name()
    bench = Bench(args, adapter_for_model(model))
    if args.compiled:
        bench.op_cost = decode_op_cost(model, args.dtype, args.max_model_len)
    total = sum(len(bench.lengths_for(s)) for s in args.systems) + (len(bench.lengths_for("livevlm")) if args.compiled else 0)
    with tqdm(total=total, desc="bench", unit="point") as bar:
        def progress(message: str) -> None:
            bar.set_postfix_str(message)
            bar.update(1)

        bench.run_livevlm_engine(model, progress)
        if args.compiled:
            bench.run_livevlm_engine(model, progress, enforce_eager=True)
        if "vanilla-prefix" in args.systems:
            bench.run_prefix_engine(model, progress)
    order = [s for s in [*args.systems, "livevlm-eager"] if s in bench.results]
    bench.results = {s: bench.results[s] for s in order}
    print()
    print(bench.table())
    print(f"\nwrote {bench.save(args.out, machine)} (+ -ttft.png, -memory.png)")


def _machine_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0).replace(" ", "-").lower()
    except Exception:
        pass
    return f"cpu-{os.cpu_count()}cores"


if __name__ == "__main__":
    main()
