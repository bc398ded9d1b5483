"""Our HTTP clients of a vLLM server give an idle connection up before vLLM's uvicorn closes it: a request
sent on a connection the server is closing fails with `ReadError` (CI's load test did, with httpx's default
expiry equal to the server's 5 s keep-alive)."""

from __future__ import annotations

from vllm_livevlm.serving.keepalive import client_limits, server_keepalive_seconds


def test_clients_expire_idle_connections_before_the_server_does():
    assert server_keepalive_seconds() == 5.0
    assert client_limits().keepalive_expiry == 2.0


def test_a_shorter_server_keep_alive_shortens_the_clients(monkeypatch):
    monkeypatch.setenv("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "1")
    assert client_limits().keepalive_expiry == 0.5
