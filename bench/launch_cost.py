"""CPU per row of the campaign launcher alone (issue 15): ``campaigns.launcher.launch`` (what
``campaign launch`` calls) over a segment CSV like the email blast's (``bench/email_blast.py``: a
first name and a code of their own each, sent now), into a fresh database, no workers running — on
SQLite and on PostgreSQL.

    python -m bench.launch_cost                           # both databases, 200,000 rows, one run each
    python -m bench.launch_cost --db pg --rows 100000 --runs 3

Per run: the launch's wall seconds; CPU µs per row of this process (the launch's Python, and on
SQLite the database's own work), of the PostgreSQL backends this process's engine connected to
(found by ``pg_backend_pid()``) and of redis-server (the jobs of the rows due at once); the garbage
collector's young collections during the launch. With no pool running, SQLite's WAL is checkpointed
by the launch's own commits (in the blast, by the pool's supervisor). The load average is printed:
on a shared machine, compare old and new code run interleaved.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from typing import Any

from sqlalchemy import event

from bench.common import Env, bulk_users
from bench.email_blast import SEGMENT_DATA, SEGMENT_PROMO_ID, write_segment_csv
from bench.harness import process_cpu
from campaigns.launcher import LaunchSpec, launch

PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def _backends(env: Env) -> set[int]:
    """The server processes of ``env``'s engine's connections from now on (PostgreSQL; else none)."""
    pids: set[int] = set()
    engine = env.ctx.engine
    if engine.dialect.name == "postgresql":

        def on_connect(dbapi_conn: Any, _rec: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("SELECT pg_backend_pid()")
            pids.add(cur.fetchone()[0])
            cur.close()

        event.listen(engine, "connect", on_connect)
        engine.dispose()
    return pids


def one(db: str, rows: int) -> dict[str, Any]:
    env = Env(bench_pg=PG_URL if db == "postgresql" else "")
    try:
        ids = bulk_users(env.ctx, rows)
        csv_path = write_segment_csv(env.dir / "segment.csv", ids)
        backends = _backends(env)
        redis_pid = int(env.ctx.redis.info("server")["process_id"])
        spec = LaunchSpec(template_id=SEGMENT_PROMO_ID, channels=["email"], rate=1_000_000.0,
                          segment_csv=str(csv_path), quiet_hours="off", data=dict(SEGMENT_DATA))  # fmt: skip
        load = os.getloadavg()[0]
        young = gc.get_stats()[0]["collections"]
        r0, b0 = process_cpu(redis_pid), {p: process_cpu(p) for p in backends}
        c0, t0 = time.process_time(), time.perf_counter()
        summary = launch(env.ctx, spec)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        server = sum(process_cpu(p) - b0.get(p, 0.0) for p in backends)  # (a backend started by the launch: from 0)
        out = {"database": db, "rows": rows, "written": summary["written"], "load_1m": round(load, 2),
               "wall_s": round(wall, 2), "launcher_us": round(cpu / rows * 1e6, 1),
               "redis_us": round((process_cpu(redis_pid) - r0) / rows * 1e6, 2),
               "young_collections": gc.get_stats()[0]["collections"] - young}  # fmt: skip
        if db == "postgresql":
            out["pg_backends_us"] = round(server / rows * 1e6, 1)
        return out
    finally:
        env.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", choices=["sqlite", "pg", "both"], default="both")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=1)
    a = ap.parse_args(argv)
    dbs = ["sqlite", "postgresql"] if a.db == "both" else ["postgresql" if a.db == "pg" else "sqlite"]
    for _ in range(a.runs):
        for db in dbs:
            print(json.dumps(one(db, a.rows)), flush=True)


if __name__ == "__main__":
    main()
