"""`StreamRouter`: the single server's HTTP API in front of N replicas, with stream affinity.

- `POST /v1/video/streams` places the new stream on the least-loaded live replica (live streams, then
  store bytes, from each replica's `GET /v1/video/engine`) and remembers which replica owns its id.
- Every request that names a stream (its routes, its websocket, chat completions with `session_id` or
  `X-Session-ID`) goes to the owner; a stream whose replica died answers 503 naming it, never an answer
  from another replica (that one does not hold the stream's memory).
- Anything else (`/v1/models`, `/health`, stock chat completions, ...) goes to any live replica.

Requests are forwarded verbatim: method, path, query string, body and headers except hop-by-hop ones
(so `Authorization` and per-stream tokens work unchanged); responses come back with their status and are
streamed through (SSE chat completions included).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from typing import Any

import httpx
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from vllm_livevlm.log import get_logger
from vllm_livevlm.serving.errors import error_response
from vllm_livevlm.serving.ray.replica import Replica

logger = get_logger(__name__)

# Headers that describe one connection, not the message (RFC 9110 7.6.1), plus those the next hop sets.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                         "transfer-encoding", "upgrade", "host", "content-length"})
_WEBSOCKET_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                                  "sec-websocket-accept", "sec-websocket-protocol"})
_RESPONSE_SET_BY_US = frozenset({"date", "server"})
_STREAM_PATH = "/v1/video/streams/{stream_id}"


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
    def __init__(self, replicas: list[Replica]):
        if not replicas:
            raise ValueError("the router needs at least one replica")
        self.replicas = replicas
        self.owners: dict[str, Replica] = {}
        self._creating = {r.index: 0 for r in replicas}  # stream creations in flight per replica
        self._round_robin = itertools.cycle(replicas)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0))

    # ---- choosing a replica ---------------------------------------------------------------------------------
    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    def any_live(self) -> Replica:
        for _ in self.replicas:
            replica = next(self._round_robin)
            if replica.alive:
                return replica
        raise ReplicaUnavailable("no LiveVLM replica is alive")

    async def load(self, replica: Replica, headers: list[tuple[str, str]]) -> dict[str, Any] | None:
        """The replica's `GET /v1/video/engine` (None when it does not answer with 200)."""
        try:
            response = await self.client.get(f"{replica.url}/v1/video/engine", headers=headers, timeout=10.0)
        except httpx.TransportError:
            await replica.check_alive()
            return None
        return response.json() if response.status_code == 200 else None

    async def place(self, headers: list[tuple[str, str]]) -> Replica:
        """The least-loaded live replica: fewest live streams (counting creations in flight), then fewest
        store bytes, then the lowest index. A replica whose load is not readable counts its known streams."""
        live = self.live()
        loads = await asyncio.gather(*(self.load(r, headers) for r in live))
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

    @staticmethod
    def unknown(stream_id: str) -> JSONResponse:
        return error_response(404, f"no video stream with id {stream_id!r}", "stream_id")

    # ---- forwarding -----------------------------------------------------------------------------------------
    async def forward(self, request: Request, replica: Replica, body: bytes | None = None) -> Response:
        """Send the request to `replica` as it came and stream the response back."""
        url = _upstream_url(replica, request)
        content = body if body is not None else request.stream()
        headers = _request_headers(request.headers)
        if body is None and "content-length" in request.headers:  # forwarded byte for byte: still true
            headers.append(("content-length", request.headers["content-length"]))
        upstream_request = self.client.build_request(request.method, url, headers=headers, content=content)
        try:
            upstream = await self.client.send(upstream_request, stream=True)
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
        return response

    async def forward_anywhere(self, request: Request, body: bytes | None = None) -> Response:
        """A request that names no stream: any live replica, the next one if the first turns out dead."""
        if body is None:
            body = await request.body()  # kept to be sent again
        last = ReplicaUnavailable("no LiveVLM replica is alive")
        for _ in self.replicas:
            try:
                return await self.forward(request, self.any_live(), body)
            except ReplicaUnavailable as e:
                last = e
                if not self.live():
                    break
        return error_response(503, str(last))

    # ---- routes the router answers itself ---------------------------------------------------------------
    async def create_stream(self, request: Request) -> Response:
        body = await request.body()
        headers = _request_headers(request.headers)
        try:
            replica = await self.place(headers)
        except ReplicaUnavailable as e:
            return error_response(503, str(e))
        self._creating[replica.index] += 1
        try:
            response = await self.client.post(_upstream_url(replica, request), headers=headers, content=body)
        except httpx.TransportError:
            await replica.check_alive()
            return error_response(503, f"replica {replica.index} failed while creating the stream; try again")
        finally:
            self._creating[replica.index] -= 1
        if response.status_code == 200:
            self.owners[response.json()["id"]] = replica
        return _relay(response)

    async def list_streams(self, request: Request) -> Response:
        """Every live replica's streams in one list (the first non-200 answer is returned as is)."""
        headers = _request_headers(request.headers)
        data = []
        for replica in self.live():
            try:
                response = await self.client.get(_upstream_url(replica, request), headers=headers)
            except httpx.TransportError:
                await replica.check_alive()
                continue
            if response.status_code != 200:
                return _relay(response)
            data.extend(response.json()["data"])
        return JSONResponse({"object": "list", "data": data})

    async def engine(self, request: Request) -> Response:
        """The sum of the replicas' loads, and each replica's load and the streams the router placed on it."""
        headers = _request_headers(request.headers)
        replicas = []
        for replica, load in zip(self.replicas, await asyncio.gather(*(self.load(r, headers)
                                                                        for r in self.replicas))):
            entry = {"replica": replica.index, "url": replica.url, "alive": replica.alive,
                     "stream_ids": sorted(s for s, o in self.owners.items() if o is replica)}
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
            except websockets.InvalidStatus as e:
                error = (e.response.status_code, f"the replica refused the websocket: {e}")
            except OSError:
                await replica.check_alive()
                error = (503, self.lost_message(stream_id, replica) if not replica.alive
                         else f"replica {replica.index} ({replica.url}) is unreachable")
        await websocket.accept()
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
            await self.client.aclose()

        # The replicas serve the API documentation (/docs, /openapi.json) through the catch-all route.
        app = FastAPI(title="LiveVLM router", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

        @app.post("/v1/video/streams")
        async def create_stream(request: Request):
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
