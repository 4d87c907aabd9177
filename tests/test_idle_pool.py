"""An OTP after the pool has been idle goes out at once (issue 14 A).

redis-py 8 gives every connection a 5 s ``socket_timeout``; the connection RQ blocked on for its
405 s dequeue timed out every 5 s, RQ logged an ERROR and waited 1, 2, 4 ... 60 s before it
listened again, and an OTP sent then waited up to a minute. Here a real ``notifyctl worker --pool
2`` (subprocess, its own Redis: the embedded server, or one given by URL) stays idle longer than
the socket timeout of ordinary commands (shortened by ``NOTIFY_REDIS_SOCKET_TIMEOUT`` so that the
idle spell stays short), then an OTP is sent: it is sent within a second of its creation, and the
pool logged no ERROR."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import redis

from notifyctl.context import Context
from notifyctl.db import dispose_all
from notifyctl.redisconn import connect, stop_server
from tests.conftest import cli_env, make_settings, start_pool, stop_pool
from tests.util import deliveries, idle_workers, notification, seed, send, wait_for

SOCKET_TIMEOUT = 1.0  # the setting under test: ordinary commands' socket timeout
IDLE = 3 * SOCKET_TIMEOUT  # the idle spell must exceed it


@pytest.mark.parametrize("server", ["embedded", "url"])
def test_otp_after_idle_spell_is_sent_at_once(
    server: str, home: Path, redis_url: str, rclient: redis.Redis, tmp_path: Path
) -> None:
    settings = make_settings(
        home, redis_url if server == "url" else None, redis_socket_timeout=SOCKET_TIMEOUT
    )  # fmt: skip
    ctx = Context(settings)
    seed(ctx)
    env = cli_env(settings, NOTIFY_REDIS_SOCKET_TIMEOUT=str(SOCKET_TIMEOUT))
    log_path = tmp_path / "pool.log"
    with open(log_path, "w") as log:
        pool = start_pool(env, "2", stdout=log, stderr=subprocess.STDOUT)
    try:
        # both workers registered and listening: the idle spell starts now
        assert wait_for(lambda: idle_workers(ctx) == 2, 30), log_path.read_text()
        time.sleep(IDLE)
        assert pool.poll() is None, log_path.read_text()
        otp = send(ctx, template_id="otp_code", channels=["sms"], recipient_id="dave", data={"code": "1", "minutes": 5})
        sent = wait_for(lambda: [d for d in deliveries(ctx, otp.notification_id) if d.status == "sent"], 90)
        assert sent, log_path.read_text()
        created = notification(ctx, otp.notification_id).created_at
        latency = (sent[0].sent_at - created).total_seconds()
    finally:
        stop_pool(pool)
        ctx.close()
        dispose_all()
        if server == "embedded":
            stop_server(home / "redis")
    text = log_path.read_text()
    assert [line for line in text.splitlines() if " ERROR " in line] == [], text
    assert latency < 1.0, f"created -> sent took {latency:.2f}s after {IDLE:g}s idle\n{text}"


def test_every_client_has_explicit_timeouts(settings) -> None:  # type: ignore[no-untyped-def]
    """Ordinary commands: ``redis_socket_timeout`` (connecting too); an RQ worker's client reads
    for its dequeue timeout + 10 s. Nothing is left to redis-py's default of the day."""
    s = settings.model_copy(update={"redis_socket_timeout": 7.0, "worker_dequeue_timeout": 30})
    plain, rq_client = connect(s), connect(s, dequeue=True)
    try:
        kw, rq_kw = plain.connection_pool.connection_kwargs, rq_client.connection_pool.connection_kwargs
        assert (kw["socket_timeout"], kw["socket_connect_timeout"]) == (7.0, 7.0)
        assert (rq_kw["socket_timeout"], rq_kw["socket_connect_timeout"]) == (40.0, 7.0)
        # and the server answers through both
        assert plain.ping() and rq_client.ping()
    finally:
        plain.close()
        rq_client.close()
