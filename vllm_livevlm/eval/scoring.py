"""Judging one response, and the accuracy table (per task, per category, overall) of a benchmark.

The rules are the benchmarks' own (shared/design/benchmarks.md §4): OVO-Bench BT/RT count a response as
correct when the correct letter occurs in it, REC compares the digits with the count, SSR/CRR read Yes or
No; StreamingBench and the offline sets compare the extracted option letter exactly. Open-ended answers
are not judged here: they are written out for an external LLM judge.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from vllm_livevlm.eval.records import LETTERS, EvalQuestion, Scoring

_ANSWER_IS = re.compile(r"(?i:answer|option|choice)\s*(?i:is)?\s*[:\-]?\s*\(?([A-Z])\b")
_LEADING = re.compile(r"^\W*\(?([A-Z])(?:[\).:,\s]|$)")
_STANDALONE = re.compile(r"(?<![A-Za-z])\(?([A-Z])\)?(?![A-Za-z])")


def extract_letter(response: str, num_options: int) -> str | None:
    """The option letter a response picks: "B", "(B)", "B. text", "The answer is B", "Answer: (B)"."""
    allowed = set(LETTERS[:num_options])
    for pattern in (_LEADING, _ANSWER_IS):
        match = pattern.search(response.strip())
        if match and match.group(1).upper() in allowed:
            return match.group(1).upper()
    for match in _STANDALONE.finditer(response):
        if match.group(1) in allowed:
            return match.group(1)
    return None


def extract_yes_no(response: str) -> str | None:
    words = re.findall(r"[A-Za-z]+", response)
    first = words[0].lower() if words else ""
    if first in ("yes", "y"):
        return "Yes"
    if first in ("no", "n"):
        return "No"
    return None


def is_correct(question: EvalQuestion, response: str) -> bool | None:
    """Whether the response is right by its benchmark's rule; None for open-ended questions."""
    rule = question.scoring
    if rule is Scoring.LETTER_SUBSTRING:
        return question.answer in response
    if rule is Scoring.LETTER:
        return extract_letter(response, len(question.options or LETTERS)) == question.answer
    if rule is Scoring.NUMBER:
        digits = "".join(re.findall(r"\d", response))
        return digits != "" and int(digits) == int(question.answer)
    if rule is Scoring.YES_NO:
        return extract_yes_no(response) == question.answer
    return None


@dataclass(frozen=True)
class Aggregation:
    """How a benchmark averages: categories over their tasks or over their questions, and the overall."""

    category_mean: str = "questions"   # "tasks": mean of task accuracies (OVO-Bench, MLVU M-Avg)
    overall: str = "questions"         # "categories": mean of category accuracies; "tasks"; "questions"
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()  # named means of some categories, e.g. OVO (BT+RT)/2


def _percent(correct: int, total: int) -> float:
    return 100.0 * correct / total if total else 0.0


def accuracy_table(results: list[dict[str, Any]], aggregation: Aggregation) -> dict[str, Any]:
    """Per-task, per-category and overall accuracy (percent) of judged results.

    Each result needs `task`, `category` and `correct` (True / False / None = open-ended, not counted)."""
    tasks: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    task_category: dict[str, str] = {}
    categories: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    open_ended = 0
    for result in results:
        if result["correct"] is None:
            open_ended += 1
            continue
        for counter in (tasks[result["task"]], categories[result["category"]]):
            counter[0] += int(bool(result["correct"]))
            counter[1] += 1
        task_category[result["task"]] = result["category"]
    task_acc = {t: {"accuracy": _percent(*c), "correct": c[0], "total": c[1], "category": task_category[t]}
                for t, c in sorted(tasks.items())}
    category_acc = {}
    for category, (correct, total) in sorted(categories.items()):
        if aggregation.category_mean == "tasks":
            accs = [v["accuracy"] for v in task_acc.values() if v["category"] == category]
            value = sum(accs) / len(accs)
        else:
            value = _percent(correct, total)
        category_acc[category] = {"accuracy": value, "correct": correct, "total": total}
    judged = sum(c[1] for c in tasks.values())
    if not judged:
        overall = None
    elif aggregation.overall == "categories":
        overall = sum(v["accuracy"] for v in category_acc.values()) / len(category_acc)
    elif aggregation.overall == "tasks":
        overall = sum(v["accuracy"] for v in task_acc.values()) / len(task_acc)
    else:
        overall = _percent(sum(c[0] for c in tasks.values()), judged)
    extra = {}
    for name, members in aggregation.extra:
        present = [category_acc[m]["accuracy"] for m in members if m in category_acc]
        if present:
            extra[name] = sum(present) / len(present)
    return {"tasks": task_acc, "categories": category_acc, "overall": overall, "extra": extra,
            "judged": judged, "open_ended": open_ended}


def format_table(bench: str, table: dict[str, Any]) -> str:
    lines = [f"{bench}: {table['judged']} judged questions" +
             (f", {table['open_ended']} open-ended answers written for an external judge" if table["open_ended"] else "")]
    if table["tasks"]:
        lines.append(f"{'task':<28} {'category':<32} {'acc %':>7} {'correct':>9}")
        for task, v in table["tasks"].items():
            lines.append(f"{task:<28} {v['category']:<32} {v['accuracy']:>7.2f} {v['correct']:>4}/{v['total']:<4}")
        for category, v in table["categories"].items():
            lines.append(f"{'[' + category + ']':<61} {v['accuracy']:>7.2f} {v['correct']:>4}/{v['total']:<4}")
    for name, value in table["extra"].items():
        lines.append(f"{name:<61} {value:>7.2f}")
    if table["overall"] is not None:
        lines.append(f"{'overall':<61} {table['overall']:>7.2f}")
    return "\n".join(lines)
