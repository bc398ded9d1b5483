"""`POST /v1/video/rebalance`: even the streams across the running replicas (an operator's call).

The replica that receives it asks every running replica how many streams it holds (`LiveVLMServer.held`,
a deployment-handle call the router sends to the replica it names), plans moves from the most loaded to the
least loaded until the counts differ by at most one (`moving.plan`), and has each source hand its streams
over (`LiveVLMServer.send` -> `moving.move`: requests held meanwhile, answers unchanged). It moves every
client's streams, so it needs the server's API key, and is refused (403) on a server that has none.
One rebalance at a time in the whole cluster (409 while one runs on any replica: a `lease.Lease` in the
cluster's store, which expires after `rebalance_lease_seconds` if its holder died).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse

from vllm_livevlm.serving.errors import error_response
from vllm_livevlm.serving.ray import placement
from vllm_livevlm.serving.ray.lease import Lease
from vllm_livevlm.serving.ray.limits import RayLimits
from vllm_livevlm.serving.ray.moving import plan

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

PATH = "/v1/video/rebalance"
LEASE_KEY = "rebalance-lease"


async def held_streams(peers: "DeploymentHandle", timeout_s: float) -> dict[str, list[str]]:
    """Running replica tag -> the ids of the streams it holds (replicas that do not answer within
    `timeout_s` are left out: starting, stopping, or gone). A replica that has just started may not be known
    to this replica's router yet: it is asked again until `timeout_s` has passed."""
    held = {}
    for tag in await asyncio.to_thread(placement.live_replicas):
        # One at a time: calls made within one request share its request id, by which Serve's router
        # matches a routed call to the replica chosen for it.
        deadline = time.monotonic() + timeout_s
        while tag not in held and time.monotonic() < deadline:
            try:
                held[tag] = await asyncio.wait_for(peers.held.remote(tag), max(deadline - time.monotonic(), 0.1))
            except Exception:
                await asyncio.sleep(0.5)
    return held


async def rebalance(peers: "DeploymentHandle", timeout_s: float) -> dict[str, Any]:
    """Plan and run the moves; what moved and what each replica holds after."""
    held = await held_streams(peers, timeout_s)
    moves = Counter(plan({tag: len(ids) for tag, ids in held.items()}))
    moved, failed = [], []
    for (source, to), count in sorted(moves.items()):
        result = await peers.send.remote(source, to, count)
        moved += [{"id": stream_id, "from": source, "to": to} for stream_id in result["moved"]]
        failed += result["failed"]
    after = await held_streams(peers, timeout_s)
    return {"object": "video.rebalance", "moved": moved, "failed": failed,
            "streams": {tag: len(ids) for tag, ids in sorted(after.items())}}


def route(peers: "DeploymentHandle", limits: RayLimits):
    """The route's handler (the API key, when the server has one, is checked before: `access.APIKeyGate`)."""
    lease = Lease(LEASE_KEY, limits.rebalance_lease_seconds)

    async def handler(request: Request) -> JSONResponse:
        if not os.environ.get("VLLM_API_KEY"):
            return error_response(403, "rebalance moves every client's streams: it needs a server started with "
                                       "--api-key")
        if not await asyncio.to_thread(lease.acquire):
            return error_response(409, "a rebalance is already running")
        try:
            return JSONResponse(await rebalance(peers, limits.hand_over_seconds))
        finally:
            await asyncio.to_thread(lease.release)

    return handler
