"""Benchmark LiveVLM against the alternatives (see `vllm_livevlm/bench.py`); same as `vllm-livevlm bench`."""

from vllm_livevlm.bench import main

if __name__ == "__main__":
    main()
