"""The multi-axis placement rule (`docs/positions.md`): (t, h, w) positions of a placed context.

A context is S sink tokens (text) followed by stored tokens in slot order, each with a position record
`(item, group, y, x)` (`vllm_livevlm.model.adapter`). Text tokens take one position on every axis; a run of
consecutive video tokens of one item starts at the cursor, its distinct temporal groups renumbered
0, 1, 2, ... (times the temporal stride), rows and columns kept; the cursor then moves past the largest
coordinate used. Vectorised: no per-token Python, one small host read for the extent.
"""

from __future__ import annotations

import torch


def _units(records: torch.Tensor, stride: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token: its unit (a text token, or a run) and its offsets (t, h, w) from the unit's base; per unit:
    its span (positions it takes; a tensor of n entries, the unused ones 0). No host synchronisation."""
    item, group, y, x = records.unbind(-1)
    text = group < 0
    continues = torch.zeros_like(text)
    continues[1:] = ~text[1:] & ~text[:-1] & (item[1:] == item[:-1])  # same run as the previous token
    unit = torch.cumsum(~continues, 0) - 1
    new_group = ~continues
    new_group[1:] |= continues[1:] & (group[1:] != group[:-1])
    groups_so_far = torch.cumsum(new_group, 0)  # non-decreasing: the running max of the starts' values
    at_start = torch.cummax(torch.where(continues, torch.zeros_like(groups_so_far), groups_so_far), 0).values
    j = groups_so_far - at_start  # 0-based rank of the token's group within its run
    dt = (j.to(torch.float64) * stride).to(torch.long)  # floor, as vLLM's `(g * t_factor).astype(int64)`
    zero = torch.zeros_like(y)
    offsets = torch.stack([torch.where(text, zero, dt), torch.where(text, zero, y), torch.where(text, zero, x)])
    span = torch.zeros(records.shape[0], dtype=torch.long, device=records.device)
    span.scatter_reduce_(0, unit, offsets.amax(dim=0) + 1, reduce="amax")
    return unit, offsets, span


def placement_extent(records: torch.Tensor, sinks: int, stride: float) -> int:
    """X: one more than the largest position the context takes (S sinks + tokens with `records`)."""
    if records.shape[0] == 0:
        return sinks
    return sinks + int(_units(records, stride)[2].sum())


def place(records: torch.Tensor, sinks: int, stride: float, extent: int) -> torch.Tensor:
    """Positions [3, S + n] of the context, right-aligned to end at `extent` - 1 (sinks stay at 0..S-1).
    `extent` must be at least the context's own (`placement_extent`): the caller's E is the largest over
    the layers of the whole context, and a subset of a context (the pages a question reads) never needs
    more room than the whole: removing tokens only shrinks runs and drops units."""
    sink_positions = torch.arange(sinks, device=records.device).expand(3, sinks)
    if records.shape[0] == 0:
        return sink_positions
    unit, offsets, span = _units(records, stride)
    base = torch.cumsum(span, 0) - span + (extent - span.sum())  # right-aligned: the last unit ends at E - 1
    return torch.cat([sink_positions, base[unit] + offsets], dim=1)
