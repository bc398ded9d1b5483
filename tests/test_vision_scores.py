"""Grouped, chunked vision-to-vision scoring equals the formula it replaced (keys repeated per query head,
float32 logits), for grouped-query shapes; its temporary memory stays within `scoring_transient_bytes`."""

from __future__ import annotations

import pytest
import torch

from vllm_livevlm.memory.budget import ModelShape, scoring_chunk_queries, scoring_transient_bytes
from vllm_livevlm.memory.scoring import vision_scores


def _repeated_keys_scores(clip_q, clip_k, context_k, num_queries, scale):
    """The implementation of 6cce065: keys repeated to every query head, three float32 logit tensors."""
    num_tokens, num_heads, dim = clip_q.shape
    kv_heads = clip_k.shape[1]
    last = num_tokens - 1
    first = max(last - num_queries, 0)
    queries = clip_q[first:last].float()
    keys = torch.cat([context_k, clip_k]).float()
    keys = keys.repeat_interleave(num_heads // kv_heads, dim=1)
    logits = torch.einsum("rhd,nhd->hrn", queries, keys) * scale
    n_context = context_k.shape[0]
    query_index = torch.arange(first, last)
    key_index = torch.arange(num_tokens)
    future = key_index.view(1, -1) > query_index.view(-1, 1)
    logits[:, :, n_context:].masked_fill_(future, float("-inf"))
    probs = logits.softmax(dim=-1).mean(dim=1)
    return probs.view(kv_heads, num_heads // kv_heads, -1).mean(dim=1).transpose(0, 1).contiguous()


def _inputs(q_heads: int, kv_heads: int, tokens: int, context: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dim = 64
    clip_q = torch.randn(tokens, q_heads, dim, generator=gen) * 0.5
    clip_k = torch.randn(tokens, kv_heads, dim, generator=gen) * 0.5
    context_k = torch.randn(context, kv_heads, dim, generator=gen) * 0.5
    return clip_q.to(dtype), clip_k.to(dtype), context_k.to(dtype), dim ** -0.5


@pytest.mark.parametrize("q_heads,kv_heads,num_queries", [(4, 2, 150), (8, 2, 196), (2, 2, 40), (4, 1, 500)])
def test_grouped_scores_equal_the_repeated_keys_formula(q_heads, kv_heads, num_queries):
    clip_q, clip_k, context_k, scale = _inputs(q_heads, kv_heads, tokens=2 * 196 + 1, context=300)
    expected = _repeated_keys_scores(clip_q, clip_k, context_k, num_queries, scale)
    out = vision_scores(clip_q, clip_k, context_k, num_queries, scale)
    assert out.shape == (300 + 393, kv_heads) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-8)
    # Chunks of a few query positions (a long stream on a small budget) give the same scores.
    small = vision_scores(clip_q, clip_k, context_k, num_queries, scale, chunk_bytes=100_000)
    assert 2 * scoring_chunk_queries(q_heads, 64, 4, 693, 100_000) < num_queries  # several chunks
    torch.testing.assert_close(small, expected, rtol=1e-5, atol=1e-8)


def test_bfloat16_scores_are_close_to_float32():
    """bf16 logits (float32 softmax): every score within 3% (+1e-4) of the float32 formula on the same
    bf16 inputs, and the top-scored tokens mostly agree (VSB keeps by rank)."""
    clip_q, clip_k, context_k, scale = _inputs(4, 2, tokens=2 * 196 + 1, context=600, dtype=torch.bfloat16)
    out = vision_scores(clip_q, clip_k, context_k, 196, scale)
    expected = _repeated_keys_scores(clip_q, clip_k, context_k, 196, scale)
    torch.testing.assert_close(out, expected, rtol=3e-2, atol=1e-4)
    for head in range(2):
        top_out = set(out[:, head].topk(100).indices.tolist())
        top_expected = set(expected[:, head].topk(100).indices.tolist())
        assert len(top_out & top_expected) >= 90


def test_transient_formula_counts_one_chunk_and_the_keys():
    shape = ModelShape(layers=28, kv_heads=4, head_dim=128, kv_bytes=2, tokens_per_frame=196, query_heads=28)
    keys = 1 + 12000 + 393 + 32 * 196 + 1
    per_query = 28 * (128 * 2 + keys * 6 + 8) + keys
    chunk = (128 * 2**20) // per_query
    assert scoring_transient_bytes(shape, keys, 196) == keys * 4 * (128 * 2 + 12) + chunk * per_query
    assert scoring_transient_bytes(shape, keys, 3) == keys * 4 * (128 * 2 + 12) + 3 * per_query
    assert scoring_transient_bytes(shape, keys, 196) < 200 * 2**20  # the repeated-keys formula: ~1 GiB


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_allocation_stays_within_the_formula_on_gpu():
    """The allocator's peak while scoring one layer of a 7B-shaped clip: at most the documented transient
    (plus the returned scores' own storage)."""
    shape = ModelShape(layers=28, kv_heads=4, head_dim=128, kv_bytes=2, tokens_per_frame=196, query_heads=28)
    clip_q, clip_k, context_k, scale = (t.cuda() if isinstance(t, torch.Tensor) else t
                                        for t in _inputs(28, 4, tokens=32 * 196 + 1, context=12400,
                                                         dtype=torch.bfloat16))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = vision_scores(clip_q, clip_k, context_k, 196, scale)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert peak <= scoring_transient_bytes(shape, 12400 + 32 * 196 + 1, 196) + out.untyped_storage().nbytes()
