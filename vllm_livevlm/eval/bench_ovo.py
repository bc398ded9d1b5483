"""OVO-Bench's `data/ovo_bench_new.json` (Hugging Face JoeLeelyf/OVO-Bench) -> questions, as `utils/OVOBench.py` runs it.

BT and RT records are one multiple-choice question each, asked at `realtime`, gold letter `chr(65 + gt)`;
every FAR record (REC, SSR, CRR) is one question per `test_info` probe, asked at the probe's `realtime`, with
ids `{id}_{i}`: the official expansion, which turns the 1,640 released records into 3,035 items. Videos are
`video` relative to the release's `src_videos/` (or the data directory itself).
"""

from __future__ import annotations

import os

from vllm_livevlm.eval import prompts
from vllm_livevlm.eval.paths import AnnotationError, find_annotation, read_json, resolve_video
from vllm_livevlm.eval.records import LETTERS, EvalQuestion, Scoring

CATEGORIES = {**dict.fromkeys(("EPM", "ASI", "HLD"), "BT"),
              **dict.fromkeys(("OCR", "ACR", "ATR", "STU", "FPD", "OJR"), "RT"),
              **dict.fromkeys(("REC", "SSR", "CRR"), "FAR")}


def _seconds(where: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise AnnotationError(f"{where}: realtime {value!r} is not a time in seconds")
    return float(value)


def _mc(where: str, record: dict, common: dict) -> EvalQuestion:
    options = record.get("options", record.get("candidates"))
    gt = record.get("gt")
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options) or not 2 <= len(options) <= 26:
        raise AnnotationError(f"{where}: options must be a list of 2 to 26 strings")
    if isinstance(gt, bool) or not isinstance(gt, int) or not 0 <= gt < len(options):
        raise AnnotationError(f"{where}: gt {gt!r} is not an index into its {len(options)} options")
    question = str(record.get("question", ""))
    return EvalQuestion(id=str(record["id"]), question=question, options=options, answer=LETTERS[gt],
                        scoring=Scoring.OVO_LETTER, query_time=_seconds(where, record.get("realtime")),
                        prompt=prompts.OVO_MC.format(question=question, options=prompts.ovo_options(options)), **common)


def _probe(where: str, record: dict, probe: dict) -> tuple[str, str, Scoring]:
    """(prompt, gold, rule) of one FAR probe."""
    task = record["task"]
    if task == "REC":
        count = probe.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise AnnotationError(f"{where}: count {count!r} is not a whole number")
        return prompts.OVO_REC.format(activity=record.get("activity", "")), str(count), Scoring.OVO_COUNT
    if probe.get("type") not in (0, 1):
        raise AnnotationError(f"{where}: type {probe.get('type')!r} is neither 0 nor 1")
    gold = "Yes" if probe["type"] == 1 else "No"
    if task == "SSR":
        return prompts.OVO_SSR.format(step=probe.get("step", "")), gold, Scoring.OVO_YES_NO
    return prompts.OVO_CRR.format(question=record.get("question", "")), gold, Scoring.OVO_YES_NO


def _record(path: str, data_dir: str, index: int, record) -> list[EvalQuestion]:
    if not isinstance(record, dict) or "id" not in record:
        raise AnnotationError(f"{path}: record {index} is not an object with an id")
    where = f"{path}: record {record['id']}"
    task = record.get("task")
    if task not in CATEGORIES:
        raise AnnotationError(f"{where}: unknown task {task!r}")
    bases = [os.path.join(data_dir, "src_videos"), os.path.join(data_dir, "data", "src_videos"), data_dir,
             os.path.join(data_dir, "videos")]
    common = {"bench": "ovo", "task": task, "category": CATEGORIES[task],
              "video": resolve_video(where, record.get("video"), bases)}
    if CATEGORIES[task] != "FAR":
        return [_mc(where, record, common)]
    probes = record.get("test_info")
    if not isinstance(probes, list) or not probes or not all(isinstance(p, dict) for p in probes):
        raise AnnotationError(f"{where}: test_info must be a non-empty list of probes")
    questions = []
    for i, probe in enumerate(probes):
        prompt, gold, rule = _probe(f"{where} probe {i}", record, probe)
        questions.append(EvalQuestion(id=f"{record['id']}_{i}", question=prompt, answer=gold, scoring=rule, prompt=prompt,
                                      query_time=_seconds(f"{where} probe {i}", probe.get("realtime")), **common))
    return questions


def load_ovo(data_dir: str, annotations: str | None = None) -> list[EvalQuestion]:
    path = annotations or find_annotation(data_dir, ["data/ovo_bench_new.json", "ovo_bench_new.json"],
                                          "OVO-Bench annotations")
    records = read_json(path)
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: expected a list of records")
    return [q for index, record in enumerate(records) for q in _record(path, data_dir, index, record)]
