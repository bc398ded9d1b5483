"""The benchmark harness: one tiny run (livevlm, vanilla, vLLM's streaming-input session; 2 stream lengths)
whose JSON has every field and whose measured memory agrees with what each system reports, so the script
cannot rot and its memory figures cannot drift from the allocator. The real runs are in docs/benchmarks.md."""

import json
import math
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from vllm_livevlm.measure import reachable_storage_bytes

ANSWER_TOKENS = 3


@dataclass
class _Holder:
    kept: torch.Tensor
    again: list


def test_reachable_storage_counts_the_whole_storage_of_a_view_once():
    """A view keeps its storage alive: the slice of a concatenation costs the concatenation, and two views
    of one storage cost it once."""
    big = torch.cat([torch.zeros(100, 64), torch.ones(900, 64)])  # 1000 x 64 fp32 = 256,000 bytes
    view = big[900:]                                               # counts 100 rows by its shape
    assert view.numel() * view.element_size() == 25_600
    holder = _Holder(view, [big[:10], {"same": view}])
    assert reachable_storage_bytes(holder) == 256_000
    assert reachable_storage_bytes({"a": holder, "b": torch.zeros(10, dtype=torch.int64)}) == 256_080
    assert reachable_storage_bytes(_Holder(view.clone(), [])) == 25_600


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [sys.executable, "scripts/bench.py", "--model-preset", "tiny", "--systems", "livevlm,vanilla,vllm-streaming",
         "--lengths", "4,8", "--long-lengths", "16", "--reps", "2", "--clip-frames", "4",
         "--answer-tokens", str(ANSWER_TOKENS), "--frame-size", "32", "--out", str(out), "--machine", "smoke"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, out, json.loads(next(out.glob("*.json")).read_text())


@pytest.mark.slow
def test_bench_smoke(bench_run):
    stdout, out, data = bench_run
    assert "TTFT ms" in stdout and "reported MiB" in stdout and "measured MiB" in stdout
    files = sorted(p.name for p in out.iterdir())
    assert [f for f in files if f.endswith(".json")] and any(f.endswith("-ttft.png") for f in files)
    assert set(data) >= {"date", "machine", "args", "results", "max_frames", "targets", "kv_bytes_per_token",
                         "kv_block_tokens"}
    assert set(data["results"]) == {"livevlm", "vanilla", "vllm-streaming"}
    # --long-lengths are run by the bounded-memory systems only
    assert [p["frames"] for p in data["results"]["livevlm"]] == [4, 8, 16]
    assert [p["frames"] for p in data["results"]["vanilla"]] == [4, 8]
    assert [p["frames"] for p in data["results"]["vllm-streaming"]] == [4, 8]
    for points in data["results"].values():
        for p in points:
            assert set(p) >= {"ttft_s", "decode_tokens_per_s", "ingest_s_per_clip", "frames_per_s", "memory_bytes",
                              "measured_memory_bytes", "vision_tokens_prefilled", "skipped"}
            assert p["skipped"] is None
            assert p["ttft_s"]["n"] == 2 and p["ttft_s"]["min"] <= p["ttft_s"]["median"] <= p["ttft_s"]["max"]
            assert p["memory_bytes"] > 0 and p["measured_memory_bytes"] > 0
    assert data["results"]["livevlm"][-1]["ingest_s_per_clip"]["median"] > 0
    assert data["max_frames"]["vanilla"]["frames_in_budget"] > 0
    longest = data["results"]["livevlm"][-1]
    assert longest["memory_bytes"] <= longest["extra"]["peak_memory_bytes"]
    assert longest["measured_memory_bytes"] <= longest["extra"]["peak_measured_memory_bytes"]
    assert len(longest["extra"]["ingest_s_all_clips"]) == 4  # 16 frames in clips of 4
    targets = data["targets"]
    assert targets["livevlm_longest_frames"] == 16 and targets["livevlm_frames_over_vanilla_frames_same_memory"] > 0
    assert targets["vanilla_over_livevlm_ttft_256"] is None  # not measured in the smoke run
    assert "targets (ratios from this run)" in stdout


@pytest.mark.slow
def test_stock_systems_measured_in_vllm_blocks(bench_run):
    """vanilla and the streaming session: the peak blocks in use, measured from vLLM's KV usage, hold the
    tokens each reports, rounded up to whole blocks (vanilla also decodes its answer into them)."""
    _, _, data = bench_run
    per_token, block = data["kv_bytes_per_token"], data["kv_block_tokens"]
    for p in data["results"]["vanilla"]:
        tokens = p["extra"]["prompt_tokens"]
        assert p["memory_bytes"] == tokens * per_token
        low, high = math.ceil(tokens / block), math.ceil((tokens + ANSWER_TOKENS) / block)
        assert low * block * per_token <= p["measured_memory_bytes"] <= high * block * per_token
    for p in data["results"]["vllm-streaming"]:
        tokens = p["extra"]["session_tokens"]
        assert p["memory_bytes"] == tokens * per_token
        assert abs(p["measured_memory_bytes"] - math.ceil(tokens / block) * block * per_token) <= block * per_token


@pytest.mark.slow
def test_streaming_session_prefills_each_frame_once(bench_run):
    """vLLM's streaming session keeps its KV: its questions prefill only the question, while vanilla
    re-prefills every frame for each of them; its session holds both questions and answers (append-only)."""
    _, _, data = bench_run
    streaming, vanilla = data["results"]["vllm-streaming"][-1], data["results"]["vanilla"][-1]
    assert streaming["vision_tokens_prefilled"] < vanilla["vision_tokens_prefilled"] / 2
    assert streaming["extra"]["session_tokens"] > vanilla["extra"]["prompt_tokens"]
    assert len(streaming["extra"]["ingest_s_all_clips"]) == 2  # 8 frames in clips of 4


@pytest.mark.slow
def test_livevlm_reported_bytes_are_allocated_bytes(bench_run):
    """Issue 15's target: a stream's reported bytes within 2% of the storages its store holds."""
    _, _, data = bench_run
    assert abs(data["targets"]["livevlm_measured_over_reported_bytes"] - 1) <= 0.02
    for p in data["results"]["livevlm"]:
        assert abs(p["measured_memory_bytes"] / p["memory_bytes"] - 1) <= 0.02


@pytest.mark.slow
def test_streaming_session_past_max_model_len_is_skipped_with_its_reason(tmp_path):
    """vLLM 0.32 lets a streaming session outgrow max_model_len and its engine core then dies (one request
    takes the engine down): the bench skips that length with the reason instead of sending it."""
    result = subprocess.run(
        [sys.executable, "scripts/bench.py", "--model-preset", "tiny", "--systems", "vllm-streaming",
         "--lengths", "4,8,12", "--long-lengths", "", "--reps", "2", "--clip-frames", "4",
         "--answer-tokens", str(ANSWER_TOKENS), "--frame-size", "32", "--max-model-len", "2000",
         "--out", str(tmp_path), "--machine", "limit"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    points = json.loads(next(tmp_path.glob("*.json")).read_text())["results"]["vllm-streaming"]
    assert [(p["frames"], p["skipped"] is None) for p in points] == [(4, True), (8, True), (12, False)]
    assert "> max_model_len 2000" in points[-1]["skipped"] and "EngineDead" not in result.stdout
    assert points[1]["extra"]["session_tokens"] < 2000
