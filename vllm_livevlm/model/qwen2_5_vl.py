"""Qwen2.5-VL for LiveVLM streams.

Selected with `--hf-overrides '{"architectures": ["LiveVLMQwen2_5_VLForConditionalGeneration"]}'`. It
inherits vLLM's Qwen2.5-VL (vision tower, multimodal processing, multi-axis positions, weight loading);
its language model's attention layers serve LiveVLM streams through the same op as LLaVA-OneVision's
(`vllm_livevlm.model.qwen2.serve_livevlm`), rotating with the layer's `MRotaryEmbedding` (positions
[3, N]). Placed contexts get the multi-axis rule's positions (`docs/positions.md`).
"""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.utils import PPMissingLayer

from vllm_livevlm.model.qwen2 import serve_livevlm


class LiveVLMQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # vLLM builds the language model as a stock `Qwen2ForCausalLM` (hard-coded architecture): its
        # decoder layers are turned into LiveVLM layers in place (same modules and parameters).
        for layer in self.language_model.model.layers:
            if not isinstance(layer, PPMissingLayer):
                serve_livevlm(layer)
