"""The triggers that keep the hourly rollup up as ``deliveries`` change, and ``install``: create
them, backfill the rollup and its coarse tiers, replace an older definition (package docstring)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy.engine import Connection, Engine

from notifyctl.analytics.fold import FOLD_LOCK, fold_sql
from notifyctl.analytics.rollup import (
    COLS,
    ROW_GATE,
    UPSERT,
    full_count_sql,
    pg_key,
    pg_statement_triggers,
    sqlite_key,
)
from notifyctl.analytics.waves import SQLITE_COUNT_SINCE as WAVES_COUNT_SINCE

VERSION = "v5"  # in the trigger names: a new definition replaces the old one, and the rollup is rebuilt
# earlier definitions whose rollup install keeps (the same key; v3: no weekly tier; v4: SQLite's insert
# trigger counted every row, whoever inserted)
SAME_KEY = ("v1", "v2", "v3", "v4")
TRIGGERS = (f"notify_analytics_ins_{VERSION}", f"notify_analytics_upd_{VERSION}")


def _sqlite_ddl() -> list[str]:
    ins, upd = TRIGGERS

    def bump(row: str, n: int) -> str:
        return (
            f"INSERT INTO analytics_hourly ({COLS}, n, folded) SELECT {sqlite_key(row)}, {n}, 0 "
            f"FROM (SELECT 1) LEFT JOIN notifications AS n ON n.id = {row}.notification_id WHERE true {UPSERT};"
        )

    changed = " OR ".join(
        f"OLD.{c} IS NOT NEW.{c}" for c in ("status", "reason", "channel", "queued_at", "notification_id")
    )
    return [
        f"CREATE TRIGGER IF NOT EXISTS {ins} AFTER INSERT ON deliveries WHEN {ROW_GATE}() BEGIN {bump('NEW', 1)} END",
        f"CREATE TRIGGER IF NOT EXISTS {upd} AFTER UPDATE ON deliveries WHEN {changed} "
        f"BEGIN {bump('OLD', -1)} {bump('NEW', 1)} END",
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


def counted_insert(conn: Connection, insert: Callable[[Connection], None], rows: int) -> None:
    """Run ``insert`` (``rows`` new rows into ``deliveries``, all or none) with the rollup and the
    waves' counts kept up. PostgreSQL: its statement triggers do. SQLite, whose row triggers upsert
    them once a row (measured for the rollup's, 1,000-row inserts, load 7: 24.0 µs a row with it,
    11.3 without), has both skip this statement's rows and counts them after it in one grouped
    upsert each, in the same transaction."""
    gate = conn.connection.info.get(ROW_GATE) if conn.dialect.name == "sqlite" else None
    if gate is None or rows == 0:
        insert(conn)
        return
    gate[0] = 0
    try:
        insert(conn)
    finally:
        gate[0] = 1
    since = int(conn.exec_driver_sql("SELECT last_insert_rowid()").scalar_one()) - rows
    conn.exec_driver_sql(_SQLITE_COUNT_SINCE, (since,))
    conn.exec_driver_sql(WAVES_COUNT_SINCE, (since,))  # (a campaign's waves: notifyctl.analytics.waves)


def _pg_ddl() -> list[str]:
    ins, upd = TRIGGERS

    def side(rows: str, n: int) -> str:
        return (
            f"SELECT {pg_key('d')}, {n} AS n FROM {rows} AS d LEFT JOIN notifications AS n ON n.id = d.notification_id"
        )

    grouped = "GROUP BY 1, 2, 3, 4, 5, 6"
    insert = (
        f"SELECT {pg_key('d')}, count(*) FROM new_rows AS d LEFT JOIN notifications AS n "
        f"ON n.id = d.notification_id {grouped}"
    )
    return pg_statement_triggers(TRIGGERS, "analytics_delta", COLS, grouped, insert, side)


def _installed(conn: Connection) -> bool:
    if conn.dialect.name == "sqlite":
        sql = "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name IN (?, ?)"
    else:
        sql = "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'deliveries'::regclass AND tgname IN (%s, %s)"
    return conn.exec_driver_sql(sql, TRIGGERS).scalar() == 2


def install(engine: Engine, write_lock: Callable[[Engine], AbstractContextManager[None]]) -> bool:
    """Create the triggers when missing, and fill the rollup from a full count in the same
    transaction (a database made before analytics existed, or by an older definition), under
    ``write_lock`` (``notifyctl.db.write_lock``, passed in: db calls this, so no import cycle). Writers
    wait meanwhile (SQLite's write lock; PostgreSQL ``LOCK TABLE deliveries``), so no change is
    counted twice or missed. Returns whether it installed them. Other databases: nothing.

    Triggers of a definition with the same key (``SAME_KEY``: v1 and v2, before the coarse tiers)
    keep their rollup — it counts what ``purge`` deleted since, which a full count cannot: its
    pending deltas are moved in, and the coarse tiers filled from it, all marked folded."""
    dialect = engine.dialect.name
    if dialect not in ("sqlite", "postgresql"):
        return False
    with engine.connect() as conn:
        if _installed(conn):
            return False
    with write_lock(engine), engine.connect() as conn:
        if dialect == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("LOCK TABLE deliveries IN SHARE ROW EXCLUSIVE MODE")
        if _installed(conn):  # another process did it while this one waited
            conn.rollback()
            return False
        old = _old_triggers(conn)
        for name in old:
            conn.exec_driver_sql(
                f"DROP TRIGGER IF EXISTS {name}" + (" ON deliveries" if dialect == "postgresql" else "")
            )
            if dialect == "postgresql":
                conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {name}()")
        for ddl in _sqlite_ddl() if dialect == "sqlite" else _pg_ddl():
            conn.exec_driver_sql(ddl)
        if dialect == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({FOLD_LOCK})")  # no compaction meanwhile
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
        conn.commit()
    return True


def _old_triggers(conn: Connection) -> list[str]:
    if conn.dialect.name == "sqlite":
        sql = "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'notify_analytics_%'"
    else:
        sql = (
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'deliveries'::regclass AND tgname LIKE 'notify_analytics_%%'"
        )
    return [r[0] for r in conn.exec_driver_sql(sql).all() if r[0] not in TRIGGERS]
