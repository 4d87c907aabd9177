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


def pg_function(name: str, body: str) -> str:
    """A PostgreSQL trigger function running ``body`` (statements), planned with ``PG_PLAN``."""
    return f"""CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql {PG_PLAN} AS $$
BEGIN
  {body};
  RETURN NULL;
END $$"""


def pg_trigger(name: str, kind: str) -> str:
    """The statement trigger on ``deliveries`` (``kind``: INSERT or UPDATE) running function ``name``,
    with the transition tables ``new_rows`` (and ``old_rows`` for an update)."""
    tables = "NEW TABLE AS new_rows" if kind == "INSERT" else "OLD TABLE AS old_rows NEW TABLE AS new_rows"
    return (
        f"CREATE OR REPLACE TRIGGER {name} AFTER {kind} ON deliveries REFERENCING {tables} "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {name}()"
    )


def pg_update_body(delta: str, cols: str, grouped: str, side: Callable[[str, int], str]) -> str:
    """An update trigger's statement adding its changes' counts to ``delta`` (``cols`` + n):
    ``side("old_rows", -1)`` against ``side("new_rows", 1)``, keeping the groups that changed. Used
    by the rollup (``triggers``) and the campaigns' wave counts (``waves``); their inserts are
    counted together, by ``triggers``' insert trigger."""
    return (
        f"INSERT INTO {delta} ({cols}, n)\n"
        f"  SELECT {cols}, sum(n) FROM ({side('old_rows', -1)} UNION ALL {side('new_rows', 1)}) AS x({cols}, n)\n"
        f"  {grouped} HAVING sum(n) <> 0"
    )


def sqlite_insert_trigger(name: str, body: str) -> str:
    """The SQLite row trigger on ``deliveries`` running ``body`` (statements for ``NEW``) on an
    insert, when ``ROW_GATE`` says so (not for ``triggers.counted_insert``'s statement, which
    counts its rows itself). One for the rollup and the wave counts together: each row trigger a
    row fires costs its insert ~0.5 µs even when its gate says no."""
    return f"CREATE TRIGGER IF NOT EXISTS {name} AFTER INSERT ON deliveries WHEN {ROW_GATE}() BEGIN {body} END"


def sqlite_update_trigger(name: str, bump: Callable[[str, int], str], changed: Iterable[str]) -> str:
    """The SQLite row trigger on ``deliveries`` that keeps a count up on an update that changes one
    of the ``changed`` columns: ``bump(row, n)`` (a statement adding ``n`` for ``NEW`` or ``OLD``),
    ``OLD`` out, ``NEW`` in. Used by the rollup (``triggers``) and the wave counts (``waves``)."""
    when = " OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in changed)
    return (
        f"CREATE TRIGGER IF NOT EXISTS {name} AFTER UPDATE ON deliveries WHEN {when} "
        f"BEGIN {bump('OLD', -1)} {bump('NEW', 1)} END"
    )
