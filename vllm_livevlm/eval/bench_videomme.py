"""Video-MME (Hugging Face lmms-lab/Video-MME) -> questions, as lmms-eval's `videomme` task runs it.

The release's `videomme/test-00000-of-00001.parquet` (read with pyarrow), or the same records as JSON / JSONL:
`{video_id, duration, domain, sub_category, url, videoID, question_id, task_type, question, options ["A. ..."],
answer}`. Videos are `data/<videoID>.mp4` (some `.MP4` or `.mkv`). Asked after the whole video with the
frames-only prompt; categories are the duration groups; overall = accuracy over all questions.
"""

from __future__ import annotations

import os

from vllm_livevlm.eval import prompts
from vllm_livevlm.eval.paths import AnnotationError, find_annotation, read_json, resolve_first
from vllm_livevlm.eval.records import LETTERS, EvalQuestion, Scoring, strip_letter

ANNOTATIONS = ["videomme/test-00000-of-00001.parquet", "test-00000-of-00001.parquet", "videomme.json",
               "videomme.jsonl", "test.jsonl"]


def _records(path: str) -> list:
    if not path.endswith(".parquet"):
        return read_json(path)
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise AnnotationError(f"{path}: not a readable parquet file ({error})") from None


def load_videomme(data_dir: str, annotations: str | None = None) -> list[EvalQuestion]:
    path = annotations or find_annotation(data_dir, ANNOTATIONS, "Video-MME annotations")
    records = _records(path)
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: expected a list of records")
    here = os.path.dirname(os.path.abspath(path))
    questions = []
    for i, record in enumerate(records):
        where = f"{path}: record {i} ({record.get('question_id') if isinstance(record, dict) else None})"
        options = record.get("options") if isinstance(record, dict) else None
        if not isinstance(options, list) or not 2 <= len(options) <= 26 or not all(isinstance(o, str) for o in options):
            raise AnnotationError(f"{where}: options must be a list of 2 to 26 strings")
        answer = str(record.get("answer", "")).strip()
        if len(answer) != 1 or answer not in LETTERS[:len(options)]:
            raise AnnotationError(f"{where}: answer {record.get('answer')!r} is not one of its option letters")
        video_id = str(record.get("videoID", ""))
        video = resolve_first(where, [f"data/{video_id}.mp4", f"videos/{video_id}.mp4"], [data_dir, here,
                              os.path.dirname(here)], (".MP4", ".mkv"))
        question = str(record.get("question", ""))
        questions.append(EvalQuestion(
            bench="videomme", id=str(record.get("question_id")), task=str(record.get("task_type")),
            category=str(record.get("duration")), video=video, question=question,
            options=[strip_letter(o) for o in options], answer=answer, scoring=Scoring.LMMS_LETTER, query_time=None,
            prompt=prompts.VIDEOMME.format(question=question, options="\n".join(options))))
    return questions
