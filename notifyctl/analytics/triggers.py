"""The triggers that keep the hourly rollup up as ``deliveries`` change, and ``install``: create
them, backfill the rollup and its coarse tiers, replace an older definition (package docstring)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from datetime import UTC
from typing import Any

from sqlalchemy.engine import Connection, Engine

from notifyctl.analytics import waves
from notifyctl.analytics.fold import fold_sql
from notifyctl.analytics.install import present, replace_triggers
from notifyctl.analytics.rollup import (
    COLS,
    REASON_CHARS,
    ROW_GATE,
    UPSERT,
    WAVE_COLS,
    full_count_sql,
    pg_function,
    pg_key,
    pg_trigger,
    pg_update_body,
    reason_sql,
    sqlite_insert_trigger,
    sqlite_key,
    sqlite_update_trigger,
)

VERSION = "v6"  # in the trigger names: a new definition replaces the old one, and the rollup is rebuilt
# earlier definitions whose rollup install keeps (the same key; v3: no weekly tier; v4: SQLite's insert
# trigger counted every row, whoever inserted; v5: the waves' inserts counted by a trigger of their own)
SAME_KEY = ("v1", "v2", "v3", "v4", "v5")
PREFIX = "notify_analytics_"  # every definition's trigger names start so
TRIGGERS = (f"{PREFIX}ins_{VERSION}", f"{PREFIX}upd_{VERSION}")


def _sqlite_ddl() -> list[str]:
    ins, upd = TRIGGERS

    def bump(row: str, n: int) -> str:
        return (
            f"INSERT INTO analytics_hourly ({COLS}, n, folded) SELECT {sqlite_key(row)}, {n}, 0 "
            f"FROM (SELECT 1) LEFT JOIN notifications AS n ON n.id = {row}.notification_id WHERE true {UPSERT};"
        )

    return [
        sqlite_insert_trigger(ins, f"{bump('NEW', 1)} {waves.sqlite_bump('NEW', 1)}"),  # (and the wave counts)
        sqlite_update_trigger(upd, bump, ("status", "reason", "channel", "queued_at", "notification_id")),
    ]


def sqlite_connected(dbapi_conn: Any, record: Any) -> None:
    """Every SQLite connection (``notifyctl.db``'s connect hook): the function the insert trigger
    asks (``ROW_GATE``), answering yes until ``counted_insert`` turns it off for its statement."""
    gate = record.info[ROW_GATE] = [1]
    dbapi_conn.create_function(ROW_GATE, 0, lambda: gate[0])


# The rows one statement inserted, counted in one statement: on SQLite every new row's rowid is the
# largest one + 1 (a rowid table without AUTOINCREMENT), and within the writing transaction nobody
# else inserts, so a statement's k rows are the k rowids up to last_insert_rowid() (read before the
# counts, which insert rows of their own).
_SQLITE_COUNT_SINCE = (
    f"INSERT INTO analytics_hourly ({COLS}, n, folded) SELECT {sqlite_key('d')}, count(*), 0 "
    "FROM deliveries AS d LEFT JOIN notifications AS n ON n.id = d.notification_id "
    f"WHERE d.rowid > ? GROUP BY 1, 2, 3, 4, 5, 6 {UPSERT}"
)


# A new delivery's notification as its counts key it: template_id, campaign_id, wave (``counted_insert``).
Origin = tuple[str, str | None, int | None]
_HOURLY_ADD = f"INSERT INTO analytics_hourly ({COLS}, n, folded) VALUES (?, ?, ?, ?, ?, ?, ?, 0) {UPSERT}"


def reason_kind(status: str, reason: str | None) -> str:
    """``rollup.reason_sql`` in Python, as SQLite computes it (its ``trim`` removes spaces only)."""
    if status not in ("failed", "suppressed"):
        return ""
    return (reason or "").split(":", 1)[0].strip(" ")[:REASON_CHARS]


def sqlite_hour(queued_at: Any) -> str:
    """The rollup's hour (``rollup.sqlite_key``) of a ``queued_at`` as SQLite stores it: a datetime
    in UTC (the column's type converts it), written ``YYYY-MM-DD HH:MM:SS.ffffff`` (SQLAlchemy's
    SQLite DATETIME), its hour the first 13 characters."""
    if isinstance(queued_at, str):
        return queued_at[:13].replace("T", " ")
    if queued_at.tzinfo is not None:
        queued_at = queued_at.astimezone(UTC)
    return f"{queued_at:%Y-%m-%d %H}"


def counted_insert(
    conn: Connection,
    insert: Callable[[Connection], None],
    rows: int | list[dict[str, Any]],
    origins: Mapping[str, Origin] | None = None,
) -> None:
    """Run ``insert`` (``rows``, or their number: new rows into ``deliveries``, all or none) with the
    rollup and the waves' counts kept up. PostgreSQL: its statement triggers do. SQLite, whose row
    triggers upsert them once a row (measured for the rollup's, 1,000-row inserts, load 7: 24.0 µs a
    row with it, 11.3 without), has them skip this statement's rows, which are counted after it in
    the same transaction: from the rows themselves when they are given with ``origins`` (each
    row's notification id → its ``Origin``, what the SQL count joins ``notifications`` for: the
    worker has it loaded), one upsert per group; otherwise in one grouped upsert each over the
    statement's rowids, joined to their notifications."""
    n = rows if isinstance(rows, int) else len(rows)
    gate = conn.connection.info.get(ROW_GATE) if conn.dialect.name == "sqlite" else None
    if gate is None or n == 0:
        insert(conn)
        return
    gate[0] = 0
    try:
        insert(conn)
    finally:
        gate[0] = 1
    if origins is not None and not isinstance(rows, int):
        _add_counts(conn, rows, origins)
        return
    since = int(conn.exec_driver_sql("SELECT last_insert_rowid()").scalar_one()) - n
    conn.exec_driver_sql(_SQLITE_COUNT_SINCE, (since,))
    conn.exec_driver_sql(waves.SQLITE_COUNT_SINCE, (since,))  # (a campaign's waves: notifyctl.analytics.waves)


def _add_counts(conn: Connection, rows: list[dict[str, Any]], origins: Mapping[str, Origin]) -> None:
    """SQLite: ``rows``' counts, keyed as ``_SQLITE_COUNT_SINCE`` and ``waves.SQLITE_COUNT_SINCE`` key
    them (a notification not in ``origins``: as the LEFT JOIN finds none), added by key. Measured,
    1,000-row worker batches: the two grouped upserts over the new rows cost 2.4 µs a row, mostly
    their two lookups of each row's notification."""
    hourly: Counter[tuple[Any, ...]] = Counter()
    by_wave: Counter[tuple[Any, ...]] = Counter()
    hours: dict[Any, str] = {}
    none: Origin = ("", None, None)
    for r in rows:
        q = r["queued_at"]
        hour = hours.get(q)
        if hour is None:
            hour = hours[q] = sqlite_hour(q)
        template, campaign, wave = origins.get(r["notification_id"], none)
        status, channel = r["status"], r["channel"]
        kind = reason_kind(status, r["reason"]) if r["reason"] is not None else ""
        hourly[(hour, template, channel, campaign or "", status, kind)] += 1
        if wave is not None:
            by_wave[(campaign, wave, channel, status, kind)] += 1
    conn.exec_driver_sql(_HOURLY_ADD, [(*k, c) for k, c in hourly.items()])
    if by_wave:
        conn.exec_driver_sql(waves.SQLITE_ADD, [(*k, c) for k, c in by_wave.items()])


# PostgreSQL: an insert's rows counted for the rollup and for the campaigns' waves (``waves``) in one
# statement: the new rows joined to their notifications once, grouped once by every column either
# count needs (the hour as a timestamp: ``to_char`` then runs once a group, not once a row, and
# gives the rollup's ``pg_key`` hour), then each count summed from those groups. Measured against
# the two triggers it replaces (50,000 deliveries in 1,000-row COPYs, the server's CPU by
# /proc/<pid>/schedstat, load ~4): 5.6 → 4.6 µs a delivery, 2.6 → 1.6 of it the counting.
_PG_INSERT = (
    f"WITH x AS (SELECT date_trunc('hour', d.queued_at) AS hour, n.template_id, d.channel, n.campaign_id, n.wave, "
    f"d.status, {reason_sql('postgresql', 'd')} AS reason, count(*) AS k FROM new_rows AS d "
    "LEFT JOIN notifications AS n ON n.id = d.notification_id GROUP BY 1, 2, 3, 4, 5, 6, 7), "
    f"waves AS (INSERT INTO wave_delta ({WAVE_COLS}, n) SELECT {WAVE_COLS}, sum(k) FROM x "
    "WHERE wave IS NOT NULL GROUP BY 1, 2, 3, 4, 5) "
    f"INSERT INTO analytics_delta ({COLS}, n) SELECT to_char(hour, 'YYYY-MM-DD HH24'), coalesce(template_id, ''), "
    "channel, coalesce(campaign_id, ''), status, reason, sum(k) FROM x GROUP BY 1, 2, 3, 4, 5, 6"
)


def _pg_ddl() -> list[str]:
    ins, upd = TRIGGERS

    def side(rows: str, n: int) -> str:
        return (
            f"SELECT {pg_key('d')}, {n} AS n FROM {rows} AS d LEFT JOIN notifications AS n ON n.id = d.notification_id"
        )

    update = pg_update_body("analytics_delta", COLS, "GROUP BY 1, 2, 3, 4, 5, 6", side)
    functions = [pg_function(ins, _PG_INSERT), pg_function(upd, update)]
    return [*functions, pg_trigger(ins, "INSERT"), pg_trigger(upd, "UPDATE")]


def install(engine: Engine, write_lock: Callable[[Engine], AbstractContextManager[None]]) -> bool:
    """Create the triggers when missing, and fill the rollup from a full count in the same
    transaction (a database made before analytics existed, or by an older definition), writers
    waiting meanwhile, so no change is counted twice or missed (``install.replace_triggers``, under
    ``write_lock``: ``notifyctl.db.write_lock``). Returns whether it installed them. Other
    databases: nothing.

    Triggers of an earlier definition with the same key (``SAME_KEY``) keep their rollup — it
    counts what ``purge`` deleted since, which a full count cannot: its pending deltas are moved
    in, and the coarse tiers filled from it, all marked folded.

    The insert trigger also counts the campaigns' waves (``waves``): when the waves' own triggers
    are current, ``wave_counts`` is counted anew here too (``waves.refill``); when they are not,
    ``waves.install`` (run after this one: ``db.engine_for``) does it."""

    def fill(conn: Connection, old: list[str]) -> None:
        dialect = conn.dialect.name
        for table in ("analytics_total", "analytics_daily", "analytics_weekly"):
            conn.exec_driver_sql(f"DELETE FROM {table}")
        if old and all(name.rsplit("_", 1)[-1] in SAME_KEY for name in old):
            if dialect == "postgresql":
                conn.exec_driver_sql(
                    f"WITH moved AS (DELETE FROM analytics_delta RETURNING {COLS}, n) "
                    f"INSERT INTO analytics_hourly ({COLS}, n, folded) SELECT {COLS}, sum(n), 0 FROM moved "
                    f"GROUP BY {COLS} ORDER BY {COLS} {UPSERT}"
                )
            conn.exec_driver_sql("UPDATE analytics_hourly SET folded = n")
        else:
            conn.exec_driver_sql("DELETE FROM analytics_hourly")
            conn.exec_driver_sql("DELETE FROM analytics_delta")
            full = full_count_sql(dialect, ", count(*)")
            conn.exec_driver_sql(f"INSERT INTO analytics_hourly ({COLS}, n, folded) {full}")
        for sql in fold_sql(dialect, "n", ""):  # the coarse tiers from the whole rollup, folded as written
            conn.exec_driver_sql(sql)
        if set(waves.TRIGGERS) <= set(present(conn, waves.PREFIX)):
            # The insert trigger counts the waves' new deliveries too: with no rollup triggers (or
            # ones that did not), they went uncounted until now. (Otherwise ``waves.install``, which
            # runs next, counts them anew: not twice over on a large table.)
            waves.refill(conn)

    return replace_triggers(
        engine, write_lock, TRIGGERS, PREFIX, lambda d: _sqlite_ddl() if d == "sqlite" else _pg_ddl(), fill
    )
