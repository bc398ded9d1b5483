"""Helpers shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

QUESTION = "what is happening in the video?"


def greedy(max_tokens: int = 32):
    """Greedy sampling that always decodes `max_tokens` tokens (answers comparable token by token)."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def random_video(seed: int, frames: int, size: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(frames, size, size, 3), dtype=np.uint8)


def live_engine(model_dir: str, config: dict) -> Iterator:
    """A float32 LiveVLM engine for a module-scoped fixture (shut down after the module)."""
    from vllm_livevlm import LiveVLM

    engine = LiveVLM(model_dir, config, dtype="float32", max_model_len=16384)
    yield engine
    engine.shutdown()


def tiny_shape(model_dir: str):
    """The float32 `ModelShape` of a tiny checkpoint (196 tokens per frame)."""
    from transformers import AutoConfig

    from vllm_livevlm.memory.budget import ModelShape

    text = AutoConfig.from_pretrained(model_dir).text_config
    return ModelShape(text.num_hidden_layers, text.num_key_value_heads,
                      text.hidden_size // text.num_attention_heads, 4, 196, text.num_attention_heads)


def stream_reservation(model_dir: str, config: dict) -> int:
    """Store bytes a server reserves for one stream of `config` (float32, sinks = the bare user turn): one
    snapshot's bound."""
    from transformers import AutoTokenizer

    from vllm_livevlm.config import LiveVLMConfig
    from vllm_livevlm.memory.budget import memory_bound_bytes

    sinks = len(AutoTokenizer.from_pretrained(model_dir).encode("<|im_start|>user\n", add_special_tokens=False))
    return memory_bound_bytes(LiveVLMConfig.from_dict(config), tiny_shape(model_dir), sinks)


def server_reservation(model_dir: str, largest_bound: int, limits: dict | None = None,
                       batched_tokens: int = 8192) -> int:
    """What a server reserves besides its streams' bounds (`StreamService`): the largest bound (the version
    one commit builds), a step's captured clip K/V, and the scoring reserve fixed by its limits."""
    from vllm_livevlm.memory.budget import capture_bytes, scoring_reserve_bytes
    from vllm_livevlm.serving.service import ServerLimits

    limits = ServerLimits(**(limits or {}))
    shape = tiny_shape(model_dir)
    return (largest_bound + capture_bytes(shape, batched_tokens)
            + scoring_reserve_bytes(shape, limits.max_stream_bytes, limits.max_clip_frames))


def async_client(url: str, **kwargs):
    """An httpx client for a test server that gives idle connections up before vLLM's uvicorn does
    (`serving.keepalive`): with httpx's default the load test failed on CI with `ReadError`."""
    import httpx

    from vllm_livevlm.serving.keepalive import client_limits

    return httpx.AsyncClient(base_url=url, limits=client_limits(), **kwargs)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `vllm-livevlm serve` process on a loopback port (tiny model, float32)."""

    def __init__(self, model_dir: str, log_path, config: dict, limits: dict | None = None, *extra: str):
        import json
        import os
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w+")
        command = [sys.executable, "-m", "vllm_livevlm.cli", "serve", model_dir, "--host", "127.0.0.1",
                   "--port", str(self.port), "--dtype", "float32", "--max-model-len", "16384",
                   "--livevlm-config", json.dumps(config), *extra]
        if limits:
            command += ["--livevlm-limits", json.dumps(limits)]
        # Its own process group: `stop` can reap the engine core too, whatever state the server is in.
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env=dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1"))

    def wait_ready(self, timeout: float = 420) -> "Server":
        import time

        import pytest
        import requests

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited:\n{self.log_text()[-4000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(1)
        self.stop()
        pytest.fail(f"server did not start in {timeout} s:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        if self.log.closed:
            return ""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        import os
        import signal
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever the server left behind
        except ProcessLookupError:
            pass
        self.process.wait()


def ask_together(lv, streams, tokens: int, pause: bool = False) -> list[tuple[object, object]]:
    """Ask every stream of a `LiveVLM` engine at once; each answer with its vLLM `RequestOutput.metrics`.

    With `pause`, the scheduler is paused until every question is queued, so they meet in one engine step
    whatever the machine's speed."""
    import asyncio

    metrics: dict[str, object] = {}
    submit = lv.core.submit

    async def recording_submit(prompt, sampling_params, request_id, params, on_output=None):
        output, report = await submit(prompt, sampling_params, request_id, params, on_output)
        metrics[request_id] = output.metrics
        return output, report

    async def together():
        if not pause:
            return await asyncio.gather(*(s.core.ask(QUESTION, greedy(tokens)) for s in streams))
        await lv.engine.pause_generation(mode="keep", clear_cache=False)
        try:
            asks = [asyncio.ensure_future(s.core.ask(QUESTION, greedy(tokens))) for s in streams]
            while sum(r.startswith("lv-question-") for r in lv.engine.output_processor.external_req_ids) < len(streams):
                await asyncio.sleep(0.01)
        finally:
            await lv.engine.resume_generation()
        return await asyncio.gather(*asks)

    lv.core.submit = recording_submit
    try:
        answers = lv._run(together())
    finally:
        lv.core.submit = submit
    # Question request ids name their stream (`lv-question-<stream id>-...`): metrics in the streams' order.
    return [(answer, next(m for r, m in metrics.items() if r.startswith(f"lv-question-{s.id}-")))
            for answer, s in zip(answers, streams)]


def preempting_engine(model_dir: str, config: dict, dtype: str, prompt_tokens: int, block: int) -> Iterator:
    """A `LiveVLM` engine whose KV pool holds two questions' prompts plus one block, so two questions run
    together and the first to need another block preempts the other. `.prompt` is the question prompt's
    length, `.decode` the answer length that makes every question need one more block."""
    import math

    from vllm_livevlm import LiveVLM

    blocks = 2 * math.ceil(prompt_tokens / block) + 1
    engine = LiveVLM(model_dir, config, dtype=dtype, block_size=block, num_gpu_blocks_override=blocks,
                     max_model_len=(blocks - 1) * block)
    engine.prompt = prompt_tokens
    engine.decode = -prompt_tokens % block + 8
    yield engine
    engine.shutdown()


def qwen_video_metadata(frames: int, fps: float, first_frame: int = 0) -> dict:
    """Video metadata of one clip of a stream (frames `first_frame`.. at `fps`), as vanilla vLLM is given it."""
    return {"fps": fps, "duration": frames / fps, "total_num_frames": frames,
            "frames_indices": list(range(first_frame, first_frame + frames)), "video_backend": "opencv",
            "do_sample_frames": False}


def assert_lossless_streams_answer_as_vanilla(lv, clip_frames: int, frames: int, seeds: int, vanilla) -> None:
    """Per seed: a lossless stream fed `frames` random frames in clips of `clip_frames` answers QUESTION
    token for token as `vanilla(clips)` (vanilla vLLM over one video item per clip) and covers every frame."""
    for seed in range(seeds):
        video = random_video(seed, frames)
        stream = lv.open_stream({"clip_frames": clip_frames})
        stream.append(video)
        answer = stream.ask(QUESTION, greedy())
        clips = [video[i:i + clip_frames] for i in range(0, frames, clip_frames)]
        assert answer.token_ids == vanilla(clips), f"seed {seed}"
        assert answer.frames_covered == frames
        stream.close()


def vanilla_qwen_vl_answer(lv, items: list, question: str, max_tokens: int = 32) -> list[int]:
    """Vanilla Qwen-VL (a plain request: no LiveVLM parameters) over video items: `<|im_start|>user\\n`, one
    `<|vision_start|><|video_pad|><|vision_end|>` per item, the question turn; greedy token ids."""
    import uuid

    tok = lv.tokenizer
    video = [tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|video_pad|>", "<|vision_end|>")]
    prompt = {"prompt_token_ids": tok.encode("<|im_start|>user\n", add_special_tokens=False) + video * len(items)
              + tok.encode(f"{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False),
              "multi_modal_data": {"video": items}}

    async def generate() -> list[int]:
        async for output in lv.engine.generate(prompt, greedy(max_tokens), request_id=f"vanilla-{uuid.uuid4().hex}"):
            last = output
        return list(last.outputs[0].token_ids)

    return lv._run(generate())
