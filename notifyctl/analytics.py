"""One module: the rollup's triggers, its coarse tiers' fold and the funnel read over them must
agree on one set of keys and tiers, so they change together; ~675 lines.

Delivery analytics: an hourly rollup kept up as statuses change, and the funnel read from it.

``analytics_hourly`` counts deliveries by the hour they were queued (UTC) × template × channel ×
campaign × status (× the kind of reason, for ``failed`` and ``suppressed``). Triggers on
``deliveries`` keep it up in the same transaction as every write, whoever writes — the worker's
batch, a webhook, a DLQ replay, the reconciler: a committed status change moves one count from
the old row to the new one, a rolled-back one (a worker killed mid-batch) moves nothing.

- SQLite (one writer at a time): row triggers upsert the rollup directly.
- PostgreSQL: statement triggers append what each statement changed, aggregated, to
  ``analytics_delta`` (appends: concurrent workers never wait on each other's rollup row);
  ``compact`` folds it into the rollup (the worker pool does so every few seconds).

The coarse tiers, for reads that stay instant at 10,000,000 deliveries (the hourly rollup then
holds millions of rows): ``analytics_total`` (the rollup without time), ``analytics_daily``
(per day, for one dimension at a time: template, channel, campaign, or all) and
``analytics_weekly`` (per ISO week, for template, channel or campaign: a ``--since 30d`` read by
template takes its whole weeks from here and at most six edge days from the daily tier: measured
at 1,000,000 deliveries, load average ~3 on 2 cores, SQLite 73 → 21 ms, PostgreSQL execution
30 → 12 ms). ``compact`` folds into them what changed in the rollup since the last fold, off the
status changes' path: on SQLite the hourly rows whose ``n`` moved past ``folded`` (a partial
index holds them), on PostgreSQL the deltas as it moves them. A late change (an open days after the send) moves a count
in an hour long folded: it is read from the hourly row until the next fold, then from its day.
The funnel reads a tier and what is not folded into it yet, in one statement, so it is exact
whenever it runs (``_plan``).

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
from notifyctl.pgstats import HOT_TABLES, analyze_grown
from notifyctl.sqllock import write_lock

VERSION = "v4"  # in the trigger names: a new definition replaces the old one, and the rollup is rebuilt
SAME_KEY = ("v1", "v2", "v3")  # earlier definitions whose rollup install keeps (the same key; v3: no weekly tier)
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
_TOTAL = "template_id, channel, campaign_id, status, reason"
_DAILY = "dim, day, value, status, reason"
# The coarse daily tier's dimensions: dim → its column in analytics_hourly ("" → all deliveries).
DIMS = {"": "''", "template": "template_id", "channel": "channel", "campaign": "campaign_id"}
_WEEKLY = "dim, week, value, status, reason"
# The weekly tier's dimensions (the ones a ``--since`` read groups by).
WEEK_DIMS = ("template", "channel", "campaign")


def week_sql(dialect: str) -> str:
    """The Monday (``YYYY-MM-DD``) of the ISO week of an hourly row's ``hour``."""
    if dialect == "postgresql":
        return "to_char(date_trunc('week', substr(hour, 1, 10)::date), 'YYYY-MM-DD')"
    return "date(substr(hour, 1, 10), '-6 days', 'weekday 1')"


def week_of(day: str) -> str:
    """The Monday (``YYYY-MM-DD``) of ``day``'s ISO week (``YYYY-MM-DD…``)."""
    d = datetime.strptime(day[:10], "%Y-%m-%d")
    return (d - timedelta(days=d.weekday())).strftime("%Y-%m-%d")


def _sqlite_ddl() -> list[str]:
    ins, upd = TRIGGERS

    def bump(row: str, n: int) -> str:
        return (
            f"INSERT INTO analytics_hourly ({_COLS}, n, folded) SELECT {_sqlite_key(row)}, {n}, 0 "
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


def full_count_sql(dialect: str, also: str = "") -> str:
    """The rollup as a full count over ``deliveries`` (what the triggers keep it equal to)."""
    key = _pg_key("d") if dialect == "postgresql" else _sqlite_key("d")
    return (
        f"SELECT {key}, count(*){also} FROM deliveries AS d LEFT JOIN notifications AS n ON n.id = d.notification_id "
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
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_FOLD_LOCK})")  # no compaction meanwhile
        for table in ("analytics_total", "analytics_daily", "analytics_weekly"):
            conn.exec_driver_sql(f"DELETE FROM {table}")
        if old and all(name.rsplit("_", 1)[-1] in SAME_KEY for name in old):
            if dialect == "postgresql":
                conn.exec_driver_sql(
                    f"WITH moved AS (DELETE FROM analytics_delta RETURNING {_COLS}, n) "
                    f"INSERT INTO analytics_hourly ({_COLS}, n, folded) SELECT {_COLS}, sum(n), 0 FROM moved "
                    f"GROUP BY {_COLS} ORDER BY {_COLS} {_UPSERT}"
                )
            conn.exec_driver_sql("UPDATE analytics_hourly SET folded = n")
        else:
            conn.exec_driver_sql("DELETE FROM analytics_hourly")
            conn.exec_driver_sql("DELETE FROM analytics_delta")
            full = full_count_sql(dialect, ", count(*)")
            conn.exec_driver_sql(f"INSERT INTO analytics_hourly ({_COLS}, n, folded) {full}")
        for sql in _fold_sql(dialect, "n", ""):  # the coarse tiers from the whole rollup, folded as written
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


_FOLD_LOCK = 0x616E6C79  # PostgreSQL advisory lock of compaction and install ("anly")


def _fold_sql(dialect: str, amount: str, where: str, table: str = "analytics_hourly") -> list[str]:
    """Add ``amount`` (an expression over ``table``'s rows, the hourly rollup's key) of the rows
    matching ``where`` into the coarse tiers: the total, then each dimension's days, then its weeks
    (rows in key order)."""
    src = f"FROM {table} {where}"
    out = [
        f"INSERT INTO analytics_total ({_TOTAL}, n) SELECT {_TOTAL}, sum({amount}) {src} GROUP BY {_TOTAL} "
        f"HAVING sum({amount}) <> 0 ORDER BY {_TOTAL} "
        f"ON CONFLICT ({_TOTAL}) DO UPDATE SET n = analytics_total.n + excluded.n"
    ]
    for dim, col in DIMS.items():
        key = "substr(hour, 1, 10), " + ("" if dim == "" else f"{col}, ") + "status, reason"  # no constant
        out.append(
            f"INSERT INTO analytics_daily ({_DAILY}, n) SELECT '{dim}', substr(hour, 1, 10), {col}, status, reason, "
            f"sum({amount}) {src} GROUP BY {key} HAVING sum({amount}) <> 0 "
            f"ORDER BY 2, 3, 4, 5 ON CONFLICT ({_DAILY}) DO UPDATE SET n = analytics_daily.n + excluded.n"
        )
    week = week_sql(dialect)
    for dim in WEEK_DIMS:
        col = DIMS[dim]
        out.append(
            f"INSERT INTO analytics_weekly ({_WEEKLY}, n) SELECT '{dim}', {week}, {col}, status, reason, "
            f"sum({amount}) {src} GROUP BY {week}, {col}, status, reason HAVING sum({amount}) <> 0 "
            f"ORDER BY 2, 3, 4, 5 ON CONFLICT ({_WEEKLY}) DO UPDATE SET n = analytics_weekly.n + excluded.n"
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
            f"moved AS (DELETE FROM analytics_delta RETURNING {_COLS}, n)",
            f"summed AS (SELECT {_COLS}, sum(n) AS n FROM moved GROUP BY {_COLS} HAVING sum(n) <> 0)",
            f"hourly AS (INSERT INTO analytics_hourly ({_COLS}, n, folded) SELECT {_COLS}, n, n FROM summed "
            f"ORDER BY {_COLS} {_UPSERT}, folded = analytics_hourly.folded + excluded.n)",
            *(f"coarse{i} AS ({sql})" for i, sql in enumerate(_fold_sql(dialect, "n", "", "summed"))),
        ]
        with engine.begin() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_FOLD_LOCK})")
            return int(conn.exec_driver_sql(f"WITH {', '.join(ctes)} SELECT count(*) FROM summed").scalar() or 0)
    if dialect != "sqlite":
        return 0
    with write_lock(engine), engine.connect() as conn:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        folded = _fold(conn)
        conn.commit()
        return folded


def _fold(conn: Connection) -> int:
    for sql in _fold_sql(conn.dialect.name, "n - folded", _UNFOLDED):
        conn.exec_driver_sql(sql)
    return int(conn.exec_driver_sql(f"UPDATE analytics_hourly SET folded = n {_UNFOLDED}").rowcount or 0)


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


def _day_after(hour: str) -> str | None:
    """The first hour of the day after ``hour``'s (``YYYY-MM-DD HH``), None when not such an hour."""
    try:
        at = datetime.strptime(hour, "%Y-%m-%d %H")
    except ValueError:
        return None
    return (at.replace(hour=0) + timedelta(days=1)).strftime("%Y-%m-%d %H")


def _nearer_first(since: str, span: tuple[str | None, str | None]) -> bool:
    """Whether ``since``'s day is nearer the rollup's first day than its last (``span``)."""
    first, last = span
    if first is None or last is None:
        return False
    try:
        day, lo, hi = (datetime.strptime(d[:10], "%Y-%m-%d") for d in (since, first, last))
    except ValueError:
        return False
    return day <= hi and (day - lo) < (hi - day)


def _plan(
    dialect: str,
    mark: str,
    by: str,
    since: str | None,
    filters: dict[str, str],
    tier: str,
    span: tuple[str | None, str | None] = (None, None),
) -> tuple[list[str], list[Any]]:
    """The sources of the funnel's rows ``(k, status, reason, n)``, UNION ALL'd, and their parameters.

    - ``hourly`` (``by=hour``, ``tier="hourly"``, or filters on two dimensions with ``--since`` or
      ``by=day``): the hourly rollup (and PostgreSQL's pending deltas) from ``since``.
    - no ``since``, by template / channel / campaign: ``analytics_total`` + what is not folded yet.
    - otherwise one dimension's days (the one grouped by or filtered on; ``""`` when none), from
      the first whole day at or after ``since``, + the hours of ``since``'s day before it, read
      whole from the hourly rollup, + what is not folded yet of the later hours. By template /
      channel / campaign the days stop at the first whole ISO week (Monday) on or after that day:
      that week and the later ones are read from ``analytics_weekly`` (30 days: at most 6 days
      and 5 weeks read instead of 30 days). When ``since`` is
      nearer the first day of the rollup (``span``: its first and last day) than the last, by
      template / channel / campaign: the same as everything (the total tier) less what came
      before ``since`` (the days before its day, and its hours before it): fewer days read.
    What is not folded yet (the changes since the last ``compact``): on SQLite ``n - folded`` of
    the hourly rows marked so (the partial index holds them), on PostgreSQL the deltas."""
    group = _GROUP[by]

    def add(sql: str, conds: list[str], cond_params: list[Any], filtered: bool = True) -> None:
        conds, p = list(conds), list(cond_params)
        for col, value in filters.items() if filtered else ():
            conds.append(f"{col} = {mark}")
            p.append(value)
        sources.append(sql + (f" WHERE {' AND '.join(conds)}" if conds else ""))
        params.extend(p)

    def hourly(amount: str, conds: list[str], cond_params: list[Any], table: str = "analytics_hourly") -> None:
        if "n <> folded" in conds and dialect == "postgresql":
            return  # its hourly rows are folded as they are written (compact)
        add(f"SELECT {group} AS k, status, reason, {amount} AS n FROM {table}", conds, cond_params)

    def deltas() -> None:  # PostgreSQL: the changes not yet compacted into the hourly rollup
        if dialect == "postgresql":
            hourly("n", *from_since, "analytics_delta")

    sources: list[str] = []
    params: list[Any] = []
    from_since: tuple[list[str], list[Any]] = ([], []) if since is None else ([f"hour >= {mark}"], [since])
    used = set(filters) | ({group} if by in ("template", "channel", "campaign") else set())
    first_day = None if since is None else (since if since.endswith(" 00") else _day_after(since))
    if tier == "hourly" or by == "hour" or (since is not None and first_day is None):
        hourly("n", *from_since)
        deltas()
        return sources, params
    if since is None and by != "day":
        add(f"SELECT {group} AS k, status, reason, n FROM analytics_total", [], [])
        hourly("n - folded", ["n <> folded"], [])
        deltas()
        return sources, params
    if len(used) > 1:  # no daily tier crosses two dimensions
        hourly("n", *from_since)
        deltas()
        return sources, params
    col = next(iter(used), "")
    dim = next((d for d, c in DIMS.items() if c == col), "")
    conds, p = [f"dim = {mark}"], [dim]
    if since is not None and by != "day" and _nearer_first(since, span):
        day0 = since[:10] + " 00"
        add(f"SELECT {group} AS k, status, reason, n FROM analytics_total", [], [])
        hourly("n - folded", ["n <> folded"], [])
        conds.append(f"day < {mark}")
        p.append(since[:10])
        if col in filters:
            conds.append(f"value = {mark}")
            p.append(filters[col])
        add("SELECT value AS k, status, reason, -n AS n FROM analytics_daily", conds, p, False)
        hourly("-(n - folded)", ["n <> folded", f"hour < {mark}"], [day0])
        if since != day0:
            hourly("-n", [f"hour >= {mark}", f"hour < {mark}"], [day0, since])
        deltas()
        return sources, params
    if first_day is not None:
        conds.append(f"day >= {mark}")
        p.append(first_day[:10])
    first_week = None
    if first_day is not None and by != "day" and dim in WEEK_DIMS:  # whole weeks from the weekly tier
        day = datetime.strptime(first_day[:10], "%Y-%m-%d")
        first_week = (day + timedelta(days=-day.weekday() % 7)).strftime("%Y-%m-%d")
        conds.append(f"day < {mark}")
        p.append(first_week)
    if col in filters:
        conds.append(f"value = {mark}")
        p.append(filters[col])
    add(f"SELECT {'day' if by == 'day' else 'value'} AS k, status, reason, n FROM analytics_daily", conds, p, False)
    if first_week is not None:
        wconds, wp = [f"dim = {mark}", f"week >= {mark}"], [dim, first_week]
        if col in filters:
            wconds.append(f"value = {mark}")
            wp.append(filters[col])
        add("SELECT value AS k, status, reason, n FROM analytics_weekly", wconds, wp, False)
    if since is not None and first_day is not None and since != first_day:
        hourly("n", [f"hour >= {mark}", f"hour < {mark}"], [since, first_day])  # since's day, before first_day
    if first_day is None:
        hourly("n - folded", ["n <> folded"], [])
    else:
        hourly("n - folded", ["n <> folded", f"hour >= {mark}"], [first_day])
    deltas()
    return sources, params


def funnel(
    engine: Engine,
    by: str = "template",
    since: str | None = None,
    *,
    template: str | None = None,
    channel: str | None = None,
    campaign: str | None = None,
    tier: str = "coarse",
) -> dict[str, Any]:
    """The funnel per ``by`` group (template, channel, campaign, day or hour), from ``since`` (a
    rollup hour, ``parse_since``), optionally for one template / channel / campaign (``""`` is
    "no campaign"). ``{"by", "since", "groups": [Funnel dicts], "total": Funnel dict}``, groups in
    key order. One query, over the coarse tiers and what is not folded into them yet (``_plan``;
    ``tier="hourly"``: over the hourly rollup alone, the same numbers, slower at scale)."""
    if by not in _GROUP:
        raise InputError(f"--by: expected one of {', '.join(BY)}, got {by!r}")
    mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
    filters = {
        col: value
        for col, value in (("template_id", template), ("channel", channel), ("campaign_id", campaign))
        if value is not None
    }
    sql = "SELECT k, status, reason, sum(n) FROM ({}) AS r GROUP BY k, status, reason"
    with engine.connect() as conn:
        span: tuple[str | None, str | None] = (None, None)
        if since is not None and tier != "hourly" and by in ("template", "channel", "campaign"):
            first, last = conn.exec_driver_sql("SELECT min(day), max(day) FROM analytics_daily WHERE dim = ''").one()
            span = (None if first is None else str(first), None if last is None else str(last))
        sources, params = _plan(engine.dialect.name, mark, by, since, filters, tier, span)
        sql = sql.format(" UNION ALL ".join(sources))
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


def coarse_counts(engine: Engine) -> dict[tuple[str, ...], int]:
    """The coarse tiers as the funnel reads them — each tier plus what is not folded into it yet
    (hourly ``n - folded``, PostgreSQL's deltas) — as ``{("total", template, channel, campaign,
    status, reason) | ("day", dim, day, value, status, reason) | ("week", dim, monday, value, status,
    reason): count}`` (zero rows left out).
    Equal to ``coarse_of(full_counts(engine))`` whenever it runs (tests and checks)."""
    pending = "SELECT {cols}, n - folded AS n FROM analytics_hourly WHERE n <> folded"
    if engine.dialect.name == "postgresql":
        pending += " UNION ALL SELECT {cols}, n FROM analytics_delta"
    total = f"SELECT {_TOTAL}, n FROM analytics_total UNION ALL {pending.format(cols=_TOTAL)}"
    daily = [f"SELECT {_DAILY}, n FROM analytics_daily"]
    for dim, col in DIMS.items():
        cols = f"'{dim}' AS dim, substr(hour, 1, 10) AS day, {col} AS value, status, reason"
        daily.append(pending.format(cols=cols))
    weekly = [f"SELECT {_WEEKLY}, n FROM analytics_weekly"]
    for dim in WEEK_DIMS:
        cols = f"'{dim}' AS dim, {week_sql(engine.dialect.name)} AS week, {DIMS[dim]} AS value, status, reason"
        weekly.append(pending.format(cols=cols))
    out: dict[tuple[str, ...], int] = {}
    with engine.connect() as conn:
        for kind, cols, sql in (
            ("total", _TOTAL, total),
            ("day", _DAILY, " UNION ALL ".join(daily)),
            ("week", _WEEKLY, " UNION ALL ".join(weekly)),
        ):
            for r in conn.exec_driver_sql(f"SELECT {cols}, sum(n) FROM ({sql}) AS r GROUP BY {cols}").all():
                if int(r[5]):
                    out[(kind, *(str(x) for x in r[:5]))] = int(r[5])
    return out


def coarse_of(counts: dict[tuple[str, ...], int]) -> dict[tuple[str, ...], int]:
    """What the coarse tiers must hold for hourly ``counts`` (``rollup_counts``/``full_counts``)."""
    out: dict[tuple[str, ...], int] = defaultdict(int)
    for (hour, template, channel, campaign, status, reason), n in counts.items():
        out[("total", template, channel, campaign, status, reason)] += n
        for dim, value in (("", ""), ("template", template), ("channel", channel), ("campaign", campaign)):
            out[("day", dim, hour[:10], value, status, reason)] += n
            if dim in WEEK_DIMS:
                out[("week", dim, week_of(hour), value, status, reason)] += n
    return {k: v for k, v in out.items() if v}


def unfolded(engine: Engine) -> int:
    """How many hourly rows (and PostgreSQL deltas) wait for the next ``compact``."""
    sql = "SELECT count(*) FROM analytics_hourly WHERE n <> folded"
    if engine.dialect.name == "postgresql":
        sql = f"SELECT ({sql}) + (SELECT count(*) FROM analytics_delta)"
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(sql).scalar() or 0)


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
