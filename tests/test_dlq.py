"""The DLQ: an SMTP outage (the real SMTP provider against the SMTP sandbox) fills it; after the
fix, replay delivers each entry exactly once; list/show/purge/stats through the CLI; alerts to a
real local HTTP server."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import typer
from sqlalchemy import event, insert, select
from sqlalchemy.engine import Engine
from sqlmodel import Session
from typer.testing import CliRunner

from notifyctl import keys
from notifyctl.alerts import check_dlq_alert
from notifyctl.cli import dlq as dlq_cli
from notifyctl.cli.main import NotifyGroup
from notifyctl.context import Context
from notifyctl.dlq import CHUNK, DlqFilter, replay, stats
from notifyctl.models import Delivery, DeliveryEvent, Notification, new_id, utcnow
from notifyctl.settings import DlqConfig, Settings
from sandboxes.smtp import SmtpSandbox
from tests.conftest import cli_env, smtp_context
from tests.net import ClosedPort
from tests.util import deliveries, drain, events, notification, send
from worker.reconciler import reconcile

# The noun as main.py will mount it: errors become one line + exit code through NotifyGroup.
root = typer.Typer(cls=NotifyGroup, pretty_exceptions_enable=False)
root.add_typer(dlq_cli.app, name="dlq")


@root.callback()
def _root() -> None:
    pass


runner = CliRunner()
OUTAGE = {"smtp_code": 554, "smtp_message": "5.3.0 outage", "stage": "data", "count": -1}


def cli(ctx: Context, *args: str, input: str | None = None) -> Any:
    return runner.invoke(root, ["dlq", *args], input=input, env=cli_env(ctx.settings))


def cli_json(ctx: Context, *args: str) -> Any:
    r = cli(ctx, *args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture
def mctx(home: Path, redis_url: str, rclient: redis.Redis, smtp: SmtpSandbox) -> Iterator[Context]:
    # these tests are about the DLQ: keep the provider's circuit closed
    with smtp_context(home, redis_url, smtp, circuit_threshold=1000) as ctx:
        yield ctx


def sent_counts(sb: SmtpSandbox) -> Counter[str]:
    return Counter(m["delivery_id"] for m in sb.recorder.all())


def fill_dlq_with_outage(ctx: Context, sb: SmtpSandbox, per_user: int = 2) -> list[str]:
    sb.faults.add(OUTAGE)
    nids = []
    for user in ("alice", "bob", "carol"):
        for i in range(per_user):
            res = send(
                ctx,
                recipient_id=user,
                channels=["email"],
                data={"order_id": f"ORD-{user}-{i}", "tracking_url": "https://t.example/1"},
            )
            nids.append(res.notification_id)
    drain(ctx)
    return nids


def test_outage_fills_dlq_then_replay_delivers_each_exactly_once(
    mctx: Context, smtp: SmtpSandbox, rclient: redis.Redis
) -> None:
    nids = fill_dlq_with_outage(mctx, smtp)
    ds = deliveries(mctx)
    assert len(ds) == 6 and all(d.status == "failed" and d.dead_lettered for d in ds)
    assert len(smtp.recorder) == 0

    rows = cli_json(mctx, "list")
    assert {r["delivery_id"] for r in rows} == {d.id for d in ds}
    r0 = rows[0]
    assert r0["template_id"] == "order_shipped_v2" and r0["channel"] == "email" and r0["provider"] == "smtp"
    assert r0["attempts"] == 1 and "5.3.0 outage" in r0["reason"] and r0["failed_at"].endswith("Z")
    assert "@example.com" in r0["address"] and r0["address"] not in ("alice@example.com", "bob@example.com")
    assert len(cli_json(mctx, "list", "--error", "5.3.0 OUTAGE")) == 6  # substring, case-insensitive
    assert cli_json(mctx, "list", "--error", "timeout") == []
    assert cli_json(mctx, "list", "--channel", "push") == []
    assert len(cli_json(mctx, "list", "--provider", "smtp", "--template", "order_shipped_v2")) == 6
    assert cli_json(mctx, "list", "--template", "otp_code") == []
    assert cli_json(mctx, "list", "--older-than", "1h") == []
    assert len(cli_json(mctx, "list", "--newer-than", "1h")) == 6
    assert len(cli_json(mctx, "list", "--limit", "2")) == 2
    table = cli(mctx, "list")
    assert table.exit_code == 0 and "DLQ: 6 entries" in table.stdout and "outage" in table.stdout

    st = cli_json(mctx, "stats")
    assert st["depth"] == 6 and st["entered_in_window"] == 6 and st["growth_per_min"] == pytest.approx(6 / 5)
    assert st["by_channel"] == {"email": 6} and st["by_provider"] == {"smtp": 6}

    # Meanwhile one of them went out after all (e.g. by another path): its send record says so.
    already = ds[0].id
    rclient.set(keys.sent(already), "sent:<prov-123@sandbox>")

    dry = cli_json(mctx, "replay", "--all", "--dry-run")
    assert dry["dry_run"] and dry["replayed"] == 5 and dry["skipped_sent_ids"] == [already]
    assert all(d.dead_lettered for d in deliveries(mctx))  # a dry run changes nothing
    dry_table = cli(mctx, "replay", "--provider", "smtp", "--dry-run")
    assert dry_table.exit_code == 0 and "Would replay 5, skip 1" in dry_table.stdout

    smtp.faults.clear()
    res = cli_json(mctx, "replay", "--provider", "smtp", "--error", "outage")
    assert (res["matched"], res["replayed"], res["skipped_sent"]) == (6, 5, 1)
    by_id = {d.id: d for d in deliveries(mctx)}
    skipped = by_id.pop(already)
    assert (skipped.status, skipped.dead_lettered, skipped.provider_message_id) == (
        "sent",
        False,
        "<prov-123@sandbox>",
    )
    for d in by_id.values():
        assert (d.status, d.attempts, d.dead_lettered, d.reason) == ("retrying", 0, False, None)
        assert d.next_attempt_at is not None and d.next_attempt_at <= utcnow()
        assert (d.id, "replayed") in events(mctx, d.notification_id)
    replayed_nids = {d.notification_id for d in by_id.values()}
    for nid in replayed_nids:
        n = notification(mctx, nid)
        assert n.status == "retrying" and n.due_at <= utcnow()
    assert cli_json(mctx, "list") == []
    assert cli_json(mctx, "stats")["depth"] == 0

    # The reconciler (the worker pool's, here one forced round) queues them; the workers send.
    assert reconcile(mctx, force=True).retries_queued == len(replayed_nids)
    drain(mctx)
    counts = sent_counts(smtp)
    assert counts == {d: 1 for d in by_id}  # each replayed one exactly once, the already-sent one never
    assert all(d.status == "sent" and not d.dead_lettered for d in deliveries(mctx))
    assert {notification(mctx, nid).status for nid in nids} == {"done"}

    # Replaying again finds nothing; another reconcile + drain sends nothing more.
    assert cli_json(mctx, "replay", "--all")["replayed"] == 0
    reconcile(mctx, now=time.time() + 3600, force=True)
    drain(mctx)
    assert sent_counts(smtp) == counts
    again = cli(mctx, "replay", already)
    assert again.exit_code == 4 and again.stderr.strip() == f"error: delivery {already!r} is not in the DLQ"


def test_retries_exhausted_then_replay_one_by_id(mctx: Context, smtp: SmtpSandbox) -> None:
    smtp.faults.add({"smtp_code": 451, "smtp_message": "4.3.0 try later", "count": -1})
    a = send(mctx, recipient_id="alice", channels=["email"]).notification_id
    b = send(mctx, recipient_id="bob", channels=["email"]).notification_id
    drain(mctx)
    for delay in mctx.settings.retry_delays:
        assert reconcile(mctx, now=time.time() + delay + 1, force=True).retries_queued == 2
        drain(mctx)
    dead = {d.notification_id: d for d in deliveries(mctx)}
    assert all(d.dead_lettered and d.attempts == 4 for d in dead.values())
    assert len(cli_json(mctx, "list", "--error", "retries exhausted")) == 2

    smtp.faults.clear()
    one = dead[a].id
    r = cli(mctx, "replay", one)
    assert r.exit_code == 0 and "replayed 1" in r.stdout
    reconcile(mctx, force=True)
    drain(mctx)
    assert sent_counts(smtp) == {one: 1}
    assert [x["delivery_id"] for x in cli_json(mctx, "list")] == [dead[b].id]

    # The library call the lead can run when a provider's circuit closes again.
    res = replay(mctx, DlqFilter.build(provider="smtp"))
    assert res.replayed == [dead[b].id] and res.skipped_sent == []
    reconcile(mctx, force=True)
    drain(mctx)
    assert sent_counts(smtp) == {one: 1, dead[b].id: 1}


def test_show_and_purge(mctx: Context, smtp: SmtpSandbox) -> None:
    fill_dlq_with_outage(mctx, smtp, per_user=1)
    ds = deliveries(mctx)
    shown = cli_json(mctx, "show", ds[0].id)
    assert shown["in_dlq"] is True and shown["delivery"]["id"] == ds[0].id
    assert shown["notification"]["template_id"] == "order_shipped_v2"
    assert [e["status"] for e in shown["events"]] == ["queued", "failed"]
    assert "outage" in shown["events"][-1]["detail"]
    text = cli(mctx, "show", ds[0].id)
    assert text.exit_code == 0 and "in DLQ" in text.stdout and "Timeline" in text.stdout
    missing = cli(mctx, "show", "d_nope")
    assert missing.exit_code == 4 and missing.stderr.strip() == "error: no delivery 'd_nope'"

    # Confirmation: no → nothing purged.
    r = cli(mctx, "purge", "--channel", "email", input="n\n")
    assert r.exit_code == 1 and "Purge 3 DLQ entries?" in r.output
    assert len(cli_json(mctx, "list")) == 3
    assert cli_json(mctx, "purge", "--all", "--dry-run")["purged"] == 3
    assert len(cli_json(mctx, "list")) == 3

    r = cli(mctx, "purge", ds[0].id, input="y\n")
    assert r.exit_code == 0 and "purged 1 (email 1)" in r.stdout
    res = cli_json(mctx, "purge", "--all", "--yes")
    assert (res["matched"], res["purged"], res["by_channel"]) == (2, 2, {"email": 2})
    assert cli_json(mctx, "list") == []
    for d in deliveries(mctx):
        assert d.status == "failed" and not d.dead_lettered and "outage" in (d.reason or "")
        assert events(mctx, d.notification_id)[-1] == (d.id, "purged")
    assert cli_json(mctx, "purge", "--all", "--yes")["purged"] == 0
    gone = cli(mctx, "replay", ds[1].id)
    assert gone.exit_code == 4 and "is not in the DLQ" in gone.stderr
    assert reconcile(mctx, now=time.time() + 7200, force=True).retries_queued == 0
    drain(mctx)
    assert len(smtp.recorder) == 0


BAD = [
    (["list", "--channel", "fax"], "--channel: unknown channel 'fax'"),
    (["list", "--provider", "pigeon"], "--provider: unknown provider 'pigeon'"),
    (["list", "--older-than", "5x"], "--older-than: expected a duration"),
    (["list", "--newer-than", "0m"], "--newer-than: expected a duration"),
    (["list", "--older-than", "2h", "--newer-than", "1h"], "--newer-than must be longer"),
    (["list", "--limit", "0"], "--limit: must be at least 1"),
    (["list", "--error", " "], "--error: empty text"),
    (["list", "--before", " "], "--before: empty delivery id"),
    (["replay"], "say what to replay"),
    (["replay", "d_x", "--all"], "not both"),
    (["replay", "d_x", "--channel", "email"], "not both"),
    (["replay", "--all", "--channel", "email"], "--all replays every entry"),
    (["replay", "--all", "--limit", "-3"], "--limit: must be at least 1"),
    (["purge", "--older-than", "abc"], "--older-than: expected a duration"),
    (["purge"], "say what to purge"),
    (["stats", "--window", "0"], "--window: must be > 0"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flags_are_one_line_exit_2(ctx: Context, args: list[str], message: str) -> None:
    r = cli(ctx, *args)
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr
    assert r.stdout == ""


def test_unknown_flag_and_non_integer_are_exit_2(ctx: Context) -> None:
    assert cli(ctx, "list", "--colour", "red").exit_code == 2
    assert cli(ctx, "list", "--limit", "many").exit_code == 2


# ── stats and alerts ─────────────────────────────────────────────────────────────────────────


def add_dead(ctx: Context, n: int, age: timedelta, channel: str = "sms", provider: str = "twilio") -> None:
    """Dead-lettered deliveries that failed ``age`` ago (rows as the pipeline writes them)."""
    at = utcnow() - age
    notifs, dels = [], []
    for _ in range(n):
        nid = new_id("n")
        notifs.append(
            {
                "id": nid,
                "recipient_id": "u1",
                "type": "otp_code",
                "template_id": "otp_code",
                "category": "transactional",
                "priority": "high",
                "channels": [channel],
                "data": {},
                "status": "done",
                "due_at": at,
                "created_at": at,
                "updated_at": at,
            }
        )
        dels.append(
            {
                "id": new_id("d"),
                "notification_id": nid,
                "user_id": "u1",
                "channel": channel,
                "route": channel,
                "address": "+14155550101",
                "status": "failed",
                "reason": "30007 carrier violation",
                "provider": provider,
                "attempts": 1,
                "dead_lettered": True,
                "queued_at": at,
                "failed_at": at,
                "updated_at": at,
            }
        )
    with Session(ctx.engine) as s:
        s.execute(insert(Notification), notifs)
        s.execute(insert(Delivery), dels)
        s.commit()


class Hook:
    """A real local HTTP server that records POSTed JSON bodies."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        hook = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hook.bodies.append(json.loads(raw))
                hook.paths.append(self.path)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/T0KEN-SECRET"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


def test_stats_depth_and_growth_window(any_db_ctx: Context) -> None:
    add_dead(any_db_ctx, 10, timedelta(minutes=1))
    add_dead(any_db_ctx, 4, timedelta(hours=2), channel="email", provider="smtp")
    st = stats(any_db_ctx, 5)
    assert (st["depth"], st["entered_in_window"], st["growth_per_min"]) == (14, 10, 2.0)
    assert st["by_channel"] == {"sms": 10, "email": 4} and st["by_provider"] == {"twilio": 10, "smtp": 4}
    assert stats(any_db_ctx, 180)["entered_in_window"] == 14
    assert [
        len(cli_json(any_db_ctx, "list", "--older-than", "1h")),
        len(cli_json(any_db_ctx, "list", "--newer-than", "30m")),
    ] == [
        4,
        10,
    ]


def test_alert_logs_and_posts_webhook_once_then_resolves(
    any_db_ctx: Context, hook: Hook, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = DlqConfig(alert_depth=100, alert_growth_per_min=1.5, alert_window_min=5, alert_webhook_url=hook.url)
    add_dead(any_db_ctx, 3, timedelta(hours=1))
    quiet = check_dlq_alert(any_db_ctx, cfg)
    assert not quiet.firing and not quiet.notified and hook.bodies == []

    add_dead(any_db_ctx, 10, timedelta(minutes=2))  # 10 in 5 min = 2/min >= 1.5
    with caplog.at_level(logging.WARNING, logger="notifyctl.dlq"):
        res = check_dlq_alert(any_db_ctx, cfg)
    assert res.firing and res.notified and res.webhook_status == 200 and res.webhook_error is None
    assert res.reasons == ["growth 2/min >= 1.5/min"]
    [line] = [r.getMessage() for r in caplog.records if r.name == "notifyctl.dlq"]
    assert line.startswith("DLQ alert: growth 2/min >= 1.5/min (depth 13")
    assert "T0KEN" not in caplog.text
    [body] = hook.bodies
    assert hook.paths == ["/hooks/T0KEN-SECRET"]
    assert body["event"] == "dlq_alert" and body["depth"] == 13 and body["growth_per_min"] == 2.0
    assert body["thresholds"] == {"depth": 100, "growth_per_min": 1.5} and body["by_channel"] == {"sms": 13}

    # Still firing a minute later: no repeat within alert_repeat_s.
    again = check_dlq_alert(any_db_ctx, cfg)
    assert again.firing and not again.notified and len(hook.bodies) == 1

    # Depth threshold alone fires too; then purging everything resolves it.
    deep = DlqConfig(alert_depth=5, alert_growth_per_min=None, alert_webhook_url=hook.url, alert_repeat_s=0)
    res = check_dlq_alert(any_db_ctx, deep)
    assert res.notified and res.reasons == ["depth 13 >= 5"] and hook.bodies[-1]["event"] == "dlq_alert"
    assert cli_json(any_db_ctx, "purge", "--all", "--yes")["purged"] == 13
    done = check_dlq_alert(any_db_ctx, deep)
    assert done.resolved and not done.firing and hook.bodies[-1]["event"] == "dlq_alert_resolved"
    assert len(hook.bodies) == 3
    assert not check_dlq_alert(any_db_ctx, deep).notified and len(hook.bodies) == 3


def test_alert_webhook_failure_is_logged_not_raised(
    ctx: Context, caplog: pytest.LogCaptureFixture, closed_port: ClosedPort
) -> None:
    failing = Hook(status=500)
    try:
        add_dead(ctx, 2, timedelta(minutes=1))
        cfg = DlqConfig(alert_depth=1, alert_webhook_url=failing.url)
        with caplog.at_level(logging.WARNING, logger="notifyctl.dlq"):
            res = check_dlq_alert(ctx, cfg)
        assert res.notified and res.webhook_status == 500 and res.webhook_error == "HTTP 500"
        assert len(failing.bodies) == 1
        assert "webhook to 127.0.0.1 failed: HTTP 500" in caplog.text and "T0KEN" not in caplog.text
    finally:
        failing.close()
    # Nobody listening: a connection error, still no exception.
    ctx.redis.delete("notif:dlq:alert")
    res = check_dlq_alert(ctx, DlqConfig(alert_depth=1, alert_webhook_url=closed_port.url() + "/hooks/T0KEN"))
    assert res.notified and res.webhook_status is None and res.webhook_error


def test_dlq_config_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_DLQ_ALERT_DEPTH", "7")
    monkeypatch.setenv("NOTIFY_DLQ_ALERT_GROWTH_PER_MIN", "0.5")
    monkeypatch.setenv("NOTIFY_DLQ_ALERT_WEBHOOK_URL", "https://hooks.example/T0KEN")
    cfg = Settings(home=tmp_path).dlq  # the settings root reads them, once
    assert (cfg.alert_depth, cfg.alert_growth_per_min) == (7, 0.5)
    assert "T0KEN" not in repr(cfg)


def test_replay_is_batched_over_chunks(any_db_ctx: Context, rclient: redis.Redis) -> None:
    add_dead(any_db_ctx, 1203, timedelta(minutes=3), channel="email", provider="smtp")
    with Session(any_db_ctx.engine) as s:
        ids = sorted(s.execute(select(Delivery.id)).scalars())
    rclient.set(keys.sent(ids[700]), "sent:abc")
    rclient.set(keys.sent(ids[5]), "claim:w1")  # a claim is not a send: replayed
    updates: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE DELIVERIES") and "attempts=" in statement:
            updates.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    try:
        r = cli(any_db_ctx, "replay", "--channel", "email")
    finally:
        event.remove(Engine, "before_cursor_execute", count)
    assert r.exit_code == 0 and "replayed 1202, skipped 1 already sent" in r.stdout
    # batched: one UPDATE of the DLQ per chunk of ids, not one per entry
    assert len(updates) == -(-1203 // CHUNK) > 1, len(updates)
    with Session(any_db_ctx.engine) as s:
        statuses = Counter(s.execute(select(Delivery.status)).scalars())
        replayed = s.execute(select(DeliveryEvent.id).where(DeliveryEvent.status == "replayed")).all()
        n_status = Counter(s.execute(select(Notification.status)).scalars())
    assert statuses == {"retrying": 1202, "sent": 1} and len(replayed) == 1202
    assert n_status == {"retrying": 1202, "done": 1}


@pytest.mark.fresh_pg_schema
def test_dlq_index_upgrade_and_keyset_pages(any_db_ctx: Context) -> None:
    """A database made before ix_deliveries_dlq gets it (and loses the plain dead_lettered index) on
    the schema upgrade; the list reads it (SQLite's plan names it), and keyset pages on (failed_at,
    id) walk every entry once, in order, even through equal failed_at."""
    from notifyctl.db import _existing_indexes, add_missing_columns
    from notifyctl.dlq import count_entries, list_entries
    from notifyctl.errors import NotFound

    ctx = any_db_ctx
    add_dead(ctx, 130, timedelta(minutes=1))  # one failed_at for all 130: the id breaks the ties
    add_dead(ctx, 120, timedelta(hours=2), channel="email", provider="smtp")
    with ctx.engine.begin() as conn:  # as an earlier release left it
        conn.exec_driver_sql("DROP INDEX ix_deliveries_dlq")
        conn.exec_driver_sql("CREATE INDEX ix_deliveries_dead_lettered ON deliveries (dead_lettered)")
    add_missing_columns(ctx.engine)
    with ctx.engine.connect() as conn:
        names = _existing_indexes(conn)
        assert "ix_deliveries_dlq" in names and "ix_deliveries_dead_lettered" not in names
        if ctx.engine.dialect.name == "sqlite":
            plan = conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN SELECT id FROM deliveries WHERE dead_lettered IS 1 AND (status || '') = 'failed'"
                " ORDER BY failed_at DESC, id DESC LIMIT 100"
            ).all()
            assert "ix_deliveries_dlq" in str(plan) and "TEMP B-TREE" not in str(plan), plan
    f = DlqFilter()
    everything = [e["delivery_id"] for e in list_entries(ctx, f, limit=None)]
    assert len(everything) == count_entries(ctx, f) == stats(ctx)["depth"] == 250
    pages: list[list[str]] = []
    before = None
    while True:
        page = [e["delivery_id"] for e in list_entries(ctx, f, limit=100, before=before)]
        if not page:
            break
        pages.append(page)
        before = page[-1]
    assert [len(p) for p in pages] == [100, 100, 50] and sum(pages, []) == everything
    sms = DlqFilter.build(channel="sms")
    first = list_entries(ctx, sms, limit=100)
    assert count_entries(ctx, sms) == 130 and len(list_entries(ctx, sms, 100, before=first[-1]["delivery_id"])) == 30
    with pytest.raises(NotFound, match="no DLQ entry 'd_nope'"):
        list_entries(ctx, f, 10, before="d_nope")


def test_cli_list_pages_with_before_as_the_console_does(any_db_ctx: Context) -> None:
    """``dlq list --before ID``: the page after that entry, keyset on (failed_at, id); walking the
    pages lists every entry once, in the order of the whole list, ties of failed_at included, with a
    filter too; the table names the next page's command; an unknown id is one line, exit 4."""
    ctx = any_db_ctx
    add_dead(ctx, 130, timedelta(minutes=1))  # one failed_at for all 130: the id breaks the ties
    add_dead(ctx, 120, timedelta(hours=2), channel="email", provider="smtp")

    def walk(*filters: str) -> list[list[str]]:
        pages, before = [], None
        while True:
            more = ["--before", before] if before else []
            page = [r["delivery_id"] for r in cli_json(ctx, "list", *filters, "--limit", "100", *more)]
            if not page:
                return pages
            pages.append(page)
            before = page[-1]

    everything = [r["delivery_id"] for r in cli_json(ctx, "list", "--limit", "1000")]
    with Session(ctx.engine) as s:
        in_sql = s.execute(
            select(Delivery.id).where(Delivery.dead_lettered.is_(True)).order_by(Delivery.failed_at.desc(), Delivery.id.desc())  # type: ignore[attr-defined,union-attr]
        ).scalars().all()  # fmt: skip
    assert everything == list(in_sql) and len(everything) == 250
    pages = walk()
    assert [len(p) for p in pages] == [100, 100, 50] and sum(pages, []) == everything
    sms = walk("--channel", "sms")
    assert [len(p) for p in sms] == [100, 30] and sum(sms, []) == everything[:130]

    table = cli(ctx, "list", "--limit", "100", "--before", pages[0][-1])
    assert table.exit_code == 0, table.output
    assert "DLQ: 250 entries, showing 100 after" in table.stdout
    assert f"--before {pages[1][-1]}" in table.stdout.replace("\n", "")  # the next page's command
    missing = cli(ctx, "list", "--before", "d_nope")
    assert missing.exit_code == 4 and missing.stderr.strip() == "error: no DLQ entry 'd_nope' to list from"
    assert missing.stdout == ""
