"""Prometheus metrics of the stream server, exported on vLLM's own `/metrics` (the default registry).

Metric objects are process-wide (prometheus_client refuses a second registration of one name), so they
are created once per process, whatever number of services a process builds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class StreamMetrics:
    streams: Gauge
    store_bytes: Gauge
    store_reserved_bytes: Gauge
    frames_received: Counter
    frames_dropped: Counter
    frames_ingested: Counter
    clips_encoded: Counter
    ingest_lag_frames: Gauge
    ingest_lag_seconds: Gauge
    questions: Counter
    question_ttft: Histogram
    pages_retrieved: Counter
    streams_expired: Counter
    rejected: Counter


@functools.cache
def stream_metrics() -> StreamMetrics:
    return StreamMetrics(
        streams=Gauge("livevlm_streams", "Live video streams held by this server"),
        store_bytes=Gauge("livevlm_store_bytes", "Bytes of stream memory (all snapshots) in the session store"),
        store_reserved_bytes=Gauge("livevlm_store_reserved_bytes",
                                   "Store bytes reserved by admitted streams (what admission checks)"),
        frames_received=Counter("livevlm_frames_received", "Frames accepted from clients"),
        frames_dropped=Counter("livevlm_frames_dropped", "Pending frames dropped by the drop_oldest backpressure policy"),
        frames_ingested=Counter("livevlm_frames_ingested", "Frames encoded into stream memory"),
        clips_encoded=Counter("livevlm_clips_encoded", "Clip prefills completed"),
        ingest_lag_frames=Gauge("livevlm_ingest_lag_frames", "Frames received but not yet encoded, all streams"),
        ingest_lag_seconds=Gauge("livevlm_ingest_lag_seconds", "Age of the oldest frame waiting to be encoded"),
        questions=Counter("livevlm_questions", "Questions answered from streams"),
        question_ttft=Histogram("livevlm_question_ttft_seconds", "Time to first token of stream questions",
                                buckets=TTFT_BUCKETS),
        pages_retrieved=Counter("livevlm_pages_retrieved", "Long-term pages read by questions, summed over layers"),
        streams_expired=Counter("livevlm_streams_expired", "Streams closed after their idle TTL"),
        rejected=Counter("livevlm_requests_rejected", "Requests refused by a server limit", ["reason"]),
    )
