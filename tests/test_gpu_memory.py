"""On a CUDA GPU, a stream's reported bytes are the bytes the allocator holds for it: closing the stream frees,
by `torch.cuda.memory_allocated` in the engine's worker, what `stats()["bytes"]` said (within 2%).
Run by `scripts/gpu_check.sh`; skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from helpers import QUESTION, greedy, random_video

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_reported_stream_bytes_match_the_allocator(tiny_model_dir):
    from vllm_livevlm import LiveVLM

    lv = LiveVLM(tiny_model_dir, {"clip_frames": 8, "long_term_budget_tokens": 1024, "page_tokens": 16},
                 dtype="bfloat16", max_model_len=16384, gpu_memory_utilization=0.3)

    def allocated() -> int:
        return lv._run(lv.core.rpc("livevlm_memory_probe"))["cuda_allocated_bytes"]

    try:
        stream = lv.open_stream()
        stream.append(random_video(0, 64))  # LTM full: compression has run several times
        stream.ask(QUESTION, greedy(4))      # its pin is released by now
        reported = stream.stats()["bytes"]
        held = allocated()
        assert stream.close() == reported
        freed = held - allocated()
        print(f"stream bytes reported {reported}, freed by the allocator {freed}")
        assert reported > 0 and abs(freed - reported) <= 0.02 * reported, (reported, freed)
    finally:
        lv.shutdown()
