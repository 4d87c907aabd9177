"""Fenced leases (issue 18): a worker that no longer holds a delivery never calls a provider for
it; a lease is taken over only once expired, and one taken over in flight is sent again and
recorded as in doubt. Real Redis, real SQLite, the SendGrid sandbox over a socket."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import select
from sqlmodel import Session

from notifyctl import keys, metrics
from notifyctl.context import Context
from notifyctl.models import DeliveryEvent
from sandboxes.sendgrid import SendgridSandbox
from tests.conftest import make_settings
from tests.util import deliveries, seed, send, wait_for
from worker.claims import BUSY, DOUBT, OK, Claims
from worker.pipeline import Runtime, delivery_id, process
from worker.status import status_report

API_KEY = "SG.fencing-test-key"


def expire(c: Claims, did: str, other: Claims) -> str:
    """Wait until ``c``'s lease on ``did`` has run out (Redis's clock), as seen by ``other``; returns
    what ``other.take`` answered then."""
    c.drop()
    got = wait_for(lambda: (r := other.take([did])[0]) != BUSY and r, 10, 0.02)
    assert got, "the lease never expired"
    return got


def test_a_lease_blocks_until_it_expires_whatever_the_liveness_key(rclient: redis.Redis) -> None:
    a, b = Claims(rclient, "host-a-1", 0.3, 60), Claims(rclient, "host-b-1", 0.3, 60)
    try:
        assert a.take(["d1"]) == [OK]
        a.drop()  # no renewal: the lease runs for 0.3 s
        # no liveness key for host-a-1 at all, yet B waits for the lease
        assert rclient.exists(keys.alive("host-a-1")) == 0
        assert b.take(["d1"]) == [BUSY]
        assert expire(a, "d1", b) == OK  # claimed, never in flight: not in doubt
    finally:
        a.close()
        b.close()


def test_a_lease_taken_over_in_flight_is_in_doubt(rclient: redis.Redis) -> None:
    a, b = Claims(rclient, "host-a-1", 0.3, 60), Claims(rclient, "host-b-1", 0.3, 60)
    try:
        assert a.take(["d1", "d2"]) == [OK, OK]
        assert a.fence(["d1"]) == [True]  # A calls the provider for d1 only, then dies
        a.drop()  # (killed: no more renewal)
        got = wait_for(lambda: (r := b.take(["d1", "d2"]))[0] != BUSY and r, 10, 0.02)
        assert got == [DOUBT + "host-a-1", OK]  # taken over once expired; only d1 had been in flight
        # A, back, is fenced off: its lease on d1 is B's now
        assert a.fence(["d1", "d2"]) == [False, False]
        assert b.fence(["d1", "d2"]) == [True, True]
        # A's cleanup releases only its own leases (compare-and-delete): B's stay
        a.settle({}, ["d1", "d2"])
        assert rclient.get(keys.sent("d1")).startswith(b"lease|host-b-1|")
        # what A's provider accepted is still recorded (the truth), and B's fence then refuses to send it
        a.settle({"d2": "pm-a"}, [])
        assert b.fence(["d2"]) == [False]
        b.settle({"d1": "pm-b"}, ["d2"])
        assert rclient.mget([keys.sent("d1"), keys.sent("d2")]) == [b"sent:pm-b", b"sent:pm-a"]
    finally:
        a.close()
        b.close()


def test_leases_are_renewed_while_held(rclient: redis.Redis) -> None:
    a, b = Claims(rclient, "host-a-1", 0.3, 60), Claims(rclient, "host-b-1", 0.3, 60)
    try:
        assert a.take(["d1"]) == [OK]
        assert wait_for(lambda: a.renewals >= 6, 10, 0.02)  # > 3 lease lengths later
        assert b.take(["d1"]) == [BUSY]
        assert a.fence(["d1"]) == [True]
        assert expire(a, "d1", b) == DOUBT + "host-a-1"
    finally:
        a.close()
        b.close()


def test_fence_refuses_when_redis_is_gone(rclient: redis.Redis) -> None:
    gone = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)  # nothing listens on port 1
    c = Claims(gone, "host-a-1", 5, 60)
    assert c.fence(["d1", "d2"]) == [False, False]


# ------------------------------------------------------------------ the pipeline


@pytest.fixture
def sandbox() -> Iterator[SendgridSandbox]:
    with SendgridSandbox(api_key=API_KEY) as sb:
        yield sb


def sendgrid_ctx(home: Path, redis_url: str, sb: SendgridSandbox, **kw: object) -> Context:
    opts = {"api_key": API_KEY, "base_url": sb.url, "from_address": "noreply@notify.example"}
    return Context(
        make_settings(home, redis_url, providers_email=["sendgrid"], provider_options={"sendgrid": opts}, **kw)
    )


def sent_ids(sb: SendgridSandbox) -> Counter[str]:
    return Counter((m.get("custom_args") or {}).get("delivery_id") for m in sb.recorder.all())


def test_lease_outlives_a_slow_provider_call(
    home: Path, redis_url: str, rclient: redis.Redis, sandbox: SendgridSandbox
) -> None:
    """The provider takes four lease lengths to answer: the holder renews through the wait, and a
    second worker finds the delivery busy instead of sending it again."""
    ctx = sendgrid_ctx(home, redis_url, sandbox, claim_ttl=0.3)
    seed(ctx)
    res = send(ctx, channels=["email"])
    sandbox.faults.add({"delay": 1.2})
    a, b = Runtime(ctx, "host-a-1"), Runtime(ctx, "host-b-1")
    try:
        t = threading.Thread(target=process, args=(a, [res.notification_id]))
        t.start()
        assert wait_for(lambda: sandbox.faults.pending() == 0, 10, 0.02), "the request never reached the sandbox"
        time.sleep(0.6)  # two lease lengths into the call: only renewal keeps it
        stats = process(b, [res.notification_id])
        t.join(timeout=30)
        assert stats.sent == 0 and stats.in_doubt == 0 and stats.skipped == 1
        assert [d.status for d in deliveries(ctx, res.notification_id)] == ["sent"]
        assert list(sent_ids(sandbox).values()) == [1]
    finally:
        a.close()
        b.close()
        ctx.close()


def test_a_delivery_left_in_flight_is_sent_again_and_recorded_in_doubt(
    home: Path, redis_url: str, rclient: redis.Redis, sandbox: SendgridSandbox
) -> None:
    ctx = sendgrid_ctx(home, redis_url, sandbox, claim_ttl=0.3)
    seed(ctx)
    res = send(ctx, channels=["email"])
    did = delivery_id(res.notification_id, "email", "alice@example.com")
    dead = Claims(ctx.redis, "host-a-dead", 0.3, 60)  # a worker killed inside its provider call
    assert dead.take([did]) == [OK] and dead.fence([did]) == [True]
    dead.close()
    rt = Runtime(ctx, "host-b-1")
    try:
        assert wait_for(lambda: process(rt, [res.notification_id]).sent == 1, 10, 0.02), "never sent"
        (d,) = deliveries(ctx, res.notification_id)
        assert d.status == "sent"
        with Session(ctx.engine) as s:
            events = s.execute(select(DeliveryEvent).where(DeliveryEvent.delivery_id == did)).scalars().all()
        doubt = [e for e in events if e.status == "in_doubt"]
        assert len(doubt) == 1 and "host-a-dead" in (doubt[0].detail or "")
        assert status_report(ctx)["in_doubt"] == {"email": 1}
        assert 'notify_in_doubt_total{channel="email"} 1.0' in metrics.render(ctx).decode()
        from notifyctl.console import overview_data

        assert overview_data(ctx)["in_doubt"] == {"email": 1}
    finally:
        rt.close()
        ctx.close()


def test_no_request_starts_that_could_outlast_the_lease(rclient: redis.Redis) -> None:
    """Cut off from Redis, a worker's renewals fail: once a request (up to its timeout) could end
    after the lease, the provider starts no more of them."""
    c = Claims(rclient, "host-a-1", 0.6, 60)
    try:
        assert c.take(["d1"]) == [OK]
        assert c.may_start(0.2) and c.may_start(5.0)  # a timeout as long as the lease is never judged
        c.drop()  # renewals stop, as when Redis is unreachable
        assert wait_for(lambda: not c.may_start(0.2), 5, 0.02)
        assert c.may_start(5.0)
    finally:
        c.close()


def test_sendgrid_sends_nothing_once_the_lease_is_running_out(tmp_path: Path, sandbox: SendgridSandbox) -> None:
    from notifyctl.settings import Settings
    from worker.providers import Message
    from worker.providers.base import Fenced
    from worker.providers.sendgrid import Provider

    opts = {"api_key": API_KEY, "base_url": sandbox.url, "from_address": "noreply@notify.example"}
    p = Provider(Settings(home=tmp_path, provider_options={"sendgrid": opts}))
    msgs = [
        Message(delivery_id=f"d{i}", notification_id=f"n{i}", channel="email", route="email",
                address=f"u{i}@example.com", content={"subject": "s", "text": f"hello {i}"}, category="transactional",
                priority="normal")
        for i in range(3)
    ]  # fmt: skip
    try:
        p.may_start = lambda timeout: False  # type: ignore[attr-defined]
        assert all(isinstance(o, Fenced) for o in p.send(msgs))
        assert len(sandbox.recorder) == 0 and sandbox.api_requests == 0
        p.may_start = lambda timeout: True  # type: ignore[attr-defined]
        assert len(p.send(msgs)) == 3 and len(sandbox.recorder) == 3
    finally:
        p.close()
