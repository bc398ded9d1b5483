"""`Lease`: a cluster-wide lock in the Ray cluster's key-value store, held by one owner until it releases
it or its expiry passes (a holder that crashed blocks the others only until then). It makes a rebalance
one at a time in the whole cluster, whichever replica receives it (`rebalancing`).

The store has no compare-and-set: taking the lease is a put that does not overwrite (exactly one of the
processes that race for a free key wins); an expired lease is deleted and put again the same way.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Callable

from vllm_livevlm.serving.ray.secret import NAMESPACE


def _ray_kv() -> Any:
    from ray.experimental import internal_kv

    return internal_kv


class Lease:
    def __init__(self, key: str, expiry_s: float, kv: Callable[[], Any] = _ray_kv,
                 clock: Callable[[], float] = time.time):
        self.key, self.expiry_s, self._kv, self._clock = key, expiry_s, kv, clock
        self.owner = secrets.token_hex(8)

    def _holder(self) -> dict[str, Any] | None:
        value = self._kv()._internal_kv_get(self.key, namespace=NAMESPACE)
        try:
            return json.loads(value) if value else None
        except ValueError:  # not ours to read: treated as expired
            return {"owner": "", "expires": 0}

    def acquire(self) -> bool:
        """Whether this owner now holds the lease (False: another holds it and it has not expired)."""
        value = json.dumps({"owner": self.owner, "expires": self._clock() + self.expiry_s})
        for _ in range(2):
            if not self._kv()._internal_kv_put(self.key, value, overwrite=False, namespace=NAMESPACE):
                return True
            holder = self._holder()
            if holder is not None and holder["expires"] > self._clock():
                return False
            self._kv()._internal_kv_del(self.key, namespace=NAMESPACE)  # expired: free it, race for it again
        return False

    def release(self) -> None:
        """Frees the lease if this owner still holds it (an expired lease another took stays theirs)."""
        holder = self._holder()
        if holder is not None and holder["owner"] == self.owner:
            self._kv()._internal_kv_del(self.key, namespace=NAMESPACE)
