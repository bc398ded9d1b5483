"""The README's commands as a user types them on a CPU machine: no `VLLM_CPU_KVCACHE_SPACE` in the environment.

vLLM's CPU worker otherwise asks for 92% of the NUMA node's memory and refuses to start on a small machine;
`vllm-livevlm serve` and `LiveVLM(model)` size the KV pool themselves (`vllm_livevlm.cpu_kv`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import requests
from helpers import QUESTION, Server

from vllm_livevlm.cpu_kv import GiB, MiB, kv_pool_bytes


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


cpu_only = pytest.mark.skipif(not _on_cpu(), reason="the CPU KV pool is sized on CPU only")
USER_ENV = {k: v for k, v in os.environ.items()
            if k not in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING")}


def test_pool_formula_exact_values():
    # a quarter of what is left once the weights are loaded, capped at 2 GiB, split between the workers
    assert kv_pool_bytes(available=10 * GiB, weights=2 * GiB) == 2 * GiB
    assert kv_pool_bytes(available=6 * GiB, weights=2 * GiB) == 1 * GiB
    assert kv_pool_bytes(available=6 * GiB, weights=2 * GiB, workers=2) == 512 * MiB
    assert kv_pool_bytes(available=6 * GiB + 4095, weights=2 * GiB) == 1 * GiB  # rounded down to a MiB
    with pytest.raises(ValueError, match="VLLM_CPU_KVCACHE_SPACE"):
        kv_pool_bytes(available=2 * GiB, weights=2 * GiB - 100 * MiB)  # under the 64 MiB floor


@cpu_only
def test_user_choice_wins(tiny_model_dir, monkeypatch):
    from vllm_livevlm.cli import serve_command
    from vllm_livevlm.config import LiveVLMConfig

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    command, _ = serve_command(tiny_model_dir, LiveVLMConfig(), [])
    sized = int(command[command.index("--kv-cache-memory-bytes") + 1])
    assert 64 * MiB <= sized <= 2 * GiB
    for given in (["--kv-cache-memory-bytes", "123456789"], ["--gpu-memory-utilization=0.5"]):
        command, _ = serve_command(tiny_model_dir, LiveVLMConfig(), given)
        assert command.count("--kv-cache-memory-bytes") == given.count("--kv-cache-memory-bytes")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    command, _ = serve_command(tiny_model_dir, LiveVLMConfig(), [])
    assert "--kv-cache-memory-bytes" not in command


@cpu_only
@pytest.mark.slow
def test_serve_starts_and_answers_without_kv_space(tiny_model_dir, tmp_path):
    with pytest.MonkeyPatch.context() as env:
        env.delenv("VLLM_CPU_KVCACHE_SPACE")  # the server's environment is copied from ours
        server = Server(tiny_model_dir, tmp_path / "server.log", {"clip_frames": 4})
    try:
        server.wait_ready()
        assert "LiveVLM: vLLM CPU KV pool" in server.log_text()
        created = requests.post(f"{server.url}/v1/video/streams", json={}).json()
        owner = {"X-Stream-Token": created["token"]}
        answer = requests.post(f"{server.url}/v1/chat/completions", headers=owner, json={
            "model": tiny_model_dir, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4,
            "ignore_eos": True, "session_id": created["id"]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 4
    finally:
        server.stop()


README_EXAMPLE = """
import numpy as np
from vllm import SamplingParams
from vllm_livevlm import LiveVLM


def main():
    lv = LiveVLM({model!r}, {{"clip_frames": 8, "long_term_budget_tokens": 1024}})
    stream = lv.open_stream()
    stream.append(np.random.default_rng(0).integers(0, 256, (16, 48, 48, 3), dtype=np.uint8))
    answer = stream.ask("What is happening?", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    print("ANSWER", len(answer.token_ids), answer.frames_covered)
    stream.close()
    lv.shutdown()


if __name__ == "__main__":
    main()
"""


@cpu_only
@pytest.mark.slow
def test_python_api_starts_and_answers_without_kv_space(tiny_model_dir, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(textwrap.dedent(README_EXAMPLE.format(model=tiny_model_dir)))
    done = subprocess.run([sys.executable, str(script)], env=USER_ENV, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "ANSWER 4 16" in done.stdout
    assert "LiveVLM: vLLM CPU KV pool" in done.stdout + done.stderr
