"""The PostgreSQL server's CPU per row of a campaign notification's two writes (issue 15 item 3): the
launcher's COPY (``campaigns.produce``, 1,000-row chunks, each recipient's own data, written
``queued`` with its job) and the worker's ``done`` UPDATE (``worker.pipeline.record``: one prepared
``UPDATE ... WHERE id = ANY(...)`` a batch, a transaction each), with the worker's load of the
batch's rows between them (``worker.pipeline.batch``), on the project's schema and on variants of
it made by DDL here, side by side, round after round.

    python -m bench.pg_rows                          # current, pg_defaults, no_status_index; 3 rounds
    python -m bench.pg_rows --variants current,pg_defaults --rounds 5 --chunks 20

Per row: the backend's own time on a CPU (``/proc/<pid>/schedstat``, nanoseconds: whatever else the
machine runs, only this backend's), the WAL bytes written (``pg_current_wal_lsn``), how many of the
UPDATE's row versions were HOT (heap-only: no new index entries; ``pg_stat_user_tables``), and the
bytes on disk of the table and its two unique indexes once vacuumed.
The variants:

- ``current``: the schema as ``notifyctl.db`` makes it;
- ``pg_defaults``: the notifications' fillfactors back at PostgreSQL's defaults (``models.PG_FILLFACTOR``
  says why they are not);
- ``no_status_index``: the two indexes that name ``status`` dropped (``ix_notifications_status_due``,
  ``ix_notifications_lost_high``): the done UPDATE is then HOT (a new version on the same page, no
  new index entries). Not a schema the project can run (the reconciler finds due and lost work
  through them): what the UPDATE would cost if the open rows were found some other way.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from sqlmodel import Session

from bench.common import Env
from bench.email_blast import SEGMENT_DATA
from campaigns.produce import _NT, _insert_new
from notifyctl.bulk import rows_where_in, update_where_in
from notifyctl.ids import new_ids
from notifyctl.models import PG_FILLFACTOR, NotificationStatus, new_id, utcnow
from worker.pipeline.batch import _N_LOADABLE, _N_SELECT

PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"

VARIANTS: dict[str, list[str]] = {
    "current": [],
    "pg_defaults": [
        f"ALTER {'INDEX' if n.endswith(('_pkey', '_recipient')) else 'TABLE'} {n} RESET (fillfactor)"
        for n in PG_FILLFACTOR
    ],  # fmt: skip
    "no_status_index": ["DROP INDEX ix_notifications_status_due", "DROP INDEX ix_notifications_lost_high"],
}


def on_cpu_us(pid: int) -> float:
    """Process ``pid``'s time on a CPU so far, µs (the scheduler's count, in nanoseconds)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split(None, 1)[0]) / 1e3


def measure(pg_url: str, variant: str, chunks: int, size: int) -> dict[str, Any]:
    """``chunks`` launcher COPYs of ``size`` rows into a fresh schema changed by ``variant``'s DDL,
    then each chunk marked done as a worker batch marks it: the backend's CPU µs, WAL bytes per row;
    then the space on disk once a second launch like it reused what VACUUM freed."""
    env = Env(bench_pg=pg_url)
    try:
        engine = env.ctx.engine
        with engine.begin() as c:
            for ddl in VARIANTS[variant]:
                c.exec_driver_sql(ddl)
        cid = "c_" + new_id("c")
        with engine.connect() as conn, Session(bind=conn) as session:
            pid = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
            lsn0 = str(conn.exec_driver_sql("SELECT pg_current_wal_lsn()::text").scalar_one())
            conn.commit()
            chunk_ids: list[list[str]] = []
            copy_us = 0.0
            for k in range(chunks):
                insert_rows, ids = _chunk(engine, cid, k, size)
                t = on_cpu_us(pid)
                insert_rows(session)
                session.commit()
                copy_us += on_cpu_us(pid) - t
                chunk_ids.append(ids)
            conn.exec_driver_sql("ANALYZE notifications")  # as the launcher's analyze_grown does
            wal_copy = int(conn.exec_driver_sql("SELECT pg_current_wal_lsn() - %s::pg_lsn", (lsn0,)).scalar_one())
            conn.commit()
            lsn1 = str(conn.exec_driver_sql("SELECT pg_current_wal_lsn()::text").scalar_one())
            conn.commit()
            done_us = load_us = 0.0
            for ids in chunk_ids:
                t = on_cpu_us(pid)
                loaded = rows_where_in(session.connection(), _N_SELECT, "id", ids, _N_LOADABLE, prepared=True)
                assert len(loaded) == size
                session.commit()
                load_us += on_cpu_us(pid) - t
                t = on_cpu_us(pid)
                _done(session, ids)
                done_us += on_cpu_us(pid) - t
            wal_done = int(conn.exec_driver_sql("SELECT pg_current_wal_lsn() - %s::pg_lsn", (lsn1,)).scalar_one())
            conn.exec_driver_sql("SELECT pg_stat_force_next_flush()")  # (this session's counts, at its commit)
            conn.commit()
            conn.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
            updated, hot = conn.exec_driver_sql(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = 'notifications'::regclass"
            ).one()
            conn.commit()
            # the space once in a steady state: vacuumed, the next launch's rows in the room freed, vacuumed
            _vacuum(engine)
            for k in range(chunks, 2 * chunks):
                insert_rows, ids = _chunk(engine, cid, k, size)
                insert_rows(session)
                session.commit()
                _done(session, ids)
            _vacuum(engine)
            sizes: dict[str, int] = {
                str(name): int(str(size_))
                for name, size_ in conn.exec_driver_sql(
                    "SELECT relname, pg_relation_size(oid) FROM pg_class WHERE relname = ANY(%s)"
                    " AND relnamespace = current_schema()::regnamespace",
                    (["notifications", "notifications_pkey", "uq_notifications_campaign_recipient"],),
                )
            }
        n = chunks * size
        return {
            "variant": variant,
            "rows": n,
            "copy_us_per_row": round(copy_us / n, 2),
            "worker_load_us_per_row": round(load_us / n, 2),
            "done_update_us_per_row": round(done_us / n, 2),
            "wal_bytes_per_row": {"copy": round(wal_copy / n), "done_update": round(wal_done / n)},
            # on disk after two launches, vacuumed: the table, and its two unique indexes
            "bytes_per_row": {k: round(v / (2 * n)) for k, v in sizes.items()},
            "updated": int(str(updated)),
            "hot_updated": int(str(hot)),
        }
    finally:
        env.close()


def _chunk(engine: Any, cid: str, k: int, size: int) -> tuple[Any, list[str]]:
    """The launcher's COPY of chunk ``k`` (its parameters converted: run it on a session), and its ids."""
    now = utcnow()
    ids = new_ids("n", size)
    job = "job_" + new_id("l")
    rows = [
        {"id": ids[i], "recipient_id": f"u{k:04d}{i:05d}", "dedup_key": f"campaign:{cid}:u{k:04d}{i:05d}",
         "data": {**SEGMENT_DATA, "first_name": f"Name{i}", "code": f"C{k:04d}{i:05d}Z"},
         "wave": 0, "status": NotificationStatus.queued, "job_id": job, "due_at": now}
        for i in range(size)
    ]  # fmt: skip
    shared = {"type": "weekly_promo", "template_id": "weekly_promo", "category": "marketing", "priority": "low",
              "channels": ["email"], "campaign_id": cid, "created_at": now, "updated_at": now}  # fmt: skip
    return _insert_new(engine, rows, shared), ids


def _done(session: Session, ids: list[str]) -> None:
    """A worker batch's done UPDATE (``record._settle_notifications``: the statement and its values), committed."""
    values = {"status": NotificationStatus.done, "reason": None, "updated_at": utcnow()}
    update_where_in(session.connection(), _NT, values, "id", ids)
    session.commit()


def _vacuum(engine: Any) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM notifications")


def _load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=3, help="each variant once a round, in turn")
    ap.add_argument("--chunks", type=int, default=30, help="1,000-row launcher chunks (worker batches) a run")
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--pg", default=os.environ.get("NOTIFY_BENCH_DATABASE_URL") or PG_URL)
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args(argv)
    out: list[dict[str, Any]] = []
    for rnd in range(a.rounds):
        for variant in a.variants.split(","):
            r = measure(a.pg, variant, a.chunks, a.size)
            r["round"], r["load"] = rnd, _load()
            out.append(r)
            print(
                f"{variant:16} COPY {r['copy_us_per_row']:6.2f} µs/row  worker's load"
                f" {r['worker_load_us_per_row']:5.2f}  done UPDATE {r['done_update_us_per_row']:6.2f}"
                f" µs/row  WAL {r['wal_bytes_per_row']}  HOT {r['hot_updated']}/{r['updated']}  load {r['load']}"
                f"\n{'':16} on disk, vacuumed: {r['bytes_per_row']} bytes/row",
                flush=True,
            )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
