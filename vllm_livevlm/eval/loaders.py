"""The supported benchmarks: each one's loader (its release layout -> `EvalQuestion`s) and how it averages.

A loader takes the benchmark's data directory (annotations + videos as the release or a tool's copy of it lays
them out, found by default discovery) and an optional annotation file that overrides discovery. Every load
checks that question ids are unique.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vllm_livevlm.eval.bench_ovo import load_ovo
from vllm_livevlm.eval.bench_rekv import load_egoschema, load_mlvu, rvs_loader
from vllm_livevlm.eval.bench_streamingbench import load_streamingbench
from vllm_livevlm.eval.bench_videomme import load_videomme
from vllm_livevlm.eval.paths import AnnotationError, check_unique_ids
from vllm_livevlm.eval.records import EvalQuestion
from vllm_livevlm.eval.scoring import Aggregation

__all__ = ["AnnotationError", "BENCHMARKS", "Benchmark", "get_benchmark"]


@dataclass(frozen=True)
class Benchmark:
    name: str
    loader: Callable[[str, str | None], list[EvalQuestion]]
    aggregation: Aggregation
    notes: str

    def load(self, data_dir: str, annotations: str | None = None) -> list[EvalQuestion]:
        questions = self.loader(data_dir, annotations)
        check_unique_ids(annotations or data_dir, [q.id for q in questions])
        return questions


BENCHMARKS: dict[str, Benchmark] = {
    "ovo": Benchmark("ovo", load_ovo, Aggregation("tasks", "categories", (("BT+RT", ("BT", "RT")),)),
                     "overall = mean of the BT, RT and FAR means (each the mean of its tasks), as the OVO-Bench "
                     "README reports it; BT+RT as some papers report"),
    "streamingbench": Benchmark(
        "streamingbench", load_streamingbench,
        Aggregation("questions", "categories", (("Real-Time subset", ("Real-Time Visual Understanding",)),)),
        "per task and per group over questions (src/data/count.py); overall = mean of the groups present "
        "(leaderboard); streaming papers report the Real-Time subset"),
    "rvs-ego": Benchmark("rvs-ego", rvs_loader("ego", "ego4d_oe.json"), Aggregation(),
                         "open-ended: answers written to open_ended.jsonl for an LLM judge (record the judge model)"),
    "rvs-movie": Benchmark("rvs-movie", rvs_loader("movie", "movienet_oe.json"), Aggregation(),
                           "open-ended: answers written to open_ended.jsonl for an LLM judge (record the judge model)"),
    "mlvu": Benchmark("mlvu", load_mlvu, Aggregation("questions", "tasks"),
                      "overall = M-Avg, MLVU's mean over tasks; question_mean = what ReKV's script prints"),
    "videomme": Benchmark("videomme", load_videomme, Aggregation(),
                          "overall = accuracy over all questions (lmms-eval); categories = durations"),
    "egoschema": Benchmark("egoschema", load_egoschema, Aggregation(),
                           "overall = accuracy over the questions with a public answer (subset_answers.json)"),
}
BENCH_ALIASES = {"sb": "streamingbench", "ovo-bench": "ovo", "video-mme": "videomme"}


def get_benchmark(name: str) -> Benchmark:
    key = BENCH_ALIASES.get(name.lower(), name.lower())
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[key]
