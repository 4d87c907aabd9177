"""Nothing accepted is lost: the reconciler finds work whose job vanished, and recovery never
sends twice."""

from __future__ import annotations

import time
from datetime import UTC

from notifyctl.context import Context
from tests.util import deliveries, drain, events, notification, queue_depths, seed, send
from worker.claims import Claims
from worker.pool import queue_sets
from worker.providers.outbox import read_outbox
from worker.reconciler import reconcile


def test_notification_whose_enqueue_never_happened_is_recovered(ctx: Context) -> None:
    """The CLI died after the SQL commit and before the enqueue: the row has no job behind it."""
    seed(ctx)
    res = send(ctx, channels=["email"])
    job_id = notification(ctx, res.notification_id).job_id
    ctx.redis.delete(ctx.queue("normal").key, f"rq:job:{job_id}")
    assert reconcile(ctx, force=True).recovered == 0  # still within the grace period
    out = reconcile(ctx, now=time.time() + 2, force=True)
    assert out.recovered == 1 and queue_depths(ctx)["normal"] == 1
    drain(ctx)
    assert [d.status for d in deliveries(ctx, res.notification_id)] == ["sent"]
    assert len(read_outbox(ctx.settings.outbox_dir)) == 1


def test_job_popped_by_a_worker_that_died_is_recovered(ctx: Context) -> None:
    """A worker on several queues pops with LPOP; killed before it registers the job, the job is in no list."""
    seed(ctx)
    res = send(ctx, channels=["sms"], recipient_id="dave")
    assert ctx.redis.lpop(ctx.queue("normal").key) is not None
    out = reconcile(ctx, now=time.time() + 2, force=True)
    assert out.recovered == 1
    drain(ctx)
    assert [d.status for d in deliveries(ctx, res.notification_id)] == ["sent"]


def test_job_started_by_a_dead_worker_is_recovered_and_sent_once(ctx: Context) -> None:
    seed(ctx)
    res = send(ctx, channels=["email"])
    job_id = notification(ctx, res.notification_id).job_id
    # As RQ leaves a job whose worker was killed -9: popped, marked started, worker gone.
    ctx.redis.lpop(ctx.queue("normal").key)
    ctx.redis.hset(f"rq:job:{job_id}", mapping={"status": "started", "worker_name": "dead-worker"})
    assert reconcile(ctx, now=time.time() + 2, force=True).recovered == 1
    drain(ctx)
    assert [d.status for d in deliveries(ctx, res.notification_id)] == ["sent"]


def test_job_of_a_live_worker_is_left_alone(ctx: Context) -> None:
    seed(ctx)
    res = send(ctx, channels=["email"])
    job_id = notification(ctx, res.notification_id).job_id
    ctx.redis.lpop(ctx.queue("normal").key)
    ctx.redis.hset(f"rq:job:{job_id}", mapping={"status": "started", "worker_name": "busy-worker"})
    ctx.redis.set("notif:alive:busy-worker", "1", ex=10)
    assert reconcile(ctx, now=time.time() + 2, force=True).recovered == 0
    # waiting jobs in their queue are not touched either
    res2 = send(ctx, channels=["email"], recipient_id="bob")
    assert reconcile(ctx, now=time.time() + 2, force=True).recovered == 0
    assert queue_depths(ctx)["normal"] == 1
    assert notification(ctx, res2.notification_id).status == "queued"


def test_lease_of_a_dead_worker_is_taken_over_once_expired(ctx: Context) -> None:
    """A worker killed mid-send leaves its lease; another takes it once the lease has run out
    (not when the holder's liveness key goes: a live but cut-off holder may still be sending)."""
    from worker.claims import Claims
    from worker.pipeline import Runtime, process

    seed(ctx)
    res = send(ctx, channels=["email"])
    rt = Runtime(ctx, "w2")
    process(rt, [res.notification_id])  # creates the delivery row and sends it
    rt.close()
    d = deliveries(ctx, res.notification_id)[0]
    live = Claims(ctx.redis, "w-live", 0.2, 60)
    ctx.redis.delete(f"notif:sent:{d.id}")
    assert live.take([d.id]) == ["ok"]
    live.close()  # dies: no more renewals
    other = Claims(ctx.redis, "w-other", 60, 60)
    assert other.take([d.id]) == ["busy"]
    time.sleep(0.3)
    assert other.take([d.id]) == ["ok"]
    other.close()


def test_reconciler_runs_one_at_a_time(ctx: Context) -> None:
    assert not reconcile(ctx).skipped_locked
    assert reconcile(ctx).skipped_locked


def test_pool_dedicates_a_worker_to_high() -> None:
    assert queue_sets(["high", "normal", "low"], 1) == [["high", "normal", "low"]]
    assert queue_sets(["low", "high", "normal"], 3) == [["high"], ["high", "normal", "low"], ["high", "normal", "low"]]
    assert queue_sets(["low"], 2) == [["low"], ["low"]]


def test_reconciler_wakes_a_done_notification_with_an_open_delivery(ctx: Context) -> None:
    """A DLQ replay racing a job: the job marks the notification done after the replay reopened a delivery."""
    from sqlalchemy import update
    from sqlmodel import Session

    from notifyctl.models import Delivery

    seed(ctx)
    res = send(ctx, channels=["email"])
    drain(ctx)
    (d,) = deliveries(ctx, res.notification_id)
    ctx.redis.delete(f"notif:sent:{d.id}")
    with Session(ctx.engine) as s:  # the delivery reopened, the notification left 'done'
        s.execute(update(Delivery).where(Delivery.id == d.id).values(status="retrying", next_attempt_at=None))
        s.commit()
    out = reconcile(ctx, force=True)
    assert out.orphans_woken == 1
    assert notification(ctx, res.notification_id).status == "retrying"
    assert reconcile(ctx, force=True).retries_queued == 1
    drain(ctx)
    assert deliveries(ctx, res.notification_id)[0].status == "sent"
    assert len(read_outbox(ctx.settings.outbox_dir)) == 2  # sent again only because its send record was removed


def _reopen_with_lease(ctx: Context, holder: str, ttl: float) -> tuple[str, str, Claims, float]:
    """An email sent once, then put back as a recovered job finds it: delivery and notification
    queued, no send record, and ``holder``'s lease on it in flight (phase f). Returns the
    notification id, the delivery id, the holder's Claims and the time before the lease was set."""
    from sqlalchemy import update
    from sqlmodel import Session

    from notifyctl.models import Delivery, Notification

    seed(ctx)
    res = send(ctx, channels=["email"])
    drain(ctx)
    (d,) = deliveries(ctx, res.notification_id)
    ctx.redis.delete(f"notif:sent:{d.id}")
    with Session(ctx.engine) as s:
        s.execute(update(Delivery).where(Delivery.id == d.id).values(status="queued", next_attempt_at=None))
        s.execute(update(Notification).where(Notification.id == res.notification_id).values(status="queued"))
        s.commit()
    claims = Claims(ctx.redis, holder, ttl, 60)
    before = time.time()
    assert claims.take([d.id]) == ["ok"] and claims.fence([d.id]) == [True]
    return res.notification_id, d.id, claims, before


def _due(ctx: Context, nid: str) -> float:
    due = notification(ctx, nid).due_at
    return (due if due.tzinfo else due.replace(tzinfo=UTC)).timestamp()


def test_delivery_held_by_a_killed_worker_is_due_again_when_its_lease_runs_out(ctx: Context) -> None:
    """The reconciler requeues a dead worker's job once its liveness key has gone, which can be
    before its lease runs out: the job finds the delivery busy. The notification is then due again
    at the lease's expiry (the reconciler's due pass, every round) — not at the next search for
    lost work after the grace — and taken over then, never earlier, in doubt."""
    from worker.pipeline import Runtime, process

    ttl = 1.5
    nid, did, dead, before = _reopen_with_lease(ctx, "w-killed", ttl)
    dead.close()  # killed: no more renewals; the lease runs out on its own
    rt = Runtime(ctx, "w2")
    try:
        stats = process(rt, [nid])  # the recovered job, while the lease still holds
        after = time.time()
        assert stats.skipped == 1 and len(read_outbox(ctx.settings.outbox_dir)) == 1
        n = notification(ctx, nid)
        assert n.status == "retrying" and n.job_id is None
        due = _due(ctx, nid)
        assert before + ttl <= due <= after + ttl + 1  # at the lease's expiry, not before it
        assert reconcile(ctx, now=due - 0.05, force=True).retries_queued == 0
        while time.time() < due:
            time.sleep(0.05)
        assert reconcile(ctx, force=True).retries_queued == 1
    finally:
        rt.close()
    drain(ctx)
    assert deliveries(ctx, nid)[0].status == "sent"
    assert len(read_outbox(ctx.settings.outbox_dir)) == 2  # its holder may have sent it: sent again,
    assert "in_doubt" in [s for _d, s in events(ctx, nid)]  # and recorded as such
    assert ctx.redis.get(f"notif:sent:{did}").startswith(b"sent:")


def test_delivery_held_by_a_live_worker_waits_while_its_lease_is_renewed(ctx: Context) -> None:
    """Fencing is unchanged: a holder that keeps renewing is never overtaken, however often the
    notification comes due again."""
    from worker.pipeline import Runtime, process

    nid, did, live, _before = _reopen_with_lease(ctx, "w-live", 0.6)
    rt = Runtime(ctx, "w2")
    try:
        for _ in range(2):
            process(rt, [nid])
            assert notification(ctx, nid).status == "retrying"
            due = _due(ctx, nid)
            while time.time() < due:
                time.sleep(0.05)
            assert reconcile(ctx, force=True).retries_queued == 1
            drain(ctx)  # the requeued job: the lease is still the live holder's
            assert len(read_outbox(ctx.settings.outbox_dir)) == 1
        assert live.renewals > 0
    finally:
        rt.close()
        live.close()


def test_high_priority_lost_job_is_found_behind_a_backlog(ctx: Context) -> None:
    """A campaign's backlog (queued, older than the OTP, more than the search takes per round) must
    not hide a dead worker's OTP: high priority is searched on its own, every round."""
    seed(ctx)
    backlog = [send(ctx, channels=["email"], recipient_id=u) for u in ("alice", "bob", "carol")]
    jobs = {r.notification_id: notification(ctx, r.notification_id).job_id for r in backlog}
    otp = send(ctx, channels=["email"], priority="high")
    job_id = notification(ctx, otp.notification_id).job_id
    ctx.redis.lrem(ctx.queue("high").key, 0, job_id)
    ctx.redis.hset(f"rq:job:{job_id}", mapping={"status": "started", "worker_name": "killed-worker"})
    later = time.time() + 2
    out = reconcile(ctx, now=later, limit=2, force=True, check_lost=False)  # a round between full searches
    assert out.recovered == 1 and out.checked_jobs == 1
    assert notification(ctx, otp.notification_id).job_id != job_id
    assert {n: notification(ctx, n).job_id for n in jobs} == jobs  # the backlog, alive in its queue, untouched
    drain(ctx)
    assert [d.status for d in deliveries(ctx, otp.notification_id)] == ["sent"]


def test_a_lost_pass_over_more_jobs_than_one_chunk(any_db_ctx: Context) -> None:
    """More lost jobs than one chunk of job ids (900: SQLite's bound-parameter limit before 3.32),
    and rows that never had a job: the lost pass reads the backlog's jobs, then the lost jobs' rows,
    and queues every notification again once; a job alive in its queue keeps its rows."""
    from datetime import timedelta

    from sqlalchemy import insert, select
    from sqlmodel import Session

    from notifyctl.models import Notification, utcnow

    ctx = any_db_ctx
    old = utcnow() - timedelta(minutes=5)
    rows = [
        {"id": f"n_{i:04d}", "recipient_id": f"u{i}", "type": "t", "template_id": "t", "category": "marketing",
         "priority": "low", "channels": ["email"], "data": {}, "status": "queued",
         "job_id": None if i % 100 == 0 else f"job_gone_{i}", "due_at": old, "created_at": old, "updated_at": old}
        for i in range(1900)
    ]  # fmt: skip
    rows[1]["job_id"] = "job_alive"
    ctx.redis.hset("rq:job:job_alive", mapping={"status": "queued", "origin": ctx.queue("low").name})
    ctx.redis.rpush(ctx.queue("low").key, "job_alive")
    with ctx.engine.begin() as conn:
        conn.execute(insert(Notification.__table__), rows)  # type: ignore[attr-defined]
    out = reconcile(ctx, force=True)
    assert (out.recovered, out.checked_jobs) == (1899, 1900 - 19), out
    with Session(ctx.engine) as s:
        jobs = dict(s.execute(select(Notification.id, Notification.job_id)).tuples().all())
    assert jobs["n_0001"] == "job_alive"
    assert not any(j is None or j.startswith("job_gone") for n, j in jobs.items() if n != "n_0001")
    again = reconcile(ctx, force=True)
    assert again.recovered == 0
