"""Who answers the questions: a LiveVLM stream in this process, or one on a running server.

An `Answerer` opens one `Session` per video; the harness pushes the video's frames into it up to each
question's time and asks. Tests inject scripted answerers through the same interface.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass
class Reply:
    text: str
    frames_covered: int  # frames the answer was computed over


class Session(Protocol):
    def push(self, frames: np.ndarray) -> None: ...

    def ask(self, prompt: str, max_tokens: int) -> Reply: ...

    def close(self) -> None: ...


class Answerer(Protocol):
    def open(self) -> Session: ...

    def close(self) -> None: ...


class OfflineAnswerer:
    """LiveVLM streams on an engine started in this process (or a `LiveVLM` passed in)."""

    def __init__(self, engine: Any, stream_config: dict | None = None, owns_engine: bool = False):
        self.engine = engine
        self.stream_config = stream_config
        self.owns_engine = owns_engine

    @classmethod
    def start(cls, model: str, config: dict | str | None = None, **engine_args: Any) -> "OfflineAnswerer":
        from vllm_livevlm import LiveVLM

        return cls(LiveVLM(model, config, **engine_args), owns_engine=True)

    def open(self) -> "OfflineSession":
        return OfflineSession(self.engine.open_stream(self.stream_config))

    def close(self) -> None:
        if self.owns_engine:
            self.engine.shutdown()


class OfflineSession:
    def __init__(self, stream: Any):
        self.stream = stream

    def push(self, frames: np.ndarray) -> None:
        self.stream.append(frames)

    def ask(self, prompt: str, max_tokens: int) -> Reply:
        from vllm import SamplingParams

        answer = self.stream.ask(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        return Reply(answer.text, answer.frames_covered)

    def close(self) -> None:
        self.stream.close()


class ServerAnswerer:
    """Streams on a running `vllm-livevlm serve`: frames are pushed as PNGs (lossless) with `?wait=true`, questions
    go to `/v1/chat/completions` with the stream's `session_id`. Sends `Authorization: Bearer <api key>`
    when a key is given and the stream's `X-Stream-Token` when creation returned one."""

    def __init__(self, url: str, api_key: str | None = None, stream_config: dict | None = None,
                 frames_per_request: int = 32, timeout: float = 600.0):
        import httpx

        from vllm_livevlm.serving.keepalive import client_limits

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout,
                                  limits=client_limits())
        self.stream_config = stream_config or {}
        self.frames_per_request = frames_per_request
        models = _checked(self.client.get("/v1/models"))["data"]
        self.model = models[0]["id"]

    def open(self) -> "ServerSession":
        created = _checked(self.client.post("/v1/video/streams", json={"config": self.stream_config}))
        headers = {"X-Stream-Token": created["token"]} if created.get("token") else {}
        return ServerSession(self, created["id"], headers)

    def close(self) -> None:
        self.client.close()


class ServerSession:
    def __init__(self, owner: ServerAnswerer, stream_id: str, headers: dict[str, str]):
        self.owner = owner
        self.id = stream_id
        self.headers = headers

    def push(self, frames: np.ndarray) -> None:
        import cv2

        step = self.owner.frames_per_request
        for start in range(0, len(frames), step):
            encoded = [base64.b64encode(cv2.imencode(".png", cv2.cvtColor(f, cv2.COLOR_RGB2BGR))[1].tobytes()).decode()
                       for f in frames[start:start + step]]
            _checked(self.owner.client.post(f"/v1/video/streams/{self.id}/frames", params={"wait": "true"},
                                            json={"frames": encoded}, headers=self.headers))

    def ask(self, prompt: str, max_tokens: int) -> Reply:
        body = {"model": self.owner.model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "temperature": 0.0, "session_id": self.id}
        data = _checked(self.owner.client.post("/v1/chat/completions", json=body, headers=self.headers))
        return Reply(data["choices"][0]["message"]["content"] or "", int(data["livevlm"]["frames_covered"]))

    def close(self) -> None:
        self.owner.client.delete(f"/v1/video/streams/{self.id}", headers=self.headers)


def _checked(response: Any) -> dict:
    if response.status_code >= 400:
        raise RuntimeError(f"{response.request.method} {response.request.url} -> {response.status_code}: {response.text[:300]}")
    return response.json()
