"""Failover across providers, circuit breakers, and the OTP voice escalation: Twilio and SNS
sandboxes over real sockets, the real pipeline."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from notifyctl import keys
from notifyctl.circuit import Circuits
from notifyctl.context import Context
from notifyctl.db import dispose_all
from sandboxes.aws import AwsSandbox
from sandboxes.twilio import TwilioSandbox
from tests.conftest import make_settings
from tests.util import deliveries, drain, events, seed, send
from worker import jobs

SID = "AC" + os.urandom(16).hex()
TOKEN = os.urandom(16).hex()
AWS_KEY, AWS_SECRET = "AKIAFAILOVERTEST0001", os.urandom(12).hex()


@pytest.fixture(scope="module")
def aws() -> Iterator[AwsSandbox]:
    sb = AwsSandbox(access_key_id=AWS_KEY, secret_access_key=AWS_SECRET).start()
    yield sb
    sb.stop()


@pytest.fixture
def twilio() -> Iterator[TwilioSandbox]:
    with TwilioSandbox(account_sid=SID, auth_token=TOKEN) as sb:
        yield sb


def make_ctx(home: Path, redis_url: str, twilio: TwilioSandbox, aws: AwsSandbox, **kw: Any) -> Context:
    opts = {
        "twilio": {"account_sid": SID, "auth_token": TOKEN, "from_number": "+15557650000", "base_url": twilio.url},
        "sns": {"endpoint_url": aws.url, "access_key_id": AWS_KEY, "secret_access_key": AWS_SECRET},
    }
    base: dict[str, Any] = {"providers_sms": ["twilio", "sns"], "provider_options": opts}
    base.update(kw)
    ctx = Context(make_settings(home, redis_url, **base))
    seed(ctx)
    return ctx


@pytest.fixture(autouse=True)
def _cleanup(aws: AwsSandbox) -> Iterator[None]:
    aws.recorder.clear()
    aws.faults.clear()
    yield
    jobs.close()
    dispose_all()


def dead_letter_through_trials(ctx: Context, ids: list[str], cooldown: float = 0.5) -> None:
    """With one attempt left each and the provider still down: after each cooldown one trial
    batch fails (its deliveries are dead-lettered, the circuit opens again) while the others wait
    without using an attempt, until every delivery is dead-lettered."""
    import time

    from worker.reconciler import reconcile

    for _ in range(len(ids) + 2):
        time.sleep(cooldown + 0.1)
        drain(ctx)
        ds = [d for n in ids for d in deliveries(ctx, n)]
        if all(d.dead_lettered for d in ds):
            return
        assert all(d.attempts == 1 for d in ds if not d.dead_lettered)
        reconcile(ctx, now=time.time() + 2, force=True)


def otp(ctx: Context, user: str = "dave") -> str:
    return send(ctx, template_id="otp_code", channels=["sms"], recipient_id=user,
                data={"code": "482913", "minutes": 5}).notification_id  # fmt: skip


def test_sms_outage_fails_over_to_sns_with_nothing_lost(
    home: Path, redis_url: str, rclient: redis.Redis, twilio: TwilioSandbox, aws: AwsSandbox
) -> None:
    twilio.faults.add({"status": 503, "body": {"code": 20500, "message": "down", "status": 503}, "count": -1})
    ctx = make_ctx(home, redis_url, twilio, aws)
    ids = [send(ctx, channels=["sms"], recipient_id=u).notification_id for u in ("alice", "bob", "carol", "dave")]
    drain(ctx)
    ds = [d for n in ids for d in deliveries(ctx, n)]
    assert [(d.status, d.provider) for d in ds] == [("sent", "sns")] * 4
    assert len(twilio.recorder) == 0
    assert sorted(m["phone"] for m in aws.recorder.all() if m["service"] == "sns") == sorted(d.address for d in ds)


def test_circuit_opens_then_traffic_skips_the_failing_provider(
    home: Path, redis_url: str, rclient: redis.Redis, twilio: TwilioSandbox, aws: AwsSandbox
) -> None:
    twilio.faults.add({"status": 503, "body": {"code": 20500, "message": "down", "status": 503}, "count": -1})
    ctx = make_ctx(home, redis_url, twilio, aws, circuit_threshold=2, circuit_cooldown=60)
    for _ in range(2):  # two failing batches open the circuit
        send(ctx, channels=["sms"], recipient_id="alice")
        drain(ctx)
    calls_before = twilio.api_requests
    assert Circuits(ctx.redis, 2, 60).states(["twilio"])["twilio"][0] == "open"
    n = send(ctx, channels=["sms"], recipient_id="bob").notification_id
    drain(ctx)
    assert [(d.status, d.provider) for d in deliveries(ctx, n)] == [("sent", "sns")]
    assert twilio.api_requests == calls_before  # the open circuit kept us away from Twilio
    # the cooldown passes and Twilio is healthy again: one trial batch closes the circuit
    twilio.faults.clear()
    ctx.redis.hset("notif:circuit:twilio", "open_until", "1")
    n2 = send(ctx, channels=["sms"], recipient_id="carol").notification_id
    drain(ctx)
    assert [(d.status, d.provider) for d in deliveries(ctx, n2)] == [("sent", "twilio")]
    assert Circuits(ctx.redis, 2, 60).states(["twilio"])["twilio"][0] == "closed"


def test_every_provider_down_retries_later(
    home: Path, redis_url: str, rclient: redis.Redis, twilio: TwilioSandbox, aws: AwsSandbox
) -> None:
    twilio.faults.add({"status": 503, "body": {"code": 20500, "message": "down", "status": 503}, "count": -1})
    aws.faults.add({"status": 503, "code": "InternalError", "message": "down", "count": -1})
    ctx = make_ctx(home, redis_url, twilio, aws)
    n = send(ctx, channels=["sms"], recipient_id="alice").notification_id
    drain(ctx)
    (d,) = deliveries(ctx, n)
    assert d.status == "retrying" and d.attempts == 1


def test_otp_escalates_to_a_voice_call_when_every_sms_provider_failed(
    home: Path, redis_url: str, rclient: redis.Redis, twilio: TwilioSandbox, aws: AwsSandbox
) -> None:
    twilio.faults.add({"status": 503, "body": {"code": 20500, "message": "down", "status": 503}, "count": -1,
                       "match": "Messages.json"})  # fmt: skip
    aws.faults.add({"status": 503, "code": "InternalError", "message": "down", "count": -1})
    ctx = make_ctx(home, redis_url, twilio, aws, providers_voice=["twilio"])
    nid = otp(ctx)
    normal = send(ctx, channels=["sms"], recipient_id="alice").notification_id
    drain(ctx)
    (d,) = deliveries(ctx, nid)
    assert (d.status, d.provider) == ("sent", "twilio:voice")
    calls = [m for m in twilio.recorder.all() if m["resource"] == "Call"]
    assert len(calls) == 1 and calls[0]["to"] == "+919876543210" and "4 8 2 9 1 3" in calls[0]["twiml"]
    assert [s for _, s in events(ctx, nid)] == ["queued", "sent"]
    # only OTPs escalate; other SMS wait for a retry
    assert deliveries(ctx, normal)[0].status == "retrying"


def twilio_outage(home: Path, redis_url: str, twilio: TwilioSandbox, aws: AwsSandbox) -> tuple[Context, list[str]]:
    """Twilio (the only SMS provider) answering 503 until its faults are cleared, its circuit opening at
    the first failure (cooldown 0.5 s), one retry: an SMS each to alice and bob, tried once."""
    twilio.faults.add({"status": 503, "body": {"code": 20500, "message": "down", "status": 503}, "count": -1})
    ctx = make_ctx(home, redis_url, twilio, aws, providers_sms=["twilio"], retry_delays=[1], circuit_threshold=1,
                   circuit_cooldown=0.5)  # fmt: skip
    ids = [send(ctx, channels=["sms"], recipient_id=u).notification_id for u in ("alice", "bob")]
    drain(ctx)
    return ctx, ids


def test_dlq_entries_of_an_outage_are_replayed_once_the_circuit_closes(
    home: Path, redis_url: str, rclient: redis.Redis, twilio: TwilioSandbox, aws: AwsSandbox
) -> None:
    import time

    from worker.pool import replay_after_outages
    from worker.reconciler import reconcile

    ctx, ids = twilio_outage(home, redis_url, twilio, aws)  # attempt 1 fails, the circuit opens
    assert reconcile(ctx, now=time.time() + 2, force=True).retries_queued == 2
    dead_letter_through_trials(ctx, ids)
    ds = [d for n in ids for d in deliveries(ctx, n)]
    assert [(d.status, d.dead_lettered, d.provider) for d in ds] == [("failed", True, "twilio")] * 2
    assert replay_after_outages(ctx) == 0  # still down: nothing to replay
    # Twilio recovers; after the cooldown one trial batch succeeds and closes the circuit
    twilio.faults.clear()
    time.sleep(0.6)
    trial = send(ctx, channels=["sms"], recipient_id="carol").notification_id
    drain(ctx)
    assert deliveries(ctx, trial)[0].status == "sent"
    assert replay_after_outages(ctx) == 2
    assert replay_after_outages(ctx) == 0  # handed out once
    reconcile(ctx, force=True)
    drain(ctx)
    assert [d.status for n in ids for d in deliveries(ctx, n)] == ["sent", "sent"]
    assert sorted(m["to"] for m in twilio.recorder.all()) == ["+14155550101", "+33612345678", "+447911123456"]


def test_provider_throttling_waits_without_using_attempts(
    home: Path, redis_url: str, rclient: redis.Redis, twilio: TwilioSandbox, aws: AwsSandbox
) -> None:
    import time

    from worker.reconciler import reconcile

    body = {"code": 20429, "message": "Too Many Requests", "status": 429}
    twilio.faults.add({"status": 429, "headers": {"Retry-After": "1"}, "body": body, "count": 6})
    ctx = make_ctx(home, redis_url, twilio, aws, providers_sms=["twilio"], retry_delays=[1])  # 2 attempts only
    ids = [send(ctx, channels=["sms"], recipient_id=u).notification_id for u in ("alice", "bob", "carol")]
    rounds = 0
    while rounds < 15:
        drain(ctx)
        ds = [d for n in ids for d in deliveries(ctx, n)]
        if all(d.status == "sent" for d in ds):
            break
        assert not any(d.dead_lettered for d in ds), "a 429 alone must never dead-letter"
        assert all(d.attempts <= 1 for d in ds)
        rounds += 1
        time.sleep(0.6)  # the provider's Retry-After holds every worker off it for a second
        # the 3 s the reconcile below pretends went by, for the pace the 429s set as well (notifyctl.pacing:
        # its bucket refilled since then), else each round's first job waits ~1.4 s on it
        if rclient.exists(keys.pace("twilio")):
            rclient.hset(keys.pace("twilio"), "ts", time.time() - 3)
        reconcile(ctx, now=time.time() + 3, force=True)
    assert [d.status for n in ids for d in deliveries(ctx, n)] == ["sent"] * 3
    assert rounds >= 2  # it really was throttled for a while
    assert len(twilio.recorder) == 3


def test_after_an_outage_with_no_traffic_left_a_probe_closes_the_circuit_and_replays(
    home: Path, redis_url: str, rclient: redis.Redis, twilio: TwilioSandbox, aws: AwsSandbox
) -> None:
    """Everything was dead-lettered during the outage: no batch is left to try the provider with."""
    import time

    from worker.pool import probe_open_circuits, replay_after_outages
    from worker.reconciler import reconcile

    ctx, ids = twilio_outage(home, redis_url, twilio, aws)
    reconcile(ctx, now=time.time() + 2, force=True)
    dead_letter_through_trials(ctx, ids)
    assert all(d.dead_lettered for n in ids for d in deliveries(ctx, n))
    probes: dict = {}
    time.sleep(0.6)
    assert probe_open_circuits(ctx, probes) == []  # still down: the probe fails, the circuit stays open
    twilio.faults.clear()
    time.sleep(0.6)
    assert probe_open_circuits(ctx, probes) == ["twilio"]
    assert replay_after_outages(ctx) == 2
    reconcile(ctx, force=True)
    drain(ctx)
    assert [d.status for n in ids for d in deliveries(ctx, n)] == ["sent", "sent"]
    for p in probes.values():
        p.close()


def test_an_open_circuit_holds_deliveries_without_using_attempts(
    home: Path, redis_url: str, rclient: redis.Redis, twilio: TwilioSandbox, aws: AwsSandbox
) -> None:
    """Issue 14 F: while every provider circuit of the route is open, no provider is called, so
    no attempt is used: the delivery waits for the circuit, however long the outage lasts."""
    import time

    from worker.reconciler import reconcile

    twilio.faults.add({"status": 503, "body": {"code": 20500, "message": "down", "status": 503}, "count": 1})
    ctx = make_ctx(home, redis_url, twilio, aws, providers_sms=["twilio"], retry_delays=[0, 0],  # 3 attempts
                   circuit_threshold=1, circuit_cooldown=2.0)  # fmt: skip
    nid = otp(ctx)
    drain(ctx)  # the one 503: attempt 1, and the circuit opens
    (d,) = deliveries(ctx, nid)
    assert (d.status, d.attempts) == ("retrying", 1)
    opened = time.monotonic()
    rounds = 0
    while time.monotonic() - opened < 1.5:  # more rounds than the delivery has attempts left
        reconcile(ctx, now=time.time() + 5, force=True)
        drain(ctx)
        (d,) = deliveries(ctx, nid)
        assert (d.status, d.attempts, d.dead_lettered) == ("retrying", 1, False), (d.reason, d.attempts)
        assert "circuit is open" in (d.reason or "")
        rounds += 1
    assert rounds >= 3
    assert len(twilio.recorder) == 0
    time.sleep(max(0.0, 2.1 - (time.monotonic() - opened)))  # the cooldown is over: a trial batch
    reconcile(ctx, now=time.time() + 5, force=True)
    drain(ctx)
    (d,) = deliveries(ctx, nid)
    assert (d.status, d.attempts, d.provider) == ("sent", 2, "twilio")
    assert len(twilio.recorder) == 1
