"""``make bench``: every scenario of issue 7 in sequence, each in a fresh Env, then
bench/RESULTS.md (figures beside targets, machine, date: ``bench.report``, ``bench.targets``) and
bench/results.json (raw figures).

    python -m bench.run                 # full size (200k emails, 100k pushes, 1M-row segment)
    python -m bench.run --scale 0.05    # a quick pass (~3 min)
    python -m bench.run --only email,push --pool 3

The block between ``<!-- notes -->`` and ``<!-- /notes -->`` in RESULTS.md is hand-written
analysis and is kept across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from datetime import UTC, datetime
from typing import Any

from bench import console as console_bench
from bench import funnel10m as funnel10m_bench
from bench import shards as shards_bench
from bench.apprise_compare import apprise_vs_notifyctl
from bench.common import machine
from bench.cost import cost
from bench.email_blast import email_blast
from bench.launcher_memory import launcher_memory
from bench.push_blast import push_blast
from bench.report import RAW, RESULTS, write_results
from bench.targets import EMAIL_VARIANTS

ALL = (
    "email",
    "email_pg",
    "email_user_fields",
    "push",
    "launcher",
    "cost",
    "apprise",
    "console",
    "funnel1m",
    "funnel10m",
    "shards",
)


def log(msg: str) -> None:
    print(msg, flush=True)


def sizes(scale: float) -> dict[str, int]:
    return {
        "email": max(300, int(200_000 * scale)),
        "otps": max(20, int(1000 * scale)),
        "push": max(300, int(100_000 * scale)),
        "launcher": max(1000, int(1_000_000 * scale)),
        "cost": max(500, int(10_000 * scale)),
        "apprise": max(100, int(2000 * scale)),
        "console": max(20_000, int(1_000_000 * scale)),
        "funnel1m": max(20_000, int(1_000_000 * scale)),
        "funnel10m": max(20_000, int(10_000_000 * scale)),
        "shards": max(300, int(100_000 * scale)),
    }


PG_URL = "postgresql+psycopg2://postgres@127.0.0.1/test"


def pg_reachable(url: str) -> str | None:
    """None when ``url`` answers, else why not (one line)."""
    from sqlalchemy import create_engine, text

    try:
        eng = create_engine(url, connect_args={"connect_timeout": 3})
        with eng.connect() as conn:
            conn.execute(text("SELECT 1"))
        eng.dispose()
    except Exception as exc:  # noqa: BLE001 - reported as the row's reason
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return None


def email_runs(n: int, runs: int, pool: int, otps: int, segment: bool = True,
               bench_pg: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The email blast ``runs`` times: the median run (by rate) with every run's headline beside it.
    One run on a shared machine is not a figure: the same code measured 7,600–10,800/s here within
    an hour, and redis-server's CPU for the same commands moved with it (``redis_us``, a gauge of
    the machine's speed during each run)."""
    done: list[dict[str, Any]] = []
    for i in range(runs):
        r = email_blast(n, pool, otps=otps, log=log, segment=segment, bench_pg=bench_pg)
        done.append(r)
        if runs > 1:
            log(f"  run {i + 1}/{runs}: {r.get('notifications_per_s')}/s")
    ok = [r for r in done if r.get("notifications_per_s") and not r.get("error")]
    ranked = sorted(ok or done, key=lambda r: r.get("notifications_per_s") or 0)
    main = dict(ranked[len(ranked) // 2])
    main["runs"] = []
    for r in done:
        sent = max(1, int(r.get("sent") or 1))
        cpu = r.get("cpu") or {}
        main["runs"].append({
            "per_s": r.get("notifications_per_s"),
            "cpu_us": round((cpu.get("cpu_total_s") or 0) / sent * 1e6, 1),
            "redis_us": round(((cpu.get("cpu_s") or {}).get("redis-server") or 0) / sent * 1e6, 1),
            "cores_busy": cpu.get("cores_busy"),
            "otp_p99_ms": ((r.get("otp") or {}).get("during_blast_ms") or {}).get("p99"),
            "error": r.get("error"),
        })  # fmt: skip
    return main


def _email_job(key: str, sz: dict[str, int], runs: int, pool: int, pg_url: str | None) -> Any:
    segment, db = EMAIL_VARIANTS[key]

    def job() -> dict[str, Any]:
        if db == "postgresql":
            why = "no --email-pg URL" if not pg_url else pg_reachable(pg_url)
            if why:
                return {"error": f"not measured: PostgreSQL unavailable ({why})", "database": db}
        bench_pg = (pg_url or "") if db == "postgresql" else ""
        return email_runs(sz["email"], runs, pool, sz["otps"], segment=segment, bench_pg=bench_pg)

    return job


def run_all(scale: float, pool: int, only: list[str], runs: int = 3, pg_url: str | None = PG_URL) -> dict[str, Any]:
    sz = sizes(scale)
    results: dict[str, Any] = {"scale": scale, "pool": pool, "sizes": sz}
    jobs = {
        **{key: _email_job(key, sz, runs, pool, pg_url) for key in EMAIL_VARIANTS},
        # push: one more worker than the email blast's pool: a worker waits on the network for part
        # of each batch, and the third low-queue worker fills that gap (measured: pool 3 7.9k/s,
        # pool 4 8.6k/s, pool 5 8.3k/s on the same run's machine)
        "push": lambda: push_blast(sz["push"], max(pool, 4), log=log, otps=max(20, sz["otps"] // 5)),
        "launcher": lambda: launcher_memory(sz["launcher"], log=log),
        "cost": lambda: cost(sz["cost"], log=log),
        "apprise": lambda: apprise_vs_notifyctl(sz["apprise"], pool, log=log),
        "console": lambda: console_bench.console_pages(sz["console"], log=log),
        "funnel1m": lambda: funnel10m_bench.funnel10m(sz["funnel1m"], log=log),
        "funnel10m": lambda: funnel10m_bench.funnel10m(sz["funnel10m"], log=log),
        # 4 workers: with 4 shards, one on each
        "shards": lambda: shards_bench.email_shards(sz["shards"], pool=max(pool, 4), log=log, repeats=runs),
    }
    for name in only:
        log(f"[{name}] ...")
        t0 = time.perf_counter()
        try:
            results[name] = jobs[name]()
        except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the others
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["bench_wall_s"] = round(time.perf_counter() - t0, 1)
        log(f"[{name}] done in {results[name]['bench_wall_s']}s: {_headline(name, results[name])}")
    return results


def _headline(name: str, r: dict[str, Any]) -> str:
    if r.get("error") and len(r) <= 2:
        return str(r["error"])
    keys = {
        "email": ["notifications_per_s", "sent", "sandbox_requests"],
        "email_pg": ["notifications_per_s", "sent", "sandbox_requests"],
        "email_user_fields": ["notifications_per_s", "sent", "sandbox_requests"],
        "push": [],
        "launcher": ["scheduled_rate_error_pct", "realized_rate_error_pct"],
        "cost": [],
        "apprise": ["notifyctl_per_s", "apprise_per_s", "ratio_notifyctl_over_apprise"],
        "console": [],
        "funnel1m": [],
        "funnel10m": [],
        "shards": ["paper"],
    }[name]
    parts = [f"{k}={r.get(k)}" for k in keys]
    if name in EMAIL_VARIANTS:
        parts.append(f"otp={r.get('otp', {}).get('during_blast_ms')}")
    if name == "push":
        parts += [f"{k}={v.get('push_per_s')}/s" for k, v in (r.get("rows") or {}).items()]
        parts += [f"bare {k}={(((r.get('clients') or {}).get('candidates') or {}).get(k) or {}).get('per_s')}/s"
                  for k in ("apns", "fcm", "aioapns")]  # fmt: skip
        parts.append(f"strict JWTs={(r.get('strict') or {}).get('apns_jwts_seen')}")
    if name == "launcher":
        parts.append(f"rss={r.get('dry_run', {}).get('peak_rss_mb')}/{r.get('real', {}).get('peak_rss_mb')} MB")
    if name == "console":
        for db in ("sqlite", "postgresql"):
            d = r.get(db) or {}
            worst = max((v["median"] for v in (d.get("pages_ms") or {}).values()), default=None)
            parts.append(f"{db}: slowest page {worst} ms, funnel {d.get('funnel_ms')} {d.get('error') or ''}")
    if name in ("funnel1m", "funnel10m"):
        for db in ("sqlite", "postgresql"):
            d = r.get(db) or {}
            fun = {k: v["median"] for k, v in (d.get("funnel_ms") or {}).items()}
            parts.append(f"{db}: funnel {fun} ms, load {d.get('load_before')} {d.get('error') or ''}")
    if name == "cost":
        for ch in ("email", "push"):
            c = r.get(ch) or {}
            parts.append(f"{ch}: {c.get('sql_statements_per_notification')} SQL, "
                         f"{c.get('redis_commands_per_notification')} Redis /notification")  # fmt: skip
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    import sys

    ap = argparse.ArgumentParser(description="notifyctl benchmarks (issue 7)")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink every size (0.05 = a quick pass)")
    ap.add_argument("--pool", type=int, default=3, help="worker processes in the pool")
    ap.add_argument("--email-runs", type=int, default=3, help="email blasts to run; the median is reported")
    ap.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--no-write", action="store_true", help="print, do not rewrite RESULTS.md")
    ap.add_argument("--merge", action="store_true", help="keep the other scenarios' figures from results.json")
    ap.add_argument(
        "--database-url", help="run on this database server (a fresh schema per scenario) instead of SQLite"
    )
    ap.add_argument("--email-pg", default=PG_URL, help="the PostgreSQL server of the email_pg row (a fresh schema)")
    a = ap.parse_args(argv)
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = [s for s in only if s not in ALL]
    if bad:
        ap.error(f"--only: unknown scenario(s) {', '.join(bad)} (known: {', '.join(ALL)})")
    if a.database_url:
        os.environ["NOTIFY_BENCH_DATABASE_URL"] = a.database_url
    t0 = time.perf_counter()
    db = f"database {a.database_url}" if a.database_url else "SQLite"
    log(f"notifyctl bench on {machine()}, scale {a.scale}, pool {a.pool}, {db}")
    res = run_all(a.scale, a.pool, only, max(1, a.email_runs), pg_url=a.email_pg)
    if a.merge and RAW.exists():
        prev = json.loads(RAW.read_text())
        res = {**prev, **{k: v for k, v in res.items() if k in only}}
        res["merged"] = f"{', '.join(only)} re-run; the rest from {prev.get('date')}"
    res["machine"] = machine()
    res["machine_cores"] = os.cpu_count()
    res["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    res["total_s"] = round(time.perf_counter() - t0, 1)
    if not a.no_write:
        write_results(res, "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv))
        log(f"wrote {RESULTS} in {res['total_s']}s")


if __name__ == "__main__":
    main()
