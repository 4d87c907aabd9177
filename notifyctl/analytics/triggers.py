"""The triggers that keep the hourly rollup up as ``deliveries`` change, and ``install``: create
them, backfill the rollup and its coarse tiers, replace an older definition (package docstring)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy.engine import Connection, Engine

from notifyctl.analytics.fold import fold_sql
from notifyctl.analytics.install import replace_triggers
from notifyctl.analytics.rollup import (
    COLS,
    ROW_GATE,
    UPSERT,
    full_count_sql,
    pg_key,
    pg_statement_triggers,
    sqlite_key,
    sqlite_row_triggers,
)
from notifyctl.analytics.waves import SQLITE_COUNT_SINCE as WAVES_COUNT_SINCE

VERSION = "v5"  # in the trigger names: a new definition replaces the old one, and the rollup is rebuilt
# earlier definitions whose rollup install keeps (the same key; v3: no weekly tier; v4: SQLite's insert
# trigger counted every row, whoever inserted)
SAME_KEY = ("v1", "v2", "v3", "v4")
PREFIX = "notify_analytics_"  # every definition's trigger names start so
TRIGGERS = (f"{PREFIX}ins_{VERSION}", f"{PREFIX}upd_{VERSION}")


def _sqlite_ddl() -> list[str]:
    def bump(row: str, n: int) -> str:
        return (
            f"INSERT INTO analytics_hourly ({COLS}, n, folded) SELECT {sqlite_key(row)}, {n}, 0 "
            f"FROM (SELECT 1) LEFT JOIN notifications AS n ON n.id = {row}.notification_id WHERE true {UPSERT};"
        )

    return sqlite_row_triggers(TRIGGERS, bump, ("status", "reason", "channel", "queued_at", "notification_id"))


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


def install(engine: Engine, write_lock: Callable[[Engine], AbstractContextManager[None]]) -> bool:
    """Create the triggers when missing, and fill the rollup from a full count in the same
    transaction (a database made before analytics existed, or by an older definition), writers
    waiting meanwhile, so no change is counted twice or missed (``install.replace_triggers``, under
    ``write_lock``: ``notifyctl.db.write_lock``). Returns whether it installed them. Other
    databases: nothing.

    Triggers of an earlier definition with the same key (``SAME_KEY``) keep their rollup — it
    counts what ``purge`` deleted since, which a full count cannot: its pending deltas are moved
    in, and the coarse tiers filled from it, all marked folded."""

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

    return replace_triggers(
        engine, write_lock, TRIGGERS, PREFIX, lambda d: _sqlite_ddl() if d == "sqlite" else _pg_ddl(), fill
    )
