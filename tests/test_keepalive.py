"""Our HTTP clients of a vLLM server give an idle connection up before vLLM's uvicorn closes it: a request
sent on a connection the server is closing fails with `ReadError` (CI's load test did, with httpx's default
expiry equal to the server's 5 s keep-alive)."""

from __future__ import annotations

import asyncio

from vllm_livevlm.serving.keepalive import client_limits, server_keepalive_seconds
from vllm_livevlm.serving.ray.replica import Replica
from vllm_livevlm.serving.ray.router import StreamRouter


def _expiry(client) -> float:
    return client._transport._pool._keepalive_expiry


def test_the_router_expires_idle_upstream_connections_before_the_replica_does():
    router = StreamRouter([Replica(0, None, "http://127.0.0.1:1"), Replica(1, None, "http://127.0.0.1:2")])
    assert server_keepalive_seconds() == 5.0
    assert [_expiry(c) for c in router.clients.values()] == [2.0, 2.0]

    async def close() -> None:
        await asyncio.gather(*(c.aclose() for c in router.clients.values()))
    asyncio.run(close())


def test_a_shorter_server_keep_alive_shortens_the_clients(monkeypatch):
    monkeypatch.setenv("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "1")
    assert client_limits().keepalive_expiry == 0.5
