"""Where streams live when their home replica stopped: records in the Ray cluster's key-value store (GCS).

A stream id names the replica that created it (`ids`). When that replica stops (scaled down: it hands its
streams over first, `moving`) or dies (a survivor restores them from their checkpoints, `healing`), the
stream's new home is recorded here once it holds the stream; once a dead replica's checkpoints have all
been taken up it is recorded as healed, so a stream of it without a record is lost (it had no checkpoint,
or its checkpoint failed to restore). Each replica records the Ray actor it runs in, so that anyone can tell
a replica that is stopping (its actor alive) from a dead one. Routers read records only for streams whose
named home is not running: the common path needs none.
"""

from __future__ import annotations

from vllm_livevlm.serving.ray.secret import NAMESPACE

LOST = "lost"  # the home of a stream that could not be restored
MOVING = "moving:"  # + the tag it goes to: a stream a running replica is handing over (`moving.move`)


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def set_home(stream_id: str, tag: str) -> None:
    _kv()._internal_kv_put(f"home/{stream_id}", tag.encode(), overwrite=True, namespace=NAMESPACE)


def home_of(stream_id: str) -> str | None:
    """The tag of the replica now holding the stream, LOST, or None (no record)."""
    value = _kv()._internal_kv_get(f"home/{stream_id}", namespace=NAMESPACE)
    return value.decode() if value else None


def record_replica(tag: str, actor_name: str) -> None:
    _kv()._internal_kv_put(f"actor/{tag}", actor_name.encode(), overwrite=True, namespace=NAMESPACE)


def replica_alive(tag: str) -> bool:
    """Whether the replica's actor still runs (starting, serving or stopping); False once it died. A dead
    actor's name is released by Ray, so the name no longer resolves."""
    import ray

    name = _kv()._internal_kv_get(f"actor/{tag}", namespace=NAMESPACE)
    if not name:
        return False
    try:
        ray.get_actor(name.decode(), namespace="serve")
    except ValueError:
        return False
    return True


def _recorded_replicas() -> dict[str, bool]:
    """Every recorded replica's tag -> whether its actor still runs (one listing of the cluster's actors)."""
    import ray

    live = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    replicas = {}
    for key in _kv()._internal_kv_list("actor/", namespace=NAMESPACE):
        name = _kv()._internal_kv_get(key, namespace=NAMESPACE)
        if name:
            replicas[key.decode().removeprefix("actor/")] = name.decode() in live
    return replicas


def live_replicas() -> list[str]:
    """Tags of recorded replicas whose actors run (starting, serving or stopping)."""
    return sorted(tag for tag, alive in _recorded_replicas().items() if alive)


def dead_replicas() -> list[str]:
    """Tags of recorded replicas whose actors are gone."""
    return sorted(tag for tag, alive in _recorded_replicas().items() if not alive)


def recorded(tag: str) -> bool:
    """Whether this cluster ever ran the replica and has not healed it yet."""
    return bool(_kv()._internal_kv_exists(f"actor/{tag}", namespace=NAMESPACE))


def claim(dead_tag: str, tag: str) -> bool:
    """Whether this replica (`tag`) won the dead replica's streams: exactly one claimant does."""
    return not _kv()._internal_kv_put(f"claim/{dead_tag}", tag.encode(), overwrite=False, namespace=NAMESPACE)


def mark_healed(tag: str) -> None:
    """Every stream of the dead replica that could be restored has its record: the rest are lost."""
    _kv()._internal_kv_put(f"healed/{tag}", b"1", overwrite=True, namespace=NAMESPACE)
    _kv()._internal_kv_del(f"actor/{tag}", namespace=NAMESPACE)


def healed(tag: str) -> bool:
    return bool(_kv()._internal_kv_exists(f"healed/{tag}", namespace=NAMESPACE))
