"""Qwen3 attention serving LiveVLM streams (the language model inside LiveVLM Qwen3-VL).

As `vllm_livevlm.model.qwen2`, with Qwen3's per-head RMS norm of q and k before RoPE: the op sees the
normed, un-rotated keys, so those are the raw keys the memory stores and rotates when it places them.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen3 import Qwen3Attention, Qwen3DecoderLayer

from vllm_livevlm.model.qwen2 import livevlm_attend, swap_attention


class LiveVLMQwen3Attention(Qwen3Attention):
    """Qwen3Attention with its RoPE call replaced by the LiveVLM op (no extra parameters or state)."""

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # The same per-head norm as vLLM's Qwen3Attention (same calls: bitwise the same keys).
        q = self.q_norm(q.view(*q.shape[:-1], q.shape[-1] // self.head_dim, self.head_dim)).view(q.shape)
        k = self.k_norm(k.view(*k.shape[:-1], k.shape[-1] // self.head_dim, self.head_dim)).view(k.shape)
        return livevlm_attend(self, positions, q, k, v)


def serve_livevlm_qwen3(layer: Qwen3DecoderLayer) -> None:
    """Make a built Qwen3 decoder layer serve LiveVLM streams: its attention calls the LiveVLM op."""
    if layer.self_attn.dual_chunk_attention_config:
        raise ValueError("LiveVLM supports Qwen3 attention without dual-chunk attention")
    swap_attention(layer.self_attn, LiveVLMQwen3Attention)
