"""`SessionStore`: every stream's memory on one worker, versioned so questions read consistent snapshots.

A stream's memory is an immutable `StreamMemory`; each committed clip produces a new version. A request
pins the version it was built against (`prepare`) only until its context is in vLLM's blocks: a clip until
it commits, a question until its first step ran (`settle`), or until a clip of its stream commits first.
So a stream holds one version between engine steps (its bound); older versions are dropped as soon as
nothing pins them. A question that finds its version gone (it waited behind a clip, or vLLM preempted and
recomputes it) re-pins the latest version when that has the same context size, or fails as `Reask`.
Closing a stream drops all of its versions.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_livevlm.config import LiveVLMConfig
from vllm_livevlm.connector.params import RequestKind
from vllm_livevlm.memory.stream import StreamMemory, held_bytes
from vllm_livevlm.model.adapter import ModelAdapter


MAX_UNCLAIMED_REPORTS = 1024  # retrieval reports, and failed requests, waiting for the front end


class StreamNotFound(KeyError):
    pass


class Reask(ValueError):
    """A question's version is gone and the latest one needs another context size: the front end re-asks."""


@dataclass
class _Stream:
    config: LiveVLMConfig
    versions: dict[int, StreamMemory] = field(default_factory=dict)
    pins: dict[str, int] = field(default_factory=dict)  # request id -> version
    waiting: set[str] = field(default_factory=set)      # questions pinned whose first step has not run
    retrievals: int = 0
    retrieval_seconds: float = 0.0
    failure: str | None = None  # set when the stream can no longer be served consistently
    last_use: float = field(default_factory=time.time)
    closed: bool = False  # closed while requests still pinned versions: kept until they are released

    @property
    def latest(self) -> StreamMemory | None:
        return self.versions[max(self.versions)] if self.versions else None

    def drop_unpinned(self) -> None:
        if self.versions:
            keep = set(self.pins.values()) | (set() if self.closed else {max(self.versions)})
            for version in [v for v in self.versions if v not in keep]:
                del self.versions[version]


class SessionStore:
    def __init__(self, adapter: "ModelAdapter | None" = None) -> None:
        """`adapter`: the model family (its position rule); None places by slot (1-D RoPE)."""
        self.adapter = adapter
        self._streams: dict[str, _Stream] = {}
        self._req_stream: dict[str, str] = {}
        # Retrieval reports wait for the front end to fetch them; bounded in case one never does.
        self._retrieval_reports: OrderedDict[str, dict[str, Any]] = OrderedDict()
        # Requests the step failed alone (their stream is fine): why, and whether to re-ask (questions),
        # until the front end releases them.
        self._request_failures: OrderedDict[str, tuple[str, bool]] = OrderedDict()
        self._ran: set[str] = set()  # questions whose first step ran (a later first step is a recompute)
        self._sink_chunks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    # ---- lifecycle -------------------------------------------------------------------------------------
    def open(self, stream_id: str, config: LiveVLMConfig) -> None:
        with self._lock:
            if stream_id in self._streams:
                raise ValueError(f"stream {stream_id!r} already exists")
            self._streams[stream_id] = _Stream(config)

    def import_state(self, stream_id: str, memory: StreamMemory) -> None:
        """Install a stream with `memory` as its latest version (an imported or restored stream)."""
        with self._lock:
            if stream_id in self._streams:
                raise ValueError(f"stream {stream_id!r} already exists")
            self._streams[stream_id] = _Stream(memory.config, {memory.version: memory})

    def export_state(self, stream_id: str) -> StreamMemory:
        """The stream's latest memory, what an export writes (immutable: it stays valid after later clips)."""
        with self._lock:
            stream = self._get(stream_id)
            if stream.closed or stream.failure is not None or stream.latest is None:
                raise ValueError(f"stream {stream_id!r} cannot be exported: it is "
                                 + ("closed" if stream.closed else "failed" if stream.failure else "not encoded yet"))
            return stream.latest

    def close(self, stream_id: str) -> int:
        """Drop a stream and everything it holds; returns the bytes freed. Versions that requests still in
        the engine have pinned stay until those requests are released (a question racing the close reads
        a consistent snapshot, a clip in flight is dropped at commit); the stream takes no new requests."""
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None or stream.closed:
                return 0
            freed = held_bytes(stream.versions.values())
            stream.closed = True
            self._drop_unpinned(stream_id, stream)
            return freed

    def fail(self, stream_id: str, reason: str) -> None:
        """Mark a stream as unusable; its later requests raise with `reason`."""
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is not None and stream.failure is None:
                stream.failure = reason

    def fail_request(self, req_id: str, reason: str, reask: bool = False) -> None:
        """Mark one request as failed (its output must not be used); `take_failure` reports it."""
        with self._lock:
            self._request_failures.setdefault(req_id, (reason, reask))
            while len(self._request_failures) > MAX_UNCLAIMED_REPORTS:
                self._request_failures.popitem(last=False)

    def gather_sink_chunks(self, req_id: str, k: torch.Tensor, v: torch.Tensor,
                           complete: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A sinks prefix the scheduler prefilled over several steps: keep this chunk's raw K/V, and once
        the prefix is `complete` return all of it (and forget the chunks)."""
        if req_id in self._sink_chunks:
            old_k, old_v = self._sink_chunks.pop(req_id)
            k, v = torch.cat([old_k, k], dim=1), torch.cat([old_v, v], dim=1)
        if complete:
            return k, v
        self._sink_chunks[req_id] = (k, v)
        return None

    def config(self, stream_id: str) -> LiveVLMConfig:
        return self._get(stream_id).config

    def is_open(self, stream_id: str) -> bool:
        stream = self._streams.get(stream_id)
        return stream is not None and not stream.closed

    def holds(self, stream_id: str, version: int) -> bool:
        """Whether `version` of the stream is still here (pinned by a request, even after the close)."""
        stream = self._streams.get(stream_id)
        return stream is not None and version in stream.versions

    # ---- reads -----------------------------------------------------------------------------------------
    def prepare(self, stream_id: str, kind: RequestKind, req_id: str) -> dict[str, int]:
        """Pin the latest version for a request about to be submitted; returns its context size P."""
        with self._lock:
            stream = self._get(stream_id)
            if stream.closed:
                raise StreamNotFound(f"stream {stream_id!r} is closed")
            if stream.failure is not None:
                raise RuntimeError(f"stream {stream_id!r} failed: {stream.failure}")
            memory = stream.latest
            if memory is None:
                raise ValueError(f"stream {stream_id!r} has no memory yet (its sinks were not encoded)")
            stream.pins[req_id] = memory.version
            if kind == RequestKind.QUESTION:
                stream.waiting.add(req_id)
            self._req_stream[req_id] = stream_id
            stream.last_use = time.time()
            tokens = memory.clip_context_tokens if kind == RequestKind.CLIP else memory.question_context_tokens
            extent = memory.context_extent(kind == RequestKind.CLIP, self.stride(stream.config))
            return {"version": memory.version, "context_tokens": tokens, "frames": memory.frames_seen,
                    "context_extent": extent if self.axes else 0}

    @property
    def axes(self) -> int:
        """Width of the model's position records (0: 1-D placement by slot)."""
        return self.adapter.position_axes if self.adapter is not None else 0

    def stride(self, config: LiveVLMConfig) -> float:
        """The temporal stride of the multi-axis rule for a stream (`docs/positions.md`)."""
        return self.adapter.temporal_stride(config.sample_fps) if self.adapter is not None else 1.0

    def snapshot(self, stream_id: str, version: int) -> StreamMemory:
        stream = self._get(stream_id)
        if version not in stream.versions:
            raise ValueError(f"stream {stream_id!r} has no version {version} (not pinned?)")
        return stream.versions[version]

    def question_snapshot(self, stream_id: str, version: int, req_id: str, context_tokens: int) -> StreamMemory:
        """The snapshot a question's first step (or its recompute after a preemption) fills its context from:
        its version if still held, else the latest one if it needs the same `context_tokens` (the report says
        `repinned_version`). Raises `Reask` otherwise, ValueError/KeyError when the stream is gone or failed.
        Decided from store state alone, so every tensor-parallel rank decides alike."""
        with self._lock:
            stream = self._get(stream_id)
            stream.waiting.discard(req_id)
            recompute = req_id in self._ran
            self._ran.add(req_id)
            memory = stream.versions.get(version)
            if memory is None:
                latest = stream.latest
                if stream.closed or stream.failure is not None or latest is None or version > latest.version:
                    # never held (a version is superseded only by a later one), or nothing to move to
                    raise ValueError(f"stream {stream_id!r} has no version {version} (not pinned?)")
                if latest.question_context_tokens != context_tokens:
                    raise Reask(f"version {version} is gone and version {latest.version} needs "
                                f"{latest.question_context_tokens} context tokens, not {context_tokens}: ask again")
                memory = latest
            if recompute or memory.version != version:
                self._retrieval_reports.setdefault(req_id, {}).update(repinned_version=memory.version,
                                                                      frames_covered=memory.frames_seen)
            return memory

    def settle(self, req_ids: list[str]) -> None:
        """Unpin requests whose context is in vLLM's blocks (their first step ran); they stay known until
        `release`, so a recompute after a preemption can re-pin (`question_snapshot`)."""
        with self._lock:
            for req_id in req_ids:
                stream = self._streams.get(self._req_stream.get(req_id, ""))
                if stream is not None and stream.pins.pop(req_id, None) is not None:
                    stream.waiting.discard(req_id)
                    self._drop_unpinned(self._req_stream[req_id], stream)

    def record_retrieval(self, req_id: str, report: dict[str, Any]) -> None:
        """Keep a question's retrieval report (pages per layer) until its request is released."""
        with self._lock:
            self._retrieval_reports[req_id] = {**self._retrieval_reports.get(req_id, {}), **report}
            while len(self._retrieval_reports) > MAX_UNCLAIMED_REPORTS:
                self._retrieval_reports.popitem(last=False)
            stream = self._streams.get(self._req_stream.get(req_id, ""))
            if stream is not None:
                stream.retrievals += 1
                stream.retrieval_seconds += report["seconds"]

    def take_retrieval_reports(self, req_ids: list[str]) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {r: self._retrieval_reports.pop(r) for r in req_ids if r in self._retrieval_reports}

    def has_failed(self, req_id: str) -> bool:
        """Whether the request, or the stream of a request not yet released, failed (see `take_failure`)."""
        with self._lock:
            if req_id in self._request_failures:
                return True
        stream = self._streams.get(self._req_stream.get(req_id, ""))
        return stream is not None and stream.failure is not None

    def take_failure(self, req_id: str) -> tuple[str, bool] | None:
        """Why a request failed and whether it is to be re-asked (reported once: the front end asks as it
        releases the request; the engine's own release of a finished request may come first), or why the
        stream of a request not yet released did."""
        with self._lock:
            failure = self._request_failures.pop(req_id, None)
        if failure is not None:
            return failure
        stream = self._streams.get(self._req_stream.get(req_id, ""))
        return (stream.failure, False) if stream is not None and stream.failure is not None else None

    def release(self, req_ids: list[str]) -> set[str]:
        """Unpin finished (or abandoned) requests; returns the streams touched."""
        touched = set()
        with self._lock:
            for req_id in req_ids:
                self._sink_chunks.pop(req_id, None)
                self._ran.discard(req_id)
                stream_id = self._req_stream.pop(req_id, None)
                stream = self._streams.get(stream_id) if stream_id else None
                if stream is not None:
                    stream.pins.pop(req_id, None)
                    self._drop_unpinned(stream_id, stream)
                    touched.add(stream_id)
        return touched

    # ---- writes ----------------------------------------------------------------------------------------
    def commit(self, stream_id: str, memory: StreamMemory, req_id: str | None = None) -> None:
        """Make `memory` (built by clip or sinks request `req_id`) the latest version. The clip's pin goes,
        and so do those of questions still waiting for their first step: they re-pin then (`question_snapshot`),
        so the stream keeps one version."""
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None or stream.closed:
                return  # closed while its clip was in flight: drop the result
            latest = stream.latest
            if latest is not None and memory.version <= latest.version:
                raise RuntimeError(f"stream {stream_id!r}: clip built on version {memory.version - 1} but "
                                   f"version {latest.version} exists (clips of a stream must be sequential)")
            stream.versions[memory.version] = memory
            stream.last_use = time.time()
            for pinned in [*stream.waiting, req_id]:
                stream.pins.pop(pinned, None)
            stream.waiting.clear()
            stream.drop_unpinned()

    # ---- reporting -------------------------------------------------------------------------------------
    def stats(self, stream_id: str) -> dict[str, Any]:
        stream = self._get(stream_id)
        latest = stream.latest
        stats = latest.stats() if latest is not None else {"version": 0, "bytes": 0}
        stats["bytes_all_versions"] = held_bytes(stream.versions.values())  # versions share tensors
        stats["last_use"] = stream.last_use
        stats["retrievals"] = stream.retrievals
        stats["retrieval_seconds_total"] = stream.retrieval_seconds
        stats["retrieval_ms_mean"] = 1000 * stream.retrieval_seconds / stream.retrievals if stream.retrievals else 0.0
        return stats

    def total_bytes(self) -> int:
        with self._lock:
            return held_bytes(m for s in self._streams.values() for m in s.versions.values())

    def stream_ids(self) -> list[str]:
        """Open streams (closed ones whose last requests are still in the engine are not listed)."""
        return [stream_id for stream_id, stream in self._streams.items() if not stream.closed]

    def _drop_unpinned(self, stream_id: str, stream: _Stream) -> None:
        """Drop unpinned versions; a closed stream leaves the store with its last pin (lock held)."""
        stream.drop_unpinned()
        if stream.closed and not stream.pins:
            del self._streams[stream_id]

    def _get(self, stream_id: str) -> _Stream:
        try:
            return self._streams[stream_id]
        except KeyError:
            raise StreamNotFound(f"no stream {stream_id!r} on this worker") from None
