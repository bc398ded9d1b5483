"""Loaders: each benchmark's published annotation format -> `EvalQuestion` records.

Formats as described in shared/design/benchmarks.md §4 (OVO-Bench, StreamingBench, RVS, MLVU in the ReKV
format) and as the VideoMME and EgoSchema releases publish them. Each loader takes the benchmark's data
directory (annotations + videos, laid out as the benchmark ships them) and an optional annotation file
that overrides the default name.
"""

from __future__ import annotations

import ast
import csv
import glob
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from vllm_livevlm.eval.records import LETTERS, EvalQuestion, Scoring, option_lines, strip_letter
from vllm_livevlm.eval.scoring import Aggregation

MC_SUFFIX = "Respond only with the letter of the correct option."

# OVO-Bench task -> category (BT: backward tracing, RT: real-time perception, FAR: forward active responding).
OVO_CATEGORIES = {**dict.fromkeys(("EPM", "ASI", "HLD"), "BT"),
                  **dict.fromkeys(("OCR", "ACR", "ATR", "STU", "FPD", "OJR"), "RT"),
                  **dict.fromkeys(("REC", "SSR", "CRR"), "FAR")}
OVO_REC = ("You're watching a video in which people may perform a certain type of action repetitively. The person "
           "performing this kind of action is referred to as 'they' in the following statement. During this video, "
           "how many times did they {activity}? Answer with a single number.")
OVO_SSR = ("You're watching a tutorial video which contains a sequence of steps. The following is one step of the "
           "procedure:\n{step}\nIs the person in the video currently performing this step? Answer only with Yes or No.")
OVO_CRR = ("You're responsible for answering questions based on the video content. The following question is about "
           "the latest frames, i.e. the end of the video.\n{question}\nDo the frames so far provide enough information "
           "to answer the question? Answer only with Yes or No.")
SB_PROMPT = ("You are an advanced video question-answering AI assistant. You have been provided with some frames from a "
             "video and a multiple-choice question related to the video. Your task is to carefully analyze the video "
             "and provide the best answer to question, choosing from the four options provided. Respond with only the "
             "letter (A, B, C, or D) of the correct option.\n\nQuestion: {question}\n\nOptions:\n{options}\n\n"
             "The best option is:")
SB_GROUPS = {"real": "Real-Time Visual Understanding", "omni": "Omni-Source", "sqa": "Contextual Understanding"}
OFFLINE_MC = ("Select the best answer to the following multiple-choice question based on the video. "
              "Respond with only the letter of the correct option.\n{question}\n{options}\nThe best answer is:")


class AnnotationError(ValueError):
    """An annotation file is missing or not in the format its benchmark publishes."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    load: Callable[[str, str | None], list[EvalQuestion]]
    aggregation: Aggregation
    notes: str


def _read_json(path: str):
    if not os.path.exists(path):
        raise AnnotationError(f"annotation file {path} does not exist")
    with open(path) as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


def _first_existing(data_dir: str, names: list[str], what: str) -> str:
    for name in names:
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    raise AnnotationError(f"no {what} in {data_dir} (looked for {', '.join(names)}; pass --annotations FILE)")


def _video(data_dir: str, candidates: list[str]) -> str:
    paths = [c if os.path.isabs(c) else os.path.normpath(os.path.join(data_dir, c)) for c in candidates]
    for path in paths:
        if os.path.exists(path):
            return path
    raise AnnotationError(f"video not found; tried {', '.join(paths)}")


def hms_seconds(stamp: str | float | int) -> float:
    """"HH:MM:SS" (or "MM:SS", or plain seconds) -> seconds."""
    if isinstance(stamp, (int, float)):
        return float(stamp)
    seconds = 0.0
    for part in str(stamp).strip().split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


# ---- OVO-Bench ---------------------------------------------------------------------------------------------
def load_ovo(data_dir: str, annotations: str | None = None) -> list[EvalQuestion]:
    """`ovo_bench_new.json`: BT/RT records are multiple choice at `realtime`; FAR records expand into one
    question per `test_info` probe at the probe's `realtime` (ids `{id}_{i}`)."""
    path = annotations or _first_existing(data_dir, ["data/ovo_bench_new.json", "ovo_bench_new.json"], "OVO-Bench annotations")
    questions = []
    for record in _read_json(path):
        task = record["task"]
        if task not in OVO_CATEGORIES:
            raise AnnotationError(f"{path}: unknown OVO-Bench task {task!r} in record {record.get('id')}")
        video = _video(data_dir, [record["video"], os.path.join("src_videos", record["video"]),
                                  os.path.join("data", "src_videos", record["video"])])
        common = {"bench": "ovo", "task": task, "category": OVO_CATEGORIES[task], "video": video}
        if OVO_CATEGORIES[task] != "FAR":
            options = record.get("options", record.get("candidates"))
            questions.append(EvalQuestion(
                id=str(record["id"]), question=record["question"], options=options, answer=LETTERS[int(record["gt"])],
                scoring=Scoring.LETTER_SUBSTRING, query_time=float(record["realtime"]),
                prompt=f"Question: {record['question']}\nOptions:\n{option_lines(options, '; ')};\n{MC_SUFFIX}", **common))
            continue
        for i, probe in enumerate(record["test_info"]):
            if task == "REC":
                activity = record.get("activity", record.get("question", ""))
                prompt, answer, rule = OVO_REC.format(activity=activity), str(int(probe["count"])), Scoring.NUMBER
            elif task == "SSR":
                prompt, rule = OVO_SSR.format(step=probe["step"]), Scoring.YES_NO
                answer = "Yes" if int(probe["type"]) == 1 else "No"
            else:
                prompt, rule = OVO_CRR.format(question=record["question"]), Scoring.YES_NO
                answer = "Yes" if int(probe["type"]) == 1 else "No"
            questions.append(EvalQuestion(id=f"{record['id']}_{i}", question=prompt, answer=answer, scoring=rule,
                                          query_time=float(probe["realtime"]), prompt=prompt, **common))
    return questions


# ---- StreamingBench ----------------------------------------------------------------------------------------
def load_streamingbench(data_dir: str, annotations: str | None = None) -> list[EvalQuestion]:
    """`questions_{real,omni,sqa}.json` (video entries with timed questions) or the Real-Time CSV
    (`Real_Time_Visual_Understanding.csv`, videos at `sample_{N}/video.mp4`). Proactive-output questions are
    not loaded: they are scored on when the model speaks, which asking at a timestamp cannot measure."""
    if annotations:
        paths = [annotations]
    else:
        paths = sorted(glob.glob(os.path.join(data_dir, "questions_*.json")) +
                       glob.glob(os.path.join(data_dir, "*.csv")))
        paths = [p for p in paths if "proactive" not in os.path.basename(p)]
        if not paths:
            raise AnnotationError(f"no StreamingBench annotations in {data_dir} (questions_*.json or *.csv)")
    questions = []
    for path in paths:
        questions += _streamingbench_csv(data_dir, path) if path.endswith(".csv") else _streamingbench_json(data_dir, path)
    return questions


def _sb_question(group: str, qid: str, video: str, q: dict) -> EvalQuestion:
    options = q["options"]
    if isinstance(options, str):
        options = ast.literal_eval(options)
    options = [strip_letter(o) for o in options]
    return EvalQuestion(
        bench="streamingbench", id=qid, task=q["task_type"], category=group, video=video, question=q["question"],
        options=options, answer=str(q["answer"]).strip()[0], scoring=Scoring.LETTER,
        query_time=hms_seconds(q["time_stamp"]),
        prompt=SB_PROMPT.format(question=q["question"], options=option_lines(options)))


def _streamingbench_json(data_dir: str, path: str) -> list[EvalQuestion]:
    kind = os.path.basename(path)[len("questions_"):].split(".")[0].split("_")[0]
    group = SB_GROUPS.get(kind, kind)
    questions = []
    for entry in _read_json(path):
        video = _video(data_dir, [entry["video_path"], os.path.join("videos", os.path.basename(entry["video_path"]))])
        stem = os.path.splitext(os.path.basename(entry["video_path"]))[0]
        for i, q in enumerate(entry["questions"]):
            questions.append(_sb_question(group, f"{kind}-{stem}-{i}", video, q))
    return questions


def _streamingbench_csv(data_dir: str, path: str) -> list[EvalQuestion]:
    questions = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            match = re.search(r"sample_(\d+)", row["question_id"]) or re.search(r"(\d+)", row["question_id"])
            if match is None:
                raise AnnotationError(f"{path}: cannot tell the video of question_id {row['question_id']!r}")
            video = _video(data_dir, [os.path.join(f"sample_{match.group(1)}", "video.mp4")])
            questions.append(_sb_question(SB_GROUPS["real"], row["question_id"], video, row))
    return questions


# ---- RVS-Ego / RVS-Movie -------------------------------------------------------------------------------------
def _load_rvs(subset: str, annotation: str) -> Callable[[str, str | None], list[EvalQuestion]]:
    def load(data_dir: str, annotations: str | None = None) -> list[EvalQuestion]:
        """Open-ended questions asked at each conversation's `end_time` (ReKV's protocol)."""
        path = annotations or _first_existing(data_dir, [annotation, os.path.basename(annotation)], f"RVS-{subset} annotations")
        questions = []
        for entry in _read_json(path):
            video = _video(data_dir, [entry["video_path"], os.path.join(os.path.dirname(annotation), entry["video_path"]),
                                      os.path.join(os.path.dirname(annotation), "videos", f"{entry['video_id']}.mp4")])
            for i, turn in enumerate(entry["conversations"]):
                questions.append(EvalQuestion(
                    bench=f"rvs-{subset}", id=f"{entry['video_id']}-{i}", task=f"rvs-{subset}", category=f"rvs-{subset}",
                    video=video, question=turn["question"], answer=turn["answer"], scoring=Scoring.OPEN,
                    query_time=float(turn["end_time"]), prompt=turn["question"],
                    extra={"start_time": turn.get("start_time"), "end_time": turn["end_time"]}))
        return questions

    return load


# ---- offline multiple choice: MLVU (ReKV format), VideoMME, EgoSchema ---------------------------------------
def _offline_mc(bench: str, qid: str, task: str, category: str, video: str, question: str, options: list[str],
                answer: str) -> EvalQuestion:
    return EvalQuestion(bench=bench, id=qid, task=task, category=category, video=video, question=question,
                        options=options, answer=answer, scoring=Scoring.LETTER, query_time=None,
                        prompt=OFFLINE_MC.format(question=question, options=option_lines(options)))


def load_mlvu(data_dir: str, annotations: str | None = None) -> list[EvalQuestion]:
    """ReKV's MLVU dev multiple choice: `{video_id, video_path, duration, conversations: [{question, choices,
    answer (text), question_type}]}`; asked after the whole video, scored by letter; M-Avg = mean over tasks."""
    path = annotations or _first_existing(data_dir, ["dev_debug_mc.json", "mlvu_dev_mc.json", "mlvu_mc.json"], "MLVU annotations")
    questions = []
    for entry in _read_json(path):
        video = _video(data_dir, [entry["video_path"], os.path.join("videos", os.path.basename(entry["video_path"]))])
        for i, turn in enumerate(entry["conversations"]):
            choices = list(turn["choices"])
            if turn["answer"] not in choices:
                raise AnnotationError(f"{path}: answer {turn['answer']!r} is not one of the choices of {entry['video_id']}")
            questions.append(_offline_mc("mlvu", f"{entry['video_id']}-{i}", turn["question_type"], "MLVU", video,
                                         turn["question"], choices, LETTERS[choices.index(turn["answer"])]))
    return questions


def load_videomme(data_dir: str, annotations: str | None = None) -> list[EvalQuestion]:
    """Video-MME records `{videoID, question_id, duration, domain, task_type, question, options ["A. ..."],
    answer}` (JSON or JSONL), videos at `videos/{videoID}.mp4`; categories are the duration groups."""
    path = annotations or _first_existing(data_dir, ["videomme.json", "videomme.jsonl", "test.jsonl"], "Video-MME annotations")
    questions = []
    for record in _read_json(path):
        video = _video(data_dir, [os.path.join("videos", f"{record['videoID']}.mp4"), os.path.join("data", f"{record['videoID']}.mp4")])
        questions.append(_offline_mc("videomme", str(record["question_id"]), record["task_type"], record["duration"], video,
                                     record["question"], [strip_letter(o) for o in record["options"]], record["answer"].strip()))
    return questions


def load_egoschema(data_dir: str, annotations: str | None = None) -> list[EvalQuestion]:
    """EgoSchema `questions.json` (`q_uid`, `question`, `option 0`..`option 4`) with the public answers of
    `subset_answers.json` (`{q_uid: index}`); questions without a public answer are skipped."""
    path = annotations or _first_existing(data_dir, ["questions.json"], "EgoSchema questions")
    answers = _read_json(os.path.join(os.path.dirname(path), "subset_answers.json"))
    questions = []
    for record in _read_json(path):
        if record["q_uid"] not in answers:
            continue
        options = [record[f"option {i}"] for i in range(5)]
        video = _video(data_dir, [os.path.join("videos", f"{record['q_uid']}.mp4"), f"{record['q_uid']}.mp4"])
        questions.append(_offline_mc("egoschema", record["q_uid"], "egoschema", "egoschema", video, record["question"],
                                     options, LETTERS[int(answers[record["q_uid"]])]))
    return questions


BENCHMARKS: dict[str, Benchmark] = {
    "ovo": Benchmark("ovo", load_ovo, Aggregation("tasks", "categories", (("BT+RT", ("BT", "RT")),)),
                     "overall = mean of the BT, RT and FAR means (each the mean of its tasks); BT+RT as some papers report"),
    "streamingbench": Benchmark("streamingbench", load_streamingbench,
                                Aggregation("questions", "categories", (("Real-Time subset", ("Real-Time Visual Understanding",)),)),
                                "overall = mean of the groups present (leaderboard); streaming papers report the Real-Time subset"),
    "rvs-ego": Benchmark("rvs-ego", _load_rvs("ego", "ego/ego4d_oe.json"), Aggregation(),
                         "open-ended: answers written to open_ended.jsonl for an LLM judge (record the judge model)"),
    "rvs-movie": Benchmark("rvs-movie", _load_rvs("movie", "movie/movienet_oe.json"), Aggregation(),
                           "open-ended: answers written to open_ended.jsonl for an LLM judge (record the judge model)"),
    "mlvu": Benchmark("mlvu", load_mlvu, Aggregation("questions", "tasks"), "overall = M-Avg (mean over tasks)"),
    "videomme": Benchmark("videomme", load_videomme, Aggregation(), "overall = accuracy over all questions"),
    "egoschema": Benchmark("egoschema", load_egoschema, Aggregation(), "overall = accuracy over the answered subset"),
}
BENCH_ALIASES = {"sb": "streamingbench", "ovo-bench": "ovo", "video-mme": "videomme"}


def get_benchmark(name: str) -> Benchmark:
    key = BENCH_ALIASES.get(name.lower(), name.lower())
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[key]
