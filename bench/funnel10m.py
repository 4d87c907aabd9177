"""One module: one benchmark: the 10,000,000-row load, the checks of the rollup against it and the
timed reads share the database it builds; ~420 lines.

Issue 17, item 2: "the funnel over 10 million deliveries answers in well under a second on
SQLite and PostgreSQL". The console scenario (bench/console.py) writes its 1,000,000 rows through
the triggers; here 10,000,000 are bulk-loaded in SQL (``INSERT … SELECT`` over a generated series)
with the analytics triggers dropped, as in a database made before analytics existed, and then the
rollup is built by the project's own upgrade path (``analytics.triggers.install``: triggers + backfill from a
full count). Before anything is timed, the rollup is checked against the deliveries: every group
against a full count (``EXCEPT`` both ways, in SQL), and the totals by channel × status against a
plain ``GROUP BY`` over ``deliveries`` that shares no SQL with the rollup's key.

The spread (2 deliveries a notification, 5,000,000 notifications over 90 days):
- 60 % transactional: 300 templates, Zipf-like (``u³``: a few templates carry most of the
  traffic), each on its own pair of channels (email+push, email+sms or push+sms), evenly over the
  90 days;
- 40 % from 50 campaigns (a template of their own, email+push), each sent within 2 days of its
  start, the starts spread over the 90 days;
- statuses: 42 % sent, 20 % delivered, 14 % opened, 9 % failed (4 reasons, 1 in 5 of them
  dead-lettered), 15 % suppressed (5 reasons).

The coarse tiers (``analytics_total``, ``analytics_daily``, ``analytics_weekly``: what the funnel
reads) are checked the same way, each against the full count summed to its key.

Figures: ``analytics.read.funnel`` by template, channel, campaign and day, all time and ``--since`` 7
and 30 days back (what ``notifyctl report --by … --since …`` runs; median of ``runs`` after a
warm-up call), each answer compared with the same funnel over the hourly rollup alone
(``tier="hourly"``, the pre-coarse read, timed once); then late status changes (``LATE``
deliveries of the first weeks opened in one transaction, as a day of webhooks would) timed before
the next fold (read = folded days + the changed hourly rows) and after it, with the fold's time;
and the console's Analytics page over HTTP (logged in, same median), with the load average before
and after each database's timings. The databases are deleted afterwards.

Run alone: ``python -m bench.funnel10m --deliveries 1000000`` (``--db sqlite``, ``--runs``, ``--json``).
"""

from __future__ import annotations

import os
import re
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.common import Env
from bench.console import PG_URL, _pg_up, _Server
from notifyctl.analytics import checks, fold, read, rollup, triggers
from notifyctl.analytics.read import funnel, parse_since
from notifyctl.analytics.rollup import KEY, full_count_sql
from notifyctl.api.auth import create_key
from notifyctl.db import write_lock

TEMPLATES = 300
CAMPAIGNS = 50
DAYS = 90
CHUNK = 500_000  # notifications a transaction
LATE = 20_000  # late status changes (sent deliveries of the first days opened) in one transaction

# Per notification i: h, a 32-bit multiplicative hash of i; campaign or not, which campaign, which
# template (u³ over 0..999 → 0..299), when (seconds after the 90-day window's start).
_H = "((i * 2654435761) % 4294967296)"
_CAMP = f"({_H} % 10 < 4)"
_C = f"(({_H} / 10) % {CAMPAIGNS})"
_U = f"(({_H} / 1000) % 1000)"
_T = f"({_U} * {_U} * {_U} / 3336667)"
_CAMP_SPAN = (DAYS - 4) * 86400 // CAMPAIGNS
_OFF = f"(CASE WHEN {_CAMP} THEN {_C} * {_CAMP_SPAN} + ({_H} / 500) % 172800 ELSE i * {DAYS * 86400} / :n END)"
_CHANNELS = (
    f"""(CASE WHEN {_CAMP} OR {_T} % 3 = 0 THEN '["email", "push"]' WHEN {_T} % 3 = 1 """
    """THEN '["email", "sms"]' ELSE '["push", "sms"]' END)"""
)


def _notifications_sql(dialect: str) -> str:
    cols = ("id, recipient_id, type, template_id, category, priority, channels, data, dedup_key, campaign_id, "
            "status, reason, job_id, due_at, created_at, updated_at")  # fmt: skip
    if dialect == "sqlite":
        at = f"datetime(:base, '+' || {_OFF} || ' seconds') || '.000000'"
        nid = "'n' || printf('%09d', i)"
        src = "(WITH RECURSIVE s(i) AS (SELECT :lo UNION ALL SELECT i + 1 FROM s WHERE i + 1 < :hi) SELECT i FROM s)"
        chans, data = _CHANNELS, "'{}'"
    else:
        at = f"CAST(:base AS timestamp) + {_OFF} * interval '1 second'"
        nid = "'n' || lpad(i::text, 9, '0')"
        src = "(SELECT i::bigint AS i FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint) - 1) AS g(i))"
        chans, data = f"CAST({_CHANNELS} AS json)", "CAST('{}' AS json)"
    return (
        f"INSERT INTO notifications ({cols}) SELECT {nid}, "
        f"CASE WHEN {_CAMP} THEN 'r' || i ELSE 'u' || (i % 1000000) END, 'bench', "
        f"CASE WHEN {_CAMP} THEN 'promo_' || {_C} ELSE 'tpl_' || {_T} END, "
        f"CASE WHEN {_CAMP} THEN 'marketing' ELSE 'transactional' END, 'low', {chans}, {data}, NULL, "
        f"CASE WHEN {_CAMP} THEN 'camp_' || {_C} END, 'done', NULL, NULL, {at}, {at}, {at} FROM {src} AS s"
    )


_FAILED = ("'SMTP 554: rejected'", "'provider_timeout'", "'invalid_token: unregistered'", "'HTTP 429: rate limited'")
_SUPPRESSED = ("'opted_out'", "'quiet_hours'", "'no_address'", "'rate_limited'", "'duplicate'")


def _deliveries_sql(dialect: str) -> str:
    """Two deliveries per notification of the id range [:lo, :hi), one per channel of its pair."""
    if dialect == "sqlite":
        i = "CAST(substr(n.id, 2) AS INTEGER)"
        ch = "json_extract(n.channels, '$[' || j.j || ']')"
        dead = "g.g >= 760 AND g.g < 850 AND g.g % 5 = 0"
        null_ts = "NULL"
    else:
        i = "CAST(substr(n.id, 2) AS bigint)"
        ch = "(n.channels ->> j.j)"
        dead = "(g.g >= 760 AND g.g < 850 AND g.g % 5 = 0)"
        null_ts = "CAST(NULL AS timestamp)"
    status = ("CASE WHEN g.g < 420 THEN 'sent' WHEN g.g < 620 THEN 'delivered' WHEN g.g < 760 THEN 'opened' "
              "WHEN g.g < 850 THEN 'failed' ELSE 'suppressed' END")  # fmt: skip
    failed = " ".join(f"WHEN {k} THEN {r}" for k, r in enumerate(_FAILED))
    supp = " ".join(f"WHEN {k} THEN {r}" for k, r in enumerate(_SUPPRESSED))
    reason = (
        f"CASE WHEN g.g >= 760 AND g.g < 850 THEN CASE g.g % {len(_FAILED)} {failed} END "
        f"WHEN g.g >= 850 THEN CASE g.g % {len(_SUPPRESSED)} {supp} END END"
    )

    def when(lo: int, hi: int) -> str:
        return f"CASE WHEN g.g >= {lo} AND g.g < {hi} THEN g.due_at ELSE {null_ts} END"

    cols = ("id, notification_id, user_id, channel, route, address, status, reason, provider, provider_message_id, "
            "attempts, next_attempt_at, dead_lettered, queued_at, sent_at, delivered_at, opened_at, failed_at, "
            "suppressed_at, updated_at")  # fmt: skip
    return (
        f"INSERT INTO deliveries ({cols}) SELECT 'd' || substr(g.nid, 2) || g.j, g.nid, g.user_id, g.ch, "
        "CASE WHEN g.ch = 'push' THEN CASE WHEN g.g % 2 = 0 THEN 'push.ios' ELSE 'push.android' END ELSE g.ch END, "
        "CASE WHEN g.ch = 'email' THEN g.user_id || '@example.com' WHEN g.ch = 'sms' THEN '+1415' || g.user_id "
        "ELSE 'tok_' || g.user_id END, "
        f"{status}, {reason}, "
        "CASE WHEN g.ch = 'email' THEN 'sendgrid' WHEN g.ch = 'sms' THEN 'twilio' WHEN g.g % 2 = 0 THEN 'apns' "
        f"ELSE 'fcm' END, NULL, 1, {null_ts}, {dead}, g.due_at, {when(0, 760)}, {when(420, 760)}, "
        f"{when(620, 760)}, {when(760, 850)}, {when(850, 1000)}, g.due_at "
        f"FROM (SELECT n.id AS nid, n.recipient_id AS user_id, n.due_at, j.j, {ch} AS ch, "
        f"((({i} * 2 + j.j) * 2246822519) % 4294967296) / 4294968 AS g "
        "FROM notifications AS n CROSS JOIN (SELECT 0 AS j UNION ALL SELECT 1) AS j "
        "WHERE n.id >= :lo AND n.id < :hi) AS g ORDER BY g.nid, g.j"
    )


def _nid(i: int) -> str:
    return f"n{i:09d}"


def load(env: Env, deliveries: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Drop the analytics triggers, bulk-load, then ``analytics.triggers.install`` (the backfill)."""
    from sqlalchemy import text

    engine = env.ctx.engine
    dialect = engine.dialect.name
    n = deliveries // 2
    with engine.begin() as conn:  # a database made before analytics existed: no triggers, no rollup
        for name in triggers.TRIGGERS:
            conn.exec_driver_sql(f"DROP TRIGGER {name}" + (" ON deliveries" if dialect == "postgresql" else ""))
        conn.exec_driver_sql("DELETE FROM analytics_hourly")
        conn.exec_driver_sql("DELETE FROM analytics_delta")
    base = (datetime.now(UTC) - timedelta(days=DAYS)).replace(minute=0, second=0, microsecond=0, tzinfo=None)
    ins_n, ins_d = text(_notifications_sql(dialect)), text(_deliveries_sql(dialect))
    t0 = time.perf_counter()
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        with engine.begin() as conn:
            if dialect == "sqlite":
                conn.exec_driver_sql("PRAGMA cache_size = -400000")
            else:
                conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            conn.execute(ins_n, {"lo": lo, "hi": hi, "n": n, "base": base.isoformat(sep=" ")})
            conn.execute(ins_d, {"lo": _nid(lo), "hi": _nid(hi)})
        log(f"    {hi * 2:,} deliveries loaded, {time.perf_counter() - t0:.0f}s")
    load_s = time.perf_counter() - t0
    if dialect == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE notifications")
            conn.exec_driver_sql("VACUUM ANALYZE deliveries")
    t1 = time.perf_counter()
    installed = triggers.install(engine, write_lock)
    backfill_s = time.perf_counter() - t1
    assert installed, "analytics.triggers.install did not run its backfill"
    if dialect == "postgresql":
        fold.compact(engine)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for table in ("analytics_hourly", "analytics_total", "analytics_daily", "analytics_weekly"):
                conn.exec_driver_sql(f"VACUUM ANALYZE {table}")
    with engine.connect() as conn:
        rows = int(conn.exec_driver_sql("SELECT count(*) FROM deliveries").scalar() or 0)
        rollup_rows = int(conn.exec_driver_sql("SELECT count(*) FROM analytics_hourly").scalar() or 0)
        size = _size(env, conn)
    log(f"    loaded in {load_s:.0f}s, backfill (analytics.triggers.install) {backfill_s:.0f}s: {rows:,} deliveries, "
        f"{rollup_rows:,} rollup rows, {size} MB")  # fmt: skip
    return {"deliveries": rows, "notifications": n, "load_s": round(load_s, 1),
            "load_us_per_delivery": round(load_s / max(1, rows) * 1e6, 2), "backfill_s": round(backfill_s, 1),
            "rollup_rows": rollup_rows, "database_mb": size}  # fmt: skip


def _size(env: Env, conn: Any) -> int | None:
    if conn.dialect.name == "postgresql":
        return int(conn.exec_driver_sql(
            "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace "
            "WHERE s.nspname = current_schema() AND c.relkind = 'r'").scalar() or 0) // 2**20  # fmt: skip
    db = env.ctx.engine.url.database
    return sum(os.path.getsize(p) for p in (db, db + "-wal") if p and os.path.exists(p)) // 2**20 if db else None


def _rows(result: Any) -> list[Any]:
    """A driver-level result's rows, untyped (the counts' SQL is built here, not by the ORM)."""
    return list(result)


def check(env: Env, log: Callable[[str], None]) -> dict[str, Any]:
    """The rollup against the deliveries, before anything is timed: every group against a full
    count, both ways, in SQL; and channel × status totals against a plain GROUP BY."""
    engine = env.ctx.engine
    cols = ", ".join(KEY)
    rollup = (f"SELECT {cols}, sum(n) AS n FROM (SELECT {cols}, n FROM analytics_hourly UNION ALL "
              f"SELECT {cols}, n FROM analytics_delta) AS r GROUP BY {cols} HAVING sum(n) <> 0")  # fmt: skip
    t0 = time.perf_counter()
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TEMPORARY TABLE full_count ({cols}, n)" if engine.dialect.name == "sqlite" else
                             "CREATE TEMPORARY TABLE full_count (hour text, template_id text, channel text, "
                             "campaign_id text, status text, reason text, n bigint)")  # fmt: skip
        conn.exec_driver_sql(f"INSERT INTO full_count {full_count_sql(engine.dialect.name)}")
        groups = int(conn.exec_driver_sql("SELECT count(*) FROM full_count").scalar() or 0)
        missing = int(conn.exec_driver_sql(
            f"SELECT count(*) FROM (SELECT * FROM full_count EXCEPT {rollup}) AS x").scalar() or 0)  # fmt: skip
        extra = int(conn.exec_driver_sql(
            f"SELECT count(*) FROM ({rollup} EXCEPT SELECT * FROM full_count) AS x").scalar() or 0)  # fmt: skip
        coarse_differing = _check_coarse(conn)
        conn.exec_driver_sql("DROP TABLE full_count")
        plain = {(c, s): int(k) for c, s, k in _rows(conn.exec_driver_sql(
            "SELECT channel, status, count(*) FROM deliveries GROUP BY channel, status"))}  # fmt: skip
        summed = {(c, s): int(k) for c, s, k in _rows(conn.exec_driver_sql(
            f"SELECT channel, status, sum(n) FROM ({rollup}) AS r GROUP BY channel, status"))}  # fmt: skip
    ok = missing == 0 and extra == 0 and plain == summed and not any(coarse_differing.values())
    res = {"groups_compared": groups, "groups_differing": missing + extra, "channel_status_totals_equal":
           plain == summed, "coarse_rows_differing": coarse_differing, "rollup_equals_full_count": ok,
           "check_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    log(f"    check: {res}")
    if not ok:
        raise AssertionError(f"the rollup differs from a full count: {res}")
    return res


def _check_coarse(conn: Any) -> dict[str, int]:
    """Each coarse tier (+ what is not folded yet) against the temporary ``full_count`` summed to
    its key, both ways (``EXCEPT``): the rows that differ, per tier."""
    pg = conn.dialect.name == "postgresql"
    total = "template_id, channel, campaign_id, status, reason"
    out: dict[str, int] = {}

    def pending(cols: str) -> str:
        sql = f"SELECT {cols}, n - folded FROM analytics_hourly WHERE n <> folded"
        return sql + (f" UNION ALL SELECT {cols}, n FROM analytics_delta" if pg else "")

    def differ(name: str, cols: str, read: str, expected: str) -> None:
        got = f"SELECT {cols}, sum(n) AS n FROM ({read}) AS r({cols}, n) GROUP BY {cols} HAVING sum(n) <> 0"
        want = f"SELECT {cols}, sum(n) AS n FROM ({expected}) AS e({cols}, n) GROUP BY {cols}"
        if not pg:  # SQLite names a subquery's columns by its first SELECT
            got = got.replace(f" AS r({cols}, n)", " AS r")
            want = want.replace(f" AS e({cols}, n)", " AS e")
        out[name] = sum(int(conn.exec_driver_sql(f"SELECT count(*) FROM ({a} EXCEPT {b}) AS x").scalar() or 0)
                        for a, b in ((got, want), (want, got)))  # fmt: skip

    differ("total", total, f"SELECT {total}, n FROM analytics_total UNION ALL {pending(total)}",
           f"SELECT {total}, n FROM full_count")  # fmt: skip
    daily = "dim, day, value, status, reason"
    for dim, col in rollup.DIMS.items():
        cols = f"'{dim}' AS dim, substr(hour, 1, 10) AS day, {col} AS value, status, reason"
        differ(f"daily {dim or 'all'}", daily,
               f"SELECT {daily}, n FROM analytics_daily WHERE dim = '{dim}' UNION ALL {pending(cols)}",
               f"SELECT {cols}, n FROM full_count")  # fmt: skip
    weekly = "dim, week, value, status, reason"
    for dim in rollup.WEEK_DIMS:
        week = rollup.week_sql(conn.dialect.name)
        cols = f"'{dim}' AS dim, {week} AS week, {rollup.DIMS[dim]} AS value, status, reason"
        differ(f"weekly {dim}", weekly,
               f"SELECT {weekly}, n FROM analytics_weekly WHERE dim = '{dim}' UNION ALL {pending(cols)}",
               f"SELECT {cols}, n FROM full_count")  # fmt: skip
    return out


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _timed(engine: Any, runs: int, by: str, since: str | None, tier: str = "coarse") -> tuple[dict[str, Any], Any]:
    times, cpu = [], []
    for _ in range(runs + 1):  # the first warms the caches
        t, c = time.perf_counter(), time.process_time()
        rep = funnel(engine, by, since, tier=tier)
        times.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    kept = times[1:] or times
    return {"median": round(statistics.median(kept), 1), "max": round(max(kept), 1),
            "cpu_ms_this_process": round(statistics.median(cpu[1:] or cpu), 1), "groups": len(rep["groups"]),
            "total": rep["total"]["total"]}, rep  # fmt: skip


SINCE = {"all": None, "7d": "7d", "30d": "30d"}


def _funnels(env: Env, runs: int, log: Callable[[str], None], hourly: bool) -> dict[str, Any]:
    """The funnel by each grouping and ``--since``: coarse (median of ``runs``), and, with
    ``hourly``, the same over the hourly rollup alone (timed once), the two answers compared."""
    out: dict[str, Any] = {"funnel_ms": {}, "hourly_ms": {}, "equal_to_hourly": True}
    for by in ("template", "channel", "campaign", "day"):
        for label, since in SINCE.items():
            name = by if label == "all" else f"{by} since {label}"
            at = parse_since(since)
            out["funnel_ms"][name], rep = _timed(env.ctx.engine, runs, by, at)
            if hourly:
                out["hourly_ms"][name], slow = _timed(env.ctx.engine, 0, by, at, "hourly")
                if slow != rep:
                    out["equal_to_hourly"] = False
                    log(f"    !! {name}: the coarse funnel differs from the hourly one")
            log(f"    funnel by {name}: {out['funnel_ms'][name]}" + (
                f", hourly {out['hourly_ms'][name]['median']} ms" if hourly else ""))  # fmt: skip
    return out


def late_changes(env: Env, runs: int, log: Callable[[str], None]) -> dict[str, Any]:
    """``LATE`` sent deliveries of the first days opened now, in one transaction (their hours are
    long folded): the funnel timed before the fold (it reads, besides the coarse tiers, the
    changed hourly rows on SQLite, the deltas on PostgreSQL), the fold (``analytics.fold.compact``)
    timed, the funnel timed again; each answer equal to the hourly rollup's."""
    from sqlalchemy import text

    engine = env.ctx.engine
    t0 = time.perf_counter()
    ids = [f"d{i:09d}{i % 2}" for i in range(0, LATE * 10, 10)]  # notifications of the first days (_OFF)
    with write_lock(engine), engine.begin() as conn:
        conn.exec_driver_sql("CREATE TEMPORARY TABLE late_ids (id TEXT PRIMARY KEY)")
        conn.execute(text("INSERT INTO late_ids (id) VALUES (:id)"), [{"id": i} for i in ids])
        changed = conn.exec_driver_sql(
            "UPDATE deliveries SET status = 'opened' WHERE id IN (SELECT id FROM late_ids) AND status = 'sent'"
        ).rowcount
        conn.exec_driver_sql("DROP TABLE late_ids")
    write_s = time.perf_counter() - t0
    pending = checks.unfolded(engine)
    out: dict[str, Any] = {"late_changes": changed, "late_write_s": round(write_s, 1), "unfolded_rows": pending}
    before, equal = {}, True
    for by in ("template", "day"):
        before[by], rep = _timed(engine, runs, by, None)
        equal &= rep == read.funnel(engine, by, None, tier="hourly")
    t1 = time.perf_counter()
    folded = fold.compact(engine)
    out["fold_s"] = round(time.perf_counter() - t1, 2)
    out["folded_rows"] = folded
    after = {}
    for by in ("template", "day"):
        after[by], rep = _timed(engine, runs, by, None)
        equal &= rep == read.funnel(engine, by, None, tier="hourly")
    out.update({"funnel_ms_unfolded": before, "funnel_ms_after_fold": after, "late_equal_to_hourly": equal})
    log(f"    late changes: {out}")
    return out


def timings(env: Env, runs: int, log: Callable[[str], None], hourly: bool = True) -> dict[str, Any]:
    import httpx

    out: dict[str, Any] = {"load_before": _load(), **_funnels(env, runs, log, hourly)}
    out["pages_ms"] = {}
    key = create_key(env.ctx, "bench", "admin").key
    with _Server(env.ctx) as url, httpx.Client(base_url=url, timeout=300) as c:
        token = re.search(r'name="csrf" value="([^"]+)"', c.get("/console/login").text).group(1)  # type: ignore[union-attr]
        assert c.post("/console/login", data={"csrf": token, "api_key": key}).status_code == 303
        for name, path in (("analytics_template", "/console/analytics?by=template"),
                           ("analytics_day", "/console/analytics?by=day"),
                           ("analytics_campaign_7d", "/console/analytics?by=campaign&since=7d")):  # fmt: skip
            times = []
            for _ in range(runs + 1):
                t = time.perf_counter()
                r = c.get(path)
                times.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, (path, r.status_code, r.text[:200])
            out["pages_ms"][name] = {"median": round(statistics.median(times[1:]), 1), "max": round(max(times[1:]), 1)}
            log(f"    {name}: {out['pages_ms'][name]}")
    out.update(late_changes(env, runs, log))
    out["load_after"] = _load()
    return out


def funnel10m(
    deliveries: int = 10_000_000,
    runs: int = 5,
    log: Callable[[str], None] = print,
    dbs: tuple[str, ...] = ("sqlite", "postgresql"),
    hourly: bool = True,
) -> dict[str, Any]:
    res: dict[str, Any] = {"deliveries": deliveries, "runs": runs}
    for db in dbs:
        if db == "postgresql" and not _pg_up():
            res[db] = {"error": "PostgreSQL not reachable on 127.0.0.1:5432: not measured"}
            continue
        log(f"  [{db}] load average {_load()}")
        env = Env(bench_pg=(os.environ.get("NOTIFY_BENCH_DATABASE_URL") or PG_URL) if db == "postgresql" else "")
        try:
            info = load(env, deliveries, log)
            res[db] = {**info, **check(env, log), **timings(env, runs, log, hourly)}
        except Exception as exc:  # noqa: BLE001 - one database's failure must not hide the other's figures
            import traceback

            traceback.print_exc()
            res[db] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            env.close()  # the PostgreSQL schema is dropped; the SQLite file goes with the temp dir below
            import shutil

            shutil.rmtree(env.dir, ignore_errors=True)
    return res


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deliveries", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--db", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    ap.add_argument("--no-hourly", action="store_true", help="skip the hourly-rollup comparison reads")
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args()
    out = funnel10m(a.deliveries, a.runs, dbs=tuple(a.db.split(",")), hourly=not a.no_hourly)
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
