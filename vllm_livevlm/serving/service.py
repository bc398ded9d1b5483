"""`StreamService`: the server's streams, who owns them, their background ingestion, limits and expiry.

Every route goes through here, so one place enforces what a client may ask of the server: a stream is
admitted only if its memory bound fits the store limits (the store can never outgrow them), each stream
needs its owner token, idle streams expire, and shutdown drains in-flight questions before freeing streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from vllm_livevlm.clock import TimestampError
from vllm_livevlm.config import LiveVLMConfig
from vllm_livevlm.frames import to_frame_array
from vllm_livevlm.log import get_logger
from vllm_livevlm.memory.budget import ModelShape, capture_bytes, memory_bound_bytes, scoring_reserve_bytes
from vllm_livevlm.serving.errors import APIError
from vllm_livevlm.serving.metrics import stream_metrics
from vllm_livevlm.streams import Answer, LiveStream, QuestionRaced, StreamEngine, StreamFailed

if TYPE_CHECKING:
    from vllm_livevlm.portable.checkpoints import Checkpointer

logger = get_logger(__name__)

CONFIG_ENV = "VLLM_LIVEVLM_CONFIG"
LIMITS_ENV = "VLLM_LIVEVLM_LIMITS"
GiB = 1024**3


@dataclass(frozen=True)
class ServerLimits:
    """What clients may ask of the server (`--livevlm-limits` JSON, passed as `VLLM_LIVEVLM_LIMITS`)."""

    max_streams: int = 64
    max_stream_bytes: int = 4 * GiB          # a stream's memory bound (see `reserved_bytes`) must fit
    max_total_store_bytes: int = 16 * GiB    # all reservations together (`StreamService.store_reserve_bytes`)
    max_frames_per_request: int = 256        # frames kept from one request (after a video's sampling)
    max_video_frames: int = 18000            # frames decoded from one video, kept or sampled out (10 min at 30 fps)
    max_upload_bytes: int = 64 * 1024 * 1024
    max_stream_file_bytes: int = GiB         # a stream file sent to .../import (memory + pending frames)
    max_imports_in_flight: int = 1           # imports being read and decoded at once; 429 beyond
    max_request_body_bytes: int = 8 * 1024 * 1024  # any other body, which the trust boundary reads first
    max_json_depth: int = 128                # nesting of a JSON body (vLLM's parsers would recurse past it)
    max_answer_tokens: int = 4096            # `max_tokens` of a question to a stream
    max_frame_side: int = 4096               # pixels, width and height
    max_frame_pixels: int = 4096 * 2160      # width x height, read from the header before decoding
    decode_workers: int = 2                  # threads decoding uploads (off the event loop)
    max_decode_queue: int = 16               # uploads waiting for a decode worker; more are refused (429)
    max_clip_frames: int = 64
    max_pending_frames: int = 512            # received but not yet encoded, per stream
    max_pending_bytes: int = 256 * 1024**2   # what those frames hold in memory, per stream
    max_total_pending_bytes: int = 2 * GiB   # the same, all streams together
    pending_policy: Literal["reject", "drop_oldest"] = "reject"
    max_question_chars: int = 16384
    max_questions_per_stream: int = 2        # in flight at once, per stream
    max_websockets: int = 64                 # open stream websockets, whole server
    stream_ttl_seconds: float = 1800.0       # idle streams are closed after this; 0 disables expiry
    shutdown_grace_seconds: float = 30.0     # how long shutdown waits for in-flight questions
    checkpoint_every_clips: int = 8          # with a state dir: a changed stream is written after this many
    checkpoint_every_seconds: float = 30.0   # clips or seconds, whichever first (0 turns a trigger off)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "pending_policy":
                if value not in ("reject", "drop_oldest"):
                    raise ValueError(f"pending_policy must be 'reject' or 'drop_oldest', got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"server limit {f.name} must be a non-negative number, got {value!r}")

    @classmethod
    def from_env(cls) -> "ServerLimits":
        raw = os.environ.get(LIMITS_ENV)
        if not raw:
            return cls()
        data = json.loads(raw)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{LIMITS_ENV}: unknown limits {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Pushed(NamedTuple):
    """What happened to a push's frames."""

    accepted: int     # kept and queued for encoding
    sampled_out: int  # arrived faster than the stream's `sample_fps`
    dropped: int      # older pending frames dropped for them (`drop_oldest`)


def config_from_env() -> LiveVLMConfig:
    raw = os.environ.get(CONFIG_ENV)
    return LiveVLMConfig.from_json(raw) if raw else LiveVLMConfig()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class StreamService:
    def __init__(self, core: StreamEngine, limits: ServerLimits, model_name: str, shape: ModelShape):
        self.core = core
        self.limits = limits
        self.model_name = model_name
        self.shape = shape
        self.metrics = stream_metrics()
        self.draining = False
        self._owners: dict[str, bytes] = {}          # stream id -> sha256 of its owner token
        self._reserved: dict[str, int] = {}          # stream id -> store bytes reserved at admission
        self._policy: dict[str, str] = {}            # stream id -> backpressure policy
        self._opening = 0                            # streams whose sinks are being encoded
        self._opening_bytes = 0                      # what they reserved
        self._gone: OrderedDict[str, str] = OrderedDict()  # recently expired streams -> why (bounded)
        self._ingest: dict[str, asyncio.Task] = {}
        self._ingest_errors: dict[str, BaseException] = {}
        self._asking: dict[str, int] = {}            # stream id -> questions in flight
        self._importing = 0                          # stream files being read or decoded (`import_slot`)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._reaper: asyncio.Task | None = None
        self.checkpointer: Checkpointer | None = None  # with a state dir (`serving.plugin`)
        # The id of a stream being opened (None: the engine's random one); Ray Serve replicas mint ids that
        # name their home (`serving.ray.ids`).
        self.new_stream_id: Callable[[], str | None] = lambda: None
        # Reserved once, at start: the step's captured clip K/V and the worst vision-to-vision scoring.
        self.capture_reserve = capture_bytes(shape, core.max_num_batched_tokens)
        self.scoring_reserve = scoring_reserve_bytes(shape, limits.max_stream_bytes, limits.max_clip_frames)

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start expiry and gauge refresh; called on the server's event loop."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._reaper = self._loop.create_task(self._maintain())

    def before_engine_shutdown(self) -> None:
        """Drain from the thread that stops the engine (vLLM's SIGTERM handler): refuse new work, let
        in-flight questions finish, close every stream. A no-op on the loop's own thread (nothing to wait on)."""
        loop = self._loop
        if loop is None or not loop.is_running() or threading.get_ident() == self._loop_thread:
            return
        future = asyncio.run_coroutine_threadsafe(self.drain(), loop)
        try:
            future.result(timeout=self.limits.shutdown_grace_seconds + 30)
        except Exception:
            logger.exception("LiveVLM: draining streams before shutdown failed")

    async def drain(self) -> None:
        self.draining = True
        deadline = time.monotonic() + self.limits.shutdown_grace_seconds
        while any(self._asking.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        unanswered = sum(self._asking.values())
        if self.checkpointer is not None:  # before the streams close: a restart finds them as they are now
            await self.checkpointer.flush()
        streams = list(self.core.streams)
        freed = 0
        for stream_id in streams:
            freed += await self._close(stream_id)
        if self._reaper is not None:
            self._reaper.cancel()
        logger.info("LiveVLM shutdown: closed %d streams, freed %d bytes (%d questions cut by the %.0f s grace)",
                    len(streams), freed, unanswered, self.limits.shutdown_grace_seconds)

    # ---- streams -------------------------------------------------------------------------------------------
    async def create(self, config: dict[str, Any] | None, system_prompt: str | None,
                     pending_policy: str | None = None) -> tuple[LiveStream, str]:
        """Admit and open a stream; returns it with its owner token (shown to the client once)."""
        self._check_accepting()
        if pending_policy not in (None, "reject", "drop_oldest"):
            raise APIError(400, f"pending_policy must be 'reject' or 'drop_oldest', got {pending_policy!r}",
                           "pending_policy")
        self._check_capacity()
        resolved, reserve = self._admit(config, system_prompt)
        return await self._opened(reserve, self.core.open_stream(resolved, system_prompt, self.new_stream_id()),
                                  pending_policy)

    @property
    def opening(self) -> int:
        """Streams admitted whose sinks are still being encoded (a Serve replica's load counts them)."""
        return self._opening

    def own_file_bytes(self) -> int:
        """The largest stream file this server writes (a stream's bound, its pending frames, 1 MiB of header):
        a restore reads its own checkpoints up to this, whatever `max_stream_file_bytes` lets clients send."""
        limits = self.limits
        return max(limits.max_stream_file_bytes, limits.max_stream_bytes + limits.max_pending_bytes + 2**20)

    async def import_stream(self, data: bytes, stream_id: str | None = None, token_digest: bytes | None = None,
                            max_bytes: int | None = None) -> tuple[LiveStream, str | None]:
        """Admit and open a stream from a stream file (`vllm_livevlm.portable`) as `create` admits a new one
        (max_streams, config limits, store reservation), with identical memory; its pending frames are encoded
        in the background. Returns it with a new owner token, or None when `token_digest` (the sha256 of its
        old token: a restore) is kept. A bad file is a 400 naming the reason; nothing is half-loaded."""
        from vllm_livevlm.portable.format import StreamFileError, read_header

        self._check_accepting()
        self._check_capacity()
        try:  # the config and system prompt to admit by, read before any tensor is
            state = read_header(data).get("stream")
            if not isinstance(state, dict) or not isinstance(state.get("system_prompt"), (str, type(None))):
                raise StreamFileError("the header has no stream state")
        except StreamFileError as e:
            raise APIError(400, f"invalid stream file: {e}", "file") from None
        _, reserve = self._admit(state.get("config"), state["system_prompt"])

        async def opening() -> LiveStream:
            return (await self.core.import_stream(data, stream_id or self.new_stream_id(),
                                                  max_bytes or self.limits.max_stream_file_bytes))[0]

        try:
            stream, token = await self._opened(reserve, opening(), None, token_digest)
        except StreamFileError as e:
            raise APIError(400, f"invalid stream file: {e}", "file") from None
        except ValueError as e:  # the id exists
            raise APIError(409, str(e), "stream_id") from None
        if stream.pending_frames >= stream.config.clip_frames:
            self._ingest[stream.id] = asyncio.create_task(self._encode(stream))
        return stream, token

    @contextlib.contextmanager
    def import_slot(self) -> Iterator[None]:
        """Room to read and decode one stream file (429 past `max_imports_in_flight`): a file of up to
        `max_stream_file_bytes` is held in memory, a few times over while it is decoded and installed."""
        self._check_accepting()
        if self._importing >= self.limits.max_imports_in_flight:
            self._reject("max_imports_in_flight")
            raise APIError(429, f"{self._importing} stream imports are in progress (max_imports_in_flight): retry "
                                "when they are done", "file")
        self._importing += 1
        try:
            yield
        finally:
            self._importing -= 1

    async def export_stream(self, stream: LiveStream) -> bytes:
        """The stream's file, its owner token's digest in the header (a restore keeps the token)."""
        self.check_usable(stream)
        try:
            return await stream.export_bytes(self._owners[stream.id].hex())
        except (ValueError, RuntimeError) as e:  # failed or closed in the store meanwhile
            stream.check_open()
            raise APIError(409, f"stream {stream.id} cannot be exported: {e}", "stream_id") from None

    def _check_capacity(self) -> None:
        if len(self.core.streams) + self._opening >= self.limits.max_streams:
            self._reject("max_streams")
            raise APIError(503, f"the server holds its maximum of {self.limits.max_streams} streams")

    def _admit(self, config: Any, system_prompt: Any) -> tuple[LiveVLMConfig, int]:
        """The resolved config of a stream to open and the bytes it reserves, if its config is within the
        server's limits and the store has room for it: 400 / 503 otherwise."""
        limits = self.limits
        if config is not None and not isinstance(config, dict):
            raise APIError(400, "config must be a JSON object of LiveVLM knobs", "config")
        if system_prompt is not None and len(system_prompt) > limits.max_question_chars:
            raise APIError(400, f"system_prompt is longer than {limits.max_question_chars} characters", "system_prompt")
        try:
            resolved = self.core.resolve_config(config)
        except ValueError as e:  # LiveVLMConfigError included
            raise APIError(400, str(e), "config") from None
        if resolved.clip_frames > limits.max_clip_frames:
            raise APIError(400, f"clip_frames={resolved.clip_frames} exceeds the server limit of "
                                f"{limits.max_clip_frames}", "config")
        reserve = self.reserved_bytes(resolved, self.core.sink_tokens(system_prompt))
        if reserve is None:
            raise APIError(400, "long_term_budget_tokens=null keeps every token (unbounded memory); this server "
                                "bounds each stream's memory: set a budget", "config")
        if reserve > limits.max_stream_bytes:
            raise APIError(400, f"this config needs up to {reserve} bytes of stream memory, over the per-stream "
                                f"limit of {limits.max_stream_bytes}: lower long_term_budget_tokens or "
                                "short_term_frames", "config")
        # Opening streams' reservations as one bound: conservative while creates race, exact otherwise.
        in_use = self.store_reserve_bytes(self._opening_bytes) + self.scoring_reserve
        need = self.store_reserve_bytes(self._opening_bytes, reserve) + self.scoring_reserve
        if need > limits.max_total_store_bytes:
            self._reject("max_total_store_bytes")
            raise APIError(503, f"the session store is full: {in_use} of {limits.max_total_store_bytes} bytes are "
                                f"reserved (live streams, one commit, scoring) and this stream needs "
                                f"{need - in_use} more; retry after streams close")
        return resolved, reserve

    async def _opened(self, reserve: int, opening: Awaitable[LiveStream], pending_policy: str | None,
                      token_digest: bytes | None = None) -> tuple[LiveStream, str | None]:
        """Open an admitted stream, counted (and reserved) while it opens so concurrent admissions see it;
        register its owner: a new token (returned), or `token_digest` kept (None returned)."""
        self._opening += 1
        self._opening_bytes += reserve
        try:
            stream = await opening
        finally:
            self._opening -= 1
            self._opening_bytes -= reserve
        token = None if token_digest is not None else secrets.token_urlsafe(32)
        self._owners[stream.id] = token_digest if token is None else _digest(token)
        self._reserved[stream.id] = reserve
        self._policy[stream.id] = pending_policy or self.limits.pending_policy
        self.metrics.streams.set(len(self.core.streams))
        self.metrics.store_reserved_bytes.set(self.store_reserve_bytes())
        return stream, token

    def reserved_bytes(self, config: LiveVLMConfig, sink_tokens: int) -> int | None:
        """What one stream reserves: its snapshot's bound, once. Between engine steps a stream holds one
        version: a question pins its snapshot only until its first step filled its context (a clip of its
        stream committing first moves it to the new version), a clip only until it commits."""
        return memory_bound_bytes(config, self.shape, sink_tokens)

    def store_reserve_bytes(self, *extra: int) -> int:
        """What the store may hold with the admitted streams (and `extra` bounds):

            sum(stream bounds) + largest stream bound + capture_bytes(max_num_batched_tokens)

        An engine step commits its clips one after another, each dropping its base version before the
        next is built, so beyond every stream's latest version it holds one version being built and the
        captured K/V of the clips it prefilled. `scoring_reserve` comes on top (admission counts both)."""
        bounds = [*self._reserved.values(), *extra]
        if not any(bounds):
            return 0
        return sum(bounds) + max(bounds) + self.capture_reserve

    def get(self, stream_id: str, token: str | None) -> LiveStream:
        """The stream, if `token` is its owner token: 404 (unknown), 410 (expired), 403 (wrong token)."""
        stream = self.core.streams.get(stream_id)
        if stream is None:
            if stream_id in self._gone:
                raise APIError(410, f"video stream {stream_id} {self._gone[stream_id]}", "stream_id")
            raise APIError(404, f"no video stream with id {stream_id!r}", "stream_id")
        owner = self._owners.get(stream_id)
        if owner is None or not token or not secrets.compare_digest(owner, _digest(token)):
            raise APIError(403, f"stream {stream_id} needs its owner token (the `token` returned when it was "
                                "created) in the X-Stream-Token header" + (": this one does not match" if token else ""),
                           "X-Stream-Token")
        stream.touch()
        return stream

    def check_usable(self, stream: LiveStream) -> None:
        """409 for a stream that failed: it takes no frames or questions, and can still be read and deleted."""
        error = self._ingest_errors.get(stream.id)
        if error is not None:
            raise APIError(409, f"stream {stream.id} failed: {error}; delete it and open a new one", "stream_id")

    def owned(self, tokens: list[str]) -> list[LiveStream]:
        """The streams these owner tokens open (listing never shows other clients' streams)."""
        digests = {_digest(t) for t in tokens if t}
        return [s for sid, s in self.core.streams.items() if self._owners.get(sid) in digests]

    def push(self, stream: LiveStream, frames: Any, timestamps: Any = None, offsets: Any = None,
             skipped: int = 0, until: float | None = None) -> Pushed:
        """Sample frames to the stream's rate (by `timestamps`, or `offsets` from the push's first frame: see
        `vllm_livevlm.clock`; `skipped`/`until`: a video the decoder sampled), accept those kept (backpressure
        per `pending_policy`) and make sure the stream's ingestion task encodes them in the background. Nothing
        of a push refused here is kept."""
        self._check_accepting()
        stream.check_open()
        self.check_usable(stream)
        try:
            batch = to_frame_array(frames)
            sampled = stream.sample(len(batch), timestamps, offsets, skipped, until)
        except ValueError as e:  # TimestampError included
            raise APIError(400, str(e), "timestamps" if isinstance(e, TimestampError) else "frames") from None
        kept = batch[sampled.keep]
        limit, over = self._pending_excess(stream, kept) if len(kept) else ("max_pending_frames", 0)
        # drop_oldest drops this stream's queued frames (never another stream's, never the clip in flight).
        droppable = stream.pending_frames - stream.frames_in_flight + len(kept)
        if over > 0 and (self._policy[stream.id] == "reject" or over > droppable):
            self._reject(limit)
            raise APIError(429, f"stream {stream.id} has {stream.pending_frames} frames ({stream.pending_bytes} bytes) "
                                f"waiting to be encoded and this request adds {len(kept)} ({kept.nbytes} bytes): "
                                f"over {limit}={getattr(self.limits, limit)}; send frames no faster than the server "
                                "encodes them", "frames")
        try:
            accepted, sampled_out = stream.accept(batch, sampled=sampled)
        except ValueError as e:  # FrameError included
            status = 422 if "frames of this stream are" in str(e) else 400
            raise APIError(status, str(e), "frames") from None
        dropped = stream.drop_oldest_pending(over)
        if self.checkpointer is not None:
            self.checkpointer.received(stream)
        self.metrics.frames_received.inc(accepted)
        self.metrics.frames_dropped.inc(dropped)
        task = self._ingest.get(stream.id)
        if task is None or task.done():
            self._ingest[stream.id] = asyncio.create_task(self._encode(stream))
        return Pushed(accepted, sampled_out, dropped)

    def pending_bytes(self) -> int:
        return sum(s.pending_bytes for s in self.core.streams.values())

    def _pending_excess(self, stream: LiveStream, batch: Any) -> tuple[str, int]:
        """The pending limit `batch` would pass the most, and by how many frames (<= 0: none)."""
        limits, count, nbytes = self.limits, len(batch), batch.nbytes
        frame_bytes = nbytes // count
        stream_bytes = stream.pending_bytes + nbytes - limits.max_pending_bytes
        total_bytes = self.pending_bytes() + nbytes - limits.max_total_pending_bytes
        excess = {"max_pending_frames": stream.pending_frames + count - limits.max_pending_frames,
                  "max_pending_bytes": math.ceil(stream_bytes / frame_bytes),
                  "max_total_pending_bytes": math.ceil(total_bytes / frame_bytes)}
        limit = max(excess, key=excess.__getitem__)
        return limit, excess[limit]

    async def wait_encoded(self, stream: LiveStream, token: str | None) -> None:
        task = self._ingest.get(stream.id)
        if task is not None:
            await asyncio.wait([task])  # never raises: a delete cancelling the task answers 404 below
        stream = self.get(stream.id, token)  # 404/410 if the stream went away meanwhile
        self.check_usable(stream)

    async def ask(self, stream: LiveStream, question: str, sampling_params: Any,
                  on_delta: Callable[[str], None] | None = None) -> Answer:
        self._check_accepting()
        self.check_usable(stream)
        if len(question) > self.limits.max_question_chars:
            raise APIError(400, f"the question is {len(question)} characters long, over the limit of "
                                f"{self.limits.max_question_chars}", "messages")
        if self._asking.get(stream.id, 0) >= self.limits.max_questions_per_stream:
            self._reject("max_questions_per_stream")
            raise APIError(429, f"stream {stream.id} is already answering {self.limits.max_questions_per_stream} "
                                "questions (max_questions_per_stream): wait for an answer", "messages")
        self._asking[stream.id] = self._asking.get(stream.id, 0) + 1
        try:
            answer = await stream.ask(question, sampling_params, on_delta)
        except StreamFailed as e:
            self._ingest_errors.setdefault(stream.id, e)
            raise APIError(409, f"stream {stream.id} failed: {e}; delete it and open a new one", "stream_id") from None
        except QuestionRaced as e:  # the stream is fine: a retry is answered from its latest memory
            raise APIError(503, f"{e}; the stream's memory changed size while the question waited") from None
        finally:
            self._asking[stream.id] -= 1
            if not self._asking[stream.id]:
                del self._asking[stream.id]
            stream.touch()
        self.metrics.questions.inc()
        self.metrics.question_ttft.observe(answer.timings["ttft"])
        self.metrics.pages_retrieved.inc(sum(len(p) for p in answer.retrieved_page_indices.values()))
        return answer

    async def delete(self, stream_id: str, token: str | None) -> int:
        self.get(stream_id, token)
        return await self.release(stream_id)

    async def release(self, stream_id: str) -> int:
        """Close a stream and remove its checkpoint (deleted, or moved to another server); the bytes freed."""
        try:
            return await self._close(stream_id)
        finally:
            self._forget_checkpoint(stream_id)

    def describe(self, stream: LiveStream) -> dict[str, Any]:
        error = self._ingest_errors.get(stream.id)
        return {"id": stream.id, "object": "video.stream", "created": int(stream.created),
                "last_activity": stream.last_activity, "pending_policy": self._policy.get(stream.id),
                "config": stream.config.to_dict(), "state": "open" if error is None else "failed",
                **({} if error is None else {"error": str(error)}),
                **(self.checkpointer.report(stream.id) if self.checkpointer is not None else {})}

    def ingest_status(self, stream: LiveStream) -> dict[str, Any]:
        """Beside the memory's stats (the console shows them): the bound the stream's store bytes stay under
        (reserved at admission) and how long its oldest frame not yet encoded has waited."""
        oldest = stream.oldest_pending_at
        return {"memory_bound_bytes": self._reserved.get(stream.id),
                "ingest_lag_seconds": 0.0 if oldest is None else max(0.0, time.time() - oldest)}

    async def engine_load(self) -> dict[str, Any]:
        stats = await self.core.engine_stats()
        stats["reserved_bytes"] = self.store_reserve_bytes()
        stats["stream_reserved_bytes"] = sum(self._reserved.values())
        stats["scoring_reserve_bytes"] = self.scoring_reserve
        stats["max_total_store_bytes"] = self.limits.max_total_store_bytes
        stats["pending_bytes"] = self.pending_bytes()
        stats["max_total_pending_bytes"] = self.limits.max_total_pending_bytes
        return stats

    # ---- internals -------------------------------------------------------------------------------------------
    def _check_accepting(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down and accepts no new stream work")

    def _forget_checkpoint(self, stream_id: str) -> None:
        if self.checkpointer is not None:
            self.checkpointer.forget(stream_id)

    def _reject(self, reason: str) -> None:
        self.metrics.rejected.labels(reason=reason).inc()

    async def _close(self, stream_id: str) -> int:
        stream = self.core.streams.get(stream_id)
        task = self._ingest.pop(stream_id, None)
        try:
            return await stream.close() if stream is not None else 0
        finally:  # the server forgets the stream even if the engine failed to free it
            if task is not None and not task.done():
                task.cancel()
            self._ingest_errors.pop(stream_id, None)
            self._owners.pop(stream_id, None)
            self._reserved.pop(stream_id, None)
            self._policy.pop(stream_id, None)
            self.metrics.streams.set(len(self.core.streams))
            self.metrics.store_reserved_bytes.set(self.store_reserve_bytes())

    async def _encode(self, stream: LiveStream) -> None:
        try:
            for clip in await stream.encode_ready():
                self.metrics.frames_ingested.inc(clip.frames)
                self.metrics.clips_encoded.inc()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # reported on the stream's next request
            if not stream.closed:
                logger.exception("stream %s: encoding failed", stream.id)
                self._ingest_errors[stream.id] = e

    async def _maintain(self) -> None:
        """Every few seconds: expire idle streams and refresh the gauges that need the engine."""
        ttl = self.limits.stream_ttl_seconds
        period = min(max(ttl / 4, 0.5), 5.0) if ttl else 5.0
        while True:
            await asyncio.sleep(period)
            try:
                if ttl:
                    await self._expire_idle(ttl)
                await self._refresh_gauges()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let a failed refresh stop expiry
                logger.exception("LiveVLM: stream maintenance failed")

    async def _expire_idle(self, ttl: float) -> None:
        now = time.time()
        for stream_id, stream in list(self.core.streams.items()):
            if stream.closed:  # deleted while an earlier stream was being expired
                continue
            task = self._ingest.get(stream_id)
            busy = self._asking.get(stream_id) or (task is not None and not task.done())
            idle = now - stream.last_activity
            if busy or idle < ttl:
                continue
            freed = await self._close(stream_id)
            self._forget_checkpoint(stream_id)
            self._gone[stream_id] = f"expired after {idle:.0f} s without activity (TTL {ttl:g} s)"
            while len(self._gone) > 4096:
                self._gone.popitem(last=False)
            self.metrics.streams_expired.inc()
            logger.info("LiveVLM: stream %s expired after %.0f s idle; freed %d bytes", stream_id, idle, freed)

    async def _refresh_gauges(self) -> None:
        stats = await self.core.engine_stats()
        self.metrics.store_bytes.set(stats["store_bytes"])
        streams = list(self.core.streams.values())
        self.metrics.ingest_lag_frames.set(sum(s.pending_frames for s in streams))
        oldest = min((s.oldest_pending_at for s in streams if s.oldest_pending_at is not None), default=None)
        self.metrics.ingest_lag_seconds.set(time.time() - oldest if oldest is not None else 0.0)

