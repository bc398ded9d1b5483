"""What a LiveVLM request tells the connector, carried in `kv_transfer_params["livevlm"]`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any


class RequestKind(str, Enum):
    SINKS = "sinks"        # the chat prefix of a new stream: its KV becomes the stream's sinks
    CLIP = "clip"          # P placeholder tokens + one video item: encoded into the stream's memory
    QUESTION = "question"  # P placeholder tokens + a question turn: answered from the memory


@dataclass(frozen=True)
class LiveVLMParams:
    stream_id: str
    kind: RequestKind
    version: int = 0          # memory snapshot the request reads (clip, question)
    context_tokens: int = 0   # P: leading placeholder tokens the connector fills
    frame_start: int = 0      # clip: stream index of its first frame
    num_frames: int = 0       # clip: frames in the clip
    request_id: str = ""      # the front end's id (vLLM may suffix its internal request ids): pin key

    KEY = "livevlm"

    def to_kv_transfer_params(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind.value
        return {self.KEY: data}

    @classmethod
    def from_request(cls, kv_transfer_params: dict[str, Any] | None) -> "LiveVLMParams | None":
        data = (kv_transfer_params or {}).get(cls.KEY)
        if data is None:
            return None
        return cls(**{**data, "kind": RequestKind(data["kind"])})
