"""HMAC-SHA256 for the links every marketing email carries (unsubscribe, open pixel): two per
recipient, so each key's ``hmac.HMAC`` (its padded inner and outer hashes) is built once and copied
for each message: the same digest as ``hmac.new(key, msg, sha256)`` at about two thirds of its cost."""

from __future__ import annotations

import hashlib
import hmac

_keyed: dict[bytes, hmac.HMAC] = {}  # key → its HMAC with nothing fed in yet


def hmac_sha256(key: bytes, msg: bytes) -> bytes:
    """``hmac.new(key, msg, hashlib.sha256).digest()``."""
    base = _keyed.get(key)
    if base is None:
        if len(_keyed) > 16:  # (a few keys per process: the installation's, tests')
            _keyed.clear()
        base = _keyed[key] = hmac.new(key, digestmod=hashlib.sha256)
    h = base.copy()
    h.update(msg)
    return h.digest()
