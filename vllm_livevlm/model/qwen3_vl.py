"""Qwen3-VL for LiveVLM streams.

Selected with `--hf-overrides '{"architectures": ["LiveVLMQwen3VLForConditionalGeneration"]}'`. It inherits
vLLM's Qwen3-VL (vision tower, deepstack, multimodal processing with timestamps, interleaved multi-axis
positions, weight loading); its language model's attention layers serve LiveVLM streams through the LiveVLM
op (`vllm_livevlm.model.qwen3`), rotating with the layer's interleaved `MRotaryEmbedding`. Deepstack adds
visual features to the first layers' hidden states at a clip's vision positions while the clip prefills,
so the keys the memory stores already carry them; placed contexts get the multi-axis rule's positions
(`docs/positions.md`).
"""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration
from vllm.model_executor.models.utils import PPMissingLayer

from vllm_livevlm.model.qwen3 import serve_livevlm_qwen3


class LiveVLMQwen3VLForConditionalGeneration(Qwen3VLForConditionalGeneration):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # vLLM builds the language model itself (`Qwen3LLMForCausalLM`): its decoder layers are turned into
        # LiveVLM layers in place (same modules and parameters).
        for layer in self.language_model.model.layers:
            if not isinstance(layer, PPMissingLayer):
                serve_livevlm_qwen3(layer)
