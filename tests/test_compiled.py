"""Compiled mode: LiveVLM under vLLM's default compilation (no `--enforce-eager`).

On CPU vLLM 0.32 compiles the model with dynamo + inductor (`DYNAMO_TRACE_ONCE`, no CUDA graphs); the
LiveVLM work is one registered op per layer (`livevlm::rotary_with_hooks`) the compiled graph calls every
step. Streams answer token for token as under `--enforce-eager`, in the lossless configuration and in a
compressing, retrieving one; on GPU (piecewise CUDA graphs) `scripts/gpu_check.sh` runs the same tests.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import QUESTION, greedy, random_video
from test_retrieval import CONFIG as COMPRESSING  # 1,024-token long-term budget, 40% of pages retrieved
from vllm_livevlm.model.ops import OP_NAME

LOSSLESS = {"long_term_budget_tokens": None, "retrieve_ratio": 1.0, "encode_context": "all", "clip_frames": 4}


def test_splitting_ops_patch():
    """Where vLLM compiles piecewise, the LiveVLM op is a splitting op beside vLLM's attention ops; an
    explicit empty list (one full graph) and the CPU mode are left alone."""
    from vllm.config import CompilationConfig, CompilationMode
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what every vLLM process does first (it applies the patch)
    piecewise = CompilationConfig(mode=CompilationMode.VLLM_COMPILE)
    piecewise.set_splitting_ops_for_v1("allgather_reducescatter")
    assert piecewise.splitting_ops[-1] == OP_NAME
    assert "vllm::unified_attention_with_output" in piecewise.splitting_ops
    full = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, splitting_ops=[])
    full.set_splitting_ops_for_v1("allgather_reducescatter")
    assert OP_NAME not in full.splitting_ops
    cpu = CompilationConfig(mode=CompilationMode.DYNAMO_TRACE_ONCE)
    cpu.set_splitting_ops_for_v1("allgather_reducescatter")
    assert cpu.splitting_ops == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_op_rotates_with_vllm_kernel_exactly(dtype):
    """The op's rotation (`KernelRope`: vLLM's `_C::rotary_embedding` called directly, the op's fast path)
    equals `RotaryEmbedding.forward_cpu` bit for bit, on a layer's rows and on keys alone (stored keys);
    rotations it does not know fall back to the module's own forward."""
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from vllm_livevlm.model.ops import KernelRope, inplace_rope

    torch.manual_seed(0)
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(64, max_position=4096, is_neox_style=True, rope_parameters={"rope_theta": 1e6},
                        dtype=getattr(torch, dtype))
        scaled = get_rope(64, max_position=4096, is_neox_style=True,
                          rope_parameters={"rope_theta": 1e6, "rope_type": "linear", "factor": 2.0})
    fast = inplace_rope(rope)
    assert isinstance(fast, KernelRope) and not isinstance(inplace_rope(scaled), KernelRope)
    positions = torch.tensor([0, 5, 4095, 17])
    q, k = torch.randn(4, 4 * 64, dtype=getattr(torch, dtype)), torch.randn(4, 2 * 64, dtype=getattr(torch, dtype))
    q_ref, k_ref, q_op, k_op = q.clone(), k.clone(), q.clone(), k.clone()
    rope.forward_cpu(positions, q_ref, k_ref)
    fast(positions, q_op, k_op)
    assert torch.equal(q_op, q_ref) and torch.equal(k_op, k_ref) and not torch.equal(q_op, q)
    keys, keys_ref = k.clone(), k.clone()
    rope.forward_cpu(positions, keys_ref, None)
    fast(positions, keys, None)
    assert torch.equal(keys, keys_ref)


@pytest.fixture(scope="module")
def engine_config(tiny_model_dir):
    """The engine's real config; each case below sets all three compilation settings it looks at."""
    from test_engine_settings import vllm_config

    return vllm_config(tiny_model_dir)


@pytest.mark.parametrize("cudagraph_mode, splitting_ops, refused", [
    ("FULL_AND_PIECEWISE", ["vllm::unified_attention_with_output", OP_NAME], None),  # the GPU default
    ("PIECEWISE", ["vllm::unified_attention_with_output", OP_NAME], None),
    ("FULL_DECODE_ONLY", [], None),  # prefills run eager
    ("NONE", [], None),
    ("PIECEWISE", ["vllm::unified_attention_with_output"], "-cc.splitting_ops must include"),
    ("FULL", ["vllm::unified_attention_with_output", OP_NAME], "-cc.cudagraph_mode=FULL:"),
])
def test_cudagraph_settings(engine_config, cudagraph_mode, splitting_ops, refused):
    """Refused exactly where a CUDA graph could replay a step with LiveVLM work without running the op (the
    GPU's compilation settings on the engine's real config: the CPU platform resets them)."""
    from vllm.config import CompilationMode, CUDAGraphMode

    from vllm_livevlm.connector.connector import check_engine_settings

    config = engine_config
    config.compilation_config.mode = CompilationMode.VLLM_COMPILE
    config.compilation_config.cudagraph_mode = CUDAGraphMode[cudagraph_mode]
    config.compilation_config.splitting_ops = splitting_ops
    if refused is None:
        check_engine_settings(config)
    else:
        with pytest.raises(ValueError, match=f"engine settings:\n- {refused}"):
            check_engine_settings(config)


def _answers(model_dir: str, **engine_args) -> dict:
    """One engine's answers (and what its streams kept and read) for a lossless and a compressing stream."""
    from vllm_livevlm import LiveVLM

    lv = LiveVLM(model_dir, None, dtype="float32", max_model_len=16384, **engine_args)
    try:
        results = {"compilation": lv.core.engine.vllm_config.compilation_config}
        cases = {"lossless": (LOSSLESS, random_video(0, 12)),
                 "compressing": (COMPRESSING, np.random.default_rng(0).integers(0, 256, (48, 32, 32, 3), np.uint8))}
        for name, (config, video) in cases.items():
            stream = lv.open_stream(config)
            stream.append(video)
            answer = stream.ask(QUESTION, greedy(16))
            results[name] = {"tokens": answer.token_ids, "pages": answer.retrieved_page_indices,
                             "kept": stream.kept_tokens(), "stats": stream.stats()}
            stream.close()
    finally:
        lv.shutdown()
    return results


@pytest.fixture(scope="module")
def runs(tiny_model_dir) -> dict:
    """The default engine (compiled on CPU) and an `--enforce-eager` one, one after the other."""
    return {"compiled": _answers(tiny_model_dir), "eager": _answers(tiny_model_dir, enforce_eager=True)}


@pytest.mark.slow
def test_compiled_is_the_default(runs):
    """CPU: dynamo + inductor, no CUDA graphs. GPU: piecewise compilation split at the LiveVLM op, CUDA
    graphs on (full graphs for decode-only batches)."""
    from vllm.config import CompilationMode, CUDAGraphMode
    from vllm.platforms import current_platform

    compiled, eager = runs["compiled"]["compilation"], runs["eager"]["compilation"]
    if current_platform.is_cpu():
        assert (compiled.mode, compiled.backend, compiled.cudagraph_mode) == (
            CompilationMode.DYNAMO_TRACE_ONCE, "inductor", CUDAGraphMode.NONE)
    else:
        assert compiled.mode == CompilationMode.VLLM_COMPILE and OP_NAME in compiled.splitting_ops
        assert compiled.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE
    assert eager.mode == CompilationMode.NONE and eager.cudagraph_mode == CUDAGraphMode.NONE


@pytest.mark.slow
@pytest.mark.parametrize("case", ["lossless", "compressing"])
def test_compiled_answers_equal_eager(runs, case):
    """Token-exact (float32), same kept tokens per layer and head, same pages read per layer."""
    compiled, eager = runs["compiled"][case], runs["eager"][case]
    assert compiled["tokens"] == eager["tokens"]
    assert compiled["kept"] == eager["kept"]
    assert compiled["pages"] == eager["pages"]
    stats = compiled["stats"]
    assert stats["frames_encoded"] == eager["stats"]["frames_encoded"] == {"lossless": 12, "compressing": 48}[case]
    if case == "compressing":
        assert stats["long_term_tokens"] == 1024  # the hooks ran: VSB compressed 48 frames to the budget
        assert all(len(pages) == 26 for pages in compiled["pages"].values())  # ceil(0.4 * 64) pages per layer
    else:
        assert stats["tokens_kept"] == stats["tokens_seen"] + stats["sink_tokens"]  # lossless: nothing dropped


@pytest.mark.slow
def test_op_runs_at_every_compiled_step(tiny_model_dir):
    """The compiled graph calls the op once per layer and step (nothing traced away), and what it costs on
    a step without LiveVLM work is measured (calls counted by torch.profiler, each timed on the engine's
    own layer; the figure is in docs/benchmarks.md). On a GPU
    decode steps replay full CUDA graphs (the op's rotation captured, its Python not run): only the prefill
    calls it."""
    from vllm.platforms import current_platform

    from vllm_livevlm.bench import decode_op_cost

    cost = decode_op_cost(tiny_model_dir, "float32", 4096, tokens=16)
    assert cost["steps"] == 16 and cost["op_calls"] == 2 * (16 if current_platform.is_cpu() else 1)  # 2 layers
    assert 0 < cost["rope_call_us"] and 0 < cost["op_call_us"] and 0 <= cost["op_overhead_us_per_step"] < cost["step_us"]
