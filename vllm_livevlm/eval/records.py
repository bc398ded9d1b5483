"""`EvalQuestion`: one question of any supported benchmark, normalised to a single record.

Every loader turns its benchmark's published annotation format into these records; the harness only
ever sees this shape. A question is asked once the stream reaches `query_time` (seconds from the start
of the video); offline benchmarks ask at the end of the video (`query_time=None`).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

LETTERS = string.ascii_uppercase


class Scoring(str, Enum):
    """How a response is judged: each benchmark's official rule (`scoring.py` implements them and the lenient
    alternatives)."""

    OVO_LETTER = "ovo_letter"    # OVO-Bench BT/RT: the gold letter occurs in the response (case-sensitive)
    OVO_COUNT = "ovo_count"      # OVO-Bench REC: the response's digits, joined, spell the count
    OVO_YES_NO = "ovo_yes_no"    # OVO-Bench SSR/CRR: the response is "Y"/"N", or contains "Yes"/"No" (case-sensitive)
    FIRST_CHAR = "first_char"    # StreamingBench: the response's first character is the gold letter
    LMMS_LETTER = "lmms_letter"  # Video-MME (lmms-eval): the first of A-D once answer prefixes are removed
    REKV_LETTER = "rekv_letter"  # MLVU, EgoSchema (ReKV): the character before the first ")", else the first one
    OPEN = "open"                # open-ended (RVS): written out for an external LLM judge


@dataclass
class EvalQuestion:
    bench: str
    id: str
    task: str
    category: str
    video: str                      # absolute path of the video file
    question: str
    answer: str                     # the gold answer: a letter, a count, "Yes"/"No" or free text
    scoring: Scoring
    query_time: float | None = None  # seconds; None = after the whole video (offline benchmarks)
    options: list[str] | None = None  # option texts without their letters
    prompt: str = ""                 # what the model is asked (the benchmark's template)
    extra: dict[str, Any] = field(default_factory=dict)


def strip_letter(option: str) -> str:
    """"A. text" / "(A) text" -> "text" (StreamingBench and VideoMME store options with their letters)."""
    text = option.strip()
    if len(text) > 2 and text[0] == "(" and text[2] == ")" and text[1] in LETTERS:
        return text[3:].strip()
    if len(text) > 1 and text[0] in LETTERS and text[1] in ".):":
        return text[2:].strip()
    return text
