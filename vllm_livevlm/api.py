"""Offline Python API: `LiveVLM` (one vLLM engine) and `Stream` (one live video in it).

    lv = LiveVLM(model="path/to/llava-onevision")
    s = lv.open_stream({"clip_frames": 16})
    s.append(frames)                 # [T, H, W, 3] uint8; returns once complete clips are encoded
    answer = s.ask("What just happened?")
    print(answer.text, s.stats())
    s.close(); lv.shutdown()

Every clip and question is an ordinary vLLM request on an `AsyncLLM` engine, so several streams are
batched by vLLM. The engine runs on a private event loop thread; the synchronous methods wait on it and
the `*_async` / `ask_stream` methods can be awaited from any event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from vllm_livevlm.config import LiveVLMConfig
from vllm_livevlm.connector.params import LiveVLMParams, RequestKind
from vllm_livevlm.frames import to_frame_array

T = TypeVar("T")

ARCHITECTURE = "LiveVLMLlavaOnevisionForConditionalGeneration"
USER_TURN = "<|im_start|>user\n"
QUESTION_TURN = "{question}<|im_end|>\n<|im_start|>assistant\n"
HISTORY_TURN = "{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n<|im_start|>user\n"


class StreamClosed(RuntimeError):
    """The stream was closed (or never opened); it accepts no frames and answers no questions."""


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    frames_covered: int         # frames in memory when the question was answered
    prompt_tokens: int          # tokens in the request (placeholders + question turn)
    prompt_tokens_computed: int  # tokens actually prefilled (the question turn)
    # Per layer, the (first frame, last frame) of each long-term page the question read, in order.
    retrieved_pages: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    retrieved_page_indices: dict[int, list[int]] = field(default_factory=dict)  # page numbers, same order
    timings: dict[str, float] = field(default_factory=dict)  # seconds: flush, ttft, total, retrieval


@dataclass
class ClipResult:
    frames: int
    prompt_tokens_computed: int
    seconds: float


def engine_args_for(model: str, config: LiveVLMConfig, tokens_per_frame: int, **overrides: Any) -> dict[str, Any]:
    """Engine arguments a LiveVLM engine needs (callers may override any of them)."""
    clip_tokens = config.clip_frames * tokens_per_frame + 1
    args: dict[str, Any] = {
        "model": model,
        "hf_overrides": {"architectures": [ARCHITECTURE]},
        "kv_transfer_config": {"kv_connector": "LiveVLMConnector", "kv_role": "kv_both",
                               "kv_connector_module_path": "vllm_livevlm.connector"},
        "worker_extension_cls": "vllm_livevlm.worker.LiveVLMWorkerExtension",
        # Placeholder prefixes are identical across streams: prefix caching would serve wrong KV.
        "enable_prefix_caching": False,
        # Scoring and slot filling are Python inside the attention layers.
        "enforce_eager": True,
        # A clip must be prefilled in one step (its vision-to-vision scores need all of its queries).
        "max_num_batched_tokens": max(clip_tokens + 512, 8192),
        "disable_chunked_mm_input": True,
        "limit_mm_per_prompt": {"video": 1, "image": 0},
    }
    args.update(overrides)
    return args


def tokens_per_frame_of(model: str) -> int:
    """LLaVA-OneVision video tokens per frame: the patch grid pooled 2x2 (196 at 384 px / patch 14)."""
    from transformers import AutoConfig

    vision = AutoConfig.from_pretrained(model).vision_config
    grid = vision.image_size // vision.patch_size
    return math.ceil(grid / 2) ** 2


class LiveVLM:
    """One vLLM engine serving many LiveVLM streams."""

    def __init__(self, model: str, config: LiveVLMConfig | dict | str | None = None, **engine_args: Any):
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # the runner the plugin is tested on
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.config = LiveVLMConfig.coerce(config)
        self.tokens_per_frame = tokens_per_frame_of(model)
        args = engine_args_for(model, self.config, self.tokens_per_frame, **engine_args)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="livevlm-engine-loop", daemon=True)
        self._thread.start()

        async def start() -> Any:
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

        self.engine = self._run(start())
        self.max_num_batched_tokens = args["max_num_batched_tokens"]
        self.tokenizer = self.engine.get_tokenizer()
        self.video_token_id = self.tokenizer.convert_tokens_to_ids("<video>")
        self.placeholder_token_id = self.tokenizer.pad_token_id or self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.streams: dict[str, Stream] = {}
        self._closed = False

    # ---- streams -------------------------------------------------------------------------------------
    def open_stream(self, config: LiveVLMConfig | dict | str | None = None, system_prompt: str | None = None) -> "Stream":
        """Open a stream (config overrides are applied on the engine's config) and encode its sinks."""
        self._check_open()
        stream_config = LiveVLMConfig.coerce(config, self.config)
        clip_tokens = stream_config.clip_frames * self.tokens_per_frame + 1
        if clip_tokens > self.max_num_batched_tokens:
            raise ValueError(f"clip_frames={stream_config.clip_frames} needs {clip_tokens} tokens per clip "
                             f"but the engine batches at most {self.max_num_batched_tokens}: lower clip_frames "
                             "or start LiveVLM with a larger max_num_batched_tokens")
        stream = Stream(self, uuid.uuid4().hex, stream_config, system_prompt)
        self._run(stream._open())
        self.streams[stream.id] = stream
        return stream

    def engine_stats(self) -> dict[str, Any]:
        """Store bytes across streams and (single-process engines) the paged pool's free blocks."""
        return self._run(self._rpc("livevlm_engine_stats"))

    def shutdown(self) -> None:
        if self._closed:
            return
        for stream in list(self.streams.values()):
            stream.close()
        self._closed = True
        self.engine.shutdown()

        async def cancel_pending() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self._run(cancel_pending())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> "LiveVLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- plumbing ----------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this LiveVLM engine was shut down")

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the engine loop and wait for it (from a thread that is not that loop)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _await(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await a coroutine of the engine loop from another event loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def _rpc(self, method: str, *args: Any) -> Any:
        return (await self.engine.collective_rpc(method, args=args))[0]

    async def _submit(self, prompt: dict, sampling_params: Any, request_id: str, params: LiveVLMParams,
                      on_output: Callable[[Any], None] | None = None) -> tuple[Any, dict[str, Any]]:
        """Run one LiveVLM request to completion; returns its final output and its retrieval report.

        The snapshot pin is released here as soon as the request ends (the connector also releases it
        when the engine finishes the request, but only with the engine's next step)."""
        params = dataclasses.replace(params, request_id=request_id)
        extra = dict(sampling_params.extra_args or {})
        extra["kv_transfer_params"] = params.to_kv_transfer_params()
        sampling_params.extra_args = extra
        output = None
        report: dict[str, Any] = {}
        try:
            async for output in self.engine.generate(prompt, sampling_params, request_id=request_id):
                if on_output is not None:
                    on_output(output)
        finally:
            if params.kind != RequestKind.SINKS:
                report = (await self._rpc("livevlm_release", [request_id])).get(request_id, {})
        assert output is not None
        return output, report


class Stream:
    """One live video: frames in, answers out. Obtain it from `LiveVLM.open_stream`."""

    def __init__(self, owner: LiveVLM, stream_id: str, config: LiveVLMConfig, system_prompt: str | None):
        self.owner = owner
        self.id = stream_id
        self.config = config
        self.system_prompt = system_prompt
        self.frames_received = 0
        self.frames_encoded = 0
        self.clips_encoded = 0
        self.closed = False
        self._pending: list[np.ndarray] = []
        self._history: list[tuple[str, str]] = []  # earlier (question, answer) turns, text only
        self._frame_shape: tuple[int, ...] | None = None
        self._clip_lock: asyncio.Lock | None = None  # created on the engine loop

    # ---- public, synchronous ---------------------------------------------------------------------------
    def append(self, frames: Any, timestamps: Any = None) -> list[ClipResult]:
        """Buffer frames; encode every complete clip; return once they are encoded."""
        batch = self._accept(frames, timestamps)
        return self.owner._run(self._encode_ready(batch))

    def ask(self, question: str, sampling_params: Any = None) -> Answer:
        self._check_open()
        return self.owner._run(self._ask(question, sampling_params))

    def stats(self) -> dict[str, Any]:
        self._check_open()
        stats = self.owner._run(self.owner._rpc("livevlm_stats", self.id))
        stats.update(pending_frames=len(self._pending), frames_received=self.frames_received)
        return stats

    def kept_tokens(self) -> dict[str, Any]:
        """Which stream tokens the memory holds: `long_term[layer][kv_head]` and `short_term` token ids
        (clip tokens numbered from 0 in arrival order, one newline token closing each clip)."""
        self._check_open()
        return self.owner._run(self.owner._rpc("livevlm_kept_tokens", self.id))

    def close(self) -> int:
        """Free the stream's memory; returns the bytes freed. Closing twice is harmless."""
        if self.closed:
            return 0
        self.closed = True
        self.owner.streams.pop(self.id, None)
        return self.owner._run(self.owner._rpc("livevlm_close_stream", self.id))

    # ---- public, asynchronous ----------------------------------------------------------------------------
    async def append_async(self, frames: Any, timestamps: Any = None) -> list[ClipResult]:
        batch = self._accept(frames, timestamps)
        return await self.owner._await(self._encode_ready(batch))

    async def ask_async(self, question: str, sampling_params: Any = None) -> Answer:
        self._check_open()
        return await self.owner._await(self._ask(question, sampling_params))

    async def ask_stream(self, question: str, sampling_params: Any = None) -> AsyncIterator[str]:
        """Yield the answer's text as it is decoded."""
        self._check_open()
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        async def produce() -> None:
            try:
                await self._ask(question, sampling_params, on_delta=put)
                put(StopAsyncIteration())
            except BaseException as e:  # delivered to the consumer
                put(e)

        future = asyncio.run_coroutine_threadsafe(produce(), self.owner._loop)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, StopAsyncIteration):
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            future.result() if future.done() else None

    # ---- internals (engine loop) -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise StreamClosed(f"stream {self.id} is closed")
        self.owner._check_open()

    def _accept(self, frames: Any, timestamps: Any) -> np.ndarray:
        self._check_open()
        batch = to_frame_array(frames)
        if timestamps is not None and len(timestamps) != batch.shape[0]:
            raise ValueError(f"got {batch.shape[0]} frames but {len(timestamps)} timestamps")
        if self._frame_shape is None:
            self._frame_shape = batch.shape[1:]
        elif batch.shape[1:] != self._frame_shape:
            raise ValueError(f"frames of this stream are {list(self._frame_shape)}, got {list(batch.shape[1:])}")
        self.frames_received += batch.shape[0]
        return batch

    async def _open(self) -> None:
        self._clip_lock = asyncio.Lock()
        owner = self.owner
        await owner._rpc("livevlm_open_stream", self.id, self.config.to_dict())
        prefix = (f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n" if self.system_prompt else "") + USER_TURN
        tokens = owner.tokenizer.encode(prefix, add_special_tokens=False)
        params = LiveVLMParams(self.id, RequestKind.SINKS)
        await owner._submit({"prompt_token_ids": tokens}, _one_token(), f"lv-sinks-{self.id}", params)

    async def _encode_ready(self, batch: np.ndarray) -> list[ClipResult]:
        self._pending.extend(batch)
        results = []
        while len(self._pending) >= self.config.clip_frames:
            results.append(await self._encode_clip(self.config.clip_frames))
        return results

    async def _encode_clip(self, num_frames: int) -> ClipResult:
        assert self._clip_lock is not None
        async with self._clip_lock:
            if self.closed:
                raise StreamClosed(f"stream {self.id} was closed while encoding")
            frames = np.stack(self._pending[:num_frames])
            del self._pending[:num_frames]
            start = time.perf_counter()
            owner = self.owner
            req_id = f"lv-clip-{self.id}-{self.clips_encoded}-{uuid.uuid4().hex[:8]}"
            snapshot = await owner._rpc("livevlm_prepare", self.id, RequestKind.CLIP.value, req_id)
            params = LiveVLMParams(self.id, RequestKind.CLIP, snapshot["version"], snapshot["context_tokens"],
                                   self.frames_encoded, num_frames)
            prompt = {"prompt_token_ids": [owner.placeholder_token_id] * params.context_tokens + [owner.video_token_id],
                      "multi_modal_data": {"video": frames},
                      "multi_modal_uuids": {"video": [req_id]}}
            output, _ = await owner._submit(prompt, _one_token(), req_id, params)
            self.frames_encoded += num_frames
            self.clips_encoded += 1
            computed = len(output.prompt_token_ids) - (output.num_cached_tokens or 0)
            return ClipResult(num_frames, computed, time.perf_counter() - start)

    async def _ask(self, question: str, sampling_params: Any = None, on_delta: Any = None) -> Answer:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question must be a non-empty string")
        owner = self.owner
        start = time.perf_counter()
        if self.config.flush_on_question and self._pending:
            await self._encode_clip(len(self._pending))
        flushed = time.perf_counter()
        sampling = (sampling_params.clone() if sampling_params is not None
                    else SamplingParams(max_tokens=64, temperature=0.0))
        sampling.output_kind = RequestOutputKind.CUMULATIVE
        req_id = f"lv-question-{self.id}-{uuid.uuid4().hex[:12]}"
        snapshot = await owner._rpc("livevlm_prepare", self.id, RequestKind.QUESTION.value, req_id)
        frames_covered = self.frames_encoded
        params = LiveVLMParams(self.id, RequestKind.QUESTION, snapshot["version"], snapshot["context_tokens"])
        history = self._history[-self.config.history_turns:] if self.config.history_turns else []
        turn = "".join(HISTORY_TURN.format(question=q, answer=a) for q, a in history)
        turn += QUESTION_TURN.format(question=question)
        question_tokens = owner.tokenizer.encode(turn, add_special_tokens=False)
        prompt = {"prompt_token_ids": [owner.placeholder_token_id] * params.context_tokens + question_tokens}
        first_token_at: float | None = None
        sent = 0

        def on_output(output: Any) -> None:
            nonlocal first_token_at, sent
            completion = output.outputs[0]
            if first_token_at is None and completion.token_ids:
                first_token_at = time.perf_counter()
            if on_delta is not None and len(completion.text) > sent:
                on_delta(completion.text[sent:])
                sent = len(completion.text)

        output, report = await owner._submit(prompt, sampling, req_id, params, on_output)
        end = time.perf_counter()
        completion = output.outputs[0]
        if self.config.history_turns:
            self._history = (self._history + [(question, completion.text)])[-self.config.history_turns:]
        return Answer(
            text=completion.text, token_ids=list(completion.token_ids), frames_covered=frames_covered,
            prompt_tokens=len(output.prompt_token_ids),
            prompt_tokens_computed=len(output.prompt_token_ids) - (output.num_cached_tokens or 0),
            retrieved_pages={int(layer): [tuple(r) for r in ranges] for layer, ranges in report.get("pages", {}).items()},
            retrieved_page_indices={int(layer): list(p) for layer, p in report.get("page_indices", {}).items()},
            timings={"flush": flushed - start, "ttft": (first_token_at or end) - flushed, "total": end - start,
                     "retrieval": report.get("seconds", 0.0)})


def _one_token() -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0)
