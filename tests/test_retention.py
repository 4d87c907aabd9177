"""Retention (issue 14, C): ``notifyctl purge`` deletes old notifications, deliveries and events in
small batches, keeps what is in flight, in the DLQ or inside the dedup window, and runs beside a
worker that is sending — on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select, update
from sqlmodel import Session
from typer.testing import CliRunner

from bench.common import bulk_notifications, bulk_users, wait_until
from notifyctl import dlq, keys
from notifyctl.cli.main import app
from notifyctl.context import Context
from notifyctl.models import Delivery, DeliveryEvent, Notification, utcnow
from notifyctl.retention import PurgeResult, purge
from sandboxes.smtp import SmtpSandbox
from tests.conftest import cli_env, make_settings
from tests.util import deliveries, drain, notification, seed, send
from worker import jobs
from worker.providers.outbox import read_outbox
from worker.reconciler import reconcile

DEDUP_TTL = 60  # the window; purges below are "older than" it
DEDUP_TTL_DEFAULT = 86400
ORDER = {"order_id": "ORD-1", "tracking_url": "https://t.example/1"}


def tick() -> datetime:
    """The time, once the clock's millisecond has moved on (notification ids carry milliseconds:
    what was made before this moment sorts below it). A spin of at most a millisecond, not a sleep."""
    start = int(utcnow().timestamp() * 1000)
    while True:
        now = utcnow()
        if int(now.timestamp() * 1000) > start:
            return now


def rows(ctx: Context, nids: list[str]) -> tuple[int, int, int]:
    """(notifications, deliveries, events) still stored for these notifications."""
    with Session(ctx.engine) as s:
        n = s.execute(select(func.count()).where(Notification.id.in_(nids))).scalar_one()  # type: ignore[attr-defined]
        d = s.execute(select(func.count()).where(Delivery.notification_id.in_(nids))).scalar_one()  # type: ignore[attr-defined]
        e = s.execute(select(func.count()).where(DeliveryEvent.notification_id.in_(nids))).scalar_one()  # type: ignore[arg-type]
    return n, d, e


@pytest.fixture
def rctx(any_db_ctx: Context, smtp: SmtpSandbox) -> Iterator[Context]:
    """any_db_ctx's database, email through the SMTP sandbox (to make DLQ entries), a short dedup window."""
    s = any_db_ctx.settings
    ctx = Context(
        make_settings(
            s.home,
            str(s.redis_url),
            database_url=s.database_url,
            dedup_ttl=DEDUP_TTL,
            providers_email=["smtp"],
            smtp_host=smtp.host,
            smtp_port=smtp.port,
        )
    )
    yield ctx
    jobs.close()
    ctx.close()


def test_purge_deletes_what_is_over_and_keeps_what_must_stay(rctx: Context, smtp: SmtpSandbox) -> None:
    ctx = rctx
    seed(ctx)
    smtp.faults.add({"smtp_code": 554, "smtp_message": "5.7.1 rejected", "match": "alice@", "count": -1})
    smtp.faults.add({"smtp_code": 554, "smtp_message": "5.7.1 rejected", "match": "carol@", "count": -1})
    smtp.faults.add({"smtp_code": 451, "smtp_message": "4.3.0 later", "match": "bob@", "count": -1})
    # old: created before the cutoff
    sent = send(ctx, recipient_id="dave", template_id="otp_code", channels=["sms"], data={"code": "1", "minutes": 5},
                dedup_key="otp:dave:1")  # fmt: skip
    suppressed = send(ctx, recipient_id="dave", channels=["push"])  # dave has no device: no_address
    in_dlq = send(ctx, recipient_id="alice", channels=["email"])
    dlq_dealt_with = send(ctx, recipient_id="carol", channels=["email"])
    retrying = send(ctx, recipient_id="bob", channels=["email"])
    drain(ctx)
    [dead] = deliveries(ctx, dlq_dealt_with.notification_id)
    assert dlq.purge(ctx, dlq.DlqFilter(ids=[dead.id])).purged == 1  # the operator dealt with it
    lost = send(ctx, recipient_id="dave", channels=["sms"])  # queued, its job lost: in flight
    ctx.queue("normal").empty()
    assert [d.status for d in deliveries(ctx, in_dlq.notification_id)] == ["failed"]
    assert [d.status for d in deliveries(ctx, retrying.notification_id)] == ["retrying"]
    cutoff = tick()
    tick()
    young = send(ctx, recipient_id="dave", template_id="otp_code", channels=["sms"], data={"code": "2", "minutes": 5},
                 dedup_key="otp:dave:2")  # fmt: skip
    drain(ctx)
    assert notification(ctx, young.notification_id).status == "done"

    gone = [sent.notification_id, suppressed.notification_id, dlq_dealt_with.notification_id]
    kept = [in_dlq.notification_id, retrying.notification_id, lost.notification_id, young.notification_id]
    before = rows(ctx, gone)
    # event rows: the push's suppressed, and the DLQ entry's queued, failed and purged (the OTP's
    # queued and sent are implied by its delivery's row: worker.pipeline.record.one_event_when_sent)
    assert before[0] == 3 and before[1] == 3 and before[2] == 4
    kept_before = rows(ctx, kept)

    now = cutoff + timedelta(seconds=DEDUP_TTL)
    dry = purge(ctx, DEDUP_TTL, dry_run=True, now=now, chunk=2)
    assert (dry.notifications, dry.deliveries, dry.events) == before
    assert dry.kept == 3 and rows(ctx, gone) == before  # nothing deleted

    res = purge(ctx, DEDUP_TTL, now=now, chunk=2)
    assert (res.notifications, res.deliveries, res.events) == before
    assert res.kept == 3 and res.batches >= 2
    assert rows(ctx, gone) == (0, 0, 0)
    assert rows(ctx, kept) == kept_before
    # the dedup window holds: what is younger than it stays, and a repeated key is still refused
    ctx.redis.delete(keys.dedup("otp:dave:2"))  # as if Redis had lost it: the SQL record decides
    again = send(ctx, recipient_id="dave", template_id="otp_code", channels=["sms"], data={"code": "3", "minutes": 5},
                 dedup_key="otp:dave:2")  # fmt: skip
    assert (again.status, again.reason, again.notification_id) == ("suppressed", "duplicate", young.notification_id)
    # a second run finds nothing more; the kept ones go once they are over
    assert purge(ctx, DEDUP_TTL, now=now).notifications == 0


def test_an_unfinished_campaign_launch_keeps_its_rows(any_db_ctx: Context) -> None:
    """``campaign launch --resume`` skips the recipients it has by their rows: they stay until it is launched."""
    from notifyctl.models import Campaign

    ctx = any_db_ctx
    seed(ctx)
    res = send(ctx, recipient_id="dave", channels=["sms"])
    drain(ctx)
    with Session(ctx.engine) as s:
        s.add(Campaign(id="c_unfinished", name="promo", template_id="weekly_promo", category="marketing",
                       priority="low", channels=["email"]))  # fmt: skip
        s.execute(update(Notification).where(Notification.id == res.notification_id).values(campaign_id="c_unfinished"))
        s.commit()
    now = tick() + timedelta(seconds=ctx.settings.dedup_ttl)
    assert purge(ctx, ctx.settings.dedup_ttl, now=now).notifications == 0
    with Session(ctx.engine) as s:
        s.execute(update(Campaign).where(Campaign.id == "c_unfinished").values(launched_at=utcnow()))
        s.commit()
    assert purge(ctx, ctx.settings.dedup_ttl, now=now).notifications == 1


def test_purge_beside_a_worker_that_is_sending(any_db_ctx: Context) -> None:
    """Small transactions under the writer lock: the worker keeps sending, nothing is lost or sent twice."""
    s = any_db_ctx.settings
    ctx = Context(make_settings(s.home, str(s.redis_url), database_url=s.database_url, rate_limits=[], batch_size=50))
    users = bulk_users(ctx, 1500)
    old = bulk_notifications(ctx, users, "order_shipped_v2", ["email"], ORDER, category="transactional")
    reconcile(ctx, force=True)
    drain(ctx)
    assert rows(ctx, old)[1] == 1500
    cutoff = tick()
    tick()
    young = bulk_notifications(ctx, users, "order_shipped_v2", ["email"], ORDER, category="transactional")
    reconcile(ctx, force=True)

    def sent_young() -> int:
        with Session(ctx.engine) as session:
            q = select(func.count()).where(Delivery.notification_id.in_(young), Delivery.status == "sent")  # type: ignore[attr-defined]
            return int(session.execute(q).scalar_one())

    drained = threading.Event()
    seen: dict[str, object] = {}

    def first_page(_n: int) -> None:
        if "sending" not in seen:  # once the worker is sending, go on purging beside it
            seen["sending"] = wait_until(lambda: sent_young() > 0, 60, 0.01)

    def run_purge() -> None:
        now = cutoff + timedelta(seconds=DEDUP_TTL_DEFAULT)
        seen["res"] = purge(ctx, DEDUP_TTL_DEFAULT, now=now, chunk=100, progress=first_page)
        seen["worker still sending when the purge ended"] = not drained.is_set()

    purger = threading.Thread(target=run_purge, name="purge-test")
    purger.start()
    try:
        drain(ctx)  # the worker, in this thread (RQ wants the main thread for its signals)
    finally:
        drained.set()
        purger.join(120)
    assert not purger.is_alive() and seen["sending"] is True
    res = seen["res"]
    assert isinstance(res, PurgeResult)
    assert (res.notifications, res.deliveries, res.kept) == (1500, 1500, 0)
    assert rows(ctx, old) == (0, 0, 0)
    assert sent_young() == 1500
    sent = Counter(r["delivery_id"] for r in read_outbox(ctx.settings.outbox_dir, "email"))
    assert len(sent) == 3000 and max(sent.values()) == 1  # the old and the young, each once
    print(f"purge beside a worker ({ctx.engine.dialect.name}): {seen}")
    ctx.close()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--older-than", "1h"], {}, "--older-than: 3600s is inside the dedup window (86400s"),
        (["--older-than", "soon"], {}, "--older-than: expected a duration such as 30m, 2h or 7d, got 'soon'"),
        ([], {}, "--older-than: give one (such as 90d) or set NOTIFY_RETENTION_DAYS"),
        (["--older-than", "200000d"], {}, "--older-than: at most 36500 days"),
    ],
)
def test_purge_cli_bad_input_is_one_line_exit_2(
    ctx: Context, args: list[str], env: dict[str, str], message: str
) -> None:
    res = CliRunner().invoke(app, ["purge", *args], env=cli_env(ctx.settings, **env))
    assert res.exit_code == 2, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1


def test_purge_cli_json_dry_run_and_setting(ctx: Context) -> None:
    seed(ctx)
    send(ctx, recipient_id="dave", channels=["sms"])
    drain(ctx)
    res = CliRunner().invoke(
        app, ["purge", "--dry-run", "--json"], env=cli_env(ctx.settings, NOTIFY_RETENTION_DAYS="90")
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["older_than_s"] == 90 * 86400 and out["dry_run"] is True and out["notifications"] == 0
    bad = CliRunner().invoke(app, ["purge"], env=cli_env(ctx.settings, NOTIFY_RETENTION_DAYS="0"))
    assert bad.exit_code == 3 and "retention_days" in bad.output
    text = CliRunner().invoke(app, ["purge", "--older-than", "90d"], env=cli_env(ctx.settings))
    assert text.exit_code == 0 and "deleted 0 notification(s)" in text.output
