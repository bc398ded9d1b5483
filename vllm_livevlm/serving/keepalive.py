"""Idle-connection expiry for HTTP clients of a vLLM server.

vLLM's uvicorn closes a connection that has been idle for `VLLM_HTTP_TIMEOUT_KEEP_ALIVE` seconds (5 by
default), and httpx keeps an idle connection for 5 s by default too. The client starts its clock when it has
read the response, later than the server, so under load a client can send a request on a connection the
server is closing that instant: the request fails with `ReadError` although nothing was wrong with it. Our
clients (the eval answerer) give idle connections up well before the server does.
"""

from __future__ import annotations

import os

import httpx


def server_keepalive_seconds() -> float:
    """How long vLLM's HTTP server keeps an idle connection (vLLM reads the same variable)."""
    return float(os.environ.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "5"))


def client_limits(max_connections: int | None = None) -> httpx.Limits:
    """Connection limits that expire an idle connection at most half-way into the server's keep-alive."""
    return httpx.Limits(max_connections=max_connections, keepalive_expiry=min(2.0, server_keepalive_seconds() / 2))
