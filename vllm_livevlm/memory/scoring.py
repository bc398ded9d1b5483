"""Vision-to-vision scores of a clip: how much its last vision queries attend to each cached vision key.

Grouped over KV heads (a KV head's query heads share one batched matmul with its keys; keys are never
repeated per query head), the softmax scale folded into the queries, logits in the model dtype and the
softmax in float32, in chunks of query positions so the temporary memory is bounded by
`budget.scoring_transient_bytes` whatever the stream's length.
"""

from __future__ import annotations

import torch

from vllm_livevlm.memory.budget import SCORING_CHUNK_BYTES, scoring_chunk_queries


def vision_scores(clip_q: torch.Tensor, clip_k: torch.Tensor, context_k: torch.Tensor, num_queries: int,
                  scale: float, chunk_bytes: int = SCORING_CHUNK_BYTES) -> torch.Tensor:
    """Scores [n_context + T, H] (float32) per KV head: softmax attention of the clip's last `num_queries`
    vision queries (the trailing newline token excluded) over the context vision keys and the clip's keys
    (causal inside the clip), averaged over those queries and the query heads of each KV head.

    clip_q [T, Hq, D], clip_k [T, H, D], context_k [n_context, H, D]: rotated, in the model dtype."""
    num_tokens, num_heads, dim = clip_q.shape
    kv_heads = clip_k.shape[1]
    group = num_heads // kv_heads
    last = num_tokens - 1  # the newline token that closes the video
    first = max(last - num_queries, 0)
    n_context = context_k.shape[0]
    keys = torch.cat([context_k.transpose(0, 1), clip_k.transpose(0, 1)], dim=1)  # [H, n, D]
    num_keys = keys.shape[1]
    device = clip_q.device
    total = torch.zeros(kv_heads, num_keys, dtype=torch.float32, device=device)
    key_index = torch.arange(num_tokens, device=device)
    step = scoring_chunk_queries(num_heads, dim, clip_q.element_size(), num_keys, chunk_bytes)
    for start in range(first, last, step):
        count = min(step, last - start)
        # Rows of KV head h: (query position, query head of h's group), scaled once.
        queries = torch.empty((kv_heads, count, group, dim), dtype=clip_q.dtype, device=device)
        torch.mul(clip_q[start:start + count].view(count, kv_heads, group, dim).permute(1, 0, 2, 3), scale,
                  out=queries)
        probs = torch.bmm(queries.view(kv_heads, count * group, dim), keys.transpose(1, 2)).float()
        future = key_index.view(1, -1) > torch.arange(start, start + count, device=device).view(-1, 1)
        probs.view(kv_heads, count, group, num_keys)[..., n_context:].masked_fill_(
            future.view(count, 1, num_tokens), float("-inf"))
        probs.sub_(probs.amax(dim=-1, keepdim=True)).exp_()   # softmax in place, float32
        probs.div_(probs.sum(dim=-1, keepdim=True))
        total += probs.sum(dim=1)
    return (total / ((last - first) * group)).transpose(0, 1).contiguous()
