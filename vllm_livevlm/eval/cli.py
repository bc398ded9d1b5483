"""`vllm-livevlm eval`: run a streaming or offline video QA benchmark through LiveVLM streams.

    vllm-livevlm eval --bench ovo --data DIR --model PATH [--fps 0.5] [--livevlm-config JSON]
    vllm-livevlm eval --bench streamingbench --data DIR --server http://host:8000 [--api-key KEY]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

from vllm_livevlm.config import LiveVLMConfig
from vllm_livevlm.eval.answerers import OfflineAnswerer, ServerAnswerer
from vllm_livevlm.eval.harness import evaluate
from vllm_livevlm.eval.loaders import BENCHMARKS, get_benchmark


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vllm-livevlm eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", required=True, help=f"one of {', '.join(sorted(BENCHMARKS))}")
    parser.add_argument("--data", required=True, help="the benchmark's data directory (annotations + videos)")
    parser.add_argument("--annotations", default=None, help="annotation file, if not at its published name in --data")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="model path: start a LiveVLM engine in this process")
    target.add_argument("--server", help="URL of a running `vllm-livevlm serve`")
    parser.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"), help="sent as Authorization: Bearer")
    parser.add_argument("--fps", type=float, default=0.5, help="frames per second streamed from each video")
    parser.add_argument("--frame-size", type=int, default=None, help="resize frames to N x N when decoding")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--scoring", choices=("official", "lenient"), default="official",
                        help="official: each benchmark's own rule; lenient: read the letter / yes-no / number "
                             "out of a free-form answer (accuracy.json records which)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--out", default=None, help="output directory (default bench_results/eval-<bench>-<time>)")
    LiveVLMConfig.add_cli_args(parser)
    args = parser.parse_args(argv)
    bench = get_benchmark(args.bench)
    config = LiveVLMConfig.from_cli_args(args)
    questions = bench.load(args.data, args.annotations)[: args.limit]
    out = args.out or os.path.join("bench_results", f"eval-{bench.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    print(f"{bench.name}: {len(questions)} questions from {args.data}, {args.fps} fps")
    if args.server:
        answerer = ServerAnswerer(args.server, args.api_key, config.to_dict())
    else:
        engine_args = {"dtype": args.dtype}
        if args.max_model_len:
            engine_args["max_model_len"] = args.max_model_len
        answerer = OfflineAnswerer.start(args.model, config, **engine_args)
    try:
        evaluate(bench, questions, answerer, args.fps, out, args.max_tokens, args.frame_size,
                 meta={"model": args.model, "server": args.server, "livevlm_config": config.to_dict()},
                 lenient=args.scoring == "lenient",
                 progress=lambda q, r: print(f"  {q.id} @ {q.query_time}s ({r['frames_covered']} frames): "
                                             f"{json.dumps(r['response'][:60])} -> {r['correct']}", flush=True))
    finally:
        answerer.close()
