"""A Redis outage the pool survives is two lines in its log (issue 14 F): one warning when it
starts, one when it ends; no traceback, no ERROR, and the pool sends at once afterwards.

A real ``notifyctl worker --pool 2`` (subprocess) on its own embedded Redis, which is killed
with SIGKILL while the pool is idle and started again from its append-only file a few seconds
later; then an OTP goes out."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import redis

from notifyctl.context import Context
from notifyctl.db import dispose_all
from notifyctl.redisconn import ensure_server, stop_server
from tests.conftest import cli_env, make_settings, start_pool, stop_pool
from tests.util import deliveries, idle_workers, seed, send, wait_for

DOWN = 2.5  # longer than a heartbeat (0.5 s here), a reconciler round (1 s) and RQ's reconnect wait (1 s)


def test_a_redis_outage_is_one_warning_when_it_starts_and_one_when_it_ends(
    home: Path, tmp_path: Path, rclient: redis.Redis
) -> None:
    settings = make_settings(home, None, worker_heartbeat=0.5, redis_socket_timeout=2.0)
    ctx = Context(settings)
    seed(ctx)
    redis_dir = home / "redis"
    env = cli_env(settings, NOTIFY_WORKER_HEARTBEAT="0.5", NOTIFY_REDIS_SOCKET_TIMEOUT="2")
    log_path = tmp_path / "pool.log"
    with open(log_path, "w") as log:
        pool = start_pool(env, "2", stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: idle_workers(ctx) == 2, 30), log_path.read_text()
        before = send(ctx, template_id="otp_code", channels=["sms"], recipient_id="dave",
                      data={"code": "1", "minutes": 5})  # fmt: skip
        assert wait_for(lambda: [d for d in deliveries(ctx, before.notification_id) if d.status == "sent"], 30)
        time.sleep(1.5)  # the AOF (appendfsync everysec) has it

        os.kill(int((redis_dir / "redis.pid").read_text()), signal.SIGKILL)
        time.sleep(DOWN)
        assert pool.poll() is None, log_path.read_text()
        ensure_server(redis_dir)

        after = send(ctx, template_id="otp_code", channels=["sms"], recipient_id="dave",
                     data={"code": "2", "minutes": 5})  # fmt: skip
        assert wait_for(lambda: [d for d in deliveries(ctx, after.notification_id) if d.status == "sent"], 30), (
            log_path.read_text()
        )
        # the pool has noticed that Redis is back (its supervisor checks every second)
        assert wait_for(lambda: "Redis answers again" in log_path.read_text(), 10), log_path.read_text()
        assert pool.poll() is None, log_path.read_text()
    finally:
        stop_pool(pool)
        ctx.close()
        dispose_all()
        stop_server(redis_dir)
    lines = log_path.read_text().splitlines()
    text = "\n".join(lines)
    assert "Traceback" not in text, text
    assert [ln for ln in lines if " ERROR " in ln] == [], text
    assert len([ln for ln in lines if "Redis unreachable" in ln]) == 1, text
    assert len([ln for ln in lines if "Redis answers again" in ln]) == 1, text
    # nothing else: no worker died or was restarted over it
    assert [ln for ln in lines if " WARNING " in ln and "Redis" not in ln] == [], text
