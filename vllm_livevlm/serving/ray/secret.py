"""Cluster-wide secrets kept in the Ray cluster's own key-value store (the GCS), never on a command line,
in a Serve config or in a runtime environment: the HMAC key of stream ids and the API key.

Every process of the cluster (proxies, replicas, the `serve-ray` driver) reads them from the GCS, which
Ray's token authentication guards; a restarted proxy or replica finds the same values.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

NAMESPACE = "livevlm"
_ID_SECRET = "stream-id-secret"
_API_KEY = "api-key"


def cluster_secret() -> bytes:
    """The stream-id HMAC key, created by the first process that asks (the others find it)."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

    _internal_kv_put(_ID_SECRET, secrets.token_bytes(32), overwrite=False, namespace=NAMESPACE)
    value = _internal_kv_get(_ID_SECRET, namespace=NAMESPACE)
    if not value:
        raise RuntimeError("the Ray cluster's key-value store holds no LiveVLM stream-id secret")
    return value


def set_api_key(key: str | None) -> None:
    """Record the key every replica requires (None: replicas require none)."""
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    if key:
        _internal_kv_put(_API_KEY, key.encode(), overwrite=True, namespace=NAMESPACE)
    else:
        _internal_kv_del(_API_KEY, namespace=NAMESPACE)


def api_key() -> str | None:
    from ray.experimental.internal_kv import _internal_kv_get

    value = _internal_kv_get(_API_KEY, namespace=NAMESPACE)
    return value.decode() if value else None


def key_version(key: str | None, secret: bytes) -> str | None:
    """What the Serve config holds of the API key: its HMAC-SHA256 under the cluster secret (never the key,
    and no unkeyed hash to guess it from), so that a new key changes the config and Serve redeploys the
    replicas, which read the key from the store only when they start."""
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest() if key else None
