"""The Ray layer's guards, without a cluster: the cluster-wide rebalance lease, one move per stream and a
failed move's home record, what of the environment and the API key the Serve config holds, and the time a
proxy gives a body. The key-value store is a dict with the Ray store's put/get/del semantics."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from vllm_livevlm.serving.ray import placement
from vllm_livevlm.serving.ray.lease import Lease


class DictKV:
    """Ray's `internal_kv` semantics (put returns whether the key existed; no overwrite keeps the value)."""

    def __init__(self):
        self.data: dict[bytes, bytes] = {}

    def _internal_kv_put(self, key, value, overwrite=True, *, namespace=None) -> bool:
        key, value = (x.encode() if isinstance(x, str) else x for x in (key, value))
        existed = key in self.data
        if overwrite or not existed:
            self.data[key] = value
        return existed

    def _internal_kv_get(self, key, *, namespace=None):
        return self.data.get(key.encode() if isinstance(key, str) else key)

    def _internal_kv_del(self, key, *, namespace=None):
        self.data.pop(key.encode() if isinstance(key, str) else key, None)


def test_one_rebalance_lease_in_the_cluster_until_released_or_expired():
    kv, now = DictKV(), [1000.0]
    replica_x, replica_y = (Lease("rebalance", 60, kv=lambda: kv, clock=lambda: now[0]) for _ in range(2))
    assert replica_x.acquire() and not replica_y.acquire() and not replica_x.acquire()
    now[0] += 59
    assert not replica_y.acquire()
    now[0] += 2  # x crashed holding it: it expired
    assert replica_y.acquire()
    replica_x.release()  # x's late release leaves y's lease alone
    assert not replica_x.acquire()
    replica_y.release()
    assert replica_x.acquire()


class Streams:
    """A replica's service as `moving.move` uses it: held streams, export and release."""

    def __init__(self, *ids: str):
        self.core = SimpleNamespace(streams={i: object() for i in ids})

    async def export_stream(self, stream) -> bytes:
        return b"exported"

    async def release(self, stream_id: str) -> None:
        del self.core.streams[stream_id]


@pytest.fixture
def kv(monkeypatch) -> DictKV:
    store = DictKV()
    monkeypatch.setattr(placement, "_kv", lambda: store)
    return store


def _peers(adopt) -> SimpleNamespace:
    return SimpleNamespace(adopt=SimpleNamespace(remote=adopt))


def test_a_stream_moves_once_at_a_time(kv):
    from vllm_livevlm.serving.ray.moving import AlreadyMoving, MoveGate, move

    service, adopting, adopted = Streams("s1"), asyncio.Event(), asyncio.Event()

    async def adopt(to, stream_id, data):
        adopting.set()
        await adopted.wait()
        placement.set_home(stream_id, to)
        return to

    async def run():
        gate = MoveGate(None, service, 2.0)
        first = asyncio.create_task(move(service, gate, _peers(adopt), "s1", "X", "Y", 5.0))
        await adopting.wait()
        with pytest.raises(AlreadyMoving):
            await move(service, gate, _peers(adopt), "s1", "X", "Z", 5.0)
        assert placement.home_of("s1") == placement.MOVING + "Y"  # the refused move left the record alone
        adopted.set()
        await first

    asyncio.run(run())
    assert placement.home_of("s1") == "Y" and "s1" not in service.core.streams


def test_a_failed_move_restores_the_home_only_while_the_record_is_its_own(kv):
    from vllm_livevlm.serving.ray.moving import MoveGate, move

    async def refused(to, stream_id, data):
        raise RuntimeError("409: stream exists")

    async def recorded_then_lost(to, stream_id, data):  # the adopter recorded itself, its answer never came
        placement.set_home(stream_id, to)
        raise TimeoutError

    for adopt, home in ((refused, "X"), (recorded_then_lost, "Y")):
        service = Streams("s1")
        with pytest.raises((RuntimeError, TimeoutError)):
            asyncio.run(move(service, MoveGate(None, service, 2.0), _peers(adopt), "s1", "X", "Y", 5.0))
        assert placement.home_of("s1") == home and "s1" in service.core.streams


def test_the_serve_config_holds_no_secret_variable():
    from vllm_livevlm.serving.ray.cli import forwarded_env

    environ = {"HF_TOKEN": "hf_secret", "HUGGING_FACE_HUB_TOKEN": "hf_old", "VLLM_API_KEY": "k",
               "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_PASSWORD_FILE": "p", "VLLM_SECRET_THING": "s", "TOKENIZERS_TOKEN": "t",
               "HF_APIKEY": "a", "VLLM_PORT": "1", "HOME": "/root"}
    assert forwarded_env(environ) == {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                                      "TOKENIZERS_PARALLELISM": "false"}


def test_a_new_api_key_changes_the_serve_config_without_showing_the_key():
    import hashlib

    import yaml

    from vllm_livevlm.serving.ray.cli import serve_config
    from vllm_livevlm.serving.ray.secret import key_version

    secret = b"s" * 32
    old, new = key_version("old-key", secret), key_version("new-key", secret)
    assert old != new and len(old) == 64 and key_version(None, secret) is None
    assert key_version("old-key", secret) == old != key_version("old-key", b"t" * 32)
    assert old != hashlib.sha256(b"old-key").hexdigest()  # keyed: not guessable from the config alone
    written = [yaml.safe_dump(serve_config({"model": "m", "api_key_version": v}, "127.0.0.1", 8000, 1, 1.0, 0))
               for v in (old, new)]
    assert written[0] != written[1] and not any("old-key" in w or "new-key" in w for w in written)
    from vllm_livevlm.serving.ray.app import build

    assert build({"model": "m", "api_key_version": new})._bound_deployment.init_args[-1] == new  # replicas get it


def test_a_trickled_body_is_cut_off_at_the_deadline():
    from vllm_livevlm.serving.boundary import TooSlow, read_capped

    async def trickle():
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def timed(deadline_s):
        start = asyncio.get_running_loop().time()
        body = await read_capped({"headers": []}, trickle, 1 << 20, deadline_s)
        return body, asyncio.get_running_loop().time() - start

    body, took = asyncio.run(timed(0.3))
    assert body == TooSlow("request body not received within 0.3 seconds") and 0.3 <= took < 1.0

    parts = iter([{"type": "http.request", "body": b"ab", "more_body": True},
                  {"type": "http.request", "body": b"c", "more_body": False}])

    async def prompt():
        return next(parts)

    assert asyncio.run(read_capped({"headers": []}, prompt, 10)) == b"abc"  # no deadline: as before


def test_a_late_request_for_a_stream_that_moved_away_is_sent_on_not_lost(kv):
    from vllm_livevlm.serving.ray import moving

    async def adopt(to, stream_id, data):
        placement.set_home(stream_id, to)
        return to

    async def app(scope, receive, send):  # the replica's app: it holds no such stream
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def status_of(gate, stream_id):
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": f"/v1/video/streams/{stream_id}", "headers": []}
        await gate(scope, None, send)
        return sent[0]["status"], dict(sent[0]["headers"]).get(b"retry-after")

    async def run():
        service = Streams("s1", *(f"t{i}" for i in range(moving.MOVED_REMEMBERED)))
        gate = moving.MoveGate(app, service, 2.0)
        await moving.move(service, gate, _peers(adopt), "s1", "X", "Y", 5.0)
        assert await status_of(gate, "s1") == (503, b"2") and await status_of(gate, "never") == (404, None)
        for i in range(moving.MOVED_REMEMBERED):
            await moving.move(service, gate, _peers(adopt), f"t{i}", "X", "Y", 5.0)
        assert len(gate.moved_away) == moving.MOVED_REMEMBERED  # bounded: the oldest is forgotten
        assert await status_of(gate, "s1") == (404, None) and await status_of(gate, "t0") == (503, b"2")
        gate.arrived("t0")  # moved back here, then closed: its requests are this replica's own again
        assert await status_of(gate, "t0") == (404, None)

    asyncio.run(run())
