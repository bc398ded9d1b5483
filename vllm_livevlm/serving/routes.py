"""Stream routes (`/v1/video/streams...`), the websocket, and chat completions answered from a stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, StrictFloat

from vllm_livevlm.serving import media, upload
from vllm_livevlm.log import get_logger
from vllm_livevlm.serving.errors import APIError, error_body, error_response
from vllm_livevlm.serving.service import ServerLimits, StreamService
from vllm_livevlm.serving.socket_auth import SUBPROTOCOL
from vllm_livevlm.streams import Answer, LiveStream, StreamClosed

logger = get_logger(__name__)
router = APIRouter()
T = TypeVar("T")


class CreateStreamRequest(BaseModel):
    config: dict[str, Any] | None = Field(default=None, description="LiveVLM knob overrides for this stream")
    system_prompt: str | None = None
    pending_policy: Literal["reject", "drop_oldest"] | None = Field(
        default=None, description="when frames arrive faster than they are encoded: refuse them with 429 "
                                  "(reject) or drop the oldest pending frames; default: the server's")


class FramesJSON(BaseModel):
    frames: list[str] | None = Field(default=None, description="base64 JPEG/PNG images (data URLs allowed)")
    video: str | None = Field(default=None, description="base64 mp4/webm file")
    timestamps: list[StrictFloat] | None = Field(default=None, description="seconds on the stream clock, one per "
                                                  "frame (the video's frames included), never going back")


TOKEN_HEADER = "X-Stream-Token"


def stream_token(request: Request | WebSocket) -> str | None:
    """The owner token a request presents: the `X-Stream-Token` header (a browser's websocket sends it as the
    `livevlm.token.<token>` subprotocol, which `socket_auth` moves there), or `?token=` (kept for old
    clients; it is redacted from the log, but URLs travel through proxies and histories: prefer the header)."""
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
    side = raw_request.app.state.livevlm_decoder.processor_side  # what the console downscales frames to
    return JSONResponse({"object": "video.engine", "image_size": side, **await svc.engine_load()})


@router.get("/v1/video/streams/{stream_id}")
@_guard
async def get_stream(stream_id: str, raw_request: Request):
    svc = service(raw_request)
    stream = svc.get(stream_id, stream_token(raw_request))
    return JSONResponse({**svc.describe(stream), "stats": {**await stream.stats(), **svc.ingest_status(stream)}})


@router.delete("/v1/video/streams/{stream_id}")
@_guard
async def delete_stream(stream_id: str, raw_request: Request):
    freed = await service(raw_request).delete(stream_id, stream_token(raw_request))
    return JSONResponse({"id": stream_id, "object": "video.stream.deleted", "deleted": True, "bytes_freed": freed})


# ---- portable streams (`vllm_livevlm.portable`) ------------------------------------------------------------
@router.get("/v1/video/streams/{stream_id}/export")
@_guard
async def export_stream(stream_id: str, raw_request: Request):
    """The stream as a stream file (safetensors + LiveVLM header, `docs/stream-format.md`): its memory, state
    and pending frames, for `POST /v1/video/streams/import` on this or another server of the same model."""
    svc = service(raw_request)
    stream = svc.get(stream_id, stream_token(raw_request))
    data = await svc.export_stream(stream)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", stream.id)
    chunks = (memoryview(data)[i:i + 2**20] for i in range(0, len(data), 2**20))
    return StreamingResponse(chunks, media_type="application/octet-stream",
                             headers={"Content-Length": str(len(data)),
                                      "Content-Disposition": f'attachment; filename="{name}.livevlm"'})


@router.post("/v1/video/streams/import",
             openapi_extra={"requestBody": {"content": {
                 "multipart/form-data": {"schema": {"type": "object", "properties": {
                     "file": {"type": "string", "format": "binary"}}}},
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
@_guard
async def import_stream(raw_request: Request):
    """Create a stream from a stream file (multipart, one file, or a raw `application/octet-stream` body; at
    most `max_stream_file_bytes`) with the memory it holds and a new id and owner token (in the response,
    as for a created stream). A bad file is a 400 naming the reason."""
    svc = service(raw_request)
    with svc.import_slot():
        stream, token = await svc.import_stream(await _read_stream_file(raw_request, svc.limits.max_stream_file_bytes))
    return JSONResponse({**svc.describe(stream), "token": token})


async def _read_stream_file(raw_request: Request, limit: int) -> bytes:
    """The stream file of an import request, its body counted as it arrives (`max_stream_file_bytes`)."""
    content_type = (raw_request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if content_type == "application/octet-stream":
        return await upload.read_body(raw_request, limit, "max_stream_file_bytes")
    if content_type != "multipart/form-data":
        raise APIError(415, f"unsupported content type {content_type or 'none'!r}: send the stream file as "
                            "multipart/form-data or application/octet-stream")
    form = await upload.read_form(raw_request, limit, 1, "max_stream_file_bytes")
    try:
        files = [value for _, value in form.multi_items() if not isinstance(value, str)]
        if not files:
            raise APIError(400, "the multipart body holds no file", "file")
        return await files[0].read()
    finally:
        await form.close()


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
    decoded, timestamps = await _read_frames(raw_request, svc, stream)
    pushed = svc.push(stream, decoded.frames, timestamps, decoded.offsets, decoded.sampled_out, decoded.until)
    if wait:
        await svc.wait_encoded(stream, token)
    return JSONResponse({"frames_accepted": pushed.accepted, "frames_sampled_out": pushed.sampled_out,
                         "frames_dropped": pushed.dropped, "clips_encoded": stream.clips_encoded,
                         "frames_encoded": stream.frames_encoded, "pending_frames": stream.pending_frames})


async def _read_frames(raw_request: Request, svc: StreamService,
                       stream: LiveStream) -> tuple[media.Decoded, list[Any] | None]:
    """The request's frames (with a single video's container times) and its `timestamps`, its body counted as
    it arrives (`max_upload_bytes`) and decoded on the decode pool (`media.FrameDecoder`: sizes checked before
    decoding, frames shrunk to the model's input). The stream checks the timestamps (`vllm_livevlm.clock`); a
    request that is one video without them is sampled to the stream's rate while it is decoded."""
    limits = svc.limits
    decoder: media.FrameDecoder = raw_request.app.state.livevlm_decoder
    content_type = (raw_request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await upload.read_form(raw_request, limits.max_upload_bytes, limits.max_frames_per_request + 1)
        try:
            uploads, timestamps = [], None
            for key, value in form.multi_items():
                if isinstance(value, str):
                    if key == "timestamps":
                        timestamps = _timestamps(value)
                    continue
                uploads.append(media.Upload(await value.read(), f"file {value.filename or key!r}",
                                            media.is_video(value.content_type, value.filename)))
        finally:
            await form.close()
        return await decoder.decode(uploads, None if timestamps is not None else stream.clock.video_sampler()), \
            timestamps
    if content_type == "application/json":
        return await decoder.run(_decode_json, decoder, await upload.read_body(raw_request, limits.max_upload_bytes),
                                 stream.clock.video_sampler())
    if media.is_video(content_type, None):
        body = await upload.read_body(raw_request, limits.max_upload_bytes)
        return await decoder.decode([media.Upload(body, "the request body", video=True)],
                                    stream.clock.video_sampler()), None
    raise APIError(415, f"unsupported content type {content_type or 'none'!r}: send multipart/form-data "
                        "(JPEG/PNG or video files), application/json (base64) or video/mp4|webm")


def _decode_json(decoder: media.FrameDecoder, body: bytes,
                 keep: Callable[[float], bool] | None) -> tuple[media.Decoded, list[float] | None]:
    """A `FramesJSON` body ⇒ frames and timestamps (on the decode pool: parsing and base64 cost CPU too); `keep`
    samples a body that is one video without timestamps."""
    try:
        frames = FramesJSON.model_validate(json.loads(body))
    except ValueError as e:  # JSON and validation errors
        raise APIError(400, f"invalid JSON body: {e}", "frames") from None
    uploads = [media.Upload(media.decode_base64(f, f"frames[{i}]"), f"frames[{i}]", video=False)
               for i, f in enumerate(frames.frames or [])]
    if frames.video is not None:
        uploads.append(media.Upload(media.decode_base64(frames.video, "video"), "video", video=True))
    return decoder.decode_now(uploads, keep if frames.timestamps is None else None), frames.timestamps


def _timestamps(text: str) -> list[Any]:
    """A multipart `timestamps` field: a JSON list (its values are checked by the stream's clock)."""
    try:
        values = json.loads(text)
    except (ValueError, RecursionError):
        values = None
    if not isinstance(values, list):
        raise APIError(400, "timestamps must be a JSON list of numbers (seconds)", "timestamps")
    return values


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
        sampling = _sampling_params(request, svc.limits)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if request.stream:
            return StreamingResponse(_sse(svc, stream, question, sampling, completion_id, request),
                                     media_type="text/event-stream")
        answer = await _unless_disconnected(raw_request, svc.ask(stream, question, sampling))
        return None if answer is None else JSONResponse(_completion(svc, stream, answer, completion_id))
    except Exception as e:
        return _failure(e).response()


def _failure(e: Exception) -> APIError:
    """What a client is told about an exception raised while answering: an `APIError` as it is, a closed
    stream 404, a bad value 400, anything else 500 (logged with its traceback)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, StreamClosed):
        return APIError(404, str(e), "session_id")
    if isinstance(e, (ValueError, TypeError)):
        return APIError(400, str(e), "messages")
    logger.error("LiveVLM: answering a question failed", exc_info=e)
    return APIError(500, f"the answer failed: {e}")


async def _unless_disconnected(raw_request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """`work`'s result, or None once the client has disconnected: then `work` is cancelled, so a question
    nobody waits for stops decoding (its engine request is aborted and its snapshot released)."""
    async def disconnected() -> None:
        while (await raw_request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()  # no-op once done
        watcher.cancel()
    return task.result() if task.done() else None


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


def _sampling_params(request, limits: ServerLimits):
    """A chat request's sampling for a stream's answer (vLLM's model has typed the fields; the values are
    checked by `_answer_sampling`)."""
    if (request.n or 1) != 1:
        raise APIError(400, "a stream answers with n=1 only", "n")
    budget = next((b for b in (request.max_completion_tokens, request.max_tokens) if b is not None),
                  min(256, limits.max_answer_tokens))
    return _answer_sampling(limits, budget, 1.0 if request.temperature is None else request.temperature,
                            top_p=1.0 if request.top_p is None else request.top_p, seed=request.seed,
                            stop=request.stop or None, ignore_eos=getattr(request, "ignore_eos", False))


def _answer_sampling(limits: ServerLimits, max_tokens: Any, temperature: Any, top_p: Any = 1.0,
                     seed: int | None = None, stop: str | list[str] | None = None, ignore_eos: Any = False):
    """Sampling parameters for a question, every client value checked first (400 naming the field), so
    that nothing a client sends reaches `SamplingParams` (or the engine) as an overflow, a NaN or a budget
    past `max_answer_tokens`."""
    from vllm import SamplingParams

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) \
            or not 1 <= max_tokens <= limits.max_answer_tokens:
        raise APIError(400, f"max_tokens must be an integer from 1 to {limits.max_answer_tokens} "
                            "(max_answer_tokens)", "max_tokens")
    if not number(temperature) or temperature < 0:
        raise APIError(400, "temperature must be a finite number >= 0", "temperature")
    if not number(top_p) or not 0 < top_p <= 1:
        raise APIError(400, "top_p must be a number in (0, 1]", "top_p")
    if not isinstance(ignore_eos, bool):
        raise APIError(400, "ignore_eos must be true or false", "ignore_eos")
    return SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), seed=seed,
                          stop=stop, ignore_eos=ignore_eos)


def _usage(answer: Answer) -> dict[str, Any]:
    completion = len(answer.token_ids)
    return {"prompt_tokens": answer.prompt_tokens_computed, "completion_tokens": completion,
            "total_tokens": answer.prompt_tokens_computed + completion}


def _retrieval_report(answer: Answer) -> dict[str, Any]:
    """What the question read: per layer, the long-term pages (their numbers, `[first, last]` frames and the
    `[first, last]` times of those frames in seconds on the stream clock), and the time of the last frame in
    memory (`covered_until`)."""
    return {"pages": {str(layer): [{"page": page, "frames": list(frames), "seconds": list(seconds)}
                                   for page, frames, seconds in zip(answer.retrieved_page_indices.get(layer, []),
                                                                    ranges, answer.retrieved_times.get(layer, []))]
                      for layer, ranges in sorted(answer.retrieved_pages.items())},
            "covered_until": answer.covered_until}


def _livevlm_info(stream: LiveStream, answer: Answer) -> dict[str, Any]:
    return {"stream_id": stream.id, "frames_covered": answer.frames_covered,
            "context_tokens": answer.prompt_tokens - answer.prompt_tokens_computed, "timings": answer.timings,
            "repinned_version": answer.repinned_version, "reasked": answer.reasked,
            "retrieval": _retrieval_report(answer)}


def _completion(svc: StreamService, stream: LiveStream, answer: Answer, completion_id: str) -> dict[str, Any]:
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": svc.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": answer.finish_reason or "stop", "logprobs": None}],
            "usage": _usage(answer), "livevlm": _livevlm_info(stream, answer)}


async def _answer_items(svc: StreamService, stream: LiveStream, question: str,
                        sampling) -> AsyncIterator[str | Answer]:
    """The answer's text deltas as they are decoded, then its `Answer`. Deleting the stream ends the answer
    (`StreamClosed`); closing the iterator early cancels the question, which aborts its engine request."""
    deltas: asyncio.Queue[str | None] = asyncio.Queue()
    task = asyncio.create_task(svc.ask(stream, question, sampling, on_delta=deltas.put_nowait))
    task.add_done_callback(lambda _: deltas.put_nowait(None))
    try:
        while (delta := await deltas.get()) is not None:
            stream.check_open()
            yield delta
        yield task.result()
    finally:
        if not task.done():
            task.cancel()


async def _sse(svc: StreamService, stream: LiveStream, question: str, sampling, completion_id: str,
               request) -> AsyncIterator[str]:
    """The answer as `chat.completion.chunk` events. Once the response has started its status cannot change,
    so any failure arrives as an OpenAI error event followed by `[DONE]`, never as a cut stream."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        data = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": svc.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(data)}\n\n"

    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    yield chunk({"role": "assistant", "content": ""})
    try:
        async with contextlib.aclosing(_answer_items(svc, stream, question, sampling)) as items:
            async for item in items:
                if isinstance(item, str):
                    yield chunk({"content": item})
                else:
                    yield chunk({}, item.finish_reason or "stop", livevlm=_livevlm_info(stream, item),
                                **({"usage": _usage(item)} if include_usage else {}))
    except Exception as e:
        failure = _failure(e)
        yield f"data: {json.dumps(error_body(failure.status, failure.message, failure.param))}\n\n"
    yield "data: [DONE]\n\n"


# ---- websocket for live cameras ------------------------------------------------------------------------------
@router.websocket("/v1/video/streams/{stream_id}/ws")
async def stream_socket(websocket: WebSocket, stream_id: str):
    """Binary messages are JPEG/PNG frames; a text message `{"type": "question", "question": ...,
    "max_tokens": 64}` is answered with `answer.delta` messages and an `answer.done` message.

    Everything is checked before the handshake is accepted (the API key by vLLM's middleware, then the
    socket limit and the owner token here): a refusal is an HTTP error response, no message is exchanged."""
    state = websocket.app.state
    try:
        svc = service(websocket)
        if state.livevlm_websockets >= svc.limits.max_websockets:
            raise APIError(429, f"the server holds its maximum of {svc.limits.max_websockets} websockets "
                                "(max_websockets): close one or retry later")
        stream = svc.get(stream_id, stream_token(websocket))
    except APIError as e:
        await websocket.send_denial_response(e.response())
        return
    state.livevlm_websockets += 1
    try:
        offered = SUBPROTOCOL in websocket.scope.get("subprotocols", [])
        await websocket.accept(subprotocol=SUBPROTOCOL if offered else None)
        await _serve_socket(websocket, svc, stream)
    except WebSocketDisconnect:
        pass
    finally:
        state.livevlm_websockets -= 1


async def _serve_socket(websocket: WebSocket, svc: StreamService, stream: LiveStream) -> None:
    """One reader for the socket: frames are pushed as they arrive, also while an answer streams; a
    question runs as a task sending its deltas (a lock keeps messages whole). A question sent while the
    socket is answering one gets a 429 error message: one answer at a time per socket."""
    lock = asyncio.Lock()
    answering: asyncio.Task | None = None

    async def send(message: dict[str, Any]) -> None:
        async with lock:
            await websocket.send_json(message)

    async def send_error(e: Exception) -> None:
        failure = _failure(e)
        await send({"type": "error", **error_body(failure.status, failure.message, failure.param)})

    try:
        while (message := await websocket.receive())["type"] != "websocket.disconnect":
            try:
                stream.check_open()
                if message.get("bytes") is not None:
                    arrived = time.time()  # a camera's frame is stamped when it arrives, before decoding
                    decoder: media.FrameDecoder = websocket.app.state.livevlm_decoder
                    decoded = await decoder.decode([media.Upload(message["bytes"], "frame", video=False)])
                    stamp = stream.clock.arrival(arrived)
                    pushed = svc.push(stream, decoded.frames, [stamp])
                    await send({"type": "frames.accepted", "timestamp": stamp, "pending_frames": stream.pending_frames,
                                "frames_sampled_out": pushed.sampled_out, "frames_dropped": pushed.dropped,
                                "clips_encoded": stream.clips_encoded})
                    continue
                question, sampling = _socket_question(message.get("text"), svc.limits)
                if answering is not None and not answering.done():
                    raise APIError(429, "this socket is answering a question: send the next one after its "
                                        "answer.done (or open another socket)", "question")
                answering = asyncio.create_task(_answer_on_socket(send, send_error, svc, stream, question, sampling))
            except Exception as e:
                await send_error(e)
    finally:
        if answering is not None:  # the client went away mid-answer: stop decoding for it
            answering.cancel()
            await asyncio.gather(answering, return_exceptions=True)


def _socket_question(text: str | None, limits: ServerLimits) -> tuple[str, Any]:
    """A question message ⇒ (question, sampling parameters); 400 for anything else (junk, JSON nested past
    the parser's recursion, values of the wrong type or range), never a 500."""
    try:
        request = json.loads(text or "{}")
    except (ValueError, RecursionError):
        raise APIError(400, "text messages must be JSON objects", "type") from None
    if not isinstance(request, dict) or request.get("type") != "question":
        raise APIError(400, "text messages must be {\"type\": \"question\", \"question\": ...}", "type")
    question = request.get("question")
    if not isinstance(question, str):
        raise APIError(400, "question must be a string", "question")
    return question, _answer_sampling(limits, request.get("max_tokens", min(64, limits.max_answer_tokens)),
                                      request.get("temperature", 0.0), ignore_eos=request.get("ignore_eos", False))


async def _answer_on_socket(send: Callable[[dict[str, Any]], Awaitable[None]],
                            send_error: Callable[[Exception], Awaitable[None]], svc: StreamService,
                            stream: LiveStream, question: str, sampling) -> None:
    try:
        async with contextlib.aclosing(_answer_items(svc, stream, question, sampling)) as items:
            async for item in items:
                if isinstance(item, str):
                    await send({"type": "answer.delta", "delta": item})
                else:
                    await send({"type": "answer.done", "text": item.text, "frames_covered": item.frames_covered,
                                "timings": item.timings, "retrieval": _retrieval_report(item)})
    except Exception as e:
        await send_error(e)


def attach(app: FastAPI) -> None:
    app.include_router(router)
