"""Qwen2 whose attention serves LiveVLM streams (the language model inside LiveVLM LLaVA-OneVision).

Same weights, same math as vLLM's Qwen2 for ordinary requests. Each attention layer calls one registered
custom op, `livevlm::rotary_with_hooks` (`vllm_livevlm.model.ops`), in place of vLLM's RoPE call: it
rotates q/k as vLLM would and, when the step carries LiveVLM requests (`LiveVLMConnector`), before the
rotation fills those requests' context slots (sinks, long-term, short-term memory; raw keys rotated once to
the slot positions) in this layer's paged KV cache and captures the raw (pre-RoPE) keys and values of sink
and clip rows, after it scores a clip's vision tokens with its last vision queries (input of VSB). Being an
op, this runs the same under `--enforce-eager` and under vLLM's default compilation.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import MRotaryEmbedding
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.qwen2 import Qwen2Attention, Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model
from vllm.model_executor.models.utils import PPMissingLayer, extract_layer_index, maybe_prefix

from vllm_livevlm.model.mrope import mrope_in_place
from vllm_livevlm.model.ops import LayerHooks, inplace_rope


class LiveVLMQwen2Attention(Qwen2Attention):
    """Qwen2Attention with its RoPE call replaced by the LiveVLM op (no extra parameters or state)."""

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return livevlm_attend(self, positions, q, k, v)


def livevlm_attend(self_attn: nn.Module, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> torch.Tensor:
    """The rest of a Qwen-family attention from its (pre-RoPE) q, k, v: the LiveVLM op, attention, o_proj."""
    torch.ops.livevlm.rotary_with_hooks(positions, q, k, v, self_attn.attn.layer_name)
    output, _ = self_attn.o_proj(self_attn.attn(q, k, v))
    return output


def swap_attention(self_attn: nn.Module, livevlm_class: type[nn.Module]) -> None:
    """Turn a built attention module into `livevlm_class` (a subclass overriding only forward) and attach
    the op's hooks with the layer's own RoPE (1-D, or multi-axis: `MRotaryEmbedding`, in place)."""
    # Same module, same parameters: only forward differs. Swapping the class (instead of building a
    # second attention) keeps vLLM's layer registry free of duplicate layer names.
    self_attn.__class__ = livevlm_class
    attn = self_attn.attn  # the op finds it by layer name in the forward context
    rotary_emb = self_attn.rotary_emb
    rope = mrope_in_place(rotary_emb) if isinstance(rotary_emb, MRotaryEmbedding) else inplace_rope(rotary_emb)
    attn.livevlm_hooks = LayerHooks(extract_layer_index(attn.layer_name), rope)


def serve_livevlm(layer: Qwen2DecoderLayer) -> None:
    """Make a built Qwen2 decoder layer serve LiveVLM streams: its attention calls the LiveVLM op."""
    if layer.self_attn.qk_norm or layer.self_attn.dual_chunk_attention_config:
        raise ValueError("LiveVLM supports Qwen2 attention without qk_norm or dual-chunk attention")
    swap_attention(layer.self_attn, LiveVLMQwen2Attention)


class LiveVLMQwen2DecoderLayer(Qwen2DecoderLayer):
    def __init__(self, *args, prefix: str = "", **kwargs) -> None:
        super().__init__(*args, prefix=prefix, **kwargs)
        serve_livevlm(self)


class LiveVLMQwen2ForCausalLM(Qwen2ForCausalLM):
    """Qwen2ForCausalLM built with `LiveVLMQwen2DecoderLayer`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config.get_text_config()
        self.config = config
        self.quant_config = vllm_config.quant_config
        self.model = Qwen2Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                decoder_layer_type=LiveVLMQwen2DecoderLayer)
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=self.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
