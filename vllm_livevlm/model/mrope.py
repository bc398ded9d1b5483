"""Multi-axis RoPE (M-RoPE) in vLLM, for LiveVLM: rotating in place, and a request's positions after its
placed context.

vLLM's `MRotaryEmbedding` returns rotated copies where 1-D RoPE rotates in place; the LiveVLM op rotates
in place (`vllm_livevlm.model.ops`), and context keys are rotated alone (no query). `place_after_context`
is what `patches/mrope_livevlm_context_extent.py` runs when a request reaches the model runner.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vllm_livevlm.connector.params import LiveVLMParams, RequestKind
from vllm_livevlm.log import get_logger
from vllm_livevlm.model.ops import inplace_rope

logger = get_logger(__name__)


def mrope_in_place(rotary_emb: torch.nn.Module) -> Callable:
    """`rope(positions [3, n], query, key | None)` rotating in place with the layer's own M-RoPE kernel
    (interleaved sections included: Qwen3-VL)."""
    rotate = inplace_rope(rotary_emb)

    def rope(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None) -> None:
        # The kernel wants a key; a copy, since the GPU kernel may rotate both in place.
        q, k = rotate(positions, query, query.clone() if key is None else key)
        query.copy_(q)
        if key is not None:
            key.copy_(k)

    return rope


def place_after_context(req_state: Any) -> None:
    """Shift the positions of a verified LiveVLM clip or question request's own tokens, and its decode
    offset, so that they follow its context's extent E instead of its P placeholders (`docs/positions.md`).
    Anything else (plain requests, forged or malformed parameters: the scheduler strips those) is left as
    vLLM computed it; never raises (it runs in the engine's step)."""
    try:
        extra = (req_state.sampling_params.extra_args or {}) if req_state.sampling_params is not None else {}
        params = LiveVLMParams.from_request(extra.get("kv_transfer_params"))
    except Exception:
        return
    if params is None or params.kind == RequestKind.SINKS or not params.context_extent:
        return
    shift = params.context_extent - params.context_tokens
    req_state.mrope_positions[:, params.context_tokens:] += shift
    req_state.mrope_position_delta += shift
