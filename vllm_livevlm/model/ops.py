"""`livevlm::rotary_with_hooks`: a layer's RoPE and its LiveVLM work, as one registered custom op.

Why an op: under torch.compile, Python inside the model's forward is traced once and baked into the graph
(the "is there LiveVLM work this step?" check would be decided for ever at the warm-up step). A registered
op is opaque to the compiler: the graph calls it, and it runs as Python every step. On GPU the plugin makes
it a splitting op (`patches/compilation_livevlm_splitting_ops.py`), so piecewise CUDA graphs are captured
around it, like vLLM's own attention op. It mutates `query` and `key` in place (the rotation), which is what
orders it before attention in the graph; it has no other output, so a step without LiveVLM work costs only
the lookup of the step (the rotation runs either way).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.library import Library
from torch.profiler import record_function
from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from vllm.platforms import current_platform
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_livevlm.connector.step import StepRequests

OP_NAME = "livevlm::rotary_with_hooks"
_lib = Library("livevlm", "FRAGMENT")  # lives as long as the op


@dataclass(frozen=True)
class LayerHooks:
    """What the op needs of a layer besides its tensors, attached to vLLM's `Attention` of that layer (a
    plain attribute, not a submodule: no parameters, no state dict entries)."""

    layer_index: int
    rope: Callable  # in-place rotation (positions, query, key | None), the platform kernel


def inplace_rope(rotary_emb: torch.nn.Module) -> Callable:
    """The platform's in-place RoPE kernel: the same rotation eager and compiled (vLLM's compiled mode
    would pick the out-of-place native version), for the layer's rows and for stored keys alike."""
    if type(rotary_emb) is RotaryEmbedding and not getattr(rotary_emb, "use_flashinfer", False):
        return KernelRope(rotary_emb)
    return rotary_emb.forward_cpu if current_platform.is_cpu() else rotary_emb.forward_cuda


class KernelRope:
    """What `RotaryEmbedding.forward_cpu`/`forward_cuda` run, vLLM's `_C::rotary_embedding` kernel, called
    without their per-call Python (a cache dtype check, an import, a wrapper): the op runs on every layer of
    every step, most of them without LiveVLM work, so this is most of what it costs (docs/benchmarks.md).
    The cos/sin cache is matched to the model's dtype and device once, at the first call."""

    def __init__(self, rotary_emb: RotaryEmbedding) -> None:
        self.rotary_emb = rotary_emb
        importlib.import_module("vllm._custom_ops")  # registers the `torch.ops._C` kernels
        self.kernel = torch.ops._C.rotary_embedding.default
        self.cos_sin_cache: torch.Tensor | None = None

    def __call__(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None) -> None:
        if self.cos_sin_cache is None:
            self.cos_sin_cache = self.rotary_emb._match_cos_sin_cache_dtype(query)
        self.kernel(positions, query, key, self.rotary_emb.head_size, self.cos_sin_cache,
                    self.rotary_emb.is_neox_style)


def current_step() -> StepRequests | None:
    """This step's LiveVLM requests, or None when the engine runs no LiveVLM connector or none is scheduled."""
    if not has_kv_transfer_group():
        return None
    step_requests = getattr(get_kv_transfer_group(), "step_requests", None)
    return step_requests() if step_requests is not None else None


def rotary_with_hooks(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      layer_name: str) -> None:
    """Fill context slots and capture raw K/V (before RoPE), rotate `query`/`key` in place, then score a
    clip's vision tokens (after RoPE); only the rotation when the step has no LiveVLM work."""
    attn = get_forward_context().no_compile_layers[layer_name]
    hooks: LayerHooks = attn.livevlm_hooks
    step = current_step()
    if step is None:
        hooks.rope(positions, query, key)
        return
    # Named ranges: a torch.profiler trace shows what LiveVLM itself costs in a step (docs/benchmarks.md).
    with record_function("livevlm::before_attention"):
        step.before_attention(hooks.layer_index, attn, hooks.rope, query, key, value)
    hooks.rope(positions, query, key)
    with record_function("livevlm::after_rotary"):
        step.after_rotary(hooks.layer_index, attn, query, key)


def _rotary_with_hooks_fake(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            layer_name: str) -> None:
    """Shapes for the compiler: in-place on `query` and `key`, nothing returned."""


direct_register_custom_op(op_name=OP_NAME.split("::")[1], op_func=rotary_with_hooks,
                          mutates_args=["query", "key"], fake_impl=_rotary_with_hooks_fake, target_lib=_lib)
