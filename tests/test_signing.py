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


def test_the_key_is_kept_as_the_standard_librarys_own_keyed_object() -> None:
    """Where OpenSSL provides the HMAC, the copies come from the C object ``hmac.HMAC`` holds (its
    Python methods cost each link more); else ``hmac.HMAC`` itself. Either way the digest above."""
    from notifyctl import signing

    key = b"a key of its own for this test"
    signing.hmac_sha256(key, b"x")
    kept = signing._keyed[key]
    inner = getattr(hmac.new(key, digestmod=hashlib.sha256), "_hmac", None)
    assert type(kept) is (type(inner) if inner is not None else hmac.HMAC)
