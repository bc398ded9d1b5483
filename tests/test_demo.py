"""`vllm-livevlm demo` runs end to end (server, streaming, questions, table, clean shutdown)."""

import subprocess
import sys
import time

import pytest

from vllm_livevlm.demo import render_frames

pytestmark = pytest.mark.slow


def test_demo_prints_its_table_and_exits_cleanly():
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "vllm_livevlm.cli", "demo", "--no-browser", "--frames", "96",
                             "--ask-every", "48"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "TTFT ms" in line)
    rows = [line.split() for line in lines[header + 2:] if line.strip()]
    assert len(rows) == 2 and rows[-1][1] == "96" and rows[-1][2] == "96"  # the last answer covers every frame
    assert time.time() - start < 300


def test_synthetic_video_moves():
    frames = render_frames(10)
    assert frames.shape == (10, 96, 96, 3) and frames.dtype.name == "uint8"
    assert (frames[0] != frames[5]).any()
