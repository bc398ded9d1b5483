"""Shared fixtures: one tiny random-weight LLaVA-OneVision (and one Qwen2.5-VL) checkpoint per test session.

Engines are expensive (~25 s to start on CPU): modules that need one create it in a module-scoped fixture.
"""

from __future__ import annotations

import os

import pytest

# Before vLLM is imported anywhere: no network, in-process engine core (tests can inspect the model and
# the connector), the V1 model runner the plugin is tested on, a small KV pool.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from vllm_livevlm.testing.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-llava-ov")), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen25vl_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from vllm_livevlm.testing.tiny_qwen_vl import build_tiny_qwen_vl

    return build_tiny_qwen_vl(str(tmp_path_factory.mktemp("tiny-qwen2.5-vl")), preset="qwen2.5-vl-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3vl_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from vllm_livevlm.testing.tiny_qwen_vl import build_tiny_qwen_vl

    return build_tiny_qwen_vl(str(tmp_path_factory.mktemp("tiny-qwen3-vl")), preset="qwen3-vl-tiny", seed=0)
