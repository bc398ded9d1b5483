"""Stream routes (`/v1/video/streams...`), the websocket, and chat completions answered from a stream."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from vllm_livevlm.serving import media
from vllm_livevlm.serving.errors import APIError, error_response
from vllm_livevlm.serving.service import StreamService
from vllm_livevlm.streams import Answer, LiveStream, StreamClosed

router = APIRouter()


class CreateStreamRequest(BaseModel):
    config: dict[str, Any] | None = Field(default=None, description="LiveVLM knob overrides for this stream")
    system_prompt: str | None = None
    pending_policy: Literal["reject", "drop_oldest"] | None = Field(
        default=None, description="when frames arrive faster than they are encoded: refuse them with 429 "
                                  "(reject) or drop the oldest pending frames; default: the server's")


class FramesJSON(BaseModel):
    frames: list[str] | None = Field(default=None, description="base64 JPEG/PNG images (data URLs allowed)")
    video: str | None = Field(default=None, description="base64 mp4/webm file")
    timestamps: list[float] | None = None


TOKEN_HEADER = "X-Stream-Token"


def stream_token(request: Request | WebSocket) -> str | None:
    """The owner token a request presents: the `X-Stream-Token` header, or `?token=` (websocket clients
    that cannot set headers)."""
    return request.headers.get(TOKEN_HEADER) or request.query_params.get("token")


def service(request: Request | WebSocket) -> StreamService:
    svc = getattr(request.app.state, "livevlm", None)
    if svc is None:
        raise APIError(503, "LiveVLM streams are not available on this server (no engine)")
    return svc


def _guard(handler):
    """Turn `APIError` (and a closed stream) into OpenAI-format error responses."""
    import functools

    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except APIError as e:
            return e.response()
        except StreamClosed as e:
            return error_response(404, str(e), "stream_id")
    return wrapper


# ---- streams ---------------------------------------------------------------------------------------------
@router.post("/v1/video/streams")
@_guard
async def create_stream(body: CreateStreamRequest, raw_request: Request):
    """Create a stream. The response's `token` is the stream's owner token, shown only here: every later
    request for the stream must send it in the `X-Stream-Token` header."""
    svc = service(raw_request)
    stream, token = await svc.create(body.config, body.system_prompt, body.pending_policy)
    return JSONResponse({**svc.describe(stream), "token": token})


@router.get("/v1/video/streams")
@_guard
async def list_streams(raw_request: Request):
    """The streams whose owner token(s) the request presents (comma-separated in `X-Stream-Token`)."""
    svc = service(raw_request)
    tokens = [t.strip() for t in (stream_token(raw_request) or "").split(",")]
    return JSONResponse({"object": "list", "data": [svc.describe(s) for s in svc.owned(tokens)]})


@router.get("/v1/video/engine")
@_guard
async def engine_load(raw_request: Request):
    """The replica's load (live streams, store bytes, free KV blocks): what a router places streams by."""
    svc = service(raw_request)
    return JSONResponse({"object": "video.engine", **await svc.engine_load()})


@router.get("/v1/video/streams/{stream_id}")
@_guard
async def get_stream(stream_id: str, raw_request: Request):
    svc = service(raw_request)
    stream = svc.get(stream_id, stream_token(raw_request))
    return JSONResponse({**svc.describe(stream), "stats": await stream.stats()})


@router.delete("/v1/video/streams/{stream_id}")
@_guard
async def delete_stream(stream_id: str, raw_request: Request):
    freed = await service(raw_request).delete(stream_id, stream_token(raw_request))
    return JSONResponse({"id": stream_id, "object": "video.stream.deleted", "deleted": True, "bytes_freed": freed})


@router.post("/v1/video/streams/{stream_id}/frames",
             openapi_extra={"requestBody": {"content": {
                 "multipart/form-data": {"schema": {"type": "object", "properties": {
                     "frames": {"type": "array", "items": {"type": "string", "format": "binary"}},
                     "timestamps": {"type": "string", "description": "JSON list of seconds"}}}},
                 "application/json": {"schema": FramesJSON.model_json_schema()},
                 "video/mp4": {"schema": {"type": "string", "format": "binary"}},
                 "video/webm": {"schema": {"type": "string", "format": "binary"}}}}})
@_guard
async def push_frames(stream_id: str, raw_request: Request, wait: bool = False):
    """Push frames: multipart JPEG/PNG (or video) files, JSON with base64 images or video, or a raw video
    body. Encoding runs in the background; `?wait=true` returns once complete clips are encoded."""
    svc = service(raw_request)
    token = stream_token(raw_request)
    stream = svc.get(stream_id, token)
    frames, timestamps = await _read_frames(raw_request, svc)
    accepted, dropped = svc.push(stream, frames, timestamps)
    if wait:
        await svc.wait_encoded(stream, token)
    return JSONResponse({"frames_accepted": accepted, "frames_dropped": dropped,
                         "clips_encoded": stream.clips_encoded, "frames_encoded": stream.frames_encoded,
                         "pending_frames": stream.pending_frames})


async def _read_frames(raw_request: Request, svc: StreamService) -> tuple[np.ndarray, list[float] | None]:
    limits = svc.limits
    declared = int(raw_request.headers.get("content-length") or 0)
    if declared > limits.max_upload_bytes:
        raise APIError(413, f"upload of {declared} bytes exceeds the limit of {limits.max_upload_bytes}")
    content_type = (raw_request.headers.get("content-type") or "").split(";")[0].strip().lower()
    frames: list[np.ndarray] = []
    timestamps = None
    if content_type == "multipart/form-data":
        form = await raw_request.form(max_files=limits.max_frames_per_request + 1)
        for key, value in form.multi_items():
            if key == "timestamps" and isinstance(value, str):
                timestamps = _timestamps(value)
            elif hasattr(value, "read"):
                data = await value.read()
                name = f"file {value.filename or key!r}"
                if media.is_video(value.content_type, value.filename):
                    frames.extend(media.decode_video(data, name, limits.max_frames_per_request))
                else:
                    frames.append(media.decode_image(data, name))
            _check_count(len(frames), limits.max_frames_per_request)
    elif content_type == "application/json":
        try:
            body = FramesJSON.model_validate(await raw_request.json())
        except Exception as e:
            raise APIError(400, f"invalid JSON body: {e}", "frames") from None
        if body.frames is not None:
            _check_count(len(body.frames), limits.max_frames_per_request)
            frames = [media.decode_image(media.decode_base64(f, f"frames[{i}]"), f"frames[{i}]")
                      for i, f in enumerate(body.frames)]
        if body.video is not None:
            frames.extend(media.decode_video(media.decode_base64(body.video, "video"), "video",
                                             limits.max_frames_per_request))
        timestamps = body.timestamps
    elif media.is_video(content_type, None):
        frames = list(media.decode_video(await raw_request.body(), "the request body", limits.max_frames_per_request))
    else:
        raise APIError(415, f"unsupported content type {content_type or 'none'!r}: send multipart/form-data "
                            "(JPEG/PNG or video files), application/json (base64) or video/mp4|webm")
    _check_count(len(frames), limits.max_frames_per_request)
    if not frames:
        raise APIError(400, "the request carries no frames", "frames")
    shapes = {f.shape for f in frames}
    largest = max(max(s[0], s[1]) for s in shapes)
    if largest > limits.max_frame_side:
        raise APIError(413, f"frames of {largest} pixels on a side exceed the limit of {limits.max_frame_side}",
                       "frames")
    if len(shapes) > 1:
        raise APIError(422, f"frames of one request must share one size, got {sorted(s[:2] for s in shapes)}",
                       "frames")
    return np.stack(frames), timestamps


def _check_count(count: int, limit: int) -> None:
    if count > limit:
        raise APIError(413, f"more than {limit} frames in one request (the per-request limit)", "frames")


def _timestamps(text: str) -> list[float]:
    try:
        values = json.loads(text)
        return [float(v) for v in values]
    except (ValueError, TypeError):
        raise APIError(400, "timestamps must be a JSON list of numbers", "timestamps") from None


# ---- chat completions answered from a stream ----------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(raw_request: Request):
    """Stock vLLM chat completions, except that a request naming a stream (`session_id` or the
    `X-Session-ID` header) with text-only messages is answered from that stream's memory."""
    from vllm.entrypoints.generate.base.serving import GenerateBaseServing
    from vllm.entrypoints.openai.chat_completion.api_router import create_chat_completion
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    try:
        body = await raw_request.json()
    except ValueError:
        return error_response(400, "the request body is not valid JSON")
    try:
        request = ChatCompletionRequest.model_validate(body)
    except Exception as e:
        return error_response(400, f"invalid chat completion request: {e}", "messages")
    stream_id = GenerateBaseServing._get_session_id(request, raw_request)
    if not stream_id:
        return await create_chat_completion(request=request, raw_request=raw_request)
    try:
        svc = service(raw_request)
        stream = svc.get(stream_id, stream_token(raw_request))
        question = _question(request)
        sampling = _sampling_params(request)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if request.stream:
            return StreamingResponse(_sse(svc, stream, question, sampling, completion_id, request),
                                     media_type="text/event-stream")
        answer = await svc.ask(stream, question, sampling)
        return JSONResponse(_completion(svc, stream, answer, completion_id))
    except APIError as e:
        return e.response()
    except StreamClosed as e:
        return error_response(404, str(e), "session_id")
    except ValueError as e:
        return error_response(400, str(e), "messages")


def _question(request) -> str:
    if not request.messages:
        raise APIError(400, "messages must hold at least one user message", "messages")
    for message in request.messages:
        content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
        if content is not None and not isinstance(content, str):
            parts = content if isinstance(content, list) else [content]
            if any((p.get("type") if isinstance(p, dict) else None) != "text" for p in parts):
                raise APIError(400, "a stream answers text-only messages; send frames to "
                                    "/v1/video/streams/{id}/frames", "messages")
    users = [m for m in request.messages if (m.get("role") if isinstance(m, dict) else None) == "user"]
    if not users:
        raise APIError(400, "messages must hold at least one user message", "messages")
    content = users[-1].get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content)
    if not isinstance(content, str) or not content.strip():
        raise APIError(400, "the last user message is empty", "messages")
    return content


def _sampling_params(request):
    from vllm import SamplingParams

    if (request.n or 1) != 1:
        raise APIError(400, "a stream answers with n=1 only", "n")
    max_tokens = request.max_completion_tokens or request.max_tokens or 256
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p, seed=request.seed,
        stop=request.stop or None, ignore_eos=bool(getattr(request, "ignore_eos", False)))


def _usage(answer: Answer) -> dict[str, Any]:
    completion = len(answer.token_ids)
    return {"prompt_tokens": answer.prompt_tokens_computed, "completion_tokens": completion,
            "total_tokens": answer.prompt_tokens_computed + completion}


def _livevlm_info(stream: LiveStream, answer: Answer) -> dict[str, Any]:
    return {"stream_id": stream.id, "frames_covered": answer.frames_covered,
            "context_tokens": answer.prompt_tokens - answer.prompt_tokens_computed, "timings": answer.timings}


def _completion(svc: StreamService, stream: LiveStream, answer: Answer, completion_id: str) -> dict[str, Any]:
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": svc.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": answer.finish_reason or "stop", "logprobs": None}],
            "usage": _usage(answer), "livevlm": _livevlm_info(stream, answer)}


async def _sse(svc: StreamService, stream: LiveStream, question: str, sampling, completion_id: str, request):
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        data = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": svc.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(data)}\n\n"

    queue: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(svc.ask(stream, question, sampling, on_delta=queue.put_nowait))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    yield chunk({"role": "assistant", "content": ""})
    try:
        while (delta := await queue.get()) is not None:
            yield chunk({"content": delta})
        try:
            answer = task.result()
        except (APIError, StreamClosed, ValueError) as e:
            status = e.status if isinstance(e, APIError) else 400
            yield f"data: {json.dumps({'error': {'message': str(e), 'code': status}})}\n\n"
            return
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        yield chunk({}, answer.finish_reason or "stop", livevlm=_livevlm_info(stream, answer),
                    **({"usage": _usage(answer)} if include_usage else {}))
        yield "data: [DONE]\n\n"
    finally:
        if not task.done():
            task.cancel()


# ---- websocket for live cameras ------------------------------------------------------------------------------
@router.websocket("/v1/video/streams/{stream_id}/ws")
async def stream_socket(websocket: WebSocket, stream_id: str):
    """Binary messages are JPEG/PNG frames; a text message `{"type": "question", "question": ...,
    "max_tokens": 64}` is answered with `answer.delta` messages and an `answer.done` message."""
    from vllm import SamplingParams

    await websocket.accept()
    try:
        svc = service(websocket)
        stream = svc.get(stream_id, stream_token(websocket))
    except APIError as e:
        await websocket.send_json({"type": "error", "error": {"message": e.message, "code": e.status}})
        await websocket.close(code=4000 + e.status)  # 4403, 4404, 4410...
        return
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            try:
                stream.check_open()
                if message.get("bytes") is not None:
                    frame = media.decode_image(message["bytes"], "frame")
                    if max(frame.shape[:2]) > svc.limits.max_frame_side:
                        raise APIError(413, f"frame exceeds {svc.limits.max_frame_side} pixels on a side")
                    _, dropped = svc.push(stream, frame[None])
                    await websocket.send_json({"type": "frames.accepted", "pending_frames": stream.pending_frames,
                                               "frames_dropped": dropped, "clips_encoded": stream.clips_encoded})
                    continue
                request = json.loads(message.get("text") or "{}")
                if not isinstance(request, dict) or request.get("type") != "question":
                    raise APIError(400, "text messages must be {\"type\": \"question\", \"question\": ...}")
                sampling = SamplingParams(max_tokens=int(request.get("max_tokens", 64)),
                                          temperature=float(request.get("temperature", 0.0)))
                deltas: asyncio.Queue = asyncio.Queue()
                task = asyncio.create_task(svc.ask(stream, str(request.get("question", "")), sampling,
                                                   on_delta=deltas.put_nowait))
                task.add_done_callback(lambda _: deltas.put_nowait(None))
                try:
                    while (delta := await deltas.get()) is not None:
                        await websocket.send_json({"type": "answer.delta", "delta": delta})
                finally:
                    if not task.done():  # the client went away mid-answer: stop decoding for it
                        task.cancel()
                answer = task.result()
                await websocket.send_json({"type": "answer.done", "text": answer.text,
                                           "frames_covered": answer.frames_covered, "timings": answer.timings})
            except (APIError, ValueError, TypeError, StreamClosed) as e:
                status = e.status if isinstance(e, APIError) else 404 if isinstance(e, StreamClosed) else 400
                await websocket.send_json({"type": "error", "error": {"message": str(e), "code": status}})
    except WebSocketDisconnect:
        pass


def attach(app: FastAPI) -> None:
    app.include_router(router)
