"""The links' HMAC (``notifyctl.signing``) is RFC 2104's HMAC-SHA256, whatever the key's length."""

from __future__ import annotations

import hashlib
import hmac

from hypothesis import given, settings
from hypothesis import strategies as st

from notifyctl.signing import hmac_sha256


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=300))
def test_same_digest_as_the_standard_library(key: bytes, msg: bytes) -> None:
    assert hmac_sha256(key, msg) == hmac.new(key, msg, hashlib.sha256).digest()
    assert hmac_sha256(key, msg) == hmac.new(key, msg, hashlib.sha256).digest()  # (from its kept hashes)
