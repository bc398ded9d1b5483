"""`StreamService`: the server's streams, their background ingestion and the server's limits."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, fields
from typing import Any

from vllm_livevlm.config import LiveVLMConfig
from vllm_livevlm.serving.errors import APIError
from vllm_livevlm.streams import LiveStream, StreamEngine

logger = logging.getLogger(__name__)

CONFIG_ENV = "VLLM_LIVEVLM_CONFIG"
LIMITS_ENV = "VLLM_LIVEVLM_LIMITS"


@dataclass(frozen=True)
class ServerLimits:
    """What one request or stream may ask of the server (`VLLM_LIVEVLM_LIMITS` JSON, or CLI flags)."""

    max_frames_per_request: int = 256
    max_upload_bytes: int = 64 * 1024 * 1024
    max_streams: int = 64
    max_clip_frames: int = 64

    @classmethod
    def from_env(cls) -> "ServerLimits":
        raw = os.environ.get(LIMITS_ENV)
        if not raw:
            return cls()
        data = json.loads(raw)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{LIMITS_ENV}: unknown limits {sorted(unknown)}")
        return cls(**data)


def config_from_env() -> LiveVLMConfig:
    raw = os.environ.get(CONFIG_ENV)
    return LiveVLMConfig.from_json(raw) if raw else LiveVLMConfig()


class StreamService:
    def __init__(self, core: StreamEngine, limits: ServerLimits, model_name: str):
        self.core = core
        self.limits = limits
        self.model_name = model_name
        self._ingest: dict[str, asyncio.Task] = {}
        self._ingest_errors: dict[str, BaseException] = {}

    async def create(self, config: dict[str, Any] | None, system_prompt: str | None) -> LiveStream:
        if len(self.core.streams) >= self.limits.max_streams:
            raise APIError(503, f"the server holds its maximum of {self.limits.max_streams} streams")
        if config is not None and not isinstance(config, dict):
            raise APIError(400, "config must be a JSON object of LiveVLM knobs", "config")
        try:
            resolved = self.core.resolve_config(config)
        except ValueError as e:  # LiveVLMConfigError included
            raise APIError(400, str(e), "config") from None
        if resolved.clip_frames > self.limits.max_clip_frames:
            raise APIError(400, f"clip_frames={resolved.clip_frames} exceeds the server limit of "
                                f"{self.limits.max_clip_frames}", "config")
        return await self.core.open_stream(resolved, system_prompt)

    def get(self, stream_id: str) -> LiveStream:
        stream = self.core.streams.get(stream_id)
        if stream is None:
            raise APIError(404, f"no video stream with id {stream_id!r}", "stream_id")
        error = self._ingest_errors.get(stream_id)
        if error is not None:
            raise APIError(500, f"stream {stream_id} failed while encoding: {error}")
        return stream

    def push(self, stream: LiveStream, frames: Any, timestamps: Any = None) -> int:
        """Accept frames and make sure the stream's ingestion task encodes them in the background."""
        try:
            accepted = stream.accept(frames, timestamps)
        except ValueError as e:  # FrameError included
            status = 422 if "frames of this stream are" in str(e) else 400
            raise APIError(status, str(e), "frames") from None
        task = self._ingest.get(stream.id)
        if task is None or task.done():
            self._ingest[stream.id] = asyncio.create_task(self._encode(stream))
        return accepted

    async def wait_encoded(self, stream: LiveStream) -> None:
        task = self._ingest.get(stream.id)
        if task is not None:
            await asyncio.shield(task)
        self.get(stream.id)  # raises if ingestion failed

    async def delete(self, stream_id: str) -> int:
        stream = self.get(stream_id)
        task = self._ingest.pop(stream_id, None)
        freed = await stream.close()
        if task is not None and not task.done():
            task.cancel()
        self._ingest_errors.pop(stream_id, None)
        return freed

    async def _encode(self, stream: LiveStream) -> None:
        try:
            await stream.encode_ready()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # reported on the stream's next request
            if not stream.closed:
                logger.exception("stream %s: encoding failed", stream.id)
                self._ingest_errors[stream.id] = e

    def describe(self, stream: LiveStream) -> dict[str, Any]:
        return {"id": stream.id, "object": "video.stream", "created": int(stream.created),
                "config": stream.config.to_dict()}
