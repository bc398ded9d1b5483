"""Smoke test of the benchmark harness (tiny preset, 2 systems, 2 stream lengths): it runs and its JSON has
every field, so the script cannot rot. The real runs are reported in docs/benchmarks.md."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/bench.py", "--model-preset", "tiny", "--systems", "livevlm,vanilla",
         "--lengths", "4,8", "--long-lengths", "16", "--reps", "2", "--clip-frames", "4", "--answer-tokens", "3", "--frame-size", "32",
         "--out", str(tmp_path), "--machine", "smoke"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "TTFT ms" in result.stdout
    files = sorted(p.name for p in tmp_path.iterdir())
    assert [f for f in files if f.endswith(".json")] and any(f.endswith("-ttft.png") for f in files)
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert set(data) >= {"date", "machine", "args", "results", "max_frames", "targets"}
    assert set(data["results"]) == {"livevlm", "vanilla"}
    # --long-lengths are run by the bounded-memory systems only
    assert [p["frames"] for p in data["results"]["livevlm"]] == [4, 8, 16]
    assert [p["frames"] for p in data["results"]["vanilla"]] == [4, 8]
    for points in data["results"].values():
        for p in points:
            assert set(p) >= {"ttft_s", "decode_tokens_per_s", "ingest_s_per_clip", "frames_per_s", "memory_bytes",
                              "vision_tokens_prefilled", "skipped"}
            assert p["ttft_s"]["n"] == 2 and p["ttft_s"]["min"] <= p["ttft_s"]["median"] <= p["ttft_s"]["max"]
    assert data["results"]["livevlm"][-1]["ingest_s_per_clip"]["median"] > 0
    assert data["max_frames"]["vanilla"]["frames_in_budget"] > 0
    longest = data["results"]["livevlm"][-1]
    assert longest["memory_bytes"] <= longest["extra"]["peak_memory_bytes"]
    assert len(longest["extra"]["ingest_s_all_clips"]) == 4  # 16 frames in clips of 4
    targets = data["targets"]
    assert targets["livevlm_longest_frames"] == 16 and targets["livevlm_frames_over_vanilla_frames_same_memory"] > 0
    assert targets["vanilla_over_livevlm_ttft_256"] is None  # not measured in the smoke run
    assert "targets (ratios from this run)" in result.stdout
