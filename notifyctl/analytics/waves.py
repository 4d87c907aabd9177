"""A campaign's progress per time-zone wave: the counts of each wave's deliveries by status (and
kind of reason), kept up by triggers on ``deliveries`` as the rollup is (package docstring), and
read with the wave's notifications still waiting — what the console's Campaigns page and
``notifyctl campaign status`` show.

A campaign notification carries its wave (``Notification.wave``, its index in ``Campaign.plan``,
written at launch). A delivery counts in ``wave_counts`` under its notification's campaign and wave,
its channel, status and kind of reason; a committed status change moves one count, a rolled-back
one nothing. Deliveries of notifications without a wave (not a campaign's) cost the triggers one
primary-key probe of ``notifications`` and nothing else. On PostgreSQL the statement triggers
append to ``wave_delta``, which ``fold.compact`` moves into ``wave_counts`` (reads take both).

New deliveries are counted by the rollup's insert trigger (``triggers``), which joins them to their
notifications once for both counts; the update trigger here counts status changes. Installing
either definition counts ``wave_counts`` anew (``refill``), so whichever runs last leaves it exact.

A wave is read by key (a few rows), whatever the campaign's size: the page stays instant at
1,000,000 deliveries, where a grouped count over the campaign's deliveries would read them all
(``bench/console.py`` measures both).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy.engine import Connection, Engine

from notifyctl.analytics.install import replace_triggers
from notifyctl.analytics.read import Funnel
from notifyctl.analytics.rollup import (
    WAVE_COLS,
    WAVE_UPSERT,
    pg_function,
    pg_trigger,
    pg_update_body,
    reason_sql,
    sqlite_update_trigger,
)

# In the trigger names: a new definition replaces the old one, and the counts are rebuilt. v3: no
# insert trigger of its own (v2's ``ins``), the rollup's counts new deliveries for both.
VERSION = "v3"
PREFIX = "notify_waves_"  # every definition's trigger names start so
TRIGGERS = (f"{PREFIX}upd_{VERSION}",)


def _key(dialect: str, d: str) -> str:
    """The wave key of deliveries row ``d`` joined to its notification ``n``."""
    return f"n.campaign_id, n.wave, {d}.channel, {d}.status, {reason_sql(dialect, d)}"


def sqlite_bump(row: str, n: int) -> str:
    """SQLite: the statement adding ``n`` to the wave count of deliveries row ``row`` (``NEW``/``OLD``),
    for a campaign's notification (a wave); nothing for any other."""
    return (
        f"INSERT INTO wave_counts ({WAVE_COLS}, n) SELECT {_key('sqlite', row)}, {n} FROM notifications AS n "
        f"WHERE n.id = {row}.notification_id AND n.wave IS NOT NULL {WAVE_UPSERT};"
    )


def _sqlite_ddl() -> list[str]:
    return [sqlite_update_trigger(TRIGGERS[0], sqlite_bump, ("status", "reason", "channel", "notification_id"))]


# SQLite: the rows of one insert into deliveries (rowids above the parameter), counted in one
# grouped upsert (``triggers.counted_insert``, whose statement the row trigger skips).
SQLITE_COUNT_SINCE = (
    f"INSERT INTO wave_counts ({WAVE_COLS}, n) SELECT {_key('sqlite', 'd')}, count(*) FROM deliveries AS d "
    "JOIN notifications AS n ON n.id = d.notification_id WHERE d.rowid > ? AND n.wave IS NOT NULL "
    f"GROUP BY 1, 2, 3, 4, 5 {WAVE_UPSERT}"
)


# SQLite: counts added by key (``triggers.counted_insert`` with the rows' origins).
SQLITE_ADD = f"INSERT INTO wave_counts ({WAVE_COLS}, n) VALUES (?, ?, ?, ?, ?, ?) {WAVE_UPSERT}"


def _pg_ddl() -> list[str]:
    (upd,) = TRIGGERS

    def side(rows: str, n: int) -> str:
        return (
            f"SELECT {_key('postgresql', 'd')}, {n} AS n FROM {rows} AS d "
            "JOIN notifications AS n ON n.id = d.notification_id WHERE n.wave IS NOT NULL"
        )

    body = pg_update_body("wave_delta", WAVE_COLS, "GROUP BY 1, 2, 3, 4, 5", side)
    return [pg_function(upd, body), pg_trigger(upd, "UPDATE")]


def full_count_sql(dialect: str, where: str = "") -> str:
    """``wave_counts`` as a full count over the campaigns' deliveries (install's backfill)."""
    return (
        f"SELECT {_key(dialect, 'd')}, count(*) FROM deliveries AS d JOIN notifications AS n "
        f"ON n.id = d.notification_id WHERE n.wave IS NOT NULL {where} GROUP BY 1, 2, 3, 4, 5"
    )


def install(engine: Engine, write_lock: Callable[[Engine], AbstractContextManager[None]]) -> bool:
    """Create the triggers when missing and fill ``wave_counts`` from a full count in the same
    transaction, writers waiting meanwhile (``install.replace_triggers``, as ``triggers.install``).
    Returns whether it did."""

    return replace_triggers(
        engine,
        write_lock,
        TRIGGERS,
        PREFIX,
        lambda d: _sqlite_ddl() if d == "sqlite" else _pg_ddl(),
        lambda conn, _old: refill(conn),
    )


def refill(conn: Connection) -> None:
    """``wave_counts`` counted anew from the deliveries (its pending deltas dropped), in the caller's
    transaction: what installing this module's triggers or the rollup's (whose insert trigger
    counts new deliveries here) does, with writers held off."""
    conn.exec_driver_sql("DELETE FROM wave_counts")
    conn.exec_driver_sql("DELETE FROM wave_delta")
    conn.exec_driver_sql(f"INSERT INTO wave_counts ({WAVE_COLS}, n) {full_count_sql(conn.dialect.name)}")


def wave_counts(engine: Engine, campaign_id: str) -> dict[int, Funnel]:
    """Each wave's deliveries (all channels) as a ``Funnel`` (sent, delivered, opened, failed and
    suppressed by reason, pending), keyed by wave: ``wave_counts`` and PostgreSQL's pending deltas,
    read by key."""
    mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
    src = f"SELECT wave, status, reason, n FROM wave_counts WHERE campaign_id = {mark}"
    params: tuple[str, ...] = (campaign_id,)
    if engine.dialect.name == "postgresql":
        src += f" UNION ALL SELECT wave, status, reason, n FROM wave_delta WHERE campaign_id = {mark}"
        params += (campaign_id,)
    sql = f"SELECT wave, status, reason, sum(n) FROM ({src}) AS r GROUP BY wave, status, reason"
    out: dict[int, Funnel] = {}
    with engine.connect() as conn:
        rows: list[tuple[Any, ...]] = [tuple(r) for r in conn.exec_driver_sql(sql, params).all()]
        for wave, status, reason, n in rows:
            if int(n):
                out.setdefault(int(wave), Funnel(str(wave))).add(str(status), str(reason), int(n))
    return out


def waiting(conn: Connection, campaign_id: str) -> dict[int, dict[str, int]]:
    """Each wave's notifications not produced yet, ``{wave: {"scheduled": n, "paused": n}}``, on
    the (status, due_at) index, which holds only what is still to go. (``coalesce`` keeps SQLite's
    planner off the (campaign_id, recipient_id) index, through every notification of the campaign.)"""
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    sql = (
        "SELECT wave, status, count(*) FROM notifications WHERE status IN ('scheduled', 'paused') "
        f"AND coalesce(campaign_id, '') = {mark} GROUP BY wave, status"
    )
    out: dict[int, dict[str, int]] = {}
    rows: list[tuple[Any, ...]] = [tuple(r) for r in conn.exec_driver_sql(sql, (campaign_id,)).all()]
    for wave, status, n in rows:
        out.setdefault(-1 if wave is None else int(wave), {})[str(status)] = int(n)
    return out


def wave_progress(engine: Engine, campaign_id: str, plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each wave of a campaign — its plan entry (instant, start, end, recipients, time zones) — with
    its progress: ``scheduled`` and ``paused`` (notifications still to go), and over its
    deliveries ``pending`` (queued or retrying), ``sent`` (sent, delivered or opened),
    ``delivered``, ``opened``, ``failed`` and ``suppressed``, each of the last two by reason. A wave
    the plan lacks (recipients added to the segment since the plan pass: a wave of their own) comes
    after the plan's, its plan fields empty; notifications from before waves were numbered come
    last, as wave None (what of them still waits). The console's Campaigns page and ``notifyctl
    campaign status`` show this."""
    counts = wave_counts(engine, campaign_id)
    with engine.connect() as conn:
        still = waiting(conn, campaign_id)
    out = []
    unplanned: dict[str, Any] = {"instant": None, "start": None, "end": None, "recipients": None, "timezones": []}
    for i in sorted(set(range(len(plan))) | set(counts) | set(still), key=lambda i: (i < 0, i)):
        f = counts.get(i, Funnel(str(i))).to_dict()
        w = still.get(i, {})
        entry = plan[i] if 0 <= i < len(plan) else unplanned
        out.append({
            # wave None: notifications written before waves were numbered (their deliveries uncounted)
            "wave": None if i < 0 else i, **entry, "scheduled": w.get("scheduled", 0), "paused": w.get("paused", 0),
            **{k: f[k] for k in ("pending", "sent", "delivered", "opened", "failed", "suppressed",
                                 "failed_by_reason", "suppressed_by_reason")},
        })  # fmt: skip
    return out
