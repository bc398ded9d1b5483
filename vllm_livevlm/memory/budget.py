"""`memory_bound_bytes`: the most memory one stream's snapshot can hold, known before the stream opens.

A server admits a stream only if its bound fits the store limits, so the store can never outgrow them:
long-term memory is capped at M tokens per layer by VSB, short-term memory at the most recent frames, and
the sinks are the stream's chat prefix. The layout matches `StreamMemory.nbytes` term by term.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_livevlm.config import LiveVLMConfig

_INDEX_BYTES = 8  # int64 token ids and frame indices
_SCORE_BYTES = 4  # float32 scores and page summaries


@dataclass(frozen=True)
class ModelShape:
    """What the store's size depends on: the language model's KV shape and the KV dtype's size."""

    layers: int
    kv_heads: int
    head_dim: int
    kv_bytes: int          # bytes per K or V element
    tokens_per_frame: int

    @classmethod
    def of(cls, model_config, tokens_per_frame: int) -> "ModelShape":
        """From a vLLM `ModelConfig` (LLaVA-OneVision: the text config holds the LLM's shape)."""
        text = model_config.hf_config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(text.num_hidden_layers, text.num_key_value_heads, head_dim,
                   model_config.dtype.itemsize, tokens_per_frame)


def memory_bound_bytes(config: LiveVLMConfig, shape: ModelShape, sink_tokens: int) -> int | None:
    """Upper bound of one snapshot's bytes, or None when long-term memory is never compressed (unbounded)."""
    budget = config.long_term_budget_tokens
    if budget is None:
        return None
    layers, heads, dim = shape.layers, shape.kv_heads, shape.head_dim
    stm = config.short_term_frames * shape.tokens_per_frame + 1  # + the newline closing a clip
    per_token = 2 * heads * dim * shape.kv_bytes + heads * _SCORE_BYTES  # K, V, one score per KV head
    kv = layers * (sink_tokens * 2 * heads * dim * shape.kv_bytes + (budget + stm) * per_token)
    ltm_index = layers * heads * budget * 2 * _INDEX_BYTES                 # token id + frame per kept token
    stm_index = stm * 2 * _INDEX_BYTES
    summaries = layers * (budget // config.page_tokens) * heads * dim * _SCORE_BYTES
    return kv + ltm_index + stm_index + summaries
