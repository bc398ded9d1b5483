"""`GPUModelRunner._init_mrope_positions` places a LiveVLM request's own tokens after the context it carries.

Why a patch: vLLM 0.32 computes a multi-axis (M-RoPE) request's positions once, when the request reaches
the model runner, from its prompt tokens and multimodal features alone (`get_mrope_input_positions(tokens,
mm_features)`). A LiveVLM clip or question request starts with P placeholder tokens standing for a context
that spans E positions (`docs/positions.md`); E is a property of the stream's memory, not of the tokens, and
may exceed P (heavily compressed frames), so no model-side override of `get_mrope_input_positions` can
know it. The runner's request state holds the request's sampling parameters, where the front end's signed
`kv_transfer_params` travel; the patch verifies them and shifts the positions after the placeholders (and
the decode offset) by E - P (`vllm_livevlm.model.mrope.place_after_context`). The CPU runner inherits the
method. Unsigned or plain requests keep vLLM's positions.
"""

from __future__ import annotations

import inspect

from patches import PatchNotApplicable


def apply() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._init_mrope_positions
    if getattr(original, "__livevlm_patched__", False):
        return
    if list(inspect.signature(original).parameters) != ["self", "req_state"]:
        raise PatchNotApplicable(
            "GPUModelRunner._init_mrope_positions changed in this vLLM; patches/mrope_livevlm_context_extent.py "
            "was written for vLLM 0.32 (_init_mrope_positions(self, req_state))")

    def _init_mrope_positions(self, req_state) -> None:
        from vllm_livevlm.model.mrope import place_after_context

        original(self, req_state)
        place_after_context(req_state)

    _init_mrope_positions.__livevlm_patched__ = True  # type: ignore[attr-defined]
    _init_mrope_positions.__doc__ = original.__doc__
    GPUModelRunner._init_mrope_positions = _init_mrope_positions
