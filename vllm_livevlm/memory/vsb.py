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
        """Kept indices (ascending = temporal order) of the temporally ordered candidates `scores` [L]."""
        num = scores.shape[0]
        if num <= self.budget:
            return torch.arange(num, device=scores.device)
        if self.budget == 0:  # no long-term memory at all (sliding window)
            return torch.zeros(0, dtype=torch.long, device=scores.device)
        num_buckets = self.budget // self.bucket_capacity
        bucket = torch.arange(num, device=scores.device) * num_buckets // num
        order = torch.argsort(scores.float(), descending=True, stable=True)
        keep = torch.zeros(num, dtype=torch.bool, device=scores.device)
        keep[order[: self.score_keep]] = True
        filled = torch.bincount(bucket[keep], minlength=num_buckets)
        # Coverage phase: a remaining token (in descending score) is kept iff the tokens of its bucket
        # kept before it still leave room; its rank among its bucket's remaining tokens tells that.
        rest = order[self.score_keep:]
        rest_bucket = bucket[rest]
        by_bucket = torch.argsort(rest_bucket, stable=True)
        starts = torch.searchsorted(rest_bucket[by_bucket], torch.arange(num_buckets, device=scores.device))
        rank = torch.empty_like(by_bucket)
        rank[by_bucket] = torch.arange(rest.shape[0], device=scores.device) - starts[rest_bucket[by_bucket]]
        eligible = rest[filled[rest_bucket] + rank < self.bucket_capacity]
        keep[eligible[: self.budget - self.score_keep]] = True
        return keep.nonzero().squeeze(1)

    def select_per_head(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-KV-head selection: `scores` [L, H] ⇒ kept indices [H, min(L, M)], each row ascending."""
        return torch.stack([self.select(scores[:, h]) for h in range(scores.shape[1])])
