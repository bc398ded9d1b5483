"""LLaVA-OneVision for LiveVLM streams.

Selected with `--hf-overrides '{"architectures": ["LiveVLMLlavaOnevisionForConditionalGeneration"]}'`.
It inherits vLLM's multimodal processing (196 tokens per 384 px frame + one newline per video) and weight
loading; only its language model differs: `LiveVLMQwen2ForCausalLM`, whose attention serves LiveVLM
streams and behaves exactly like vLLM's Qwen2 for every other request.
"""

from __future__ import annotations

import copy

from vllm.config import VllmConfig
from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration

LANGUAGE_MODEL_ARCH = "LiveVLMQwen2ForCausalLM"


class LiveVLMLlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        hf_config = vllm_config.model_config.hf_config
        text_config = getattr(hf_config, "text_config", None)
        model_type = getattr(text_config, "model_type", None)
        if model_type != "qwen2":
            raise ValueError(f"LiveVLM needs a Qwen2 language model, this checkpoint has {model_type!r}")
        # The parent builds its language model from `text_config.architectures`.
        text_config = copy.copy(text_config)
        text_config.architectures = [LANGUAGE_MODEL_ARCH]
        hf_config.text_config = text_config
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _process_video_pixels(self, inputs):
        return per_video_2d(super()._process_video_pixels(inputs))


def per_video_2d(embeddings):
    """vLLM 0.32 returns `[1, N, D]` per video when a batch mixes videos of different lengths (e.g. a
    flushed short clip next to a full one), which its runner rejects; return `[N, D]` as it expects."""
    if isinstance(embeddings, list):
        return [e.squeeze(0) if e.dim() == 3 else e for e in embeddings]
    return embeddings
