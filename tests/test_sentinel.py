"""Redis high availability: ``redis+sentinel://`` URLs against a real ``redis-sentinel`` (a private
master, replica and sentinel on free ports), a failover between two sends, and a Redis Cluster
node refused before anything is written."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select
from sqlmodel import Session

from notifyctl import keys
from notifyctl.context import Context
from notifyctl.db import dispose_all
from notifyctl.errors import ConfigError
from notifyctl.models import Notification
from notifyctl.redisconn import SentinelURL, _safe, connect, parse_sentinel_url, replica_acks
from tests.conftest import invoke_cli, make_settings, run_cli
from tests.net import ReservedPorts, listening
from tests.util import deliveries, seed, send
from worker import jobs
from worker.claims import OK, Claims
from worker.pool import run_worker
from worker.providers.outbox import read_outbox

SERVER = shutil.which("redis-server")
SENTINEL = shutil.which("redis-sentinel")
SERVICE = "notify-main"
PASSWORD = "s3cret-pw"


def wait_for(what: str, check, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class SentinelSet:
    """A master, one replica and one sentinel (quorum 1), each a real process on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.procs: list[subprocess.Popen[bytes]] = []
        with ReservedPorts(3) as ports:
            self.master_port, self.replica_port, self.sentinel_port = ports.base, ports.base + 1, ports.base + 2
            self._server("master", self.master_port)
            self._server("replica", self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port))
            # the sentinel starts once both servers answer: started with them, on a loaded machine it
            # could find the master not yet listening, call it down after its 1 s and fail over to
            # the replica before the test began (seen: "+switch-master" in the set-up, under load 10)
            for port in (self.master_port, self.replica_port):
                wait_for(f"a server listening on {port}", lambda port=port: listening(port))
            conf = root / "sentinel.conf"
            conf.write_text(
                f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {root}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} 1\n"
                f"sentinel auth-pass {SERVICE} {PASSWORD}\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                # named here, or the sentinel finds it only at its next INFO of the master (10 s)
                f"sentinel known-replica {SERVICE} 127.0.0.1 {self.replica_port}\n"
            )
            self._start([str(SENTINEL), str(conf)], "sentinel")
            # the ports stay held until each server listens on its own: released before, an outgoing
            # connection of this busy test process could take one (they are ephemeral-range ports)
            wait_for(f"a server listening on {self.sentinel_port}", lambda: listening(self.sentinel_port))
        self.sentinel = redis.Redis(port=self.sentinel_port, decode_responses=True)

    def _server(self, name: str, port: int, *extra: str) -> None:
        d = self.root / name
        d.mkdir()
        args = [str(SERVER), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", ""]
        args += ["--requirepass", PASSWORD, "--masterauth", PASSWORD, *extra]
        self._start(args, name)

    def _start(self, args: list[str], name: str) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - the process keeps it
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=PASSWORD, decode_responses=True)

    def url(self, password: str = PASSWORD) -> str:
        return f"redis+sentinel://:{password}@127.0.0.1:{self.sentinel_port}/{SERVICE}/0"

    def master_port_now(self) -> int:
        return int(self.sentinel.sentinel_get_master_addr_by_name(SERVICE)[1])

    def ready(self) -> None:
        """Replica in sync, and the sentinel knows it as a healthy replica (a failover needs one)."""
        wait_for(
            "the replica's link",
            lambda: self.client(self.replica_port).info("replication").get("master_link_status") == "up",
        )

        def known() -> bool:
            reps = self.sentinel.sentinel_slaves(SERVICE)
            return any(r["is_slave"] and not r["is_sdown"] and r["master-link-status"] == "ok" for r in reps)

        wait_for("the sentinel to see the replica", known)

    def kill_master(self) -> float:
        """``kill -9`` the master; wait until the sentinel has promoted the replica. Returns the seconds
        from the kill to the sentinel naming the new master."""
        assert self.master_port_now() == self.master_port
        self.procs[0].kill()
        self.procs[0].wait()
        t0 = time.monotonic()

        def switched() -> bool:  # as redis-py's Sentinel.discover_master accepts it: no longer down
            state = self.sentinel.sentinel_masters()[SERVICE]
            return state["port"] == self.replica_port and not (state["is_sdown"] or state["is_odown"])

        wait_for("the sentinel to switch to the new master", switched)
        took = time.monotonic() - t0
        wait_for("the new master", lambda: self.client(self.replica_port).info("replication")["role"] == "master")
        return took

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    if not SERVER or not SENTINEL:
        pytest.skip("redis-sentinel not installed (Debian package redis-sentinel): no Sentinel test")
    s = SentinelSet(tmp_path / "ha")
    try:
        try:
            wait_for("the sentinel", lambda: s.sentinel.ping())
            s.ready()
        except AssertionError as exc:  # say why: each server's last log lines (a port taken, a sync...)
            tails = {f.name: f.read_text(errors="replace").splitlines()[-5:] for f in s.root.glob("*.log")}
            raise AssertionError(f"{exc}; logs: {tails}") from None
        yield s
    finally:
        s.stop()


def outbox_counts(ctx: Context) -> Counter[str]:
    return Counter(r["delivery_id"] for r in read_outbox(ctx.settings.outbox_dir))


def test_sentinel_url_send_failover_send_nothing_lost_nothing_twice(sentinels: SentinelSet, home: Path) -> None:
    # the set's only replica becomes the master: none is left to acknowledge a batch's lease, and by
    # default (redis_replica_acks 1 with Sentinel) sends would pause until one is back; this test is
    # about the URL and the switch, with nothing in flight at the kill
    settings = make_settings(home, sentinels.url(), redis_replica_acks=0)
    ctx = Context(settings)
    try:
        seed(ctx)
        # every client notifyctl makes goes to the master the sentinel names, with connect()'s timeouts
        assert ctx.redis.info("server")["tcp_port"] == sentinels.master_port
        rq_conn = connect(settings, dequeue=True)
        kw = rq_conn.connection_pool.connection_kwargs
        assert (kw["socket_timeout"], kw["socket_connect_timeout"]) == (settings.worker_dequeue_timeout + 10, 10.0)
        assert ctx.redis.connection_pool.connection_kwargs["socket_timeout"] == 10.0
        rq_conn.close()

        a = send(ctx, channels=["email", "sms"])
        run_worker(settings, ["high", "normal", "low"], burst=True, reconcile=True)
        jobs.close()
        assert {d.status for d in deliveries(ctx, a.notification_id)} == {"sent"}

        b = send(ctx, channels=["email", "sms"])  # queued on the old master, not yet sent
        sentinels.kill_master()
        c = send(ctx, channels=["email", "sms"])  # the same client, now on the new master
        assert ctx.redis.info("server")["tcp_port"] == sentinels.replica_port

        # a worker through the CLI, as an operator runs it: drains b and c from the new master
        done = run_cli(settings, "worker", "--burst", NOTIFY_REDIS_REPLICA_ACKS="0")
        assert done.returncode == 0, done.stderr
        ids = [a.notification_id, b.notification_id, c.notification_id]
        ds = [d for n in ids for d in deliveries(ctx, n)]
        assert len(ds) == 6 and {d.status for d in ds} == {"sent"}
        counts = outbox_counts(ctx)
        assert {d.id: counts[d.id] for d in ds} == {d.id: 1 for d in ds}  # nothing lost, nothing twice
        assert sum(counts.values()) == 6

        # `redis url` prints the URL as given, the password masked unless asked
        shown = run_cli(settings, "redis", "url")
        assert shown.returncode == 0 and shown.stdout.strip() == sentinels.url("***").replace(":***@", "***@")
        assert PASSWORD not in shown.stdout
        full = run_cli(settings, "redis", "url", "--show-password")
        assert full.stdout.strip() == sentinels.url()
    finally:
        jobs.close()
        ctx.close()
        dispose_all()


def test_sentinel_url_parsing() -> None:
    assert parse_sentinel_url("redis+sentinel://:p%40ss@h1:26380,h2,[::1]:5000/mymaster/3") == SentinelURL(
        (("h1", 26380), ("h2", 26379), ("::1", 5000)), "mymaster", 3, None, "p@ss", False
    )
    assert parse_sentinel_url("rediss+sentinel://u:pw@h1/m").ssl is True
    assert parse_sentinel_url("redis+sentinel://h1/m/") == SentinelURL((("h1", 26379),), "m")
    for url, what in [
        ("redis+sentinel://h1:26379", "service name"),
        ("redis+sentinel:///m", "sentinel host"),
        ("redis+sentinel://h1,,h2/m", "sentinel host is missing"),
        ("redis+sentinel://h1:port/m", "bad port"),
        ("redis+sentinel://h1:70000/m", "bad port"),
        ("redis+sentinel://h1/m/one", "database number"),
        ("redis+sentinel://h1/m/1/2", "too many"),
        ("redis+sentinel://:pw@h1/m?db=1", "query parameters"),
    ]:
        with pytest.raises(ConfigError, match=what) as err:
            parse_sentinel_url(url)
        assert "\n" not in str(err.value) and "pw@" not in str(err.value)
    assert _safe("redis+sentinel://:a@b@h1:26379,h2/m") == "redis+sentinel://***@h1:26379,h2/m"
    assert _safe("unix:///tmp/r.sock?db=0&password=hush") == "unix:///tmp/r.sock?db=0&password=***"


def test_bad_redis_urls_are_one_line_exit_3(home: Path) -> None:
    settings = make_settings(home, "redis+sentinel://:hush@h1:26379,h2:x/mymaster")
    for url in (settings.redis_url, "memcached://h1:11211"):
        r = invoke_cli(settings, "status", NOTIFY_REDIS_URL=str(url))
        assert r.returncode == 3, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr and "hush" not in r.stderr
        assert lines[0].startswith("error: bad Redis")


@pytest.fixture
def cluster_node(tmp_path: Path) -> Iterator[str]:
    """A real redis-server with cluster mode on (one node, no slots: INFO answers, keys do not)."""
    if not SERVER:
        pytest.skip("no redis-server binary on PATH")
    d = tmp_path / "cluster"
    d.mkdir()
    with ReservedPorts(1) as ports:
        port = ports.base
        args = [SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", ""]
        proc = subprocess.Popen([*args, "--cluster-enabled", "yes"], stdout=subprocess.DEVNULL)
        wait_for(f"a server listening on {port}", lambda: listening(port))  # the port held until then
    try:
        wait_for("the cluster node", lambda: redis.Redis(port=port).ping())
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def test_redis_cluster_refused_before_any_sql_row(
    cluster_node: str, home: Path, redis_url: str, rclient: redis.Redis
) -> None:
    ctx = Context(make_settings(home, redis_url))  # the users, through an ordinary Redis
    try:
        seed(ctx)
    finally:
        ctx.close()
        dispose_all()
    settings = make_settings(home, cluster_node)
    args = [
        "send",
        "alice",
        "-t",
        "order_shipped_v2",
        "-c",
        "email",
        "-d",
        "order_id=1",
        "-d",
        "tracking_url=https://t/1",
    ]
    r = run_cli(settings, *args)
    assert r.returncode == 3, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Redis Cluster" in lines[0] and "not support" in lines[0] and "Sentinel" in lines[0]
    w = run_cli(settings, "worker", "--burst")
    assert w.returncode == 3 and "Redis Cluster" in w.stderr and "Traceback" not in w.stderr
    ctx = Context(settings)
    try:
        with Session(ctx.engine) as s:
            assert s.execute(select(func.count()).select_from(Notification)).scalar_one() == 0
    finally:
        ctx.close()
        dispose_all()


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[tuple[redis.Redis, redis.Redis, subprocess.Popen[bytes]]]:
    """A primary and one replica (no sentinel: nothing fails over), each a real redis-server."""
    if not SERVER:
        pytest.skip("redis-server not installed")
    procs: list[subprocess.Popen[bytes]] = []
    with ReservedPorts(2) as ports:
        for name, port, extra in (
            ("primary", ports.base, []),
            ("replica", ports.base + 1, ["--replicaof", "127.0.0.1", str(ports.base)]),
        ):
            d = tmp_path / name
            d.mkdir()
            args = [str(SERVER), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", "", *extra]
            log = open(d / "log", "wb")  # noqa: SIM115 - the process keeps it
            procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))
        primary = redis.Redis(port=ports.base, decode_responses=True, socket_timeout=5)
        replica = redis.Redis(port=ports.base + 1, decode_responses=True, socket_timeout=5)
    try:
        wait_for("the replica's link", lambda: replica.info("replication").get("master_link_status") == "up", 10)
        wait_for("the primary to see it", lambda: primary.info("replication")["connected_slaves"] == 1, 10)
        yield primary, replica, procs[1]
    finally:
        procs[1].send_signal(signal.SIGCONT)
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


def test_fence_needs_a_replica_ack_when_replicated(
    replicated: tuple[redis.Redis, redis.Redis, subprocess.Popen[bytes]],
) -> None:
    """A fence only the primary holds would vanish at a failover (and the new primary would hand the
    batch to another worker as free): with replica_acks, a batch is sent only once a replica holds
    its fence — and its take, written before it; else it is refused like a lost lease."""
    primary, replica, replica_proc = replicated
    claims = Claims(primary, "w-a", ttl=5, sent_ttl=60, replica_acks=1, ack_timeout=0.3)
    assert claims.take(["d1", "d2"]) == [OK, OK]
    assert claims.fence(["d1", "d2"]) == [True, True]
    # acknowledged means there: the replica holds the lease with both deliveries in flight, and their records
    lease = replica.get(keys.lease(claims.token))
    assert lease is not None and lease.startswith("w-a|") and lease.endswith("|03")
    assert replica.get(keys.sent("d1")) == f"lease:{claims.token}:0"

    replica_proc.send_signal(signal.SIGSTOP)  # the replica stops acknowledging (as one cut off)
    try:
        other = Claims(primary, "w-b", ttl=5, sent_ttl=60, replica_acks=1, ack_timeout=0.3)
        assert other.take(["d3"]) == [OK]
        t0 = time.monotonic()
        assert other.fence(["d3"]) == [False]  # the primary alone said yes: not enough
        assert time.monotonic() - t0 >= 0.29 and other.unacked == 1
        # nothing was sent: taken again (say by the retry of its job), d3 is not in doubt
        assert primary.get(keys.lease(other.token)).endswith("|00")  # type: ignore[union-attr]
        assert other.take(["d3"]) == [OK]
        # the same fence without the requirement passes: the refusal above is the replicas' doing
        bare = Claims(primary, "w-c", ttl=5, sent_ttl=60)
        assert bare.take(["d4"]) == [OK] and bare.fence(["d4"]) == [True]
        # a renewal the replica does not hold does not extend how long the lease is surely ours
        before = claims.valid_until
        assert claims.renew() == 0 and claims.valid_until == before
    finally:
        replica_proc.send_signal(signal.SIGCONT)
    wait_for("the replica to catch up", lambda: replica.get(keys.sent("d4")) is not None, 5)
    assert other.fence(["d3"]) == [True]  # acknowledged again: sent
    assert other.unacked == 1
    for c in (claims, other, bare):
        c.close()


def test_replica_acks_default_follows_the_url(home: Path) -> None:
    sentinel_url = f"redis+sentinel://:{PASSWORD}@127.0.0.1:26379/{SERVICE}/0"
    assert replica_acks(make_settings(home, sentinel_url)) == 1
    assert replica_acks(make_settings(home, "redis://127.0.0.1:6379/0")) == 0
    assert replica_acks(make_settings(home, "redis://127.0.0.1:6379/0", redis_replica_acks=2)) == 2
    assert replica_acks(make_settings(home, sentinel_url, redis_replica_acks=0)) == 0
    shards = ["redis://127.0.0.1:6379/0", sentinel_url]
    assert [replica_acks(make_settings(home, shards[0], redis_shards=shards), i) for i in (0, 1)] == [0, 1]
