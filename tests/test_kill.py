"""Kill -9 a worker mid-send: its work resumes within seconds, nothing is lost, nothing is sent
twice. Real processes: `notifyctl worker --pool 2` as a subprocess, the SMTP sandbox, Redis, SQLite."""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import redis
from rq import Worker
from rq.job import Job

from notifyctl.context import Context
from notifyctl.db import dispose_all
from sandboxes.smtp import SmtpSandbox
from tests.conftest import cli_env, make_settings, start_pool, stop_pool
from tests.util import deliveries, notification, seed, send, wait_for


def test_worker_killed_mid_send_loses_nothing_and_sends_once(home: Path, redis_url: str, rclient: redis.Redis) -> None:
    with SmtpSandbox() as smtp:
        settings = make_settings(
            home, redis_url, providers_email=["smtp"], smtp_host=smtp.host, smtp_port=smtp.port,
            worker_alive_ttl=2, worker_heartbeat=0.5, recovery_grace=1,
        )  # fmt: skip
        ctx = Context(settings)
        seed(ctx)
        # The first message stalls at RCPT (before the sandbox accepts anything) long enough to kill its worker.
        smtp.faults.add({"stage": "rcpt", "delay": 30, "match": "alice@"})
        env = cli_env(
            settings,
            NOTIFY_PROVIDERS_EMAIL='["smtp"]',
            NOTIFY_SMTP_HOST=smtp.host,
            NOTIFY_SMTP_PORT=str(smtp.port),
            NOTIFY_WORKER_ALIVE_TTL="2",
            NOTIFY_WORKER_HEARTBEAT="0.5",
            NOTIFY_CLAIM_TTL="3",
        )
        pool = start_pool(env, "2", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            first = send(ctx, channels=["email"], data={"order_id": "O-0", "tracking_url": "u"})
            users = ["bob", "carol", "alice"]
            rest = [
                send(
                    ctx, channels=["email"], recipient_id=users[i % 3], data={"order_id": f"O-{i}", "tracking_url": "u"}
                )
                for i in range(1, 16)
            ]
            job = notification(ctx, first.notification_id).job_id

            def stuck_worker() -> Worker | None:
                for w in Worker.all(connection=ctx.redis):
                    if w.get_current_job_id() == job:
                        return w
                return None

            victim = wait_for(stuck_worker, 20)
            assert victim is not None, "no worker picked up the first job"
            # kill it only once it is inside the stalled SMTP conversation (the fault has been taken)
            assert wait_for(lambda: smtp.faults.pending() == 0, 20), "the first message never reached the sandbox"
            os.kill(victim.pid, signal.SIGKILL)

            # an OTP sent now still goes out, on the worker dedicated to the high queue
            otp = send(
                ctx, template_id="otp_code", channels=["sms"], recipient_id="dave", data={"code": "1", "minutes": 5}
            )
            assert wait_for(lambda: [d for d in deliveries(ctx, otp.notification_id) if d.status == "sent"], 60)
            otp_job = Job.fetch(notification(ctx, otp.notification_id).job_id, connection=ctx.redis)
            high_only = [w.name for w in Worker.all(connection=ctx.redis) if w.queue_names() == ["notify-high"]]
            assert otp_job.worker_name in high_only, (otp_job.worker_name, high_only)

            all_ids = [first.notification_id] + [r.notification_id for r in rest]

            def all_sent() -> bool:
                ds = [d for n in all_ids for d in deliveries(ctx, n)]
                return len(ds) == len(all_ids) and all(d.status == "sent" for d in ds)

            assert wait_for(all_sent, 120, 0.2), [
                (d.address, d.status, d.reason) for n in all_ids for d in deliveries(ctx, n)
            ]
        finally:
            stop_pool(pool)
        ids = [m["headers"]["X-Notify-Delivery-Id"] for m in smtp.recorder.all()]
        dupes = {k: v for k, v in Counter(ids).items() if v > 1}
        assert dupes == {}, f"sent twice: {dupes}"
        assert len(ids) == 16
        # it was the reconciler that found the abandoned job and queued the notification again
        assert notification(ctx, first.notification_id).job_id != job
        ctx.close()
        dispose_all()
