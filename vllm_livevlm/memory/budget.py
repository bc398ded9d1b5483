"""`memory_bound_bytes`: the most memory one stream's snapshot can hold, known before the stream opens.

A server admits a stream only if its bound fits the store limits, so the store can never outgrow them:
long-term memory is capped at M tokens per layer by VSB, short-term memory at the most recent frames, and
the sinks are the stream's chat prefix. The layout matches `StreamMemory.nbytes` term by term (a snapshot
holds no storage beyond its tensors' own sizes, so the bound covers what is allocated, not only what is
viewed). `scoring_transient_bytes` bounds the temporary memory of vision-to-vision scoring.
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
    query_heads: int       # attention (query) heads: what vision-to-vision scoring's transient scales with
    position_axes: int = 0  # int64 position record entries per stored token (multi-axis models)

    @classmethod
    def of(cls, model_config, tokens_per_frame: int, position_axes: int = 0) -> "ModelShape":
        """From a vLLM `ModelConfig` (LLaVA-OneVision: the text config holds the LLM's shape)."""
        text = model_config.hf_config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(text.num_hidden_layers, text.num_key_value_heads, head_dim,
                   model_config.dtype.itemsize, tokens_per_frame, text.num_attention_heads, position_axes)


def memory_bound_bytes(config: LiveVLMConfig, shape: ModelShape, sink_tokens: int) -> int | None:
    """Upper bound of one snapshot's bytes, or None when long-term memory is never compressed (unbounded)."""
    budget = config.long_term_budget_tokens
    if budget is None:
        return None
    layers, heads, dim = shape.layers, shape.kv_heads, shape.head_dim
    # A clip's newline token belongs to its last frame, so each short-term frame may carry one (1-frame clips).
    stm = config.short_term_frames * (shape.tokens_per_frame + 1)
    per_token = 2 * heads * dim * shape.kv_bytes + heads * _SCORE_BYTES  # K, V, one score per KV head
    kv = layers * (sink_tokens * 2 * heads * dim * shape.kv_bytes + (budget + stm) * per_token)
    records = 2 + shape.position_axes                                      # token id, frame, position record
    ltm_index = layers * heads * budget * records * _INDEX_BYTES
    stm_index = stm * records * _INDEX_BYTES
    summaries = layers * (budget // config.page_tokens) * heads * dim * _SCORE_BYTES
    return kv + ltm_index + stm_index + summaries


def capture_bytes(shape: ModelShape, tokens: int) -> int:
    """What an engine step holds for the clips it prefills until they commit: their raw K and V on every
    layer and one float32 score per token and KV head (`tokens`: at most the step's token budget)."""
    return tokens * shape.layers * (2 * shape.kv_heads * shape.head_dim * shape.kv_bytes + shape.kv_heads * _SCORE_BYTES)


# ---- the temporary memory of vision-to-vision scoring (`memory.scoring.vision_scores`) ------------------------
SCORING_CHUNK_BYTES = 128 * 2**20  # what one chunk of scored queries may allocate (at least one query)


def _scoring_bytes_per_query(query_heads: int, head_dim: int, kv_bytes: int, keys: int) -> int:
    """One scored query position: its scaled queries, its logits in the model dtype and in float32 (the
    softmax runs in place), two row reductions, its causal mask row."""
    return query_heads * (head_dim * kv_bytes + keys * (kv_bytes + _SCORE_BYTES) + 2 * _SCORE_BYTES) + keys


def scoring_chunk_queries(query_heads: int, head_dim: int, kv_bytes: int, keys: int,
                          chunk_bytes: int = SCORING_CHUNK_BYTES) -> int:
    """Query positions scored together: as many as fit `chunk_bytes`, at least one."""
    return max(1, chunk_bytes // _scoring_bytes_per_query(query_heads, head_dim, kv_bytes, keys))


def scoring_transient_bytes(shape: ModelShape, keys: int, queries: int, chunk_bytes: int = SCORING_CHUNK_BYTES) -> int:
    """Most temporary memory scoring one layer of one clip allocates, with `keys` keys (context vision tokens
    + the clip's tokens) and `queries` scored queries:

        keys * H * (D * kv_bytes + 12)                      keys as [H, n, D]; float32 sum, its addend, result
      + c * (Hq * (D * kv_bytes + keys * (kv_bytes + 4) + 8) + keys)      one chunk of c query positions

    with c = min(queries, max(1, chunk_bytes // the per-query term)). Layers and clips are scored one after
    another, so this is also the most scoring holds at once in an engine."""
    per_query = _scoring_bytes_per_query(shape.query_heads, shape.head_dim, shape.kv_bytes, keys)
    chunk = min(queries, scoring_chunk_queries(shape.query_heads, shape.head_dim, shape.kv_bytes, keys, chunk_bytes))
    return keys * shape.kv_heads * (shape.head_dim * shape.kv_bytes + 3 * _SCORE_BYTES) + chunk * per_query


def scoring_reserve_bytes(shape: ModelShape, max_stream_bytes: int, max_clip_frames: int) -> int:
    """What a server reserves at start for scoring: the transient of the largest clip over the largest
    context an admitted stream can have (its K/V alone cannot exceed `max_stream_bytes`)."""
    clip = max_clip_frames * shape.tokens_per_frame + 1
    context = max_stream_bytes // (shape.layers * 2 * shape.kv_heads * shape.head_dim * shape.kv_bytes)
    return scoring_transient_bytes(shape, context + clip, clip - 1)
