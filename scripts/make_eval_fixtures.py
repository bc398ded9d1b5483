"""Write tiny synthetic data in every benchmark format the evaluation harness reads (see vllm_livevlm/eval)."""

from vllm_livevlm.eval.fixtures import main

if __name__ == "__main__":
    main()
