"""`StreamAffinityRouter`: Ray Serve's request router for LiveVLM replicas.

A request naming a stream goes to the replica the stream's id names (`ids.StreamIds.home`), or, once the
stream moved (its replica was stopped, `moving`, or died and a survivor restored it, `healing`), to its
recorded new home (`placement`), and only there. While its replica is stopping the request waits for the
new home; while its replica is dead and the stream not yet restored it answers 503 with Retry-After; it is
never sent to a replica that does not hold the stream's memory; a stream that could not be restored answers
404 (from any replica: none holds it). A
stream creation or import goes to the least-loaded replica: fewest live streams, then fewest store bytes
(the replicas' routing stats), counting the creations this router sent since a replica last reported. Any
other request goes to any replica. Every proxy runs its own router and they all route alike: the home is
in the id, the load in the stats every proxy receives.
"""

from __future__ import annotations

import asyncio
import pickle
import time
from typing import Any

from ray.serve.exceptions import BackPressureError
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from vllm_livevlm.serving.ray import placement
from vllm_livevlm.serving.ray.addressing import is_creation, named_stream
from vllm_livevlm.serving.ray.ids import StreamIds, home_tag
from vllm_livevlm.serving.ray.secret import cluster_secret

MAX_CACHED_HOMES = 100_000
TARGETED = frozenset({"held", "send", "adopt"})  # handle calls whose first argument is the replica's tag


class ReplicaNotRunning(RuntimeError):
    """A handle call named a replica that is not running (starting, stopping or gone)."""


class HomeUnavailable(BackPressureError):
    """The stream's replica is not running now: Serve's proxy answers 503 with Retry-After."""

    def __init__(self, stream_id: str, retry_after_s: float):
        super().__init__(0, 0, 503, retry_after_s)
        self._message = (f"video stream '{stream_id}' is unavailable while its replica restarts or the stream is "
                         f"restored on another one: retry in {retry_after_s:.0f} s")


def _head(pending: PendingRequest | None) -> tuple[str, str, list[tuple[bytes, bytes]]] | None:
    """Method, path and headers of a request Serve's HTTP proxy forwards (its ASGI scope, pickled by the
    proxy itself); None for handle calls."""
    if pending is None or not pending.metadata.is_http_request or not pending.args:
        return None
    request = pending.args[0]
    if isinstance(request, bytes):
        request = pickle.loads(request)
    scope = request.asgi_scope
    return scope.get("method", "GET"), scope.get("path", ""), scope.get("headers", [])


class StreamAffinityRouter(RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        from vllm_livevlm.serving.ray.limits import recorded

        limits = recorded()
        self._ids = StreamIds(cluster_secret())
        self._retry_after_s = limits.retry_after_seconds
        self._await_replica_s = limits.hand_over_seconds  # a handle call waits this for the replica it names
        self._sent: list[tuple[ReplicaID, float]] = []  # creations routed here: (replica, when)
        self._homes: dict[str, str] = {}  # stream id -> the tag of the replica it moved to
        self._alive: dict[str, tuple[bool, float]] = {}  # tag of a replica not routed to -> (actor alive, when)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Each answer is the only rank: if its replica cannot take the request now (its queue length is
            # being probed), Serve must sleep before asking again, or its routing loop spins and starves the
            # probe it waits for.
            pending_request.routing_context.should_backoff = True
            if pending_request.metadata.call_method in TARGETED:
                return self._targeted(candidate_replicas, pending_request)
        head = _head(pending_request)
        if head is None or not candidate_replicas:
            return [candidate_replicas]
        method, path, headers = head
        stream_id = named_stream(path, headers)
        if stream_id is not None:
            tag = self._ids.home(stream_id)
            if tag is None:  # not one of ours: any replica answers 404 (none holds it); the proxy gate refuses first
                return [candidate_replicas]
            live = {home_tag(r.replica_id.unique_id): r for r in candidate_replicas}
            if tag not in live or _moves(live[tag]):
                tag = await self._moved(stream_id, tag, live)
                if tag == placement.LOST:  # any replica answers 404: none holds it
                    return [candidate_replicas]
                if tag.startswith(placement.MOVING):  # a running replica hands it over: wait for its new home
                    return []
            if tag not in live:
                if await self._stopping(tag):  # handing its streams over (`moving`): wait for the new home
                    return []
                if not pending_request.future.done():
                    pending_request.future.set_exception(HomeUnavailable(stream_id, self._retry_after_s))
                return [candidate_replicas]  # the routing loop sees the request done and sends it nowhere
            return [[live[tag]]]
        if is_creation(method, path):
            return [[min(candidate_replicas, key=self._load)]]
        return [candidate_replicas]

    async def _moved(self, stream_id: str, dead_tag: str, live: dict[str, RunningReplica]) -> str:
        """Where a stream of a replica that is not running lives now (`placement`): the tag of its new home,
        LOST, or the dead tag while it is being restored. Records are cached until their replica stops too."""
        cached = self._homes.get(stream_id)
        if cached in live and not _moves(live[cached]):
            return cached
        home = await asyncio.to_thread(placement.home_of, stream_id)
        if home is None:
            return placement.LOST if await asyncio.to_thread(placement.healed, dead_tag) else dead_tag
        if home.startswith(placement.MOVING):
            return home
        if len(self._homes) >= MAX_CACHED_HOMES:
            self._homes.clear()
        self._homes[stream_id] = home
        return home

    def _targeted(self, candidates: list[RunningReplica], pending: PendingRequest) -> list[list[RunningReplica]]:
        """A handle call to the replica its first argument names (None: any replica). One this router does
        not know yet (just started: Serve tells its routers soon after) is waited for, then the call fails."""
        tag = pending.args[0] if pending.args else None
        if tag is None:
            return [candidates]
        for replica in candidates:
            if home_tag(replica.replica_id.unique_id) == tag:
                return [[replica]]
        if time.time() - pending.created_at < self._await_replica_s:
            return []  # asked again after a backoff
        if not pending.future.done():
            pending.future.set_exception(ReplicaNotRunning(f"replica {tag} is not running"))
        return [candidates]  # done: sent nowhere

    async def _stopping(self, tag: str) -> bool:
        """Whether a replica that no longer takes requests still runs (asked of Ray at most once a second)."""
        alive, at = self._alive.get(tag, (False, 0.0))
        if time.monotonic() - at > 1.0:
            alive = await asyncio.to_thread(placement.replica_alive, tag)
            self._alive[tag] = (alive, time.monotonic())
        return alive

    def _load(self, replica: RunningReplica) -> tuple[int, int, str]:
        stats = replica.routing_stats or {}
        since = stats.get("measured_at", 0.0)
        recent = sum(1 for r, at in self._sent if r == replica.replica_id and at >= since)
        return int(stats.get("streams", 0)) + recent, int(stats.get("store_bytes", 0)), replica.replica_id.unique_id

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        head = _head(pending_request)
        if head is not None and is_creation(head[0], head[1]):
            now = time.time()
            self._sent = [(r, at) for r, at in self._sent if now - at < 60] + [(replica_id, now)]


def _moves(replica: RunningReplica) -> bool:
    """Whether the replica reported that it hands streams over while running (`rebalancing`): its streams'
    requests then look up where they live (one record read each)."""
    return bool((replica.routing_stats or {}).get("moves"))
