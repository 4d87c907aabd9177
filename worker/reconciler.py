"""One module: the reconciler's passes (due, lost, orphans, lost high priority) share one locked round and its
budget; ~400 lines.

The reconciler: makes the SQL record and the queues agree, so that nothing accepted is lost.

It runs every second in each worker pool and once per ``notifyctl worker --burst`` round, one
round at a time in the whole cluster: under an owned Redis lock (``notifyctl.redislock``: a token,
renewed every 2.5 s while the round runs, released by compare-and-delete at its end), which a round
checks before each of its writing steps — one whose lock ran out (its process paused, or cut off
from Redis for 10 s) stops there. The pools' rounds are also paced: at most one started per 0.9 s
in the cluster; a forced round (``notifyctl reconcile``, burst workers) waits up to a minute for
the lock instead. Two duties:

1. **Due work.** Notifications in ``retrying`` or ``scheduled`` whose ``due_at`` has come are
   queued (in batches), with ``as_of`` set so the worker sends exactly what is due. SQL holds
   the schedule, so retries and scheduled sends (campaign waves) survive the loss of Redis.
2. **Lost work.** A notification still ``queued`` ``recovery_grace`` seconds after it was due
   has its RQ job looked at (one pipeline for all of them): priority ``high`` every round and
   first, the others when ``check_lost`` (every third round in the pool). The job is lost, and the
   notification is queued again under a new job, when the job:
   - is missing (the CLI died between the SQL commit and the enqueue, or Redis lost it);
   - has ended (finished, failed, stopped, canceled) without finishing the notification;
   - was started by a worker whose liveness key has expired (killed with -9);
   - is marked queued but is no longer in its queue (popped by a worker that then died —
     RQ's dequeue from several queues is not crash-safe).

With several Redis shards (``notifyctl.shards``) a round takes the pace key and the lock of each
shard it serves (each on its shard), reads the candidates from SQL once for all of them, and works
each shard's users' part under that shard's lock: their jobs and the workers' liveness keys are
checked on that shard, and they are queued there. Each due row is read once per round, however
many shards (two pools that each took some of the shards in the same instant both read it).

Requeueing can at worst process a notification twice, and processing is idempotent
(``worker.pipeline``), so recovery never sends twice what was sent.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import func, or_, select, update
from sqlmodel import Session, col

from notifyctl import keys
from notifyctl.bulk import unindexed_in, update_where_in
from notifyctl.context import Context
from notifyctl.db import write_lock
from notifyctl.intake import enqueue
from notifyctl.models import (
    LOST_HIGH_WHERE,
    Campaign,
    Delivery,
    DeliveryStatus,
    Notification,
    NotificationStatus,
    new_id,
)
from notifyctl.redisconn import unreachable
from notifyctl.redislock import LockLost, OwnedLock
from notifyctl.shards import shard_of

_LIVE_STATES = {"scheduled", "deferred"}
LOCK_TTL_MS = 10_000  # the round's lock runs out this long after its last renewal (every 2.5 s)
FORCED_WAIT = 60.0  # seconds a forced round waits for another round to end
T = TypeVar("T")
_N = Notification.__table__  # type: ignore[attr-defined]


@dataclass
class ReconcileResult:
    retries_queued: int = 0
    recovered: int = 0
    checked_jobs: int = 0
    skipped_locked: bool = False
    orphans_woken: int = 0
    lock_lost: bool = False  # the round stopped: its lock ran out (see OwnedLock)


def _naive(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def reconcile(
    ctx: Context,
    now: float | None = None,
    limit: int | None = None,
    force: bool = False,
    check_lost: bool = True,
    paced: bool = False,
    shards: list[int] | None = None,
) -> ReconcileResult:
    """One reconciliation round. ``now`` (epoch s) can be given to act as of another time.

    With several Redis shards (``notifyctl.shards``): the round takes the pace key and the lock of
    each shard of ``shards`` (default: all) it can, each on its own shard, then reads SQL once for
    all of them and queues each shard's users' notifications on that shard, under that shard's
    lock. A shard whose lock another round holds is that round's; one whose Redis is out is
    reported (raised) after the others' work is done.

    ``paced`` (the pool's once-a-second rounds): a campaign's due notifications are queued at most
    at its ``--rate`` per round, so a campaign that fell behind catches up without a burst.

    Never without the lock: a round that cannot take any is skipped (``skipped_locked``; ``force``
    waits ``FORCED_WAIT`` s for each first), a shard whose lock is lost is dropped from the round
    (``lock_lost``)."""
    n = ctx.shard_count
    wanted = [0] if n == 1 else sorted(set(range(n) if shards is None else shards))
    result = ReconcileResult()
    locks: dict[int, OwnedLock] = {}
    down: list[BaseException] = []
    try:
        for shard in wanted:  # in ascending order in every pool: a forced round never deadlocks
            try:
                lock = _take(ctx, shard, force)
            except Exception as exc:
                if n == 1 or not unreachable(exc):
                    raise
                down.append(exc)  # that shard's Redis is out: the others' work still runs
                continue
            if lock is not None:
                locks[shard] = lock
        if locks:
            _round(ctx, locks, down, result, now, limit, check_lost, paced)
        else:
            result.skipped_locked = True
    finally:
        for lock in locks.values():
            lock.release()
    if down:
        raise down[0]  # (the pool reports the outage)
    return result


def _take(ctx: Context, shard: int, force: bool) -> OwnedLock | None:
    """That shard's pace key (unless ``force``) and lock, on that shard's Redis; None when taken."""
    r = ctx.shard_redis(shard)
    if not force and not r.set(keys.RECONCILE_PACE, "1", nx=True, px=900):
        return None
    lock = OwnedLock(r, keys.RECONCILE_LOCK, LOCK_TTL_MS)
    return lock if lock.acquire(wait=FORCED_WAIT if force else 0) else None


def _round(
    ctx: Context,
    locks: dict[int, OwnedLock],
    down: list[BaseException],
    result: ReconcileResult,
    now: float | None,
    limit: int | None,
    check_lost: bool,
    paced: bool,
) -> ReconcileResult:
    now = time.time() if now is None else now
    settings = ctx.settings
    limit = limit or settings.reconcile_limit
    batch_size = max(1, settings.batch_size)
    n = ctx.shard_count
    live = dict(locks)  # the shards this round still works: a lost lock or an unreachable shard leaves

    def held(user_id: str) -> int | None:  # the user's shard, when this round holds it
        s = 0 if n == 1 else shard_of(user_id, n)
        return s if s in live else None

    def on(shard: int, step: Callable[[], T], write: bool = True) -> T | None:
        """``step()`` for ``shard``, after checking its lock when it writes; None, and the shard
        dropped from the round, when its lock is lost or (sharded) its Redis unreachable."""
        if shard not in live:
            return None
        try:
            if write:
                live[shard].check()
            return step()
        except LockLost:
            result.lock_lost = True
        except Exception as exc:
            if n == 1 or not unreachable(exc):
                raise
            down.append(exc)
        live.pop(shard, None)
        return None

    with Session(ctx.engine) as session:
        # 1. due retries and scheduled sends
        rates = _campaign_rates(session) if paced else {}
        q = select(col(Notification.id), col(Notification.priority), col(Notification.recipient_id)).where(
            col(Notification.status).in_([NotificationStatus.retrying, NotificationStatus.scheduled]),
            col(Notification.due_at) <= _naive(now),
        )
        if rates:  # paced campaigns are taken below, at their own rate
            q = q.where(
                (col(Notification.campaign_id).is_(None))
                | (col(Notification.status) == NotificationStatus.retrying)
                | col(Notification.campaign_id).not_in(list(rates))
            )
        # Core rows, not the ORM's: a due row is only read (~0.4 µs less a row queued, of 7-9, SQLite)
        conn = session.connection()
        due = list(conn.execute(q.order_by(col(Notification.due_at)).limit(limit)).tuples().all())
        for cid, rate in rates.items():
            # A campaign behind its schedule (workers were down, the launcher was slow) catches up at
            # its --rate, never faster: the pool reconciles once a second, so `rate` per round.
            due += (
                conn.execute(
                    select(col(Notification.id), col(Notification.priority), col(Notification.recipient_id))
                    .where(
                        col(Notification.campaign_id) == cid,
                        col(Notification.status) == NotificationStatus.scheduled,
                        col(Notification.due_at) <= _naive(now),
                    )
                    .order_by(col(Notification.due_at))
                    .limit(max(1, math.ceil(rate)))
                )
                .tuples()
                .all()
            )
        by_shard: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for nid, prio, user_id in due:
            if (s := held(user_id)) is not None:
                by_shard[s][prio].append(nid)
        from_due: list[str] = [NotificationStatus.retrying, NotificationStatus.scheduled]
        for s, by_prio in by_shard.items():
            queued = on(s, partial(_requeue, ctx, session, by_prio, batch_size, now, from_due, s))
            result.retries_queued += queued or 0
        if not live:  # every lock lost (or every shard out): stop here
            return result

        # 2. lost work. Transactional (high) notifications every round and on their own: behind a
        # campaign's backlog (thousands queued, all older than the OTP) the search in due_at order
        # stops at `limit` long before a dead worker's OTP, which then waited minutes for the backlog.
        overdue = (
            col(Notification.status) == NotificationStatus.queued,
            col(Notification.due_at) <= _naive(now) - timedelta(seconds=settings.recovery_grace),
        )
        row_cols = (col(Notification.id), col(Notification.priority), col(Notification.recipient_id))
        # (the high rows' own partial index: its WHERE repeated as is, so SQLite uses it too)
        high_q = select(*row_cols, col(Notification.job_id)).where(*overdue, LOST_HIGH_WHERE)
        high = list(session.execute(high_q.order_by(col(Notification.due_at)).limit(limit)).tuples().all())
        jobs_by_shard: dict[int, set[str | None]] = defaultdict(set)  # the jobs to look at, by shard
        for _nid, _prio, user_id, job_id in high:
            if (s := held(user_id)) is not None:
                jobs_by_shard[s].add(job_id)
        if check_lost:
            # The others: the jobs of the `limit` oldest, one row a job. During a blast the queued
            # backlog is tens of thousands of rows, all older than the grace, and reading them all
            # every third second cost the pool 58-133 ms of Python (20,000 rows) for ~20 jobs;
            # the rows themselves are read below, only for a job found lost. A job's notifications
            # are one shard's (jobs are enqueued per shard), so one user names its shard; rows
            # without a job are looked for on every shard.
            window = select(col(Notification.job_id), col(Notification.recipient_id)).where(*overdue)
            sub = window.order_by(col(Notification.due_at)).limit(limit).subquery()
            for job_id, user_id in session.execute(
                select(sub.c.job_id, func.min(sub.c.recipient_id)).group_by(sub.c.job_id)
            ).tuples():
                if job_id is None:
                    for s in live:
                        jobs_by_shard[s].add(None)
                elif (s := held(user_id)) is not None:
                    jobs_by_shard[s].add(job_id)
        for s, jobs in jobs_by_shard.items():
            job_ids = [j for j in jobs if j]
            result.checked_jobs += len(job_ids)
            found = on(s, partial(_lost_jobs, ctx.shard_redis(s), job_ids), write=False)
            if found is None:
                continue
            lost = set(found) | ({None} & jobs)
            if not lost:
                continue
            lost_rows: Iterable[tuple[Any, ...]]
            if check_lost:  # the lost jobs' rows (rare: after a crash), whatever their priority
                named = sorted(j for j in lost if j)
                # chunks of 900 job ids (SQLite's bound-parameter limit before 3.32), the jobless rows with the first
                which = [[col(Notification.job_id).in_(named[i : i + 900])] for i in range(0, len(named), 900)] or [[]]
                if None in lost:
                    which[0].append(col(Notification.job_id).is_(None))
                lost_rows = [
                    row
                    for terms in which
                    for row in session.execute(
                        select(*row_cols).where(*overdue, or_(*terms)).order_by(col(Notification.due_at)).limit(limit)
                    ).tuples()
                ]
            else:
                lost_rows = ((nid, prio, user_id) for nid, prio, user_id, job_id in high if job_id in lost)
            lost_by_prio: dict[str, list[str]] = defaultdict(list)
            for nid, prio, user_id in lost_rows:
                if held(user_id) == s:
                    lost_by_prio[prio].append(nid)
            from_queued: list[str] = [NotificationStatus.queued]
            recovered = on(s, partial(_requeue, ctx, session, lost_by_prio, batch_size, now, from_queued, s))
            result.recovered += recovered or 0
        if not check_lost or not live:
            return result

        # 3. orphans: a delivery put back to 'retrying' (DLQ replay) while a job that had already
        # loaded its notification marked the notification done; wake the notification again.
        orphans = (
            session.execute(
                select(
                    col(Delivery.notification_id),
                    func.min(col(Delivery.next_attempt_at)),
                    col(Notification.recipient_id),
                )
                .join(Notification, col(Notification.id) == col(Delivery.notification_id))
                .where(
                    col(Delivery.status).in_([DeliveryStatus.queued, DeliveryStatus.retrying]),
                    col(Notification.status).in_([NotificationStatus.done, NotificationStatus.suppressed]),
                )
                .group_by(col(Delivery.notification_id), col(Notification.recipient_id))
                .limit(limit)
            )
            .tuples()
            .all()
        )
        orphans_by_shard: dict[int, list[tuple[str, datetime | None]]] = defaultdict(list)
        for nid, next_at, user_id in orphans:
            if (s := held(user_id)) is not None:
                orphans_by_shard[s].append((nid, next_at))
        for s, rows in orphans_by_shard.items():
            if on(s, lambda: True):  # its lock still ours
                for nid, next_at in rows:
                    session.execute(
                        update(Notification)
                        .where(col(Notification.id) == nid)
                        .values(status=NotificationStatus.retrying, due_at=next_at or _naive(now))
                    )
                result.orphans_woken += len(rows)
        if result.orphans_woken:
            session.commit()
    return result


def _campaign_rates(session: Session) -> dict[str, float]:
    """Active campaigns and their --rate."""
    rows = (
        session.execute(select(col(Campaign.id), col(Campaign.spec)).where(col(Campaign.status) == "active"))
        .tuples()
        .all()
    )
    return {cid: float(spec.get("rate") or 0) for cid, spec in rows if float(spec.get("rate") or 0) > 0}


def _lost_jobs(r: Any, job_ids: list[str]) -> list[str]:
    """Which of ``job_ids`` (jobs on the shard ``r``, whose workers' liveness keys are there too) are lost."""
    if not job_ids:
        return []
    pipe = r.pipeline(transaction=False)
    for j in job_ids:
        pipe.hmget(keys.rq_job(j), "status", "worker_name", "origin")
    rows = pipe.execute()
    lost: list[str] = []
    checks: list[tuple[str, str, str]] = []  # (job id, kind, arg)
    for j, (status, worker_name, origin) in zip(job_ids, rows, strict=True):
        status = status.decode() if status else None
        if status is None or status in ("finished", "failed", "stopped", "canceled"):
            lost.append(j)
        elif status == "started":
            checks.append((j, "alive", worker_name.decode() if worker_name else ""))
        elif status == "queued":
            checks.append((j, "inqueue", origin.decode() if origin else ""))
        elif status not in _LIVE_STATES:
            lost.append(j)
    if checks:
        pipe = r.pipeline(transaction=False)
        for j, kind, arg in checks:
            if kind == "alive":
                pipe.exists(keys.alive(arg))
            else:
                pipe.lpos(keys.rq_queue(arg), j)
        for (j, kind, _arg), res in zip(checks, pipe.execute(), strict=True):
            if (kind == "alive" and not res) or (kind == "inqueue" and res is None):
                lost.append(j)
    return lost


def _requeue(
    ctx: Context,
    session: Session,
    by_prio: dict[str, list[str]],
    batch_size: int,
    now: float,
    from_status: list[str],
    shard: int = 0,
) -> int:
    count = 0
    for prio, nids in by_prio.items():
        for i in range(0, len(nids), batch_size):
            chunk = nids[i : i + batch_size]
            job_id = "job_" + new_id("r")
            with write_lock(ctx.engine):
                # by id, never through the status index (unindexed_in)
                changed = update_where_in(
                    session.connection(),
                    _N,
                    {"status": NotificationStatus.queued, "job_id": job_id, "due_at": _naive(now)},
                    "id",
                    chunk,
                    "AND " + unindexed_in("status", from_status),
                )
                session.commit()
            if changed:
                enqueue(ctx, prio, chunk, job_id, as_of=now, shard=shard)
                count += len(chunk)
    return count
