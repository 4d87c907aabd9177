"""The rollup and its coarse tiers counted from scratch, to compare with what the triggers and
``compact`` keep (tests, benchmarks, checks)."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy.engine import Engine

from notifyctl.analytics.rollup import COLS, DAILY, DIMS, TOTAL, WEEK_DIMS, WEEKLY, full_count_sql, week_of, week_sql


def rollup_counts(engine: Engine) -> dict[tuple[str, ...], int]:
    """The rollup as ``{key: count}`` (zero rows left out), deltas included."""
    sources = f"SELECT {COLS}, n FROM analytics_hourly UNION ALL SELECT {COLS}, n FROM analytics_delta"
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"SELECT {COLS}, sum(n) FROM ({sources}) AS r GROUP BY {COLS}").all()
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
    total = f"SELECT {TOTAL}, n FROM analytics_total UNION ALL {pending.format(cols=TOTAL)}"
    daily = [f"SELECT {DAILY}, n FROM analytics_daily"]
    for dim, col in DIMS.items():
        cols = f"'{dim}' AS dim, substr(hour, 1, 10) AS day, {col} AS value, status, reason"
        daily.append(pending.format(cols=cols))
    weekly = [f"SELECT {WEEKLY}, n FROM analytics_weekly"]
    for dim in WEEK_DIMS:
        cols = f"'{dim}' AS dim, {week_sql(engine.dialect.name)} AS week, {DIMS[dim]} AS value, status, reason"
        weekly.append(pending.format(cols=cols))
    out: dict[tuple[str, ...], int] = {}
    with engine.connect() as conn:
        for kind, cols, sql in (
            ("total", TOTAL, total),
            ("day", DAILY, " UNION ALL ".join(daily)),
            ("week", WEEKLY, " UNION ALL ".join(weekly)),
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
