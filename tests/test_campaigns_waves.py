"""A campaign's progress per time-zone wave (``notifyctl.analytics.waves``): after a staggered
campaign with sends, failures, suppressions and a wave still to come, each wave's numbers equal
SQL counts over its deliveries (SQLite and PostgreSQL, before and after compaction), and
``notifyctl campaign status --json`` shows the same."""

from __future__ import annotations

import io
import json
from collections import Counter, defaultdict
from datetime import UTC, datetime
from typing import Any

import pytest
import typer
from sqlalchemy import func, select
from sqlmodel import Session
from typer.testing import CliRunner

from campaigns.launcher import LaunchSpec, launch
from campaigns.report import campaign_status
from notifyctl.analytics import checks
from notifyctl.analytics.fold import compact
from notifyctl.analytics.waves import wave_progress
from notifyctl.cli import campaign as campaign_cli
from notifyctl.cli.main import NotifyGroup
from notifyctl.context import Context
from notifyctl.directory import import_users, set_prefs
from notifyctl.inbound import Event, apply_events
from notifyctl.models import Campaign, Delivery, Notification
from tests.conftest import cli_env
from tests.util import drain

ZONES = ("Europe/Paris", "Asia/Kolkata", "America/New_York")


def staggered_campaign(ctx: Context, users: int = 30) -> str:
    """A campaign to users ``w0``… in three time zones at 10:00 local (three waves, tomorrow at the
    latest): every wave but the last sent (some without an email address, some opted out:
    suppressed), a few sent ones then bounced (failed); the last wave still scheduled."""
    rows = [f"w{i},{'' if i % 5 == 1 else f'w{i}@example.com'},,{ZONES[i % 3]},false" for i in range(users)]
    rep = import_users(ctx, io.StringIO("user_id,email,phone,timezone,sms_opt_in\n" + "\n".join(rows) + "\n"))
    assert rep.errors == []
    for i in range(3, users, 7):
        set_prefs(ctx, f"w{i}", ["email:marketing"], [])
    s = launch(
        ctx,
        LaunchSpec("weekly_promo", channels=["email"], segment_sql="SELECT id AS user_id FROM users WHERE id LIKE 'w%'",
                   stagger_tz=True, local_time="10:00", rate=100, data={"discount": 15, "code": "SPRING"},
                   name="waves"),
    )  # fmt: skip
    cid = str(s["campaign_id"])
    assert len(s["waves"]) == 3
    with Session(ctx.engine) as ses:  # as written, a notification is due within its wave's span in the plan
        for n in ses.execute(select(Notification).where(Notification.campaign_id == cid)).scalars():
            assert n.wave is not None
            lo, hi = (datetime.fromisoformat(s["waves"][n.wave][k]) for k in ("start", "end"))
            assert lo <= n.due_at.replace(tzinfo=UTC) <= hi
    last = datetime.fromisoformat(s["waves"][-1]["start"])
    drain(ctx, due_by=last.timestamp() - 1)
    with Session(ctx.engine) as ses:
        sent = list(
            ses.execute(
                select(Delivery.id, Notification.wave)
                .join(Notification, Notification.id == Delivery.notification_id)
                .where(Notification.campaign_id == cid, Delivery.status == "sent")
                .order_by(Notification.wave, Delivery.id)
            ).all()
        )
    assert len(sent) > 6
    # every third sent delivery of each wave bounced (the first of each included, so every sent wave
    # has a failure whatever order the ids of one millisecond take); two kinds of failure reason (a
    # webhook's failure reads "<provider>: <detail>")
    picked = [d for w in {w for _, w in sent} for d in [d for d, w2 in sent if w2 == w][::3]]
    bounced = [
        Event(provider="sendgrid" if k % 2 else "ses", status="failed", delivery_id=d, detail="bounced: mailbox full")
        for k, d in enumerate(picked)
    ]
    assert apply_events(ctx, bounced).transitions == len(bounced)
    return cid


def sql_counts(ctx: Context, cid: str) -> dict[int, dict[str, Any]]:
    """Each wave's numbers counted over its notifications and deliveries."""
    out: dict[int, dict[str, Any]] = defaultdict(
        lambda: {"scheduled": 0, "paused": 0, "pending": 0, "sent": 0, "failed": 0, "suppressed": 0,
                 "failed_by_reason": Counter(), "suppressed_by_reason": Counter()}
    )  # fmt: skip
    with Session(ctx.engine) as s:
        for wave, status, n in s.execute(
            select(Notification.wave, Notification.status, func.count())
            .where(Notification.campaign_id == cid)
            .group_by(Notification.wave, Notification.status)
        ).all():
            if status in ("scheduled", "paused"):
                out[wave][status] += n
        for wave, status, reason, n in s.execute(
            select(Notification.wave, Delivery.status, Delivery.reason, func.count())
            .join(Notification, Notification.id == Delivery.notification_id)
            .where(Notification.campaign_id == cid)
            .group_by(Notification.wave, Delivery.status, Delivery.reason)
        ).all():
            w = out[wave]
            kind = {"queued": "pending", "retrying": "pending", "delivered": "sent", "opened": "sent"}.get(
                status, status
            )
            w[kind] += n
            if status in ("failed", "suppressed"):
                w[f"{status}_by_reason"][(reason or "").split(":")[0].strip() or "-"] += n
    return {w: {**c, "failed_by_reason": dict(c["failed_by_reason"]),
                "suppressed_by_reason": dict(c["suppressed_by_reason"])} for w, c in out.items()}  # fmt: skip


KEYS = ("scheduled", "paused", "pending", "sent", "failed", "suppressed", "failed_by_reason", "suppressed_by_reason")


def numbers(progress: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {w["wave"]: {k: w[k] for k in KEYS} for w in progress}


root = typer.Typer(cls=NotifyGroup)
root.add_typer(campaign_cli.app, name="campaign")


@root.callback()
def _root() -> None:
    pass


def cli_status(ctx: Context, cid: str) -> dict[str, Any]:
    r = CliRunner().invoke(root, ["campaign", "status", cid, "--json"], env=cli_env(ctx.settings))
    assert r.exit_code == 0, r.output
    return dict(json.loads(r.output))


def test_wave_progress_equals_sql_counts(any_db_ctx: Context) -> None:
    ctx = any_db_ctx
    cid = staggered_campaign(ctx)
    with Session(ctx.engine) as s:
        camp = s.get(Campaign, cid)
        assert camp is not None
        plan = camp.plan
    expected = sql_counts(ctx, cid)
    got = numbers(wave_progress(ctx.engine, cid, plan))
    assert got == expected
    # every kind of number is there: sends and failures (two reasons) in the first waves, suppressions
    # (two reasons), the last wave still scheduled
    assert got[0]["sent"] and got[1]["sent"] and got[2]["scheduled"] == plan[2]["recipients"]
    assert {r for w in got.values() for r in w["failed_by_reason"]} == {"sendgrid", "ses"}, got
    assert {r for w in got.values() for r in w["suppressed_by_reason"]} >= {"no_address", "opted_out"}, got
    assert not got[2]["sent"] and sum(w["failed"] for w in got.values()) > 0
    compact(ctx.engine)  # PostgreSQL: the deltas folded into wave_counts; the same numbers
    assert numbers(wave_progress(ctx.engine, cid, plan)) == expected
    # and the rollup beside them is exact too (SQLite: the worker's insert counts both after it)
    assert checks.rollup_counts(ctx.engine) == checks.full_counts(ctx.engine)
    # the CLI shows the very same numbers
    status = cli_status(ctx, cid)
    assert {int(w["wave"]): {k: w[k] for k in KEYS} for w in status["wave_progress"]} == expected
    assert status["wave_progress"] == json.loads(json.dumps(campaign_status(ctx, cid)["wave_progress"]))
    # the last wave goes out: its counts move from scheduled to sent
    drain(ctx, due_by=datetime.now(UTC).timestamp() + 3 * 86400)
    after = numbers(wave_progress(ctx.engine, cid, plan))
    assert after == sql_counts(ctx, cid) and after[2]["scheduled"] == 0 and after[2]["sent"] > 0


@pytest.mark.fresh_pg_schema
def test_install_backfills_the_wave_counts(any_db_ctx: Context) -> None:
    """A database whose wave triggers are missing (made before them, or by an older definition):
    install creates them and counts what is there; then the triggers keep counting."""
    from notifyctl.analytics import waves
    from notifyctl.db import write_lock

    ctx = any_db_ctx
    cid = staggered_campaign(ctx)
    pg = ctx.engine.dialect.name == "postgresql"
    with ctx.engine.begin() as conn:
        for name in waves.TRIGGERS:
            conn.exec_driver_sql(f"DROP TRIGGER {name}" + (" ON deliveries" if pg else ""))
        conn.exec_driver_sql("DELETE FROM wave_counts")
        conn.exec_driver_sql("DELETE FROM wave_delta")
    with Session(ctx.engine) as s:
        camp = s.get(Campaign, cid)
        assert camp is not None
        plan = camp.plan
    assert not any(w["sent"] for w in wave_progress(ctx.engine, cid, plan))  # nothing counted
    assert waves.install(ctx.engine, write_lock) and not waves.install(ctx.engine, write_lock)
    assert numbers(wave_progress(ctx.engine, cid, plan)) == sql_counts(ctx, cid)
    drain(ctx, due_by=datetime.now(UTC).timestamp() + 3 * 86400)
    assert numbers(wave_progress(ctx.engine, cid, plan)) == sql_counts(ctx, cid)


def test_cli_status_prints_each_wave(ctx: Context) -> None:
    cid = staggered_campaign(ctx)
    r = CliRunner().invoke(root, ["campaign", "status", cid], env={**cli_env(ctx.settings), "COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    rows = [line for line in r.output[r.output.index("per wave") :].splitlines() if "│" in line]
    cells = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]] for line in rows}
    progress = {w["wave"]: w for w in campaign_status(ctx, cid)["wave_progress"]}
    assert set(cells) == {f"{i + 1} {progress[i]['timezones'][0]}" for i in range(3)}
    for i in range(3):  # recipients, scheduled, paused, pending, sent, failed (by reason), suppressed (by reason)
        w = progress[i]
        by_reason = [f"{w[k]} ({', '.join(f'{r} {n}' for r, n in sorted(w[f'{k}_by_reason'].items()))})"
                     if w[k] else "0" for k in ("failed", "suppressed")]  # fmt: skip
        got = cells[f"{i + 1} {w['timezones'][0]}"][1:]
        assert got == [
            str(w["recipients"]),
            *(str(w[k]) for k in ("scheduled", "paused", "pending", "sent")),
            *by_reason,
        ]
    assert progress[0]["suppressed"] and progress[0]["failed"] and progress[2]["scheduled"]


@pytest.mark.fresh_pg_schema
@pytest.mark.parametrize("rollup_first", [True, False], ids=["rollup-first", "waves-first"])
def test_an_upgrade_from_the_waves_own_insert_trigger_counts_each_delivery_once(
    any_db_ctx: Context, rollup_first: bool
) -> None:
    """A database of the previous definition (the rollup's v5 triggers beside the waves' own v2
    insert and update triggers), upgraded in either order with the last wave sent between the two
    installs — counted twice meanwhile (rollup first: both insert triggers count it) or not at all
    (waves first: neither does): after the second install the wave counts equal SQL counts, only the
    new triggers are left, and a delivery inserted afterwards counts once."""
    from notifyctl.analytics import install, triggers, waves
    from notifyctl.analytics.rollup import (
        COLS,
        WAVE_COLS,
        pg_function,
        pg_key,
        pg_trigger,
        reason_sql,
        sqlite_insert_trigger,
    )
    from notifyctl.db import write_lock

    ctx = any_db_ctx
    pg = ctx.engine.dialect.name == "postgresql"
    cid = staggered_campaign(ctx)
    with Session(ctx.engine) as s:
        camp = s.get(Campaign, cid)
        assert camp is not None
        plan = camp.plan
    rollup_ins, rollup_upd = (name.replace(triggers.VERSION, "v5") for name in triggers.TRIGGERS)
    waves_ins, waves_upd = "notify_waves_ins_v2", "notify_waves_upd_v2"
    if pg:
        join = "FROM new_rows AS d {} JOIN notifications AS n ON n.id = d.notification_id"
        old = [
            pg_function(rollup_ins, f"INSERT INTO analytics_delta ({COLS}, n) SELECT {pg_key('d')}, count(*) "
                        f"{join.format('LEFT')} GROUP BY 1, 2, 3, 4, 5, 6"),
            pg_function(waves_ins, f"INSERT INTO wave_delta ({WAVE_COLS}, n) SELECT n.campaign_id, n.wave, d.channel, "
                        f"d.status, {reason_sql('postgresql', 'd')}, count(*) {join.format('')} "
                        "WHERE n.wave IS NOT NULL GROUP BY 1, 2, 3, 4, 5"),
            triggers._pg_ddl()[1].replace(triggers.TRIGGERS[1], rollup_upd),
            waves._pg_ddl()[0].replace(waves.TRIGGERS[0], waves_upd),
            pg_trigger(rollup_ins, "INSERT"), pg_trigger(waves_ins, "INSERT"),
            pg_trigger(rollup_upd, "UPDATE"), pg_trigger(waves_upd, "UPDATE"),
        ]  # fmt: skip
    else:
        ins, upd = triggers._sqlite_ddl()
        old = [
            ins.replace(" " + waves.sqlite_bump("NEW", 1), "").replace(triggers.TRIGGERS[0], rollup_ins),
            sqlite_insert_trigger(waves_ins, waves.sqlite_bump("NEW", 1)),
            upd.replace(triggers.TRIGGERS[1], rollup_upd),
            waves._sqlite_ddl()[0].replace(waves.TRIGGERS[0], waves_upd),
        ]
    with write_lock(ctx.engine), ctx.engine.begin() as conn:  # as the previous release left it
        for name in (*triggers.TRIGGERS, *waves.TRIGGERS):
            conn.exec_driver_sql(f"DROP TRIGGER {name}" + (" ON deliveries" if pg else ""))
            if pg:
                conn.exec_driver_sql(f"DROP FUNCTION {name}()")
        for statement in old:
            conn.exec_driver_sql(statement)
    table = Delivery.__table__  # type: ignore[attr-defined]

    def insert_copies(tag: str) -> None:
        """Three deliveries more, copies of sent ones with new addresses, inserted as any writer may."""
        with ctx.engine.begin() as conn:
            rows = conn.execute(select(table).where(table.c.status == "sent").limit(3)).mappings().all()
            conn.execute(table.insert(), [{**r, "id": f"d_{tag}{i}", "address": f"{tag}{i}@example.com"}
                                          for i, r in enumerate(rows)])  # fmt: skip

    insert_copies("old")
    assert numbers(wave_progress(ctx.engine, cid, plan)) == sql_counts(ctx, cid)  # (the old definition counts)
    first, second = (triggers, waves) if rollup_first else (waves, triggers)
    assert first.install(ctx.engine, write_lock) is True
    insert_copies("between")  # counted twice (rollup first) or not at all (waves first) for now
    assert numbers(wave_progress(ctx.engine, cid, plan)) != sql_counts(ctx, cid)
    assert second.install(ctx.engine, write_lock) is True
    with ctx.engine.connect() as conn:
        assert sorted(install.present(conn, "notify_")) == sorted((*triggers.TRIGGERS, *waves.TRIGGERS))
    assert numbers(wave_progress(ctx.engine, cid, plan)) == sql_counts(ctx, cid)
    insert_copies("after")  # counted once, by the one insert trigger
    drain(ctx, due_by=datetime.now(UTC).timestamp() + 3 * 86400)  # the last wave: the worker's insert
    after = numbers(wave_progress(ctx.engine, cid, plan))
    assert after == sql_counts(ctx, cid) and after[2]["sent"] > 0
    assert checks.rollup_counts(ctx.engine) == checks.full_counts(ctx.engine)
