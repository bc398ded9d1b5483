"""Handing streams over: a replica that Serve stops (scaled down, replaced by a rolling update) moves every
stream it holds to the running replicas before its engine stops, and a `rebalance` (`rebalancing.py`) moves
some streams of a running replica to another.

Serve stops routing to a replica and waits for its requests in flight before it calls the replica's
destructor, so by then no request changes its streams: each is exported (`StreamService.export_stream`,
memory, pending frames and owner token as they are), imported by another replica through the deployment's
handle (`LiveVLMServer.adopt`, which records the new home once it holds the stream) and only then closed
here. Meanwhile the routers hold the stream's requests (its home's actor is alive, `router`), and send them
to the new home once it is recorded: no request fails and the answers are those the stream gave before.
A stream that no replica takes (none running: the whole application stops) is left to the shutdown's
checkpoint and to healing.

A running replica still receives requests, so `move` first records the stream as moving (`placement`:
the routers hold its new requests, `router`), waits for the stream's requests in flight here to end
(`MoveGate` counts them), then hands it over the same way. A stream moves once at a time (a second move of
it is refused), and a failed move gives the stream its home back only if the record is still its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any

from vllm_livevlm.log import get_logger
from vllm_livevlm.serving.errors import error_response
from vllm_livevlm.serving.ray import placement
from vllm_livevlm.serving.ray.addressing import named_stream

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from vllm_livevlm.serving.service import StreamService

logger = get_logger(__name__)
MOVED_REMEMBERED = 4096  # the ids of streams that moved away a replica answers 503 (not 404) for, newest


async def hand_over(service: "StreamService", peers: "DeploymentHandle", timeout_s: float) -> int:
    """Move every stream to another replica (any running one); returns how many moved."""
    moved = 0
    for stream_id, stream in list(service.core.streams.items()):
        try:
            data = await service.export_stream(stream)
            home = await asyncio.wait_for(peers.adopt.remote(None, stream_id, data), timeout_s)
        except Exception as e:  # no replica takes it: the rest stay for the shutdown's checkpoint
            logger.warning("LiveVLM: stream %s not handed over (%s): %d streams stay here", stream_id,
                           str(e) or type(e).__name__, len(service.core.streams))
            break
        await service.release(stream_id)
        moved += 1
        logger.info("LiveVLM: stream %s handed over to replica %s", stream_id, home)
    return moved


class MoveGate:
    """ASGI middleware of a replica: counts each stream's requests in flight here, and holds a request that
    arrives for a stream while it moves (one the routers sent before they saw the move); once the stream is
    gone it answers 503 + Retry-After (the routers then send the retry to the new home), as it does to a
    request that arrives later for one of the last `MOVED_REMEMBERED` streams that moved away."""

    def __init__(self, app: Any, service: "StreamService", retry_after_s: float):
        self.app, self.service, self.retry_after_s = app, service, retry_after_s
        self.in_flight: Counter[str] = Counter()
        self.moving: dict[str, asyncio.Event] = {}
        self.moved_away: OrderedDict[str, None] = OrderedDict()  # oldest first

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        stream_id = named_stream(scope.get("path", ""), scope.get("headers", [])) \
            if scope["type"] in ("http", "websocket") else None
        if stream_id is None:
            return await self.app(scope, receive, send)
        if stream_id in self.moving:
            await self.moving[stream_id].wait()
        if stream_id in self.moved_away and stream_id not in self.service.core.streams:
            refusal = error_response(503, f"video stream '{stream_id}' moved to another replica: retry",
                                     "stream_id")
            refusal.headers["Retry-After"] = f"{self.retry_after_s:.0f}"
            return await refusal(scope, receive, send)
        self.in_flight[stream_id] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[stream_id] -= 1
            if not self.in_flight[stream_id]:
                del self.in_flight[stream_id]

    @contextlib.contextmanager
    def holding(self, stream_id: str):
        """New requests for the stream wait while the block runs; raises `AlreadyMoving` if another move
        holds it (checked and taken with no await in between: one move per stream)."""
        if stream_id in self.moving:
            raise AlreadyMoving(f"stream {stream_id} is already moving")
        done = self.moving[stream_id] = asyncio.Event()
        try:
            yield
        finally:
            del self.moving[stream_id]
            done.set()

    def moved(self, stream_id: str) -> None:
        """The stream left this replica: its late requests are sent on (503), not answered 404."""
        self.moved_away[stream_id] = None
        self.moved_away.move_to_end(stream_id)
        while len(self.moved_away) > MOVED_REMEMBERED:
            self.moved_away.popitem(last=False)

    def arrived(self, stream_id: str) -> None:
        """The stream (back) at home here: its requests are this replica's again."""
        self.moved_away.pop(stream_id, None)

    async def drained(self, stream_id: str, timeout_s: float) -> None:
        """Returns once no request for the stream is in flight here (TimeoutError past `timeout_s`)."""
        async with asyncio.timeout(timeout_s):
            while self.in_flight[stream_id]:
                await asyncio.sleep(0.05)


class AlreadyMoving(RuntimeError):
    pass


async def move(service: "StreamService", gate: MoveGate, peers: "DeploymentHandle", stream_id: str, tag: str,
               to: str, timeout_s: float) -> None:
    """Hand one stream of this running replica (`tag`) over to the replica `to`; raises if it did not move
    (the stream then stays here, at home again, unless another move took it meanwhile)."""
    stream = service.core.streams[stream_id]
    with gate.holding(stream_id):
        await asyncio.to_thread(placement.set_home, stream_id, placement.MOVING + to)
        adopted = False
        try:
            await gate.drained(stream_id, timeout_s)
            data = await service.export_stream(stream)
            await asyncio.wait_for(peers.adopt.remote(to, stream_id, data), timeout_s)  # records `to` as home
            adopted = True
            await service.release(stream_id)
            gate.moved(stream_id)
        finally:
            if not adopted:
                await asyncio.to_thread(_home_again, stream_id, tag, to, stream_id in service.core.streams)
    logger.info("LiveVLM: stream %s moved from replica %s to %s", stream_id, tag, to)


def _home_again(stream_id: str, tag: str, to: str, held_here: bool) -> None:
    """After a failed move: the stream's home is this replica again, if its record is still this move's."""
    if held_here and placement.home_of(stream_id) == placement.MOVING + to:
        placement.set_home(stream_id, tag)


def plan(held: dict[str, int]) -> list[tuple[str, str]]:
    """(from, to) for each stream to move, the most loaded replica to the least loaded, until the streams
    each replica holds differ by at most one."""
    counts, moves = dict(held), []
    while counts:
        most, least = max(counts, key=lambda t: (counts[t], t)), min(counts, key=lambda t: (counts[t], t))
        if counts[most] - counts[least] <= 1:
            return moves
        counts[most] -= 1
        counts[least] += 1
        moves.append((most, least))
    return moves
