"""Issue 17's targets: each console page in < 300 ms and the funnel query in < 100 ms with
1,000,000 deliveries in the database, on SQLite and on PostgreSQL (when 127.0.0.1:5432 answers).

The rows are written the way the system writes them (``prepare_insert``: the analytics triggers
fire for every delivery, as in production), then the console is served by uvicorn in this
process and every page is fetched over HTTP with a logged-in session, ``runs`` times; the figure
is the median (and the worst) wall time from request to the last byte."""

from __future__ import annotations

import os
import re
import socket
import statistics
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from bench.common import Env
from campaigns.models import Campaign
from notifyctl.analytics import triggers, waves
from notifyctl.analytics.fold import compact
from notifyctl.analytics.read import funnel, parse_since
from notifyctl.analytics.triggers import counted_insert
from notifyctl.analytics.waves import wave_progress
from notifyctl.api.app import create_app
from notifyctl.api.auth import create_key
from notifyctl.bulk import prepare_insert
from notifyctl.db import write_lock
from notifyctl.models import Delivery, Notification, derived_id, new_id, utcnow

PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
TEMPLATES = ("order_shipped_v2", "weekly_promo", "otp_code", "password_reset", "welcome")
# status mix of the deliveries: sent, delivered, opened, failed (1 in 20 of them dead-lettered), suppressed
MIX = (("sent", 55), ("delivered", 20), ("opened", 12), ("failed", 6), ("suppressed", 7))


def _pg_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


def _notification(nid: str, user: str, template: str, cid: str | None, wave: int | None, status: str,
                  due: datetime, at: datetime) -> dict[str, Any]:  # fmt: skip
    return {"id": nid, "recipient_id": user, "type": "t", "template_id": template, "category": "marketing",
            "priority": "low", "channels": ["email", "sms"], "data": {}, "dedup_key": None, "campaign_id": cid,
            "wave": wave, "status": status, "reason": None, "job_id": None, "due_at": due, "created_at": at,
            "updated_at": at}  # fmt: skip


def _delivery(did: str, nid: str, user: str, ch: str, address: str, st: str, reason: str | None, dead: bool,
              at: datetime) -> dict[str, Any]:  # fmt: skip
    return {"id": did, "notification_id": nid, "user_id": user, "channel": ch, "route": ch, "address": address,
            "status": st, "reason": reason, "provider": "smtp" if ch == "email" else "twilio",
            "provider_message_id": None, "attempts": 1, "next_attempt_at": None, "dead_lettered": dead,
            "queued_at": at, "sent_at": at if st in ("sent", "delivered", "opened") else None, "delivered_at": None,
            "opened_at": None, "failed_at": at if st == "failed" else None, "suppressed_at": None,
            "updated_at": at}  # fmt: skip


def fill(env: Env, deliveries: int, log: Callable[[str], None], chunk: int = 10_000) -> dict[str, Any]:
    """``deliveries`` rows (two per notification: email and sms), two campaigns of a quarter of
    them each with three time-zone waves, ~1 % of the failed ones dead-lettered."""
    ctx = env.ctx
    engine = ctx.engine
    now = utcnow()
    n_notifs = deliveries // 2
    camps = [new_id("c"), new_id("c")]
    plan = [
        {"instant": (now + timedelta(hours=h)).isoformat(), "start": (now - timedelta(hours=2 - h)).isoformat(),
         "end": (now - timedelta(hours=1 - h)).isoformat(), "recipients": n_notifs // 12, "timezones": [tz]}
        for h, tz in enumerate(("Europe/Paris", "America/New_York", "Asia/Tokyo"))
    ]  # fmt: skip
    with engine.begin() as conn:
        for i, camp in enumerate(camps):
            conn.execute(Campaign.__table__.insert(), [{  # type: ignore[attr-defined]
                "id": camp, "name": f"bench-{i}", "template_id": "weekly_promo", "category": "marketing",
                "priority": "low", "channels": ["email", "sms"], "status": "active", "spec": {"rate": 1000},
                "plan": plan, "summary": {}, "reference_at": now, "launched_at": now, "created_at": now,
                "updated_at": now}])  # fmt: skip
    statuses = [s for s, w in MIX for _ in range(w)]
    t0 = time.perf_counter()
    dead = 0
    first_dead = None
    for start in range(0, n_notifs, chunk):
        nrows: list[dict[str, Any]] = []
        drows: list[dict[str, Any]] = []
        for i in range(start, min(n_notifs, start + chunk)):
            nid = new_id("n")
            cid = camps[i % 4] if i % 4 < 2 else None
            at = now - timedelta(minutes=(n_notifs - i) % (60 * 24 * 14))  # two weeks of history
            user = f"u{i % 50_000:06d}" if cid is None else f"c{i:07d}"  # one notification per campaign recipient
            template = TEMPLATES[i % len(TEMPLATES)] if cid is None else "weekly_promo"
            wave = None if cid is None else (i // 4) % 3
            nrows.append(_notification(nid, user, template, cid, wave, "done", at, at))
            for j, ch in enumerate(("email", "sms")):
                st = statuses[(i * 7 + j * 3) % len(statuses)]
                dl = st == "failed" and i % 5 == 0
                dead += dl
                did = derived_id("d", nid, ch, f"a{i}")
                if dl and first_dead is None:
                    first_dead = did
                address = f"a{i}@example.com" if ch == "email" else f"+1415555{i % 10000:04d}"
                reason = {"failed": "SMTP 554 rejected", "suppressed": "opted_out"}.get(st)
                drows.append(_delivery(did, nid, user, ch, address, st, reason, dl, at))
        ins_n = prepare_insert(engine, Notification.__table__, nrows)  # type: ignore[attr-defined]
        ins_d = prepare_insert(engine, Delivery.__table__, drows)  # type: ignore[attr-defined]
        with write_lock(engine), engine.begin() as conn:
            ins_n(conn)
            ins_d(conn)
    wrote = time.perf_counter() - t0
    log(f"  {deliveries:,} deliveries written in {wrote:.1f}s ({wrote / deliveries * 1e6:.1f} µs/row, triggers on)")
    # the first campaign's last wave not produced yet: notifications still scheduled (no deliveries)
    waiting = max(1, n_notifs // 20)
    srows = [_notification(new_id("n"), f"s{i:07d}", "weekly_promo", camps[0], 2, "scheduled",
                           now + timedelta(hours=3, seconds=i / 1000), now) for i in range(waiting)]  # fmt: skip
    for start in range(0, waiting, chunk):
        ins_s = prepare_insert(engine, Notification.__table__, srows[start : start + chunk])  # type: ignore[attr-defined]
        with write_lock(engine), engine.begin() as conn:
            ins_s(conn)

    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    # the worker pool's upkeep, which runs every few seconds while such rows are written: PostgreSQL's
    # deltas, and on both the fold of the hourly rollup into the coarse tiers the funnel reads
    t1 = time.perf_counter()
    folded = compact(engine)
    fold_s = time.perf_counter() - t1
    log(f"  compact (the fold into the coarse tiers): {folded:,} rows in {fold_s:.1f}s")
    return {"deliveries": deliveries, "dead_lettered": dead, "first_dead": first_dead, "write_s": round(wrote, 1),
            "campaign": camps[0], "campaign_deliveries": deliveries // 4, "scheduled": waiting, "plan": plan,
            "write_us_per_row": round(wrote / deliveries * 1e6, 1), "fold_rows": folded,
            "fold_s": round(fold_s, 2)}  # fmt: skip


def _cpu_now(conn: Any) -> float:
    """CPU seconds so far of this process and, on PostgreSQL, of ``conn``'s backend (psutil)."""
    t = time.process_time()
    if conn.dialect.name == "postgresql":
        import psutil

        pid = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar())
        c = psutil.Process(pid).cpu_times()
        t += c.user + c.system
    return t


def wave_trigger_cost(env: Env, log: Callable[[str], None], rows: int = 20_000, chunk: int = 1_000) -> dict[str, Any]:
    """What the per-wave triggers (``analytics.waves``) cost a delivery: campaign deliveries
    written (``prepare_insert`` through ``counted_insert``, as the worker does; ``chunk`` a
    transaction), then moved sent → delivered (one UPDATE a chunk, as a webhook batch), with the
    wave triggers on and off, alternately, twice each: CPU µs a row of this process and, on
    PostgreSQL, of the connection's backend (``_cpu_now``)."""
    engine = env.ctx.engine
    now = utcnow()
    on_pg = engine.dialect.name == "postgresql"
    times: dict[str, list[float]] = {"on insert": [], "on update": [], "off insert": [], "off update": []}
    for round_ in range(4):
        mode = "on" if round_ % 2 == 0 else "off"
        # off: the wave triggers dropped, and SQLite's grouped count after a counted insert a no-op
        triggers.WAVES_COUNT_SINCE = waves.SQLITE_COUNT_SINCE if mode == "on" else "SELECT ?"  # type: ignore[attr-defined]
        if mode == "off":
            with engine.begin() as conn:
                for name in waves.TRIGGERS:
                    conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}" + (" ON deliveries" if on_pg else ""))
        ids: list[list[str]] = []
        t_ins = 0.0
        for start in range(0, rows, chunk):
            nrows, drows = [], []
            for i in range(start, start + chunk):
                nid = new_id("n")
                user = f"w{round_}-{i}"
                nrows.append(_notification(nid, user, "weekly_promo", f"cost{round_}", i % 3, "done", now, now))
                did = derived_id("d", nid, "email", user)
                drows.append(_delivery(did, nid, user, "email", f"{user}@example.com", "sent", None, False, now))
            with write_lock(engine), engine.begin() as conn:
                prepare_insert(engine, Notification.__table__, nrows)(conn)  # type: ignore[attr-defined]
            ins = prepare_insert(engine, Delivery.__table__, drows)  # type: ignore[attr-defined]
            with write_lock(engine), engine.begin() as conn:
                t = _cpu_now(conn)
                counted_insert(conn, ins, len(drows))  # as the worker's record stage inserts them
                t_ins += _cpu_now(conn) - t
            ids.append([d["id"] for d in drows])
        t_upd = 0.0
        for part in ids:
            marks = ", ".join("?" if engine.dialect.paramstyle == "qmark" else "%s" for _ in part)
            with write_lock(engine), engine.begin() as conn:
                t = _cpu_now(conn)
                conn.exec_driver_sql(f"UPDATE deliveries SET status = 'delivered' WHERE id IN ({marks})", tuple(part))
                t_upd += _cpu_now(conn) - t
        times[f"{mode} insert"].append(t_ins / rows * 1e6)
        times[f"{mode} update"].append(t_upd / rows * 1e6)
        if mode == "off":
            waves.install(engine, write_lock)  # back on (and the counts rebuilt from the rows)
    triggers.WAVES_COUNT_SINCE = waves.SQLITE_COUNT_SINCE  # type: ignore[attr-defined]
    out = {k: round(statistics.median(v), 1) for k, v in times.items()}
    out["rows"] = rows
    out["load_avg"] = round(os.getloadavg()[0], 1)
    log(f"  wave triggers, CPU µs a campaign delivery (median of 2): {out}")
    return out


class _Server:
    def __init__(self, ctx: Any) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=0, log_level="critical",
                                                    lifespan="off"))  # fmt: skip
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def measure(env: Env, info: dict[str, Any], runs: int, log: Callable[[str], None]) -> dict[str, Any]:
    import httpx

    key = create_key(env.ctx, "bench", "admin").key
    pages = {
        "overview": "/console",
        "dlq": "/console/dlq",
        "dlq_entry": f"/console/dlq/{info['first_dead']}",
        "campaigns": "/console/campaigns",
        "analytics_template": "/console/analytics?by=template",
        "analytics_day": "/console/analytics?by=day",
        "analytics_csv": "/console/analytics.csv?by=campaign",
        "lookup_user": "/console/lookup?q=u000123",
    }
    out: dict[str, Any] = {"pages_ms": {}, "funnel_ms": {}}
    with _Server(env.ctx) as url, httpx.Client(base_url=url, timeout=120) as c:
        token = re.search(r'name="csrf" value="([^"]+)"', c.get("/console/login").text).group(1)  # type: ignore[union-attr]
        assert c.post("/console/login", data={"csrf": token, "api_key": key}).status_code == 303
        for name, path in pages.items():
            times = []
            for _ in range(runs + 1):  # the first warms caches (as an operator's second look would find them)
                t = time.perf_counter()
                r = c.get(path)
                times.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, (path, r.status_code, r.text[:200])
            times = times[1:]
            out["pages_ms"][name] = {"median": round(statistics.median(times), 1), "max": round(max(times), 1)}
            log(f"  {name}: median {out['pages_ms'][name]['median']} ms, max {out['pages_ms'][name]['max']} ms")
    for by in ("template", "channel", "campaign", "day", "day since 7d"):
        times = []
        for _ in range(runs + 1):
            t = time.perf_counter()
            funnel(env.ctx.engine, by.split()[0], parse_since("7d") if "since" in by else None)
            times.append((time.perf_counter() - t) * 1000)
        times = times[1:]
        out["funnel_ms"][by] = {"median": round(statistics.median(times), 2), "max": round(max(times), 2)}
    log(f"  funnel: {out['funnel_ms']}")
    out["waves_ms"] = _waves(env, info, runs)
    log(f"  per-wave progress of a campaign of {info['campaign_deliveries']:,} deliveries: {out['waves_ms']}")
    return out


def _waves(env: Env, info: dict[str, Any], runs: int) -> dict[str, Any]:
    """The Campaigns page's per-wave numbers of the first campaign (a quarter of the deliveries,
    three waves, the last one's notifications still scheduled): read from ``wave_counts``
    (``analytics.waves.wave_progress``, what the page runs) and, for comparison, as a grouped
    count over the campaign's deliveries on the indexes (the join by notification id) — the
    other way the page could count them."""
    engine = env.ctx.engine
    mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
    grouped = (
        "SELECT n.wave, d.status, d.reason, count(*) FROM notifications AS n JOIN deliveries AS d "
        f"ON d.notification_id = n.id WHERE n.campaign_id = {mark} GROUP BY n.wave, d.status, d.reason"
    )

    def count() -> None:
        with engine.connect() as conn:
            conn.exec_driver_sql(grouped, (info["campaign"],)).all()

    out: dict[str, Any] = {}
    for name, read in (("wave_counts", lambda: wave_progress(engine, info["campaign"], info["plan"])),
                       ("grouped_count", count)):  # fmt: skip
        times = []
        for _ in range(runs + 1 if name == "wave_counts" else 2):  # the grouped count: once warm
            t = time.perf_counter()
            read()
            times.append((time.perf_counter() - t) * 1000)
        times = times[1:]
        out[name] = {"median": round(statistics.median(times), 1), "max": round(max(times), 1)}
    return out


def console_pages(deliveries: int = 1_000_000, runs: int = 5, log: Callable[[str], None] = print) -> dict[str, Any]:
    res: dict[str, Any] = {"deliveries": deliveries, "runs": runs}
    for db in ("sqlite", "postgresql"):
        if db == "postgresql" and not _pg_up():
            res[db] = {"error": "PostgreSQL not reachable on 127.0.0.1:5432: not measured"}
            continue
        log(f"  [{db}]")
        saved = os.environ.get("NOTIFY_BENCH_DATABASE_URL")
        if db == "postgresql":
            os.environ["NOTIFY_BENCH_DATABASE_URL"] = saved or PG_URL
        else:
            os.environ.pop("NOTIFY_BENCH_DATABASE_URL", None)
        env = Env()
        try:
            cost = wave_trigger_cost(env, log, rows=min(20_000, max(2_000, deliveries // 50)))
            info = {**fill(env, deliveries, log), "wave_trigger_cpu_us": cost}
            res[db] = {**info, **measure(env, info, runs, log)}
        except Exception as exc:  # noqa: BLE001 - one database's failure must not hide the other's figures
            import traceback

            traceback.print_exc()
            res[db] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            env.close()
            if saved is None:
                os.environ.pop("NOTIFY_BENCH_DATABASE_URL", None)
            else:
                os.environ["NOTIFY_BENCH_DATABASE_URL"] = saved
    return res
