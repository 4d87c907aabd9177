"""What the analytics rollup and its coarse tiers are keyed by: the hourly key as SQL over a
``deliveries`` row (per dialect), the tiers' columns and dimensions, ISO weeks, and the rollup as a
full count (what the triggers keep it equal to)."""

from __future__ import annotations

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
# SQLite: the function the insert triggers (the rollup's and the waves') ask whether to count their
# row (every connection ``notifyctl.db`` opens has it, answering yes; ``triggers.counted_insert``
# says no for its statement, and counts its rows after it).
ROW_GATE = "notify_rollup_by_row"
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
