"""The streaming evaluation: replay each video once through a stream, ask every question at its time.

Per video: decode at `fps`, open one session, and for each of its questions in time order push the frames
up to the question's timestamp (`frames_until`), ask the benchmark's prompt, judge the response. This is
the "one stream per video" mode of shared/design/benchmarks.md §4.6 (the mode that exercises persistent
KV); offline benchmarks ask after the whole video. Results: `predictions.jsonl` (every question, its
response, frames covered, verdict), `open_ended.jsonl` (for an external judge), `accuracy.json` and the
printed table.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections import defaultdict
from typing import Any

from vllm_livevlm.eval.answerers import Answerer
from vllm_livevlm.eval.loaders import Benchmark
from vllm_livevlm.eval.records import EvalQuestion, Scoring
from vllm_livevlm.eval.scoring import accuracy_table, format_table, is_correct, rule_descriptions
from vllm_livevlm.eval.video import decode_video, frames_until


def run_questions(questions: list[EvalQuestion], answerer: Answerer, fps: float, max_tokens: int = 32,
                  frame_size: int | None = None, progress=None, lenient: bool = False) -> list[dict[str, Any]]:
    """Ask every question through `answerer`; returns one result dict per question (in input order), judged
    by its benchmark's official rule (or the lenient one)."""
    by_video: dict[str, list[int]] = defaultdict(list)
    for index, question in enumerate(questions):
        by_video[question.video].append(index)
    results: list[dict[str, Any] | None] = [None] * len(questions)
    for video, indices in by_video.items():
        order = sorted(indices, key=lambda i: (questions[i].query_time is None, questions[i].query_time or 0.0, i))
        last = questions[order[-1]].query_time
        frames = decode_video(video, fps, until=last, size=frame_size)
        session = answerer.open()
        pushed = 0
        try:
            for index in order:
                question = questions[index]
                wanted = len(frames) if question.query_time is None else min(frames_until(question.query_time, fps), len(frames))
                if wanted > pushed:
                    session.push(frames[pushed:wanted])
                    pushed = wanted
                start = time.perf_counter()
                reply = session.ask(question.prompt, max_tokens)
                results[index] = {
                    "id": question.id, "task": question.task, "category": question.category,
                    "query_time": question.query_time, "frames_expected": wanted,
                    "frames_covered": reply.frames_covered, "answer": question.answer, "response": reply.text,
                    "correct": is_correct(question, reply.text, lenient), "seconds": time.perf_counter() - start}
                if progress is not None:
                    progress(question, results[index])
        finally:
            session.close()
    return results  # type: ignore[return-value]


def write_results(bench: Benchmark, questions: list[EvalQuestion], results: list[dict[str, Any]], out_dir: str,
                  meta: dict[str, Any], lenient: bool = False) -> dict[str, Any]:
    """Write predictions, open-ended answers and the accuracy table (with the scoring rules used); returns the table."""
    os.makedirs(out_dir, exist_ok=True)
    table = accuracy_table(results, bench.aggregation)
    with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
        for question, result in zip(questions, results):
            f.write(json.dumps({**result, "prompt": question.prompt, "options": question.options}) + "\n")
    open_ended = [(q, r) for q, r in zip(questions, results) if q.scoring is Scoring.OPEN]
    if open_ended:
        with open(os.path.join(out_dir, "open_ended.jsonl"), "w") as f:
            for question, result in open_ended:
                f.write(json.dumps({"id": question.id, "question": question.question, "answer": question.answer,
                                    "pred": result["response"], "query_time": question.query_time,
                                    "video": question.video}) + "\n")
    with open(os.path.join(out_dir, "accuracy.json"), "w") as f:
        json.dump({"bench": bench.name, "date": datetime.date.today().isoformat(), "convention": bench.notes,
                   "scoring": "lenient" if lenient else "official",
                   "rules": rule_descriptions({q.scoring for q in questions}, lenient), **meta, **table}, f, indent=2)
    return table


def evaluate(bench: Benchmark, questions: list[EvalQuestion], answerer: Answerer, fps: float, out_dir: str,
             max_tokens: int = 32, frame_size: int | None = None, meta: dict[str, Any] | None = None,
             progress=None, lenient: bool = False) -> dict[str, Any]:
    """Run and write one benchmark; prints and returns its accuracy table."""
    results = run_questions(questions, answerer, fps, max_tokens, frame_size, progress, lenient)
    table = write_results(bench, questions, results, out_dir, {"fps": fps, **(meta or {})}, lenient)
    print(format_table(bench.name, table) + f"\nscoring: {'lenient' if lenient else 'official'} rules")
    print(f"wrote {out_dir}/accuracy.json, predictions.jsonl" + (", open_ended.jsonl" if table["open_ended"] else ""))
    return table
