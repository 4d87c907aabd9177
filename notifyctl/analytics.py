"""Delivery analytics: an hourly rollup kept up as statuses change, and the funnel read from it.

``analytics_hourly`` counts deliveries by the hour they were queued (UTC) × template × channel ×
campaign × status (× the kind of reason, for ``failed`` and ``suppressed``). Triggers on
``deliveries`` keep it up in the same transaction as every write, whoever writes — the worker's
batch, a webhook, a DLQ replay, the reconciler: a committed status change moves one count from
the old row to the new one, a rolled-back one (a worker killed mid-batch) moves nothing.

- SQLite (one writer at a time): row triggers upsert the rollup directly.
- PostgreSQL: statement triggers append what each statement changed, aggregated, to
  ``analytics_delta`` (appends: concurrent workers never wait on each other's rollup row);
  ``compact`` folds it into the rollup (the worker pool does so every few seconds). Reads sum
  both, so they are exact whenever they run.

The rollup is the analytics store: ``notifyctl purge`` (retention) deletes deliveries but not
what they counted, so reports cover more than the raw rows kept.

The funnel: ``sent`` counts what reached the provider (now sent, delivered or opened),
``delivered`` what was delivered (delivered or opened), ``opened`` what was opened.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection, Engine

from notifyctl.errors import InputError
from notifyctl.pgstats import analyze_grown

VERSION = "v2"  # in the trigger names: a new definition replaces the old one, and the rollup is rebuilt
TRIGGERS = (f"notify_analytics_ins_{VERSION}", f"notify_analytics_upd_{VERSION}")
KEY = ("hour", "template_id", "channel", "campaign_id", "status", "reason")
BY = ("template", "channel", "campaign", "day", "hour")
STATUSES = ("queued", "retrying", "sent", "delivered", "opened", "failed", "suppressed")
REASON_CHARS = 64


def _sqlite_key(d: str) -> str:
    """The rollup key of deliveries row ``d`` (``NEW``/``OLD``/an alias) joined to notification ``n``."""
    r = f"coalesce({d}.reason, '')"
    reason = (
        f"CASE WHEN {d}.status IN ('failed', 'suppressed') THEN substr(trim(CASE WHEN instr({r}, ':') > 0 "
        f"THEN substr({r}, 1, instr({r}, ':') - 1) ELSE {r} END), 1, {REASON_CHARS}) ELSE '' END"
    )
    return (
        f"replace(substr({d}.queued_at, 1, 13), 'T', ' '), coalesce(n.template_id, ''), {d}.channel, "
        f"coalesce(n.campaign_id, ''), {d}.status, {reason}"
    )


def _pg_key(d: str) -> str:
    reason = (
        f"CASE WHEN {d}.status IN ('failed', 'suppressed') "
        f"THEN left(trim(split_part(coalesce({d}.reason, ''), ':', 1)), {REASON_CHARS}) ELSE '' END"
    )
    return (
        f"to_char({d}.queued_at, 'YYYY-MM-DD HH24'), coalesce(n.template_id, ''), {d}.channel, "
        f"coalesce(n.campaign_id, ''), {d}.status, {reason}"
    )


_COLS = ", ".join(KEY)
_UPSERT = f"ON CONFLICT ({_COLS}) DO UPDATE SET n = analytics_hourly.n + excluded.n"


def _sqlite_ddl() -> list[str]:
    ins, upd = TRIGGERS

    def bump(row: str, n: int) -> str:
        return (
            f"INSERT INTO analytics_hourly ({_COLS}, n) SELECT {_sqlite_key(row)}, {n} "
            f"FROM (SELECT 1) LEFT JOIN notifications AS n ON n.id = {row}.notification_id WHERE true {_UPSERT};"
        )

    changed = " OR ".join(
        f"OLD.{c} IS NOT NEW.{c}" for c in ("status", "reason", "channel", "queued_at", "notification_id")
    )
    return [
        f"CREATE TRIGGER IF NOT EXISTS {ins} AFTER INSERT ON deliveries BEGIN {bump('NEW', 1)} END",
        f"CREATE TRIGGER IF NOT EXISTS {upd} AFTER UPDATE ON deliveries WHEN {changed} "
        f"BEGIN {bump('OLD', -1)} {bump('NEW', 1)} END",
    ]


# The statement triggers join the changed rows to their notifications by primary key: a handful to
# a thousand index probes. Planned from the table's statistics, that join became a hash join over
# every notification whenever the statistics said the table was small — a fresh database, or any
# table that grew faster than autovacuum analysed it (a first campaign): each worker batch's insert
# then read the whole table (measured, 1,000-row batches: 11 µs a delivery at 10,000
# notifications, 27 µs at 80,000, growing with the table; 7 µs of it the join). The functions
# plan with hash and merge joins off, so the join is always the probes (~1 µs a delivery), whatever
# the statistics say.
_PG_PLAN = "SET enable_hashjoin = off SET enable_mergejoin = off"


def _pg_ddl() -> list[str]:
    ins, upd = TRIGGERS

    def side(rows: str, n: int) -> str:
        return (
            f"SELECT {_pg_key('d')}, {n} AS n FROM {rows} AS d LEFT JOIN notifications AS n ON n.id = d.notification_id"
        )

    grouped = "GROUP BY 1, 2, 3, 4, 5, 6"
    return [
        f"""CREATE OR REPLACE FUNCTION {ins}() RETURNS trigger LANGUAGE plpgsql {_PG_PLAN} AS $$
BEGIN
  INSERT INTO analytics_delta ({_COLS}, n)
  SELECT {_pg_key("d")}, count(*) FROM new_rows AS d LEFT JOIN notifications AS n ON n.id = d.notification_id {grouped};
  RETURN NULL;
END $$""",
        f"""CREATE OR REPLACE FUNCTION {upd}() RETURNS trigger LANGUAGE plpgsql {_PG_PLAN} AS $$
BEGIN
  INSERT INTO analytics_delta ({_COLS}, n)
  SELECT {_COLS}, sum(n) FROM ({side("old_rows", -1)} UNION ALL {side("new_rows", 1)}) AS x({_COLS}, n)
  {grouped} HAVING sum(n) <> 0;
  RETURN NULL;
END $$""",
        f"CREATE OR REPLACE TRIGGER {ins} AFTER INSERT ON deliveries REFERENCING NEW TABLE AS new_rows "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {ins}()",
        f"CREATE OR REPLACE TRIGGER {upd} AFTER UPDATE ON deliveries REFERENCING OLD TABLE AS old_rows "
        f"NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {upd}()",
    ]


def full_count_sql(dialect: str) -> str:
    """The rollup as a full count over ``deliveries`` (what the triggers keep it equal to)."""
    key = _pg_key("d") if dialect == "postgresql" else _sqlite_key("d")
    return (
        f"SELECT {key}, count(*) FROM deliveries AS d LEFT JOIN notifications AS n ON n.id = d.notification_id "
        "GROUP BY 1, 2, 3, 4, 5, 6"
    )


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
    counted twice or missed. Returns whether it installed them. Other databases: nothing."""
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
        conn.exec_driver_sql("DELETE FROM analytics_hourly")
        conn.exec_driver_sql("DELETE FROM analytics_delta")
        conn.exec_driver_sql(f"INSERT INTO analytics_hourly ({_COLS}, n) {full_count_sql(dialect)}")
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


def compact(engine: Engine) -> int:
    """PostgreSQL: fold ``analytics_delta`` into ``analytics_hourly`` (rows in key order, so two
    compactors never deadlock; each delta row is moved by exactly one). Returns the delta rows
    moved. A no-op on SQLite. (The pool's periodic upkeep of PostgreSQL: the planner's statistics
    of the tables a blast grows are refreshed here too, ``pgstats.analyze_grown``.)"""
    if engine.dialect.name != "postgresql":
        return 0
    analyze_grown(engine)
    with engine.begin() as conn:
        res = conn.exec_driver_sql(
            f"WITH moved AS (DELETE FROM analytics_delta RETURNING {_COLS}, n), "
            f"summed AS (SELECT {_COLS}, sum(n) AS n, count(*) AS rows FROM moved GROUP BY {_COLS}), "
            f"ins AS (INSERT INTO analytics_hourly ({_COLS}, n) SELECT {_COLS}, n FROM summed ORDER BY {_COLS} "
            f"{_UPSERT}) SELECT coalesce(sum(rows), 0) FROM summed"
        )
        return int(res.scalar() or 0)


# ── reading ───────────────────────────────────────────────────────────────────────────────────

_DURATION_RE = re.compile(r"^\s*(\d+)\s*([hdw])\s*$")
_UNITS = {"h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str | None, now: datetime | None = None) -> str | None:
    """``--since``: ``24h`` / ``7d`` / ``2w`` back from now, or a UTC date or date-time
    (``2026-12-01``, ``2026-12-01T08:00``) → the first rollup hour included (``YYYY-MM-DD HH``)."""
    if text is None or not text.strip():
        return None
    now = now or datetime.now(UTC)
    m = _DURATION_RE.match(text)
    if m:
        if int(m.group(1)) <= 0:
            raise InputError(f"--since: expected a positive duration, got {text!r}")
        at = now - timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
    else:
        try:
            at = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise InputError(
                f"--since: expected a duration (24h, 7d, 2w) or a UTC date (2026-12-01), got {text!r}"
            ) from None
        if at.tzinfo is not None:
            at = at.astimezone(UTC)
    return at.strftime("%Y-%m-%d %H")


@dataclass
class Funnel:
    """One group's numbers (see the module docstring for what the funnel counts)."""

    key: str
    total: int = 0
    pending: int = 0  # queued or retrying
    sent: int = 0
    delivered: int = 0
    opened: int = 0
    failed: int = 0
    suppressed: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    suppressed_by_reason: dict[str, int] = field(default_factory=dict)

    def add(self, status: str, reason: str, n: int) -> None:
        self.total += n
        if status in ("queued", "retrying"):
            self.pending += n
        if status in ("sent", "delivered", "opened"):
            self.sent += n
        if status in ("delivered", "opened"):
            self.delivered += n
        if status == "opened":
            self.opened += n
        if status == "failed":
            self.failed += n
            self.failed_by_reason[reason or "-"] = self.failed_by_reason.get(reason or "-", 0) + n
        if status == "suppressed":
            self.suppressed += n
            self.suppressed_by_reason[reason or "-"] = self.suppressed_by_reason.get(reason or "-", 0) + n

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["delivery_rate"] = round(self.delivered / self.sent, 4) if self.sent else None
        d["open_rate"] = round(self.opened / self.sent, 4) if self.sent else None
        return d


_GROUP = {
    "template": "template_id",
    "channel": "channel",
    "campaign": "campaign_id",
    "day": "substr(hour, 1, 10)",
    "hour": "hour",
}


def funnel(
    engine: Engine,
    by: str = "template",
    since: str | None = None,
    *,
    template: str | None = None,
    channel: str | None = None,
    campaign: str | None = None,
) -> dict[str, Any]:
    """The funnel per ``by`` group (template, channel, campaign, day or hour), from ``since`` (a
    rollup hour, ``parse_since``), optionally for one template / channel / campaign (``""`` is
    "no campaign"). ``{"by", "since", "groups": [Funnel dicts], "total": Funnel dict}``, groups in
    key order. One query over the rollup (and PostgreSQL's pending deltas)."""
    if by not in _GROUP:
        raise InputError(f"--by: expected one of {', '.join(BY)}, got {by!r}")
    mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
    conds: list[str] = []
    params: list[Any] = []
    for col, value in (("hour", since), ("template_id", template), ("channel", channel), ("campaign_id", campaign)):
        if value is not None:
            conds.append(f"{col} {'>=' if col == 'hour' else '='} {mark}")
            params.append(value)
    where = f"WHERE {' AND '.join(conds)}" if conds else ""
    group = _GROUP[by]
    sources = [f"SELECT {_COLS}, n FROM analytics_hourly {where}"]
    if engine.dialect.name == "postgresql":
        sources.append(f"SELECT {_COLS}, n FROM analytics_delta {where}")
        params = params * 2
    sql = (
        f"SELECT {group} AS k, status, reason, sum(n) FROM ({' UNION ALL '.join(sources)}) AS r "
        f"GROUP BY {group}, status, reason"
    )
    with engine.connect() as conn:
        rows: list[tuple[Any, ...]] = [tuple(r) for r in conn.exec_driver_sql(sql, tuple(params)).all()]
    groups: dict[str, Funnel] = defaultdict(lambda: Funnel(""))
    total = Funnel("total")
    for k, status, reason, count in rows:
        n = int(count)
        if not n:
            continue
        f = groups[str(k)]
        f.key = str(k)
        f.add(str(status), str(reason), n)
        total.add(str(status), str(reason), n)
    return {
        "by": by,
        "since": since,
        "groups": [groups[k].to_dict() for k in sorted(groups)],
        "total": total.to_dict(),
    }


def rollup_counts(engine: Engine) -> dict[tuple[str, ...], int]:
    """The rollup as ``{key: count}`` (zero rows left out), deltas included."""
    sources = f"SELECT {_COLS}, n FROM analytics_hourly UNION ALL SELECT {_COLS}, n FROM analytics_delta"
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"SELECT {_COLS}, sum(n) FROM ({sources}) AS r GROUP BY {_COLS}").all()
    return {tuple(r[:6]): int(r[6]) for r in rows if int(r[6])}


def full_counts(engine: Engine) -> dict[tuple[str, ...], int]:
    """The same counts from scratch, over every delivery (slow on a big table: for tests and checks)."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(full_count_sql(engine.dialect.name)).all()
    return {tuple(r[:6]): int(r[6]) for r in rows}


CSV_COLUMNS = (
    "key", "total", "pending", "sent", "delivered", "opened", "failed", "suppressed",
    "delivery_rate", "open_rate", "failed_by_reason", "suppressed_by_reason",
)  # fmt: skip


def reasons_text(d: dict[str, int]) -> str:
    return "; ".join(f"{k}={v}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))


def csv_rows(rep: dict[str, Any]) -> list[list[Any]]:
    """The report as CSV rows (header first, the total last): the console's export is the same."""
    rows: list[list[Any]] = [[rep["by"], *CSV_COLUMNS[1:]]]
    for g in [*rep["groups"], rep["total"]]:
        rows.append(
            [
                *(g[c] for c in CSV_COLUMNS[:8]),
                "" if g["delivery_rate"] is None else g["delivery_rate"],
                "" if g["open_rate"] is None else g["open_rate"],
                reasons_text(g["failed_by_reason"]),
                reasons_text(g["suppressed_by_reason"]),
            ]
        )
    return rows
