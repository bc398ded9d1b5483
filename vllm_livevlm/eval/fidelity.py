"""`vllm-livevlm fidelity`: how close LiveVLM and its baselines stay to full attention (any weights).

Users ask "how accurate is it?"; without trained weights accuracy cannot be measured, but fidelity to
full attention can, on any model including random-weight ones. Over one synthetic stream, for each
question:
- attention recall, per layer: of the probability mass that full attention (the question's queries over
  the whole uncompressed stream) puts on stream tokens, the share that falls on the tokens a system
  keeps and reads for that question (livevlm: retrieved long-term pages + short-term memory, per KV head);
- output agreement over the first `answer_tokens` answer tokens, teacher-forced on full attention's
  greedy answer: top-1 agreement and KL(full || system) of the next-token distributions.

Full attention is LiveVLM configured losslessly (no compression, every page read, clips encoded over
everything before them), which is token-for-token equal to stock vLLM over the same clips
(tests/test_stream_memory.py). Systems (bench.py's definitions): livevlm at its defaults; livevlm-read32
(its retrieve_ratio set so a question reads as many stream tokens as uniform-32 sees); sliding window
(no long-term memory); uniform-32 (stock vLLM over 32 uniformly sampled frames, run as a lossless stream
of those frames in one clip). Every stream, question and retrieval runs in vLLM; the attention weights and
the teacher-forced distributions are recomputed from each stream's memory snapshot by
`QuestionForward`, which is checked against vLLM's own greedy tokens in the output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vllm_livevlm.bench import LIVEVLM_SYSTEMS, uniform_indices
from vllm_livevlm.config import LiveVLMConfig
from vllm_livevlm.eval.question_forward import QuestionForward
from vllm_livevlm.memory.positions import place, placement_extent
from vllm_livevlm.memory.retrieval import PageLayout, token_index
from vllm_livevlm.portable.wire import from_wire
from vllm_livevlm.streams import QUESTION_TURN

LOSSLESS = {"long_term_budget_tokens": None, "retrieve_ratio": 1.0, "encode_context": "all"}
QUESTIONS = ("What is happening in the video right now?", "What color is the square?",
             "Where did the square go at the beginning?", "How many objects are there?")


@dataclass(frozen=True)
class System:
    name: str
    config: dict[str, Any]
    uniform_frames: int | None = None  # stream only this many uniformly sampled frames, as one clip
    read_frames: int | None = None  # retrieve_ratio set so a question reads this many frames' worth of tokens

    def resolved(self, base: LiveVLMConfig, tokens_per_frame: float) -> "System":
        """`read_frames` turned into the retrieve_ratio that reads that many frames' tokens (short-term included)."""
        if self.read_frames is None:
            return self
        config = base.replace(self.config)
        if not config.long_term_budget_tokens:
            raise ValueError(f"{self.name}: a matched read budget needs a bounded, non-empty long-term memory")
        ltm_tokens = (self.read_frames - config.short_term_frames) * tokens_per_frame
        ratio = min(1.0, max(0.0, ltm_tokens / config.long_term_budget_tokens))
        return System(self.name, {**self.config, "retrieve_ratio": round(ratio, 4)})


FULL = System("full", LOSSLESS)
SYSTEMS = {"livevlm": System("livevlm", LIVEVLM_SYSTEMS["livevlm"]),
           # livevlm reading as many stream tokens per question as uniform-32 sees: an equal-budget comparison
           "livevlm-read32": System("livevlm-read32", LIVEVLM_SYSTEMS["livevlm"], read_frames=32),
           "sliding-window": System("sliding-window", LIVEVLM_SYSTEMS["sliding-window"]),
           "uniform-32": System("uniform-32", LOSSLESS, 32)}


@dataclass
class Memory:
    """A stream's memory snapshot (raw keys, CPU): sinks, long-term tokens per layer/KV head, short-term."""

    sinks_k: torch.Tensor   # [L, S, H, D]
    sinks_v: torch.Tensor
    ltm_k: torch.Tensor     # [L, n, H, D]
    ltm_v: torch.Tensor
    ltm_ids: torch.Tensor   # [L, H, n] stream token ids
    ltm_frames: torch.Tensor  # [L, H, n]
    ltm_pos: torch.Tensor   # [L, H, n, A] multi-axis position records (A = 0 on a 1-D model)
    stm_k: torch.Tensor     # [L, m, H, D]
    stm_v: torch.Tensor
    stm_ids: torch.Tensor   # [m]
    stm_frames: torch.Tensor  # [m]
    stm_pos: torch.Tensor   # [m, A]
    page_tokens: int
    retrieve_ratio: float
    tokens_seen: int
    stride: float           # the multi-axis rule's temporal stride

    def _ltm_index(self, pages: list[int] | None) -> torch.Tensor:
        """Long-term token indices a question read: its full pages (None: all) plus the partial newest page."""
        layout = PageLayout(self.ltm_k.shape[1], self.page_tokens, self.retrieve_ratio)
        full = list(range(layout.num_full_pages)) if pages is None else [p for p in pages if p < layout.num_full_pages]
        return token_index(torch.tensor(sorted(full), dtype=torch.long), layout)

    def context(self, pages: dict[int, list[int]] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer the raw keys/values a question saw: sinks, read long-term tokens, short-term memory."""
        out = []
        for layer in range(self.sinks_k.shape[0]):
            index = self._ltm_index(None if pages is None else pages.get(layer, []))
            out.append((torch.cat([self.sinks_k[layer], self.ltm_k[layer][index], self.stm_k[layer]]),
                        torch.cat([self.sinks_v[layer], self.ltm_v[layer][index], self.stm_v[layer]])))
        return out

    def placement(self, pages: dict[int, list[int]] | None) -> tuple[list[torch.Tensor], int] | None:
        """Multi-axis models: per layer the positions [3, P] of the context a question read (`context`),
        right-aligned to the question's extent E, and E (`docs/positions.md`); None on a 1-D model."""
        if self.stm_pos.shape[1] == 0:
            return None
        sinks, layers = self.sinks_k.shape[1], range(self.ltm_pos.shape[0])
        extent = max(placement_extent(torch.cat([self.ltm_pos[layer, 0], self.stm_pos]), sinks, self.stride)
                     for layer in layers)
        read = [torch.cat([self.ltm_pos[layer, 0][self._ltm_index(None if pages is None else pages.get(layer, []))],
                           self.stm_pos]) for layer in layers]
        return [place(records, sinks, self.stride, extent) for records in read], extent

    def read_ids(self, layer: int, pages: list[int] | None) -> torch.Tensor:
        """[H, n] stream token ids a question read in `layer` (long-term pages read + short-term)."""
        ltm = self.ltm_ids[layer][:, self._ltm_index(pages)]
        stm = self.stm_ids.view(1, -1).expand(ltm.shape[0], -1)
        return torch.cat([ltm, stm], dim=1)


def read_memory(lv: Any, stream: Any) -> Memory:
    data = lv._run(lv.core.rpc("livevlm_memory_snapshot", stream.id))
    return Memory(**{name: from_wire(value) for name, value in data.pop("tensors").items()}, **data)


@dataclass
class SystemRun:
    """One system's stream after all frames, its answers and its memory."""

    answers: list[Any]
    memory: Memory
    frames: np.ndarray | None = None  # stream frames it saw (uniform systems)
    extra: dict[str, Any] = field(default_factory=dict)


def run_system(lv: Any, system: System, frames: np.ndarray, questions: list[str], answer_tokens: int) -> SystemRun:
    from vllm import SamplingParams

    config = dict(system.config)
    seen = None
    if system.uniform_frames is not None:
        seen = uniform_indices(len(frames), system.uniform_frames)
        frames = frames[seen]
        config["clip_frames"] = len(frames)
    stream = lv.open_stream(config)
    try:
        start = time.perf_counter()
        stream.append(frames)
        ingest = time.perf_counter() - start
        greedy = SamplingParams(max_tokens=answer_tokens, temperature=0.0, ignore_eos=True)
        answers = [stream.ask(q, greedy) for q in questions]
        memory = read_memory(lv, stream)
        stats = stream.stats()
    finally:
        stream.close()
    return SystemRun(answers, memory, seen, {"ingest_s": ingest, "stats": stats})


def _frame_of_token(memory: Memory) -> torch.Tensor:
    """Frame of every stream token id, from a lossless memory (which holds them all)."""
    frame = torch.full((memory.tokens_seen,), -1, dtype=torch.long)
    frame[memory.ltm_ids[0, 0]] = memory.ltm_frames[0, 0]
    frame[memory.stm_ids] = memory.stm_frames
    return frame


def measure(lv: Any, forward: QuestionForward, frames: np.ndarray, questions: list[str],
            systems: list[System], answer_tokens: int = 16, progress=print) -> dict[str, Any]:
    """Run full attention and every system over `frames`; recall and agreement per question and system."""
    tokenizer = lv.tokenizer
    full = run_system(lv, FULL, frames, questions, answer_tokens)
    progress(f"full attention: {len(frames)} frames ingested in {full.extra['ingest_s']:.0f} s")
    if full.memory.ltm_ids.shape[2] + full.memory.stm_ids.shape[0] != full.memory.tokens_seen:
        raise RuntimeError("the full-attention stream did not keep every token: it is not lossless")
    frame_of = _frame_of_token(full.memory)
    stream_ids = [torch.cat([full.memory.ltm_ids[layer], full.memory.stm_ids.view(1, -1).expand(
        full.memory.ltm_ids.shape[1], -1)], dim=1) for layer in range(forward.num_layers)]  # [H, T] per layer
    group = forward.q_heads // forward.kv_heads
    systems = [s.resolved(lv.config, full.memory.tokens_seen / len(frames)) for s in systems]
    runs = {system.name: run_system(lv, system, frames, questions, answer_tokens) for system in systems}
    for name, run in runs.items():
        progress(f"{name}: ingested in {run.extra['ingest_s']:.0f} s")
    results: dict[str, Any] = {s.name: {"questions": []} for s in systems}
    reference_check = []
    full_context = full.memory.context(None)
    for qi, question in enumerate(questions):
        turn = tokenizer.encode(QUESTION_TURN.format(question=question), add_special_tokens=False)
        vanilla = list(full.answers[qi].token_ids)
        tokens = turn + vanilla[:-1]
        rows = slice(len(turn) - 1, len(turn) - 1 + len(vanilla))
        ref = forward.run(full_context, tokens, probe_tokens=len(turn), placement=full.memory.placement(None))
        ref_logp = ref.logits[rows].log_softmax(-1)
        reference_check.append(float((ref_logp.argmax(-1) == torch.tensor(vanilla)).float().mean()))
        sinks = full.memory.sinks_k.shape[1]
        for system in systems:
            run = runs[system.name]
            answer = run.answers[qi]
            pages = None if system.uniform_frames is not None else answer.retrieved_page_indices
            logp = forward.run(run.memory.context(pages), tokens,
                               placement=run.memory.placement(pages)).logits[rows].log_softmax(-1)
            recall, share = [], []
            for layer in range(forward.num_layers):
                if system.uniform_frames is not None:
                    selected = torch.isin(frame_of, torch.as_tensor(run.frames)).view(1, -1).expand(forward.kv_heads, -1)
                else:
                    selected = torch.zeros(forward.kv_heads, full.memory.tokens_seen, dtype=torch.bool)
                    selected.scatter_(1, run.memory.read_ids(layer, None if pages is None else pages.get(layer, [])), True)
                on_stream = ref.attention[layer][:, :, sinks:]                       # [nq, Hq, T] in slot order
                mask = torch.gather(selected, 1, stream_ids[layer]).repeat_interleave(group, dim=0)  # [Hq, T]
                per_query = (on_stream * mask).sum(-1) / on_stream.sum(-1)
                recall.append(float(per_query.mean()))
                share.append(float(selected.float().mean()))
            results[system.name]["questions"].append({
                "question": question, "recall_per_layer": recall, "token_share_per_layer": share,
                "top1_agreement": float((logp.argmax(-1) == ref_logp.argmax(-1)).float().mean()),
                "kl": float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()),
                "first_token_matches_vllm": int(logp[0].argmax()) == answer.token_ids[0],
                "context_tokens": answer.prompt_tokens - answer.prompt_tokens_computed})
        progress(f"question {qi + 1}/{len(questions)} measured")
    for system in systems:
        entry = results[system.name]
        qs = entry["questions"]
        entry["recall_per_layer"] = np.mean([q["recall_per_layer"] for q in qs], axis=0).tolist()
        entry.update(attention_recall=float(np.mean(entry["recall_per_layer"])),
                     top1_agreement=float(np.mean([q["top1_agreement"] for q in qs])),
                     kl=float(np.mean([q["kl"] for q in qs])),
                     token_share=float(np.mean([q["token_share_per_layer"] for q in qs])),
                     context_tokens=float(np.mean([q["context_tokens"] for q in qs])),
                     first_token_matches_vllm=float(np.mean([q["first_token_matches_vllm"] for q in qs])),
                     memory_bytes=runs[system.name].extra["stats"]["bytes"],
                     ingest_s=runs[system.name].extra["ingest_s"])
    return {"systems": results, "configs": {s.name: s.config for s in systems},
            "reference_check": float(np.mean(reference_check)),
            "full_context_tokens": int(full.memory.sinks_k.shape[1] + full.memory.tokens_seen),
            "full_memory_bytes": full.extra["stats"]["bytes"], "full_ingest_s": full.extra["ingest_s"]}


def format_table(data: dict[str, Any]) -> str:
    lines = [f"{'system':<16} {'attention recall':>16} {'top-1 agreement':>16} {'KL (nats)':>10} "
             f"{'stream tokens read':>18} {'context tokens':>14}"]
    for name, s in data["systems"].items():
        lines.append(f"{name:<16} {s['attention_recall']:>16.3f} {s['top1_agreement']:>16.3f} {s['kl']:>10.4f} "
                     f"{100 * s['token_share']:>17.1f}% {s['context_tokens']:>14.0f}")
    lines.append(f"(full attention: {data['full_context_tokens']} context tokens; QuestionForward reproduces vLLM's "
                 f"greedy answer on {100 * data['reference_check']:.0f}% of tokens)")
    return "\n".join(lines)


def plot(data: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(data["systems"])
    for name in names:
        recall = data["systems"][name]["recall_per_layer"]
        left.plot(range(len(recall)), recall, marker="o", label=name)
    left.set_xlabel("layer")
    left.set_ylabel("attention recall")
    left.set_ylim(0, 1.02)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    x = np.arange(len(names))
    right.bar(x - 0.2, [data["systems"][n]["attention_recall"] for n in names], 0.4, label="attention recall")
    right.bar(x + 0.2, [data["systems"][n]["top1_agreement"] for n in names], 0.4, label="top-1 agreement")
    right.set_xticks(x, names)
    right.set_ylim(0, 1.02)
    right.grid(axis="y", alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(f"fidelity to full attention ({data['args']['frames']} frames, {data['args']['model']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from vllm_livevlm.bench import _machine_name
    from vllm_livevlm.eval.fixtures import synthetic_frames
    from vllm_livevlm.testing.tiny_model import ensure_tiny_model, preset_names

    parser = argparse.ArgumentParser(prog="vllm-livevlm fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-preset", default="bench", choices=preset_names())
    parser.add_argument("--model", default=None, help="a checkpoint instead of a random preset model")
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--clip-frames", type=int, default=32)
    parser.add_argument("--questions", type=int, default=len(QUESTIONS))
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--livevlm-config", default=None, help="JSON overrides for the livevlm system")
    parser.add_argument("--frame-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--machine", default=None)
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "8")
    from vllm_livevlm import LiveVLM

    unknown = [s for s in args.systems.split(",") if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    systems = [SYSTEMS[s] for s in args.systems.split(",")]
    if args.livevlm_config:
        systems = [System(s.name, {**s.config, **json.loads(args.livevlm_config)}, s.uniform_frames, s.read_frames)
                   if s.name.startswith("livevlm") else s for s in systems]
    model = args.model or ensure_tiny_model(os.path.join(os.path.expanduser("~/.cache/vllm-livevlm"), args.model_preset),
                                            preset=args.model_preset)
    frames = synthetic_frames(args.seed, args.frames, fps=1, size=args.frame_size)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.questions)]
    forward = QuestionForward(model)
    start = time.perf_counter()
    lv = LiveVLM(model, {"clip_frames": args.clip_frames}, dtype=args.dtype,
                 max_model_len=args.frames * 200 + 2048)
    try:
        data = measure(lv, forward, frames, questions, systems, args.answer_tokens)
    finally:
        lv.shutdown()
    machine = args.machine or _machine_name()
    stamp = datetime.date.today().isoformat()
    data.update(date=stamp, machine=machine, seconds=time.perf_counter() - start,
                args={**vars(args), "model": args.model or f"{args.model_preset} preset (random weights)"})
    print()
    print(format_table(data))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"fidelity-{stamp}-{machine}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    plot(data, path[:-5] + ".png")
    print(f"\nwrote {path} (+ .png)")
