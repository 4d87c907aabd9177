"""RQ's bookkeeping around each job, as the pool's worker class (``worker.pool._worker_class``)
sends it: the execution record and the job's start in one transaction, and the worker's "idle" in
the transaction that records the job's end (RQ sent each in a round trip of its own: an OTP's job
paid two round trips more). Watched with Redis's MONITOR: what RQ wrote is all there, and where."""

from __future__ import annotations

import threading

import redis
from rq import Queue
from rq.job import Job, JobStatus

from notifyctl import keys
from notifyctl.context import Context
from tests.util import deliveries, seed, send
from worker import jobs
from worker.pool import _queue_class, _worker_class


def _transactions(commands: list[str]) -> tuple[list[list[str]], list[str]]:
    """The MULTI ... EXEC blocks of ``commands`` (each a list of its commands) and the commands
    sent outside any."""
    blocks: list[list[str]] = []
    alone: list[str] = []
    block: list[str] | None = None
    for c in commands:
        if c == "MULTI":
            block = []
        elif c == "EXEC":
            assert block is not None
            blocks.append(block)
            block = None
        elif block is not None:
            block.append(c)
        else:
            alone.append(c)
    return blocks, alone


END = "ECHO rq-round-trips-end"  # sent once the worker is done: everything before it has been seen


def _monitor(ctx: Context, into: list[str], ready: threading.Event) -> None:
    client = redis.Redis(connection_pool=ctx.redis.connection_pool)
    with client.monitor() as m:
        ready.set()
        for event in m.listen():
            if event["command"] == END:
                return
            if event.get("client_type") != "lua":  # (commands run by scripts are not round trips)
                into.append(event["command"])


def test_a_job_start_is_one_transaction_and_idle_goes_with_its_end(ctx: Context) -> None:
    seed(ctx)
    otps = [
        send(ctx, template_id="otp_code", channels=["sms"], recipient_id=u, data={"code": f"{i:06d}", "minutes": 5})
        for i, u in enumerate(["alice", "bob", "carol"])
    ]
    job_ids = [f"job_{r.notification_id}" for r in otps]
    qc = _queue_class()
    w = _worker_class(1)(
        [qc(keys.queue_name("high"), connection=ctx.redis)], connection=ctx.redis, name="rt", queue_class=qc
    )
    w.burst_mode = True
    seen: list[str] = []
    ready = threading.Event()
    mon = threading.Thread(target=_monitor, args=(ctx, seen, ready), daemon=True)
    mon.start()
    assert ready.wait(10)
    jobs.configure(ctx, worker_name="rt")
    try:
        assert w.work(burst=True, logging_level="WARNING")
    finally:
        jobs.close()
        ctx.redis.echo(END.split()[1])
        mon.join(10)
    assert not mon.is_alive()
    assert [d.status for r in otps for d in deliveries(ctx, r.notification_id)] == ["sent"] * 3
    blocks, alone = _transactions(seen)
    worker_key = w.key
    for job_id in job_ids:
        job_key = keys.rq_job(job_id)
        # one transaction: the execution record, "busy", the heartbeats, "started", off the intermediate queue
        (start,) = [b for b in blocks if any(c.startswith(f"HSET {job_key} ") and "status started" in c for c in b)]
        assert any(c.startswith(f"HSET rq:execution:{job_id}:") for c in start), start
        assert f"HSET {worker_key} state busy" in start, start
        assert any(c.startswith("LREM ") and c.endswith(f" {job_id}") for c in start), start
        # the job's end and "idle", together
        (end,) = [b for b in blocks if f"HSET {job_key} status finished" in b]
        assert f"HSET {worker_key} state idle" in end, end
        assert Job.fetch(job_id, connection=ctx.redis).get_status() == JobStatus.FINISHED
    # no state written in a round trip of its own between the jobs: only RQ's at start-up
    states = [c.split()[-1] for c in alone if c.startswith(f"HSET {worker_key} state ")]
    assert states == ["started", "idle"], alone
    # nor an execution record
    assert not [c for c in alone if c.startswith("HSET rq:execution:")], alone
    assert not ctx.redis.llen(Queue(keys.queue_name("high"), connection=ctx.redis).intermediate_queue_key)
