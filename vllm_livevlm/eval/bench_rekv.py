"""The long-video sets as ReKV's data folders hold them (RVS-Ego, RVS-Movie, MLVU dev MC) and EgoSchema's release.

RVS (Hugging Face Becomebright/RVS): `{ego/ego4d_oe.json | movie/movienet_oe.json}`, entries `{video_id,
video_path, duration, conversations: [{question, answer, start_time, end_time}]}`, asked at each `end_time`
(ReKV's streaming protocol); RVS-Movie videos are `.npy` frame arrays at 1 fps. MLVU: ReKV's
`data/mlvu/dev_debug_mc.json` with `video_path` `data/mlvu/videos/<k_task>/<id>.mp4` relative to the ReKV root;
the same id names different videos in different task folders, so ids are `<k_task>/<id>-<turn>`. EgoSchema
(egoschema/EgoSchema): `questions.json` + `subset_answers.json`, only the questions with a public answer.
MLVU and EgoSchema are asked after the whole video with ReKV's prompt and scored by ReKV's letter rule.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from vllm_livevlm.eval import prompts
from vllm_livevlm.eval.paths import AnnotationError, find_annotation, read_json, resolve_first, resolve_video
from vllm_livevlm.eval.records import LETTERS, EvalQuestion, Scoring


def _bases(data_dir: str, path: str) -> list[str]:
    here = os.path.dirname(os.path.abspath(path))
    return [data_dir, here, os.path.dirname(here)]


def _entries(path: str) -> list[tuple[str, dict]]:
    """(where, entry) of a list of `{video_id, video_path, conversations}` entries."""
    data = read_json(path)
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a list of video entries")
    entries = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list) or "video_id" not in entry:
            raise AnnotationError(f"{path}: entry {i} is not an object with a video_id and a list of conversations")
        entries.append((f"{path}: entry {i} ({entry['video_id']})", entry))
    return entries


def rvs_loader(subset: str, name: str) -> Callable[[str, str | None], list[EvalQuestion]]:
    def load(data_dir: str, annotations: str | None = None) -> list[EvalQuestion]:
        path = annotations or find_annotation(data_dir, [f"{subset}/{name}", name, f"data/rvs/{subset}/{name}"],
                                              f"RVS-{subset} annotations")
        questions = []
        for where, entry in _entries(path):
            video = resolve_first(where, [str(entry.get("video_path", "")), f"videos/{entry['video_id']}.mp4"],
                                  _bases(data_dir, path), (".npy", ".mp4"))
            for i, turn in enumerate(entry["conversations"]):
                end = turn.get("end_time") if isinstance(turn, dict) else None
                if isinstance(end, bool) or not isinstance(end, (int, float)) or end < 0 or "question" not in turn:
                    raise AnnotationError(f"{where} conversation {i}: needs a question and an end_time in seconds")
                questions.append(EvalQuestion(
                    bench=f"rvs-{subset}", id=f"{entry['video_id']}-{i}", task=f"rvs-{subset}", category=f"rvs-{subset}",
                    video=video, question=str(turn["question"]), answer=str(turn.get("answer", "")),
                    scoring=Scoring.OPEN, query_time=float(end), prompt=str(turn["question"]),
                    extra={"start_time": turn.get("start_time"), "end_time": end}))
        return questions

    return load


def _mc(bench: str, qid: str, task: str, category: str, video: str, question: str, options: list[str],
        answer: str) -> EvalQuestion:
    return EvalQuestion(bench=bench, id=qid, task=task, category=category, video=video, question=question,
                        options=options, answer=answer, scoring=Scoring.REKV_LETTER, query_time=None,
                        prompt=prompts.rekv_mc(question, options))


def load_mlvu(data_dir: str, annotations: str | None = None) -> list[EvalQuestion]:
    path = annotations or find_annotation(data_dir, ["data/mlvu/dev_debug_mc.json", "dev_debug_mc.json",
                                                     "mlvu/dev_debug_mc.json"], "MLVU annotations")
    questions = []
    for where, entry in _entries(path):
        relative = str(entry.get("video_path", ""))
        video = resolve_video(where, relative, _bases(data_dir, path))
        folder = os.path.basename(os.path.dirname(relative.replace("\\", "/")))
        for i, turn in enumerate(entry["conversations"]):
            choices = turn.get("choices") if isinstance(turn, dict) else None
            if not isinstance(choices, list) or not 2 <= len(choices) <= 26 or turn.get("answer") not in choices:
                raise AnnotationError(f"{where} conversation {i}: answer must be one of 2 to 26 choices")
            task = str(turn.get("question_type", folder))
            questions.append(_mc("mlvu", f"{folder or task}/{entry['video_id']}-{i}", task, "MLVU", video,
                                 str(turn.get("question", "")), [str(c) for c in choices],
                                 LETTERS[choices.index(turn["answer"])]))
    return questions


def load_egoschema(data_dir: str, annotations: str | None = None) -> list[EvalQuestion]:
    path = annotations or find_annotation(data_dir, ["questions.json"], "EgoSchema questions")
    answers = read_json(os.path.join(os.path.dirname(path), "subset_answers.json"))
    records = read_json(path)
    if not isinstance(records, list) or not isinstance(answers, dict):
        raise AnnotationError(f"{path}: expected a list of questions and a {{q_uid: index}} subset_answers.json")
    questions = []
    for i, record in enumerate(records):
        uid = record.get("q_uid") if isinstance(record, dict) else None
        if uid not in answers:
            continue
        where = f"{path}: question {i} ({uid})"
        options = [record.get(f"option {k}") for k in range(5)]
        if not all(isinstance(o, str) for o in options) or answers[uid] not in range(5):
            raise AnnotationError(f"{where}: needs `option 0`..`option 4` and an answer index 0-4")
        video = resolve_first(where, [f"videos/{uid}.mp4", f"{uid}.mp4"], _bases(data_dir, path))
        questions.append(_mc("egoschema", uid, "egoschema", "egoschema", video, str(record.get("question", "")),
                             options, LETTERS[answers[uid]]))
    return questions
