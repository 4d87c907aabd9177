"""Retries, backoff and the DLQ, through the real SMTP provider against the SMTP sandbox."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import redis

from notifyctl.context import Context
from notifyctl.db import dispose_all
from sandboxes.smtp import SmtpSandbox
from tests.conftest import make_settings
from tests.net import ClosedPort
from tests.util import deliveries, drain, events, notification, seed, send
from worker import jobs
from worker.pipeline import retry_delay
from worker.providers.outbox import read_outbox
from worker.reconciler import reconcile


def secs_from_now(dt: datetime | None) -> float:
    assert dt is not None
    return (dt - datetime.now(UTC)).total_seconds()


def test_retry_schedule_then_dlq(mctx: Context, smtp: SmtpSandbox) -> None:
    smtp.faults.add({"smtp_code": 451, "smtp_message": "4.3.0 try later", "match": "alice@", "count": -1})
    res = send(mctx, channels=["email"])
    drain(mctx)
    expected = [30, 300, 1800]
    for attempt, delay in enumerate(expected, start=1):
        (d,) = deliveries(mctx, res.notification_id)
        assert (d.status, d.attempts) == ("retrying", attempt)
        assert "451" in (d.reason or "")
        assert delay - 3 < secs_from_now(d.next_attempt_at) <= delay + 1
        n = notification(mctx, res.notification_id)
        assert n.status == "retrying"
        # not due yet: nothing happens; once due, the reconciler queues it
        assert reconcile(mctx, now=time.time() + delay - 5, force=True).retries_queued == 0
        assert reconcile(mctx, now=time.time() + delay + 1, force=True).retries_queued == 1
        drain(mctx)
    (d,) = deliveries(mctx, res.notification_id)
    assert (d.status, d.attempts, d.dead_lettered) == ("failed", 4, True)
    assert d.reason and d.reason.startswith("retries exhausted")
    assert notification(mctx, res.notification_id).status == "done"
    assert [s for _, s in events(mctx, res.notification_id)] == ["queued", "retrying", "retrying", "retrying", "failed"]
    assert len(smtp.recorder) == 0


def test_retrying_one_channel_never_resends_another(mctx: Context, smtp: SmtpSandbox) -> None:
    smtp.faults.add({"smtp_code": 451, "smtp_message": "4.3.0 try later", "match": "alice@"})
    res = send(mctx, channels=["email", "sms"])
    drain(mctx)
    by = {d.channel: d for d in deliveries(mctx, res.notification_id)}
    assert by["sms"].status == "sent" and by["email"].status == "retrying"
    assert reconcile(mctx, now=time.time() + 31, force=True).retries_queued == 1
    drain(mctx)
    by = {d.channel: d for d in deliveries(mctx, res.notification_id)}
    assert by["email"].status == "sent" and by["email"].attempts == 2
    assert len(read_outbox(mctx.settings.outbox_dir, "sms")) == 1
    msgs = smtp.recorder.all()
    assert len(msgs) == 1 and msgs[0]["headers"]["X-Notify-Delivery-Id"] == by["email"].id
    assert notification(mctx, res.notification_id).status == "done"


def test_permanent_failure_goes_to_dlq_at_once(mctx: Context, smtp: SmtpSandbox) -> None:
    smtp.faults.add({"stage": "data", "smtp_code": 554, "smtp_message": "5.6.0 content rejected"})
    res = send(mctx, channels=["email"])
    drain(mctx)
    (d,) = deliveries(mctx, res.notification_id)
    assert (d.status, d.attempts, d.dead_lettered) == ("failed", 1, True)
    assert "554" in (d.reason or "")


def test_dead_address_fails_without_dlq(mctx: Context, smtp: SmtpSandbox) -> None:
    smtp.faults.add({"smtp_code": 550, "smtp_message": "5.1.1 user unknown", "match": "alice@"})
    res = send(mctx, channels=["email"])
    drain(mctx)
    (d,) = deliveries(mctx, res.notification_id)
    assert d.status == "failed" and not d.dead_lettered and d.reason and d.reason.startswith("invalid_address")


def test_provider_down_retries_then_delivers_once(
    home: Path, redis_url: str, rclient: redis.Redis, smtp: SmtpSandbox, closed_port: ClosedPort
) -> None:
    down = make_settings(home, redis_url, providers_email=["smtp"], smtp_host="127.0.0.1", smtp_port=closed_port.port)
    ctx = Context(down)
    seed(ctx)
    ids = [send(ctx, channels=["email"], recipient_id=u).notification_id for u in ("alice", "bob", "carol")]
    drain(ctx)
    assert {d.status for n in ids for d in deliveries(ctx, n)} == {"retrying"}
    # the provider comes back (here: the settings now point at a live server)
    jobs.close()
    ctx2 = Context(make_settings(home, redis_url, providers_email=["smtp"], smtp_host=smtp.host, smtp_port=smtp.port))
    assert reconcile(ctx2, now=time.time() + 31, force=True).retries_queued == 3
    drain(ctx2)
    assert {d.status for n in ids for d in deliveries(ctx2, n)} == {"sent"}
    assert sorted(m["rcpt_tos"][0] for m in smtp.recorder.all()) == [
        "alice@example.com",
        "bob@example.com",
        "carol@example.com",
    ]
    jobs.close()
    ctx.close()
    ctx2.close()
    dispose_all()


def test_retry_delay_schedule_and_retry_after(settings) -> None:  # type: ignore[no-untyped-def]
    assert [retry_delay(settings, a, None) for a in (1, 2, 3, 4)] == [30, 300, 1800, None]
    assert retry_delay(settings, 1, 120) == 120  # Retry-After can lengthen the wait...
    assert retry_delay(settings, 2, 5) == 300  # ...never shorten it


def test_one_batch_with_mixed_outcomes(mctx: Context, smtp: SmtpSandbox) -> None:
    """Sent, retried, dead address and permanent failure in the same batch, first attempt."""
    from worker.pipeline import Runtime, process

    smtp.faults.add({"smtp_code": 451, "smtp_message": "4.3.0 try later", "match": "bob@"})
    smtp.faults.add({"smtp_code": 550, "smtp_message": "5.1.1 user unknown", "match": "carol@"})
    smtp.faults.add({"stage": "data", "smtp_code": 554, "smtp_message": "5.6.0 rejected", "match": "alice@"})
    import io

    from notifyctl.directory import import_users

    import_users(mctx, io.StringIO("user_id,email\nerin,erin@example.com\n"))
    ids = [send(mctx, channels=["email", "sms"], recipient_id=u).notification_id for u in ("alice", "bob", "carol")]
    ok = send(mctx, channels=["email"], recipient_id="erin")
    stats = process(Runtime(mctx, "w-mixed"), [*ids, ok.notification_id])
    assert stats.notifications == 4
    by = {(d.user_id, d.channel): d for n in ids for d in deliveries(mctx, n)}
    assert by[("alice", "email")].status == "failed" and by[("alice", "email")].dead_lettered
    assert by[("bob", "email")].status == "retrying"
    assert by[("carol", "email")].status == "failed" and not by[("carol", "email")].dead_lettered
    assert {by[(u, "sms")].status for u in ("alice", "bob", "carol")} == {"sent"}
    assert all(by[(u, "sms")].provider_message_id and by[(u, "sms")].sent_at for u in ("alice", "bob", "carol"))
    assert by[("bob", "email")].next_attempt_at is not None
    (d_ok,) = deliveries(mctx, ok.notification_id)
    assert d_ok.status == "sent" and d_ok.provider_message_id and d_ok.provider == "smtp"
