"""vllm-livevlm: LiveVLM streaming video memory for vLLM (LLaVA-OneVision)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_livevlm.config import LiveVLMConfig, LiveVLMConfigError

if TYPE_CHECKING:
    from vllm_livevlm.api import Answer, LiveVLM, Stream, StreamClosed

__all__ = ["LiveVLM", "Stream", "Answer", "StreamClosed", "LiveVLMConfig", "LiveVLMConfigError"]


def __getattr__(name: str):
    # The API imports vLLM lazily so that `import vllm_livevlm` (e.g. by vLLM's plugin loader) stays cheap.
    if name in ("LiveVLM", "Stream", "Answer", "StreamClosed"):
        from vllm_livevlm import api

        return getattr(api, name)
    raise AttributeError(name)
