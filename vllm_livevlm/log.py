"""The plugin's loggers live under vLLM's `vllm` logger (`vllm.livevlm.<module>`), so whatever logging
vLLM runs with (level, handlers, format, `VLLM_LOGGING_CONFIG_PATH`) applies to ours: expiries, drains
and warnings show in the server's log next to vLLM's own lines. (A `vllm_livevlm.*` logger would have no
handler, and Python's fallback drops INFO.)"""

from __future__ import annotations

import logging


def get_logger(module: str) -> logging.Logger:
    return logging.getLogger("vllm.livevlm." + module.removeprefix("vllm_livevlm."))
