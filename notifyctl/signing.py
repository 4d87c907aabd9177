"""HMAC-SHA256 for the links every marketing email carries (unsubscribe, open pixel): two per
recipient, so each key's HMAC (its padded inner and outer hashes) is built once and copied for each
message: the same digest as ``hmac.new(key, msg, sha256)``.

The copy is the standard library's own keyed object: the OpenSSL HMAC (``_hashlib.HMAC``) that
``hmac.HMAC`` holds when OpenSSL provides SHA-256, driven directly — ``copy``, ``update`` and
``digest`` are then three C calls without ``hmac.HMAC``'s Python methods around them (best of 30,
a link's message: 0.89 µs, against 1.12 through ``hmac.HMAC`` and 1.49 for ``hmac.new``). Where the
standard library keeps no such object, ``hmac.HMAC`` itself, which has the same three methods."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

_keyed: dict[bytes, Any] = {}  # key → its keyed HMAC with nothing fed in yet


def hmac_sha256(key: bytes, msg: bytes) -> bytes:
    """``hmac.new(key, msg, hashlib.sha256).digest()``."""
    base = _keyed.get(key)
    if base is None:
        if len(_keyed) > 16:  # (a few keys per process: the installation's, tests')
            _keyed.clear()
        h = hmac.new(key, digestmod=hashlib.sha256)
        base = _keyed[key] = getattr(h, "_hmac", None) or h
    c = base.copy()
    c.update(msg)
    return c.digest()
