"""What the README promises and no other test held it to (issue 19), each through the interface the
README names: ``status --watch`` and its fields, the RQ queue names ``rq info`` relies on,
``notify_queue_lag_seconds``, the pool firing the DLQ alert by itself, the reconciler re-queuing a
job RQ ended without finishing it, ``NOTIFY_RATE_LIMIT_BYPASS_HIGH=false`` and the default
``sms:*:5/1d`` rule, ``NOTIFY_API_*`` webhook settings from the environment and the log line for an
event about an unknown message, and the 2 s liveness refresh."""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import redis
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from rq.job import Job, JobStatus
from twilio.request_validator import RequestValidator

from notifyctl.circuit import Circuits
from notifyctl.context import Context
from notifyctl.settings import Settings
from tests.conftest import ROOT, cli_env, invoke_cli
from tests.net import ServeProcess
from tests.test_dlq import Hook, add_dead
from tests.test_webhooks import _der_b64, _self_signed, sns_sign
from tests.util import ApiServer, deliveries, notification, queue_depths, seed, send
from worker.pool import run_worker
from worker.reconciler import reconcile

OTP = {"template_id": "otp_code", "channels": ["sms"], "data": {"code": "482913", "minutes": 5}}


def wait_for(predicate: Any, timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll until ``predicate()`` is truthy (its value is returned); fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


class WorkerProcess:
    """``notifyctl worker`` (the pool, not --burst) as a real subprocess, stopped with SIGTERM."""

    def __init__(self, settings: Settings, *args: str, **env: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "notifyctl.cli.main", "worker", *args],
            env=cli_env(settings, **env),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr = ""

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            _out, self.stderr = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, self.stderr = self.proc.communicate()


def rq_workers(ctx: Context) -> list[Any]:
    from rq import Worker

    return list(Worker.all(connection=ctx.redis))


# ───────────────────────────────────────────────────────────────────────── status --watch


def test_status_watch_shows_queues_oldest_age_workers_sent_last_minute_and_circuits(ctx: Context) -> None:
    seed(ctx)
    sent = send(ctx, channels=["email"], dedup_key="watch-sent")
    run_worker(ctx.settings, ["normal"], burst=True)
    assert [d.status for d in deliveries(ctx, sent.notification_id)] == ["sent"]
    before_send = time.time()
    waiting = send(ctx, channels=["email"], dedup_key="watch-waiting")
    after_send = time.time()
    assert waiting.status == "queued"
    # one provider's circuit open, as failing batches leave it; for an hour, so that it is still open
    # however long the machine takes to get to the snapshots (the default 30 s ran out under load)
    circuits = Circuits(ctx.redis, ctx.settings.circuit_threshold, 3600)
    for _ in range(ctx.settings.circuit_threshold):
        circuits.record("outbox", ok=False, was="closed")
    # a live worker that serves only `low`, so the normal job stays waiting
    with WorkerProcess(ctx.settings, "--queues", "low"):
        wait_for(lambda: rq_workers(ctx), 60, "the worker to register")
        started = time.time()
        plain = invoke_cli(ctx.settings, "status", "--watch", "--interval", "0.2", "--count", "2")
        as_json = invoke_cli(ctx.settings, "status", "--watch", "--json", "--interval", "0.2", "--count", "2")
        finished = time.time()
        [worker] = rq_workers(ctx)
    assert plain.returncode == 0 and as_json.returncode == 0, plain.stderr + as_json.stderr

    # plain snapshots, one per interval, off a terminal
    out = plain.stdout
    assert len(re.findall(r"^--- .* status$", out, re.M)) == 2, out
    assert out.count("queue notify-high: depth=0 oldest=- ") == 2
    ages = [float(a) for a in re.findall(r"^queue notify-normal: depth=1 oldest=([\d.]+)s ", out, re.M)]
    assert len(ages) == 2 and ages[0] <= ages[1], out
    # the age as shown (0.1 s: within 0.05 s of the true one, which lies between these bounds; the
    # first snapshot can come at once after `started`, as in-process it does)
    assert started - after_send - 0.05 <= ages[0] <= finished - before_send + 0.05, (started - after_send, out)
    assert out.count("workers: 1\n") == 2 and len(re.findall(r"^hosts: 1 \S+$", out, re.M)) == 2, out
    assert out.count(f"worker {worker.name}: host=") == 2 and "queues=notify-low " in out
    assert out.count("sent last minute: email=1\n") == 2
    assert out.count("provider outbox: circuit=open failing_batches=5 ") == 2
    assert out.count("dlq depth: 0\n") == 2

    # --json: one object per line, the same fields
    snaps = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert len(snaps) == 2
    for snap in snaps:
        queues = {q["queue"]: q for q in snap["queues"]}
        assert list(queues) == ["notify-high", "notify-normal", "notify-low"]
        assert queues["notify-normal"]["depth"] == 1 and queues["notify-high"]["oldest_age_s"] is None
        age = queues["notify-normal"]["oldest_age_s"]  # (rounded to 1 ms)
        assert started - after_send - 0.0005 <= age <= finished - before_send + 0.0005, (started - after_send, age)
        assert [(w["name"], w["queues"]) for w in snap["workers"]] == [(worker.name, ["notify-low"])]
        assert snap["sent_last_minute"] == {"email": 1}
        assert snap["providers"]["outbox"]["state"] == "open"
        assert snap["providers"]["outbox"]["failing_batches"] == ctx.settings.circuit_threshold
        assert snap["dlq_depth"] == 0


# ───────────────────────────────────────────────────────────────── queue names for `rq info`


def test_rq_info_sees_the_three_queues_by_name(ctx: Context) -> None:
    seed(ctx)
    send(ctx, **OTP)  # high
    for i in range(2):
        send(ctx, channels=["email"], dedup_key=f"rq-info-{i}")  # normal, one job each
    for i in range(3):
        send(ctx, channels=["email"], dedup_key=f"rq-info-low-{i}", priority="low")
    assert queue_depths(ctx) == {"high": 1, "normal": 2, "low": 3}
    url = invoke_cli(ctx.settings, "redis", "url", "--show-password")
    assert url.returncode == 0, url.stderr
    rq = shutil.which("rq", path=str(Path(sys.executable).parent))
    assert rq, "the rq command is installed with notifyctl"
    info = subprocess.run(
        [rq, "info", "--url", url.stdout.strip(), "--only-queues"], capture_output=True, text=True, timeout=60
    )
    assert info.returncode == 0, info.stderr
    counts = dict(re.findall(r"^(notify-\w+)\s+\|\D*(\d+)", info.stdout, re.M))
    assert counts == {"notify-high": "1", "notify-normal": "2", "notify-low": "3"}, info.stdout


# ─────────────────────────────────────────────────────────────────── notify_queue_lag_seconds


def test_metrics_queue_lag_is_the_age_of_the_oldest_waiting_job(ctx: Context) -> None:
    from notifyctl.api.auth import create_key

    seed(ctx)
    before_send = time.time()
    send(ctx, channels=["email"], dedup_key="lag-1")
    after_send = time.time()
    send(ctx, channels=["email"], dedup_key="lag-2")
    key = create_key(ctx, "metrics").key
    with ApiServer(ctx) as server:
        time.sleep(0.3)  # let the oldest job age measurably (any amount will do)
        asked = time.time()
        body = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30).text
        answered = time.time()
    lag = {p: float(v) for p, v in re.findall(r'^notify_queue_lag_seconds\{priority="(\w+)"\} ([\d.]+)$', body, re.M)}
    # (prometheus_client writes every value as a float: 2.0)
    depth = {p: int(float(v)) for p, v in re.findall(r'^notify_queue_depth\{priority="(\w+)"\} ([\d.]+)$', body, re.M)}
    assert depth == {"high": 0, "normal": 2, "low": 0}
    assert lag["high"] == 0 and lag["low"] == 0
    assert asked - after_send <= lag["normal"] <= answered - before_send + 0.001, (lag, asked - after_send)


# ───────────────────────────────────────────────────────────── the pool fires the DLQ alert


def test_the_pool_posts_the_dlq_alert_to_the_webhook_by_itself(ctx: Context) -> None:
    hook = Hook()
    try:
        add_dead(ctx, 4, timedelta(minutes=1))
        with WorkerProcess(
            ctx.settings,
            "--pool",
            "1",
            NOTIFY_DLQ_ALERT_DEPTH="3",
            NOTIFY_DLQ_ALERT_GROWTH_PER_MIN="1000",
            NOTIFY_DLQ_ALERT_WEBHOOK_URL=hook.url,
            NOTIFY_DLQ_CHECK_S="0.5",  # (default 10 s: the first check 5 s after start)
        ) as pool:
            wait_for(lambda: hook.bodies, 90, "the pool's DLQ alert at the webhook")
        [body] = hook.bodies
        assert body["event"] == "dlq_alert" and body["depth"] == 4 and body["reasons"] == ["depth 4 >= 3"]
        assert hook.paths == ["/hooks/T0KEN-SECRET"]
        assert "DLQ alert: depth 4 >= 3 (depth 4" in pool.stderr
        assert "T0KEN" not in pool.stderr
    finally:
        hook.close()


# ─────────────────────────────────────────── the reconciler re-queues a job RQ ended without finishing it


@pytest.mark.parametrize("ended", [JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED])
def test_reconciler_requeues_a_job_rq_ended_without_finishing_it(ctx: Context, ended: JobStatus) -> None:
    seed(ctx)
    lost = send(ctx, channels=["email"], dedup_key="ended")
    kept = send(ctx, channels=["email"], dedup_key="still-queued")
    old_job = notification(ctx, lost.notification_id).job_id
    kept_job = notification(ctx, kept.notification_id).job_id
    assert old_job and old_job != kept_job
    # RQ took the job off its queue and ended it, but the notification never got done
    job = ctx.queue("normal").fetch_job(old_job)  # (the queue's job class: notifyctl.rqjob.NotifyJob)
    assert job is not None
    ctx.queue("normal").remove(job)
    job.set_status(ended)
    assert notification(ctx, lost.notification_id).status == "queued"

    res = reconcile(ctx, now=time.time() + ctx.settings.recovery_grace + 1, force=True)
    assert res.recovered == 1
    assert notification(ctx, kept.notification_id).job_id == kept_job  # a job still in its queue is left alone
    new_job = notification(ctx, lost.notification_id).job_id
    assert new_job != old_job and Job.fetch(new_job, connection=ctx.redis).get_status() == JobStatus.QUEUED
    run_worker(ctx.settings, ["high", "normal", "low"], burst=True)
    assert [d.status for d in deliveries(ctx, lost.notification_id)] == ["sent"]
    assert [d.status for d in deliveries(ctx, kept.notification_id)] == ["sent"]
    outbox = [json.loads(line) for f in ctx.settings.outbox_dir.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert Counter(m["notification_id"] for m in outbox) == {lost.notification_id: 1, kept.notification_id: 1}


# ────────────────────────────────────────── NOTIFY_RATE_LIMIT_BYPASS_HIGH and the default sms:*:5/1d rule


def test_default_sms_rule_and_high_priority_bypass_switched_off(ctx: Context) -> None:
    seed(ctx)

    def six(user: str, **payload: Any) -> list[str]:
        return [send(ctx, recipient_id=user, **payload).notification_id for _ in range(6)]

    def statuses(nids: list[str]) -> Counter[str]:
        return Counter(f"{d.status}:{d.reason or ''}" for n in nids for d in deliveries(ctx, n))

    otp_default = six("alice", **OTP)
    normal_sms = six("carol", template_id="order_shipped_v2", channels=["sms"])
    worker = invoke_cli(ctx.settings, "worker", "--burst")  # the defaults: no NOTIFY_RATE_* set
    assert worker.returncode == 0, worker.stderr
    assert statuses(otp_default) == {"sent:": 6}  # high priority: counted, never held back
    assert statuses(normal_sms) == {"sent:": 5, "suppressed:rate_limited:sms": 1}  # sms:*:5/1d

    otp_held = six("bob", **OTP)
    worker = invoke_cli(ctx.settings, "worker", "--burst", NOTIFY_RATE_LIMIT_BYPASS_HIGH="false")
    assert worker.returncode == 0, worker.stderr
    assert statuses(otp_held) == {"sent:": 5, "suppressed:rate_limited:sms": 1}


# ───────────────────────────────── NOTIFY_API_* from the environment; an unknown message is logged, 200


TOPIC = "arn:aws:sns:eu-west-1:123456789012:ses-events"
CERT_URL = "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-readme.pem"


@pytest.fixture
def serve_env(ctx: Context, tmp_path: Path) -> Iterator[dict[str, Any]]:
    sg = ec.generate_private_key(ec.SECP256R1())
    sns = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "sns.pem"
    pem.write_bytes(_self_signed(sns).public_bytes(serialization.Encoding.PEM))
    env = cli_env(
        ctx.settings,
        NOTIFY_CONFIG=str(tmp_path / "absent.toml"),
        NOTIFY_API_TWILIO_AUTH_TOKEN="readme-twilio-token",
        NOTIFY_API_SENDGRID_PUBLIC_KEY=_der_b64(sg),
        NOTIFY_API_SNS_TOPIC_ARNS=json.dumps([TOPIC]),
        NOTIFY_API_SNS_CERT_MAP=json.dumps({CERT_URL: str(pem)}),
    )
    yield {"env": env, "sg": sg, "sns": sns}


def _twilio(http: httpx.Client, token: str, sid: str) -> httpx.Response:
    params = {"MessageSid": sid, "MessageStatus": "delivered"}
    url = f"{http.base_url}".rstrip("/") + "/webhooks/twilio/status"
    sig = RequestValidator(token).compute_signature(url, params)
    return http.post(
        "/webhooks/twilio/status",
        content=urlencode(params).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": sig},
    )


def _sendgrid(http: httpx.Client, key: ec.EllipticCurvePrivateKey, sg_message_id: str) -> httpx.Response:
    raw = json.dumps([{"event": "delivered", "timestamp": int(time.time()), "sg_message_id": sg_message_id,
                       "sg_event_id": sg_message_id + "-ev", "email": "x@example.com"}]).encode()  # fmt: skip
    stamp = str(int(time.time()))
    sig = base64.b64encode(key.sign(stamp.encode() + raw, ec.ECDSA(hashes.SHA256()))).decode()
    return http.post(
        "/webhooks/sendgrid",
        content=raw,
        headers={
            "Content-Type": "application/json",
            "X-Twilio-Email-Event-Webhook-Signature": sig,
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
        },
    )


def _ses(http: httpx.Client, key: rsa.RSAPrivateKey, topic: str, ses_message_id: str) -> httpx.Response:
    record = {"eventType": "Delivery", "mail": {"messageId": ses_message_id, "tags": {}}, "delivery": {}}
    now = time.gmtime()
    msg = {
        "Type": "Notification",
        "MessageId": ses_message_id + "-sns",
        "TopicArn": topic,
        "Message": json.dumps(record),
        "Timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", now),
        "SigningCertURL": CERT_URL,
    }
    return http.post("/webhooks/ses", content=json.dumps(sns_sign(msg, key)).encode(),
                     headers={"Content-Type": "text/plain"})  # fmt: skip


def test_webhook_settings_from_environment_and_unknown_messages_logged(serve_env: dict[str, Any]) -> None:
    with ServeProcess(serve_env["env"]) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        # each provider's webhook believes exactly what the NOTIFY_API_* variables say to believe
        assert _twilio(http, "some-other-token", "SMreadme0wrong").status_code == 403
        r = _twilio(http, "readme-twilio-token", "SMreadme0unknown")
        assert r.status_code == 200 and r.json()["unmatched"] == 1, r.text
        assert _sendgrid(http, ec.generate_private_key(ec.SECP256R1()), "sg-wrong").status_code == 403
        r = _sendgrid(http, serve_env["sg"], "sgreadme0unknown")
        assert r.status_code == 200, r.text
        other_topic = TOPIC.replace("ses-events", "someone-elses")
        assert _ses(http, serve_env["sns"], other_topic, "ses-wrong").status_code == 403
        r = _ses(http, serve_env["sns"], TOPIC, "sesreadme0unknown")
        assert r.status_code == 200, r.text
        # the README: "an event for an unknown message is logged and answered 200"
        for ident in ("SMreadme0unknown", "sgreadme0unknown", "sesreadme0unknown"):
            server.wait_for_stderr(rf"event\(s\) for unknown messages \(ignored\), e\.g\. .*{ident}", 30)
    assert "Traceback" not in server.stderr_text()
    assert "readme-twilio-token" not in server.stderr_text()


# ────────────────────────────────────────────────────────────── the 2 s liveness refresh


def test_workers_refresh_their_liveness_key_every_2_seconds_by_default(ctx: Context, redis_url: str) -> None:
    assert "NOTIFY_WORKER_HEARTBEAT" not in cli_env(ctx.settings)  # the default, nothing else
    sets: list[tuple[float, str]] = []
    # MONITOR on a connection of its own, which may wait long for a loaded machine to start the pool
    watcher = redis.Redis.from_url(redis_url, socket_timeout=300)
    try:
        with watcher.monitor() as mon, WorkerProcess(ctx.settings, "--pool", "1"):
            deadline = time.monotonic() + 180
            for cmd in mon.listen():
                parts = cmd["command"].split()
                if parts[:1] == ["SET"] and parts[1].startswith("notif:alive:"):
                    sets.append((cmd["time"], parts[1]))
                if len(sets) >= 4 or time.monotonic() > deadline:
                    break
    finally:
        watcher.close()
    assert len(sets) >= 4, sets
    assert len({name for _t, name in sets}) == 1  # one worker, one key
    gaps = [b - a for (a, _), (b, _) in zip(sets, sets[1:], strict=False)]
    # timed by the server's own clock: each refresh waits its 2 s after the last one, and at least
    # one of these three waits did not overrun by more than a second, even on a loaded machine
    assert all(g >= 1.95 for g in gaps) and min(gaps) < 3.0, gaps
