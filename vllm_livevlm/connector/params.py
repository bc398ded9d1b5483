"""What a LiveVLM request tells the connector, carried in `kv_transfer_params["livevlm"]`, and how the engine
tells a request minted by our front end from a forged one.

vLLM copies a request's `kv_transfer_params` into the engine request, and clients can set that field (or
`vllm_xargs`) on stock routes. So the front end signs every LiveVLM request with an HMAC-SHA256 under a
per-engine secret (`SECRET_ENV`, created by the plugin's `register()` in the first process and inherited by
the engine core and workers); the scheduler-side connector accepts only requests whose signature checks.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

from vllm_livevlm.plugin import SECRET_ENV

MAX_ID_CHARS = 256


class RequestKind(str, Enum):
    SINKS = "sinks"        # the chat prefix of a new stream: its KV becomes the stream's sinks
    CLIP = "clip"          # P placeholder tokens + one video item: encoded into the stream's memory
    QUESTION = "question"  # P placeholder tokens + a question turn: answered from the memory


class InvalidLiveVLMRequest(ValueError):
    """A request carries `kv_transfer_params` that are not a well-formed request signed by our front end."""


def request_secret() -> bytes:
    """The engine's signing secret; missing means the plugin was not loaded, and nothing can be trusted."""
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        raise RuntimeError(f"{SECRET_ENV} is not set: the livevlm vLLM plugin (register()) must run before the "
                           "engine starts (it is loaded through the `vllm.general_plugins` entry point)")
    return secret.encode()


@dataclass(frozen=True)
class LiveVLMParams:
    stream_id: str
    kind: RequestKind
    version: int = 0          # memory snapshot the request reads (clip, question)
    context_tokens: int = 0   # P: leading placeholder tokens the connector fills
    frame_start: int = 0      # clip: stream index of its first frame
    num_frames: int = 0       # clip: frames in the clip
    request_id: str = ""      # the front end's id (vLLM may suffix its internal request ids): pin key
    context_extent: int = 0   # E: positions the context spans (multi-axis models, docs/positions.md); 0 on 1-D

    KEY = "livevlm"
    MAC = "mac"

    def signature(self, secret: bytes) -> str:
        message = json.dumps([self.stream_id, self.kind.value, self.version, self.context_tokens,
                              self.frame_start, self.num_frames, self.request_id, self.context_extent]).encode()
        return hmac.new(secret, message, hashlib.sha256).hexdigest()

    def to_kv_transfer_params(self, secret: bytes | None = None) -> dict[str, Any]:
        """The signed form the front end puts in `SamplingParams.extra_args["kv_transfer_params"]`."""
        data: dict[str, Any] = asdict(self)
        data["kind"] = self.kind.value
        data[self.MAC] = self.signature(request_secret() if secret is None else secret)
        return {self.KEY: data}

    @classmethod
    def from_request(cls, kv_transfer_params: Any, secret: bytes | None = None) -> "LiveVLMParams | None":
        """None for a plain request (no or empty `kv_transfer_params`); the verified params of a LiveVLM
        request; raises `InvalidLiveVLMRequest` for anything else (this engine knows no other transfer
        protocol, so any other content is foreign or forged)."""
        if kv_transfer_params is None or kv_transfer_params == {}:
            return None
        if not isinstance(kv_transfer_params, dict) or set(kv_transfer_params) != {cls.KEY}:
            raise InvalidLiveVLMRequest("kv_transfer_params are reserved for LiveVLM stream requests")
        data = kv_transfer_params[cls.KEY]
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names | {cls.MAC}:
            raise InvalidLiveVLMRequest(f"a LiveVLM request has exactly the fields {sorted(names | {cls.MAC})}")
        for name in ("stream_id", "request_id", cls.MAC):
            if not isinstance(data[name], str) or not 0 < len(data[name]) <= MAX_ID_CHARS:
                raise InvalidLiveVLMRequest(f"{name} must be a non-empty string of at most {MAX_ID_CHARS} chars")
        for name in ("version", "context_tokens", "frame_start", "num_frames", "context_extent"):
            if type(data[name]) is not int or data[name] < 0:
                raise InvalidLiveVLMRequest(f"{name} must be a non-negative integer")
        if data["kind"] not in {k.value for k in RequestKind}:
            raise InvalidLiveVLMRequest(f"unknown request kind {str(data['kind'])[:32]!r}")
        params = cls(**{n: data[n] for n in names if n != "kind"}, kind=RequestKind(data["kind"]))
        if not hmac.compare_digest(params.signature(request_secret() if secret is None else secret),
                                   data[cls.MAC]):
            raise InvalidLiveVLMRequest("the LiveVLM request is not signed by this server's front end")
        params.check_shape()
        return params

    def check_shape(self) -> None:
        """What each kind must look like (a signed request that breaks this is a front-end bug)."""
        if self.kind == RequestKind.SINKS and (self.context_tokens or self.num_frames or self.version
                                               or self.context_extent):
            raise InvalidLiveVLMRequest("a sinks request has no context, frames or version")
        if self.kind == RequestKind.CLIP and self.num_frames == 0:
            raise InvalidLiveVLMRequest("a clip request has at least one frame")
        if self.kind == RequestKind.QUESTION and self.num_frames:
            raise InvalidLiveVLMRequest("a question request carries no frames")
