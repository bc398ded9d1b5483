"""Shared fixtures: one tiny random-weight LLaVA-OneVision checkpoint per test session.

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
