"""The asynchronous core shared by the Python API and the HTTP server: LiveVLM streams on one vLLM engine.

`StreamEngine` wraps any vLLM `EngineClient` (an `AsyncLLM`) started with the LiveVLM settings
(`engine_args_for`); `LiveStream` is one live video on it. Every clip and question is an ordinary vLLM
request tagged with its stream in `kv_transfer_params`, so vLLM batches several streams. All methods run
on the event loop that owns the engine client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vllm_livevlm.clock import Sampled, StreamClock
from vllm_livevlm.config import LiveVLMConfig
from vllm_livevlm.connector.params import LiveVLMParams, RequestKind
from vllm_livevlm.frames import to_frame_array
from vllm_livevlm.log import get_logger
from vllm_livevlm.model.adapter import adapter_for_model

if TYPE_CHECKING:
    from vllm_livevlm.portable.stream_file import StreamFile

logger = get_logger(__name__)

USER_TURN = "<|im_start|>user\n"
QUESTION_TURN = "{question}<|im_end|>\n<|im_start|>assistant\n"
HISTORY_TURN = "{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n<|im_start|>user\n"


class StreamClosed(RuntimeError):
    """The stream was closed (or never opened); it accepts no frames and answers no questions."""


class StreamFailed(RuntimeError):
    """The engine failed a request of the stream: its memory can no longer be served consistently."""


MAX_REASKS = 3  # a question whose memory changed size before it ran is asked again at most this often


class QuestionRaced(RuntimeError):
    """A question's snapshot was replaced before the question ran (or before vLLM recomputed it after a
    preemption) by one of another context size; the stream is fine and the question can be asked again."""


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    frames_covered: int         # frames in memory when the question was answered
    prompt_tokens: int          # tokens in the request (placeholders + question turn)
    prompt_tokens_computed: int  # tokens actually prefilled (the question turn)
    finish_reason: str | None = None
    # Per layer, the (first frame, last frame) of each long-term page the question read, in order.
    retrieved_pages: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    retrieved_page_indices: dict[int, list[int]] = field(default_factory=dict)  # page numbers, same order
    # The same pages' (first, last) times in seconds on the stream clock (`vllm_livevlm.clock`).
    retrieved_times: dict[int, list[tuple[float | None, float | None]]] = field(default_factory=dict)
    covered_until: float | None = None  # time of the last frame in memory
    timings: dict[str, float] = field(default_factory=dict)  # seconds: flush, ttft, total, retrieval
    # Set when the question read a later version than it was prepared on (its own waited behind a clip, or
    # vLLM preempted and recomputed it), or was asked a second time because that version was gone.
    repinned_version: int | None = None
    reasked: bool = False


@dataclass
class ClipResult:
    frames: int
    prompt_tokens_computed: int
    seconds: float


def engine_args_for(model: str, config: LiveVLMConfig, tokens_per_frame: int, **overrides: Any) -> dict[str, Any]:
    """Engine arguments a LiveVLM engine needs (callers may override any of them). The model runs as its
    family's LiveVLM architecture (`vllm_livevlm.model.adapter`: an unsupported checkpoint is refused here,
    with the supported list)."""
    clip_tokens = config.clip_frames * tokens_per_frame + 1  # at least what a clip prefills, in any family
    adapter = adapter_for_model(model)
    args: dict[str, Any] = {
        "model": model,
        "hf_overrides": {"architectures": [adapter.livevlm_architecture]},
        "kv_transfer_config": {"kv_connector": "LiveVLMConnector", "kv_role": "kv_both",
                               "kv_connector_module_path": "vllm_livevlm.connector"},
        "worker_extension_cls": "vllm_livevlm.worker.LiveVLMWorkerExtension",
        # Placeholder prefixes are identical across streams: prefix caching would serve wrong KV.
        "enable_prefix_caching": False,
        # A clip must be prefilled in one step (its vision-to-vision scores need all of its queries).
        # vLLM also refuses to start below the largest video item it profiles (Qwen3-VL: 768 frames' volume).
        "max_num_batched_tokens": max(clip_tokens + 512, adapter.profiled_item_tokens() + 512, 8192),
        "disable_chunked_mm_input": True,
        "limit_mm_per_prompt": {"video": 1, "image": 0},
        # Stream frames never repeat, so vLLM's processed-input cache (4 GiB by default, in the API process
        # and again in the engine core) would only fill with dead pixels: measured +0.9 GiB engine-core RSS
        # per 2-minute load run until it is full.
        "mm_processor_cache_gb": 0,
    }
    args.update(overrides)
    return args


def tokens_per_frame_of(model: str) -> int:
    """Video tokens per frame of a checkpoint, at most (`ModelAdapter.tokens_per_frame`)."""
    return adapter_for_model(model).tokens_per_frame


class StreamEngine:
    """LiveVLM streams on one vLLM engine client."""

    def __init__(self, engine: Any, config: LiveVLMConfig, model: str, max_num_batched_tokens: int):
        self.engine = engine
        self.config = config
        self.adapter = adapter_for_model(model)
        self.tokens_per_frame = self.adapter.tokens_per_frame
        self.max_num_batched_tokens = max_num_batched_tokens
        self.tokenizer = engine.get_tokenizer()
        self.video_prompt = self.adapter.video_prompt(self.tokenizer)
        self.placeholder_token_id = (self.tokenizer.pad_token_id
                                     or self.tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        self.streams: dict[str, LiveStream] = {}
        self._fingerprint: dict[str, Any] | None = None

    def resolve_config(self, overrides: LiveVLMConfig | dict | str | None) -> LiveVLMConfig:
        """The engine's config with a stream's overrides applied, checked against what the engine can run."""
        config = LiveVLMConfig.coerce(overrides, self.config)
        clip_tokens = self.adapter.max_clip_tokens(config.clip_frames)
        if self.adapter.multi_axis and config.per_head_selection:
            raise ValueError(f"per_head_selection is not supported on {self.adapter.family} (multi-axis positions "
                             "are placed per layer)")
        if clip_tokens > self.max_num_batched_tokens:
            raise ValueError(f"clip_frames={config.clip_frames} needs {clip_tokens} tokens per clip but the "
                             f"engine batches at most {self.max_num_batched_tokens}: lower clip_frames or start "
                             "the engine with a larger max_num_batched_tokens")
        return config

    def sinks_prompt(self, system_prompt: str | None) -> list[int]:
        """Token ids of a stream's chat prefix (its attention sinks): system turn, then the user turn."""
        prefix = (f"<|im_start|>system\n{system_prompt}<|im_end|>\n" if system_prompt else "") + USER_TURN
        return self.tokenizer.encode(prefix, add_special_tokens=False)

    def sink_tokens(self, system_prompt: str | None) -> int:
        return len(self.sinks_prompt(system_prompt))

    async def open_stream(self, config: LiveVLMConfig | dict | str | None = None,
                          system_prompt: str | None = None, stream_id: str | None = None) -> "LiveStream":
        """Open a stream (config overrides on the engine's config) and encode its sinks."""
        # 128 random bits: a stream id is unguessable.
        stream = LiveStream(self, stream_id or secrets.token_hex(16), self.resolve_config(config), system_prompt)
        try:
            await stream._open()
        except BaseException:  # failed or cancelled: the store may hold the stream already
            await stream.close()
            raise
        self.streams[stream.id] = stream
        return stream

    async def import_stream(self, data: bytes, stream_id: str | None = None,
                            max_bytes: int | None = None) -> tuple["LiveStream", dict[str, Any]]:
        """Open a stream from a stream file (`vllm_livevlm.portable`) with the memory and state it holds; its
        pending frames are queued and encoded as usual. Returns the stream and the file's header. A fresh id
        unless `stream_id` (an existing one is refused); `max_bytes` bounds the file (default: its size).
        Raises `StreamFileError` (a ValueError) naming what is wrong with the file; nothing is half-loaded."""
        from vllm_livevlm.portable.stream_file import unpack

        fingerprint = await self.fingerprint()
        stream_file = await asyncio.to_thread(unpack, data, len(data) if max_bytes is None else max_bytes, fingerprint)
        stream_id = stream_id or secrets.token_hex(16)
        if stream_id in self.streams:
            raise ValueError(f"stream {stream_id!r} already exists")
        stream = LiveStream.from_portable(self, stream_id, stream_file)
        payload = await asyncio.to_thread(stream_file.memory_payload, stream.config)
        try:
            await self.rpc("livevlm_import_stream", stream.id, stream.config.to_dict(), payload)
        except Exception as e:  # the worker's checks; engine-process errors arrive untyped
            from vllm_livevlm.portable.format import StreamFileError

            raise StreamFileError(f"the engine refused the stream's memory: {e}") from None
        self.streams[stream.id] = stream
        return stream, stream_file.header

    async def export_shards(self, stream_id: str) -> list[dict[str, Any]]:
        """Every tensor-parallel rank's shard of the stream's memory (`livevlm_export_stream`)."""
        return await self.engine.collective_rpc("livevlm_export_stream", args=(stream_id,))

    async def fingerprint(self) -> dict[str, Any]:
        """The model a stream file must come from (asked of the engine once)."""
        if self._fingerprint is None:
            self._fingerprint = await self.rpc("livevlm_fingerprint")
        return self._fingerprint

    async def engine_stats(self) -> dict[str, Any]:
        """Store bytes across streams and (single-process engines) the paged pool's free blocks."""
        return await self.rpc("livevlm_engine_stats")

    async def close_all(self) -> None:
        for stream in list(self.streams.values()):
            await stream.close()

    async def rpc(self, method: str, *args: Any) -> Any:
        return (await self.engine.collective_rpc(method, args=args))[0]

    def positions_left(self, params: LiveVLMParams, tokens_after: int) -> int | None:
        """Multi-axis models: the positions left for decoding after a request whose context spans E positions
        (which may exceed its P slots) and its `tokens_after` own tokens, within the model's length (vLLM
        bounds tokens, not positions); raises ValueError when nothing is left. None on 1-D models (vLLM's
        own length check covers them)."""
        if not params.context_extent:
            return None
        limit = self.engine.model_config.max_model_len
        left = limit - params.context_extent - tokens_after
        if left < 1:
            raise ValueError(f"the stream's memory spans {params.context_extent} positions; with {tokens_after} "
                             f"more tokens it exceeds the model's length {limit}: lower long_term_budget_tokens")
        return left

    async def submit(self, prompt: dict, sampling_params: Any, request_id: str, params: LiveVLMParams,
                     on_output: Callable[[Any], None] | None = None) -> tuple[Any, dict[str, Any]]:
        """Run one LiveVLM request to completion; returns its final output and its retrieval report.

        The snapshot pin is released here as soon as the request ends (the connector also releases it
        when the engine finishes the request, but only with the engine's next step). The parameters are
        signed (`LiveVLMParams.to_kv_transfer_params`): the engine runs no unsigned LiveVLM request."""
        params = dataclasses.replace(params, request_id=request_id)
        extra = dict(sampling_params.extra_args or {})
        extra["kv_transfer_params"] = params.to_kv_transfer_params()
        sampling_params.extra_args = extra
        output = None
        report: dict[str, Any] = {}
        # A request's first output comes from the step that placed its context; if that step failed it (its
        # slots zeroed, e.g. a question whose memory changed size), it is stopped there, before any of its
        # text reaches the caller. One-token requests (sinks, clips) stream nothing.
        checked = sampling_params.max_tokens == 1
        try:
            async with contextlib.aclosing(self.engine.generate(prompt, sampling_params,
                                                                request_id=request_id)) as outputs:
                async for output in outputs:
                    if not checked:
                        checked = True
                        if await self.rpc("livevlm_failed", request_id):
                            break  # closing the generator aborts the request in the engine
                    if on_output is not None:
                        on_output(output)
        finally:
            report = (await self.rpc("livevlm_release", [request_id])).get(request_id, {})
        if report.get("reask"):
            raise QuestionRaced(f"LiveVLM request {request_id}: {report['error']}")
        if "error" in report:
            raise StreamFailed(f"LiveVLM request failed: {report['error']}")
        if output is None:
            raise RuntimeError(f"LiveVLM request {request_id}: the engine returned no output")
        refused = (output.kv_transfer_params or {}).get("livevlm_error")
        if refused:
            raise RuntimeError(f"LiveVLM request {request_id} was refused by the engine: {refused}")
        return output, report


class LiveStream:
    """One live video on a `StreamEngine`: frames in, answers out."""

    def __init__(self, engine: StreamEngine, stream_id: str, config: LiveVLMConfig, system_prompt: str | None):
        self.engine = engine
        self.id = stream_id
        self.config = config
        self.system_prompt = system_prompt
        self.created = time.time()
        self.last_activity = self.created
        self.frames_received = 0
        self.frames_encoded = 0
        self.frames_dropped = 0  # by backpressure (`drop_oldest_pending`)
        self.frames_sampled_out = 0  # received faster than `sample_fps`
        self.clock = StreamClock(config.sample_fps)
        self.clips_encoded = 0
        self.closed = False
        self._pending: list[np.ndarray] = []  # queued, oldest first
        self._pending_since: list[float] = []  # arrival time of each queued frame
        self._pending_times: list[float] = []  # stream-clock time of each queued frame
        self._in_flight = 0  # frames of the clip being encoded: back to the queue unless committed
        self._flight_times: list[float] = []  # their times
        self._frame_shape: tuple[int, ...] | None = None
        self._history: list[tuple[str, str]] = []  # earlier (question, answer) turns, text only
        self._clip_lock = asyncio.Lock()
        self._clip_request: str | None = None  # the clip request in the engine, aborted by `close`

    # ---- frames --------------------------------------------------------------------------------------
    def sample(self, count: int, timestamps: Any = None, offsets: Any = None, skipped: int = 0,
               until: float | None = None) -> Sampled:
        """The times of a push of `count` frames and which of them the stream's rate keeps (`StreamClock`);
        raises `TimestampError` naming the frame; changes nothing."""
        self.check_open()
        return self.clock.sample(count, timestamps, offsets, skipped, until)

    def accept(self, frames: Any, timestamps: Any = None, offsets: Any = None,
               sampled: Sampled | None = None) -> tuple[int, int]:
        """Validate frames, sample them to the stream's rate and buffer those kept; returns (accepted, sampled
        out). Nothing of a push that fails is kept. `sampled`: this push's `sample`, if the caller has it.
        Encoding is `encode_ready`."""
        self.check_open()
        batch = to_frame_array(frames)
        sampled = sampled or self.sample(batch.shape[0], timestamps, offsets)
        if len(sampled.keep) != batch.shape[0]:
            raise ValueError(f"got {batch.shape[0]} frames but times for {len(sampled.keep)}")
        if self._frame_shape is None:
            self._frame_shape = batch.shape[1:]
        elif batch.shape[1:] != self._frame_shape:
            raise ValueError(f"frames of this stream are {list(self._frame_shape)}, got {list(batch.shape[1:])}")
        self.clock.advance(sampled)
        kept = batch[sampled.keep]
        self._pending.extend(kept)
        self._pending_since.extend([time.time()] * len(kept))
        self._pending_times.extend(sampled.kept_times.tolist())
        self.frames_received += batch.shape[0] + sampled.skipped
        self.frames_sampled_out += sampled.sampled_out
        self.touch()
        return len(kept), sampled.sampled_out

    def drop_oldest_pending(self, count: int) -> int:
        """Drop up to `count` of the oldest frames not yet encoded (backpressure); returns how many."""
        count = max(0, min(count, len(self._pending)))
        del self._pending[:count], self._pending_since[:count], self._pending_times[:count]
        self.frames_dropped += count
        return count

    @property
    def oldest_pending_at(self) -> float | None:
        return self._pending_since[0] if self._pending_since else None

    @property
    def pending_frames(self) -> int:
        """Frames received and not encoded yet: queued, or in the clip being encoded (they still cost memory
        and return to the queue if that clip is not committed)."""
        return len(self._pending) + self._in_flight

    @property
    def frames_in_flight(self) -> int:
        return self._in_flight

    @property
    def pending_bytes(self) -> int:
        """What the pending frames hold in memory (a stream's frames share one shape)."""
        return self.pending_frames * math.prod(self._frame_shape) if self._frame_shape else 0

    def touch(self) -> None:
        """Record client activity (idle streams expire on servers)."""
        self.last_activity = time.time()

    async def encode_ready(self) -> list[ClipResult]:
        """Encode every complete clip among the buffered frames, in order."""
        results = []
        while len(self._pending) >= self.config.clip_frames and not self.closed:
            clip = await self._encode_clip(flush=False)
            if clip is None:  # aborted, or a question flushed the frames meanwhile
                break
            results.append(clip)
        return results

    async def append(self, frames: Any, timestamps: Any = None) -> list[ClipResult]:
        """Buffer frames and return once every complete clip is encoded."""
        self.accept(frames, timestamps)
        return await self.encode_ready()

    # ---- questions -------------------------------------------------------------------------------------
    async def ask(self, question: str, sampling_params: Any = None,
                  on_delta: Callable[[str], None] | None = None) -> Answer:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self.check_open()
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question must be a non-empty string")
        start = time.perf_counter()
        # Idle stream: encode what is queued (in clips of at most `clip_frames`) so the answer covers every
        # frame received. With a backlog being encoded the question does not wait; it answers from what is
        # encoded.
        while self.config.flush_on_question and self._pending and not self._clip_lock.locked():
            if await self._encode_clip(flush=True) is None:
                break  # nothing encoded (the engine aborted the clip): its frames wait for the next round
        flushed = time.perf_counter()
        sampling = (sampling_params.clone() if sampling_params is not None
                    else SamplingParams(max_tokens=64, temperature=0.0))
        sampling.output_kind = RequestOutputKind.CUMULATIVE
        history = self._history[-self.config.history_turns:] if self.config.history_turns else []
        turn = "".join(HISTORY_TURN.format(question=q, answer=a) for q, a in history)
        turn += QUESTION_TURN.format(question=question)
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

        reasks = 0
        while True:
            req_id = f"lv-question-{self.id}-{uuid.uuid4().hex[:12]}"
            try:
                snapshot = await self._rpc("livevlm_prepare", self.id, RequestKind.QUESTION.value, req_id)
            except BaseException:  # cancelled meanwhile, say: the pin must not outlive the question
                await self._unpin(req_id)
                raise
            params = LiveVLMParams(self.id, RequestKind.QUESTION, snapshot["version"], snapshot["context_tokens"],
                                   context_extent=snapshot["context_extent"])
            question_tokens = self.engine.tokenizer.encode(self.time_instruction(snapshot["frames"]) + turn,
                                                           add_special_tokens=False)
            try:
                left = self.engine.positions_left(params, len(question_tokens))
            except ValueError:
                await self._unpin(req_id)
                raise
            if left is not None:
                sampling.max_tokens = min(sampling.max_tokens or left, left)
            prompt = {"prompt_token_ids": [self.engine.placeholder_token_id] * params.context_tokens + question_tokens}
            try:
                output, report = await self.engine.submit(prompt, sampling, req_id, params, on_output)
                break
            except QuestionRaced as e:
                # Asked again (at most MAX_REASKS times, and only if nothing of the failed attempt reached the
                # caller) once the clip in flight, whose commit changed the memory's size, has landed.
                if reasks == MAX_REASKS or sent:
                    self._raise_if_closed(e)
                    raise
                reasks, first_token_at = reasks + 1, None
                logger.info("stream %s: %s; asking again", self.id, e)
                async with self._clip_lock:
                    pass
            except Exception as e:
                self._raise_if_closed(e)
                raise
        frames_covered = report.get("frames_covered", snapshot["frames"])
        end = time.perf_counter()
        completion = output.outputs[0]
        pages = {int(layer): [tuple(r) for r in ranges] for layer, ranges in report.get("pages", {}).items()}
        if self.config.history_turns:
            self._history = (self._history + [(question, completion.text)])[-self.config.history_turns:]
        return Answer(
            text=completion.text, token_ids=list(completion.token_ids), frames_covered=frames_covered,
            prompt_tokens=len(output.prompt_token_ids),
            prompt_tokens_computed=len(output.prompt_token_ids) - (output.num_cached_tokens or 0),
            finish_reason=completion.finish_reason,
            retrieved_pages=pages,
            retrieved_page_indices={int(layer): list(p) for layer, p in report.get("page_indices", {}).items()},
            retrieved_times={layer: [(self.frame_time(first), self.frame_time(last)) for first, last in ranges]
                             for layer, ranges in pages.items()},
            covered_until=self.frame_time(frames_covered - 1) if frames_covered else None,
            timings={"flush": flushed - start, "ttft": (first_token_at or end) - flushed, "total": end - start,
                     "retrieval": report.get("seconds", 0.0)},
            repinned_version=report.get("repinned_version"), reasked=reasks > 0)

    def time_instruction(self, frames: int) -> str:
        """LLaVA-Video's time instruction (the text its OneVision checkpoints were evaluated with, lmms-eval
        `add_time_instruction`; it follows the video, before the question) for the first `frames` stream
        frames: at most `time_prompt_frames` of their times, evenly spread, in seconds from the first frame.
        Empty when the knob is 0 (the default: the prompt is then exactly vanilla's)."""
        listed = min(self.config.time_prompt_frames, frames)
        if not listed:
            return ""
        start = self.frame_time(0)
        picks = np.linspace(0, frames - 1, listed).round().astype(int).tolist()
        located = ",".join(f"{self.frame_time(i) - start:.2f}s" for i in picks)
        return (f"The video lasts for {self.frame_time(frames - 1) - start:.2f} seconds, and {listed} frames are "
                f"uniformly sampled from it. These frames are located at {located}.Please answer the following "
                "questions related to this video.\n")

    def frame_time(self, frame: int) -> float | None:
        """The stream-clock time of stream frame `frame`, also for the clip in flight (the memory may hold it
        before this front end has settled it); None for a frame of a clip whose times went with the queue
        (the stream was deleted while a question that read it finished: that answer is still given)."""
        encoded, flight = self.clock.encoded, frame - len(self.clock.encoded)
        if flight < 0:
            return encoded[frame]
        return self._flight_times[flight] if flight < len(self._flight_times) else None

    # ---- state --------------------------------------------------------------------------------------------
    async def stats(self) -> dict[str, Any]:
        """The memory's stats, the frame counters and `covered_until` (the time of the last frame encoded);
        `frames_received == frames_encoded + pending_frames + frames_dropped + frames_sampled_out` always holds."""
        self.check_open()
        stats = await self._rpc("livevlm_stats", self.id)
        self.check_open()  # closed while the RPC ran: its queue is gone, the counters describe nothing
        stats.update(pending_frames=self.pending_frames, pending_bytes=self.pending_bytes,
                     frames_received=self.frames_received, frames_encoded=self.frames_encoded,
                     frames_dropped=self.frames_dropped, frames_sampled_out=self.frames_sampled_out,
                     covered_until=self.clock.covered_until())
        return stats

    async def kept_tokens(self) -> dict[str, Any]:
        """Which stream tokens the memory holds: `long_term[layer][kv_head]` and `short_term` token ids
        (clip tokens numbered from 0 in arrival order, one newline token closing each clip), the stream frame
        of each (`*_frames`, same layout) and that frame's time in seconds (`*_seconds`)."""
        self.check_open()
        kept = await self._rpc("livevlm_kept_tokens", self.id)
        kept["long_term_seconds"] = [[[self.frame_time(f) for f in head] for head in layer]
                                     for layer in kept["long_term_frames"]]
        kept["short_term_seconds"] = [self.frame_time(f) for f in kept["short_term_frames"]]
        return kept

    # ---- portability (`vllm_livevlm.portable`) ----------------------------------------------------------------
    def portable_state(self) -> dict[str, Any]:
        """What the front end knows of the stream, JSON-able (the stream file's `stream` header; the memory
        is the engine's, the pending frames and frame times are `portable_tensors`)."""
        clock = self.clock
        return {"id": self.id, "config": self.config.to_dict(), "system_prompt": self.system_prompt,
                "created": self.created, "history": [list(turn) for turn in self._history],
                "counters": {"frames_received": self.frames_received, "frames_encoded": self.frames_encoded,
                             "frames_dropped": self.frames_dropped, "frames_sampled_out": self.frames_sampled_out,
                             "clips_encoded": self.clips_encoded},
                "frame_shape": list(self._frame_shape) if self._frame_shape is not None else None,
                "clock": {"origin": clock.origin, "last": clock.last, "last_slot": clock.last_slot}}

    def portable_tensors(self) -> dict[str, Any]:
        """The frames received and not encoded yet (as the stream keeps them) with their times, and the times
        of the encoded frames."""
        import torch

        from vllm_livevlm.portable.format import ENCODED_TIMES, PENDING_FRAMES, PENDING_TIMES

        frames = (torch.from_numpy(np.stack(self._pending)) if self._pending
                  else torch.zeros((0, *(self._frame_shape or (0, 0, 3))), dtype=torch.uint8))
        return {PENDING_FRAMES: frames, PENDING_TIMES: torch.tensor(self._pending_times, dtype=torch.float64),
                ENCODED_TIMES: torch.tensor(self.clock.encoded, dtype=torch.float64)}

    async def export_bytes(self, owner_token_sha256: str | None = None) -> bytes:
        """The stream as a stream file: its latest memory and its front-end state, taken together between
        clips (a clip in flight commits first), so both describe the same frames. The engine is blocked
        only for the export RPC's copies; the file is built in a thread."""
        from vllm_livevlm.portable.stream_file import pack

        self.check_open()
        fingerprint = await self.engine.fingerprint()
        async with self._clip_lock:
            self.check_open()
            try:
                shards = await self.engine.export_shards(self.id)
            except Exception as e:
                self._raise_if_closed(e)
                raise
            state, tensors = self.portable_state(), self.portable_tensors()
        return await asyncio.to_thread(pack, fingerprint, shards, state, tensors, owner_token_sha256)

    @classmethod
    def from_portable(cls, engine: StreamEngine, stream_id: str, stream_file: "StreamFile") -> "LiveStream":
        """A stream with the front-end state of a checked `StreamFile` (its memory is installed by the caller)."""
        from vllm_livevlm.portable.format import ENCODED_TIMES, PENDING_FRAMES, PENDING_TIMES, StreamFileError

        state = stream_file.state
        try:
            config = engine.resolve_config(state["config"])
        except ValueError as e:
            raise StreamFileError(f"the stream's config cannot run here: {e}") from None
        if engine.sink_tokens(state["system_prompt"]) != stream_file.sink_tokens:
            raise StreamFileError(f"the memory holds {stream_file.sink_tokens} sink tokens; this tokenizer makes the "
                                  f"system prompt {engine.sink_tokens(state['system_prompt'])}")
        stream = cls(engine, stream_id, config, state["system_prompt"])
        for name, value in state["counters"].items():
            setattr(stream, name, value)
        stream._history = [tuple(turn) for turn in state["history"]][-config.history_turns:] if config.history_turns else []
        stream._frame_shape = tuple(state["frame_shape"]) if state["frame_shape"] is not None else None
        stream._pending = list(stream_file.front[PENDING_FRAMES].numpy())
        stream._pending_times = stream_file.front[PENDING_TIMES].tolist()
        stream._pending_since = [time.time()] * len(stream._pending)
        clock = stream.clock
        clock.origin, clock.last, clock.last_slot = (state["clock"][k] for k in ("origin", "last", "last_slot"))
        clock.encoded.extend(stream_file.front[ENCODED_TIMES].tolist())
        return stream

    async def close(self) -> int:
        """Free the stream's memory; returns the bytes freed. Closing twice is harmless."""
        if self.closed:
            return 0
        self.closed = True
        self._pending.clear()
        self._pending_since.clear()
        self._pending_times.clear()
        self.engine.streams.pop(self.id, None)
        try:
            if self._clip_request is not None:
                await self.engine.engine.abort(self._clip_request)  # its result would be dropped anyway
        finally:
            freed = await self.engine.rpc("livevlm_close_stream", self.id)
        return freed

    def check_open(self) -> None:
        if self.closed:
            raise StreamClosed(f"stream {self.id} is closed")

    def _raise_if_closed(self, error: BaseException) -> None:
        """A request that failed because its stream closed meanwhile reports the close, not the failure."""
        if self.closed:
            raise StreamClosed(f"stream {self.id} was closed") from error

    async def _rpc(self, method: str, *args: Any) -> Any:
        """A worker RPC about this stream (a stream closed meanwhile raises `StreamClosed`)."""
        try:
            return await self.engine.rpc(method, *args)
        except Exception as e:  # the store forgot the stream; engine-process errors arrive untyped
            self._raise_if_closed(e)
            raise

    async def _unpin(self, req_id: str) -> None:
        """Release a request's pin whatever happened to it (`submit` releases those it ran; releasing twice
        is harmless)."""
        try:
            await self.engine.rpc("livevlm_release", [req_id])
        except Exception:
            logger.warning("stream %s: could not release request %s", self.id, req_id, exc_info=True)

    # ---- internals ----------------------------------------------------------------------------------------
    async def _open(self) -> None:
        await self.engine.rpc("livevlm_open_stream", self.id, self.config.to_dict())
        await self.engine.submit({"prompt_token_ids": self.engine.sinks_prompt(self.system_prompt)}, _one_token(),
                                 f"lv-sinks-{self.id}", LiveVLMParams(self.id, RequestKind.SINKS))

    async def _encode_clip(self, flush: bool) -> ClipResult | None:
        """Encode the oldest `clip_frames` queued frames as one clip (`flush`: up to `clip_frames`, a partial
        clip). A clip the memory did not commit (aborted by the engine, cancelled, failed) puts its frames back
        at the head of the queue, in order: the memory never holds half a clip and no frame is lost. Returns
        None when nothing was encoded (the engine aborted the clip, or clips encoded while this one waited for
        its turn left too few frames); raises what failed it otherwise."""
        async with self._clip_lock:
            if self.closed:
                raise StreamClosed(f"stream {self.id} was closed while encoding")
            num_frames = min(self.config.clip_frames, len(self._pending))
            if num_frames == 0 or (not flush and num_frames < self.config.clip_frames):
                return None
            frames = np.stack(self._pending[:num_frames])
            since, times = self._pending_since[:num_frames], self._pending_times[:num_frames]
            del self._pending[:num_frames], self._pending_since[:num_frames], self._pending_times[:num_frames]
            self._in_flight, self._flight_times = num_frames, times
            start = time.perf_counter()
            req_id = f"lv-clip-{self.id}-{self.clips_encoded}-{uuid.uuid4().hex[:8]}"
            output = None
            try:
                output = await self._submit_clip(req_id, frames)
            except Exception as e:  # a stream that cannot encode its next clip has failed
                self._raise_if_closed(e)
                if isinstance(e, StreamFailed):
                    raise
                raise StreamFailed(f"clip request {req_id} failed: {e}") from e
            finally:
                committed = await self._settle_clip(req_id, output, frames, since, times)
            if self.closed:
                raise StreamClosed(f"stream {self.id} was closed while encoding")
            if not committed:
                logger.warning("stream %s: clip request %s was aborted; its %d frames are queued again",
                               self.id, req_id, num_frames)
                return None
            computed = len(output.prompt_token_ids) - (output.num_cached_tokens or 0)
            return ClipResult(num_frames, computed, time.perf_counter() - start)

    async def _submit_clip(self, req_id: str, frames: np.ndarray) -> Any:
        engine = self.engine
        snapshot = await self._rpc("livevlm_prepare", self.id, RequestKind.CLIP.value, req_id)
        params = LiveVLMParams(self.id, RequestKind.CLIP, snapshot["version"], snapshot["context_tokens"],
                               self.frames_encoded, len(frames), context_extent=snapshot["context_extent"])
        engine.positions_left(params, engine.adapter.max_clip_tokens(len(frames)))
        prompt = {"prompt_token_ids": [engine.placeholder_token_id] * params.context_tokens + engine.video_prompt,
                  "multi_modal_data": {"video": engine.adapter.video_item(frames, self.config.sample_fps,
                                                                              params.frame_start)},
                  "multi_modal_uuids": {"video": [req_id]}}
        self._clip_request = req_id
        try:
            output, _ = await engine.submit(prompt, _one_token(), req_id, params)
        finally:
            self._clip_request = None
        return output

    async def _settle_clip(self, req_id: str, output: Any, frames: np.ndarray, since: list[float],
                           times: list[float]) -> bool:
        """Whether the memory committed the clip; counts its frames as encoded, or queues them again. A clip
        that finished normally is committed; one aborted, cancelled or failed is asked of the store (it may
        have run before the abort)."""
        committed = output is not None and output.outputs[0].finish_reason != "abort"
        try:
            if not committed and not self.closed:
                await self._unpin(req_id)  # settles the request in the engine (RPCs run in order) and its pin
                committed = (await self.engine.rpc("livevlm_stats", self.id))["frames"] > self.frames_encoded
        except Exception:
            logger.warning("stream %s: could not tell whether clip %s was committed; its frames are queued "
                           "again", self.id, req_id, exc_info=True)
        finally:
            self._in_flight, self._flight_times = 0, []
            if self.closed:
                committed = False  # `close` dropped the queue: the frames go with it
            elif committed:
                self.frames_encoded += len(frames)
                self.clips_encoded += 1
                self.clock.encoded.extend(times)
            else:
                self._pending[:0], self._pending_since[:0], self._pending_times[:0] = list(frames), since, times
        return committed


def _one_token() -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0)
