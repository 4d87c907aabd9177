"""The six faults of issue 8. Each scenario builds its own ``World`` and returns a ``Result``: what
the provider sandboxes accepted, counted by our delivery id (sent, lost, duplicated), plus notes.

One module: the six, a section each, read side by side (~460 lines); what they share is
``chaos.common`` (the world, the tally, ``Result``), ``chaos.checks`` (what is checked after a
fault) and ``chaos.probes`` (OTP streams and traces running during one)."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

from rq import Worker
from rq.worker.base import BaseWorker
from sqlalchemy import func, select
from sqlmodel import col

from bench.common import wait_until
from chaos.checks import apply_tally, check_pool, count_in_doubt_apart, pct, restarts
from chaos.common import ROOT, RateLimitPlan, Result, Ticker, World, drain, tally
from chaos.probes import OtpStream, ResumeTrace
from notifyctl.circuit import Circuits
from notifyctl.models import Campaign, Delivery, DeliveryEvent, Notification
from notifyctl.pacing import Pacer
from notifyctl.redisconn import ensure_server

POOL = 3


# ---------------------------------------------------------------------------------------------- 1


def workers_killed(quick: bool) -> Result:
    res = Result("1. workers killed (kill -9)")
    n, rate, every = (300, 120.0, 1.0) if quick else (100_000, 2000.0, 3.0)
    world = World("workers")
    try:
        camp = world.users(n)
        otp_users = world.users(400, prefix="p", phones=True, phone_prefix="+1415")
        traps = world.users(40, prefix="t", phones=True, phone_prefix="+1416")
        world.start_pool(POOL)
        expected_map = world.campaign_rows(camp, rate)
        expected = set(expected_map)
        otps = OtpStream(world, otp_users, 0.25).start()
        duration = n / rate
        t0 = time.monotonic()
        kills: list[dict[str, Any]] = []
        trap_i = 0
        traces: list[ResumeTrace] = []
        # both kinds of kill at least once, however short the run (--quick: 2.5 s of campaign)
        while time.monotonic() - t0 < duration or len({k["kind"] for k in kills}) < 2:
            if time.monotonic() - t0 > duration + 30:
                res.problems.append(f"only {len(kills)} kill(s) in {duration + 30:g}s: a kind of kill never happened")
                break
            time.sleep(every)
            if not any(k["kind"] == "otp" for k in kills) or len(kills) % 2 == 0:
                # a transactional job abandoned mid-send: stall one OTP at the sandbox, kill its worker
                uid = traps[trap_i]
                trap_i += 1
                phone = otps.phones.get(uid) or f"+1416{trap_i - 1:07d}"
                world.tw.faults.add({"match": phone[1:], "delay": 8, "drop": True})
                otps.phones[uid] = phone
                nid, did = otps.one(uid, f"9{trap_i:05d}")
                with world.ctx.engine.connect() as conn:
                    job: str | None = conn.execute(
                        select(col(Notification.job_id)).where(col(Notification.id) == nid)
                    ).scalar_one()

                def holder(job: str | None = job) -> BaseWorker | None:
                    for w in Worker.all(connection=world.ctx.redis):
                        if w.get_current_job_id() == job and w.pid in world.worker_pids():
                            return w
                    return None

                victim = wait_until(holder, 10, 0.05) and holder()
                if not victim:
                    res.notes.append("a trap OTP was not picked up within 10 s")
                    continue
                # killed while its request hangs at the sandbox (the trap taken), not before it was
                # sent: else the resumed send would walk into the trap itself and wait out a retry
                if not wait_until(lambda: world.tw.faults.pending() == 0, 5, 0.02):
                    res.notes.append("a trap OTP did not reach the sandbox within 5 s")
                time.sleep(0.1)
                assert victim.pid is not None  # a live worker has its process id
                os.kill(victim.pid, signal.SIGKILL)
                kills.append({"kind": "otp", "at": time.time(), "delivery_id": did})
                traces.append(ResumeTrace(world, victim.name, nid, did, kills[-1]["at"]))
            else:
                pids = world.worker_pids()
                if pids:
                    os.kill(random.choice(pids), signal.SIGKILL)
                    kills.append({"kind": "random", "at": time.time()})
        otps.stop()
        expected |= set(otps.sent)
        ok = drain(world, expected, 180 if not quick else 40)
        res.seconds = round(time.monotonic() - t0, 1)
        accepted = world.accepted_ids()
        apply_tally(res, tally(expected, accepted))
        count_in_doubt_apart(world, res, accepted)
        first: dict[str, float] = {}
        for m in world.tw.recorder.all():
            first.setdefault(m["delivery_id"], m["t"])
        resumes = [round(first[k["delivery_id"]] - k["at"], 1) for k in kills if k["kind"] == "otp"
                   and k["delivery_id"] in first]  # fmt: skip
        lat = otps.latencies(world)
        res.figures["abandoned_otp_traces"] = [t.stop() for t in traces]
        res.figures.update(
            kills=len(kills), otp_kills=sum(1 for k in kills if k["kind"] == "otp"), restarts=restarts(world),
            abandoned_otp_resume_s=resumes, otps=len(otps.sent), otp_latency_p50_s=pct(lat, 0.5),
            otp_latency_p99_s=pct(lat, 0.99), drained=ok,
        )  # fmt: skip
        worst = max(resumes) if resumes else None
        res.notes.append(
            f"{n} campaign emails (SendGrid) + {len(otps.sent)} OTPs (Twilio); {len(kills)} kill -9 every {every:g}s, "
            f"{restarts(world)} restarts; abandoned OTP jobs resumed in max {worst}s (target < 30s)"
        )
        if worst is None or worst >= 30:
            res.problems.append(f"abandoned transactional jobs resumed in {worst}s (target < 30s)")
        check_pool(world, res)
    finally:
        world.close()
    return res


# ---------------------------------------------------------------------------------------------- 2


def launcher_killed(quick: bool) -> Result:
    res = Result("2. campaign launcher killed")
    n = 900 if quick else 5000
    world = World("launcher")
    try:
        users = world.users(n)
        seg = world.dir / "segment.csv"
        with open(seg, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["user_id"])
            w.writerows([u] for u in users)
        world.start_pool(POOL)
        env = world.env(NOTIFY_CAMPAIGN_CHUNK_SIZE="50")
        base = [sys.executable, "-m", "notifyctl.cli.main", "campaign", "launch"]
        args = ["-t", "weekly_promo", "-c", "email", "--segment-csv", str(seg), "--rate", "400", "--quiet-hours",
                "off", "-d", "first_name=F", "-d", "discount=10", "-d", "code=W", "--json"]  # fmt: skip
        t0 = time.monotonic()
        proc = subprocess.Popen(base + args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def written() -> int:
            with world.ctx.engine.connect() as conn:
                return int(conn.execute(select(func.count()).select_from(Notification)).scalar_one())

        target = n // 3
        wait_until(lambda: written() >= target or proc.poll() is not None, 60, 0.01)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        at_kill = written()
        with world.ctx.engine.connect() as conn:
            cid: str = conn.execute(select(col(Campaign.id))).scalar_one()
        if not killed:
            res.problems.append(f"the launcher finished before it could be killed (exit {proc.returncode})")
        r2 = subprocess.run(base + ["--resume", cid, "--json"], env=env, cwd=ROOT, capture_output=True, text=True)
        if r2.returncode != 0:
            res.problems.append(f"relaunch failed (exit {r2.returncode}): {r2.stderr.strip()[-300:]}")
            summary: dict[str, Any] = {}
        else:
            summary = json.loads(r2.stdout)
        with world.ctx.engine.connect() as conn:
            rows = conn.execute(select(col(Notification.id), col(Notification.recipient_id))).all()
        recipients = [r for _n, r in rows]
        skipped = set(users) - set(recipients)
        twice = len(recipients) - len(set(recipients))
        if skipped or twice:
            res.problems.append(f"after relaunch: {len(skipped)} recipient(s) skipped, {twice} written twice")
        expected = {f"{u}@example.com" for u in users}
        drain_ok = wait_until(lambda: expected <= {m["to"] for m in world.sg.recorder.all()}, 120 if not quick else 40)
        time.sleep(2)
        res.seconds = round(time.monotonic() - t0, 1)
        apply_tally(res, tally(expected, [m["to"] for m in world.sg.recorder.all()]))
        res.figures.update(
            killed_after_rows=at_kill, relaunch_written=summary.get("written"),
            relaunch_skipped_existing=summary.get("skipped_existing"), drained=drain_ok,
        )  # fmt: skip
        res.notes.append(
            f"{n} recipients; launcher killed after {at_kill} rows, relaunch --resume wrote "
            f"{summary.get('written')} and skipped {summary.get('skipped_existing')}; counted per address"
        )
        check_pool(world, res)
    finally:
        world.close()
    return res


# ---------------------------------------------------------------------------------------------- 3


def redis_killed(quick: bool) -> Result:
    res = Result("3. redis-server killed")
    n, rate, kill_at, down = (450, 150.0, 2.0, 2.0) if quick else (4000, 200.0, 6.0, 5.0)
    world = World("redis")
    try:
        camp = world.users(n)
        otp_users = world.users(200, prefix="p", phones=True)
        world.start_pool(POOL)
        expected = set(world.campaign_rows(camp, rate))
        otps = OtpStream(world, otp_users, 0.1).start()
        t0 = time.monotonic()
        time.sleep(kill_at)
        otps.stop()  # everything submitted so far was accepted (intake returned) before the crash
        before = len(world.accepted())
        os.kill(world.redis_pid(), signal.SIGKILL)
        time.sleep(down)
        pool_survived_outage = world.pool_alive()
        ensure_server(world.redis_dir)
        t_up = time.time()
        expected |= set(otps.sent)
        ok = drain(world, expected, 180 if not quick else 60)
        res.seconds = round(time.monotonic() - t0, 1)
        apply_tally(res, tally(expected, world.accepted_ids()))
        after = [m["t"] for m in world.accepted() if m["t"] > t_up]
        res.figures.update(
            accepted_before_crash=before, otps=len(otps.sent), otp_submit_errors=otps.errors,
            pool_survived_outage=pool_survived_outage, restarts=restarts(world), drained=ok,
            first_accept_after_restart_s=round(min(after) - t_up, 2) if after else None,
        )  # fmt: skip
        log_text = world.pool_tail(10**7)
        warned = [ln for ln in log_text.splitlines() if "Redis unreachable" in ln or "Redis answers again" in ln]
        tracebacks = log_text.count("Traceback")
        res.figures.update(pool_log_outage_lines=len(warned), pool_log_tracebacks=tracebacks)
        res.notes.append(
            f"{n} emails + {len(otps.sent)} OTPs accepted; kill -9 at {kill_at:g}s ({before} already sent), "
            f"down {down:g}s, restarted from AOF; {restarts(world)} worker restarts; the pool logged the outage "
            f"in {len(warned)} lines, {tracebacks} tracebacks"
        )
        if not after:
            res.problems.append("nothing was sent after the restart: the crash interrupted no work")
        if tracebacks:
            res.problems.append(f"{tracebacks} tracebacks in the pool's log for a Redis outage it survived")
        if len(warned) != 2:
            res.problems.append(f"the outage took {len(warned)} warning lines in the pool's log, not 2 (start, end)")
        check_pool(world, res)
    finally:
        world.close()
    return res


# ---------------------------------------------------------------------------------------------- 4


def provider_outage(quick: bool) -> Result:
    res = Result("4. provider outage (503)")
    n, rate, start, window = (240, 60.0, 1.0, 5.0) if quick else (1500, 25.0, 10.0, 120.0)
    # quick: one retry, so that the half-open probes that fail during the window exhaust some
    # deliveries' attempts: they reach the DLQ and the automatic replay after recovery is exercised
    delays, cooldown = ([1], 2.0) if quick else ([5, 10, 20], 10.0)
    world = World("outage", {"retry_delays": delays, "circuit_threshold": 3, "circuit_cooldown": cooldown})
    try:
        camp = world.users(n)
        world.start_pool(POOL)
        expected = set(world.campaign_rows(camp, rate))
        circuits = Circuits(world.ctx.redis, 3, cooldown)
        seen: dict[str, Any] = {"open": 0, "dlq_peak": 0}

        def watch() -> None:
            st = circuits.all_states(["sendgrid"])["sendgrid"]["state"]
            if st == "open":
                seen["open"] += 1
            seen["dlq_peak"] = max(seen["dlq_peak"], world.dead_lettered())

        ticker = Ticker(0.5, watch).start()
        t0 = time.monotonic()
        time.sleep(start)
        world.sg.faults.add({"status": 503, "count": -1, "body": {"errors": [{"message": "service unavailable"}]}})
        answered_503_from = world.sg.api_requests
        time.sleep(window)
        world.sg.faults.clear()
        during = world.sg.api_requests - answered_503_from
        t_rec = time.monotonic()
        ok = drain(world, expected, 180 if not quick else 60)
        recovered_in = round(time.monotonic() - t_rec, 1)
        ticker.stop()
        res.seconds = round(time.monotonic() - t0, 1)
        apply_tally(res, tally(expected, world.accepted_ids()))
        final = circuits.all_states(["sendgrid"])["sendgrid"]["state"]
        with world.ctx.engine.connect() as conn:
            max_attempts = conn.execute(select(func.max(Delivery.attempts))).scalar_one()
            replayed = conn.execute(
                select(func.count()).select_from(DeliveryEvent)
                .where(DeliveryEvent.detail.like("replayed from the DLQ%"))  # type: ignore[union-attr]
            ).scalar_one()  # fmt: skip
        res.figures.update(
            requests_answered_503=during, circuit_seen_open=seen["open"] > 0, circuit_final=final,
            dlq_peak=seen["dlq_peak"], replayed_from_dlq=replayed, dlq_after=world.dead_lettered(),
            max_attempts=max_attempts,
            all_delivered_after_recovery_s=recovered_in, drained=ok,
        )  # fmt: skip
        res.notes.append(
            f"{n} emails; SendGrid 503 for {window:g}s ({during} requests refused), retries {delays}s; circuit "
            f"{'opened' if seen['open'] else 'NEVER opened'} and is {final}; DLQ peaked at {seen['dlq_peak']}, "
            f"{world.dead_lettered()} left after auto-replay; all sent {recovered_in}s after recovery"
        )
        if not seen["open"]:
            res.problems.append("the circuit never opened during the outage")
        if not seen["dlq_peak"]:
            res.problems.append("nothing reached the DLQ during the outage: the automatic replay was not exercised")
        if not replayed:
            res.problems.append("no delivery was replayed from the DLQ after recovery")
        if final != "closed":
            res.problems.append(f"the circuit is {final} after recovery")
        if world.dead_lettered():
            res.problems.append(f"{world.dead_lettered()} deliveries still dead-lettered after recovery")
        check_pool(world, res)
    finally:
        world.close()
    return res


# ---------------------------------------------------------------------------------------------- 5


def rate_limited(quick: bool) -> Result:
    res = Result("5. provider rate limit (429)")
    n, allowed = (150, 60.0) if quick else (800, 40.0)
    delays = [1, 2, 4, 8, 16, 32]
    # one email a request (different bodies would share one): the rate limit counts requests
    world = World("ratelimit", {"retry_delays": delays, "circuit_threshold": 5, "circuit_cooldown": 3.0,
                                "sendgrid_options": {"max_personalizations": 1}})  # fmt: skip
    try:
        camp = world.users(n)
        plan = RateLimitPlan(allowed, burst=int(allowed // 4) or 1, retry_after=2)
        world.sg.faults = plan
        world.start_pool(POOL)
        t0 = time.monotonic()
        expected = set(world.campaign_rows(camp, 10000.0, personal=True))  # all due at once: demand >> allowed rate
        ok = drain(world, expected, 150 if not quick else 50)
        res.seconds = round(time.monotonic() - t0, 1)
        apply_tally(res, tally(expected, world.accepted_ids()))
        # the check's window: first to last acceptance, warm-up (learning the limit) and drain
        # included, as a campaign would see it; for where the time went, the rate between the 10 %
        # and 90 % marks (no warm-up, no drain), the allowance nobody used and the last 429
        ts = sorted(m["t"] for m in world.sg.recorder.all())
        span = (ts[-1] - ts[0]) if len(ts) > 1 else float("nan")
        got_rate = round(len(ts) / span, 1) if span and span == span else float("nan")
        lo, hi = int(0.1 * (len(ts) - 1)), int(0.9 * (len(ts) - 1))
        settled = round((hi - lo) / (ts[hi] - ts[lo]), 1) if hi > lo and ts[hi] > ts[lo] else None
        unused = round(plan.unused_between(ts[0], ts[-1]), 2) if ts else None
        last_429 = round(max(plan.refused_at) - ts[0], 1) if ts and plan.refused_at else None
        with world.ctx.engine.connect() as conn:
            attempts: dict[int, int] = dict(
                conn.execute(select(col(Delivery.attempts), func.count()).group_by(col(Delivery.attempts))).all()
            )
        dlq = world.dead_lettered()
        requests = plan.allowed + plan.refused
        share_429 = round(plan.refused / requests, 3) if requests else 0.0
        paced_at = Pacer(world.ctx.redis).rate("sendgrid")
        res.figures.update(
            allowed_per_s=allowed, accepted_per_s=got_rate, requests=requests, answered_429=plan.refused,
            share_429=share_429, paced_at_per_s=round(paced_at, 1) if paced_at else None, dlq=dlq,
            attempts_histogram={int(k): int(v) for k, v in attempts.items()}, drained=ok,
            accepted_per_s_settled=settled, allowance_unused_s=unused, last_429_after_s=last_429,
        )  # fmt: skip
        res.notes.append(
            f"{n} emails due at once, SendGrid allows {allowed:g} req/s (429 Retry-After 2 beyond): accepted at "
            f"{got_rate}/s ({settled}/s between its 10 % and 90 % marks; {unused} s of the allowance unused, "
            f"the last 429 at +{last_429} s), {plan.refused} of {requests} requests answered 429 ({share_429:.1%}), "
            f"paced at {paced_at or 0:.1f}/s at the end, DLQ {dlq}, max attempts {max(attempts or {0: 0})} of "
            f"{len(delays) + 1} (the pool paces itself to the rate learned from the 429s, shared by every worker; "
            f"a 429 or a message held by the pace waits without using an attempt, so a 429 storm never dead-letters)"
        )
        if not plan.refused:
            res.problems.append("SendGrid never answered 429: the rate limit was not exercised")
        if dlq:
            res.problems.append(f"{dlq} deliveries reached the DLQ for 429s alone")
        # the pace's targets (issue 14 F); --quick sends 2.5 s worth, mostly spent learning the rate
        if not quick and not got_rate >= 0.8 * allowed:
            res.problems.append(f"accepted {got_rate}/s, under 80 % of the {allowed:g}/s SendGrid allows")
        if not quick and share_429 > 0.10:
            res.problems.append(f"{share_429:.1%} of requests were answered 429 (more than 10 %): not paced")
        check_pool(world, res)
    finally:
        world.close()
    return res


# ---------------------------------------------------------------------------------------------- 6


def hung_provider(quick: bool) -> Result:
    res = Result("6. hung provider (timeouts)")
    n, rate, start, window = (200, 100.0, 1.0, 3.0) if quick else (1000, 40.0, 3.0, 30.0)
    delays = [1, 2, 3, 4, 5, 6] if quick else [2, 4, 8, 16, 32]
    world = World("hung", {"retry_delays": delays, "circuit_threshold": 3, "circuit_cooldown": 3.0})
    world.overrides["provider_options"]["sendgrid"]["timeout"] = 2.0
    world.settings.provider_options["sendgrid"]["timeout"] = 2.0
    try:
        camp = world.users(n)
        world.start_pool(POOL)
        expected = set(world.campaign_rows(camp, rate))
        seen = {"min_alive": POOL, "samples": 0}

        def watch() -> None:
            seen["min_alive"] = min(seen["min_alive"], world.alive_workers())
            seen["samples"] += 1

        t0 = time.monotonic()
        time.sleep(start)
        ticker = Ticker(0.5, watch).start()
        # the provider stops answering: every request hangs 5s (timeout is 2s) and the connection drops
        world.sg.faults.add({"delay": 5, "drop": True, "count": -1})
        hung_from = world.sg.api_requests
        time.sleep(window)
        world.sg.faults.clear()
        hung = world.sg.api_requests - hung_from
        t_rec = time.monotonic()
        ok = drain(world, expected, 180 if not quick else 45)
        recovered_in = round(time.monotonic() - t_rec, 1)
        ticker.stop()
        res.seconds = round(time.monotonic() - t0, 1)
        apply_tally(res, tally(expected, world.accepted_ids()))
        res.figures.update(
            min_alive_workers_during=seen["min_alive"], restarts=restarts(world), dlq=world.dead_lettered(),
            requests_hung=hung,
            all_delivered_after_recovery_s=recovered_in, drained=ok, queues_empty=world.queues_empty(),
        )  # fmt: skip
        res.notes.append(
            f"{n} emails; SendGrid hangs 5s then drops (timeout 2s) for {window:g}s: workers alive throughout "
            f"(min {seen['min_alive']}/{POOL} heartbeats), {restarts(world)} restarts, all sent {recovered_in}s "
            f"after recovery, DLQ {world.dead_lettered()}"
        )
        if not hung:
            res.problems.append("no request reached SendGrid while it hung: the hang was not exercised")
        if seen["min_alive"] < POOL:
            res.problems.append(f"a worker stopped heartbeating during the hang ({seen['min_alive']}/{POOL} alive)")
        if not world.queues_empty():
            res.problems.append("queues not empty after recovery")
        check_pool(world, res)
    finally:
        world.close()
    return res


SCENARIOS = {
    "workers": workers_killed,
    "launcher": launcher_killed,
    "redis": redis_killed,
    "outage": provider_outage,
    "ratelimit": rate_limited,
    "hung": hung_provider,
}
