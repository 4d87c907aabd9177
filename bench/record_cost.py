"""CPU per notification of the worker's whole batch path, in this process, per process involved:
``worker.pipeline.process`` over batches of marketing email (SendGrid sandbox) and of push (the C
HTTP/2 sink, iOS and Android half each), and single high-priority SMS jobs (OTPs: Twilio sandbox)
run by an RQ ``SimpleWorker`` in burst mode as a pool worker runs them — on SQLite and on PostgreSQL
(issue 15 item 3, issue 20).

    python -m bench.record_cost                         # SQLite and PostgreSQL, email, push, otp
    python -m bench.record_cost --db pg --only otp --profile   # + cProfile's top functions
    python -m bench.record_cost --only segment          # email, each recipient's own data (the blast's)

The emails go out as the headline blast's do (``email_blast.COMPLIANT``: an unsubscribe link, the
postal address and an open pixel each). Per row: CPU µs per notification of this process (the
worker: every thread), of the PostgreSQL backends this process's engine connected to (their own
CPU, found by ``pg_backend_pid()``), of redis-server and of the sandbox or sink; SQL statements and
their rows per batch; Redis commands per notification. The load average before and after is
printed: on a shared machine, compare runs made side by side.

``--statements`` (PostgreSQL) also splits the backends' CPU by statement: each statement's
backend's on-CPU time (``/proc/<pid>/schedstat``, nanoseconds) read before and after it, µs per
notification; a prepared ``EXECUTE`` is named by the statement it runs. What runs outside a
statement event (COPY, COMMIT) is the rest.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import sys
import time
from collections import Counter
from typing import Any

from sqlalchemy import event
from sqlmodel import col

from bench import sinks
from bench.common import Env, bulk_notifications, bulk_users
from bench.email_blast import COMPLIANT, SEGMENT_DATA
from bench.harness import (
    PROMO,
    TWILIO_FROM,
    SqlCounter,
    bulk_ios_tokens,
    clear_rate_windows,
    commandstats,
    delta,
    p256_key_pem,
    phone_users,
    process_batches,
    process_cpu,
)
from bench.push_blast import KEY_ID, TEAM_ID, TOPIC, device_platforms, sink_service_account
from bench.sandboxes import SandboxProcess
from notifyctl import keys
from notifyctl.context import freeze_heap
from notifyctl.intake import parse_request, submit
from notifyctl.models import Delivery
from notifyctl.redisconn import connect
from worker import jobs
from worker.pipeline import Runtime
from worker.pool import _queue_class, _worker_class

PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


class _Meter:
    """CPU of this process, the PostgreSQL backends of ``engine``, redis-server and ``others``."""

    def __init__(self, env: Env, others: dict[str, int]) -> None:
        self.env, self.others = env, others
        self.backends: set[int] = set()
        engine = env.ctx.engine
        if engine.dialect.name == "postgresql":

            def on_connect(dbapi_conn: Any, rec: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("SELECT pg_backend_pid()")
                pid = cur.fetchone()[0]
                self.backends.add(pid)
                rec.info["bench_backend_pid"] = pid
                cur.close()

            event.listen(engine, "connect", on_connect)
            engine.dispose()
        self.redis_pid = int(env.ctx.redis.info("server")["process_id"])

    def read(self) -> dict[str, float]:
        t = os.times()
        out = {"worker (this process)": t.user + t.system, "redis-server": process_cpu(self.redis_pid)}
        if self.backends:
            out["PostgreSQL backends"] = sum(process_cpu(p) for p in self.backends)
        for name, pid in self.others.items():
            out[name] = process_cpu(pid)
        return out


def _on_cpu_us(pid: int) -> float:
    """Process ``pid``'s time on a CPU so far, µs (the scheduler's own count, in nanoseconds)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split(None, 1)[0]) / 1e3


class StatementCpu:
    """The PostgreSQL backend's CPU per statement (``--statements``): µs by statement (its first
    words; an ``EXECUTE`` of a prepared statement by that statement's), from the connection's
    backend's schedstat before and after each execute, inside ``with``."""

    _EXECUTE = re.compile(r"EXECUTE (\w+)")

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.us: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    @staticmethod
    def label(statement: str, prepared: dict[str, str]) -> str:
        m = StatementCpu._EXECUTE.match(statement)
        if m:
            statement = next((sql for sql, name in prepared.items() if name == m.group(1)), statement)
        words = re.sub(r"\s+", " ", statement).strip()
        return words if len(words) <= 90 else words[:87] + "..."

    def before(self, conn: Any, _cur: Any, statement: str, _p: Any, context: Any, _many: bool) -> None:
        pid = conn.connection.info.get("bench_backend_pid")
        if pid is not None:
            context._bench_cpu = (pid, _on_cpu_us(pid))

    def after(self, conn: Any, _cur: Any, statement: str, _p: Any, context: Any, _many: bool) -> None:
        start = getattr(context, "_bench_cpu", None)
        if start is None:
            return
        pid, t0 = start
        what = self.label(statement, conn.connection.info.get("notify_prepared", {}))
        self.us[what] += _on_cpu_us(pid) - t0
        self.calls[what] += 1

    def __enter__(self) -> StatementCpu:
        event.listen(self.engine, "before_cursor_execute", self.before)
        event.listen(self.engine, "after_cursor_execute", self.after)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self.before)
        event.remove(self.engine, "after_cursor_execute", self.after)


def _report(label: str, k: int, c0: dict[str, float], c1: dict[str, float], wall: float, sql: SqlCounter,
            batches: int, cmds: dict[str, int], prof: cProfile.Profile | None) -> dict[str, Any]:  # fmt: skip
    us = {name: round((c1[name] - c0[name]) / k * 1e6, 1) for name in c0}
    res = {
        "what": label,
        "n": k,
        "per_s_one_process": round(k / wall, 1),
        "cpu_us_per_notification": us,
        "cpu_us_total": round(sum(us.values()), 1),
        "sql_per_batch": round(sum(sql.statements.values()) / batches, 2),
        "sql_rows_per_notification": round(sql.rows / k, 2),
        "sql": dict(sql.statements.most_common()),
        "redis_per_notification": round(sum(cmds.values()) / k, 2),
        "redis": dict(sorted(cmds.items(), key=lambda kv: -kv[1])[:8]),
    }
    if prof is not None:
        st = pstats.Stats(prof)
        rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:25]  # type: ignore[attr-defined]
        res["top_own"] = [f"{v[2] / k * 1e6:8.1f} µs own {v[3] / k * 1e6:8.1f} cum {v[1]:7d} calls  "
                          f"{f[0].split('/')[-1]}:{f[1]}({f[2]})" for f, v in rows]  # fmt: skip
        crow = sorted(st.stats.items(), key=lambda kv: -kv[1][3])[:45]  # type: ignore[attr-defined]
        res["top_cum"] = [f"{v[3] / k * 1e6:8.1f} µs cum  {f[0].split('/')[-1]}:{f[1]}({f[2]})" for f, v in crow]
    return res


def _batches(env: Env, meter: _Meter, label: str, nids: list[str], batch: int, profile: bool,
             statements: bool = False) -> dict[str, Any]:  # fmt: skip
    rt = Runtime(env.ctx, worker_name=f"bench-cost-{label}")
    rt.warm()
    freeze_heap()  # as a pool worker does once set up (its collector's threshold too)
    clear_rate_windows(env)
    stats0 = commandstats(env)
    prof = cProfile.Profile(time.thread_time) if profile else None
    per = StatementCpu(env.ctx.engine) if statements and meter.backends else None
    with SqlCounter(env.ctx.engine) as sql:
        if per is not None:
            per.__enter__()
        c0, t0 = meter.read(), time.perf_counter()
        sent = process_batches(rt, nids, batch, prof)
        wall, c1 = time.perf_counter() - t0, meter.read()
        if per is not None:
            per.__exit__()
    rt.close()
    assert sent == len(nids), f"{label}: sent {sent} of {len(nids)}"
    res = _report(label, sent, c0, c1, wall, sql, -(-len(nids) // batch), delta(stats0, commandstats(env)), prof)
    if per is not None:
        k = max(1, sent)
        by = {what: round(us / k, 2) for what, us in per.us.most_common()}
        by["(the rest: COPY, COMMIT, ...)"] = round(
            res["cpu_us_per_notification"]["PostgreSQL backends"] - sum(per.us.values()) / k, 2
        )
        res["pg_us_per_statement"] = by
    return res


def _otp_jobs(env: Env, meter: _Meter, n: int, profile: bool) -> dict[str, Any]:
    """n OTPs submitted (``intake.submit``: a job each), then drained by an RQ SimpleWorker in burst
    mode in this process, set up as ``worker.pool.run_worker`` sets one up (its queue class too): the
    worker's CPU per job, and of its thread how much was the pipeline's ``process()`` and how much RQ's
    bookkeeping around it (``worker_thread_us_per_otp``). The submits' own CPU (this thread:
    parse_request + intake.submit, as ``notifyctl send`` and the API run them) is reported apart,
    ``intake_cpu_us_per_otp``, with its SQL statements and Redis commands per OTP (``intake_sql``,
    ``intake_redis``)."""
    users = phone_users(env, n)
    intake_cmds0 = commandstats(env)
    with SqlCounter(env.ctx.engine) as intake_sql:
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        for i, uid in enumerate(users):
            submit(env.ctx, parse_request({"recipient_id": uid, "template_id": "otp_code", "channels": ["sms"],
                                           "data": {"code": f"{i:06d}", "minutes": 10}}))  # fmt: skip
        intake_cpu, intake_wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    intake_cmds = delta(intake_cmds0, commandstats(env))
    intake_cmds.pop("info", None)  # (commandstats' own)
    rq_conn = connect(env.settings, dequeue=True)
    queue_class = _queue_class()
    w = _worker_class(1)([queue_class(keys.queue_name("high"), connection=rq_conn)], connection=rq_conn,
                         name="bench-otp", queue_class=queue_class)  # fmt: skip
    rt = jobs.configure(env.ctx, worker_name="bench-otp")
    rt.warm()
    # the worker thread's CPU inside the pipeline's process() (the rest of it is RQ's, around each job)
    in_process = [0.0]
    real_process = vars(jobs)["_process"]  # (worker.pipeline.process, as jobs.process calls it)

    def timed_process(*args: Any, **kwargs: Any) -> Any:
        t = time.thread_time()
        try:
            return real_process(*args, **kwargs)
        finally:
            in_process[0] += time.thread_time() - t

    vars(jobs)["_process"] = timed_process
    stats0 = commandstats(env)
    prof = cProfile.Profile(time.thread_time) if profile else None
    try:
        with SqlCounter(env.ctx.engine) as sql:
            c0, t0, th0 = meter.read(), time.perf_counter(), time.thread_time()
            if prof:
                prof.enable()
            w.work(burst=True, logging_level="WARNING")
            if prof:
                prof.disable()
            wall, c1, thread = time.perf_counter() - t0, meter.read(), time.thread_time() - th0
    finally:
        vars(jobs)["_process"] = real_process
    jobs.close()
    rq_conn.close()
    from sqlalchemy import func, select

    with env.ctx.engine.connect() as conn:
        sent = conn.execute(
            select(func.count()).where(col(Delivery.status) == "sent", col(Delivery.channel) == "sms")
        ).scalar()
    assert sent == n, f"otp: sent {sent} of {n}"
    res = _report("otp", n, c0, c1, wall, sql, n, delta(stats0, commandstats(env)), prof)
    res["intake_cpu_us_per_otp"] = round(intake_cpu / n * 1e6, 1)
    res["worker_thread_us_per_otp"] = {"process()": round(in_process[0] / n * 1e6, 1),
                                       "RQ (the rest)": round((thread - in_process[0]) / n * 1e6, 1)}  # fmt: skip
    res["intake_ms_per_otp"] = round(intake_wall / n * 1e3, 2)
    res["intake_sql"] = {k: round(v / n, 2) for k, v in intake_sql.statements.most_common()}
    res["intake_redis"] = {k: round(v / n, 2) for k, v in intake_cmds.items() if v}
    return res


def run(db: str, only: list[str], n: int, batch: int, otps: int, profile: bool, sink: Any,
        statements: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    os.environ.pop("NOTIFY_BENCH_DATABASE_URL", None)
    sg = SandboxProcess("sendgrid")
    tw = SandboxProcess("twilio")
    opts: dict[str, Any] = {
        "sendgrid": {"api_key": sg.info["api_key"], "base_url": sg.info["url"]},
        "twilio": {"account_sid": tw.info["account_sid"], "auth_token": tw.info["auth_token"],
                   "from_number": TWILIO_FROM, "base_url": tw.info["url"]},
    }  # fmt: skip
    if sink is not None:
        opts["apns"] = {"key": p256_key_pem().decode(), "key_id": KEY_ID, "team_id": TEAM_ID, "topic": TOPIC,
                        "base_url": sink.url, "ca_file": sink.ca_file}  # fmt: skip
        opts["fcm"] = {"service_account_json": json.dumps(sink_service_account(sink.url)), "base_url": sink.url,
                       "ca_file": sink.ca_file, "token_url": sink.url + "/token"}  # fmt: skip
    env = Env(bench_pg=PG_URL if db == "pg" else "", providers_email=["sendgrid"], providers_sms=["twilio"],
              providers_push_ios=["apns"], providers_push_android=["fcm"], batch_size=batch,
              provider_options=opts, **COMPLIANT)  # fmt: skip
    out: list[dict[str, Any]] = []
    try:
        others = {"SendGrid sandbox": sg.proc.pid, "Twilio sandbox": tw.proc.pid}
        if sink is not None:
            others.update({k: p for k, p in sink.pids.items() if k != "nginx master"})
        meter = _Meter(env, others)
        ids = bulk_users(env.ctx, n)
        if "push" in only and sink is not None:
            bulk_ios_tokens(env, ids, platforms=device_platforms(n, 0.5))
        for what in only:
            if what == "otp":
                r = _otp_jobs(env, meter, otps, profile)
            elif what == "push" and sink is None:
                continue
            else:
                channel = "push" if what == "push" else "email"
                # segment: each recipient's own first name and code, as the headline blast's segment CSV
                data = (
                    [{**SEGMENT_DATA, "first_name": f"Name{i}", "code": f"C{i:07d}Z"} for i in range(n)]
                    if what == "segment"
                    else PROMO
                )
                # written queued, as the launcher writes the rows due now (a row's writes on PostgreSQL
                # as in the blast: the insert, then the worker's done)
                nids = bulk_notifications(env.ctx, ids, "weekly_promo", [channel], data, status="queued")
                r = _batches(env, meter, what, nids, batch, profile, statements)
            r["db"] = db
            out.append(r)
            _print(r)
    finally:
        sg.stop()
        tw.stop()
        env.close()
    return out


def _print(r: dict[str, Any]) -> None:
    print(f"{r['db']:6} {r['what']:5} n={r['n']} {r['per_s_one_process']}/s  CPU µs/notification "
          f"{r['cpu_us_total']} {r['cpu_us_per_notification']}", flush=True)  # fmt: skip
    if "intake_cpu_us_per_otp" in r:
        cpu, ms = r["intake_cpu_us_per_otp"], r["intake_ms_per_otp"]
        print(f"       intake (submit, this thread): {cpu} µs CPU, {ms} ms per OTP")
        print(f"       intake per OTP: SQL {r['intake_sql']}, Redis {r['intake_redis']}")
        print(f"       worker thread CPU µs per OTP job: {r['worker_thread_us_per_otp']}")
    print(f"       SQL {r['sql_per_batch']}/batch, {r['sql_rows_per_notification']} rows/notification {r['sql']}")
    print(f"       Redis {r['redis_per_notification']}/notification {r['redis']}", flush=True)
    for what, us in r.get("pg_us_per_statement", {}).items():
        print(f"       PostgreSQL {us:7.2f} µs/notification  {what}")
    for key in ("top_own", "top_cum"):
        for line in r.get(key, []):
            print("      ", line)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", default="sqlite,pg", help="sqlite, pg or both (comma-separated)")
    ap.add_argument("--only", default="email,push,otp")
    ap.add_argument("--n", type=int, default=5000, help="notifications per email or push row")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--otps", type=int, default=200, help="OTP jobs in the otp row")
    ap.add_argument(
        "--profile", action="store_true", help="cProfile each row on thread CPU time (slower: compare unprofiled runs)"
    )
    ap.add_argument(
        "--statements", action="store_true", help="PostgreSQL: the backends' CPU split by statement (schedstat)"
    )
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args(argv)
    only = [s for s in a.only.split(",") if s]
    sink = None
    if "push" in only:
        hint = sinks.missing()
        if hint:
            print(f"push skipped: {hint}", file=sys.stderr)
        else:
            sink = sinks.NginxSink()
    with open("/proc/loadavg") as f:
        print("load before:", " ".join(f.read().split()[:3]), flush=True)
    rows: list[dict[str, Any]] = []
    try:
        for db in a.db.split(","):
            rows += run(db, only, a.n, a.batch, a.otps, a.profile, sink, a.statements)
    finally:
        if sink is not None:
            sink.stop()
    with open("/proc/loadavg") as f:
        print("load after:", " ".join(f.read().split()[:3]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
