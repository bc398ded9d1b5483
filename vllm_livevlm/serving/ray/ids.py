"""Stream ids that name their home replica and cannot be forged.

On Ray Serve an id is 64 hex digits: the home's 8-digit tag, 24 random digits (96 bits) and a 128-bit
HMAC-SHA256 of both under the cluster secret. Any proxy holding the secret reads the home from the id alone
(no shared map, nothing lost when a proxy restarts); an id with a wrong MAC names no home. Hex only, at
most 64 digits: ids also name checkpoint files (`portable.checkpoints.stream_path`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

TAG_DIGITS = 8
RANDOM_DIGITS = 24
MAC_DIGITS = 32
ID_DIGITS = TAG_DIGITS + RANDOM_DIGITS + MAC_DIGITS
_HEX = frozenset("0123456789abcdef")


def home_tag(replica_unique_id: str) -> str:
    """The tag of a Serve replica (hex, fixed length, from its unique id): what its streams' ids carry."""
    return hashlib.sha256(replica_unique_id.encode()).hexdigest()[:TAG_DIGITS]


def is_tag(name: str) -> bool:
    return len(name) == TAG_DIGITS and _HEX.issuperset(name)


class StreamIds:
    """Mints and reads the ids of one cluster (its secret: `secret.cluster_secret`)."""

    def __init__(self, secret: bytes):
        if len(secret) < 16:
            raise ValueError("the cluster secret must hold at least 16 bytes")
        self._secret = secret

    def _mac(self, body: str) -> str:
        return hmac.new(self._secret, body.encode(), hashlib.sha256).hexdigest()[:MAC_DIGITS]

    def mint(self, tag: str) -> str:
        """A fresh id of a stream at home on the replica with this tag."""
        body = tag + secrets.token_hex(RANDOM_DIGITS // 2)
        return body + self._mac(body)

    def home(self, stream_id: str) -> str | None:
        """The tag an authentic id names; None for anything else (forged, foreign cluster, malformed)."""
        if len(stream_id) != ID_DIGITS or not _HEX.issuperset(stream_id):
            return None
        body, mac = stream_id[:-MAC_DIGITS], stream_id[-MAC_DIGITS:]
        return body[:TAG_DIGITS] if hmac.compare_digest(mac, self._mac(body)) else None
