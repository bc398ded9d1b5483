"""`EvalQuestion`: one question of any supported benchmark, normalised to a single record.

Every loader turns its benchmark's published annotation format into these records; the harness only
ever sees this shape. A question is asked once the stream reaches `query_time` (seconds from the start
of the video); offline benchmarks ask at the end of the video (`query_time=None`).
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

LETTERS = string.ascii_uppercase


class Scoring(str, Enum):
    """How a response is judged; each benchmark's own rule."""

    LETTER_SUBSTRING = "letter_substring"  # OVO-Bench BT/RT: the correct letter occurs in the response
    LETTER = "letter"                      # exact option letter (StreamingBench, MLVU, VideoMME, EgoSchema)
    NUMBER = "number"                      # OVO-Bench REC: the digits of the response equal the count
    YES_NO = "yes_no"                      # OVO-Bench SSR / CRR: Yes or No (a bare Y / N counts)
    OPEN = "open"                          # open-ended (RVS): written out for an external LLM judge


@dataclass
class EvalQuestion:
    bench: str
    id: str
    task: str
    category: str
    video: str                      # absolute path of the video file
    question: str
    answer: str                     # the gold answer: a letter, a number, "Yes"/"No" or free text
    scoring: Scoring
    query_time: float | None = None  # seconds; None = after the whole video (offline benchmarks)
    options: list[str] | None = None  # option texts without their letters
    prompt: str = ""                 # what the model is asked (the benchmark's template)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scoring"] = self.scoring.value
        return data


def option_lines(options: list[str], separator: str = "\n") -> str:
    """"A. first{sep}B. second..." as the multiple-choice templates write them."""
    return separator.join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))


def strip_letter(option: str) -> str:
    """"A. text" / "(A) text" -> "text" (StreamingBench and VideoMME store options with their letters)."""
    text = option.strip()
    if len(text) > 2 and text[0] == "(" and text[2] == ")" and text[1] in LETTERS:
        return text[3:].strip()
    if len(text) > 1 and text[0] in LETTERS and text[1] in ".):":
        return text[2:].strip()
    return text
