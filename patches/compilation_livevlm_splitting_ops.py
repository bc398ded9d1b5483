"""`CompilationConfig.set_splitting_ops_for_v1` also splits the graph at `livevlm::rotary_with_hooks`.

Why a patch: vLLM 0.32 fills the default splitting ops (its attention ops) inside `VllmConfig.__post_init__`
(`config/vllm.py`, after the platform adjusted the compilation mode), and no plugin hook runs between that
and the engine start. With piecewise CUDA graphs a LiveVLM op that is not a splitting op would be captured
into a graph and replayed without running (hooks lost on every captured prefill size); as a splitting op it
runs eagerly between the pieces, like attention. Only where vLLM compiles piecewise (`VLLM_COMPILE` with a
non-empty list): an explicit empty list (one full graph) is left alone and refused by the connector when
CUDA graphs are on (`check_engine_settings`).
"""

from __future__ import annotations

import inspect

from patches import PatchNotApplicable


def apply() -> None:
    from vllm.config import CompilationConfig, CompilationMode

    original = CompilationConfig.set_splitting_ops_for_v1
    if getattr(original, "__livevlm_patched__", False):
        return
    if list(inspect.signature(original).parameters) != ["self", "all2all_backend", "data_parallel_size"]:
        raise PatchNotApplicable(
            "CompilationConfig.set_splitting_ops_for_v1 changed in this vLLM; patches/"
            "compilation_livevlm_splitting_ops.py was written for vLLM 0.32 "
            "(set_splitting_ops_for_v1(self, all2all_backend, data_parallel_size=1))")

    def set_splitting_ops_for_v1(self, all2all_backend: str, data_parallel_size: int = 1) -> None:
        from vllm_livevlm.model.ops import OP_NAME  # registers the op where the config is made

        original(self, all2all_backend, data_parallel_size)
        if self.mode == CompilationMode.VLLM_COMPILE and self.splitting_ops and OP_NAME not in self.splitting_ops:
            self.splitting_ops.append(OP_NAME)

    set_splitting_ops_for_v1.__livevlm_patched__ = True  # type: ignore[attr-defined]
    set_splitting_ops_for_v1.__doc__ = original.__doc__
    CompilationConfig.set_splitting_ops_for_v1 = set_splitting_ops_for_v1
