"""Offline Python API: `LiveVLM` (one vLLM engine) and `Stream` (one live video in it).

    lv = LiveVLM(model="path/to/llava-onevision")
    s = lv.open_stream({"clip_frames": 16})
    s.append(frames)                 # [T, H, W, 3] uint8; returns once complete clips are encoded
    answer = s.ask("What just happened?")
    print(answer.text, s.stats())
    s.close(); lv.shutdown()

The engine (`AsyncLLM`) and the asynchronous core (`vllm_livevlm.streams`) run on a private event loop
thread; the synchronous methods wait on it and the `*_async` / `ask_stream` methods can be awaited from
any event loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from vllm_livevlm.config import LiveVLMConfig
from vllm_livevlm.cpu_kv import kv_pool_args
from vllm_livevlm.portable.format import StreamFileError
from vllm_livevlm.streams import (Answer, ClipResult, LiveStream, StreamClosed, StreamEngine, engine_args_for,
                                  tokens_per_frame_of)

T = TypeVar("T")

__all__ = ["LiveVLM", "Stream", "Answer", "ClipResult", "StreamClosed", "StreamFileError"]


class LiveVLM:
    """One vLLM engine serving many LiveVLM streams."""

    def __init__(self, model: str, config: LiveVLMConfig | dict | str | None = None, **engine_args: Any):
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # the runner the plugin is tested on
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.config = LiveVLMConfig.coerce(config)
        args = engine_args_for(model, self.config, tokens_per_frame_of(model), **engine_args)
        args.update(kv_pool_args(model, args))  # on CPU, a pool that fits the machine unless the user sized one
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="livevlm-engine-loop", daemon=True)
        self._thread.start()

        async def start() -> StreamEngine:
            engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
            return StreamEngine(engine, self.config, model, args["max_num_batched_tokens"])

        self.core = self._run(start())
        self.engine = self.core.engine
        self.tokenizer = self.core.tokenizer
        self._closed = False

    def open_stream(self, config: LiveVLMConfig | dict | str | None = None, system_prompt: str | None = None) -> "Stream":
        """Open a stream (config overrides are applied on the engine's config) and encode its sinks."""
        self._check_open()
        return Stream(self, self._run(self.core.open_stream(config, system_prompt)))

    def import_stream(self, path: str | os.PathLike, stream_id: str | None = None) -> "Stream":
        """Open a stream from a stream file (`Stream.export`, or a server's `.../export`) with the memory and
        state it holds, under a fresh id unless `stream_id`; complete clips among its pending frames are
        encoded before this returns. Raises `StreamFileError` naming what is wrong with the file."""
        self._check_open()
        with open(path, "rb") as f:
            data = f.read()

        async def imported() -> LiveStream:
            stream, _ = await self.core.import_stream(data, stream_id)
            await stream.encode_ready()
            return stream

        return Stream(self, self._run(imported()))

    def engine_stats(self) -> dict[str, Any]:
        """Store bytes across streams and (single-process engines) the paged pool's free blocks."""
        return self._run(self.core.engine_stats())

    def shutdown(self) -> None:
        if self._closed:
            return
        self._run(self.core.close_all())
        self._closed = True

        async def cancel_pending() -> None:
            # The engine's output handler first, so it does not report the engine's exit as a failure.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self._run(cancel_pending())
        self.engine.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> "LiveVLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this LiveVLM engine was shut down")

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the engine loop and wait for it (from a thread that is not that loop)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _await(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await a coroutine of the engine loop from another event loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))


class Stream:
    """One live video: frames in, answers out. Obtain it from `LiveVLM.open_stream`."""

    def __init__(self, owner: LiveVLM, core: LiveStream):
        self.owner = owner
        self.core = core
        self.id = core.id
        self.config = core.config

    def append(self, frames: Any, timestamps: Any = None) -> list[ClipResult]:
        """Buffer frames (sampled to the stream's `sample_fps` by `timestamps`, one per frame in seconds; without
        them the frames are taken as at that rate: `vllm_livevlm.clock`); encode every complete clip; return
        once they are encoded. Times that go back or are not finite raise `TimestampError` (nothing is kept)."""
        self.core.accept(frames, timestamps)
        return self.owner._run(self.core.encode_ready())

    async def append_async(self, frames: Any, timestamps: Any = None) -> list[ClipResult]:
        self.core.accept(frames, timestamps)
        return await self.owner._await(self.core.encode_ready())

    def ask(self, question: str, sampling_params: Any = None) -> Answer:
        self._check_open()
        return self.owner._run(self.core.ask(question, sampling_params))

    async def ask_async(self, question: str, sampling_params: Any = None) -> Answer:
        self._check_open()
        return await self.owner._await(self.core.ask(question, sampling_params))

    async def ask_stream(self, question: str, sampling_params: Any = None) -> AsyncIterator[str]:
        """Yield the answer's text as it is decoded."""
        self._check_open()
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        done = object()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        async def produce() -> None:
            try:
                await self.core.ask(question, sampling_params, on_delta=put)
                put(done)
            except BaseException as e:  # delivered to the consumer
                put(e)

        asyncio.run_coroutine_threadsafe(produce(), self.owner._loop)
        while (item := await queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item

    def stats(self) -> dict[str, Any]:
        self._check_open()
        return self.owner._run(self.core.stats())

    def kept_tokens(self) -> dict[str, Any]:
        """Stream token ids in memory: `long_term[layer][kv_head]` and `short_term`."""
        self._check_open()
        return self.owner._run(self.core.kept_tokens())

    def export(self, path: str | os.PathLike) -> int:
        """Write the stream (memory, state, pending frames) to a stream file (`docs/stream-format.md`) that
        `LiveVLM.import_stream` or a server's `POST /v1/video/streams/import` reads; returns its size."""
        self._check_open()
        data = self.owner._run(self.core.export_bytes())
        with open(path, "wb") as f:
            f.write(data)
        return len(data)

    def close(self) -> int:
        """Free the stream's memory; returns the bytes freed. Closing twice is harmless."""
        return self.owner._run(self.core.close())

    def _check_open(self) -> None:
        self.core.check_open()
        self.owner._check_open()
