"""Vision Sink Bucketing (VSB): choose which long-term tokens of one layer survive.

Pure top-M by score piles the budget onto local vision sinks of one time region; VSB keeps the top
R = score_fraction * M by score, then walks the rest in descending score and keeps a token only while its
temporal bucket (M / B equal-rank buckets) holds fewer than B kept tokens, until M are kept. The result is
temporally ordered. Spec: `shared/design/algorithm.md`, "Vision Sink Bucketing".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VisionSinkBucketing:
    budget: int          # M: tokens kept
    bucket_capacity: int  # B: tokens per temporal bucket in the coverage phase
    score_keep: int      # R: tokens kept by score alone

    def __post_init__(self) -> None:
        if self.budget % self.bucket_capacity:
            raise ValueError("budget must be a multiple of bucket_capacity")
        if not 0 <= self.score_keep <= self.budget:
            raise ValueError("score_keep must lie in [0, budget]")

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Kept indices [..., min(N, M)] (ascending = temporal order) of the temporally ordered candidates
        `scores` [..., N], each row (a layer, or a layer's KV head) on its own.

        Fixed-shape device ops only (no `nonzero`, masks or `.item()`): exactly M tokens are kept, so a GPU
        never waits to learn a size."""
        *batch, num = scores.shape
        device = scores.device
        if num <= self.budget:
            return torch.arange(num, device=device).expand(*batch, num)
        if self.budget == 0:  # no long-term memory at all (sliding window)
            return torch.zeros((*batch, 0), dtype=torch.long, device=device)
        num_buckets = self.budget // self.bucket_capacity
        bucket = torch.arange(num, device=device) * num_buckets // num
        order = torch.argsort(scores.float(), dim=-1, descending=True, stable=True)
        top = order[..., : self.score_keep]
        keep = torch.zeros((*batch, num), dtype=torch.bool, device=device).scatter_(-1, top, True)
        filled = torch.zeros((*batch, num_buckets), dtype=torch.long, device=device)
        filled.scatter_add_(-1, bucket[top], torch.ones_like(top))
        # Coverage phase: a remaining token (in descending score) is kept iff the tokens of its bucket
        # kept before it still leave room; its rank among its bucket's remaining tokens tells that.
        rest = order[..., self.score_keep:]
        rest_bucket = bucket[rest]
        by_bucket = torch.argsort(rest_bucket, dim=-1, stable=True)
        sorted_bucket = rest_bucket.gather(-1, by_bucket)
        starts = torch.searchsorted(sorted_bucket, torch.arange(num_buckets, device=device).repeat(*batch, 1))
        position = torch.arange(rest.shape[-1], device=device).expand_as(rest)
        rank = torch.empty_like(by_bucket).scatter_(-1, by_bucket, position - starts.gather(-1, sorted_bucket))
        eligible = filled.gather(-1, rest_bucket) + rank < self.bucket_capacity
        # The first M - R eligible ones; there are always enough (every bucket holds >= B tokens).
        keep.scatter_(-1, rest, eligible & (eligible.cumsum(dim=-1) <= self.budget - self.score_keep))
        kept_first = torch.where(keep, torch.arange(num, device=device), num)
        return kept_first.sort(dim=-1).values[..., : self.budget]

    def select_per_head(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-KV-head selection: `scores` [L, H] ⇒ kept indices [H, min(L, M)], each row ascending."""
        return self.select(scores.transpose(0, 1))
