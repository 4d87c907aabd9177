"""The analytics rollup equals a full count over the deliveries after everything that moves a
status — a blast (the worker), retries (the reconciler), an outage into the DLQ and its replay,
webhooks, a worker killed with SIGKILL mid-send and a process killed inside its SQL transaction —
on SQLite and PostgreSQL; so do the coarse tiers (total and daily per dimension) folded from it,
folded or not, through late status changes to folded days and folds racing writers;
`notifyctl report` reads the same numbers."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import redis
from rq import Worker
from sqlalchemy import insert, text
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner, Result

from notifyctl.analytics import checks, fold, read, rollup, triggers
from notifyctl.bulk import prepare_insert
from notifyctl.cli.main import app
from notifyctl.context import Context
from notifyctl.db import write_lock
from notifyctl.dlq import DlqFilter, replay
from notifyctl.inbound import Event, apply_events
from notifyctl.models import Delivery
from sandboxes.smtp import SmtpSandbox
from tests.conftest import ROOT, cli_env, invoke_cli, make_settings, start_pool, stop_pool
from tests.util import deliveries, drain, notification, seed, send, wait_for
from worker import jobs
from worker.reconciler import reconcile


@pytest.fixture
def actx(any_db_ctx: Context, smtp: SmtpSandbox) -> Iterator[Context]:
    s = any_db_ctx.settings
    ctx = Context(
        make_settings(
            s.home, s.redis_url or "", database_url=s.database_url,
            providers_email=["smtp"], smtp_host=smtp.host, smtp_port=smtp.port, smtp_timeout=5,
            circuit_threshold=1000, worker_alive_ttl=2, worker_heartbeat=0.5, recovery_grace=1,
        )
    )  # fmt: skip
    seed(ctx)
    yield ctx
    jobs.close()
    ctx.close()


runner = CliRunner()


def cli(ctx: Context, *args: str) -> Result:
    return runner.invoke(app, list(args), env=cli_env(ctx.settings))


# The funnel's questions: every grouping, with and without --since (a whole day, and an hour inside
# one), with filters on one dimension (the daily tier) and two (the hourly rollup).
QUERIES: list[tuple[str, str | None, dict[str, str]]] = [
    (by, since, {})
    for by in ("template", "channel", "campaign", "day")
    for since in (None, "7d", "3d", "2d", "70h", "30h", "1h")
] + [
    ("template", "70h", {"template": "order_shipped_v2"}),  # nearer the first day: all less the days before
    ("campaign", "2d", {}),
    ("day", "7d", {"channel": "email"}),
    ("template", None, {"channel": "email", "campaign": ""}),
    ("channel", "7d", {"template": "order_shipped_v2"}),
    ("channel", "7d", {"template": "order_shipped_v2", "campaign": ""}),
    ("day", None, {"campaign": ""}),
]


def assert_rollup_exact(ctx: Context) -> dict[tuple[str, ...], int]:
    """The hourly rollup, the coarse tiers (as the funnel reads them) and the funnel's answers
    from the coarse tiers and from the hourly rollup alone, all equal to full counts."""
    full = checks.full_counts(ctx.engine)
    assert checks.rollup_counts(ctx.engine) == full
    assert checks.coarse_counts(ctx.engine) == checks.coarse_of(full)
    for by, since, filters in QUERIES:
        at = read.parse_since(since)
        coarse = read.funnel(ctx.engine, by, at, **filters)
        assert coarse == read.funnel(ctx.engine, by, at, tier="hourly", **filters), (by, since, filters)
    return full


def sql_status_counts(ctx: Context) -> Counter[str]:
    return Counter(d.status for d in deliveries(ctx))


def email(ctx: Context, user: str, i: int) -> str:
    return send(
        ctx, recipient_id=user, channels=["email"], data={"order_id": f"O-{user}-{i}", "tracking_url": "u"}
    ).notification_id


def test_rollup_equals_full_count_through_every_kind_of_status_change(actx: Context, smtp: SmtpSandbox) -> None:
    ctx = actx
    # 1. A blast over every channel: sent, and suppressed (dave has no email address).
    for i in range(3):
        for user in ("alice", "bob", "carol", "dave"):
            send(ctx, recipient_id=user, channels=["email", "sms", "push"],
                 data={"order_id": f"B-{user}-{i}", "tracking_url": "u"})  # fmt: skip
    drain(ctx)
    full = assert_rollup_exact(ctx)
    assert {k[4] for k in full} >= {"sent", "suppressed"}
    assert fold.compact(ctx.engine) > 0  # folded into the coarse tiers; what follows changes folded rows
    assert checks.unfolded(ctx.engine) == 0
    assert_rollup_exact(ctx)

    # 2. Retries: two attempts fail (451), the reconciler brings them back, the third goes out.
    smtp.faults.add({"smtp_code": 451, "smtp_message": "4.3.0 try later", "count": 2})
    retried = [email(ctx, "alice", 10), email(ctx, "bob", 10)]
    drain(ctx)
    assert {d.status for n in retried for d in deliveries(ctx, n)} == {"retrying"}
    assert_rollup_exact(ctx)
    assert reconcile(ctx, now=time.time() + 3600, force=True).retries_queued == 2
    drain(ctx)
    assert {d.status for n in retried for d in deliveries(ctx, n)} == {"sent"}
    assert_rollup_exact(ctx)

    # 3. An outage dead-letters; the replay moves them back to retrying, then they are sent.
    smtp.faults.add({"smtp_code": 554, "smtp_message": "5.3.0 outage", "stage": "data", "count": -1})
    dead = [email(ctx, u, 20) for u in ("alice", "bob", "carol")]
    drain(ctx)
    assert {d.status for n in dead for d in deliveries(ctx, n)} == {"failed"}
    full = assert_rollup_exact(ctx)
    assert {k[5]: v for k, v in full.items() if k[4] == "failed"} == {"SMTP 554 5.3.0 outage": 3}  # kind of reason
    fold.compact(ctx.engine)  # PostgreSQL: folded into the rollup meanwhile; nothing changes
    assert_rollup_exact(ctx)
    smtp.faults.clear()
    assert len(replay(ctx, DlqFilter.build(None, None, None, None, None, None, ())).replayed) == 3
    assert_rollup_exact(ctx)
    reconcile(ctx, force=True)
    drain(ctx)
    assert {d.status for n in dead for d in deliveries(ctx, n)} == {"sent"}
    assert_rollup_exact(ctx)

    # 4. Webhooks: delivered, opened, a bounce; an event repeated changes nothing more.
    mails = [d for d in deliveries(ctx) if d.channel == "email" and d.status == "sent"]
    evs = [Event("sendgrid", "delivered", delivery_id=d.id, event_id=f"dl-{d.id}") for d in mails[:4]]
    evs += [Event("sendgrid", "opened", delivery_id=d.id, event_id=f"op-{d.id}") for d in mails[:2]]
    evs += [Event("sendgrid", "failed", delivery_id=mails[5].id, event_id="bounce-1", detail="550 no such user")]
    pushes = [d for d in deliveries(ctx) if d.channel == "push" and d.status == "sent"]
    evs += [Event("app", "opened", delivery_id=pushes[0].id, event_id="app-open-1")]
    assert apply_events(ctx, evs).transitions >= 7
    apply_events(ctx, evs)
    assert_rollup_exact(ctx)

    # 5. A worker killed with SIGKILL in the middle of a send: its work is recovered and sent once.
    smtp.faults.add({"stage": "rcpt", "delay": 30, "match": "alice@"})
    env = cli_env(
        ctx.settings, NOTIFY_PROVIDERS_EMAIL='["smtp"]', NOTIFY_SMTP_HOST=smtp.host,
        NOTIFY_SMTP_PORT=str(smtp.port), NOTIFY_WORKER_ALIVE_TTL="2", NOTIFY_WORKER_HEARTBEAT="0.5",
        NOTIFY_CIRCUIT_THRESHOLD="1000",
    )  # fmt: skip
    pool = start_pool(env, "2", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = email(ctx, "alice", 30)
        rest = [email(ctx, u, 30) for u in ("bob", "carol")]
        job = notification(ctx, first).job_id

        def stuck() -> Worker | None:
            return next((w for w in Worker.all(connection=ctx.redis) if w.get_current_job_id() == job), None)

        victim = wait_for(stuck, 20)
        assert victim is not None, "no worker picked up the first job"
        assert wait_for(lambda: smtp.faults.pending() == 0, 20), "the first message never reached the sandbox"
        os.kill(victim.pid, signal.SIGKILL)
        smtp.faults.clear()
        ids = [first, *rest]
        assert wait_for(lambda: {d.status for n in ids for d in deliveries(ctx, n)} == {"sent"}, 30, 0.2)
    finally:
        stop_pool(pool)
    full = assert_rollup_exact(ctx)
    # (the pool compacted the PostgreSQL deltas on its way: still exact, as checked)

    # The report reads the same numbers as SQL counts over the deliveries, on the CLI too.
    st = sql_status_counts(ctx)
    total = read.funnel(ctx.engine, "channel")["total"]
    assert total["sent"] == st["sent"] + st["delivered"] + st["opened"]
    assert (total["delivered"], total["opened"]) == (st["delivered"] + st["opened"], st["opened"])
    assert (total["failed"], total["suppressed"]) == (st["failed"], st["suppressed"])
    assert total["total"] == sum(st.values()) == sum(full.values())
    for by in ("template", "channel", "campaign", "day"):
        r = cli(ctx, "report", "--by", by, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout) == json.loads(json.dumps(read.funnel(ctx.engine, by)))
    by_channel = {g["key"]: g for g in read.funnel(ctx.engine, "channel")["groups"]}
    assert by_channel["email"]["failed_by_reason"] == {"sendgrid": 1}  # the bounce, by its kind
    assert by_channel["email"]["suppressed_by_reason"] == {"no_address": 3}


def test_a_process_killed_inside_its_transaction_moves_no_count(any_db_ctx: Context, tmp_path: Path) -> None:
    """A status change and its rollup change commit together: SIGKILL before the commit leaves both as they were."""
    ctx = any_db_ctx
    seed(ctx)
    nid = send(ctx, channels=["email"]).notification_id
    drain(ctx)
    before = assert_rollup_exact(ctx)
    ready = tmp_path / "ready"
    script = f"""
import time
from notifyctl.cli.main import app
from notifyctl.context import Context
from notifyctl.settings import load_settings
ctx = Context(load_settings())
with ctx.engine.connect() as conn:
    conn.exec_driver_sql("UPDATE deliveries SET status = 'opened' WHERE notification_id = '{nid}'")
    open({str(ready)!r}, "w").close()
    time.sleep(60)
"""
    p = subprocess.Popen([sys.executable, "-c", script], env=cli_env(ctx.settings), cwd=ROOT)
    try:
        assert wait_for(ready.exists, 30), "the child never ran its UPDATE"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    assert assert_rollup_exact(ctx) == before
    assert {d.status for d in deliveries(ctx, nid)} == {"sent"}


def test_a_counted_insert_counts_its_rows_once_and_leaves_the_row_trigger_on(any_db_ctx: Context) -> None:
    """The worker's insert (``triggers.counted_insert``): on SQLite the row trigger skips its rows and
    one grouped upsert counts them; a batch of several channels and statuses counts each row once; an
    insert that fails (a duplicate) counts nothing and leaves the row trigger on for the next plain
    insert on the same connection; PostgreSQL's statement trigger counts as before."""
    ctx = any_db_ctx
    seed(ctx)
    ids = [send(ctx, recipient_id=u, channels=["email", "sms"]).notification_id for u in ("alice", "bob")]
    drain(ctx)
    before = assert_rollup_exact(ctx)
    assert sum(before.values()) == 4
    rows = [
        {**d.model_dump(), "id": d.id + "x", "address": d.address + "x", "status": status}
        for d, status in zip(deliveries(ctx, ids[0]) + deliveries(ctx, ids[1]), ("queued", "failed", "sent", "sent"), strict=True)
    ]  # fmt: skip
    table = Delivery.__table__  # type: ignore[attr-defined]
    with ctx.engine.connect() as conn:
        triggers.counted_insert(conn, prepare_insert(ctx.engine, table, rows), len(rows))
        conn.commit()
        assert sum(checks.rollup_counts(ctx.engine).values()) == 8
        assert_rollup_exact(ctx)
        with pytest.raises(IntegrityError):  # the same ids again: nothing written, nothing counted
            triggers.counted_insert(conn, prepare_insert(ctx.engine, table, rows[:1]), 1)
        conn.rollback()
        conn.execute(
            insert(table), [{**rows[0], "id": "d_plain", "address": "plain"}]
        )  # a plain insert: the row trigger counts it
        conn.commit()
    assert sum(checks.rollup_counts(ctx.engine).values()) == 9
    assert_rollup_exact(ctx)


@pytest.mark.fresh_pg_schema
def test_the_worker_counts_its_rows_once_whichever_pg_insert_trigger_is_present(any_db_ctx: Context) -> None:
    """PostgreSQL: the worker's insert (``counted_insert`` given the rows' origins) counts its rows
    itself and the insert trigger skips that statement; a plain insert after it in the same
    transaction is counted by the trigger (the gate closed again); with an older definition's insert
    trigger in place (put back by an older release's process), which knows no gate, the worker's
    rows are counted once all the same, by that trigger."""
    ctx = any_db_ctx
    if ctx.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's statement trigger (SQLite: the tests above)")
    seed(ctx)
    nid = send(ctx, recipient_id="alice", channels=["email"]).notification_id
    drain(ctx)
    assert sum(assert_rollup_exact(ctx).values()) == 1
    with ctx.engine.connect() as conn:
        origins = {str(r[0]): (str(r[1]), r[2], r[3])
                   for r in conn.exec_driver_sql("SELECT id, template_id, campaign_id, wave FROM notifications")}  # fmt: skip
    (d,) = deliveries(ctx, nid)
    table = Delivery.__table__  # type: ignore[attr-defined]

    def rows(tag: str, k: int) -> list[dict[str, object]]:
        return [{**d.model_dump(), "id": f"{d.id}{tag}{i}", "address": f"{tag}{i}", "status": "sent"} for i in range(k)]

    with ctx.engine.connect() as conn:
        new = rows("w", 3)
        triggers.counted_insert(conn, prepare_insert(ctx.engine, table, new), new, origins)
        assert conn.exec_driver_sql(f"SELECT current_setting('{triggers.PG_GATE}', true)").scalar() == "off"
        conn.execute(insert(table), rows("p", 1))  # a plain insert: the trigger counts it
        conn.commit()
    assert sum(assert_rollup_exact(ctx).values()) == 5
    ins = triggers.TRIGGERS[0]
    old = ins.replace(triggers.VERSION, "v6")
    with write_lock(ctx.engine), ctx.engine.begin() as conn:  # the v6 insert trigger: no gate
        conn.exec_driver_sql(f"DROP TRIGGER {ins} ON deliveries")
        conn.exec_driver_sql(rollup.pg_function(old, triggers._PG_INSERT))
        conn.exec_driver_sql(rollup.pg_trigger(old, "INSERT"))
    with ctx.engine.connect() as conn:
        new = rows("o", 4)
        triggers.counted_insert(conn, prepare_insert(ctx.engine, table, new), new, origins)
        conn.commit()
    assert sum(assert_rollup_exact(ctx).values()) == 9


REASONS = [None, "bounced: mailbox full", "  spaced  : x", "\ttab\t: y", "no colon at all", "é" * 80 + ": long",
           ":leading colon", "opted_out", " a:b:c ", ""]  # fmt: skip


@pytest.mark.parametrize("statuses", [("failed", "suppressed", "sent", "queued")])
def test_counts_made_from_the_rows_equal_the_sql_count(any_db_ctx: Context, statuses: tuple[str, ...]) -> None:
    """``counted_insert`` given the rows and their notifications' origins (the worker's path on
    SQLite: counted in Python, no join): the rollup and the wave counts equal full SQL counts, for
    reasons with colons, spaces, tabs, long and non-ASCII text, none; a row whose notification is
    gone (not in ``origins``) keys as the SQL's LEFT JOIN finds none; queued_at in any time zone."""
    from notifyctl.analytics import waves

    ctx = any_db_ctx
    seed(ctx)
    ids = [send(ctx, recipient_id=u, channels=["email"]).notification_id for u in ("alice", "bob", "carol")]
    drain(ctx)
    with ctx.engine.begin() as conn:  # the first two: a campaign's, one with a wave
        conn.execute(text("UPDATE notifications SET campaign_id = 'c1', wave = 2 WHERE id = :n"), {"n": ids[0]})
        conn.execute(text("UPDATE notifications SET campaign_id = 'c1' WHERE id = :n"), {"n": ids[1]})
        conn.execute(text("DELETE FROM analytics_hourly"))
        conn.execute(text("DELETE FROM analytics_delta"))
        conn.execute(text("DELETE FROM wave_counts"))
        conn.execute(text("DELETE FROM wave_delta"))
        conn.execute(text("DELETE FROM deliveries"))
        origins = {
            str(r[0]): (str(r[1]), r[2], r[3])
            for r in conn.execute(text("SELECT id, template_id, campaign_id, wave FROM notifications")).all()
        }
    at = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
    east = timezone(timedelta(hours=5, minutes=30))  # (stored in UTC: its hour is UTC's)
    rows = [
        {"id": f"d{k}", "notification_id": [*ids, "n_gone"][k % 4], "user_id": "u", "channel": ("email", "sms")[k % 2],
         "route": "email", "address": f"a{k}", "status": statuses[k % len(statuses)],
         "reason": REASONS[k % len(REASONS)], "attempts": 0, "dead_lettered": False,
         "queued_at": (at + timedelta(hours=k % 2)).astimezone(east if k % 3 else UTC), "updated_at": at}
        for k in range(120)
    ]  # fmt: skip
    table = Delivery.__table__  # type: ignore[attr-defined]
    with ctx.engine.connect() as conn:
        triggers.counted_insert(conn, prepare_insert(ctx.engine, table, rows), rows, origins)
        conn.commit()
    assert sum(checks.rollup_counts(ctx.engine).values()) == 120
    assert checks.rollup_counts(ctx.engine) == checks.full_counts(ctx.engine)
    assert len({k[5] for k in checks.rollup_counts(ctx.engine)}) >= 8  # (the kinds of reason kept apart)
    with ctx.engine.connect() as conn:
        counted = Counter(
            {tuple(r[:5]): int(r[5]) for r in conn.exec_driver_sql(f"{waves.full_count_sql(ctx.engine.dialect.name)}")}
        )
        got = Counter()
        for src in ("wave_counts", "wave_delta"):
            for r in conn.exec_driver_sql(f"SELECT {rollup.WAVE_COLS}, n FROM {src}"):
                got[tuple(r[:5])] += int(r[5])
    assert +got == counted and sum(counted.values()) == 30
    assert (
        triggers.sqlite_hour("2026-03-04 05:06:07.890123")
        == triggers.sqlite_hour(at.astimezone(east))
        == "2026-03-04 05"
    )


@pytest.mark.fresh_pg_schema
def test_install_backfills_an_existing_database_once(any_db_ctx: Context) -> None:
    ctx = any_db_ctx
    seed(ctx)
    send(ctx, channels=["email", "sms"])
    drain(ctx)
    expected = assert_rollup_exact(ctx)
    with ctx.engine.begin() as conn:  # as a database made before analytics existed: no triggers, no rollup
        for name in triggers.TRIGGERS:
            conn.exec_driver_sql(
                f"DROP TRIGGER {name}" + (" ON deliveries" if ctx.engine.dialect.name == "postgresql" else "")
            )
        conn.exec_driver_sql("DELETE FROM analytics_hourly")
        conn.exec_driver_sql("DELETE FROM analytics_delta")
    assert checks.rollup_counts(ctx.engine) == {}
    assert triggers.install(ctx.engine, write_lock) is True
    assert triggers.install(ctx.engine, write_lock) is False
    assert checks.rollup_counts(ctx.engine) == expected
    send(ctx, recipient_id="bob", channels=["email"])
    drain(ctx)
    assert_rollup_exact(ctx)


@pytest.mark.fresh_pg_schema
@pytest.mark.parametrize("old_version", ["v2", "v3", "v4", "v6"])
def test_an_upgrade_keeps_the_rollup_of_purged_deliveries(any_db_ctx: Context, old_version: str) -> None:
    """A database of a previous definition (v2 triggers, no coarse tiers, ``folded`` just added; v3
    triggers, total and daily tiers, no weekly one), deltas pending on PostgreSQL, deliveries purged
    since they were counted: install keeps its rollup — a full count would forget the purged ones —
    and builds the coarse tiers from it."""
    ctx = any_db_ctx
    pg = ctx.engine.dialect.name == "postgresql"
    seed(ctx)
    first = send(ctx, recipient_id="alice", channels=["email", "sms"]).notification_id
    second = send(ctx, recipient_id="bob", channels=["email"]).notification_id
    drain(ctx)
    with write_lock(ctx.engine), ctx.engine.begin() as conn:  # as the previous release left it
        for name, ddl in zip(triggers.TRIGGERS, (triggers._pg_ddl() if pg else triggers._sqlite_ddl()), strict=False):
            old = name.replace(triggers.VERSION, old_version)
            conn.exec_driver_sql(f"DROP TRIGGER {name}" + (" ON deliveries" if pg else ""))
            if pg:
                conn.exec_driver_sql(ddl.replace(name, old))
                kind = "INSERT" if "ins" in name else "UPDATE"
                tables = "NEW TABLE AS new_rows" if kind == "INSERT" else "OLD TABLE AS old_rows NEW TABLE AS new_rows"
                conn.exec_driver_sql(f"CREATE TRIGGER {old} AFTER {kind} ON deliveries REFERENCING {tables} "
                                     f"FOR EACH STATEMENT EXECUTE FUNCTION {old}()")  # fmt: skip
            elif old_version == "v2":  # v2's row triggers knew no ``folded``
                conn.exec_driver_sql(
                    ddl.replace(name, old).replace(", n, folded)", ", n)").replace(", 0 FROM", " FROM")
                )
            else:
                conn.exec_driver_sql(ddl.replace(name, old))
        conn.exec_driver_sql("DELETE FROM analytics_weekly")
        if old_version == "v2":
            conn.exec_driver_sql("UPDATE analytics_hourly SET folded = NULL")
            conn.exec_driver_sql("DELETE FROM analytics_total")
            conn.exec_driver_sql("DELETE FROM analytics_daily")
    with write_lock(ctx.engine), ctx.engine.begin() as conn:  # counted by the old triggers (no other process
        # opens the database meanwhile: it would upgrade it)
        conn.execute(text("UPDATE deliveries SET status = 'opened' WHERE notification_id = :n"), {"n": second})
        # purged (retention): deliveries gone, their counts kept
        conn.execute(text("DELETE FROM deliveries WHERE notification_id = :n"), {"n": first})
    before = checks.rollup_counts(ctx.engine)
    assert sum(before.values()) == 3 and len(deliveries(ctx)) == 1
    assert triggers.install(ctx.engine, write_lock) is True
    assert checks.rollup_counts(ctx.engine) == before != checks.full_counts(ctx.engine)
    assert checks.unfolded(ctx.engine) == 0
    assert checks.coarse_counts(ctx.engine) == checks.coarse_of(before)
    for by, since, filters in QUERIES:
        at = read.parse_since(since)
        coarse = read.funnel(ctx.engine, by, at, **filters)
        assert coarse == read.funnel(ctx.engine, by, at, tier="hourly", **filters), (by, since, filters)
    assert read.funnel(ctx.engine, "channel")["total"]["total"] == 3
    assert read.funnel(ctx.engine, "channel")["total"]["opened"] == 1


def test_report_cli_table_csv_since_and_bad_input(ctx: Context, rclient: redis.Redis) -> None:
    seed(ctx)
    for user in ("alice", "bob", "dave"):
        send(ctx, recipient_id=user, channels=["email"])
    drain(ctx)
    table = invoke_cli(ctx.settings, "report", "--by", "channel")
    assert table.returncode == 0, table.stderr
    assert "Delivery funnel by channel" in table.stdout and "email" in table.stdout
    assert "suppressed by reason: no_address=1" in table.stdout
    out = cli(ctx, "report", "--by", "template", "--csv", "--since", "24h")
    rows = list(csv.reader(io.StringIO(out.stdout)))
    assert rows[0][:4] == ["template", "total", "pending", "sent"]
    assert rows[1][:4] == ["order_shipped_v2", "3", "0", "2"] and rows[-1][0] == "total"
    future = cli(ctx, "report", "--since", "2999-01-01", "--json")
    assert json.loads(future.stdout)["groups"] == []
    for args, msg in (
        (["--by", "user"], "--by: expected template, channel, campaign or day, got 'user'"),
        (["--since", "yesterday"], "--since: expected a duration"),
        (["--json", "--csv"], "--json and --csv: choose one"),
    ):
        bad = cli(ctx, "report", *args)
        assert bad.exit_code == 2 and msg in bad.stderr and bad.stdout == "", bad.output


def move_to_days_ago(ctx: Context, ids: list[str], days: int, hour: int) -> None:
    """Deliveries queued ``days`` ago at ``hour`` UTC (the triggers move their counts there)."""
    with write_lock(ctx.engine), ctx.engine.begin() as conn:
        at = (datetime.now(UTC) - timedelta(days=days)).replace(hour=hour, minute=5, tzinfo=None)
        for nid in ids:
            conn.execute(text("UPDATE deliveries SET queued_at = :at WHERE notification_id = :n"), {"at": at, "n": nid})


def test_coarse_tiers_stay_exact_through_late_changes_to_folded_days(any_db_ctx: Context) -> None:
    """Deliveries of three days ago, folded into the daily tier, then delivered and opened today
    (webhooks), and one dead-lettered: the funnel is exact before the next fold and after it."""
    ctx = any_db_ctx
    seed(ctx)
    old = [send(ctx, recipient_id=u, channels=["email", "sms"]).notification_id for u in ("alice", "bob", "carol")]
    recent = [send(ctx, recipient_id="alice", channels=["email"]).notification_id]
    drain(ctx)
    move_to_days_ago(ctx, old[:2], 3, 5)
    move_to_days_ago(ctx, old[2:], 1, 20)  # inside a --since 30h window's partial day
    assert_rollup_exact(ctx)
    assert fold.compact(ctx.engine) > 0 and checks.unfolded(ctx.engine) == 0
    full = assert_rollup_exact(ctx)
    day = (datetime.now(UTC) - timedelta(days=3)).strftime("%Y-%m-%d")
    assert {k[0][:10] for k in full} >= {day}
    by_day = {g["key"]: g for g in read.funnel(ctx.engine, "day", read.parse_since("7d"))["groups"]}
    assert by_day[day]["sent"] == 4 and by_day[day]["opened"] == 0  # 2 notifications × email + sms
    mails = [d for n in old for d in deliveries(ctx, n) if d.channel == "email"]
    evs = [Event("sendgrid", "delivered", delivery_id=mails[0].id, event_id=f"dl-{mails[0].id}")]
    evs += [Event("sendgrid", "opened", delivery_id=mails[0].id, event_id=f"op-{mails[0].id}")]
    evs += [Event("sendgrid", "failed", delivery_id=mails[1].id, event_id="bounce-1", detail="550 no such user")]
    assert apply_events(ctx, evs).transitions == 3
    assert checks.unfolded(ctx.engine) > 0  # folded days changed: the change waits for the next fold
    assert_rollup_exact(ctx)
    by_day = {g["key"]: g for g in read.funnel(ctx.engine, "day", read.parse_since("7d"))["groups"]}
    assert (by_day[day]["sent"], by_day[day]["delivered"], by_day[day]["opened"]) == (3, 1, 1)
    assert by_day[day]["failed_by_reason"] == {"sendgrid": 1}
    fold.compact(ctx.engine)
    assert checks.unfolded(ctx.engine) == 0
    assert_rollup_exact(ctx)
    # the same counts from the CLI, whose reads cross the coarse tiers
    for args in (("--by", "day", "--since", "7d"), ("--by", "template"), ("--by", "channel", "--since", "30h")):
        r = cli(ctx, "report", *args, "--json")
        assert r.exit_code == 0, r.output
        rep = json.loads(r.stdout)
        since = read.parse_since(args[3]) if len(args) > 2 else None
        assert rep == json.loads(json.dumps(read.funnel(ctx.engine, args[1], since, tier="hourly")))
    assert read.funnel(ctx.engine, "template")["total"]["total"] == len(deliveries(ctx)) == 7
    assert recent


def test_folds_racing_writers_lose_and_double_no_count(any_db_ctx: Context) -> None:
    """Writers move statuses (and queued hours, across days) in many small transactions while two
    threads fold over and over: at the end every tier equals a full count."""
    ctx = any_db_ctx
    seed(ctx)
    ids = [send(ctx, recipient_id=u, channels=["email", "sms"]).notification_id for u in ("alice", "bob", "carol")] * 1
    ids += [send(ctx, recipient_id="dave", channels=["push"]).notification_id for _ in range(6)]
    drain(ctx)
    dids = [d.id for d in deliveries(ctx)]
    assert len(dids) >= 10
    stop = threading.Event()
    folds: list[int] = []
    errors: list[BaseException] = []

    def folder() -> None:
        try:
            while not stop.is_set():
                folds.append(fold.compact(ctx.engine))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=folder) for _ in range(2)]
    for t in threads:
        t.start()
    statuses = ("sent", "delivered", "opened", "failed", "suppressed", "retrying")
    reasons = ("SMTP 554: no", "opted_out", None)
    now = datetime.now(UTC).replace(tzinfo=None)
    try:
        for i in range(300):
            with write_lock(ctx.engine), ctx.engine.begin() as conn:
                for j in range(3):
                    k = (i * 7 + j * 3) % len(dids)
                    conn.execute(
                        text("UPDATE deliveries SET status = :s, reason = :r, queued_at = :q WHERE id = :id"),
                        {"s": statuses[(i + j) % len(statuses)], "r": reasons[(i * j) % 3],
                         "q": now - timedelta(hours=(i * 5 + j) % 80), "id": dids[k]},
                    )  # fmt: skip
            if i % 50 == 0:
                apply_events(ctx, [Event("sendgrid", "opened", delivery_id=dids[i % len(dids)], event_id=f"o{i}")])
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert sum(1 for f in folds if f) >= 2, folds  # the folds did run while the writers wrote
    assert_rollup_exact(ctx)
    fold.compact(ctx.engine)
    assert checks.unfolded(ctx.engine) == 0
    assert_rollup_exact(ctx)


def spread_over_days(ctx: Context, ago: tuple[int, ...]) -> list[str]:
    """One notification (email and SMS) queued at 09:00 UTC of each of ``ago`` days back, sent, and
    folded into the coarse tiers; their ids."""
    seed(ctx)
    users = ("alice", "bob", "carol")
    ids = [send(ctx, recipient_id=users[i % 3], channels=["email", "sms"]).notification_id for i in range(len(ago))]
    drain(ctx)
    for nid, days in zip(ids, ago, strict=True):
        move_to_days_ago(ctx, [nid], days, 9)
    assert fold.compact(ctx.engine) > 0 and checks.unfolded(ctx.engine) == 0
    return ids


def test_weekly_tier_stays_exact_across_week_boundaries(any_db_ctx: Context) -> None:
    """Deliveries spread over five weeks, folded into the daily and weekly tiers: a ``--since`` of
    every day of the last three weeks (whole, and from an hour inside it), whichever weekday it
    falls on, reads the edge days from the daily tier and the whole weeks from the weekly one and
    answers as the hourly rollup does; late changes to a folded week, before the fold and after."""
    ctx = any_db_ctx
    ids = spread_over_days(ctx, (1, 3, 6, 7, 8, 9, 13, 15, 20, 34))
    full = assert_rollup_exact(ctx)
    weeks = {rollup.week_of(k[0]) for k in full}
    assert len(weeks) >= 4, weeks  # the tier crosses week boundaries (whichever weekday today is)
    with ctx.engine.connect() as conn:
        stored = {r[0] for r in conn.exec_driver_sql("SELECT DISTINCT week FROM analytics_weekly").all()}
    assert stored == weeks

    now = datetime.now(UTC)

    def every_since() -> None:
        for days in range(22):
            for hour in ("00", "13"):
                at = (now - timedelta(days=days)).strftime("%Y-%m-%d ") + hour
                for by, filters in (
                    ("template", {}),
                    ("channel", {}),
                    ("campaign", {}),
                    ("channel", {"channel": "sms"}),
                ):
                    coarse = read.funnel(ctx.engine, by, at, **filters)
                    assert coarse == read.funnel(ctx.engine, by, at, tier="hourly", **filters), (by, at, filters)

    every_since()
    # late changes to deliveries of a folded week: read from the hourly rows until the next fold
    mails = [d for d in deliveries(ctx, ids[4]) + deliveries(ctx, ids[5]) if d.channel == "email"]
    evs = [Event("sendgrid", "opened", delivery_id=mails[0].id, event_id=f"op-{mails[0].id}")]
    evs += [Event("sendgrid", "failed", delivery_id=mails[1].id, event_id="bounce-w", detail="550 no such user")]
    assert apply_events(ctx, evs).transitions == 2
    assert checks.unfolded(ctx.engine) > 0
    assert_rollup_exact(ctx)
    every_since()
    fold.compact(ctx.engine)
    assert checks.unfolded(ctx.engine) == 0
    assert_rollup_exact(ctx)
    every_since()
    # the weekly tier is what those reads used: without it, a read over whole weeks is short
    at = (now - timedelta(days=16)).strftime("%Y-%m-%d 13")
    with write_lock(ctx.engine), ctx.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM analytics_weekly")
    assert read.funnel(ctx.engine, "template", at) != read.funnel(ctx.engine, "template", at, tier="hourly")


def test_since_near_the_first_day_reads_whole_weeks_from_the_weekly_tier(any_db_ctx: Context) -> None:
    """A ``--since`` nearer the rollup's first day than its last reads everything less what came
    before it: the whole weeks before its week from the weekly tier, and only the days of its own
    week from the daily tier. Its answers equal the hourly rollup's from every day of the older
    half; with every daily row outside since's week gone they still do (the days are read only at
    the edge), and without the weekly tier they do not (the weeks are read from it)."""
    ctx = any_db_ctx
    ago = (1, 4, 9, 16, 23, 30, 37, 41, 44, 45, 52)
    spread_over_days(ctx, ago)
    assert_rollup_exact(ctx)
    now = datetime.now(UTC)
    reads = (("template", {}), ("channel", {}), ("campaign", {}), ("channel", {"channel": "sms"}))

    def equal_to_hourly(at: str) -> bool:
        return all(
            read.funnel(ctx.engine, by, at, **filters) == read.funnel(ctx.engine, by, at, tier="hourly", **filters)
            for by, filters in reads
        )

    for days in range(27, 54):  # the rollup spans 52 days: each of these is nearer its first day
        for hour in ("00", "13"):
            at = (now - timedelta(days=days)).strftime("%Y-%m-%d ") + hour
            assert equal_to_hourly(at), at
    at = (now - timedelta(days=44)).strftime("%Y-%m-%d 13")
    assert read.funnel(ctx.engine, "template", at)["total"]["total"] == 2 * sum(1 for d in ago if d < 44)
    monday = datetime.strptime(rollup.week_of(at), "%Y-%m-%d")
    week = {"monday": f"{monday:%Y-%m-%d}", "next": f"{monday + timedelta(days=7):%Y-%m-%d}"}
    with write_lock(ctx.engine), ctx.engine.begin() as conn:  # every day outside since's week
        gone = conn.execute(
            text("DELETE FROM analytics_daily WHERE dim <> '' AND (day < :monday OR day >= :next)"), week
        ).rowcount
    assert gone > 0
    assert equal_to_hourly(at)
    with write_lock(ctx.engine), ctx.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM analytics_weekly")
    assert read.funnel(ctx.engine, "template", at) != read.funnel(ctx.engine, "template", at, tier="hourly")
