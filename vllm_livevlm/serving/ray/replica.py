"""`LiveVLMReplica`: one LiveVLM server (`vllm-livevlm serve`) owned by a Ray actor.

The actor starts the single-server command as a child process on a free port of its node and reports the
server's URL; the child dies with the actor (PR_SET_PDEATHSIG), so a killed or crashed actor never leaves
a server behind that still holds streams the router considers lost.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

if TYPE_CHECKING:
    from vllm_livevlm.config import LiveVLMConfig

_PR_SET_PDEATHSIG = 1
_FORWARDED_ENV_PREFIXES = ("VLLM_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_", "TOKENIZERS_")
_NODE_SPECIFIC_ENV = frozenset({"VLLM_HOST_IP", "VLLM_PORT"})
_API_KEY_ENV = "VLLM_API_KEY"  # vLLM's server reads its key from here when `--api-key` is not given


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM it when the actor's process dies (Linux)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LiveVLMReplica:
    """Ray actor body (wrapped by `ray.remote` in `start_replicas`): a LiveVLM server as a child process.

    The API key comes as a constructor argument and goes to the child's environment: never on a command
    line (any local user can list those) nor in the actor's runtime environment (Ray passes that to the
    worker's command line)."""

    def __init__(self, model: str, config: dict[str, Any], vllm_args: list[str],
                 limits: dict[str, Any] | None = None, api_key: str | None = None, host: str | None = None):
        self.host = host or ray.util.get_node_ip_address()
        port = _free_port(self.host)
        # Exactly `vllm-livevlm serve` (it builds vLLM's command and environment on this node); the actor
        # itself stays small: it never imports vLLM.
        command = [sys.executable, "-m", "vllm_livevlm.cli", "serve", model, "--livevlm-config", json.dumps(config),
                   *(["--livevlm-limits", json.dumps(limits)] if limits else []),
                   *vllm_args, "--host", self.host, "--port", str(port)]
        # The API server talks to its engine core through vLLM's multiprocess client (the server default);
        # vLLM's Ray executor (tensor parallelism over Ray) joins this actor's cluster.
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
               "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        env.pop(_API_KEY_ENV, None)
        if api_key:
            env[_API_KEY_ENV] = api_key
        # Output goes to the actor's stdout/stderr: Ray keeps it in the node's logs and shows it on the driver.
        self.process = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)
        self.url = f"http://{self.host}:{port}"

    def wait_ready(self, timeout: float) -> str:
        """Block until the server answers /health; its URL. Raises if it exits or times out first."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the LiveVLM server of this replica exited with code {self.process.returncode} "
                                   "while starting (its log is above, prefixed with the actor's name)")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the LiveVLM server at {self.url} did not become healthy in {timeout:.0f} s")

    def server_running(self) -> bool:
        return self.process.poll() is None

    def server_pid(self) -> int:
        return self.process.pid

    def shutdown(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)  # the server drains in-flight questions first
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __del__(self) -> None:
        process = getattr(self, "process", None)
        if process is not None and process.poll() is None:
            process.kill()


@dataclass
class Replica:
    """The router's view of one replica: its actor and server URL, and whether it is known dead."""

    index: int
    actor: Any  # ray.actor.ActorHandle
    url: str
    alive: bool = True

    async def check_alive(self, timeout: float = 10.0) -> bool:
        """Ask the actor whether its server process runs; a dead actor (or one that does not answer in
        `timeout` seconds) makes the replica dead for good: its streams are gone."""
        import asyncio

        if self.alive:
            try:
                self.alive = await asyncio.wait_for(self.actor.server_running.remote(), timeout)
            except (ray.exceptions.RayActorError, asyncio.TimeoutError):
                self.alive = False
        return self.alive


def replica_env() -> dict[str, str]:
    """The caller's vLLM / Hugging Face settings, which replicas on a running cluster would not see
    otherwise (their processes inherit the environment of the node's raylet), minus node-specific ones and
    the API key (a secret: it goes to the actors as an argument)."""
    return {k: v for k, v in os.environ.items()
            if k.startswith(_FORWARDED_ENV_PREFIXES) and k not in _NODE_SPECIFIC_ENV | {_API_KEY_ENV}}


def start_replicas(model: str, count: int, config: "LiveVLMConfig", vllm_args: list[str],
                   limits: dict[str, Any] | None = None, api_key: str | None = None, num_cpus: float = 1,
                   num_gpus: float = 0, timeout: float = 600,
                   progress: Callable[[str], None] = print) -> list[Replica]:
    """Start `count` replica actors at once and wait until every server is healthy (each requiring
    `api_key`, if given)."""
    actor_class = ray.remote(LiveVLMReplica)
    env = replica_env()
    actors = [actor_class.options(name=f"livevlm-replica-{i}", num_cpus=num_cpus, num_gpus=num_gpus,
                                  runtime_env={"env_vars": env}).remote(model, config.to_dict(), vllm_args, limits,
                                                                        api_key)
              for i in range(count)]
    progress(f"starting {count} LiveVLM replica(s) of {model} ({num_cpus} CPU, {num_gpus} GPU each)")
    start = time.monotonic()
    pending = {actor.wait_ready.remote(timeout): i for i, actor in enumerate(actors)}
    urls: dict[int, str] = {}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # lets Ctrl-C through
            if not done:
                continue
            index = pending.pop(done[0])
            urls[index] = ray.get(done[0])
            progress(f"replica {index} ready at {urls[index]} ({time.monotonic() - start:.0f} s, "
                     f"{len(urls)}/{count})")
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        raise
    return [Replica(i, actor, urls[i]) for i, actor in enumerate(actors)]


def stop_replicas(replicas: list[Replica], timeout: float = 90) -> None:
    """Let every live replica's server drain and exit (at once), then end the actors."""
    live = [r for r in replicas if r.alive]
    try:
        ray.get([r.actor.shutdown.remote() for r in live], timeout=timeout)
    except (ray.exceptions.RayError, TimeoutError):
        pass  # a dead actor's server died with it
    for replica in live:
        ray.kill(replica.actor)
        replica.alive = False
