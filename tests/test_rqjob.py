"""A job's data as notifyctl stores it (``notifyctl.rqjob.NotifyJob``): compressed once, at zlib's
fastest level, when the job is made; the worker that finishes it writes back the bytes it read,
compressing nothing; RQ reads it whatever the level. Real Redis, the pool's worker class."""

from __future__ import annotations

import pickle
import zlib
from typing import Any

import pytest
from rq.job import Job, JobStatus

from notifyctl import keys
from notifyctl.context import Context
from notifyctl.intake import JOB_FUNC, enqueue
from notifyctl.rqjob import NotifyJob
from tests.util import deliveries, seed, send
from worker import jobs
from worker.pool import _queue_class, _worker_class

_LEVEL_1 = b"\x78\x01"  # a zlib stream's header at level 1 (level 6, zlib's default: 78 9c)


def _compressions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of what zlib compresses from now on, in this process (RQ's and ours)."""
    sizes: list[int] = []
    real = zlib.compress

    def counted(data: Any, *args: Any, **kwargs: Any) -> bytes:
        sizes.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(zlib, "compress", counted)
    return sizes


def test_a_job_is_stored_at_level_1_and_finished_without_compressing_again(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(ctx)
    otps = [
        send(ctx, template_id="otp_code", channels=["sms"], recipient_id=u, data={"code": f"{i:06d}", "minutes": 5})
        for i, u in enumerate(["alice", "bob"])
    ]
    job_ids = [f"job_{r.notification_id}" for r in otps]
    stored = {j: ctx.redis.hget(keys.rq_job(j), "data") for j in job_ids}
    for j, data in stored.items():
        assert data is not None and data[:2] == _LEVEL_1, data
        func, _instance, args, _kwargs = pickle.loads(zlib.decompress(data))
        assert func == JOB_FUNC and args == ([j.removeprefix("job_")],), (func, args)
    qc = _queue_class()
    w = _worker_class(1)([qc(keys.queue_name("high"), connection=ctx.redis)], connection=ctx.redis, name="z", queue_class=qc)  # fmt: skip
    compressed = _compressions(monkeypatch)
    jobs.configure(ctx, worker_name="z")
    try:
        assert w.work(burst=True, logging_level="WARNING")
    finally:
        jobs.close()
    assert [d.status for r in otps for d in deliveries(ctx, r.notification_id)] == ["sent"] * 2
    for j in job_ids:
        assert Job.fetch(j, connection=ctx.redis).get_status() == JobStatus.FINISHED
        assert ctx.redis.hget(keys.rq_job(j), "data") == stored[j]  # the bytes it was stored as
    # RQ's own save at the job's end compressed the data again (level 6): now nothing but empty input
    assert [n for n in compressed if n] == [], compressed


def test_a_bulk_job_enqueued_reads_back_as_made(ctx: Context) -> None:
    ids = [f"n_{i:020d}" for i in range(1000)]
    enqueue(ctx, "low", ids, "job_bulk", as_of=12.5)
    data = ctx.redis.hget(keys.rq_job("job_bulk"), "data")
    assert data is not None and data[:2] == _LEVEL_1
    job = Job.fetch("job_bulk", connection=ctx.redis)  # RQ's own class reads it
    assert job.args == (ids,) and job.kwargs == {"as_of": 12.5}


def test_changed_data_is_compressed_anew(ctx: Context) -> None:
    job = NotifyJob.create(JOB_FUNC, args=(["a"],), connection=ctx.redis, id="job_x")
    first = job.to_dict()["data"]
    assert job.to_dict()["data"] is first  # made once
    job.args = (["b", "c"],)
    again = job.to_dict()["data"]
    assert again[:2] == _LEVEL_1 and pickle.loads(zlib.decompress(again))[2] == (["b", "c"],)
    job.save()
    read = NotifyJob.fetch("job_x", connection=ctx.redis)
    assert read.args == (["b", "c"],)
    assert read.to_dict()["data"] == again  # kept from Redis, not compressed again
