"""The coarse tiers' upkeep: ``compact`` folds what changed in the hourly rollup (SQLite) or the
deltas (PostgreSQL) into the total, daily and weekly tiers, off the status changes' path."""

from __future__ import annotations

from sqlalchemy.engine import Connection, Engine

from notifyctl.analytics import rollup as r
from notifyctl.analytics.rollup import COLS, DAILY, DIMS, TOTAL, UPSERT, WEEK_DIMS, WEEKLY, week_sql
from notifyctl.pgstats import HOT_TABLES, analyze_grown
from notifyctl.sqllock import write_lock

FOLD_LOCK = 0x616E6C79  # PostgreSQL advisory lock of compaction and install ("anly")


def fold_sql(dialect: str, amount: str, where: str, table: str = "analytics_hourly") -> list[str]:
    """Add ``amount`` (an expression over ``table``'s rows, the hourly rollup's key) of the rows
    matching ``where`` into the coarse tiers: the total, then each dimension's days, then its weeks
    (rows in key order)."""
    src = f"FROM {table} {where}"
    out = [
        f"INSERT INTO analytics_total ({TOTAL}, n) SELECT {TOTAL}, sum({amount}) {src} GROUP BY {TOTAL} "
        f"HAVING sum({amount}) <> 0 ORDER BY {TOTAL} "
        f"ON CONFLICT ({TOTAL}) DO UPDATE SET n = analytics_total.n + excluded.n"
    ]
    for dim, col in DIMS.items():
        key = "substr(hour, 1, 10), " + ("" if dim == "" else f"{col}, ") + "status, reason"  # no constant
        out.append(
            f"INSERT INTO analytics_daily ({DAILY}, n) SELECT '{dim}', substr(hour, 1, 10), {col}, status, reason, "
            f"sum({amount}) {src} GROUP BY {key} HAVING sum({amount}) <> 0 "
            f"ORDER BY 2, 3, 4, 5 ON CONFLICT ({DAILY}) DO UPDATE SET n = analytics_daily.n + excluded.n"
        )
    week = week_sql(dialect)
    for dim in WEEK_DIMS:
        col = DIMS[dim]
        out.append(
            f"INSERT INTO analytics_weekly ({WEEKLY}, n) SELECT '{dim}', {week}, {col}, status, reason, "
            f"sum({amount}) {src} GROUP BY {week}, {col}, status, reason HAVING sum({amount}) <> 0 "
            f"ORDER BY 2, 3, 4, 5 ON CONFLICT ({WEEKLY}) DO UPDATE SET n = analytics_weekly.n + excluded.n"
        )
    return out


_UNFOLDED = "WHERE n <> folded"  # the partial index ix_analytics_hourly_unfolded's condition


def compact(engine: Engine) -> int:
    """The rollup's upkeep, off the status changes' path (the worker pool runs it every few
    seconds). Returns the rollup rows folded.

    - SQLite: ``fold``: what changed in the hourly rows since they were last folded (``n -
      folded``, the rows the partial index ``ix_analytics_hourly_unfolded`` holds) is added to the
      coarse tiers (``analytics_total``, ``analytics_daily``, ``analytics_weekly``) and marked
      folded, in one transaction under the write lock.
    - PostgreSQL: ``analytics_delta`` moved, summed, into the hourly rows and the coarse tiers at
      once (one statement): its hourly rows are never left unfolded, and the coarse tiers are read
      with the deltas alone. Compactions run one at a time (an advisory lock): each delta row is
      moved by exactly one. (The planner's statistics of the tables a blast grows, the coarse
      tiers among them, are refreshed here too, ``pgstats.analyze_grown``.)

    Either way readers see each change once: in the hourly rows or deltas not yet folded, or in
    the coarse tiers."""
    dialect = engine.dialect.name
    if dialect == "postgresql":
        analyze_grown(engine, (*HOT_TABLES, "analytics_total", "analytics_daily", "analytics_weekly"))
        ctes = [
            f"moved AS (DELETE FROM analytics_delta RETURNING {COLS}, n)",
            f"summed AS (SELECT {COLS}, sum(n) AS n FROM moved GROUP BY {COLS} HAVING sum(n) <> 0)",
            f"hourly AS (INSERT INTO analytics_hourly ({COLS}, n, folded) SELECT {COLS}, n, n FROM summed "
            f"ORDER BY {COLS} {UPSERT}, folded = analytics_hourly.folded + excluded.n)",
            *(f"coarse{i} AS ({sql})" for i, sql in enumerate(fold_sql(dialect, "n", "", "summed"))),
            # the campaigns' per-wave counts (``analytics.waves``): their deltas moved the same way
            f"wmoved AS (DELETE FROM wave_delta RETURNING {r.WAVE_COLS}, n)",
            f"waves AS (INSERT INTO wave_counts ({r.WAVE_COLS}, n) SELECT {r.WAVE_COLS}, sum(n) FROM wmoved "
            f"GROUP BY {r.WAVE_COLS} HAVING sum(n) <> 0 ORDER BY {r.WAVE_COLS} {r.WAVE_UPSERT})",
        ]
        with engine.begin() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({FOLD_LOCK})")
            return int(conn.exec_driver_sql(f"WITH {', '.join(ctes)} SELECT count(*) FROM summed").scalar() or 0)
    if dialect != "sqlite":
        return 0
    with write_lock(engine), engine.connect() as conn:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        folded = _fold(conn)
        conn.commit()
        return folded


def _fold(conn: Connection) -> int:
    for sql in fold_sql(conn.dialect.name, "n - folded", _UNFOLDED):
        conn.exec_driver_sql(sql)
    return int(conn.exec_driver_sql(f"UPDATE analytics_hourly SET folded = n {_UNFOLDED}").rowcount or 0)
