"""What the analytics rollup and its coarse tiers are keyed by: the hourly key as SQL over a
``deliveries`` row (per dialect), the tiers' columns and dimensions, ISO weeks, and the rollup as a
full count (what the triggers keep it equal to)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

KEY = ("hour", "template_id", "channel", "campaign_id", "status", "reason")
REASON_CHARS = 64


def reason_sql(dialect: str, d: str) -> str:
    """The kind of reason of deliveries row ``d`` as the rollup keeps it: the text before the first
    ``:``, trimmed, when failed or suppressed; ``""`` otherwise."""
    if dialect == "postgresql":
        return (
            f"CASE WHEN {d}.status IN ('failed', 'suppressed') "
            f"THEN left(trim(split_part(coalesce({d}.reason, ''), ':', 1)), {REASON_CHARS}) ELSE '' END"
        )
    r = f"coalesce({d}.reason, '')"
    return (
        f"CASE WHEN {d}.status IN ('failed', 'suppressed') THEN substr(trim(CASE WHEN instr({r}, ':') > 0 "
        f"THEN substr({r}, 1, instr({r}, ':') - 1) ELSE {r} END), 1, {REASON_CHARS}) ELSE '' END"
    )


def sqlite_key(d: str) -> str:
    """The rollup key of deliveries row ``d`` (``NEW``/``OLD``/an alias) joined to notification ``n``."""
    return (
        f"replace(substr({d}.queued_at, 1, 13), 'T', ' '), coalesce(n.template_id, ''), {d}.channel, "
        f"coalesce(n.campaign_id, ''), {d}.status, {reason_sql('sqlite', d)}"
    )


def pg_key(d: str) -> str:
    return (
        f"to_char({d}.queued_at, 'YYYY-MM-DD HH24'), coalesce(n.template_id, ''), {d}.channel, "
        f"coalesce(n.campaign_id, ''), {d}.status, {reason_sql('postgresql', d)}"
    )


COLS = ", ".join(KEY)
UPSERT = f"ON CONFLICT ({COLS}) DO UPDATE SET n = analytics_hourly.n + excluded.n"
TOTAL = "template_id, channel, campaign_id, status, reason"
DAILY = "dim, day, value, status, reason"
# The coarse daily tier's dimensions: dim → its column in analytics_hourly ("" → all deliveries).
DIMS = {"": "''", "template": "template_id", "channel": "channel", "campaign": "campaign_id"}
WEEKLY = "dim, week, value, status, reason"
# The per-wave counts of campaigns' deliveries (``analytics.waves``).
WAVE_COLS = "campaign_id, wave, channel, status, reason"
# SQLite: the function the insert triggers (rollup and waves) ask whether to count their row: every
# connection ``notifyctl.db`` opens has it, answering yes; ``triggers.counted_insert`` says no for its
# statement and counts its rows itself.
ROW_GATE = "notify_rollup_by_row"
WAVE_UPSERT = f"ON CONFLICT ({WAVE_COLS}) DO UPDATE SET n = wave_counts.n + excluded.n"
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


def full_count_sql(dialect: str, also: str = "") -> str:
    """The rollup as a full count over ``deliveries`` (what the triggers keep it equal to)."""
    key = pg_key("d") if dialect == "postgresql" else sqlite_key("d")
    return (
        f"SELECT {key}, count(*){also} FROM deliveries AS d LEFT JOIN notifications AS n ON n.id = d.notification_id "
        "GROUP BY 1, 2, 3, 4, 5, 6"
    )


# The statement triggers join the changed rows to their notifications by primary key: a handful to
# a thousand index probes. Planned from the table's statistics, that join became a hash join over
# every notification whenever the statistics said the table was small — a fresh database, or any
# table that grew faster than autovacuum analysed it (a first campaign): each worker batch's insert
# then read the whole table (measured, 1,000-row batches: 11 µs a delivery at 10,000
# notifications, 27 µs at 80,000, growing with the table; 7 µs of it the join). The functions
# plan with hash and merge joins off, so the join is always the probes (~1 µs a delivery), whatever
# the statistics say.
PG_PLAN = "SET enable_hashjoin = off SET enable_mergejoin = off"


def pg_statement_triggers(
    names: tuple[str, str], delta: str, cols: str, grouped: str, insert_select: str, side: Callable[[str, int], str]
) -> list[str]:
    """The PostgreSQL statement triggers (and their functions) on ``deliveries`` that add a change's
    counts to ``delta`` (``cols`` + n): ``insert_select`` counts an insert's ``new_rows``; an update
    counts ``side("old_rows", -1)`` against ``side("new_rows", 1)``, keeping the groups that changed.
    Used by the rollup (``triggers``) and the campaigns' wave counts (``waves``)."""
    ins, upd = names
    return [
        f"""CREATE OR REPLACE FUNCTION {ins}() RETURNS trigger LANGUAGE plpgsql {PG_PLAN} AS $$
BEGIN
  INSERT INTO {delta} ({cols}, n)
  {insert_select};
  RETURN NULL;
END $$""",
        f"""CREATE OR REPLACE FUNCTION {upd}() RETURNS trigger LANGUAGE plpgsql {PG_PLAN} AS $$
BEGIN
  INSERT INTO {delta} ({cols}, n)
  SELECT {cols}, sum(n) FROM ({side("old_rows", -1)} UNION ALL {side("new_rows", 1)}) AS x({cols}, n)
  {grouped} HAVING sum(n) <> 0;
  RETURN NULL;
END $$""",
        f"CREATE OR REPLACE TRIGGER {ins} AFTER INSERT ON deliveries REFERENCING NEW TABLE AS new_rows "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {ins}()",
        f"CREATE OR REPLACE TRIGGER {upd} AFTER UPDATE ON deliveries REFERENCING OLD TABLE AS old_rows "
        f"NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {upd}()",
    ]


def sqlite_row_triggers(names: tuple[str, str], bump: Callable[[str, int], str], changed: Iterable[str]) -> list[str]:
    """The SQLite row triggers on ``deliveries`` that keep a count up: ``bump(row, n)`` (a statement
    adding ``n`` for ``NEW`` or ``OLD``) on an insert, when ``ROW_GATE`` says so (not for
    ``triggers.counted_insert``'s statement), and ``OLD`` out, ``NEW`` in on an update that changes
    one of the ``changed`` columns. Used by the rollup (``triggers``) and the wave counts (``waves``)."""
    ins, upd = names
    when = " OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in changed)
    return [
        f"CREATE TRIGGER IF NOT EXISTS {ins} AFTER INSERT ON deliveries WHEN {ROW_GATE}() BEGIN {bump('NEW', 1)} END",
        f"CREATE TRIGGER IF NOT EXISTS {upd} AFTER UPDATE ON deliveries WHEN {when} "
        f"BEGIN {bump('OLD', -1)} {bump('NEW', 1)} END",
    ]
