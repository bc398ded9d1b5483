"""Environment a LiveVLM server process reads: which plugins vLLM loads, the stream config, limits and
state dir."""

from __future__ import annotations

import json
import os
from typing import Any

from vllm_livevlm.config import LiveVLMConfig

PLUGINS = ("livevlm", "livevlm_streams")
STATE_DIR_ENV = "VLLM_LIVEVLM_STATE_DIR"  # `--livevlm-state-dir`: where streams are checkpointed


def livevlm_env(config: LiveVLMConfig, limits: dict[str, Any] | None = None,
                state_dir: str | None = None) -> dict[str, str]:
    existing = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p]
    env = {
        # An allowlist for every plugin group: name the general plugin too, not just the routes.
        "VLLM_PLUGINS": ",".join(dict.fromkeys([*existing, *PLUGINS])),
        "VLLM_LIVEVLM_CONFIG": json.dumps(config.to_dict()),
        "VLLM_USE_V2_MODEL_RUNNER": os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0"),
    }
    if limits:
        env["VLLM_LIVEVLM_LIMITS"] = json.dumps(limits)
    if state_dir:
        env[STATE_DIR_ENV] = state_dir
    return env
