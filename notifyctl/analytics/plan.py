"""Which tiers a funnel read takes its rows from: the hourly rollup, the total, the daily and weekly
tiers, and what is not folded into them yet, for a grouping, ``--since`` and filters."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from notifyctl.analytics.rollup import DIMS, WEEK_DIMS, week_of

GROUP = {
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


def plan(
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
      before ``since``: the whole weeks before its week from the weekly tier, the days of its
      week before its day from the daily tier (at most 6), its hours before it from the hourly
      rollup. Either way whole weeks come from the weekly tier, days and hours only at the edge
      (measured over 90 days of 300,000 deliveries, ``bench.funnel10m``'s spread: by template
      ``--since`` 60d and 50d read 20,359 and 25,811 tier rows, 38,168 and 48,045 when the days
      before ``since`` came from the daily tier).
    What is not folded yet (the changes since the last ``compact``): on SQLite ``n - folded`` of
    the hourly rows marked so (the partial index holds them), on PostgreSQL the deltas."""
    group = GROUP[by]

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
    value: tuple[list[str], list[Any]] = ([f"value = {mark}"], [filters[col]]) if col in filters else ([], [])
    if since is not None and by != "day" and dim in WEEK_DIMS and _nearer_first(since, span):
        day0, monday = since[:10] + " 00", week_of(since)
        add(f"SELECT {group} AS k, status, reason, n FROM analytics_total", [], [])
        hourly("n - folded", ["n <> folded"], [])
        # less what came before since: the whole weeks before its week, its week's days before its
        # day, its day's hours before it
        wconds, wp = [f"dim = {mark}", f"week < {mark}", *value[0]], [dim, monday, *value[1]]
        add("SELECT value AS k, status, reason, -n AS n FROM analytics_weekly", wconds, wp, False)
        if monday < since[:10]:
            conds += [f"day >= {mark}", f"day < {mark}", *value[0]]
            p += [monday, since[:10], *value[1]]
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
    conds += value[0]
    p += value[1]
    add(f"SELECT {'day' if by == 'day' else 'value'} AS k, status, reason, n FROM analytics_daily", conds, p, False)
    if first_week is not None:
        wconds, wp = [f"dim = {mark}", f"week >= {mark}", *value[0]], [dim, first_week, *value[1]]
        add("SELECT value AS k, status, reason, n FROM analytics_weekly", wconds, wp, False)
    if since is not None and first_day is not None and since != first_day:
        hourly("n", [f"hour >= {mark}", f"hour < {mark}"], [since, first_day])  # since's day, before first_day
    if first_day is None:
        hourly("n - folded", ["n <> folded"], [])
    else:
        hourly("n - folded", ["n <> folded", f"hour >= {mark}"], [first_day])
    deltas()
    return sources, params
