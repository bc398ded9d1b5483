"""`RayLimits`: the Ray layer's timings (`serve-ray --livevlm-ray-limits JSON`), kept in the cluster's store
so that every process reads the same values: routers in the proxies, replicas, a restarted proxy."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from vllm_livevlm.serving.ray.secret import NAMESPACE

_KEY = "ray-limits"
_BODY_KEY = "max-request-body-bytes"


@dataclass(frozen=True)
class RayLimits:
    heal_poll_seconds: float = 1.0     # how often a replica looks for dead replicas to heal
    hand_over_seconds: float = 10.0    # one stream's import on another replica (scale-down, rebalance)
    retry_after_seconds: float = 2.0   # the Retry-After of a stream that is being restored
    move_settle_seconds: float = 3.0   # a replica's first rebalance waits this for every router to learn it moves
    rebalance_lease_seconds: float = 600.0  # a rebalance's cluster-wide lock expires after this (holder died)
    body_read_seconds: float = 30.0    # a proxy reads a chat completion's body within this, else 408

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Ray limit {f.name} must be a positive number, got {value!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RayLimits":
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown Ray limits {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**data)


def record(limits: RayLimits) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(_KEY, json.dumps(asdict(limits)).encode(), overwrite=True, namespace=NAMESPACE)


def recorded() -> RayLimits:
    """The cluster's limits (the defaults where `serve-ray` recorded none)."""
    from ray.experimental.internal_kv import _internal_kv_get

    value = _internal_kv_get(_KEY, namespace=NAMESPACE)
    return RayLimits.from_dict(json.loads(value)) if value else RayLimits()


def record_body_limit(max_bytes: int) -> None:
    """The replicas' `max_request_body_bytes` (each records it at start), for the proxies' gate."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(_BODY_KEY, str(max_bytes).encode(), overwrite=True, namespace=NAMESPACE)


def body_limit() -> int:
    from ray.experimental.internal_kv import _internal_kv_get

    from vllm_livevlm.serving.service import ServerLimits

    value = _internal_kv_get(_BODY_KEY, namespace=NAMESPACE)
    return int(value) if value else ServerLimits.max_request_body_bytes
