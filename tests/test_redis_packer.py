"""notifyctl's clients pack commands with ``redisconn.HiredisPacker``: the same bytes as redis-py's own
packer for every argument it takes, and redis-py's own errors for those it refuses."""

from __future__ import annotations

import enum

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis._parsers.encoders import Encoder
from redis.connection import HiredisRespSerializer, PythonRespSerializer

from notifyctl.redisconn import HiredisPacker, _packer, connect
from notifyctl.settings import Settings

_ENCODE = Encoder("utf-8", "strict", False).encode
_REDIS_PY = HiredisRespSerializer(PythonRespSerializer(6000, _ENCODE).pack, _ENCODE).pack
_PYTHON = PythonRespSerializer(6000, _ENCODE).pack  # (redis-py without hiredis)


def _wire(chunks: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(c) for c in chunks)


class _Code(enum.StrEnum):
    SENT = "sent"


_ARG = st.one_of(
    st.text(),  # any text, non-ASCII included (surrogates: below)
    st.binary(),
    st.integers(),
    st.floats(allow_nan=False),
    st.sampled_from([_Code.SENT, "notif:sent:d_01kbx", b"\x00\xff", 0, -1, 2**63, 1e-300, float("inf")]),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["EVALSHA", "SET", b"ZADD", "get"]), st.lists(_ARG, max_size=12))
def test_packs_what_redis_py_packs(command: str | bytes, args: list[object]) -> None:
    packer = _packer()
    assert isinstance(packer, HiredisPacker)
    mine = _wire(packer.pack(command, *args))
    assert mine == _wire(_REDIS_PY(command, *args)) == _wire(_PYTHON(command, *args))


def test_what_hiredis_does_not_take_goes_to_redis_py() -> None:
    packer = _packer()
    assert packer is not None
    # a command of two words, a bytearray, a memoryview: packed as redis-py packs them
    for args in (("CLIENT SETNAME", "w1"), (b"SCRIPT LOAD", "return 1"), ("SET", "k", bytearray(b"v"))):
        assert _wire(packer.pack(*args)) == _wire(_REDIS_PY(*args))
    assert _wire(packer.pack("SET", "k", memoryview(b"v"))) == _wire(_REDIS_PY("SET", "k", memoryview(b"v")))
    # what redis-py refuses, refused the same way
    for bad in (True, None, [1], {"a": 1}):
        with pytest.raises(redis.DataError):
            packer.pack("SET", "k", bad)
    with pytest.raises(UnicodeEncodeError):
        packer.pack("SET", "k", "\udc80")


def test_clients_use_it_and_talk_to_a_real_redis(settings: Settings) -> None:
    client = connect(settings)
    try:
        conn = client.connection_pool.get_connection()
        try:
            assert isinstance(conn._command_packer, HiredisPacker)
        finally:
            client.connection_pool.release(conn)
        client.set("packer:é", "välue ✓")
        assert client.get("packer:é") == "välue ✓".encode()
        client.zadd("packer:z", {"m": 1733480000.123456})
        assert client.zscore("packer:z", "m") == 1733480000.123456
        assert client.eval("return ARGV[1] .. ARGV[2]", 0, "a", 7) == b"a7"
        with pytest.raises(redis.DataError):
            client.set("packer:b", True)  # type: ignore[arg-type]
    finally:
        client.delete("packer:é", "packer:z")
        client.close()


def test_an_encoding_of_the_urls_own_keeps_redis_pys_packer(settings: Settings, redis_url: str) -> None:
    sep = "&" if "?" in redis_url else "?"
    client = connect(settings.model_copy(update={"redis_url": f"{redis_url}{sep}encoding=latin-1"}))
    try:
        conn = client.connection_pool.get_connection()
        try:
            assert not isinstance(conn._command_packer, HiredisPacker)
        finally:
            client.connection_pool.release(conn)
        client.set("packer:l", "é")
        assert client.get("packer:l") == "é".encode("latin-1")
    finally:
        client.delete("packer:l")
        client.close()
