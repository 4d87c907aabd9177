"""What a batch's record stage writes: the exact rows a delivery leaves behind, the histories the
readers show from them (``notifyctl events``, the API, ``dlq show``), and the writes of an OTP's job."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from rq import Queue
from rq.worker.base import BaseWorker
from sqlalchemy import event, select
from sqlalchemy.dialects.postgresql.psycopg2 import EXECUTEMANY_VALUES_PLUS_BATCH
from sqlalchemy.engine import Engine
from sqlmodel import Session

from notifyctl import keys
from notifyctl.bulk import rows_where_in
from notifyctl.context import Context
from notifyctl.dlq import show_entry
from notifyctl.models import Delivery, DeliveryEvent, utcnow
from notifyctl.secretdata import erased_fields
from notifyctl.tracking import implied_events, timeline
from sandboxes.smtp import SmtpSandbox
from tests.util import IOS_TOKEN, deliveries, drain, notification, seed, send
from worker import jobs
from worker.claims import OK, Claims
from worker.pipeline import Runtime, delivery_id, process
from worker.pipeline.batch import _DT
from worker.pipeline.record import _bulk_update
from worker.pool import _worker_class
from worker.reconciler import reconcile


def stored(ctx: Context, nid: str) -> list[tuple[str | None, str, str | None]]:
    """The event rows of a notification as stored: (delivery id, status, detail)."""
    with Session(ctx.engine) as s:
        rows = s.execute(
            select(DeliveryEvent).where(DeliveryEvent.notification_id == nid).order_by(DeliveryEvent.id)
        ).scalars()
        return [(e.delivery_id, e.status, e.detail) for e in rows]


def test_a_delivery_sent_by_its_first_batch_leaves_no_event_row(any_db_ctx: Context) -> None:
    ctx = any_db_ctx
    seed(ctx)
    res = send(ctx, channels=["push", "email", "sms"])
    drain(ctx)
    ds = sorted(deliveries(ctx, res.notification_id), key=lambda d: d.channel)
    assert [(d.channel, d.status) for d in ds] == [("email", "sent"), ("push", "sent"), ("sms", "sent")]
    # no row: the delivery's own row says when it was queued and sent, by which provider, under which id
    assert stored(ctx, res.notification_id) == []
    # every reader shows the events it implies: queued at the delivery's queued_at, then sent at its
    # sent_at with the provider's message id, as the worker recorded them before
    t = timeline(ctx, res.notification_id)
    assert [e["status"] for e in t["events"]] == ["queued", "queued", "queued", "sent", "sent", "sent"]
    for d in ds:
        mine = [e for e in t["events"] if e["delivery_id"] == d.id]
        assert [(e["status"], e["at"]) for e in mine] == [("queued", d.queued_at), ("sent", d.sent_at)]
        assert mine[0]["id"] is None and mine[0]["detail"] is None
        assert mine[1]["id"] is None and mine[1]["detail"] == f"outbox: {d.provider_message_id}"
        assert mine[1]["notification_id"] == res.notification_id
    shown = show_entry(ctx, ds[0].id)
    assert [(e["status"], e["detail"]) for e in shown["events"]] == [
        ("queued", None),
        ("sent", f"outbox: {ds[0].provider_message_id}"),
    ]


def test_suppressed_at_fan_out_stays_one_row_with_nothing_implied(any_db_ctx: Context) -> None:
    ctx = any_db_ctx
    seed(ctx)
    res = send(ctx, recipient_id="carol", channels=["push", "email"])  # carol has no device token
    drain(ctx)
    rows = stored(ctx, res.notification_id)
    assert [status for _, status, _ in rows] == ["suppressed"]  # (the email's sent: implied)
    statuses = [e["status"] for e in timeline(ctx, res.notification_id)["events"]]
    assert sorted(statuses) == ["queued", "sent", "suppressed"]
    assert statuses.index("queued") < statuses.index("sent")


def test_a_first_failure_keeps_its_queued_row(mctx: Context, smtp: SmtpSandbox) -> None:
    """A delivery created and failed by one batch: both rows stay (a first stored ``failed`` is a
    delivery refused at fan-out, which never was queued)."""
    smtp.faults.add({"smtp_code": 550, "smtp_message": "5.1.1 no such user", "match": "alice@", "count": -1})
    res = send(mctx, channels=["email"])
    drain(mctx)
    (d,) = deliveries(mctx, res.notification_id)
    assert d.status == "failed"
    assert [(did, status) for did, status, _ in stored(mctx, res.notification_id)] == [
        (d.id, "queued"),
        (d.id, "failed"),
    ]
    assert [e["status"] for e in timeline(mctx, res.notification_id)["events"]] == ["queued", "failed"]


def test_retried_then_sent(mctx: Context, smtp: SmtpSandbox) -> None:
    smtp.faults.add({"smtp_code": 451, "smtp_message": "4.3.0 try later", "match": "alice@", "count": 1})
    res = send(mctx, channels=["email"])
    drain(mctx)
    (d,) = deliveries(mctx, res.notification_id)
    assert d.status == "retrying"
    assert [status for _, status, _ in stored(mctx, res.notification_id)] == ["retrying"]
    assert reconcile(mctx, now=time.time() + 31, force=True).retries_queued == 1
    drain(mctx)
    (d,) = deliveries(mctx, res.notification_id)
    assert d.status == "sent"
    assert [status for _, status, _ in stored(mctx, res.notification_id)] == ["retrying", "sent"]
    t = timeline(mctx, res.notification_id)["events"]
    assert [e["status"] for e in t] == ["queued", "retrying", "sent"]
    assert t[0]["at"] == d.queued_at and t[0]["at"] <= t[1]["at"]


def test_a_first_send_in_doubt_keeps_all_its_rows(mctx: Context, smtp: SmtpSandbox) -> None:
    """A delivery created by a batch that finds its send record held by a dead worker: sent again,
    in doubt — nothing is implied, its three events are stored in order, the ``sent`` one with the
    detail a plain send's row implies (``Record.fresh_sent``'s event, built because it is stored)."""
    res = send(mctx, channels=["email"])
    did = delivery_id(res.notification_id, "email", "alice@example.com")
    dead = Claims(mctx.redis, "host-a-dead", 0.3, 60)  # a worker killed inside its provider call
    assert dead.take([did]) == [OK] and dead.fence([did]) == [True]
    dead.close()
    time.sleep(0.5)  # its lease ran out: the first batch to see the notification takes it over
    rt = Runtime(mctx, "host-b-1")
    try:
        stats = process(rt, [res.notification_id])
    finally:
        rt.close()
    assert (stats.created, stats.in_doubt, stats.sent) == (1, 1, 1)  # one batch: created, in doubt, sent
    (d,) = deliveries(mctx, res.notification_id)
    assert d.status == "sent" and d.provider_message_id
    rows = stored(mctx, res.notification_id)
    assert [(x, status) for x, status, _ in rows] == [(did, "queued"), (did, "in_doubt"), (did, "sent")]
    assert rows[0][2] is None and "host-a-dead" in (rows[1][2] or "")
    assert rows[2][2] == f"smtp: {d.provider_message_id}"
    t = timeline(mctx, res.notification_id)["events"]
    assert [e["status"] for e in t] == ["queued", "in_doubt", "sent"]


def test_a_send_whose_rows_another_worker_wrote_first_stays_on_record(mctx: Context, smtp: SmtpSandbox) -> None:
    """A batch's new deliveries collide with the rows another worker committed while this one was
    sending (a takeover): its writes roll back, and its send — which left no event of its own to
    write, the row implying it — is recorded as an event all the same, then it reloads and goes on."""
    seed(mctx)
    smtp.faults.add({"stage": "data", "delay": 1.5, "match": "alice@", "count": 1})
    res = send(mctx, channels=["email"])
    did = delivery_id(res.notification_id, "email", "alice@example.com")
    rt = Runtime(mctx, "w-slow")
    done: list[Any] = []
    worker = threading.Thread(target=lambda: done.append(process(rt, [res.notification_id])))
    worker.start()
    try:
        time.sleep(0.5)  # the worker is in its provider call: another one records the delivery first
        now = utcnow()
        with Session(mctx.engine) as s:
            s.add(Delivery(id=did, notification_id=res.notification_id, user_id="alice", channel="email", route="email",
                           address="alice@example.com", status="sent", provider="smtp", provider_message_id="other",
                           attempts=1, queued_at=now, sent_at=now, updated_at=now))  # fmt: skip
            s.commit()
        worker.join(20)
    finally:
        rt.close()
    assert done, "process did not return"
    (d,) = deliveries(mctx, res.notification_id)
    assert (d.status, d.provider_message_id) == ("sent", "other")  # the other worker's record stands
    rows = stored(mctx, res.notification_id)
    assert [(x, status) for x, status, _ in rows] == [(did, "sent")]
    assert (rows[0][2] or "").endswith("(also recorded by another worker)"), rows
    assert notification(mctx, res.notification_id).status == "done"


def test_implied_events_order() -> None:
    """The implied ``queued`` goes before the first event at or after its time, and before the
    delivery's own first event whatever the clocks said; older histories are left as they are."""
    from datetime import UTC, datetime

    t0, t1, t2 = (datetime(2026, 1, 1, 0, 0, s, tzinfo=UTC) for s in (0, 1, 2))

    def ev(did: str, status: str, at: datetime) -> dict[str, Any]:
        return {"id": 1, "notification_id": "n", "delivery_id": did, "status": status, "detail": None, "at": at}

    got = implied_events([ev("a", "suppressed", t1), ev("b", "sent", t1), ev("b", "opened", t2)], {"a": t1, "b": t1})
    assert [(e["delivery_id"], e["status"]) for e in got] == [("b", "queued"), ("a", "suppressed"), ("b", "sent"),
                                                             ("b", "opened")]  # fmt: skip
    skewed = implied_events([ev("b", "sent", t0)], {"b": t2})
    assert [(e["status"], e["at"]) for e in skewed] == [("queued", t2), ("sent", t0)]
    old = [ev("b", "queued", t0), ev("b", "sent", t1)]
    assert implied_events(old, {"b": t0}) == old
    assert implied_events([], {}) == []
    # a delivery sent by the batch that created it: its queued and sent from its row, the sent before
    # its webhooks' events, after what was stored at the same time
    got = implied_events(
        [ev("a", "suppressed", t1), ev("b", "opened", t2)], {"a": t1, "b": t0}, {"b": ("n", t1, "p: m")}
    )
    assert [(e["delivery_id"], e["status"], e["detail"], e["at"]) for e in got] == [
        ("b", "queued", None, t0), ("a", "suppressed", None, t1), ("b", "sent", "p: m", t1), ("b", "opened", None, t2)]  # fmt: skip
    assert got[2]["id"] is None and got[2]["notification_id"] == "n"
    only = implied_events([], {"b": t0}, {"b": ("n", t1, "p: m")})  # nothing stored at all
    assert [(e["status"], e["at"]) for e in only] == [("queued", t0), ("sent", t1)]
    assert implied_events(old, {"b": t0}, {"b": ("n", t1, "x")}) == old  # a stored sent: nothing implied


def _sql_statements(ctx: Context) -> tuple[list[str], Any]:
    seen: list[str] = []

    def on_exec(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        seen.append(" ".join(statement.split()[:2]))

    event.listen(Engine, "before_cursor_execute", on_exec)  # (the worker makes its own engine)
    return seen, on_exec


def test_an_otp_job_writes_its_notification_once(any_db_ctx: Context) -> None:
    """Status and erased secret data in one UPDATE; the delivery in one INSERT, and no event row
    (its queued and sent are implied by the delivery's row)."""
    ctx = any_db_ctx
    seed(ctx)
    res = send(ctx, template_id="otp_code", channels=["sms"], data={"code": "482913", "minutes": 10})
    seen, on_exec = _sql_statements(ctx)
    try:
        drain(ctx)
    finally:
        event.remove(Engine, "before_cursor_execute", on_exec)
    n = notification(ctx, res.notification_id)
    assert n.status == "done" and "code" not in n.data and erased_fields(n.data) == ["code"]
    assert seen.count("UPDATE notifications") == 1, seen
    (d,) = deliveries(ctx, res.notification_id)
    assert d.status == "sent"
    assert stored(ctx, res.notification_id) == []
    assert [e["status"] for e in timeline(ctx, res.notification_id)["events"]] == ["queued", "sent"]


def test_rq_heartbeat_refreshes_the_worker_key_once_in_a_while(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    """RQ's default worker-key refresh runs at most once per RQ_HEARTBEAT_EVERY seconds on its own
    (it ran three times around every job)."""
    seed(ctx)
    for i in range(8):
        send(ctx, template_id="otp_code", channels=["sms"], data={"code": f"{i:06d}", "minutes": 10})
    alone: list[int | None] = []
    real = BaseWorker.heartbeat

    def counted(self: BaseWorker, timeout: int | None = None, pipeline: Any = None) -> None:
        if pipeline is None:
            alone.append(timeout)
        real(self, timeout, pipeline)

    monkeypatch.setattr(BaseWorker, "heartbeat", counted)
    w = _worker_class(1)([Queue(keys.queue_name("high"), connection=ctx.redis)], connection=ctx.redis, name="hb")
    jobs.configure(ctx, worker_name="hb")
    try:
        assert w.work(burst=True, logging_level="WARNING")
    finally:
        jobs.close()
    assert len(deliveries(ctx)) == 8 and all(d.status == "sent" for d in deliveries(ctx))
    assert alone.count(None) <= 2, alone  # 8 jobs: 24 refreshes before


def test_loads_by_id_prepared_once_per_connection(any_db_ctx: Context) -> None:
    """``rows_where_in(prepared=True)``: the same rows as an IN list; on PostgreSQL one PREPARE per
    server session (again after a reconnect), then only EXECUTEs."""
    ctx = any_db_ctx
    seed(ctx)
    seen, on_exec = _sql_statements(ctx)
    try:
        for _ in range(2):
            with ctx.engine.connect() as conn:
                for _ in range(2):
                    got = rows_where_in(conn, "SELECT id, email FROM users", "id", ["bob", "alice", "zoe"], "", True)
                    assert sorted(got) == [("alice", "alice@example.com"), ("bob", "bob@example.com")]
                assert rows_where_in(conn, "SELECT id FROM users", "id", [], "", True) == []
                if ctx.engine.dialect.name == "postgresql":
                    conn.invalidate()  # a new server session: its statements must be prepared again
    finally:
        event.remove(Engine, "before_cursor_execute", on_exec)
    if ctx.engine.dialect.name == "postgresql":
        assert [s.split()[0] for s in seen] == ["PREPARE", "EXECUTE", "EXECUTE"] * 2, seen
    else:
        assert seen == ["SELECT id,"] * 4, seen


def test_retried_deliveries_updated_in_batches_on_postgresql(any_db_ctx: Context) -> None:
    """A batch's updates to deliveries already in SQL (an executemany UPDATE): on PostgreSQL through
    psycopg2's execute_batch (one round trip per 100, not one per row); the rows end as written."""
    ctx = any_db_ctx
    seed(ctx)
    if ctx.engine.dialect.name == "postgresql":
        assert ctx.engine.dialect.executemany_mode is EXECUTEMANY_VALUES_PLUS_BATCH  # type: ignore[attr-defined]
    res = [send(ctx, recipient_id=u, channels=["email"]) for u in ("alice", "bob", "carol")]
    drain(ctx)
    ds = [d for r in res for d in deliveries(ctx, r.notification_id)]
    with Session(ctx.engine) as s:
        rows = [{"id": d.id, "status": "retrying", "attempts": 5, "reason": f"r{i}"} for i, d in enumerate(ds)]
        _bulk_update(s, _DT, rows, only_from=["sent"])
        s.commit()
    got = {d.id: (d.status, d.attempts, d.reason) for r in res for d in deliveries(ctx, r.notification_id)}
    assert got == {d.id: ("retrying", 5, f"r{i}") for i, d in enumerate(ds)}


_TIMES = ("queued_at", "updated_at", "sent_at", "suppressed_at", "failed_at", "next_attempt_at")


def _stored_deliveries(ctx: Context, nids: list[str]) -> set[tuple[Any, ...]]:
    """These notifications' deliveries as SQLite stores them: every column's value and storage
    class (``typeof``), less the ids and the provider's message id, and for a time its length (two
    batches' times differ)."""
    cols = [c.name for c in _DT.c if c.name not in ("id", "notification_id", "provider_message_id")]
    sql = f"SELECT {', '.join(f'{c}, typeof({c})' for c in cols)} FROM deliveries"
    with ctx.engine.connect() as conn:
        rows = rows_where_in(conn, sql, "notification_id", nids)
    assert len(rows) == len(nids)
    return {
        tuple(
            (c, len(r[2 * i]) if c in _TIMES and r[2 * i] is not None else r[2 * i], r[2 * i + 1])
            for i, c in enumerate(cols)
        )  # fmt: skip
        for r in rows
    }


def test_a_batchs_constant_delivery_columns_store_what_bound_ones_store(ctx: Context) -> None:
    """A batch of 50 or more new deliveries on SQLite: the columns with one value down the batch
    (its channel, flags, times) are written into the INSERT's text, never an address or a user id,
    and store exactly what the same rows bound on each row (a smaller batch's) store — value and
    storage class; columns whose values differ (status, route) stay bound."""
    seed(ctx)  # alice has an iOS token, carol none (her push is suppressed); high: past the rate limits
    users = ["alice", "carol"] * 30
    big = [send(ctx, recipient_id=u, channels=["push"], priority="high").notification_id for u in users]
    small = [send(ctx, recipient_id=u, channels=["push"], priority="high").notification_id for u in users[:10]]
    seen: list[str] = []

    def on_exec(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        if statement.startswith("INSERT INTO deliveries"):
            seen.append(statement)

    rt = Runtime(ctx, worker_name="w-constant")
    event.listen(Engine, "before_cursor_execute", on_exec)
    try:
        assert (lambda s: (s.sent, s.suppressed))(process(rt, big)) == (30, 30)
        assert (lambda s: (s.sent, s.suppressed))(process(rt, small)) == (5, 5)
    finally:
        event.remove(Engine, "before_cursor_execute", on_exec)
        rt.close()
    assert len(seen) == 2
    marks: list[dict[str, str]] = []
    for statement in seen:
        head, values = statement.split(" VALUES ")
        columns = [c.strip().strip('"') for c in head.split("(", 1)[1].rstrip(")").split(",")]
        marks.append(dict(zip(columns, [m.strip() for m in values.strip()[1:-1].split(",")], strict=True)))
    written = {c: m for c, m in marks[0].items() if m != "?"}
    assert written["channel"] == "'push'" and written["dead_lettered"] == "0" and written["failed_at"] == "NULL"
    assert {"queued_at", "updated_at", "next_attempt_at"} <= set(written)
    assert not {"id", "notification_id", "user_id", "address", "status", "route", "sent_at"} & set(written)
    assert IOS_TOKEN not in seen[0] and "alice" not in seen[0]
    assert set(marks[1].values()) == {"?"}  # (fewer than 50 rows: all bound)
    assert _stored_deliveries(ctx, big) == _stored_deliveries(ctx, small)
