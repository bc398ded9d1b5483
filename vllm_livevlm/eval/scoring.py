"""Judging one response, and the accuracy table (per task, per category, overall) of a benchmark.

The official rules are the benchmarks' own evaluation code, reproduced exactly, quirks included:
OVO-Bench (`utils/OVOBenchScore.py`), StreamingBench (`src/data/count.py`), Video-MME (lmms-eval's
`videomme/utils.py`), MLVU and EgoSchema as ReKV scores them (`video_qa/base.py`). The lenient rules are an
option: they read the option letter, a yes/no word or a number out of a free-form answer. Open-ended answers
are not judged here: they are written out for an external LLM judge.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from vllm_livevlm.eval.records import LETTERS, EvalQuestion, Scoring

OFFICIAL_RULES = {
    Scoring.OVO_LETTER.value: "OVO-Bench: correct when the gold letter occurs anywhere in the response (case-sensitive)",
    Scoring.OVO_COUNT.value: "OVO-Bench REC: all digits of the response, joined, equal the count as written",
    Scoring.OVO_YES_NO.value: 'OVO-Bench SSR/CRR: the response is exactly "Y"/"N", or contains "Yes"/"No" (case-sensitive)',
    Scoring.FIRST_CHAR.value: "StreamingBench: the first character of the response equals the gold letter",
    Scoring.LMMS_LETTER.value: "Video-MME (lmms-eval): the first of A-D after removing lmms-eval's answer prefixes",
    Scoring.REKV_LETTER.value: 'ReKV: the character before the first ")", else the first character, equals the gold letter',
    Scoring.OPEN.value: "open-ended: written to open_ended.jsonl for an external LLM judge (record the judge model)",
}
LENIENT_RULES = {
    Scoring.OVO_COUNT.value: "lenient: the response's digits, read as one integer, equal the count",
    Scoring.OVO_YES_NO.value: "lenient: the response holds exactly one of the words yes/y or no/n (any case)",
    Scoring.OPEN.value: OFFICIAL_RULES[Scoring.OPEN.value],
}
LENIENT_LETTER = "lenient: the option letter read from the answer (B, (B), B., The answer is B, ...)"
# lmms-eval's list, kept as it is: two pairs lack a comma, so Python joins each pair into one string.
_LMMS_PREFIXES = ["The best answer is", "The correct answer is", "The answer is", "The answer",
                  "The best option is" "The correct option is", "Best answer:" "Best option:"]
_ANSWER_IS = re.compile(r"(?i:answer|option|choice)\s*(?i:is)?\s*[:\-]?\s*\(?([A-Z])\b")
_LEADING = re.compile(r"^\W*\(?([A-Z])(?:[\).:,\s]|$)")
_STANDALONE = re.compile(r"(?<![A-Za-z])\(?([A-Z])\)?(?![A-Za-z])")


def extract_letter(response: str, num_options: int) -> str | None:
    """The option letter a free-form answer picks: "B", "(B)", "B. text", "The answer is B", "Answer: (B)"."""
    allowed = set(LETTERS[:num_options])
    for pattern in (_LEADING, _ANSWER_IS):
        match = pattern.search(response.strip())
        if match and match.group(1).upper() in allowed:
            return match.group(1).upper()
    for match in _STANDALONE.finditer(response):
        if match.group(1) in allowed:
            return match.group(1)
    return None


def lmms_letter(response: str) -> str:
    """lmms-eval's `extract_characters_regex` (Video-MME)."""
    text = response.strip()
    for prefix in _LMMS_PREFIXES:
        text = text.replace(prefix, "")
    match = re.search(r"[ABCD]", text)  # (its "more than 10 words and no A-D" test returns "" here too)
    return "" if match is None else match.group(0)


def rekv_letter(response: str) -> str:
    """ReKV's `extract_characters_regex` (MLVU, EgoSchema)."""
    text = response.strip()
    if ")" in text:
        index = text.index(")")
        return text[index - 1:index]
    return text[:1]


def yes_no_word(response: str) -> str | None:
    """"Yes" / "No" when the response holds yes/y or no/n words of one kind only."""
    words = [w for w in re.findall(r"[a-z]+", response.lower()) if w in ("yes", "y", "no", "n")]
    kinds = {"Yes" if w in ("yes", "y") else "No" for w in words}
    return kinds.pop() if len(kinds) == 1 else None


def _official(rule: Scoring, gold: str, response: str) -> bool:
    if rule is Scoring.OVO_LETTER:
        return gold in response
    if rule is Scoring.OVO_COUNT:
        return "".join(re.findall(r"\d+", response)) == gold
    if rule is Scoring.OVO_YES_NO:
        return response == gold[0] or gold in response
    if rule is Scoring.FIRST_CHAR:
        return response[:1] == gold
    if rule is Scoring.LMMS_LETTER:
        return lmms_letter(response) == gold
    return rekv_letter(response) == gold


def _lenient(question: EvalQuestion, response: str) -> bool:
    if question.scoring is Scoring.OVO_COUNT:
        digits = "".join(re.findall(r"\d", response))
        return digits != "" and int(digits) == int(question.answer)
    if question.scoring is Scoring.OVO_YES_NO:
        return yes_no_word(response) == question.answer
    return extract_letter(response, len(question.options or LETTERS)) == question.answer


def is_correct(question: EvalQuestion, response: str, lenient: bool = False) -> bool | None:
    """Whether the response is right by its benchmark's official rule (or the lenient one); None if open-ended."""
    if question.scoring is Scoring.OPEN:
        return None
    return _lenient(question, response) if lenient else _official(question.scoring, question.answer, response)


def rule_descriptions(rules: set[Scoring], lenient: bool) -> dict[str, str]:
    """What each rule used in a run means, for accuracy.json."""
    if not lenient:
        return {rule.value: OFFICIAL_RULES[rule.value] for rule in rules}
    return {rule.value: LENIENT_RULES.get(rule.value, LENIENT_LETTER) for rule in rules}


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
    question_mean = _percent(sum(c[0] for c in tasks.values()), judged) if judged else None
    return {"tasks": task_acc, "categories": category_acc, "overall": overall, "extra": extra,
            "question_mean": question_mean, "judged": judged, "open_ended": open_ended}


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
        lines.append(f"{'mean over questions':<61} {table['question_mean']:>7.2f}")
    return "\n".join(lines)
