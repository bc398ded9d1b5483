"""Position-agnostic Retrieval (PaR): which long-term pages a question reads, per layer.

A page is `page_tokens` consecutive kept long-term tokens of one layer; its summary key is the mean of its
raw (pre-RoPE) keys per KV head. The question's raw queries, averaged within each KV-head group, score a
page by the dot product with its summary key summed over KV heads: both sides are position-free, so a
page's score does not depend on where in the stream its content arrived (spec, "Phase 2").

The context size must be known when the request is built, so the count is fixed: k = ceil(ratio * pages)
pages. The newest page may be partial while long-term memory fills up; it is always read (ours), and the
other k - 1 are the best-scoring full pages. `retrieve_ratio=1.0` reads every page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PageLayout:
    """How a layer's `num_tokens` long-term tokens split into pages and how many a question reads."""

    num_tokens: int
    page_tokens: int
    ratio: float

    @property
    def num_pages(self) -> int:
        return math.ceil(self.num_tokens / self.page_tokens)

    @property
    def num_full_pages(self) -> int:
        return self.num_tokens // self.page_tokens

    @property
    def tail_tokens(self) -> int:
        return self.num_tokens % self.page_tokens

    @property
    def pages_read(self) -> int:
        # The epsilon keeps e.g. ceil(0.7 * 10) at 7 despite 0.7 * 10 == 7.000000000000001.
        return min(self.num_pages, math.ceil(self.ratio * self.num_pages - 1e-9))

    @property
    def full_pages_read(self) -> int:
        return self.pages_read - (1 if self.tail_tokens else 0)

    @property
    def tokens_read(self) -> int:
        return self.full_pages_read * self.page_tokens + self.tail_tokens

    @property
    def reads_everything(self) -> bool:
        return self.full_pages_read == self.num_full_pages


def page_summaries(raw_keys: torch.Tensor, page_tokens: int) -> torch.Tensor:
    """Summary keys [P, H, D] (float32) of the full pages of one layer's raw keys [n, H, D]."""
    full = raw_keys.shape[0] // page_tokens
    return raw_keys[: full * page_tokens].float().view(full, page_tokens, *raw_keys.shape[1:]).mean(dim=1)


def average_query(raw_queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Question raw queries [n, Hq, D] ⇒ [H, D]: mean over tokens and over the query heads of each KV head."""
    tokens, q_heads, dim = raw_queries.shape
    return raw_queries.float().mean(dim=0).view(num_kv_heads, q_heads // num_kv_heads, dim).mean(dim=1)


def page_scores(query: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
    """Scores [P]: dot product of the averaged query [H, D] with each summary key [P, H, D], summed over H."""
    return torch.einsum("hd,phd->p", query, summaries)


def top_pages(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` best pages, in temporal (ascending) order; ties go to the earlier page."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:count].sort().values


def token_index(pages: torch.Tensor, layout: PageLayout) -> torch.Tensor:
    """Long-term token indices read for the chosen full pages, plus the partial newest page."""
    offsets = torch.arange(layout.page_tokens, device=pages.device)
    index = (pages.view(-1, 1) * layout.page_tokens + offsets).view(-1)
    if layout.tail_tokens:
        tail = torch.arange(layout.num_full_pages * layout.page_tokens, layout.num_tokens, device=pages.device)
        index = torch.cat([index, tail])
    return index
