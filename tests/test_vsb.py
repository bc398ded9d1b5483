"""Vision Sink Bucketing on synthetic scores: top-R kept, buckets filled, exactly M kept, temporal order."""

import torch

from reference.livevlm_reference import vsb_keep
from vllm_livevlm.memory.vsb import VisionSinkBucketing


def test_matches_the_spec_loop_on_random_scores():
    gen = torch.Generator().manual_seed(0)
    for num, budget, capacity, frac in [(100, 40, 1, 0.5), (257, 64, 4, 0.25), (1000, 120, 2, 0.5), (50, 50, 1, 0.5), (64, 16, 1, 1.0), (90, 30, 3, 0.0)]:
        scores = torch.rand(num, generator=gen)
        vsb = VisionSinkBucketing(budget, capacity, int(frac * budget))
        assert vsb.select(scores).tolist() == vsb_keep(scores.tolist(), budget, capacity, int(frac * budget))


def test_top_r_kept_buckets_filled_exact_budget_temporal_order():
    gen = torch.Generator().manual_seed(1)
    num, budget, capacity = 3000, 200, 2
    scores = torch.rand(num, generator=gen)
    scores[100:400] += 10.0  # a strong local sink region that pure top-M would fill the budget with
    vsb = VisionSinkBucketing(budget, capacity, budget // 2)
    kept = vsb.select(scores)
    assert kept.shape[0] == budget
    assert torch.all(kept[1:] > kept[:-1])  # temporal order, no duplicates
    top_r = torch.argsort(scores, descending=True)[: budget // 2]
    assert set(top_r.tolist()) <= set(kept.tolist())
    buckets = torch.arange(num) * (budget // capacity) // num
    counts = torch.bincount(buckets[kept], minlength=budget // capacity)
    by_score = torch.bincount(buckets[top_r], minlength=budget // capacity)
    # The coverage phase fills buckets up to their capacity and never beyond it.
    assert torch.all(counts <= torch.clamp(by_score, min=capacity))
    assert torch.all(counts[by_score < capacity] >= by_score[by_score < capacity])
    assert kept.max() > 2500 and kept.min() < 50  # coverage reaches both ends of the stream
    # Without a score phase the coverage phase fills every bucket exactly to its capacity.
    coverage_only = VisionSinkBucketing(budget, capacity, 0).select(scores)
    assert torch.all(torch.bincount(buckets[coverage_only], minlength=budget // capacity) == capacity)


def test_under_budget_keeps_everything_and_per_head():
    vsb = VisionSinkBucketing(16, 1, 8)
    assert vsb.select(torch.rand(10)).tolist() == list(range(10))
    per_head = vsb.select_per_head(torch.rand(40, 3))
    assert per_head.shape == (3, 16)
    assert VisionSinkBucketing(0, 1, 0).select(torch.rand(40)).numel() == 0  # sliding window: keep none


def test_rows_of_a_batch_are_selected_independently():
    """`select` over [layers, heads, N] (one call per commit) equals selecting each row alone."""
    gen = torch.Generator().manual_seed(2)
    scores = torch.rand(3, 2, 500, generator=gen)
    vsb = VisionSinkBucketing(60, 3, 20)
    batched = vsb.select(scores)
    assert batched.shape == (3, 2, 60)
    for layer in range(3):
        for head in range(2):
            row = scores[layer, head].tolist()
            assert batched[layer, head].tolist() == vsb_keep(row, 60, 3, 20)
