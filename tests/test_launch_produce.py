"""A campaign sent now (issue 15, item 3): the launcher writes each notification already queued, with
its job, so the row is written once by the launcher and once by the worker that finishes it (the
reconciler's `queued` mark, a second write of every row, is gone from that path). A launcher that
dies between its commit and the enqueue leaves missing jobs, found by the reconciler's search for
lost work: nothing lost, nothing sent twice. SQLite and PostgreSQL; real Redis, workers, outbox."""

from __future__ import annotations

import io
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event, func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from campaigns.launcher import LaunchSpec, launch
from campaigns.report import campaign_status
from notifyctl.context import Context
from notifyctl.directory import import_users
from notifyctl.models import Delivery, Notification
from worker.pool import run_worker
from worker.providers.outbox import read_outbox
from worker.reconciler import reconcile

N = 2500  # three chunks of the launcher (1,000 rows), three jobs of the worker (batch 1,000)
_WRITE = re.compile(r"^\s*(UPDATE|INSERT INTO|COPY)\s+\"?(\w+\.)?notifications\b", re.I)


@contextmanager
def notification_writes() -> Iterator[Counter[str]]:
    """Statements writing the notifications table, by kind, whoever runs them in this process."""
    seen: Counter[str] = Counter()

    def on_exec(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        m = _WRITE.match(statement)
        if m:
            seen[m.group(1).upper()] += 1

    event.listen(Engine, "before_cursor_execute", on_exec)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", on_exec)


def _launch_now(ctx: Context, tag: str) -> str:
    rep = import_users(
        ctx, io.StringIO("user_id,email\n" + "".join(f"{tag}{i},{tag}{i}@example.com\n" for i in range(N)))
    )
    assert rep.errors == []
    seg = ctx.settings.home / f"{tag}.csv"
    seg.write_text("user_id,first_name,code\n" + "".join(f"{tag}{i},Name{i},C{i:05d}\n" for i in range(N)))
    spec = LaunchSpec("weekly_promo", channels=["email"], segment_csv=str(seg), rate=1_000_000.0, quiet_hours="off",
                      data={"discount": 20})  # fmt: skip
    return str(launch(ctx, spec)["campaign_id"])


def _sent_once(ctx: Context, cid: str) -> None:
    with Session(ctx.engine) as s:
        sent = Counter(
            uid
            for (uid,) in s.execute(
                select(Delivery.user_id)
                .join(Notification, Notification.id == Delivery.notification_id)
                .where(Notification.campaign_id == cid, Delivery.status == "sent")
            ).all()
        )
        statuses = dict(
            s.execute(
                select(Notification.status, func.count())
                .where(Notification.campaign_id == cid)
                .group_by(Notification.status)
            ).all()
        )
    assert len(sent) == N and set(sent.values()) == {1}
    assert statuses == {"done": N}
    outbox = [r for r in read_outbox(ctx.settings.outbox_dir, "email")]
    per_address = Counter(r.get("address") or r.get("to") for r in outbox)
    assert len(per_address) == N and set(per_address.values()) == {1}
    assert campaign_status(ctx, cid)["state"] == "completed"


def test_a_campaign_sent_now_writes_each_row_once_before_the_worker(any_db_ctx: Context) -> None:
    ctx = any_db_ctx
    with notification_writes() as launcher_writes:
        cid = _launch_now(ctx, "now")
    with Session(ctx.engine) as s:
        rows = s.execute(select(Notification.status, Notification.job_id).where(Notification.campaign_id == cid)).all()
    assert len(rows) == N and {st for st, _ in rows} == {"queued"}
    jobs = Counter(job for _, job in rows)
    assert len(jobs) == 3 and sorted(jobs.values()) == [500, 1000, 1000]
    assert ctx.redis.llen(ctx.queue("low").key) == 3
    assert launcher_writes["UPDATE"] == 0  # inserted queued, never updated by the launch

    with notification_writes() as reconciler_writes:
        res = reconcile(ctx, now=time.time() + ctx.settings.recovery_grace + 5, force=True, limit=100_000)
    # nothing due, nothing lost: the jobs wait in their queue; the reconciler writes no row
    assert (res.retries_queued, res.recovered) == (0, 0) and res.checked_jobs == 3
    assert sum(reconciler_writes.values()) == 0

    with notification_writes() as worker_writes:
        run_worker(ctx.settings, ["high", "normal", "low"], burst=True, reconcile=False)
    # each job's batch settled `done` at once (one UPDATE ... IN per 900 ids: SQLite's parameter limit)
    assert worker_writes["UPDATE"] == sum(-(-k // 900) for k in jobs.values())
    _sent_once(ctx, cid)


def test_a_launcher_dead_between_commit_and_enqueue_loses_nothing(any_db_ctx: Context) -> None:
    """The jobs of rows committed `queued` never reached Redis (the launcher killed in between): the
    reconciler finds them missing once the grace has passed, queues them again, each is sent once."""
    ctx = any_db_ctx
    cid = _launch_now(ctx, "cut")
    with Session(ctx.engine) as s:
        job_ids = {j for (j,) in s.execute(select(Notification.job_id).where(Notification.campaign_id == cid)).all()}
    assert len(job_ids) == 3
    ctx.redis.delete(ctx.queue("low").key, *(f"rq:job:{j}" for j in job_ids))  # as if never enqueued

    assert reconcile(ctx, force=True).recovered == 0  # within the grace: not looked at yet
    res = reconcile(ctx, now=time.time() + ctx.settings.recovery_grace + 1, force=True, limit=100_000)
    assert res.recovered == N and res.checked_jobs == 3
    run_worker(ctx.settings, ["high", "normal", "low"], burst=True, reconcile=False)
    again = reconcile(ctx, now=time.time() + ctx.settings.recovery_grace + 1, force=True, limit=100_000)
    assert (again.retries_queued, again.recovered) == (0, 0)
    _sent_once(ctx, cid)
