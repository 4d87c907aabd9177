"""Liveness that tells the truth (issue 18): names unique across hosts, no worker deletes another's
key, and ``status`` lists the live workers per host from notifyctl's own keys, never dead ones."""

from __future__ import annotations

import json
import time

import redis
from rq import Worker

from notifyctl import keys
from notifyctl.context import Context
from notifyctl.liveness import Liveness, live_workers, unique_worker_name
from tests.conftest import invoke_cli
from worker.status import status_report


def test_names_differ_with_equal_hostnames_and_pids() -> None:
    names = {unique_worker_name("notify-web-1") for _ in range(50)}
    assert len(names) == 50


def test_a_worker_never_deletes_another_workers_key(rclient: redis.Redis) -> None:
    mine = Liveness(rclient, "notify-web-1-0", 10, host="a")
    theirs = Liveness(rclient, "notify-web-1-0", 10, host="b")  # the same name, another host
    mine.beat()
    theirs.beat()
    assert mine.clear() is False
    assert rclient.exists(keys.alive("notify-web-1-0")) == 1
    assert theirs.clear() is True
    assert rclient.exists(keys.alive("notify-web-1-0")) == 0


def test_status_lists_live_workers_per_host_and_no_dead_one(ctx: Context) -> None:
    r = ctx.redis
    Liveness(r, "w-a1", 10, ["notify-high"], host="host-a").beat()
    Liveness(r, "w-a2", 10, ["notify-normal"], host="host-a").beat()
    Liveness(r, "w-b1", 1, ["notify-low"], host="host-b").beat()
    # a worker killed -9: RQ still lists it, its liveness key is gone
    Worker([ctx.queue("normal")], connection=r, name="w-dead").register_birth()
    assert "w-dead" in {w.name for w in Worker.all(connection=r)}
    rep = status_report(ctx)
    assert [(w["host"], w["name"]) for w in rep["workers"]] == [
        ("host-a", "w-a1"),
        ("host-a", "w-a2"),
        ("host-b", "w-b1"),
    ]
    assert rep["hosts"] == ["host-a", "host-b"]
    deadline = time.monotonic() + 10
    while r.exists(keys.alive("w-b1")) and time.monotonic() < deadline:  # its 1 s TTL runs out
        time.sleep(0.05)
    assert [w["name"] for w in live_workers(r)] == ["w-a1", "w-a2"]
    out = invoke_cli(ctx.settings, "status", "--json")
    assert out.returncode == 0, out.stderr
    assert [w["host"] for w in json.loads(out.stdout)["workers"]] == ["host-a", "host-a"]


def test_status_shows_the_job_a_live_worker_runs(ctx: Context) -> None:
    from notifyctl.liveness import running_key

    Liveness(ctx.redis, "w-busy", 10, ["notify-low"], host="host-a").beat()
    ctx.redis.sadd(running_key("w-busy"), "job_r123:exec1")  # as RQ 2 records a running job
    (w,) = status_report(ctx)["workers"]
    assert w["current_job"] == "job_r123"
