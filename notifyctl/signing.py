"""HMAC-SHA256 for the links every marketing email carries (unsubscribe, open pixel): two per
recipient, so the key's padded inner and outer hashes are worked out once per key and copied for
each message, which is the same digest as ``hmac.new(key, msg, sha256)`` at a fraction of its cost."""

from __future__ import annotations

import hashlib
from typing import Any

_BLOCK = 64  # SHA-256's block size
_keyed: dict[bytes, tuple[Any, Any]] = {}  # key → (inner, outer) hashes with the padded key fed in


def hmac_sha256(key: bytes, msg: bytes) -> bytes:
    """``hmac.new(key, msg, hashlib.sha256).digest()`` (RFC 2104)."""
    pads = _keyed.get(key)
    if pads is None:
        k = hashlib.sha256(key).digest() if len(key) > _BLOCK else key
        k = k.ljust(_BLOCK, b"\0")
        if len(_keyed) > 16:  # (a few keys per process: the installation's, tests')
            _keyed.clear()
        pads = _keyed[key] = (
            hashlib.sha256(bytes(b ^ 0x36 for b in k)),
            hashlib.sha256(bytes(b ^ 0x5C for b in k)),
        )
    inner = pads[0].copy()
    inner.update(msg)
    outer = pads[1].copy()
    outer.update(inner.digest())
    return outer.digest()
