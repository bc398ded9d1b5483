"""`StreamRouter`: the single server's HTTP API in front of N replicas, with stream affinity.

- `POST /v1/video/streams` places the new stream on the least-loaded live replica (live streams, then
  store bytes, from each replica's `GET /v1/video/engine`) and remembers which replica owns its id.
- Every request that names a stream (its routes, its websocket, chat completions with `session_id` or
  `X-Session-ID`) goes to the owner; a stream whose replica died answers 503 naming it, never an answer
  from another replica (that one does not hold the stream's memory).
- The other OpenAI routes (`/v1/models`, `/v1/completions`, `/v1/responses`, stock chat completions) and
  `/health` go to any live replica; no other path is forwarded (404).

`RouterGate` runs before any route, on the raw request: paths that are not plain (dot segments, empty
segments, percent-escapes, backslashes) or not one of those routes answer 404, a request without the API key
answers 401, and one that declares a body over `max_upload_bytes` answers 413, all before a byte of the body
is read; the body bytes that are read are counted as they arrive (chunked bodies too): 413 once over.
Requests are forwarded with method, path, query string, body (streamed, never held whole) and headers except
hop-by-hop ones (so `Authorization` and per-stream tokens work unchanged); responses come back with their
status and are streamed through (SSE chat completions included). Each replica has its own connection pool,
so one replica's long answers never hold the connections another needs; a full pool answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import Any

import httpx
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_livevlm.log import get_logger
from vllm_livevlm.serving.access import bearer_matches, key_digests
from vllm_livevlm.serving.boundary import TrustBoundary
from vllm_livevlm.serving.console import PAGE_PATHS
from vllm_livevlm.serving.errors import error_response
from vllm_livevlm.serving.keepalive import client_limits
from vllm_livevlm.serving.ray.replica import Replica
from vllm_livevlm.serving.socket_auth import SUBPROTOCOL, with_credential_headers

logger = get_logger(__name__)

# Headers that describe one connection, not the message (RFC 9110 7.6.1), plus those the next hop sets.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                         "transfer-encoding", "upgrade", "host", "content-length"})
_WEBSOCKET_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                                  "sec-websocket-accept", "sec-websocket-protocol"})
_RESPONSE_SET_BY_US = frozenset({"date", "server"})
_STREAM_PATH = "/v1/video/streams/{stream_id}"
_TOKEN_HEADER = "x-stream-token"
_OPEN_PATHS = frozenset({"/health"})  # answered without the API key (as vLLM's own server does)
_VIDEO_PREFIX = "/v1/video/"
_OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models")


@dataclass(frozen=True)
class RouterLimits:
    """What the router admits before a replica sees a request (`serve-ray --router-limits JSON`)."""

    max_upload_bytes: int = 64 * 1024 * 1024  # a request body, counted as it arrives (the replicas' default)
    connections_per_replica: int = 512        # open connections to one replica: each SSE answer and each
    #                                           `wait=true` push holds one for as long as it runs
    pool_timeout_seconds: float = 5.0         # waiting for a free connection to a replica, then 503
    connect_timeout_seconds: float = 5.0      # opening a connection to a replica (reads have no timeout:
    #                                           answers stream for as long as they generate)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"router limit {f.name} must be a positive number, got {value!r}")


def routable(raw_path: bytes) -> bool:
    """Whether the router forwards this path (as sent, before any decoding): plain ASCII segments (no `.`,
    `..`, empty segment, percent-escape or backslash, so a replica resolves it to exactly what we checked)
    under our routes, the OpenAI ones or `/health`, or one of the console's files."""
    try:
        path = raw_path.decode("ascii")
    except UnicodeDecodeError:
        return False
    if path in PAGE_PATHS:  # the console's files (a replica serves them)
        return True
    if not path.startswith("/") or "%" in path or "\\" in path:
        return False
    if any(segment in ("", ".", "..") for segment in path[1:].split("/")):
        return False
    return (path in _OPEN_PATHS or path.startswith(_VIDEO_PREFIX)
            or any(path == route or path.startswith(route + "/") for route in _OPENAI_ROUTES))


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class UploadTooLarge(Exception):
    """A request body grew past `max_upload_bytes` while it was read: the client gets a 413."""


class RouterGate:
    """ASGI middleware in front of every route: path, API key and declared size are checked on the raw
    request before any body byte is read, and the body is counted as the routes read it."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_upload_bytes: int):
        self.app = app
        self.key_digests = key_digests([api_key or ""])
        self.max_upload_bytes = max_upload_bytes

    def authorized(self, headers: Headers) -> bool:
        return not self.key_digests or bearer_matches(headers, self.key_digests)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":  # a browser's credentials come as subprotocols
            scope = with_credential_headers(scope)
        headers = Headers(scope=scope)
        raw_path = scope.get("raw_path") or scope["path"].encode()
        declared = headers.get("content-length", "0")
        if not routable(raw_path):
            await _refuse(scope, receive, send, 404, "not found")
        elif (raw_path.decode() not in _OPEN_PATHS | PAGE_PATHS and scope.get("method") != "OPTIONS"
              and not self.authorized(headers)):
            await _refuse(scope, receive, send, 401, "a valid API key is required (Authorization: Bearer KEY)")
        elif not declared.isdigit() or int(declared) > self.max_upload_bytes:
            await _refuse(scope, receive, send, 413, self.too_large())
        else:
            await self.counted(scope, receive, send)

    def too_large(self) -> str:
        return f"the request body is larger than the router's limit of {self.max_upload_bytes} bytes"

    async def counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app with a `receive` that raises `UploadTooLarge` as soon as the body read so far is over
        the limit (wherever the app reads it: a route, or a replica's upload streamed from it): 413."""
        read = 0
        responded = False

        async def receive_counted() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_upload_bytes:
                    raise UploadTooLarge(self.too_large())
            return message

        async def send_tracked(message: Message) -> None:
            nonlocal responded
            responded = True
            await send(message)

        try:
            await self.app(scope, receive_counted, send_tracked)
        except UploadTooLarge as e:
            if responded:
                raise
            await _refuse(scope, receive, send, 413, str(e))


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    """Answer without reading the body and close the connection after it, so the rest is never read. A
    websocket is refused during its handshake with the same HTTP answer."""
    response = error_response(status, message)
    response.headers["connection"] = "close"
    await response(scope, receive, send)


def _request_headers(headers: Any, drop: frozenset[str] = _HOP_BY_HOP) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if k.lower() not in drop]


def _relayed(response: Response, upstream: httpx.Response) -> Response:
    """`response` with the upstream's headers (repeated ones such as set-cookie kept)."""
    response.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in upstream.headers.multi_items()
                            if k.lower() not in _HOP_BY_HOP | _RESPONSE_SET_BY_US]
    return response


def _relay(upstream: httpx.Response) -> Response:
    """A response read in full, sent back as it came."""
    return _relayed(Response(upstream.content, status_code=upstream.status_code), upstream)


class ReplicaUnavailable(Exception):
    """The replica that must answer is dead or unreachable: the client gets a 503."""


class StreamRouter:
    def __init__(self, replicas: list[Replica], api_key: str | None = None,
                 limits: RouterLimits = RouterLimits()):
        if not replicas:
            raise ValueError("the router needs at least one replica")
        self.replicas = replicas
        self.api_key = api_key
        self.limits = limits
        self.owners: dict[str, Replica] = {}
        self.token_digests: dict[str, bytes] = {}  # stream id -> sha256 of its owner token (the engine view)
        self._creating = {r.index: 0 for r in replicas}  # stream creations in flight per replica
        self._round_robin = itertools.cycle(replicas)
        self._auth = [("authorization", f"Bearer {api_key}")] if api_key else []  # the router's own requests
        timeout = httpx.Timeout(None, connect=limits.connect_timeout_seconds, pool=limits.pool_timeout_seconds)
        self.clients = {r.index: httpx.AsyncClient(timeout=timeout, limits=client_limits(limits.connections_per_replica))
                        for r in replicas}

    # ---- choosing a replica ---------------------------------------------------------------------------------
    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    def any_live(self) -> Replica:
        for _ in self.replicas:
            replica = next(self._round_robin)
            if replica.alive:
                return replica
        raise ReplicaUnavailable("no LiveVLM replica is alive")

    async def load(self, replica: Replica) -> dict[str, Any] | None:
        """The replica's `GET /v1/video/engine` (None when it does not answer with 200)."""
        try:
            response = await self.clients[replica.index].get(
                f"{replica.url}/v1/video/engine", headers=self._auth,
                timeout=httpx.Timeout(10.0, pool=self.limits.pool_timeout_seconds))
        except httpx.PoolTimeout:
            return None
        except httpx.TransportError:
            await replica.check_alive()
            return None
        return response.json() if response.status_code == 200 else None

    async def place(self) -> Replica:
        """The least-loaded live replica: fewest live streams (counting creations in flight), then fewest
        store bytes, then the lowest index. A replica whose load is not readable counts its known streams."""
        live = self.live()
        loads = await asyncio.gather(*(self.load(r) for r in live))
        ranked = []
        for replica, load in zip(live, loads):
            if not replica.alive:
                continue
            if load is None:
                load = {"streams": sum(o is replica for o in self.owners.values()), "store_bytes": 0}
            ranked.append((load["streams"] + self._creating[replica.index], load["store_bytes"], replica.index,
                           replica))
        if not ranked:
            raise ReplicaUnavailable("no LiveVLM replica is alive to hold a new stream")
        return min(ranked, key=lambda item: item[:3])[3]

    def owner(self, stream_id: str) -> Replica | None:
        return self.owners.get(stream_id)

    @staticmethod
    def lost_message(stream_id: str, replica: Replica) -> str:
        return (f"video stream {stream_id!r} is lost: its replica {replica.index} ({replica.url}) died; "
                "create a new stream")

    def lost(self, stream_id: str, replica: Replica) -> JSONResponse:
        return error_response(503, self.lost_message(stream_id, replica), "stream_id")

    def busy_message(self, replica: Replica) -> str:
        return (f"replica {replica.index} is busy: all {self.limits.connections_per_replica} connections to it "
                "are in use; try again")

    @staticmethod
    def unknown(stream_id: str) -> JSONResponse:
        return error_response(404, f"no video stream with id {stream_id!r}", "stream_id")

    # ---- forwarding -----------------------------------------------------------------------------------------
    async def forward(self, request: Request, replica: Replica,
                      body: bytes | AsyncIterator[bytes] | None = None) -> Response:
        """Send the request to `replica` as it came (the body streamed as it arrives unless given) and stream
        the response back."""
        url = _upstream_url(replica, request)
        content = request.stream() if body is None else body
        headers = _request_headers(request.headers)
        if not isinstance(content, bytes) and "content-length" in request.headers:  # byte for byte: still true
            headers.append(("content-length", request.headers["content-length"]))
        client = self.clients[replica.index]
        upstream_request = client.build_request(request.method, url, headers=headers, content=content)
        try:
            upstream = await client.send(upstream_request, stream=True)
        except httpx.PoolTimeout:
            raise ReplicaUnavailable(self.busy_message(replica)) from None
        except httpx.TransportError as e:
            if not await replica.check_alive():
                raise ReplicaUnavailable(f"replica {replica.index} died") from None
            raise ReplicaUnavailable(f"replica {replica.index} ({replica.url}) is unreachable: {e}") from None
        return _relayed(StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code,
                                          background=BackgroundTask(upstream.aclose)), upstream)

    async def forward_to_stream(self, request: Request, stream_id: str, body: bytes | None = None) -> Response:
        replica = self.owner(stream_id)
        if replica is None:
            return self.unknown(stream_id)
        if not replica.alive:
            return self.lost(stream_id, replica)
        try:
            response = await self.forward(request, replica, body)
        except ReplicaUnavailable as e:
            return self.lost(stream_id, replica) if not replica.alive else error_response(503, str(e))
        if request.method == "DELETE" and response.status_code == 200:
            self.owners.pop(stream_id, None)
            self.token_digests.pop(stream_id, None)
        return response

    async def forward_anywhere(self, request: Request, body: bytes | None = None) -> Response:
        """A request that names no stream: any live replica, the next one if the first turns out dead or
        busy before any of a streamed body went to it (what was sent cannot be sent again)."""
        started = False

        async def streamed() -> AsyncIterator[bytes]:
            nonlocal started
            async for chunk in request.stream():
                started = True
                yield chunk

        last = ReplicaUnavailable("no LiveVLM replica is alive")
        for _ in self.replicas:
            try:
                return await self.forward(request, self.any_live(), streamed() if body is None else body)
            except ReplicaUnavailable as e:
                last = e
                if started or not self.live():
                    break
        return error_response(503, str(last))

    # ---- routes the router answers itself ---------------------------------------------------------------
    async def create_stream(self, request: Request) -> Response:
        """A new stream (`POST /v1/video/streams`) or an imported one (`.../import`: a stream file) on the
        least-loaded live replica, which owns it from then on."""
        body = await request.body()  # bounded by `RouterGate` (`max_upload_bytes`)
        headers = _request_headers(request.headers)
        try:
            replica = await self.place()
        except ReplicaUnavailable as e:
            return error_response(503, str(e))
        self._creating[replica.index] += 1
        try:
            response = await self.clients[replica.index].post(_upstream_url(replica, request), headers=headers,
                                                              content=body)
        except httpx.PoolTimeout:
            return error_response(503, self.busy_message(replica))
        except httpx.TransportError:
            await replica.check_alive()
            return error_response(503, f"replica {replica.index} failed while creating the stream; try again")
        finally:
            self._creating[replica.index] -= 1
        if response.status_code == 200:
            created = response.json()
            self.owners[created["id"]] = replica
            if created.get("token"):
                self.token_digests[created["id"]] = _digest(created["token"])
        return _relay(response)

    async def list_streams(self, request: Request) -> Response:
        """Every live replica's streams in one list (the first non-200 answer is returned as is)."""
        headers = _request_headers(request.headers)
        data = []
        for replica in self.live():
            try:
                response = await self.clients[replica.index].get(_upstream_url(replica, request), headers=headers)
            except httpx.TransportError:
                await replica.check_alive()
                continue
            if response.status_code != 200:
                return _relay(response)
            data.extend(response.json()["data"])
        return JSONResponse({"object": "list", "data": data})

    async def engine(self, request: Request) -> Response:
        """The sum of the replicas' loads, and each replica's load and those of the streams the router placed
        on it whose owner tokens the caller presents (comma-separated in `X-Stream-Token`, as for
        `GET /v1/video/streams`). Replica URLs only to callers that presented the API key."""
        tokens = {_digest(t.strip()) for t in request.headers.get(_TOKEN_HEADER, "").split(",") if t.strip()}
        replicas = []
        for replica, load in zip(self.replicas, await asyncio.gather(*(self.load(r) for r in self.replicas))):
            entry = {"replica": replica.index, **({"url": replica.url} if self.api_key else {}),
                     "alive": replica.alive,
                     "stream_ids": sorted(s for s, o in self.owners.items()
                                          if o is replica and self.token_digests.get(s) in tokens)}
            if load is not None:
                entry.update({k: v for k, v in load.items() if k != "object"})
            replicas.append(entry)
        return JSONResponse({"object": "video.engine",
                             "streams": sum(r.get("streams", 0) for r in replicas if r["alive"]),
                             "store_bytes": sum(r.get("store_bytes", 0) for r in replicas if r["alive"]),
                             "replicas": replicas})

    async def chat_completions(self, request: Request) -> Response:
        body = await request.body()
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            payload = None
        stream_id = _session_id(payload, request)
        if stream_id:
            return await self.forward_to_stream(request, stream_id, body)
        return await self.forward_anywhere(request, body)

    async def socket(self, websocket: WebSocket, stream_id: str) -> None:
        """Proxy the stream's websocket to its replica, messages both ways until one side closes."""
        import websockets

        replica = self.owner(stream_id)
        error = None
        if replica is None:
            error = (404, f"no video stream with id {stream_id!r}")
        elif not replica.alive:
            error = (503, self.lost_message(stream_id, replica))
        upstream = None
        if error is None:
            url = str(_upstream_url(replica, websocket)).replace("http", "ws", 1)
            try:
                upstream = await websockets.connect(url, additional_headers=_request_headers(
                    websocket.headers, _HOP_BY_HOP | _WEBSOCKET_HANDSHAKE), max_size=None)
            except websockets.InvalidStatus as e:  # refused before its handshake: so is the client
                await websocket.send_denial_response(Response(bytes(e.response.body), e.response.status_code,
                                                              media_type=e.response.headers.get("content-type")))
                return
            except OSError:
                await replica.check_alive()
                error = (503, self.lost_message(stream_id, replica) if not replica.alive
                         else f"replica {replica.index} ({replica.url}) is unreachable")
        offered = SUBPROTOCOL in websocket.scope.get("subprotocols", [])
        await websocket.accept(subprotocol=SUBPROTOCOL if offered else None)  # as a single server answers
        if upstream is None:
            status, message = error
            await websocket.send_json({"type": "error", "error": {"message": message, "code": status}})
            await websocket.close(code=4404 if status == 404 else 1011)
            return
        await _pump(websocket, upstream)

    # ---- the app --------------------------------------------------------------------------------------------
    def app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI):
            yield
            await asyncio.gather(*(client.aclose() for client in self.clients.values()))

        app = FastAPI(title="LiveVLM router", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
        # Added last, so it runs first: clients' engine transfer fields are refused (400) as on a single
        # server, once the gate has let the request in.
        app.add_middleware(TrustBoundary, max_body_bytes=self.limits.max_upload_bytes)
        app.add_middleware(RouterGate, api_key=self.api_key, max_upload_bytes=self.limits.max_upload_bytes)

        @app.post("/v1/video/streams")
        async def create_stream(request: Request):
            return await self.create_stream(request)

        @app.post("/v1/video/streams/import")  # before the stream routes: "import" is not a stream id
        async def import_stream(request: Request):  # a stream file is placed like a new stream
            return await self.create_stream(request)

        @app.get("/v1/video/streams")
        async def list_streams(request: Request):
            return await self.list_streams(request)

        @app.get("/v1/video/engine")
        async def engine(request: Request):
            return await self.engine(request)

        @app.api_route(_STREAM_PATH, methods=["GET", "DELETE", "POST", "PUT", "PATCH"])
        @app.api_route(_STREAM_PATH + "/{rest:path}", methods=["GET", "DELETE", "POST", "PUT", "PATCH"])
        async def stream_route(stream_id: str, request: Request):
            return await self.forward_to_stream(request, stream_id)

        @app.websocket(_STREAM_PATH + "/ws")
        async def stream_socket(websocket: WebSocket, stream_id: str):
            await self.socket(websocket, stream_id)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await self.chat_completions(request)

        # The other routes `RouterGate` lets through (`routable`): the OpenAI ones and /health.
        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
        async def anything_else(path: str, request: Request):
            return await self.forward_anywhere(request)

        return app


def _upstream_url(replica: Replica, request: Request | WebSocket) -> httpx.URL:
    return httpx.URL(replica.url + request.url.path, query=request.url.query.encode() or None)


def _session_id(payload: Any, request: Request) -> str | None:
    """The stream a chat completion names, in vLLM's order: body `session_id`, `X-Session-ID` header,
    `vllm_xargs.session_id`."""
    body = payload if isinstance(payload, dict) else {}
    xargs = body.get("vllm_xargs") if isinstance(body.get("vllm_xargs"), dict) else {}
    for value in (body.get("session_id"), request.headers.get("x-session-id"), xargs.get("session_id")):
        if isinstance(value, str) and value:
            return value
    return None


async def _pump(client: WebSocket, upstream: Any) -> None:
    """Relay messages both ways; when one side closes, close the other."""
    from starlette.websockets import WebSocketDisconnect

    async def client_to_upstream() -> None:
        while True:
            message = await client.receive()
            if message["type"] == "websocket.disconnect":
                return
            await upstream.send(message["bytes"] if message.get("bytes") is not None else message.get("text", ""))

    async def upstream_to_client() -> None:
        async for message in upstream:
            if isinstance(message, bytes):
                await client.send_bytes(message)
            else:
                await client.send_text(message)

    tasks = [asyncio.create_task(client_to_upstream()), asyncio.create_task(upstream_to_client())]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None and not isinstance(task.exception(), WebSocketDisconnect):
                logger.info("websocket relay ended: %s", task.exception())
    finally:
        await upstream.close()
        code = upstream.close_code
        try:  # 1005/1006/1015 only report what happened, they cannot be sent
            await client.close(code=1011 if code in (1005, 1006, 1015) else code or 1000)
        except RuntimeError:  # the client already closed
            pass
