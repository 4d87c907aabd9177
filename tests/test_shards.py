"""Sharding by user over several Redis servers (issue 18, item 5): each user's keys, queues and jobs
on one shard; workers serving shards; the reconciler's rounds split per shard; the shard list
checked against the shared database. Two real redis-server processes: the session's and one this
module starts."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from pydantic import ValidationError
from rq.job import Job
from sqlalchemy import event, select
from sqlmodel import Session

from campaigns.launcher import LaunchSpec, launch
from notifyctl import keys
from notifyctl.context import Context
from notifyctl.db import dispose_all
from notifyctl.directory import import_users
from notifyctl.errors import ConfigError
from notifyctl.liveness import Liveness
from notifyctl.metrics import render
from notifyctl.models import Notification
from notifyctl.redisconn import RedisUnreachable, ensure_server, stop_server
from notifyctl.settings import Settings
from notifyctl.shards import check, parse_list, reset, shard_of, split
from tests.conftest import ROOT, cli_env, invoke_cli, make_settings, start_pool, stop_pool
from tests.net import ClosedPort, ServeProcess
from tests.util import ApiServer, deliveries, drain, seed, send, wait_for
from worker.pool import Pool, worker_plan
from worker.providers.outbox import read_outbox
from worker.reconciler import reconcile
from worker.status import status_report

# with two shards (crc32 mod 2): alice and carol on shard 1, bob and dave on shard 0
SHARD_OF = {"alice": 1, "bob": 0, "carol": 1, "dave": 0}


@pytest.fixture(scope="module")
def redis_url2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("redis-shard1")
    url = ensure_server(d)
    yield url
    stop_server(d)


@pytest.fixture
def shard_urls(redis_url: str, redis_url2: str, rclient: redis.Redis) -> Iterator[list[str]]:
    r2 = redis.Redis.from_url(redis_url2)
    r2.flushall()
    r2.close()
    yield [redis_url, redis_url2]


@pytest.fixture
def sctx(home: Path, shard_urls: list[str]) -> Iterator[Context]:
    c = Context(make_settings(home, shard_urls[0], redis_shards=shard_urls))
    yield c
    c.close()
    dispose_all()


def user_keys(r: redis.Redis) -> set[str]:
    return {k.decode() for k in r.scan_iter(count=1000)}


def test_a_users_shard_is_crc32_of_its_id_and_spreads_evenly() -> None:
    assert all(shard_of(u, 2) == s for u, s in SHARD_OF.items())
    assert shard_of("alice", 4) == zlib.crc32(b"alice") % 4 == 3
    assert shard_of("alice", 1) == 0 and shard_of("ünï", 3) == zlib.crc32("ünï".encode()) % 3
    counts = Counter(shard_of(f"user-{i}", 4) for i in range(40_000))
    assert sorted(counts) == [0, 1, 2, 3] and all(9_000 < c < 11_000 for c in counts.values()), counts
    groups = split(["alice", "bob", "carol", "dave"], str, 2)
    assert groups == {1: ["alice", "carol"], 0: ["bob", "dave"]}
    assert split(["a", "b"], str, 1) == {0: ["a", "b"]}
    assert parse_list("1, 0,1", 2) == [1, 0]
    for bad in ("2", "x", ""):
        with pytest.raises(ValueError):
            parse_list(bad, 2)


def test_the_shard_setting(home: Path) -> None:
    env = {"NOTIFY_HOME": str(home), "NOTIFY_REDIS_SHARDS": '["redis://a:6379/0", "redis://b:6379/0"]'}
    s = Settings.from_environ(env)
    assert s.redis_shards == ["redis://a:6379/0", "redis://b:6379/0"] and Context(s).shard_count == 2
    assert Context(Settings.from_environ({"NOTIFY_HOME": str(home)})).shard_count == 1
    # NOTIFY_REDIS_URL is shard 0: unset, or the first of the list
    Settings.from_environ({**env, "NOTIFY_REDIS_URL": "redis://a:6379/0"})
    for bad in ({"NOTIFY_REDIS_URL": "redis://b:6379/0"}, {"NOTIFY_REDIS_SHARDS": '["redis://a", "redis://a"]'}):
        with pytest.raises(ValidationError, match="redis_url must be unset or the first|given twice"):
            Settings.from_environ({**env, **bad})
    with pytest.raises(ConfigError, match="NOTIFY_REDIS_SHARDS is not JSON"):
        Settings.from_environ({**env, "NOTIFY_REDIS_SHARDS": "redis://a,redis://b"})


def test_each_user_lives_on_its_shard_and_each_notification_is_sent_once(sctx: Context, shard_urls: list[str]) -> None:
    ctx = sctx
    r0, r1 = ctx.shard_redis(0), ctx.shard_redis(1)
    assert r0 is ctx.redis and r1.connection_pool.connection_kwargs["path"] == shard_urls[1].removeprefix("unix://")
    seed(ctx)
    results = {}
    for user in ("alice", "bob", "carol", "dave"):
        res = send(ctx, recipient_id=user, channels=["all"], dedup_key=f"order:{user}", ordering_key="orders")
        assert res.status == "queued", res
        results[user] = res
    # each job on its user's shard, in its queue; the dedup keys and ordering counters there too
    for user, res in results.items():
        r, other = (r1, r0) if SHARD_OF[user] else (r0, r1)
        assert r.exists(keys.rq_job(f"job_{res.notification_id}")) and not other.exists(
            keys.rq_job(f"job_{res.notification_id}")
        )
        assert r.get(keys.dedup(f"order:{user}")) == res.notification_id.encode()
        assert not other.exists(keys.dedup(f"order:{user}"))
    assert r0.llen(keys.rq_queue("notify-normal")) == 2 and r1.llen(keys.rq_queue("notify-normal")) == 2
    # a repeat is answered by its user's shard
    again = send(ctx, recipient_id="alice", channels=["all"], dedup_key="order:alice")
    assert (again.status, again.reason, again.notification_id) == (
        "suppressed",
        "duplicate",
        results["alice"].notification_id,
    )
    # a dedup key holds one notification whoever the recipient: bob's shard has no copy, SQL decides
    other = send(ctx, recipient_id="bob", channels=["all"], dedup_key="order:alice")
    assert (other.status, other.reason, other.notification_id) == (
        "suppressed",
        "duplicate",
        results["alice"].notification_id,
    )

    drain(ctx, reconcile=True)
    ds = deliveries(ctx)
    assert ds and all(d.status in ("sent", "suppressed") for d in ds), [(d.status, d.reason) for d in ds]
    sent = [d for d in ds if d.status == "sent"]
    box = Counter(rec["delivery_id"] for rec in read_outbox(ctx.settings.outbox_dir))
    assert set(box) == {d.id for d in sent} and set(box.values()) == {1}  # each sent once
    owner = {n: u for u, res in results.items() for n in [res.notification_id]}
    # the send records and rate windows of each user only on that user's shard
    k0, k1 = user_keys(r0), user_keys(r1)
    for d in sent:
        user = owner[d.notification_id]
        mine, other = (k1, k0) if SHARD_OF[user] else (k0, k1)
        assert keys.sent(d.id) in mine and keys.sent(d.id) not in other
    for user in results:
        mine, other = (k1, k0) if SHARD_OF[user] else (k0, k1)
        assert any(k.startswith(keys.rate(user, "")) for k in mine)
        assert not any(k.startswith(keys.rate(user, "")) for k in other)
    # what every host shares stays on shard 0: the delivery metrics
    assert keys.METRICS_DELIVERIES in k0 and keys.METRICS_DELIVERIES not in k1


def test_the_reconciler_works_each_shard_under_its_own_lock(sctx: Context) -> None:
    ctx = sctx
    seed(ctx)
    lost = {u: send(ctx, recipient_id=u, channels=["email"]).notification_id for u in ("alice", "bob")}
    r0, r1 = ctx.shard_redis(0), ctx.shard_redis(1)
    for r in (r0, r1):  # as if Redis lost the jobs
        r.flushall()
    later = time.time() + 60
    res = reconcile(ctx, now=later, force=True, shards=[0])
    assert res.recovered == 1 and not res.skipped_locked
    bob = _job_of(ctx, lost["bob"])
    assert r0.exists(keys.rq_job(bob)) and not r1.exists(keys.rq_job(bob))
    assert _job_of(ctx, lost["alice"]) == f"job_{lost['alice']}"  # not this round's shard: untouched
    # shard 1's lock held by another round: its round is skipped, shard 0's goes on
    r1.set(keys.RECONCILE_LOCK, "someone else's", px=10_000)
    res = reconcile(ctx, now=later, shards=[0, 1])
    assert res.recovered == 0 and not res.skipped_locked
    assert _job_of(ctx, lost["alice"]) == f"job_{lost['alice']}"
    r1.delete(keys.RECONCILE_LOCK)
    res = reconcile(ctx, now=later, force=True)  # every shard
    assert res.recovered == 1
    alice = _job_of(ctx, lost["alice"])
    assert r1.exists(keys.rq_job(alice)) and not r0.exists(keys.rq_job(alice))
    assert r1.lrange(keys.rq_queue("notify-normal"), 0, -1) == [alice.encode()]


def test_a_round_reads_sql_once_whatever_the_number_of_shards(sctx: Context) -> None:
    """One round over both shards makes the SQL reads of a one-shard round, not one set per shard,
    and queues each shard's due work on its own shard."""
    ctx = sctx
    seed(ctx)
    due = {u: send(ctx, recipient_id=u, channels=["email"]).notification_id for u in SHARD_OF}
    for s in (0, 1):
        ctx.shard_redis(s).flushall()  # every job lost: each shard's round has work
    selects: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    later = time.time() + 60
    event.listen(ctx.engine, "before_cursor_execute", count)
    try:
        reconcile(ctx, now=later, force=True, shards=[0])
        one = len(selects)
        selects.clear()
        res = reconcile(ctx, now=later, force=True, shards=[0, 1])
        both = len(selects)
    finally:
        event.remove(ctx.engine, "before_cursor_execute", count)
    assert res.recovered == 2 and one > 0
    assert both == one, f"a two-shard round made {both} SELECTs, a one-shard round {one}"
    for user, nid in due.items():
        job = _job_of(ctx, nid)
        assert ctx.shard_redis(SHARD_OF[user]).exists(keys.rq_job(job))
        assert not ctx.shard_redis(1 - SHARD_OF[user]).exists(keys.rq_job(job))


def _job_of(ctx: Context, nid: str) -> str:
    with Session(ctx.engine) as s:
        n = s.get(Notification, nid)
        assert n is not None and n.job_id
        return n.job_id


def test_hosts_must_agree_on_the_shard_list(tmp_path: Path, shard_urls: list[str], db_url: str) -> None:
    def host(name: str, shards: list[str] | None) -> Context:
        h = tmp_path / name
        h.mkdir(mode=0o700)
        return Context(
            make_settings(h, shards[0] if shards else shard_urls[0], database_url=db_url, redis_shards=shards or [])
        )

    single = host("single", None)
    check(single)  # one Redis, nothing recorded: nothing changes
    a = host("a", shard_urls)
    check(a)  # the first sharded host records the layout
    check(host("a2", shard_urls))  # the same list: fine
    for name, shards in (("swapped", shard_urls[::-1]), ("single2", None)):
        with pytest.raises(ConfigError, match="differ from those of the hosts sharing this database"):
            check(host(name, shards))
    assert reset(a.engine)
    check(host("swapped2", shard_urls[::-1]))  # after a drain and a reset, a new layout


def test_the_pool_plan_gives_each_shard_its_workers() -> None:
    qs = ["high", "normal", "low"]
    assert worker_plan(qs, 3, [0]) == [(0, ["high"]), (0, qs), (0, qs)]  # one Redis: as before
    assert worker_plan(qs, 4, [0, 1]) == [(0, ["high"]), (1, ["high"]), (0, qs), (1, qs)]
    assert worker_plan(qs, 3, [0, 1]) == [(0, ["high"]), (1, qs), (0, qs)]
    with pytest.raises(ValueError, match="fewer workers"):
        worker_plan(qs, 1, [0, 1])


def test_a_pool_over_two_shards_sends_each_notification_once(
    sctx: Context, shard_urls: list[str], tmp_path: Path
) -> None:
    """`notifyctl worker --pool 2` over two real Redis servers; OTP-like sends to four users on both."""
    ctx = sctx
    seed(ctx)
    env = cli_env(ctx.settings, NOTIFY_REDIS_SHARDS=json.dumps(shard_urls), NOTIFY_RATE_LIMITS="[]")
    nids = [send(ctx, recipient_id=u, channels=["sms"], data={"order_id": f"O{i}", "tracking_url": "https://t/1"}).notification_id
            for i in range(10) for u in SHARD_OF]  # fmt: skip
    with open(tmp_path / "pool.out", "w") as out:
        pool = start_pool(env, "2", stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                with Session(ctx.engine) as s:
                    left = s.execute(
                        select(Notification.id).where(Notification.id.in_(nids), Notification.status != "done")  # type: ignore[attr-defined]
                    ).all()
                if not left:
                    break
                time.sleep(0.2)
        finally:
            stop_pool(pool)
    log = (tmp_path / "pool.out").read_text()
    assert "on shards 0, 1" in log and "Traceback" not in log, log
    assert not left, f"{len(left)} not done: {log}"
    box = Counter(rec["delivery_id"] for rec in read_outbox(ctx.settings.outbox_dir))
    ds = [d for d in deliveries(ctx) if d.notification_id in set(nids)]
    assert len(ds) == 40 and {d.status for d in ds} == {"sent"}
    assert set(box) == {d.id for d in ds} and set(box.values()) == {1}
    # each worker's jobs came from its own shard: the send records say where each user was served
    for r, users in ((ctx.shard_redis(0), {"bob", "dave"}), (ctx.shard_redis(1), {"alice", "carol"})):
        found = {k.decode().removeprefix(keys.sent("")) for k in r.scan_iter(match=keys.sent("*"))}
        assert found == {d.id for d in ds if _user(ctx, d.notification_id) in users}


def _user(ctx: Context, nid: str) -> str:
    with Session(ctx.engine) as s:
        n = s.get(Notification, nid)
        assert n is not None
        return n.recipient_id


def test_a_worker_refuses_a_shard_that_does_not_exist(sctx: Context, shard_urls: list[str]) -> None:
    env = cli_env(sctx.settings, NOTIFY_REDIS_SHARDS=json.dumps(shard_urls))
    r = subprocess.run(
        [sys.executable, "-m", "notifyctl.cli.main", "worker", "--burst", "--shards", "2"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "--shards: unknown shard '2'" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture
def small_chunks_ctx(home: Path, shard_urls: list[str]) -> Iterator[Context]:
    c = Context(
        make_settings(home, shard_urls[0], redis_shards=shard_urls, batch_size=150, campaign={"chunk_size": 100})
    )
    yield c
    c.close()
    dispose_all()


def test_a_campaign_is_queued_per_shard_and_status_reads_every_shard(small_chunks_ctx: Context, tmp_path: Path) -> None:
    """The launcher splits each chunk's due rows by shard: a job holds one shard's users, on that
    shard; the dry run counts each user's rate windows on that user's shard; `status` adds up the
    queues of both shards and lists the workers of both."""
    ctx = small_chunks_ctx
    users = [f"u{i}" for i in range(200)]
    rep = import_users(ctx, io.StringIO("user_id,email\n" + "".join(f"{u},{u}@example.com\n" for u in users)))
    assert rep.errors == []
    seg = tmp_path / "seg.csv"
    seg.write_text("user_id\n" + "\n".join(users) + "\n")
    # u0 was sent a marketing email today (a window on its shard): the dry run finds it over the limit
    r_u0 = ctx.redis_for("u0")
    rule = next(r for r in ctx.settings.rules if r.applies("email", "marketing"))
    now_ms = int(time.time() * 1000)
    r_u0.zadd(keys.rate("u0", rule.key), {"earlier": now_ms - 1000})
    spec = LaunchSpec(
        "weekly_promo", channels=["email"], segment_csv=str(seg), rate=100_000, data={"discount": 5, "code": "X"}
    )
    dry = launch(ctx, spec, dry_run=True)
    assert dry["per_channel"]["email"]["suppressed"].get("rate_limited") == 1, dry
    r_u0.delete(keys.rate("u0", rule.key))

    summary = launch(ctx, spec)
    assert summary["written"] == 200
    by_shard = {0: set(), 1: set()}
    for shard in (0, 1):
        r = ctx.shard_redis(shard)
        jobs = r.lrange(keys.rq_queue("notify-low"), 0, -1) + r.lrange(keys.rq_queue("notify-normal"), 0, -1)
        # chunks of 100 rows, but the write pass over 2 shards reads 200: each shard's ~100 fill one job
        assert len(jobs) == 1, jobs
        for job_id in jobs:
            (ids,) = Job.fetch(job_id.decode(), connection=r).args
            with Session(ctx.engine) as s:
                owners = {
                    n.recipient_id for n in s.execute(select(Notification).where(Notification.id.in_(ids))).scalars()
                }  # type: ignore[attr-defined]
            assert {shard_of(u, 2) for u in owners} == {shard}
            by_shard[shard] |= owners
    assert by_shard[0] | by_shard[1] == set(users) and by_shard[0] and by_shard[1]
    report = status_report(ctx)
    queued = sum(q["depth"] for q in report["queues"])
    per_shard = [sum(q["shards"][i]["depth"] for q in report["queues"]) for i in (0, 1)]
    assert queued == sum(per_shard) and all(per_shard)
    # a worker on each shard, both listed
    lives = [Liveness(ctx.shard_redis(i), f"w{i}", 30, ["notify-normal"], host="h") for i in (0, 1)]
    for live in lives:
        live.beat()
    assert sorted((w["name"], w["shard"]) for w in status_report(ctx)["workers"]) == [("w0", 0), ("w1", 1)]
    for live in lives:
        live.clear()
    drain(ctx, reconcile=True)
    box = Counter(rec["to"] for rec in read_outbox(ctx.settings.outbox_dir))
    assert box == Counter(f"{u}@example.com" for u in users), box  # each once


def test_redis_shards_lists_them_and_a_host_with_another_list_does_not_start(
    sctx: Context, shard_urls: list[str]
) -> None:
    r = invoke_cli(sctx.settings, "redis", "shards", NOTIFY_REDIS_SHARDS=json.dumps(shard_urls))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"shard 0  {shard_urls[0]}  id ") and lines[1].startswith(f"shard 1  {shard_urls[1]}")
    assert lines[2] == "the shared database agrees"
    # the same database, the shards swapped: refused at start, one line, exit 3, nothing run
    swapped = {"NOTIFY_REDIS_SHARDS": json.dumps(shard_urls[::-1]), "NOTIFY_REDIS_URL": ""}
    r = invoke_cli(sctx.settings, "worker", "--burst", **swapped)
    assert r.returncode == 3 and "differ from those of the hosts sharing this database" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = invoke_cli(sctx.settings, "redis", "shards", "--reset", **swapped)
    assert r.returncode == 0 and "shard list forgotten" in r.stdout, r.stderr


def test_a_worker_serves_only_the_shards_it_is_given(sctx: Context, shard_urls: list[str]) -> None:
    """`worker --burst --shards 1` runs shard 1's jobs (alice's) and its reconciler queues nothing of
    shard 0's: bob's notification waits for a worker of shard 0."""
    ctx = sctx
    seed(ctx)
    alice = send(ctx, recipient_id="alice", channels=["email"]).notification_id
    bob = send(ctx, recipient_id="bob", channels=["email"]).notification_id
    r = invoke_cli(ctx.settings, "worker", "--burst", "--shards", "1", NOTIFY_REDIS_SHARDS=json.dumps(shard_urls))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    with Session(ctx.engine) as s:
        status = {n.id: n.status for n in s.execute(select(Notification)).scalars()}
    assert status[alice] == "done" and status[bob] == "queued"
    assert ctx.shard_redis(0).llen(keys.rq_queue("notify-normal")) == 1
    drain(ctx)
    with Session(ctx.engine) as s:
        done = s.get(Notification, bob)
        assert done is not None and done.status == "done"


def test_a_shard_down_stops_only_its_users(
    home: Path, redis_url: str, rclient: redis.Redis, closed_port: ClosedPort
) -> None:
    """Shard 1 unreachable: a send to bob (shard 0) is queued as ever; one to alice (shard 1) fails
    with one line before anything is recorded."""
    down = closed_port.url("redis") + "/0"
    ctx = Context(make_settings(home, redis_url, redis_shards=[redis_url, down], redis_socket_timeout=1))
    try:
        seed(ctx)
        assert send(ctx, recipient_id="bob", channels=["email"]).status == "queued"
        with pytest.raises(RedisUnreachable, match="cannot reach Redis at redis://127.0.0.1"):
            send(ctx, recipient_id="alice", channels=["email"])
        with Session(ctx.engine) as s:
            assert [n.recipient_id for n in s.execute(select(Notification)).scalars()] == ["bob"]
    finally:
        ctx.close()
        dispose_all()


def test_a_shard_down_does_not_stop_the_other_shards_rounds(sctx: Context, shard_urls: list[str], home: Path,
                                                            closed_port: ClosedPort) -> None:  # fmt: skip
    ctx = sctx
    seed(ctx)
    alice = send(ctx, recipient_id="alice", channels=["email"]).notification_id  # shard 1
    ctx.shard_redis(1).flushall()  # its job lost
    down = closed_port.url("redis") + "/0"
    broken = Context(make_settings(home, down, redis_shards=[down, shard_urls[1]], redis_socket_timeout=1))
    try:
        with pytest.raises(RedisUnreachable):  # shard 0's round: reported, after shard 1's
            reconcile(broken, now=time.time() + 60, force=True)
    finally:
        broken.close()
    job = _job_of(ctx, alice)
    assert job != f"job_{alice}" and ctx.shard_redis(1).exists(keys.rq_job(job))


def test_status_metrics_and_healthz_with_a_shard_down(
    home: Path, redis_url: str, redis_url2: str, rclient: redis.Redis, closed_port: ClosedPort
) -> None:
    """Shard 1 unreachable (a port this test holds closed, its URL with a password): `status` shows
    shard 0's figures and shard 1 as unreachable with its error, without the password, and exits 5
    (`--json` too, with `ok`/`error` per shard); /metrics serves shard 0's series and
    notify_redis_shard_up; /healthz answers 503 naming shard 1. Shard 0 down: the queues of shard 1,
    without what shard 0 holds. Both down: exit 3, as one Redis down."""
    down = f"redis://:s3cret@127.0.0.1:{closed_port.port}/0"
    shards = [redis_url, down]
    ctx = Context(make_settings(home, redis_url, redis_shards=shards, redis_socket_timeout=1))
    try:
        seed(ctx)
        assert send(ctx, recipient_id="bob", channels=["email"]).status == "queued"  # shard 0
        rep = status_report(ctx)
        normal = next(q for q in rep["queues"] if q["priority"] == "normal")
        assert normal["depth"] == 1 and normal["shards"][0]["depth"] == 1 and normal["shards"][1] is None
        assert rep["providers"] and rep["notifications"] == {"queued": 1}
        up, gone = rep["redis_shards"]
        assert up == {"shard": 0, "url": redis_url, "ok": True, "error": None}
        assert (gone["shard"], gone["ok"], gone["url"]) == (1, False, f"redis://***@127.0.0.1:{closed_port.port}/0")
        assert f"127.0.0.1:{closed_port.port}" in gone["error"] and "\n" not in gone["error"]
        assert "s3cret" not in json.dumps(rep)

        env = {"NOTIFY_REDIS_SHARDS": json.dumps(shards), "COLUMNS": "250"}
        r = invoke_cli(ctx.settings, "status", **env)
        assert r.returncode == 5, r.stderr
        assert "s3cret" not in r.stdout + r.stderr and "Traceback" not in r.stderr
        row = next(line for line in r.stdout.splitlines() if f"127.0.0.1:{closed_port.port}" in line)
        assert "unreachable: " in row and "Connection refused" in row, r.stdout
        assert "notify-normal" in r.stdout
        r = invoke_cli(ctx.settings, "status", "--json", **env)
        assert r.returncode == 5, r.stderr
        out = json.loads(r.stdout)
        assert [(x["shard"], x["ok"], x["error"] is None) for x in out["redis_shards"]] == [(0, True, True),
                                                                                             (1, False, False)]  # fmt: skip
        assert sum(q["depth"] for q in out["queues"]) == 1

        text = render(ctx).decode()
        assert 'notify_redis_shard_up{shard="0"} 1.0' in text and 'notify_redis_shard_up{shard="1"} 0.0' in text
        assert 'notify_queue_depth{priority="normal"} 1.0' in text and "notify_circuit_open{" in text
        with ApiServer(ctx) as server:
            h = httpx.get(f"{server.url}/healthz", timeout=10)
        assert h.status_code == 503 and h.json() == {
            "error": "unhealthy: Redis shard 1 of 2 unreachable",
            "shards_down": [1],
        }, h.text
    finally:
        ctx.close()
        dispose_all()

    # shard 0 down: shard 1's queues and workers; what shard 0 holds for every host is left out
    first = [down.replace(":s3cret@", ""), redis_url2]
    ctx = Context(make_settings(home, first[0], redis_shards=first, redis_socket_timeout=1))
    try:
        ctx.shard_redis(1).rpush(keys.rq_queue("notify-low"), b"job_x")
        rep = status_report(ctx)
        assert [x["ok"] for x in rep["redis_shards"]] == [False, True]
        low = next(q for q in rep["queues"] if q["priority"] == "low")
        assert low["depth"] == 1 and low["shards"] == [None, {**low["shards"][1], "depth": 1}]
        assert rep["providers"] == {} and rep["in_doubt"] == {}
        text = render(ctx).decode()
        assert 'notify_redis_shard_up{shard="0"} 0.0' in text and 'notify_queue_depth{priority="low"} 1.0' in text
        assert "notify_circuit_open{" not in text and "notify_dlq_depth" in text
    finally:
        ctx.close()
        dispose_all()

    # every shard down: as one Redis down
    both = [first[0], closed_port.url("redis") + "/1"]
    ctx = Context(make_settings(home, both[0], redis_shards=both, redis_socket_timeout=1))
    try:
        with pytest.raises(RedisUnreachable):
            status_report(ctx)
        with ApiServer(ctx) as server:
            assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 503
    finally:
        ctx.close()
        dispose_all()
    r = invoke_cli(ctx.settings, "status", NOTIFY_REDIS_SHARDS=json.dumps(both))
    assert r.returncode == 3 and "cannot reach Redis" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_shard_down_at_start_is_served_once_it_answers_as_the_recorded_one(
    sctx: Context, shard_urls: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Shard 1 (a redis-server of this test's) stopped: `serve` starts and answers 503 naming it;
        `worker --pool 2` starts, says so in one line, sends bob's (shard 0) and, once shard 1 is
        started again (its AOF: the same Redis the database records), alice's. A host whose live shard
        is not the recorded one is refused even with another shard down; a shard back as another Redis
    is never served."""
    d = tmp_path / "shard1"
    urls = [shard_urls[0], ensure_server(d)]
    ctx = Context(make_settings(sctx.settings.home, urls[0], redis_shards=urls, redis_socket_timeout=1))
    pool = None
    try:
        assert check(ctx) == {}  # records the layout
        seed(ctx)
        bob = send(ctx, recipient_id="bob", channels=["email"]).notification_id
        alice = send(ctx, recipient_id="alice", channels=["email"]).notification_id
        stop_server(d)
        (gone,) = check(ctx).values()  # cannot disagree, cannot be verified: returned, not raised
        assert gone.shard == 1 and gone.url == urls[1]
        swapped = Context(make_settings(ctx.settings.home, urls[1], redis_shards=urls[::-1], redis_socket_timeout=1))
        with pytest.raises(ConfigError, match=r"\(2: down,[0-9a-f]{8}\) differ from those of the hosts"):
            check(swapped)  # shard 1 answers, and is shard 0's Redis
        swapped.close()

        env = cli_env(ctx.settings, NOTIFY_REDIS_SHARDS=json.dumps(urls), NOTIFY_REDIS_SOCKET_TIMEOUT="1")
        pool = start_pool(env, "2", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with ServeProcess(env, health=503) as api:
            assert f"Redis shard 1 ({urls[1]}) does not answer" in api.stderr_text()
            assert httpx.get(f"{api.url}/healthz", timeout=10).json()["shards_down"] == [1]

        def status(nid: str) -> str:
            with ctx.engine.connect() as conn:
                return str(conn.execute(select(Notification.status).where(Notification.id == nid)).scalar_one())

        assert wait_for(lambda: status(bob) == "done", 30, 0.1)
        assert status(alice) == "queued" and pool.poll() is None
        ensure_server(d)  # back, with its data
        assert wait_for(lambda: status(alice) == "done", 30, 0.1)
        stop_pool(pool)
        assert pool.stderr is not None
        err = pool.stderr.read()
        assert err.count("does not answer") == 1 and "Redis shard 1 answers and is the one" in err, err
        assert "Traceback" not in err, err
        box = Counter(rec["to"] for rec in read_outbox(ctx.settings.outbox_dir))
        assert box == Counter(["bob@example.com", "alice@example.com"]), box

        # shard 1 back as another Redis (its data gone): a supervisor waiting for it never serves it
        ctx.shard_redis(1).flushall()
        waiting = Pool(ctx.settings, ["high", "normal", "low"], 2, shards=[0, 1], pending=[1])
        with caplog.at_level(logging.ERROR, logger="notifyctl.worker"):
            waiting._pick_up(ctx)
            waiting._pick_up(ctx)
        assert waiting.pending == {1} and waiting.procs == [None, None]
        (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]  # said once
        assert line.startswith("not serving Redis shard(s) 1: this host's Redis shards (2: "), line
    finally:
        if pool is not None and pool.poll() is None:
            stop_pool(pool)
        ctx.close()
        dispose_all()
        stop_server(d)
