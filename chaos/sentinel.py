"""One module: the Sentinel set (primary, replicas, sentinels) and the two faults played on it share
its processes and ports; ~410 lines.

``python -m chaos.sentinel [--quick] [--only kill|failover] [--json]`` (part of ``make chaos``):
Redis Sentinel failing over mid-blast (issue 18, item 4).

Three real ``redis-sentinel`` processes (Debian's package; quorum 2) watch a primary and one
replica (each a ``redis-server`` with AOF, on held 127.0.0.1 ports). ``notifyctl worker --pool 2`` and the
harness's own sends (a campaign queued by the reconciler, OTPs submitted through intake) all go
through a ``redis+sentinel://`` URL; the SendGrid sandbox holds every request 0.3 s, so batches are
at the provider when the fault strikes:

- **kill**: the primary is killed (SIGKILL) while sends are in flight, and with it the first
  sentinel the URL names (as when their host dies). Just before, the replica is frozen (SIGSTOP)
  and its link cut (``CLIENT KILL TYPE replica``) and OTPs are submitted: the primary acknowledges
  them, never replicates them, and dies. Their queue jobs are gone from the
  new primary (counted on it); the reconciler finds their notifications ``queued`` in SQL with a
  job that no longer exists and queues them again — SQL is the source of truth.
- **failover**: ``SENTINEL FAILOVER`` is forced while sends are in flight: the replica is promoted,
  the old primary demoted (clients on it get READONLY and reconnect to the new one).

Counted at the sandbox by our delivery id: sent / lost / duplicated / in doubt. Lost must be 0;
a duplicate is allowed only for a delivery recorded ``in_doubt`` (its worker had the request at the
provider when its lease was lost), as the other faults count it (``resent_in_doubt``).
Exit 0 with a note when ``redis-sentinel`` is not installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import func, select
from sqlmodel import col

from bench.common import wait_until
from chaos.checks import apply_tally, check_pool, count_in_doubt_apart
from chaos.common import Result, World, run_each, tally
from chaos.probes import OtpStream
from notifyctl import keys
from notifyctl.models import Notification, User
from tests.net import ReservedPorts, listening

SERVER = shutil.which("redis-server")
SENTINEL = shutil.which("redis-sentinel")
SERVICE = "notify-chaos"
POOL = 2
PROVIDER_DELAY = 0.3


def _master(sentinel: redis.Redis) -> dict[str, Any]:
    """What a sentinel knows of the service's primary (redis-py answers ``SENTINEL MASTERS`` as a
    dict by name, though its stubs say a list)."""
    masters: dict[str, dict[str, Any]] = sentinel.sentinel_masters()  # type: ignore[assignment]
    return masters[SERVICE]


class SentinelSet:
    """A primary and two replicas (AOF on, as a production Redis; the second never promoted), three
    sentinels (quorum 2), as the README advises: a failover needs two sentinels to agree the primary
    is down and a majority to elect the one that carries it out."""

    def __init__(self, root: Path, sentinels: int = 3) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        with ReservedPorts(3 + sentinels) as ports:
            self.primary_port, self.replica_port, self.replica2_port = ports.base, ports.base + 1, ports.base + 2
            self.sentinel_ports = [ports.base + 3 + i for i in range(sentinels)]
            self._server("primary", self.primary_port)
            self._server("replica", self.replica_port, "--replicaof", "127.0.0.1", str(self.primary_port))
            # a second replica, never promoted (priority 0: the faults' new primary is always the
            # first), so that one still acknowledges a batch's lease (worker.claims: WAIT) once its
            # primary is killed or demoted; with one replica, sends would pause until it is back
            self._server(
                "replica2",
                self.replica2_port,
                *("--replicaof", "127.0.0.1", str(self.primary_port), "--replica-priority", "0"),
            )
            # the sentinels start once the servers answer: started with them, on a loaded machine a
            # sentinel could find the primary not yet listening and fail over before the run began
            self._wait_listening([self.primary_port, self.replica_port, self.replica2_port])
            for i, port in enumerate(self.sentinel_ports):
                conf = root / f"sentinel{i}.conf"  # each its own: a sentinel rewrites its file
                conf.write_text(
                    f"port {port}\nbind 127.0.0.1\ndir {root}\n"
                    f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} {sentinels // 2 + 1}\n"
                    f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                    f"sentinel failover-timeout {SERVICE} 10000\n"
                    f"sentinel known-replica {SERVICE} 127.0.0.1 {self.replica_port}\n"
                    f"sentinel known-replica {SERVICE} 127.0.0.1 {self.replica2_port}\n"
                )
                self._start(f"sentinel{i}", [str(SENTINEL), str(conf)])
            # held until each listens: released before, an outgoing connection could take one
            self._wait_listening(self.sentinel_ports)
        # the harness asks the last one: the kill fault takes the first one down with the primary
        self.sentinel = redis.Redis(port=self.sentinel_ports[-1], decode_responses=True)
        where = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        self.url = f"redis+sentinel://{where}/{SERVICE}/0"

    def _wait_listening(self, ports: list[int]) -> None:
        for port in ports:
            if not wait_until(lambda port=port: listening(port), 30, 0.05):
                raise RuntimeError(f"nothing listening on {port}: {self.logs()}")

    def _server(self, name: str, port: int, *extra: str) -> None:
        d = self.root / name
        d.mkdir()
        args = [str(SERVER), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", ""]
        self._start(name, [*args, "--appendonly", "yes", "--appendfsync", "everysec", *extra])

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - the process keeps it
        self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def logs(self) -> dict[str, list[str]]:
        return {f.name: f.read_text(errors="replace").splitlines()[-5:] for f in self.root.glob("*.log")}

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, decode_responses=True, socket_timeout=5)

    def ready(self) -> bool:
        """The replica in sync and known to the sentinel as healthy (a failover needs one)."""

        def ok() -> bool:
            try:
                if self.client(self.replica_port).info("replication").get("master_link_status") != "up":
                    return False
                reps = self.sentinel.sentinel_slaves(SERVICE)
            except redis.RedisError:
                return False
            if not any(r["is_slave"] and not r["is_sdown"] and r["master-link-status"] == "ok" for r in reps):
                return False
            # the sentinels found each other (hello messages through the primary, every 2 s)
            others = len(self.sentinel_ports) - 1
            for port in self.sentinel_ports:
                state = _master(redis.Redis(port=port, decode_responses=True))
                if int(state["num-other-sentinels"]) < others:
                    return False
            return True

        return wait_until(ok, 60, 0.1)

    def switched_to(self, port: int) -> bool:
        """The sentinel names ``port`` as the primary, not down, and that server is a master."""
        try:
            state = _master(self.sentinel)  # one of three: all agree by then
            if state["port"] != port or state["is_sdown"] or state["is_odown"]:
                return False
            return bool(self.client(port).info("replication")["role"] == "master")
        except redis.RedisError:
            return False

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


FAULTS = {
    "kill": "primary + 1 sentinel killed (SIGKILL) mid-blast",
    "failover": "SENTINEL FAILOVER forced mid-blast",
}


def strike(ss: SentinelSet, mode: str, res: Result) -> bool:
    """The fault ``mode`` (``FAULTS``), then wait until the sentinel names the replica as the primary:
    its seconds in ``res.figures["failover_s"]``; False (and a problem) if it did not within 60 s.

    - ``kill``: the primary's host dies, and the sentinel on it (the first the URL names): the other
      two still make the quorum and a majority. (A replica frozen before is thawed.)
    - ``failover``: ``SENTINEL FAILOVER``: the replica is promoted, the old primary demoted."""
    if mode == "kill":
        for name in ("primary", "sentinel0"):
            ss.procs[name].kill()
            ss.procs[name].wait()
        ss.procs["replica"].send_signal(signal.SIGCONT)
    else:
        ss.sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)  # type: ignore[no-untyped-call]
    t_fault = time.monotonic()
    switched = wait_until(lambda: ss.switched_to(ss.replica_port), 60, 0.05)
    res.figures["failover_s"] = round(time.monotonic() - t_fault, 2) if switched else None
    if not switched:
        res.problems.append(f"the sentinel did not switch to the replica within 60 s: {ss.logs()}")
    return switched


class _Otps(OtpStream):
    """OtpStream that also keeps what each refused submit raised (while no primary is named)."""

    def __init__(self, world: World, users: list[str], every: float) -> None:
        super().__init__(world, users, every)
        self.kinds: dict[str, int] = {}

    def one(self, uid: str, code: str) -> tuple[str, str]:
        try:
            return super().one(uid, code)
        except Exception as exc:
            k = f"{type(exc).__name__}: {str(exc)[:120]}"
            self.kinds[k] = self.kinds.get(k, 0) + 1
            raise


def _window_otps(world: World, ss: SentinelSet, otps: OtpStream, users: list[str], res: Result) -> dict[str, str]:
    """Freeze the replica and cut its link, then submit OTPs: the primary acknowledges them and never
    replicates them. Returns notification id -> RQ job id (read from SQL), to look for on the new
    primary."""
    with world.ctx.engine.connect() as conn:
        rows = conn.execute(select(col(User.id), col(User.phone)).where(col(User.id).in_(users))).all()
        otps.phones.update({uid: phone for uid, phone in rows})
    replica = ss.procs["replica"]
    replica.send_signal(signal.SIGSTOP)
    primary = ss.client(ss.primary_port)
    primary.client_kill_filter(_type="replica")
    nids = []
    for i, uid in enumerate(users):
        try:
            nid, _did = otps.one(uid, f"7{i:05d}")
            nids.append(nid)
        except Exception as exc:  # noqa: BLE001 - counted
            res.notes.append(f"a window OTP was refused: {type(exc).__name__}")
    offsets = primary.info("replication")
    res.figures["primary_repl_offset_at_kill"] = offsets.get("master_repl_offset")
    with world.ctx.engine.connect() as conn:
        got = conn.execute(
            select(col(Notification.id), col(Notification.job_id)).where(col(Notification.id).in_(nids))
        ).all()
    return {nid: job for nid, job in got if job}


def sentinel_fault(mode: str, quick: bool) -> Result:
    title = FAULTS[mode]
    res = Result(f"sentinel: {title}")
    n, rate = (300, 100.0) if quick else (3000, 150.0)
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"notify-chaos-sentinel-{mode}-{os.getpid()}"
    ss = SentinelSet(root)
    world: World | None = None
    try:
        if not ss.ready():
            res.problems.append(f"the sentinel never saw a healthy replica: {ss.logs()}")
            return res
        # one email a request, each held 0.3 s at the sandbox: a batch is at the provider for seconds
        world = World(f"sentinel-{mode}", {"sendgrid_options": {"max_personalizations": 1}}, redis_url=ss.url)
        world.sg.faults.add({"delay": PROVIDER_DELAY, "count": -1})
        camp = world.users(n)
        otp_users = world.users(400, prefix="p", phones=True)
        window_users = world.users(20, prefix="w", phones=True, phone_prefix="+1417")
        world.start_pool(POOL)
        expected_campaign = set(world.campaign_rows(camp, rate, personal=True))
        otps = _Otps(world, otp_users, 0.1).start()
        t0 = time.monotonic()
        # mid-blast: a quarter of the campaign sent, requests at the provider
        if not wait_until(lambda: world.sg.in_flight > 0 and len(world.accepted()) >= n // 4, 120, 0.02):
            res.problems.append(f"{n // 4} sends did not reach the provider within 120 s")
            return res
        before = len(world.accepted())
        in_flight = world.sg.in_flight
        new = ss.replica_port  # the sentinel promotes the one replica
        window_jobs: dict[str, str] = {}
        if mode == "kill":
            window_jobs = _window_otps(world, ss, otps, window_users, res)
        t_fault_wall = time.time()
        if not strike(ss, mode, res):
            return res
        if window_jobs:
            newp = ss.client(new)
            pipe = newp.pipeline(transaction=False)
            for j in window_jobs.values():
                pipe.exists(keys.rq_job(j))
            missing = sum(1 for e in pipe.execute() if not e)
            res.figures["window_otps"] = len(window_jobs)
            res.figures["window_jobs_lost_at_failover"] = missing
        time.sleep(2.0)  # sends keep coming through the new primary
        otps.stop()
        # expected: every notification SQL accepted (an OTP refused during the failover was never
        # committed, or was: then it must be sent too), from the users' addresses
        with world.ctx.engine.connect() as conn:
            nids = [
                r[0] for r in conn.execute(select(col(Notification.id)).where(col(Notification.campaign_id).is_(None)))
            ]
        expected = expected_campaign | world.expected_for(nids, "sms")
        ok = wait_until(lambda: expected <= set(world.accepted_ids()), 180 if not quick else 60, 0.25)
        t_all = time.monotonic()

        def settled() -> bool:
            with world.ctx.engine.connect() as conn:
                open_ = conn.execute(
                    select(func.count()).select_from(Notification)
                    .where(Notification.status.not_in(["done", "suppressed"]))  # type: ignore[attr-defined]
                ).scalar_one()  # fmt: skip
            return int(open_) == 0

        wait_until(settled, 60, 0.5)
        time.sleep(max(0.0, PROVIDER_DELAY * 3 - (time.monotonic() - t_all)))  # late duplicates, if any
        res.seconds = round(time.monotonic() - t0, 1)
        accepted = world.accepted_ids()
        apply_tally(res, tally(expected, accepted))
        count_in_doubt_apart(world, res, accepted)
        if not settled():
            res.problems.append("notifications still open in SQL after every send was accepted")
        if window_jobs:
            # recovered how: each lost job's notification queued again under a new job id (the
            # reconciler's search for queued notifications whose job is gone), and sent once
            with world.ctx.engine.connect() as conn:
                now_jobs: dict[str, str | None] = dict(
                    conn.execute(
                        select(col(Notification.id), col(Notification.job_id))
                        .where(col(Notification.id).in_(list(window_jobs)))
                    ).all()
                )  # fmt: skip
            first: dict[str, float] = {}
            for m in world.tw.recorder.all():
                first.setdefault(m["delivery_id"], m["t"])
            # a worker may have taken a window OTP off the old primary and sent it before the kill;
            # every other one must have been queued again under a new job
            sent_before, requeued, neither = 0, 0, []
            waits = []
            for nid, job in window_jobs.items():
                (did,) = world.expected_for([nid], "sms")
                if did in first and first[did] < t_fault_wall:
                    sent_before += 1
                elif now_jobs.get(nid) != job:
                    requeued += 1
                    waits.append(first.get(did, float("nan")) - t_fault_wall)
                else:
                    neither.append(nid)
            res.figures.update(
                window_sent_before_fault=sent_before, window_requeued_under_new_job=requeued,
                window_requeued_sent_s_after_fault=[round(min(waits), 1), round(max(waits), 1)] if waits else None,
            )  # fmt: skip
            if neither:
                res.problems.append(f"{len(neither)} window OTP(s) neither sent before the fault nor queued again")
            if not requeued:
                res.problems.append("no lost job had to be queued again: the recovery was not exercised")
        res.figures.update(
            accepted_before_fault=before, in_flight_at_fault=in_flight, otps=len(nids),
            otp_submit_errors=otps.errors, otp_rows_for_refused_submits=len(nids) - len(otps.sent),
            otp_submit_error_kinds=otps.kinds, campaign=n, drained=ok,
            pool_restarts=world.pool_tail(10**7).count("restarting"),
        )  # fmt: skip
        res.notes.append(
            f"{n} campaign emails + {len(nids)} OTPs through {ss.url}; {title} with {in_flight} request(s) "
            f"in flight, {before} accepted before; sentinel switched in {res.figures['failover_s']}s"
            + (
                f"; {res.figures['window_jobs_lost_at_failover']} of {len(window_jobs)} OTP jobs acknowledged "
                f"but never replicated were gone from the new primary ({res.figures['window_sent_before_fault']} "
                f"already sent from the old one, {res.figures['window_requeued_under_new_job']} queued again "
                "from SQL by the reconciler)"
                if window_jobs
                else ""
            )
        )
        if mode == "kill" and not res.figures.get("window_jobs_lost_at_failover"):
            res.problems.append("no acknowledged write was lost at the failover: the recovery was not exercised")
        check_pool(world, res)
        return res
    finally:
        if world is not None:
            world.close()
        ss.stop()
        if not os.environ.get("NOTIFY_CHAOS_KEEP"):
            shutil.rmtree(root, ignore_errors=True)


SCENARIOS = {"kill": lambda q: sentinel_fault("kill", q), "failover": lambda q: sentinel_fault("failover", q)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chaos.sentinel", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="run only these faults")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if not SERVER or not SENTINEL:
        print("chaos.sentinel: redis-sentinel not installed (Debian package redis-sentinel); skipped", file=sys.stderr)
        return 0
    results = run_each(
        "sentinel", args.only or list(SCENARIOS), lambda n: SCENARIOS[n](args.quick), lambda n: Result(f"sentinel: {n}")
    )
    if args.json:
        print(json.dumps({"quick": args.quick, "results": [r.to_dict() for r in results]}, indent=2, default=str))
    else:
        for r in results:
            doubt, resent = r.figures.get("in_doubt", 0), r.figures.get("resent_in_doubt", 0)
            print(f"{r.fault}: sent {r.sent}/{r.expected}, lost {r.lost}, duplicated {r.duplicated}, "
                  f"in doubt {doubt} (resent {resent})")  # fmt: skip
            for note in r.notes:
                print(f"    {note}")
            for p in r.problems:
                print(f"    PROBLEM: {p}")
            extra = {k: v for k, v in r.figures.items() if k not in ("pool_log_tail", "pool_log_first_traceback")}
            print(f"    {json.dumps(extra, default=str)}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
