"""PaR scorer on synthetic tensors: a planted page is found in every layer wherever it sits, and a page's
score does not depend on the stream position its content arrived at."""

import torch

from vllm_livevlm.config import LiveVLMConfig
from vllm_livevlm.memory import retrieval
from vllm_livevlm.memory.stream import ClipKV, StreamMemory

LAYERS, KV_HEADS, Q_HEADS, DIM, PAGE = 3, 2, 4, 64, 16


def _planted(gen: torch.Generator, query_raw: torch.Tensor, pages: int, at: int) -> torch.Tensor:
    """Raw keys [pages * PAGE, H, D]: noise, with page `at` aligned with the averaged question query."""
    keys = torch.randn(pages * PAGE, KV_HEADS, DIM, generator=gen) * 0.3
    target = retrieval.average_query(query_raw, KV_HEADS)
    keys[at * PAGE:(at + 1) * PAGE] += 2.0 * target / target.norm(dim=-1, keepdim=True)
    return keys


def test_planted_page_is_retrieved_in_every_layer_wherever_it_sits():
    gen = torch.Generator().manual_seed(0)
    for at in (0, 7, 19):
        for layer in range(LAYERS):
            query_raw = torch.randn(12, Q_HEADS, DIM, generator=gen)  # a question's raw queries
            keys = _planted(gen, query_raw, pages=20, at=at)
            scores = retrieval.page_scores(retrieval.average_query(query_raw, KV_HEADS),
                                           retrieval.page_summaries(keys, PAGE))
            layout = retrieval.PageLayout(keys.shape[0], PAGE, 0.1)
            chosen = retrieval.top_pages(scores, layout.full_pages_read)
            assert at in chosen.tolist(), (at, layer)
            assert chosen.tolist() == sorted(chosen.tolist())  # temporal order


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 1e6) -> torch.Tensor:
    """RoPE (neox layout, Qwen2's theta) of x [L, n, H, D] at `positions` [n]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM)
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = x[..., :DIM // 2], x[..., DIM // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def test_page_score_is_position_agnostic():
    """The same clip content ingested at a different stream position gives the same page summaries and
    scores, because the store keeps raw (pre-RoPE) keys; the control shows the check can fail: the same
    content stored rotated at its stream positions (what vLLM's paged cache holds) scores differently."""
    gen = torch.Generator().manual_seed(1)
    config = LiveVLMConfig(clip_frames=1, short_term_frames=0, page_tokens=PAGE, long_term_budget_tokens=None)
    sinks = torch.randn(LAYERS, 3, KV_HEADS, DIM, generator=gen)
    content_k = torch.randn(LAYERS, 2 * PAGE, KV_HEADS, DIM, generator=gen)
    content_v = torch.randn(LAYERS, 2 * PAGE, KV_HEADS, DIM, generator=gen)
    filler_k = torch.randn(LAYERS, 3 * PAGE, KV_HEADS, DIM, generator=gen)

    def ingest(clips, rotated: bool = False):
        memory = StreamMemory.from_sinks(config, sinks, sinks)
        for frame, (k, v) in enumerate(clips):
            if rotated:
                first = memory.num_sinks + memory.tokens_seen
                k = _rope(k, torch.arange(first, first + k.shape[1]))
            scores = torch.rand(LAYERS, memory.num_ltm + memory.num_stm + k.shape[1], KV_HEADS, generator=gen)
            memory = memory.commit_clip(ClipKV(k, v, torch.full((k.shape[1],), frame), scores))
        return memory

    query = retrieval.average_query(torch.randn(9, Q_HEADS, DIM, generator=gen), KV_HEADS)
    for rotated in (False, True):
        early = ingest([(content_k, content_v), (filler_k, filler_k)], rotated)
        late = ingest([(filler_k, filler_k), (content_k, content_v)], rotated)
        for layer in range(LAYERS):
            s_early = retrieval.page_scores(query, early.ltm_summary[layer])[0:2]  # content pages 0-1 early,
            s_late = retrieval.page_scores(query, late.ltm_summary[layer])[3:5]    # 3-4 late
            if rotated:
                assert not torch.allclose(s_early, s_late, rtol=0.05, atol=0.05)
            else:
                assert torch.equal(s_early, s_late)
                assert torch.equal(early.ltm_summary[layer, 0:2], late.ltm_summary[layer, 3:5])


def test_layout_counts_and_tail_page():
    layout = retrieval.PageLayout(num_tokens=100, page_tokens=16, ratio=0.4)  # 6 full pages + 4-token tail
    assert (layout.num_pages, layout.pages_read, layout.full_pages_read, layout.tokens_read) == (7, 3, 2, 36)
    assert retrieval.PageLayout(160, 16, 0.7).pages_read == 7  # ceil(0.7 * 10), not 8
    assert retrieval.PageLayout(100, 16, 1.0).reads_everything
    index = retrieval.token_index(torch.tensor([1, 4]), layout)
    assert index.tolist() == list(range(16, 32)) + list(range(64, 80)) + list(range(96, 100))
