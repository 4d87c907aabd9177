"""One module: the hosts (pools, proxies, the shared Redis and PostgreSQL) and the faults played on
them share the hosts' world, as ``chaos.scenarios`` does for one host; ~580 lines.

``python -m chaos.multihost`` (part of ``make chaos``): several hosts, one or two Redis, one PostgreSQL.

Each host is a ``notifyctl worker --pool 3`` process tree with a home of its own
(``NOTIFY_HOME``, ``NOTIFY_HOST_NAME``), reaching the shared Redis through a small TCP proxy of its
own, which the harness can cut — that host alone loses Redis, as in a network partition. The
sharded faults run the same hosts (``--pool 4``: two workers per shard) over two Redis servers
(``NOTIFY_REDIS_SHARDS``, the same two servers for every host, each through that host's own proxy),
users spread over them by ``notifyctl.shards``. The
database is a fresh schema in the PostgreSQL at ``NOTIFY_CHAOS_PG_URL`` (default the test server,
``postgresql+psycopg2://postgres@127.0.0.1:5432/test``). The SendGrid sandbox answers every
request in 2 s, and every message is its own request (``max_personalizations`` 1), so a worker's
batch keeps it at the provider for several seconds.

Faults (issue 18):

- **kill**: host A's pool is killed with ``kill -9`` while its workers are at the provider. Host B
  takes A's deliveries over once their leases have expired. Deliveries A had handed to the
  provider are *in doubt* and sent again: duplicates at the sandbox are allowed only among them.
- **partition**: host A is cut off from Redis for 30 s (longer than the 20 s lease) while it is
  sending. A stops at its next provider request; B takes over once A's leases have expired and
  reads the database before sending what A might have sent: 0 duplicates.
- **shards-kill**, **shards-partition-1**, **shards-partition-both**: the same over two shards:
  host A's pool killed; host A cut off from shard 1 only (its shard-0 workers go on sending) while
  its shard-1 worker is at the provider; host A cut off from both shards.
- **sentinel-kill**, **sentinel-failover**: both hosts on one Sentinel-managed Redis (a primary, a
  replica, three sentinels: ``chaos.sentinel``), through a ``redis+sentinel://`` URL; mid-blast the
  primary and one sentinel are killed (SIGKILL), or ``SENTINEL FAILOVER`` is forced. Deliveries
  whose worker lost its lease with the request at the provider are in doubt: duplicates only
  among them.

Prints, per fault: sent / lost / duplicated / in doubt (by our delivery id, at the sandbox), and
checks that ``notifyctl status`` on host B lists each live host's workers and none of the dead
ones. Exit 1 on any problem; exit 0 with a note when PostgreSQL is not reachable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert, select, text
from sqlmodel import col

from bench.common import wait_until
from chaos.common import PROMO, ROOT, Result, StampedRecorder, run_each, tally
from chaos.sentinel import FAULTS, SENTINEL, SentinelSet, strike
from notifyctl import keys
from notifyctl.context import Context
from notifyctl.db import dispose_all
from notifyctl.liveness import running_key
from notifyctl.models import DeliveryEvent, Notification, User, new_id, utcnow
from notifyctl.redisconn import ensure_server, stop_server
from notifyctl.settings import load_settings
from notifyctl.shards import shard_of
from notifyctl.vocabulary import PRIORITIES
from sandboxes.sendgrid import SendgridSandbox
from worker.pipeline import delivery_id

PG_URL = os.environ.get("NOTIFY_CHAOS_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
PROVIDER_DELAY = 2.0
LEASE = 20  # the default claim_ttl
PARTITION = 30.0


class RedisProxy:
    """TCP on 127.0.0.1:<port> → the Redis unix socket, byte for byte. ``cut()`` resets every
    connection and refuses new ones (accepted and closed at once) until ``heal()``."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._cut = threading.Event()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self.refused = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                self.refused += 1
                _close(client)
                continue
            upstream = socket.socket(socket.AF_UNIX)
            try:
                upstream.connect(self.target)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._socks |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data or self._cut.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _close(s)
                with self._lock:
                    self._socks.discard(s)

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            _close(s)

    def heal(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed = True
        self.cut()
        _close(self.listener)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


@dataclass
class HostResult(Result):
    """A multi-host fault's result: a resend of a delivery recorded in doubt is allowed (counted in
    ``in_doubt``), so only a problem fails it."""

    in_doubt: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return super().summary() + f", in doubt {self.in_doubt}"


class Cluster:
    """One Redis (or ``shards`` of them), one PostgreSQL schema, the SendGrid sandbox, and hosts
    started on demand."""

    def __init__(self, name: str, batch_size: int = 40, shards: int = 1, sentinel: bool = False) -> None:
        self.batch_size = batch_size
        self.dir = Path(tempfile.mkdtemp(prefix=f"notify-multihost-{name}-"))
        # with ``sentinel``: one Sentinel-managed Redis (chaos.sentinel's set), which every host and
        # the harness reach through its redis+sentinel:// URL (no proxy: the faults are the Redis's)
        self.sentinel = SentinelSet(self.dir / "sentinel") if sentinel else None
        self.redis_dirs = [] if sentinel else [self.dir / f"redis{i}" for i in range(shards)]
        self.redis_urls = [self.sentinel.url] if self.sentinel else [ensure_server(d) for d in self.redis_dirs]
        self.redis_url = self.redis_urls[0]
        self.schema = "chaos_" + uuid.uuid4().hex[:10]
        self.admin = create_engine(PG_URL)
        with self.admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {self.schema}"))
        self.db_url = f"{PG_URL}?options=-csearch_path%3D{self.schema}"
        self.sg = SendgridSandbox()
        self.sg.recorder = StampedRecorder()
        self.sg.faults.add({"delay": PROVIDER_DELAY, "count": 10**9})  # every request: 2 s at the provider
        self.sg.start()
        # one message per request: SendGrid's skeleton would send a whole personalised batch as one
        # 2 s request, shorter than the lease, and the faults below need a batch at the provider
        # for longer than that (a request each, 8 at a time)
        self.options = {"sendgrid": {"api_key": self.sg.api_key, "base_url": self.sg.url, "max_personalizations": 1}}
        self.settings = load_settings(
            home=self.dir / "harness", redis_url=self.redis_url, database_url=self.db_url,
            providers_email=["sendgrid"], provider_options=self.options,
            redis_shards=self.redis_urls if shards > 1 else [],
        )  # fmt: skip
        self.ctx = Context(self.settings)
        self.rs = [self.ctx.shard_redis(i) for i in range(shards)]
        self.proxies: dict[str, list[RedisProxy]] = {}  # a host's proxy to each shard
        self.user_of: dict[str, str] = {}  # delivery id → user (campaign)
        self.pools: dict[str, subprocess.Popen[bytes]] = {}

    def env(self, host: str, **extra: str) -> dict[str, str]:
        e = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
        e.update(
            NOTIFY_HOME=str(self.dir / host),
            NOTIFY_HOST_NAME=host,
            NOTIFY_REDIS_URL=self.proxies[host][0].url if self.proxies[host] else self.redis_url,
            NOTIFY_DATABASE_URL=self.db_url,
            NOTIFY_PROVIDERS_EMAIL='["sendgrid"]',
            NOTIFY_PROVIDER_OPTIONS=json.dumps(self.options),
            NOTIFY_BATCH_SIZE=str(self.batch_size),
            NOTIFY_RECOVERY_GRACE="2",
            NOTIFY_LOG_LEVEL="WARNING",
        )
        if len(self.rs) > 1:
            e["NOTIFY_REDIS_SHARDS"] = json.dumps([px.url for px in self.proxies[host]])
        e.update(extra)
        return e

    def start_host(self, host: str, pool: int = 3) -> None:
        self.proxies[host] = [] if self.sentinel else [RedisProxy(u.removeprefix("unix://")) for u in self.redis_urls]
        log = open(self.dir / f"{host}.log", "ab")  # noqa: SIM115 - the child owns it
        self.pools[host] = subprocess.Popen(
            [sys.executable, "-m", "notifyctl.cli.main", "worker", "--pool", str(pool)],
            env=self.env(host), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        if not wait_until(lambda: len(self.workers(host)) >= pool, 60, 0.2):
            raise RuntimeError(f"host {host} did not start: {self.log_tail(host)}")

    def workers(self, host: str, shard: int | None = None) -> list[tuple[int, str]]:
        """``host``'s live workers (each with its shard, where its liveness key is), of ``shard`` or all."""
        out = []
        for i, r in enumerate(self.rs):
            if shard is None or shard == i:
                found = r.scan_iter(match=keys.alive(f"notify-{host}-*"))
                out += [(i, k.decode()[len(keys.alive("")) :]) for k in found]
        return out

    def busy_at_provider(self, host: str, shard: int | None = None) -> bool:
        """A worker of ``host`` (serving ``shard``) is running a job while the sandbox has requests in flight."""
        for i, name in self.workers(host, shard):
            if self.rs[i].scard(running_key(name)):
                return self.sg.in_flight > 0
        return False

    def kill_host(self, host: str) -> None:
        os.killpg(self.pools[host].pid, signal.SIGKILL)
        self.pools[host].wait()

    def status(self, host: str) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "notifyctl.cli.main", "status", "--json"],
            env=self.env(host), cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"status on {host}: {out.stderr.strip()[-500:]}")
        return dict(json.loads(out.stdout))

    def log_tail(self, host: str, n: int = 2000) -> str:
        try:
            return (self.dir / f"{host}.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def campaign(self, n: int) -> set[str]:
        """``n`` users and one personalised marketing email each, due now (the hosts' reconcilers
        queue them); returns the expected delivery ids."""
        now = utcnow()
        ids = [f"u{i:06d}" for i in range(n)]
        expected: set[str] = set()
        with self.ctx.engine.begin() as conn:
            conn.execute(insert(User), [
                {"id": u, "email": f"{u}@example.com", "phone": None, "timezone": "UTC", "locale": "en",
                 "sms_opt_in": False, "attributes": {}, "created_at": now, "updated_at": now} for u in ids
            ])  # fmt: skip
            rows = []
            for i, u in enumerate(ids):
                nid = new_id("n")
                did = delivery_id(nid, "email", f"{u}@example.com")
                expected.add(did)
                self.user_of[did] = u
                rows.append({"id": nid, "recipient_id": u, "type": "weekly_promo", "template_id": "weekly_promo",
                             "category": "marketing", "priority": "low", "channels": ["email"],
                             "data": {**PROMO, "first_name": u}, "dedup_key": f"mh:{u}", "status": "scheduled",
                             "due_at": now + timedelta(milliseconds=i), "created_at": now,
                             "updated_at": now})  # fmt: skip
            conn.execute(insert(Notification), rows)
        return expected

    def accepted_per_shard(self, since: int = 0) -> dict[int, int]:
        """Requests the sandbox accepted (from the ``since``-th on), per shard of their user."""
        n = len(self.rs)
        got = Counter(shard_of(self.user_of.get(m["delivery_id"], ""), n) for m in self.sg.recorder.all()[since:])
        return dict(sorted(got.items()))

    def settled(self) -> bool:
        """Every notification final, every queue empty, and no worker running a job — except on a
        Sentinel-managed Redis, where the last is not asked: a forced failover drops the write by
        which RQ ends an execution (made on the old primary while it was still a master), leaving the
        worker's running-set entry on the new primary until it expires (job_timeout + 60 s) though
        the job ended; SQL, which every outcome reaches, and the queues tell the truth there."""
        with self.ctx.engine.connect() as conn:
            open_: int = conn.execute(
                text("SELECT count(*) FROM notifications WHERE status NOT IN ('done', 'suppressed')")
            ).scalar_one()
        if open_ or any(self.ctx.queue(p, i).count for i in range(len(self.rs)) for p in PRIORITIES):
            return False
        return bool(self.sentinel) or not self.running()

    def running(self) -> int:
        """Entries in the workers' running sets (RQ's executions), on every shard."""
        return sum(self.rs[i].scard(running_key(n)) for h in self.pools for i, n in self.workers(h))

    def in_doubt(self) -> set[str]:
        with self.ctx.engine.connect() as conn:
            rows = conn.execute(
                select(col(DeliveryEvent.delivery_id)).where(col(DeliveryEvent.status) == "in_doubt")
            ).all()
        return {str(r[0]) for r in rows}

    def close(self) -> None:
        for p in self.pools.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(timeout=30)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    p.wait()
        for pxs in self.proxies.values():
            for px in pxs:
                px.close()
        self.sg.stop()
        self.ctx.close()
        dispose_all()
        for d in self.redis_dirs:
            stop_server(d)
        if self.sentinel:
            self.sentinel.stop()
        if os.environ.get("NOTIFY_CHAOS_KEEP"):
            print(f"kept: {self.dir}, schema {self.schema}", file=sys.stderr)
        else:
            with self.admin.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {self.schema} CASCADE"))
            shutil.rmtree(self.dir, ignore_errors=True)
        self.admin.dispose()


def _count(res: HostResult, c: Cluster, expected: set[str]) -> set[str]:
    # what the workers record comes after the sandbox accepted: wait until every batch is written
    if not wait_until(c.settled, 120, 0.5):
        res.problems.append("notifications still open 120 s after the sandbox accepted everything")
    t = tally(expected, [m["delivery_id"] for m in c.sg.recorder.all()])
    res.expected, res.sent, res.lost, res.duplicated = t.expected, t.sent, t.lost, t.duplicated
    doubt = c.in_doubt()
    res.in_doubt = len(doubt)
    if t.lost:
        res.problems.append(f"{t.lost} lost (e.g. {t.lost_ids[:3]})")
    if t.unexpected:
        res.problems.append(f"{t.unexpected} accepted for deliveries nobody asked for")
    counts = Counter(m["delivery_id"] for m in c.sg.recorder.all())
    return {d for d, k in counts.items() if k > 1}


def _dups_only_in_doubt(res: HostResult, c: Cluster, dups: set[str]) -> None:
    """A fault that can kill a request in flight: a delivery sent twice must be one recorded in doubt."""
    outside = dups - c.in_doubt()
    if outside:
        res.problems.append(f"{len(outside)} duplicate(s) not marked in doubt (e.g. {sorted(outside)[:3]})")
    res.notes.append(
        f"{res.duplicated} duplicate(s), all among the {res.in_doubt} deliveries marked in doubt"
        if not outside
        else f"{len(outside)} duplicate(s) outside the in-doubt set"
    )


def _status_check(res: HostResult, c: Cluster, ask: str, live: list[str], dead: list[str]) -> None:
    """``status`` on host ``ask`` lists every live host's workers and none of a dead host's."""
    deadline = time.monotonic() + 30  # a dead worker's liveness key lasts worker_alive_ttl (10 s)
    while True:
        st = c.status(ask)
        hosts = Counter(w["host"] for w in st["workers"])
        if all(hosts.get(h) for h in live) and not any(hosts.get(h) for h in dead):
            res.figures["status_workers_per_host"] = dict(hosts)
            return
        if time.monotonic() > deadline:
            res.problems.append(f"status on {ask} lists workers per host {dict(hosts)} (live {live}, dead {dead})")
            return
        time.sleep(1)


def _pool(shards: int) -> int:
    return 3 if shards == 1 else 2 * shards  # per shard: one worker for `high`, one for the rest


def kill_scenario(n: int, shards: int = 1) -> HostResult:
    over = "" if shards == 1 else f", {shards} shards"
    res = HostResult(f"host A's pool killed (kill -9) mid-batch{over}")
    c = Cluster("kill", shards=shards)
    try:
        c.start_host("host-a", _pool(shards))
        c.start_host("host-b", _pool(shards))
        expected = c.campaign(n)
        if not wait_until(lambda: c.busy_at_provider("host-a"), 60, 0.05):
            res.problems.append("host A never got to the provider")
            return res
        time.sleep(PROVIDER_DELAY / 2)  # its requests are at the provider, unanswered
        before = len(c.sg.recorder)
        c.kill_host("host-a")
        t_kill = time.monotonic()
        res.notes.append(f"killed host A with {c.sg.in_flight} request(s) in flight, {before} accepted before")
        _status_check(res, c, "host-b", ["host-b"], ["host-a"])
        ok = wait_until(lambda: expected <= {m["delivery_id"] for m in c.sg.recorder.all()}, 240, 0.5)
        res.figures["all_sent_s_after_kill"] = round(time.monotonic() - t_kill, 1) if ok else None
        time.sleep(PROVIDER_DELAY + 1)  # late duplicates, if any
        _dups_only_in_doubt(res, c, _count(res, c, expected))
        return res
    finally:
        c.close()


def partition_scenario(n: int, shards: int = 1, cut: tuple[int, ...] = (0,)) -> HostResult:
    """Host A cut off from the shards ``cut`` (with one Redis: from it) for ``PARTITION`` s, while a
    worker of A serving the first of them is at the provider."""
    if shards == 1:
        name = f"host A cut off from Redis for {PARTITION:g}s mid-send"
    elif len(cut) == shards:
        name = f"host A cut off from all {shards} shards {PARTITION:g}s"
    else:
        name = f"host A cut off from shard {','.join(map(str, cut))} of {shards} {PARTITION:g}s"
    res = HostResult(name)
    # a batch keeps its worker at the provider longer than the lease (100 requests, 8 at a time, 2 s
    # each: 26 s): without fencing, B would take over and send what A is still sending
    c = Cluster("partition", batch_size=100, shards=shards)
    try:
        c.start_host("host-a", _pool(shards))
        c.start_host("host-b", _pool(shards))
        expected = c.campaign(n)
        watched = None if shards == 1 else cut[0]
        if not wait_until(lambda: c.busy_at_provider("host-a", watched), 60, 0.05):
            res.problems.append("host A never got to the provider")
            return res
        time.sleep(PROVIDER_DELAY / 2)
        for i in cut:
            c.proxies["host-a"][i].cut()
        t_cut = time.monotonic()
        accepted_before = len(c.sg.recorder)
        res.notes.append(f"cut with {c.sg.in_flight} request(s) in flight; lease {LEASE}s")
        while time.monotonic() - t_cut < PARTITION:
            time.sleep(0.5)
        for i in cut:
            c.proxies["host-a"][i].heal()
        res.figures["connections_refused_during_cut"] = sum(c.proxies["host-a"][i].refused for i in cut)
        if shards == 1:
            res.figures["accepted_during_cut"] = len(c.sg.recorder) - accepted_before
        else:  # a shard A is not cut off from goes on sending
            res.figures["accepted_during_cut_per_shard"] = c.accepted_per_shard(accepted_before)
        _status_check(res, c, "host-b", ["host-a", "host-b"], [])
        ok = wait_until(lambda: expected <= {m["delivery_id"] for m in c.sg.recorder.all()}, 240, 0.5)
        res.figures["all_sent_s_after_heal"] = round(time.monotonic() - t_cut - PARTITION, 1) if ok else None
        time.sleep(PROVIDER_DELAY + 1)
        dups = _count(res, c, expected)
        if dups:
            res.problems.append(f"{len(dups)} delivery(ies) sent twice (e.g. {sorted(dups)[:3]})")
            res.figures["duplicated_examples"] = sorted(dups)[:5]
        if c.pools["host-a"].poll() is not None:
            res.problems.append(f"host A's pool exited ({c.pools['host-a'].returncode}): {c.log_tail('host-a')}")
        return res
    finally:
        c.close()


def sentinel_scenario(n: int, mode: str) -> HostResult:
    """Both hosts on one Sentinel-managed Redis (``chaos.sentinel``'s set: a primary, a replica,
    three sentinels); the fault ``mode`` (``chaos.sentinel.FAULTS``: the primary and a sentinel
    killed, or a forced failover) strikes once a quarter of the campaign is accepted, with requests
    at the provider."""
    res = HostResult(f"sentinel: {FAULTS[mode]}")
    if not SENTINEL:
        res.notes.append("redis-sentinel not installed (Debian package redis-sentinel): skipped")
        return res
    c = Cluster(f"sentinel-{mode}", sentinel=True)
    ss = c.sentinel
    assert ss is not None
    try:
        if not ss.ready():
            res.problems.append(f"the sentinel never saw a healthy replica: {ss.logs()}")
            return res
        c.start_host("host-a")
        c.start_host("host-b")
        expected = c.campaign(n)
        if not wait_until(lambda: c.sg.in_flight > 0 and len(c.sg.recorder) >= n // 4, 120, 0.05):
            res.problems.append(f"{n // 4} sends did not reach the provider within 120 s")
            return res
        res.notes.append(
            f"{c.redis_url}; struck with {c.sg.in_flight} request(s) in flight, {len(c.sg.recorder)} accepted before"
        )
        t_fault = time.monotonic()
        if not strike(ss, mode, res):
            return res
        if mode == "failover":
            # until the sentinels demote it, the old primary is a master too, and whatever a client
            # still connected to it writes there (leases, send records, job states) is lost then
            old = ss.client(ss.primary_port)
            demoted = wait_until(lambda: old.info("replication")["role"] != "master", 60, 0.1)
            res.figures["old_primary_master_s_after_fault"] = round(time.monotonic() - t_fault, 1) if demoted else None
        ok = wait_until(lambda: expected <= {m["delivery_id"] for m in c.sg.recorder.all()}, 240, 0.5)
        res.figures["all_sent_s_after_fault"] = round(time.monotonic() - t_fault, 1) if ok else None
        _status_check(res, c, "host-b", ["host-a", "host-b"], [])
        time.sleep(PROVIDER_DELAY + 1)  # late duplicates, if any
        _dups_only_in_doubt(res, c, _count(res, c, expected))
        # left by the failover (see Cluster.settled), not by a job still running: SQL has them all done
        res.figures["running_entries_left"] = c.running()
        for host, p in c.pools.items():
            if p.poll() is not None:
                res.problems.append(f"{host}'s pool exited ({p.returncode}): {c.log_tail(host)}")
        return res
    finally:
        c.close()


SCENARIOS: dict[str, Callable[[int], HostResult]] = {
    "kill": kill_scenario,
    "partition": partition_scenario,
    # the same faults over two Redis shards
    "shards-kill": partial(kill_scenario, shards=2),
    "shards-partition-1": partial(partition_scenario, shards=2, cut=(1,)),
    "shards-partition-both": partial(partition_scenario, shards=2, cut=(0, 1)),
    # one Sentinel-managed Redis failing over under both hosts
    "sentinel-kill": partial(sentinel_scenario, mode="kill"),
    "sentinel-failover": partial(sentinel_scenario, mode="failover"),
}


def _pg_reachable() -> bool:
    try:
        with create_engine(PG_URL).connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:  # noqa: BLE001 - any failure means "not here"
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chaos.multihost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="run only these faults")
    ap.add_argument("--messages", type=int, default=400, help="emails per fault (default 400)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if not _pg_reachable():
        print(f"chaos.multihost: PostgreSQL not reachable at {PG_URL}; skipped", file=sys.stderr)
        return 0
    results = run_each("multihost", args.only or list(SCENARIOS), lambda n: SCENARIOS[n](args.messages), HostResult)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2, default=str))
    else:
        print(f"{'fault':60} {'sent':>9} {'lost':>5} {'duplicated':>10} {'in doubt':>8}")
        for r in results:
            print(f"{r.fault:60} {f'{r.sent}/{r.expected}':>9} {r.lost:>5} {r.duplicated:>10} {r.in_doubt:>8}")
            for note in r.notes:
                print(f"    {note}")
            for p in r.problems:
                print(f"    PROBLEM: {p}")
            print(f"    {json.dumps(r.figures, default=str)}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
