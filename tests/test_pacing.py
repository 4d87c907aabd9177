"""Pacing to what a provider allows (issue 14 F): a rate per provider shared through Redis,
learned from its 429s; what the pace holds back waits without using an attempt."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import insert

from chaos.common import RateLimitPlan
from notifyctl import keys
from notifyctl.cli.status import plain_lines
from notifyctl.context import Context
from notifyctl.db import dispose_all
from notifyctl.models import Notification, new_id, utcnow
from notifyctl.pacing import Pacer
from sandboxes.sendgrid import SendgridSandbox
from tests.conftest import make_settings
from tests.util import deliveries, seed
from worker import jobs
from worker.pool import run_worker
from worker.status import status_report

API_KEY = "SG.pacing-test-key-0001"


def test_the_pace_starts_at_the_first_throttle_and_drops_once_per_overshoot(rclient: redis.Redis) -> None:
    p = Pacer(rclient)
    assert p.rates(["sg"]) == {"sg": None}
    assert p.take("sg", 100) == (100, 0.0)  # unpaced: nothing held back
    assert p.record("sg", accepted=40, throttled=0) == 0.0
    rate = p.record("sg", accepted=0, throttled=1)  # the first 429: paced at what it accepted
    assert 0.9 * 40 <= rate <= 0.95 * 40 + 1e-9
    granted, wait = p.take("sg", 100)  # the 429 emptied the bucket: the next request in 1/rate s
    assert granted == 0 and 0 < wait <= 1 / rate + 1e-6
    assert p.record("sg", accepted=0, throttled=3) == rate  # the same overshoot answers together: one drop
    assert p.rates(["sg", "other"]) == {"sg": rate, "other": None}
    t0 = time.monotonic()
    time.sleep(1 / rate + 0.01)
    granted, _ = p.take("sg", 100)
    slept = time.monotonic() - t0  # (a loaded machine oversleeps: the bucket refills meanwhile)
    assert 1 <= granted <= int(slept * rate) + 1  # refilled at the rate, no faster
    assert rclient.ttl("notif:pace:sg") > 0  # forgotten after a while without 429s


def test_the_pools_answers_to_the_first_overshoot_start_the_pace_together(rclient: redis.Redis) -> None:
    p = Pacer(rclient)
    # three workers' batches met the provider's first 429s: the first to report knew only its own 5
    first = p.record("sg", accepted=5, throttled=1)
    assert first == pytest.approx(0.95 * 5)
    p.record("sg", accepted=4, throttled=1)
    assert p.record("sg", accepted=6, throttled=1) == pytest.approx(0.95 * 15)  # what the provider let through


def _early_in_a_second(client: redis.Redis) -> float:
    """Redis' clock, read early in a second (the pace counts what was accepted per second of it):
    the calls that follow run in the same second, even on a loaded host."""
    while True:
        sec, usec = client.time()
        if usec < 100_000:
            return sec + usec / 1e6
        time.sleep((1_000_000 - usec) / 1e6)


def test_the_first_ceilings_count_the_providers_bucket_once(rclient: redis.Redis) -> None:
    """What a provider accepted over a second is its rate and what its bucket held when that second
    began: the slow start's last second began with it full (the burst the first answers revealed),
    the probe's overshoot after an empty one (a throttle answer) — not the provider's rate."""
    p = Pacer(rclient)
    pace = keys.pace("sg")
    now = _early_in_a_second(rclient)
    # the slow start at 50/s, whose first answers got a burst of 8 through; 38 accepted this second
    rclient.hset(pace, mapping={"rate": 50.0, "phase": "start", "burst": 8, "last_drop": now - 2,
                                "win": int(now), "cnt": 38, "prev": 0})  # fmt: skip
    p.record("sg", accepted=0, throttled=1)
    assert float(rclient.hget(pace, "ceil") or 0) == pytest.approx(38 - 8)  # not 38: the bucket came off
    assert rclient.hget(pace, "phase") == b"probe"
    assert p.rate("sg") == pytest.approx(0.95 * 30)
    p.record("sg", accepted=5, throttled=0)
    p.record("sg", accepted=7, throttled=0)
    assert int(rclient.hget(pace, "p_cnt") or 0) == 12  # the probe counts what was accepted from its start
    # five seconds on (as if): 199 accepted since, the creep at 46/s meets a throttle answer. The
    # last second's count (44) held part of what the bucket refilled while the pace was under the rate
    now = _early_in_a_second(rclient)
    rclient.hset(pace, mapping={"rate": 46.0, "p_at": now - 5, "p_cnt": 199, "last_drop": now - 5,
                                "win": int(now), "cnt": 43, "prev": 0})  # fmt: skip
    p.record("sg", accepted=1, throttled=1)
    ceil = float(rclient.hget(pace, "ceil") or 0)
    assert ceil == pytest.approx(200 / 5, rel=0.01)  # what it accepted between the two empty buckets
    assert rclient.hget(pace, "phase") == b"steady"
    assert p.rate("sg") == pytest.approx(0.95 * ceil)


def drive(p: Pacer, plan: RateLimitPlan, seconds: float, demand: int = 10) -> list[tuple[float, bool]]:
    """A pool with more to send than the provider allows, paced by ``p``: each call takes what the
    pace grants (up to ``demand``), sends it to ``plan`` until its first 429 and records the
    answers. Returns (monotonic time, accepted) per request."""
    log: list[tuple[float, bool]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        granted, wait = p.take("sg", demand)
        if not granted:
            time.sleep(min(wait, 0.05))
            continue
        ok = throttled = 0
        for _ in range(granted):
            accepted = plan.take("/v3/mail/send") is None
            log.append((time.monotonic(), accepted))
            if not accepted:
                throttled += 1
                break
            ok += 1
        p.record("sg", accepted=ok, throttled=throttled)
    return log


def test_a_learned_pace_stays_just_under_the_limit_without_overshooting_it(rclient: redis.Redis) -> None:
    """Once the pace has learned the provider's limit it keeps just under it: close to all the
    provider allows, and no 429 (each costs its request the Retry-After) — not a sawtooth that
    overshoots the limit every few seconds."""
    allowed = 40.0
    plan = RateLimitPlan(allowed, burst=10, retry_after=2)
    log = drive(Pacer(rclient), plan, 17.0)
    t0 = log[0][0]
    learning = [ok for t, ok in log if t - t0 < 7.0]  # (measured: its last 429 within 3-5.5 s)
    assert not all(learning)  # the limit was met and learned from
    settled = [(t, ok) for t, ok in log if t - t0 >= 7.0]
    span = settled[-1][0] - settled[0][0]
    assert span > 9.0
    # The old sawtooth met the limit every 3-6 s (measured: 2 in 7 s, 3 in 10 s); holding under it,
    # a late 429 is rare (a bunched arrival on a loaded host; in 1 of ~10 runs here) and then alone.
    late = sum(1 for _t, ok in settled if not ok)
    assert late <= 1, f"{late} 429s after the pace had learned the limit"
    rate = sum(1 for _t, ok in settled if ok) / span
    assert 0.9 * allowed <= rate <= allowed + plan.burst / span, rate


def test_a_lone_429_under_a_confirmed_ceiling_keeps_it_a_second_one_lowers_it(rclient: redis.Redis) -> None:
    """Requests that reach the provider bunched together (a stalled host or network) can earn a 429
    under the limit: the pace steps back and returns, not ratchets down with each one."""
    p = Pacer(rclient)
    now = float(rclient.time()[0])
    # a pace that confirmed a ceiling of 40/s ten seconds ago and holds at 97 % of it
    rclient.hset(keys.pace("sg"), mapping={"rate": 38.8, "ceil": 40.0, "phase": "steady", "last_drop": now - 10})
    rate = p.record("sg", accepted=0, throttled=1)
    assert rate == pytest.approx(0.95 * 38.8)
    assert float(rclient.hget(keys.pace("sg"), "ceil") or 0) == 40.0  # kept
    assert p.take("sg", 100)[0] == 0  # the 429 emptied the bucket: held back, so the pace may grow
    assert p.record("sg", accepted=10, throttled=0) == pytest.approx(0.95 * 38.8 + 1.0)  # back up: +10 %/s
    time.sleep(1.05)  # (one drop a second at most)
    lowered = p.record("sg", accepted=0, throttled=1)  # a second one within 3 s: the ceiling too
    assert float(rclient.hget(keys.pace("sg"), "ceil") or 0) == pytest.approx(0.95 * 40.0)  # by 5 %
    assert lowered < rate


@pytest.fixture
def sendgrid() -> Iterator[SendgridSandbox]:
    with SendgridSandbox(api_key=API_KEY) as sb:
        yield sb


def test_a_rate_limited_provider_is_paced_not_hammered(
    home: Path, redis_url: str, rclient: redis.Redis, sendgrid: SendgridSandbox
) -> None:
    allowed = 30.0
    plan = RateLimitPlan(allowed, burst=8, retry_after=1)
    sendgrid.faults = plan
    # one personalization per request: one request per email (different bodies would share one)
    opts = {"sendgrid": {"api_key": API_KEY, "base_url": sendgrid.url, "from_address": "n@notify.example",
                         "max_personalizations": 1}}  # fmt: skip
    ctx = Context(make_settings(home, redis_url, providers_email=["sendgrid"], provider_options=opts, rate_limits=[]))
    seed(ctx)
    users = ["alice", "bob", "carol"]
    n = 100
    now = utcnow()
    rows = [
        {"id": new_id("n"), "recipient_id": users[i % 3], "type": "order_shipped", "template_id": "order_shipped_v2",
         "category": "transactional", "priority": "normal", "channels": ["email"],
         "data": {"order_id": f"O-{i}", "tracking_url": "https://t.example/1"}, "status": "scheduled",
         "due_at": now, "created_at": now, "updated_at": now}
        for i in range(n)
    ]  # fmt: skip
    with ctx.engine.begin() as conn:  # due at once, as a campaign's rows: the reconciler queues them in batches
        conn.execute(insert(Notification), rows)
    ids = [r["id"] for r in rows]
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            run_worker(ctx.settings, ["high", "normal", "low"], burst=True, reconcile=True)
            ds = [d for nid in ids for d in deliveries(ctx, nid)]
            if len(ds) == n and all(d.status == "sent" for d in ds):
                break
            time.sleep(0.2)
        ds = [d for nid in ids for d in deliveries(ctx, nid)]
        assert Counter(d.status for d in ds) == {"sent": n}
        # neither a 429 nor the pace used an attempt
        assert {d.attempts for d in ds} == {1}
        got = Counter(r["custom_args"]["delivery_id"] for r in sendgrid.recorder.all())
        assert len(got) == n and max(got.values()) == 1
        # the provider was throttled, learned from, and paced: few requests refused. Measured here:
        # the sawtooth pace refused 8 of 108, the pace that starts together and doubles to the ceiling
        # (chaos 429 fault: 36.0 -> 38.7/s) 12 of 112, every run (its first ceiling counted the
        # provider's burst: 3 more 429s before the next one found the rate); with the burst taken off,
        # 6-9 of 106-109 in 11 runs at a load of 8-13: the first round's 5-8 (a pool without a pace
        # sends it at once, of which the provider takes its burst of 8; SendGrid's 8 requests in
        # flight meet the 429s) and the slow start's overshoot, one every run.
        assert plan.refused >= 1
        assert plan.refused <= 0.10 * (plan.allowed + plan.refused), (plan.refused, plan.allowed)
        rate = Pacer(ctx.redis).rate("sendgrid")
        assert rate is not None and 0.5 * allowed <= rate <= 1.5 * allowed
        # `notifyctl status` shows it
        rep = status_report(ctx)
        assert rep["providers"]["sendgrid"]["paced_at_per_s"] == round(rate, 1)
        assert f"paced_at={round(rate, 1)}" in " ".join(plain_lines(rep))
    finally:
        jobs.close()
        ctx.close()
        dispose_all()
