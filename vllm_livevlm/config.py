"""`LiveVLMConfig`: every knob of the LiveVLM algorithm in one place, with the paper's defaults.

The defaults and their sources are the table in `shared/design/algorithm.md` ("Defaults in one place").
A config is built from keyword overrides, a dict, a JSON string or file (`--livevlm-config`), and is
validated on construction so a bad value fails with a message naming the knob.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Mapping

EncodeContext = Literal["all", "window"]


class LiveVLMConfigError(ValueError):
    """A LiveVLM configuration value is invalid or inconsistent."""


@dataclass(frozen=True)
class LiveVLMConfig:
    """Algorithm knobs (LiveVLM v2: Vision Sink Bucketing + Position-agnostic Retrieval)."""

    clip_frames: int = field(default=32, metadata={"help": "frames encoded by one clip prefill (paper code `clip_frame_num`)"})
    short_term_frames: int = field(default=2, metadata={"help": "most recent frames kept uncompressed (paper code `recent_frames`)"})
    encode_context: EncodeContext = field(default="all", metadata={"help": "context a clip attends to while encoded: 'all' (sinks+LTM+STM, paper) or 'window' (sinks+STM)"})
    score_queries: int = field(default=196, metadata={"help": "last vision tokens of a clip whose queries score the cached vision keys (r)"})
    long_term_budget_tokens: int | None = field(default=12000, metadata={"help": "long-term tokens kept per layer (M); null never compresses; 0 keeps none (sliding window)"})
    bucket_capacity: int = field(default=1, metadata={"help": "kept tokens per temporal bucket in the coverage phase (B)"})
    score_fraction: float = field(default=0.5, metadata={"help": "share of M kept purely by score before the coverage phase"})
    per_head_selection: bool = field(default=False, metadata={"help": "select tokens per KV head instead of per layer"})
    page_tokens: int = field(default=16, metadata={"help": "long-term tokens per retrieval page (C)"})
    retrieve_ratio: float = field(default=0.4, metadata={"help": "share of long-term pages retrieved per layer for a question"})
    flush_on_question: bool = field(default=True, metadata={"help": "encode pending frames as a short clip before answering"})
    history_turns: int = field(default=0, metadata={"help": "earlier Q/A turns of the stream placed before a new question"})
    sample_fps: float | None = field(default=1.0, metadata={"help": "frames per second kept of what a stream receives, sampled by the frames' timestamps; null keeps every frame"})
    time_prompt_frames: int = field(default=0, metadata={"help": "frame times (LLaVA-Video's time instruction) placed before a question, at most this many; 0 = off"})

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LiveVLMConfigError(f"{name} must be a positive integer, got {value!r}")

        for name in ("clip_frames", "score_queries", "bucket_capacity", "page_tokens"):
            positive(name)
        for name in ("short_term_frames", "history_turns", "time_prompt_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LiveVLMConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.encode_context not in ("all", "window"):
            raise LiveVLMConfigError(f"encode_context must be 'all' or 'window', got {self.encode_context!r}")
        if not 0.0 <= float(self.score_fraction) <= 1.0:
            raise LiveVLMConfigError(f"score_fraction must be in [0, 1], got {self.score_fraction!r}")
        if not 0.0 < float(self.retrieve_ratio) <= 1.0:
            raise LiveVLMConfigError(f"retrieve_ratio must be in (0, 1], got {self.retrieve_ratio!r}")
        if not isinstance(self.per_head_selection, bool) or not isinstance(self.flush_on_question, bool):
            raise LiveVLMConfigError("per_head_selection and flush_on_question must be booleans")
        fps = self.sample_fps
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float))
                                or not math.isfinite(fps) or fps <= 0):
            raise LiveVLMConfigError(f"sample_fps must be a positive number of frames per second or null, got {fps!r}")
        budget = self.long_term_budget_tokens
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
                raise LiveVLMConfigError(f"long_term_budget_tokens must be a non-negative integer or null, got {budget!r}")
            if budget % self.bucket_capacity:
                raise LiveVLMConfigError(
                    f"long_term_budget_tokens ({budget}) must be a multiple of bucket_capacity "
                    f"({self.bucket_capacity}): VSB splits the budget into M / B temporal buckets")

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def lossless(self) -> bool:
        """True when answers must equal vanilla attention over the same clips (spec, "Invariants")."""
        return (self.long_term_budget_tokens is None and self.retrieve_ratio == 1.0
                and self.encode_context == "all")

    @property
    def score_keep_tokens(self) -> int:
        """R: tokens VSB keeps by score alone, ignoring bucket capacity."""
        assert self.long_term_budget_tokens is not None
        return int(self.score_fraction * self.long_term_budget_tokens)

    # ---- construction ---------------------------------------------------------------------------
    def replace(self, overrides: Mapping[str, Any] | None = None, **kwargs: Any) -> "LiveVLMConfig":
        """A copy with some knobs changed (validated; unknown knobs are an error)."""
        merged = dict(overrides or {}, **kwargs)
        _check_known(merged)
        return dataclasses.replace(self, **merged)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "LiveVLMConfig":
        data = dict(data or {})
        _check_known(data)
        return cls(**data)

    @classmethod
    def from_json(cls, text_or_path: str) -> "LiveVLMConfig":
        """Parse `--livevlm-config`: inline JSON, or the path of a JSON file."""
        text = text_or_path
        if not text.lstrip().startswith("{"):
            if not os.path.exists(text):
                raise LiveVLMConfigError(f"--livevlm-config: {text!r} is neither a JSON object nor a file")
            with open(text) as f:
                text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LiveVLMConfigError(f"--livevlm-config is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise LiveVLMConfigError("--livevlm-config must be a JSON object")
        return cls.from_dict(data)

    @classmethod
    def coerce(cls, value: "LiveVLMConfig | Mapping[str, Any] | str | None", base: "LiveVLMConfig | None" = None) -> "LiveVLMConfig":
        """Accept a config, a dict of overrides (applied on `base`), JSON, or None (= `base`)."""
        base = base or cls()
        if value is None:
            return base
        if isinstance(value, LiveVLMConfig):
            return value
        if isinstance(value, str):
            value = dataclasses.asdict(cls.from_json(value))
        return base.replace(value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- command line -----------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add `--livevlm-config JSON` plus one `--livevlm-<knob>` flag per knob."""
        group = parser.add_argument_group("LiveVLM", "streaming memory knobs (defaults: the paper's)")
        group.add_argument("--livevlm-config", default=None, help="JSON object or file with knob overrides")
        for f in fields(cls):
            flag = "--livevlm-" + f.name.replace("_", "-")
            kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{f.metadata['help']} (default: {f.default})"}
            if f.type in ("bool",) or isinstance(f.default, bool):
                kwargs["type"] = _parse_bool
            elif f.name == "long_term_budget_tokens":
                kwargs["type"] = _parse_optional_int
            elif f.name == "sample_fps":
                kwargs["type"] = _parse_optional_float
            elif isinstance(f.default, float):
                kwargs["type"] = float
            elif isinstance(f.default, int):
                kwargs["type"] = int
            group.add_argument(flag, **kwargs)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "LiveVLMConfig":
        config = cls.from_json(args.livevlm_config) if getattr(args, "livevlm_config", None) else cls()
        overrides = {f.name: getattr(args, "livevlm_" + f.name) for f in fields(cls)
                     if hasattr(args, "livevlm_" + f.name)}
        return config.replace(overrides)


def _check_known(data: Mapping[str, Any]) -> None:
    known = {f.name for f in fields(LiveVLMConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LiveVLMConfigError(f"unknown LiveVLM config key(s) {unknown}; known: {sorted(known)}")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _parse_optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null", "") else int(text)


def _parse_optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "null", "") else float(text)
