"""RQ's record of a job's start and end, as the pool's worker class (``worker.pool._worker_class``)
sends them: the start in one transaction where RQ sends two, the end in one transaction without the
WATCH of the job's dependents that RQ sends before it (a round trip of its own; notifyctl enqueues
no dependent job) and with the worker's state back to idle (RQ: a round trip after it). Watched with
Redis's MONITOR: what RQ wrote at a job's start and end is all there — status, counts, heartbeats,
the registries, the execution made and gone."""

from __future__ import annotations

import threading

import redis
from rq.job import Job, JobStatus
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.serializers import PickleSerializer, resolve_serializer

from notifyctl import keys
from notifyctl.context import Context, rq_serializer
from notifyctl.intake import JOB_FUNC
from tests.util import deliveries, seed, send
from worker import jobs
from worker.pool import _queue_class, _worker_class


def _monitor(ctx: Context, into: list[str], ready: threading.Event, stop: threading.Event) -> None:
    client = redis.Redis(connection_pool=ctx.redis.connection_pool)
    with client.monitor() as m:
        ready.set()
        for event in m.listen():
            if stop.is_set() or event["command"] == "ECHO rq-job-end-done":
                return
            if event.get("client_type") != "lua":  # (commands run by scripts are not round trips)
                into.append(event["command"])


def test_a_job_start_and_end_are_one_transaction_each_without_a_watch(ctx: Context) -> None:
    seed(ctx)
    otps = [
        send(ctx, template_id="otp_code", channels=["sms"], recipient_id=u, data={"code": f"{i:06d}", "minutes": 5})
        for i, u in enumerate(["alice", "bob", "carol"])
    ]
    job_ids = [f"job_{r.notification_id}" for r in otps]
    qc = _queue_class()
    q = qc(keys.queue_name("high"), connection=ctx.redis)
    w = _worker_class(1)([q], connection=ctx.redis, name="end", queue_class=qc)
    seen: list[str] = []
    ready, stop = threading.Event(), threading.Event()
    mon = threading.Thread(target=_monitor, args=(ctx, seen, ready, stop), daemon=True)
    mon.start()
    assert ready.wait(10)
    jobs.configure(ctx, worker_name="end")
    try:
        assert w.work(burst=True, logging_level="WARNING")
    finally:
        jobs.close()
        ctx.redis.echo("rq-job-end-done")  # the monitor stops there: every command before it was read
        mon.join(10)
        stop.set()
    assert [d.status for r in otps for d in deliveries(ctx, r.notification_id)] == ["sent"] * 3
    assert not [c for c in seen if c.startswith("WATCH")], seen
    worker_key = w.key

    def block_of(i: int) -> list[str]:  # the MULTI ... EXEC around seen[i]
        start = max(j for j in range(i + 1) if seen[j] == "MULTI")
        return seen[start : seen.index("EXEC", i) + 1]

    for job_id in job_ids:
        job_key = keys.rq_job(job_id)
        # the start: one transaction, the execution's record and the job's status together
        made = next(i for i, c in enumerate(seen) if c.startswith(f"HSET rq:execution:{job_id}:"))
        block = block_of(made)
        assert f"HSET {worker_key} state busy" in block, block
        assert any(c.startswith(f"ZADD rq:wip:{q.name} ") and job_id in c for c in block), block
        assert any(c.startswith(f"HSET {job_key} ") and " status started " in c for c in block), block
        assert f"HSET {worker_key} last_heartbeat" in " ".join(block), block
        assert f"PERSIST {job_key}" in block, block
        assert f"LREM {q.intermediate_queue_key} 1 {job_id}" in block, block
        assert sum(1 for c in seen if c.startswith(f"HSET {job_key} ") and " status started " in c) == 1
        end_at = seen.index(f"HSET {job_key} status finished")
        start = max(i for i in range(end_at) if seen[i] == "MULTI")
        end = seen.index("EXEC", end_at)
        block = seen[start:end]
        assert f"HINCRBY {worker_key} successful_job_count 1" in block, block
        assert any(c.startswith(f"XADD rq:results:{job_id} ") for c in block), block  # the result, kept 300 s
        assert f"ZADD rq:finished:{q.name} " in " ".join(block), block
        assert any(c.startswith(f"DEL rq:execution:{job_id}:") for c in block), block
        assert any(c.startswith(f"ZREM rq:wip:{q.name} {job_id}:") for c in block), block
        assert f"HSET {worker_key} state idle" in block, block  # the worker idle again, in the same transaction
        # the job's times, not all of it again (its arguments were written when it was queued)
        ended = [c for c in block if c.startswith(f"HSET {job_key} ") and " status " not in c]
        assert len(ended) == 1 and " ended_at " in ended[0] and " data " not in ended[0], block
        job = Job.fetch(job_id, connection=ctx.redis)
        assert job.get_status() == JobStatus.FINISHED
        assert 0 < ctx.redis.ttl(job_key) <= 300
        assert job.ended_at is not None and job.worker_name == "end"
        assert job.started_at is not None and job.enqueued_at is not None
        assert job.enqueued_at <= job.started_at <= job.ended_at
        assert job.func_name == JOB_FUNC and job.args == ([job_id.removeprefix("job_")],) and job.origin == q.name
        assert job.latest_result() is not None and job.latest_result().return_value["sent"] == 1
    assert sorted(FinishedJobRegistry(q.name, connection=ctx.redis).get_job_ids()) == sorted(job_ids)
    assert StartedJobRegistry(q.name, connection=ctx.redis).get_job_ids() == []
    assert int(ctx.redis.hget(worker_key, "successful_job_count") or 0) == 3
    # the worker's state set on its own (a round trip) only before its first dequeue ("started" to
    # "idle"), never between two jobs
    alone: list[str] = []
    in_block = False
    for c in seen:
        in_block = (in_block or c == "MULTI") and c != "EXEC"
        if not in_block and c.startswith(f"HSET {worker_key} state "):
            alone.append(c)
    assert alone == [f"HSET {worker_key} state started", f"HSET {worker_key} state idle"], alone
    assert not ctx.redis.smembers(f"{worker_key}:executions")


def test_jobs_use_rqs_pickle_through_a_serializer_rq_checks_faster(ctx: Context) -> None:
    """``notifyctl.context.rq_serializer``: what the intake queues, the pool's queues and workers
    use; the same bytes as RQ's own pickle serializer, so a job queued by either runs with the other."""
    seed(ctx)
    r = send(ctx, template_id="otp_code", channels=["sms"], recipient_id="alice", data={"code": "123456", "minutes": 5})
    ours = rq_serializer()
    assert resolve_serializer(ours) is ours
    assert ctx.queue("high").serializer is ours
    plain = Job.fetch(f"job_{r.notification_id}", connection=ctx.redis)  # RQ's own serializer reads it
    assert plain.func_name == JOB_FUNC and plain.args == ([r.notification_id],)
    for value in (plain.args, {"as_of": 1.5}, {"notifications": 1, "by_reason": {"x": 2}}):
        assert ours.dumps(value) == PickleSerializer.dumps(value)
        assert ours.loads(PickleSerializer.dumps(value)) == value
    qc = _queue_class()
    q = qc(keys.queue_name("high"), connection=ctx.redis)
    assert q.serializer is ours
    w = _worker_class(1)([q], connection=ctx.redis, name="pickle", queue_class=qc)
    assert w.serializer is ours
    jobs.configure(ctx, worker_name="pickle")
    try:
        assert w.work(burst=True, logging_level="WARNING")
    finally:
        jobs.close()
    assert [d.status for d in deliveries(ctx, r.notification_id)] == ["sent"]
