"""StreamingBench -> questions, as its own `src/benchmark/StreamingBench*.py` run them.

Two releases: the GitHub repository's `src/data/questions_{real,omni,sqa}.json` (entries of one question each;
SQA is a list of sessions, each a list of entries), or the Hugging Face CSVs (`StreamingBench/*.csv`, videos in
`<category>/sample_<N>/video.mp4`). Default discovery reads the JSON files if present, else the CSVs, never
both and never `*_stream.json` (the same questions again); Proactive Output is not loaded (it is scored on
when the model speaks). Prompts are the official ones: the option list as the official code prints it (its
first four entries, lettered when the first lacks "A."); an SQA question carries the session's earlier
questions with their gold answers. The gold letter is the file's; `options` are the repaired option texts
(an entry without a letter prefix continues the previous option; a repeated letter starts a copy).
"""

from __future__ import annotations

import ast
import csv
import os
import re

from vllm_livevlm.eval import prompts
from vllm_livevlm.eval.paths import AnnotationError, read_json, resolve_video
from vllm_livevlm.eval.records import EvalQuestion, Scoring, strip_letter

REAL, OMNI, CONTEXT = "Real-Time Visual Understanding", "Omni-Source", "Contextual Understanding"
TASK_GROUPS = {**dict.fromkeys(("Emotion Recognition", "Scene Understanding", "Source Discrimination",
                                "Multimodal Alignment"), OMNI),
               **dict.fromkeys(("Misleading Context Understanding", "Anomaly Context Understanding",
                                "Related Context Understanding", "Sequential Question Answering"), CONTEXT)}
JSON_FILES = ["questions_real.json", "questions_omni.json", "questions_sqa.json"]
CSV_FILES = ["Real_Time_Visual_Understanding.csv", "Omni_Source_Understanding.csv", "Contextual_Understanding.csv",
             "Sequential_Question_Answering.csv"]
_PREFIX = re.compile(r"^\s*\(?([A-H])[.):]")
_CSV_ID = re.compile(r"^(?P<category>.+)_sample_(?P<sample>\d+)_(?P<q>\d+)$")


def hms_seconds(where: str, stamp) -> float:
    """"HH:MM:SS", "MM:SS" (some real rows) or plain seconds -> seconds."""
    try:
        seconds = 0.0
        for part in str(stamp).strip().split(":"):
            seconds = seconds * 60 + float(part)
    except ValueError:
        raise AnnotationError(f"{where}: time_stamp {stamp!r} is not HH:MM:SS") from None
    if not seconds >= 0:
        raise AnnotationError(f"{where}: time_stamp {stamp!r} is negative")
    return seconds


def repaired_options(entries: list[str]) -> list[str]:
    """Option texts without letters: four entries are read by position; a longer list was split or repeated."""
    if len(entries) <= 4:
        return [strip_letter(e) for e in entries]
    options: dict[str, str] = {}
    current = None
    for entry in entries:
        match = _PREFIX.match(entry)
        if match:
            current = None if match.group(1) in options else match.group(1)
            if current:
                options[current] = strip_letter(entry)
        elif current:
            options[current] = f"{options[current]} {entry.strip()}"
    return list(options.values())


def _prompt_options(where: str, entries) -> list[str]:
    if not isinstance(entries, list) or len(entries) < 4 or not all(isinstance(e, str) for e in entries):
        raise AnnotationError(f"{where}: options must be a list of at least 4 strings (the official prompt shows four)")
    if entries[0].startswith("A."):
        return entries[:4]
    return [f"{letter}. {entry}" for letter, entry in zip("ABCD", entries)]


def _session(turns: list[tuple[str, str, str, dict]], default_group: str, sqa: bool) -> list[EvalQuestion]:
    """Questions of one session: turns of (id, video, where, record); SQA turns see the earlier ones."""
    questions, context = [], ""
    for qid, video, at, q in turns:
        shown = _prompt_options(at, q.get("options"))
        options, answer = repaired_options(q["options"]), str(q.get("answer", "")).strip()
        if len(answer) != 1 or answer not in "ABCD"[:len(options)]:
            raise AnnotationError(f"{at}: answer {q.get('answer')!r} is not one of the option letters A-D")
        question, stamp = str(q.get("question", "")), q.get("time_stamp")
        prompt = prompts.SB_SQA.format(context, question, *shown) if sqa else prompts.SB.format(question, *shown)
        if sqa:
            context = (context or prompts.SB_SQA_CONTEXT) + prompts.SB_SQA_TURN.format(
                stamp=stamp, question=question, options=", ".join(shown), answer=q.get("answer"))
        task = str(q.get("task_type", ""))
        questions.append(EvalQuestion(
            bench="streamingbench", id=qid, task=task, category=TASK_GROUPS.get(task, default_group), video=video,
            question=question, options=options, answer=answer, scoring=Scoring.FIRST_CHAR,
            query_time=hms_seconds(at, stamp), prompt=prompt, extra={"time_stamp": stamp}))
    return questions


def _turns(label: str, kind: str, entries: list[tuple[int, object]], bases: list[str],
           counters: dict[str, int]) -> list[tuple[str, str, str, dict]]:
    """(id, video, where, record) of every question of `entries`; ids `{kind}-{video}-{n}` count per video."""
    turns = []
    for i, entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("questions"), list):
            raise AnnotationError(f"{label}: entry {i} is not an object with a list of questions")
        video = resolve_video(f"{label}: entry {i}", entry.get("video_path"), bases)
        stem = os.path.splitext(os.path.basename(video))[0]
        for j, q in enumerate(entry["questions"]):
            if not isinstance(q, dict):
                raise AnnotationError(f"{label}: entry {i} question {j} is not an object")
            n = counters[stem] = counters.get(stem, -1) + 1
            turns.append((f"{kind}-{stem}-{n}", video, f"{label}: entry {i} question {j}", q))
    return turns


def load_json(path: str, data_dir: str) -> list[EvalQuestion]:
    """One `questions_*.json`: a list of entries, or (SQA) a list of sessions that are lists of entries."""
    data = read_json(path)
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a list of entries")
    _reject_proactive(path, [q for e in data if isinstance(e, dict) for q in e.get("questions", [])])
    here = os.path.dirname(os.path.abspath(path))
    bases = [data_dir, os.path.join(data_dir, "src"), here, os.path.dirname(here)]
    kind = os.path.basename(path).removeprefix("questions_").split(".")[0]
    default = {"sqa": CONTEXT, "omni": OMNI}.get(kind.split("_")[0], REAL)
    counters: dict[str, int] = {}
    if data and all(isinstance(session, list) for session in data):  # SQA: sessions of entries
        return [q for s, session in enumerate(data) for q in _session(
            _turns(f"{path}: session {s}", kind, list(enumerate(session)), bases, counters), default, True)]
    return [q for i, entry in enumerate(data)
            for q in _session(_turns(path, kind, [(i, entry)], bases, counters), default, False)]


def load_csv(path: str, data_dir: str) -> list[EvalQuestion]:
    """One Hugging Face CSV; `question_id` is `<category>_sample_<N>_<q>`, the video `<category>/sample_<N>/video.mp4`.
    Sequential QA rows form one session per video, in file order."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    _reject_proactive(path, rows)
    here = os.path.dirname(os.path.abspath(path))
    sessions: dict[str, list] = {}
    for i, row in enumerate(rows):
        where = f"{path}: row {i + 2} ({row.get('question_id')})"
        match = _CSV_ID.match(str(row.get("question_id", "")).strip())
        if match is None:
            raise AnnotationError(f"{where}: question_id is not <category>_sample_<N>_<q>")
        try:
            row = {**row, "options": ast.literal_eval(row.get("options") or "")}
        except (ValueError, SyntaxError):
            raise AnnotationError(f"{where}: options {row.get('options')!r} is not a list literal") from None
        folder = os.path.join(match["category"], f"sample_{match['sample']}")
        video = resolve_video(where, os.path.join(folder, "video.mp4"), [data_dir, here, os.path.dirname(here)])
        sessions.setdefault(video, []).append((row["question_id"].strip(), video, where, row))
    name = os.path.basename(path).lower()
    sqa = name.startswith("sequential")
    default = CONTEXT if sqa or name.startswith("contextual") else OMNI if name.startswith("omni") else REAL
    if sqa:
        return [q for turns in sessions.values() for q in _session(turns, default, True)]
    return [q for turns in sessions.values() for turn in turns for q in _session([turn], default, False)]


def _discover(data_dir: str) -> list[str]:
    """The JSON release's files if a folder holds any, else the CSV release's: never both, no duplicates."""
    for names in (JSON_FILES, CSV_FILES):
        for folder in (data_dir, os.path.join(data_dir, "src", "data"), os.path.join(data_dir, "data"),
                       os.path.join(data_dir, "StreamingBench")):
            paths = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
            if paths:
                return paths
    raise AnnotationError(f"no StreamingBench annotations in {data_dir} (looked for {', '.join(JSON_FILES)} in it, "
                          f"src/data/ or data/, then {', '.join(CSV_FILES)} in it or StreamingBench/; "
                          "pass --annotations FILE)")


def load_streamingbench(data_dir: str, annotations: str | None = None) -> list[EvalQuestion]:
    paths = [annotations] if annotations else _discover(data_dir)
    return [q for path in paths for q in (load_csv if path.lower().endswith(".csv") else load_json)(path, data_dir)]


def _reject_proactive(path: str, questions: list) -> None:
    if "proactive" in os.path.basename(path).lower() or any(
            isinstance(q, dict) and "ground_truth_output" in q for q in questions):
        raise AnnotationError(f"{path}: Proactive Output questions are scored on when the model speaks, "
                              "which asking at a time stamp cannot measure; they are not supported")
