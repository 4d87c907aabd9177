"""A worker on a TCP Redis (``redis://host:port``, as every multi-host setup has) waits on its
blocking dequeue as long as RQ asks, instead of timing out every 5 s (redis-py 8's default read
timeout for TCP connections made before RQ raised it)."""

from __future__ import annotations

import time
from pathlib import Path

import redis
from rq import Queue, SimpleWorker

from chaos.multihost import RedisProxy
from notifyctl.redisconn import connect
from tests.conftest import make_settings


def test_blocking_dequeue_over_tcp_outlasts_five_seconds(home: Path, redis_dir: Path, rclient: redis.Redis) -> None:
    proxy = RedisProxy(str(redis_dir / "redis.sock"))  # TCP in front of the test server's socket
    try:
        client = connect(make_settings(home, proxy.url))  # connects (version check) before RQ sets its timeout
        w = SimpleWorker([Queue("tcp-test", connection=client)], connection=client, name="tcp-test-worker")
        t0 = time.monotonic()
        assert w.connection.blmove("notif:test:none", "notif:test:none2", 6) is None  # no TimeoutError
        assert time.monotonic() - t0 >= 5.5
        client.close()
    finally:
        proxy.close()
