"""Finding a benchmark's files where its release (or a tool's copy of it) puts them.

Annotation files are looked up under a few known names; a video named in a record is looked up under a few
base folders, with the record's own leading folders dropped one at a time (ReKV writes `data/mlvu/videos/...`
relative to its own root, StreamingBench `./videos/...` relative to `src/`), and with the other extensions a
release uses. Every failure names the file, the record and what was tried.
"""

from __future__ import annotations

import json
import os
from typing import Any


class AnnotationError(ValueError):
    """An annotation file is missing or a record in it does not fit its benchmark's published format."""


def read_json(path: str) -> Any:
    """A JSON file, or a JSON-lines file (`.jsonl`) as a list."""
    if not os.path.isfile(path):
        raise AnnotationError(f"annotation file {path} does not exist")
    try:
        with open(path) as f:
            if path.endswith(".jsonl"):
                return [json.loads(line) for line in f if line.strip()]
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AnnotationError(f"{path}: not valid JSON ({error})") from None


def find_annotation(data_dir: str, names: list[str], what: str) -> str:
    """The first of `names` (paths relative to `data_dir`) that exists."""
    for name in names:
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    raise AnnotationError(f"no {what} in {data_dir} (looked for {', '.join(names)}; pass --annotations FILE)")


def _suffixes(relative: str) -> list[str]:
    """`a/b/c/x.mp4` -> itself, `b/c/x.mp4`, `c/x.mp4`: drop leading folders, keep the file's own folder
    (MLVU holds different videos under one name in different task folders)."""
    parts = [p for p in relative.replace("\\", "/").split("/") if p not in ("", ".")]
    keep = min(2, len(parts))
    return [os.path.join(*parts[i:]) for i in range(len(parts) - keep + 1)]


def resolve_video(where: str, relative: str, bases: list[str], extensions: tuple[str, ...] = ()) -> str:
    """The existing file `relative` names under one of `bases` (also with its extension swapped for one of
    `extensions`); `where` ("FILE: record ID") prefixes the error."""
    if not isinstance(relative, str) or not relative.strip():
        raise AnnotationError(f"{where}: no video path ({relative!r})")
    if os.path.isabs(relative):
        candidates = [relative]
    else:
        candidates = [os.path.join(base, suffix) for suffix in _suffixes(relative) for base in dict.fromkeys(bases)]
    for candidate in candidates:
        stem = os.path.splitext(candidate)[0]
        for path in (candidate, *(stem + ext for ext in extensions)):
            if os.path.isfile(path):
                return os.path.abspath(path)
    raise AnnotationError(f"{where}: video {relative!r} not found (looked under {', '.join(dict.fromkeys(bases))}"
                          + (f", also as {', '.join(extensions)}" if extensions else "") + ")")


def resolve_first(where: str, relatives: list[str], bases: list[str], extensions: tuple[str, ...] = ()) -> str:
    """`resolve_video` of the first of `relatives` that exists (the error names the first)."""
    errors = []
    for relative in relatives:
        try:
            return resolve_video(where, relative, bases, extensions)
        except AnnotationError as error:
            errors.append(error)
    raise errors[0]


def check_unique_ids(path: str, ids: list[str]) -> None:
    seen: set[str] = set()
    for qid in ids:
        if qid in seen:
            raise AnnotationError(f"{path}: question id {qid!r} occurs twice")
        seen.add(qid)
