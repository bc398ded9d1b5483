"""`vllm-livevlm bench` / `scripts/bench.py`: LiveVLM against the systems users would pick instead.

Every system runs on the same model, frames and questions, on this machine, in one invocation:
- vanilla: stock vLLM, every question re-prefills all frames so far (one video item per clip) + question;
- vanilla-prefix: stock vLLM with prefix caching on; the video so far is a growing prefix (only new frames
  are prefilled when they arrive), its KV grows without bound;
- vanilla-32: stock vLLM over 32 uniformly sampled frames; recent-4: stock vLLM over the last 4 frames;
- sliding-window: LiveVLM with no long-term memory (sinks + short-term window, StreamingLLM-style);
- fullkv-retrieval: LiveVLM with compression off and window encoding (ReKV-style: every clip's KV kept,
  top pages retrieved per question);
- livevlm: LiveVLM at its default configuration.
Vanilla, vanilla-32 and recent-4 run as ordinary requests on the LiveVLM engine (its model variant runs
vLLM's own Qwen2 math for them; prefix caching off, eager like every system here); vanilla-prefix needs
prefix caching and runs on a second, stock engine. Timings exclude a warm-up; each figure is the median
of `--reps` repetitions with min and max (`--long-prompt-reps` for stock-vLLM prompts over
`--long-prompt-tokens`: those take minutes each on a CPU). Writes `bench_results/<date>-<machine>.json`
and PNG plots.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

QUESTION = "What is happening in the video right now?"
LIVEVLM_SYSTEMS = {
    "sliding-window": {"long_term_budget_tokens": 0, "encode_context": "window"},
    "fullkv-retrieval": {"long_term_budget_tokens": None, "encode_context": "window"},
    "livevlm": {},
}
VANILLA_SYSTEMS = ("vanilla", "vanilla-32", "recent-4")
BOUNDED_SYSTEMS = ("sliding-window", "livevlm")  # memory bounded by config: the only ones run to --long-lengths
ALL_SYSTEMS = ("vanilla", "vanilla-prefix", "vanilla-32", "recent-4", "sliding-window", "fullkv-retrieval", "livevlm")


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
    memory_bytes: int = 0
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


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.frames = np.random.default_rng(args.seed).integers(
            0, 256, size=(max(args.lengths + args.long_lengths) + (args.clip_frames if args.profile else 0),
                          args.frame_size, args.frame_size, 3), dtype=np.uint8)
        self.results: dict[str, list[Point]] = {}
        self.request = 0

    # ---- LiveVLM systems (and stock requests on the same engine) ---------------------------------------
    def run_livevlm_engine(self, model: str, progress) -> None:
        from vllm_livevlm import LiveVLM

        args = self.args
        base = {"clip_frames": args.clip_frames}
        profiling = {"profiler_config": {"profiler": "torch", "torch_profiler_dir": os.path.abspath(args.profile),
                                         "torch_profiler_with_stack": False, "torch_profiler_use_gzip": True}
                     } if args.profile else {}
        lv = LiveVLM(model, base, max_model_len=args.max_model_len, dtype=args.dtype,
                     limit_mm_per_prompt={"video": max(args.lengths) // args.clip_frames + 1, "image": 0},  # vanilla's clips
                     **profiling)
        self.kv_bytes_per_token = self._kv_bytes_per_token(lv.engine.model_config.hf_config.text_config, args.dtype)
        try:
            self._warm_up(lv)
            for name in args.systems:
                if name in LIVEVLM_SYSTEMS:
                    self.results[name] = self._run_stream_system(lv, name, LIVEVLM_SYSTEMS[name], progress)
                elif name in VANILLA_SYSTEMS:
                    self.results[name] = self._run_vanilla(lv.engine, lv._run, lv.tokenizer, name, progress)
        finally:
            lv.shutdown()

    def _warm_up(self, lv) -> None:
        stream = lv.open_stream()
        stream.append(self.frames[: self.args.clip_frames])
        stream.ask(QUESTION, self._sampling())
        stream.close()

    def _sampling(self):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=self.args.answer_tokens, temperature=0.0, ignore_eos=True)

    def _run_stream_system(self, lv, name: str, overrides: dict, progress) -> list[Point]:
        args = self.args
        stream = lv.open_stream(overrides)
        points, ingest, prefilled, encoded, peak = [], [], 0, 0, 0
        for length in self.lengths_for(name):
            start = time.perf_counter()
            results = []
            for clip_start in range(encoded, length, args.clip_frames):  # clip by clip: memory sampled after each
                results += stream.append(self.frames[clip_start:min(clip_start + args.clip_frames, length)])
                peak = max(peak, stream.stats()["bytes"])
            elapsed = time.perf_counter() - start
            encoded = length
            ingest += [r.seconds for r in results]
            prefilled += sum(r.prompt_tokens_computed for r in results)
            ttft, rate = [], []
            try:
                answer = stream.ask(QUESTION, self._sampling())
            except Exception as e:  # e.g. the question context outgrew max_model_len (no compression)
                points.append(Point(length, skipped=f"question failed: {str(e)[:160]}",
                                    memory_bytes=stream.stats()["bytes"]))
                progress(f"{name} {length} frames: skipped")
                continue
            for _ in range(args.reps):
                answer = stream.ask(QUESTION, self._sampling())
                ttft.append(answer.timings["ttft"])
                rate.append((len(answer.token_ids) - 1) / max(answer.timings["total"] - answer.timings["ttft"]
                                                              - answer.timings["flush"], 1e-9))
                prefilled += answer.prompt_tokens_computed
            stats = stream.stats()
            points.append(Point(length, spread(ttft), spread(rate), spread(ingest[-max(len(results), 1):]) if ingest else None,
                                (len(results) * args.clip_frames) / elapsed if results else None,
                                stats["bytes"], prefilled,
                                extra={"context_tokens": answer.prompt_tokens - answer.prompt_tokens_computed,
                                       "ingest_s_all_clips": list(ingest), "long_term_tokens": stats["long_term_tokens"],
                                       "peak_memory_bytes": max(peak, stats["bytes"])}))
            progress(f"{name} {length} frames: TTFT {points[-1].ttft_s['median'] * 1000:.0f} ms")
        if args.profile and name == "livevlm":
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

    def _run_vanilla(self, engine, runner, tokenizer, name: str, progress) -> list[Point]:
        args = self.args
        points, prefilled = [], 0
        for length in sorted(args.lengths):
            frames = self._frames_for(name, length)
            tokens = len(frames) * 197  # upper bound used to skip before running (196 per frame + newline)
            if tokens > args.max_vanilla_tokens:
                points.append(Point(length, skipped=f"{tokens} prompt tokens > --max-vanilla-tokens {args.max_vanilla_tokens}"))
                progress(f"{name} {length} frames: skipped")
                continue
            prompt = self._vanilla_prompt(tokenizer, frames)
            ttft, rate = [], []
            output = None
            reps = args.reps if tokens <= args.long_prompt_tokens else min(args.reps, args.long_prompt_reps)
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
                                len(output.prompt_token_ids) * self.kv_bytes_per_token, prefilled,
                                extra={"prompt_tokens": len(output.prompt_token_ids), "frames_used": len(frames)}))
            progress(f"{name} {length} frames: TTFT {points[-1].ttft_s['median'] * 1000:.0f} ms")
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
        items = [frames[i:i + clip] for i in range(0, len(frames), clip)]
        sink = tokenizer.encode("<|im_start|>user\n", add_special_tokens=False)
        turn = tokenizer.encode(f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
        video = tokenizer.convert_tokens_to_ids("<video>")
        return {"prompt_token_ids": sink + [video] * len(items) + turn, "multi_modal_data": {"video": items}}

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
                model=model, dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=True,
                enable_prefix_caching=True, max_num_batched_tokens=max(args.clip_frames * 197 + 512, 8192),
                disable_chunked_mm_input=True,
                limit_mm_per_prompt={"video": max(args.lengths) // args.clip_frames + 1, "image": 0}))

        engine = runner(start())
        tokenizer = engine.get_tokenizer()
        points, prefilled = [], 0
        try:
            warm = self._vanilla_prompt(tokenizer, self.frames[:args.clip_frames])
            _timed_answer(engine, warm, args.answer_tokens, "bench-prefix-warm", runner)
            for length in sorted(args.lengths):
                if length * 197 > args.max_vanilla_tokens:
                    points.append(Point(length, skipped=f"{length * 197} prompt tokens > --max-vanilla-tokens"))
                    continue
                prompt = self._vanilla_prompt(tokenizer, self.frames[:length])
                # Ingest: the frames that arrived since the last question are prefilled once (the rest hit the cache).
                self.request += 1
                start = time.perf_counter()
                _, _, output = _timed_answer(engine, prompt, 2, f"bench-{self.request}", runner)
                ingest = time.perf_counter() - start
                prefilled += len(output.prompt_token_ids) - (output.num_cached_tokens or 0)
                ttft, rate = [], []
                for _ in range(args.reps):
                    self.request += 1
                    first, decode, output = _timed_answer(engine, prompt, args.answer_tokens, f"bench-{self.request}", runner)
                    ttft.append(first)
                    rate.append(decode)
                    prefilled += len(output.prompt_token_ids) - (output.num_cached_tokens or 0)
                points.append(Point(length, spread(ttft), spread(rate), None, None,
                                    len(output.prompt_token_ids) * self.kv_bytes_per_token, prefilled,
                                    extra={"ingest_new_frames_s": ingest}))
                progress(f"vanilla-prefix {length} frames: TTFT {points[-1].ttft_s['median'] * 1000:.0f} ms")
        finally:
            engine.shutdown()
            loop.call_soon_threadsafe(loop.stop)
        self.results["vanilla-prefix"] = points

    # ---- summary -------------------------------------------------------------------------------------------
    @staticmethod
    def _kv_bytes_per_token(text_config, dtype: str) -> int:
        head_dim = text_config.hidden_size // text_config.num_attention_heads
        element = 4 if dtype == "float32" else 2
        return 2 * text_config.num_hidden_layers * text_config.num_key_value_heads * head_dim * element

    def max_frames(self) -> dict[str, Any]:
        """The '44x' analogue, measured: the fixed budget is the most memory livevlm's stream ever held (sampled
        after every clip of its longest run); livevlm held every frame of that run in it. How many frames do the
        systems that keep every frame's KV hold in that same budget, and in `--budget-gib`?"""
        budget = self.args.budget_gib * 2**30
        out: dict[str, Any] = {}
        ours = [p for p in self.results.get("livevlm", []) if not p.skipped]
        ours_peak = ours[-1].extra.get("peak_memory_bytes", ours[-1].memory_bytes) if ours else 0
        for name, points in self.results.items():
            measured = [p for p in points if not p.skipped and p.memory_bytes]
            if not measured:
                continue
            last = measured[-1]
            if name in ("vanilla-32", "recent-4"):
                out[name] = {"frames_in_budget": None, "note": "sees a fixed number of frames, drops the rest"}
            elif name in BOUNDED_SYSTEMS:
                out[name] = {"frames_in_budget": None, "frames_held": last.frames,
                             "peak_memory_bytes": last.extra.get("peak_memory_bytes", last.memory_bytes),
                             "note": "memory bounded by its config, any stream length"}
            else:
                per_frame = last.memory_bytes / last.frames
                entry = {"frames_in_budget": int(budget / per_frame), "bytes_per_frame": per_frame}
                if ours:
                    same_memory = int(ours_peak / per_frame)
                    entry.update(frames_in_livevlm_memory=same_memory,
                                 livevlm_ratio=ours[-1].frames / max(same_memory, 1))
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
                "livevlm_frames_over_vanilla_frames_same_memory": vanilla.get("livevlm_ratio")}

    def table(self) -> str:
        lines = [f"{'system':<17} {'frames':>6} {'TTFT ms (min-max)':>22} {'decode tok/s':>12} {'ingest s/clip':>13} "
                 f"{'memory MiB':>10} {'vision tok prefilled':>20}"]
        for name, points in self.results.items():
            for p in points:
                if p.skipped:
                    lines.append(f"{name:<17} {p.frames:>6}  skipped: {p.skipped}")
                    continue
                t = p.ttft_s
                ingest = f"{p.ingest_s_per_clip['median']:.2f}" if p.ingest_s_per_clip else "-"
                lines.append(f"{name:<17} {p.frames:>6} {t['median'] * 1000:>8.0f} ({t['min'] * 1000:.0f}-{t['max'] * 1000:.0f})"
                             f"{'':>3} {p.decode_tokens_per_s['median']:>12.1f} {ingest:>13} "
                             f"{p.memory_bytes / 2**20:>10.1f} {p.vision_tokens_prefilled:>20}"
                             + (f"  (n={t['n']})" if t["n"] != self.args.reps else ""))
        lines.append("")
        lines.append(f"frames held (KV budget {self.args.budget_gib} GiB; 'x' = livevlm's frames / frames this system "
                     "holds in livevlm's peak memory):")
        for name, entry in self.max_frames().items():
            if entry["frames_in_budget"] is None:
                held = entry["note"] + (f" (held {entry['frames_held']} frames, at most {entry['peak_memory_bytes'] / 2**20:.1f} MiB)"
                                        if "frames_held" in entry else "")
            else:
                held = f"{entry['frames_in_budget']} frames in budget"
                if "livevlm_ratio" in entry:
                    held += f"; {entry['frames_in_livevlm_memory']} in livevlm's memory -> {entry['livevlm_ratio']:.1f}x"
            lines.append(f"  {name:<17} {held}")
        lines.append("")
        lines.append("targets (ratios from this run):")
        for key, value in self.targets().items():
            lines.append(f"  {key:<48} {'not measured' if value is None else f'{value:.2f}'}")
        return "\n".join(lines)

    def save(self, out_dir: str, machine: str) -> str:
        os.makedirs(out_dir, exist_ok=True)
        stamp = datetime.date.today().isoformat()
        path = os.path.join(out_dir, f"{stamp}-{machine}.json")
        data = {"date": stamp, "machine": machine, "platform": platform.platform(), "args": vars(self.args),
                "results": {n: [p.__dict__ for p in ps] for n, ps in self.results.items()},
                "max_frames": self.max_frames(), "targets": self.targets()}
        with open(path, "w") as f:
            json.dump(data, f, indent=2, default=str)
        self._plot(path[:-5])
        return path

    def _plot(self, prefix: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for key, label, scale, suffix in (("ttft_s", "TTFT (ms)", 1000, "ttft"),
                                          ("memory_bytes", "session memory (MiB)", 1 / 2**20, "memory")):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for name, points in self.results.items():
                xs = [p.frames for p in points if not p.skipped]
                ys = [(p.ttft_s["median"] if key == "ttft_s" else p.memory_bytes) * scale for p in points if not p.skipped]
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


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    from vllm_livevlm.testing.tiny_model import ensure_tiny_model

    parser = argparse.ArgumentParser(prog="vllm-livevlm bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-preset", default="bench", choices=["tiny", "bench", "0.5b", "7b"])
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--machine", default=None, help="name used in the output file (default: cpu-<cores> or the GPU)")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = set(args.systems) - set(ALL_SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {ALL_SYSTEMS}")
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
    bench = Bench(args)
    total = sum(len(bench.lengths_for(s)) for s in args.systems)
    with tqdm(total=total, desc="bench", unit="point") as bar:
        def progress(message: str) -> None:
            bar.set_postfix_str(message)
            bar.update(1)

        bench.run_livevlm_engine(model, progress)
        if "vanilla-prefix" in args.systems:
            bench.run_prefix_engine(model, progress)
    order = [s for s in args.systems if s in bench.results]
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
