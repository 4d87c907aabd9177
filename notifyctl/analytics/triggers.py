"""The triggers that keep the hourly rollup up as ``deliveries`` change, and ``install``: create
them, backfill the rollup and its coarse tiers, replace an older definition (package docstring)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from datetime import UTC
from operator import itemgetter
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

VERSION = "v7"  # in the trigger names: a new definition replaces the old one, and the rollup is rebuilt
# earlier definitions whose rollup install keeps (the same key; v3: no weekly tier; v4: SQLite's insert
# trigger counted every row, whoever inserted; v5: the waves' inserts counted by a trigger of their own;
# v6: PostgreSQL's insert trigger counted every statement's rows, the worker's too)
SAME_KEY = ("v1", "v2", "v3", "v4", "v5", "v6")
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
    rollup and the waves' counts kept up. PostgreSQL: its statement trigger does, except when the
    rows come with ``origins``: then the trigger skips the statement (``PG_GATE``) and the rows are
    counted from themselves (``_pg_add_counts``), in the same transaction. SQLite, whose row
    triggers upsert them once a row (measured for the rollup's, 1,000-row inserts, load 7: 24.0 µs a
    row with it, 11.3 without), has them skip this statement's rows, which are counted after it in
    the same transaction: from the rows themselves when they are given with ``origins`` (each
    row's notification id → its ``Origin``, what the SQL count joins ``notifications`` for: the
    worker has it loaded), one upsert per group; otherwise in one grouped upsert each over the
    statement's rowids, joined to their notifications."""
    n = rows if isinstance(rows, int) else len(rows)
    if conn.dialect.name == "postgresql" and origins is not None and not isinstance(rows, int) and n:
        conn.exec_driver_sql(_PG_GATE_ON)  # (the trigger skips this statement: counted below)
        insert(conn)
        _pg_add_counts(conn, rows, origins)
        return
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


def _pg_add_counts(conn: Connection, rows: list[dict[str, Any]], origins: Mapping[str, Origin]) -> None:
    """PostgreSQL: ``rows``' counts, grouped here by what the insert trigger's statement groups by
    (a notification not in ``origins``: as its LEFT JOIN finds none), then added by one statement
    that computes the hour and the kind of reason as that statement does (``_pg_counts``: the same
    SQL, in the same session, so the same time zone), then the gate closed. Only when the insert
    trigger present is the one that honours the gate (``TRIGGERS``): an older definition put back
    by an older release's process has counted the rows already, and the check cannot race, as
    replacing a trigger waits for the lock the insert holds until the commit."""
    none: Origin = ("", None, None)
    get = origins.get
    # counted in C (``Counter`` over ``zip``/``map``): a batch's queued_at is one object, keyed by
    # identity (an aware datetime hashes slowly); measured, 1,000 rows: ~0.6 µs a row, against ~1.2
    # for a loop building each row's key
    at = {id(q): q for q in map(_QUEUED, rows)}
    groups = Counter(
        zip([get(nid, none) for nid in map(_NID, rows)], map(_CSR, rows), map(id, map(_QUEUED, rows)), strict=True)
    )
    params: list[Any] = []
    for (origin, (channel, status, reason), q), k in groups.items():
        params += (at[q], *origin, channel, status, reason, k)
    values = ", ".join([_PG_GROUP] * len(groups))
    conn.exec_driver_sql(_PG_ADD.format(values=values), tuple(params))


_NID, _QUEUED, _CSR = itemgetter("notification_id"), itemgetter("queued_at"), itemgetter("channel", "status", "reason")


_PG_GROUP = "(%s::timestamptz, %s::text, %s::text, %s::integer, %s::text, %s::text, %s::text, %s::bigint)"


# PostgreSQL: an insert's rows counted for the rollup and for the campaigns' waves (``waves``) in one
# statement: the new rows joined to their notifications once, grouped once by every column either
# count needs (the hour as a timestamp: ``to_char`` then runs once a group, not once a row, and
# gives the rollup's ``pg_key`` hour), then each count summed from those groups. Measured against
# the two triggers it replaces (50,000 deliveries in 1,000-row COPYs, the server's CPU by
# /proc/<pid>/schedstat, load ~4): 5.6 → 4.6 µs a delivery, 2.6 → 1.6 of it the counting.
def _pg_counts(x: str) -> str:
    """The statement adding to ``analytics_delta`` and ``wave_delta`` the groups ``x`` selects (hour as
    a timestamp, template_id, channel, campaign_id, wave, status, kind of reason, k)."""
    return (
        f"WITH x AS ({x}), "
        f"waves AS (INSERT INTO wave_delta ({WAVE_COLS}, n) SELECT {WAVE_COLS}, sum(k) FROM x "
        "WHERE wave IS NOT NULL GROUP BY 1, 2, 3, 4, 5) "
        f"INSERT INTO analytics_delta ({COLS}, n) SELECT to_char(hour, 'YYYY-MM-DD HH24'), coalesce(template_id, ''), "
        "channel, coalesce(campaign_id, ''), status, reason, sum(k) FROM x GROUP BY 1, 2, 3, 4, 5, 6"
    )


_PG_INSERT = _pg_counts(
    f"SELECT date_trunc('hour', d.queued_at) AS hour, n.template_id, d.channel, n.campaign_id, n.wave, "
    f"d.status, {reason_sql('postgresql', 'd')} AS reason, count(*) AS k FROM new_rows AS d "
    "LEFT JOIN notifications AS n ON n.id = d.notification_id GROUP BY 1, 2, 3, 4, 5, 6, 7"
)

# PostgreSQL: the setting (transaction-local) by which ``counted_insert`` tells the insert trigger
# that its writer counts the statement's rows itself (``_pg_add_counts``): the trigger then returns
# at once. Measured on the worker's insert (1,000-row COPYs of sent deliveries, trigger-counted and
# worker-counted alternating, 3 runs of 58 batches each, the server's CPU by /proc/<pid>/schedstat,
# load 7-8): the server 20.7/17.7/15.6 → 17.1/15.4/13.4 µs a row (-2.3 to -3.6), the worker +0.8 to
# +1.6 (its count of the rows, ~0.6, and two statements a batch).
PG_GATE = "notifyctl.rows_counted"
_PG_GATE_ON = f"SELECT set_config('{PG_GATE}', 'on', true)"
_PG_ADD = (
    _pg_counts(
        f"SELECT date_trunc('hour', d.queued_at) AS hour, d.template_id, d.channel, d.campaign_id, d.wave, "
        f"d.status, {reason_sql('postgresql', 'd')} AS reason, sum(d.k) AS k "
        "FROM (VALUES {values}) AS d (queued_at, template_id, campaign_id, wave, channel, status, reason, k) "
        f"WHERE EXISTS (SELECT FROM pg_trigger WHERE tgrelid = 'deliveries'::regclass AND tgname = '{TRIGGERS[0]}') "
        "GROUP BY 1, 2, 3, 4, 5, 6, 7"
    )
    + f"; SELECT set_config('{PG_GATE}', 'off', true)"
)


def _pg_ddl() -> list[str]:
    ins, upd = TRIGGERS

    def side(rows: str, n: int) -> str:
        return (
            f"SELECT {pg_key('d')}, {n} AS n FROM {rows} AS d LEFT JOIN notifications AS n ON n.id = d.notification_id"
        )

    update = pg_update_body("analytics_delta", COLS, "GROUP BY 1, 2, 3, 4, 5, 6", side)
    gated = f"IF current_setting('{PG_GATE}', true) = 'on' THEN RETURN NULL; END IF;\n  {_PG_INSERT}"
    functions = [pg_function(ins, gated), pg_function(upd, update)]
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
