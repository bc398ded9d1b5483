"""Write tiny data sets in each benchmark's release layout (real record structures, synthetic content);
see vllm_livevlm/eval/fixtures.py for the oddities they copy."""

from vllm_livevlm.eval.fixtures import main

if __name__ == "__main__":
    main()
