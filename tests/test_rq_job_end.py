"""RQ's record of a job's end, as the pool's worker class (``worker.pool._worker_class``) sends it:
one transaction without the WATCH of the job's dependents that RQ sends before it (a round trip of
its own; notifyctl enqueues no dependent job). Watched with Redis's MONITOR: what RQ wrote at a
job's end is all there — status, counts, the registries, the execution gone."""

from __future__ import annotations

import threading

import redis
from rq.job import Job, JobStatus
from rq.registry import FinishedJobRegistry, StartedJobRegistry

from notifyctl import keys
from notifyctl.context import Context
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


def test_a_job_end_is_one_transaction_without_a_watch(ctx: Context) -> None:
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
    for job_id in job_ids:
        job_key = keys.rq_job(job_id)
        end_at = seen.index(f"HSET {job_key} status finished")
        start = max(i for i in range(end_at) if seen[i] == "MULTI")
        end = seen.index("EXEC", end_at)
        block = seen[start:end]
        assert f"HINCRBY {worker_key} successful_job_count 1" in block, block
        assert any(c.startswith(f"XADD rq:results:{job_id} ") for c in block), block  # the result, kept 300 s
        assert f"ZADD rq:finished:{q.name} " in " ".join(block), block
        assert any(c.startswith(f"DEL rq:execution:{job_id}:") for c in block), block
        assert any(c.startswith(f"ZREM rq:wip:{q.name} {job_id}:") for c in block), block
        job = Job.fetch(job_id, connection=ctx.redis)
        assert job.get_status() == JobStatus.FINISHED
        assert 0 < ctx.redis.ttl(job_key) <= 300
        assert job.ended_at is not None and job.worker_name == "end"
    assert sorted(FinishedJobRegistry(q.name, connection=ctx.redis).get_job_ids()) == sorted(job_ids)
    assert StartedJobRegistry(q.name, connection=ctx.redis).get_job_ids() == []
    assert int(ctx.redis.hget(worker_key, "successful_job_count") or 0) == 3
    assert not ctx.redis.smembers(f"{worker_key}:executions")
