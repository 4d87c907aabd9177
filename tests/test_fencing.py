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
from tests.net import ClosedPort
from tests.util import deliveries, seed, send, wait_for
from worker.claims import BUSY, DOUBT, OK, Claims, holder
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
        assert (holder(rclient, "d1") or ("",))[0] == "host-b-1"
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


def test_fence_refuses_when_redis_is_gone(rclient: redis.Redis, closed_port: ClosedPort) -> None:
    # a port held bound and never listening (tests/net.py): refused at once
    gone = redis.Redis(host="127.0.0.1", port=closed_port.port, socket_connect_timeout=0.2)
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
        from notifyctl.console.data import overview_data

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


# ------------------------------------------------------------------ one lease per batch


def test_a_batch_lease_is_taken_over_only_once_expired(rclient: redis.Redis) -> None:
    """The whole batch hangs on one lease key: while it holds, every delivery is busy (with the time
    the lease has left); once it has run out, every one is taken over, and the old holder can
    neither renew it nor pass a fence."""
    a, b = Claims(rclient, "host-a-1", 0.4, 60), Claims(rclient, "host-b-1", 0.4, 60)
    ids = [f"d{i}" for i in range(5)]
    try:
        assert a.take(ids) == [OK] * 5
        a.drop()  # no renewal: the lease runs for 0.4 s
        assert b.take(ids) == [BUSY] * 5
        assert set(b.busy_left) == set(ids) and all(0 < s <= 0.4 for s in b.busy_left.values())
        got = wait_for(lambda: (r := b.take(ids))[0] != BUSY and r, 10, 0.02)
        assert got == [OK] * 5  # never in flight: not in doubt
        assert a.fence(ids) == [False] * 5
        a._held = 5  # (as if A's renewal thread were still running)
        assert a.renew() == 5  # an expired lease is never renewed again
        assert b.fence(ids) == [True] * 5
    finally:
        a.close()
        b.close()


def test_in_doubt_is_exactly_what_was_fenced(rclient: redis.Redis) -> None:
    """A batch whose provider calls went out in several fences (route groups, paced requests): only
    the deliveries of those calls are in doubt for the taker, across the bitmap's bytes."""
    a, b = Claims(rclient, "host-a-1", 0.3, 60), Claims(rclient, "host-b-1", 0.3, 60)
    ids = [f"d{i}" for i in range(1000)]
    flown = [3, 4, 8, 999]
    try:
        assert a.take(ids) == [OK] * 1000
        assert a.fence([ids[3], ids[999]]) == [True, True]
        assert a.fence([ids[8], ids[4]]) == [True, True]  # a second call adds to the first, not over it
        a.drop()  # killed
        got = wait_for(lambda: (r := b.take(ids))[0] != BUSY and r, 10, 0.02)
        assert got
        assert [i for i, r in enumerate(got) if r != OK] == flown
        assert all(got[i] == DOUBT + "host-a-1" for i in flown)
    finally:
        a.close()
        b.close()


def test_concurrent_fences_keep_every_bit(rclient: redis.Redis) -> None:
    """Two routes of one batch fence at the same time from two threads: both calls' deliveries
    stay marked in flight."""
    a, b = Claims(rclient, "host-a-1", 0.3, 60), Claims(rclient, "host-b-1", 0.3, 60)
    ids = [f"d{i}" for i in range(64)]
    try:
        assert a.take(ids) == [OK] * 64
        halves = [ids[0::2], ids[1::2]]
        outs: list[list[bool]] = []
        ts = [threading.Thread(target=lambda h=h: outs.append(a.fence(h))) for h in halves for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert outs == [[True] * 32] * 6
        a.drop()
        got = wait_for(lambda: (r := b.take(ids))[0] != BUSY and r, 10, 0.02)
        assert got == [DOUBT + "host-a-1"] * 64
    finally:
        a.close()
        b.close()


def test_a_send_record_blocks_a_new_claim_and_a_settled_lease_frees_the_rest(rclient: redis.Redis) -> None:
    a, b = Claims(rclient, "host-a-1", 30, 60), Claims(rclient, "host-b-1", 30, 60)
    try:
        assert a.take(["d1", "d2", "d3"]) == [OK] * 3
        assert a.fence(["d1", "d2", "d3"]) == [True] * 3
        a.settle({"d1": "pm-1"}, ["d2", "d3"])  # d2, d3: a retry and a failure, recorded in SQL
        assert rclient.exists(keys.lease(a.token)) == 0
        assert rclient.exists(keys.sent("d2"), keys.sent("d3")) == 0  # released: no record kept
        # long before A's 30 s lease would have run out: d1 is sent, the others are free and not in doubt
        assert b.take(["d1", "d2", "d3"]) == ["sent:pm-1", OK, OK]
        assert b.fence(["d1", "d2", "d3"]) == [False, True, True]  # never a provider call for d1
        assert rclient.ttl(keys.sent("d1")) > 0
    finally:
        a.close()
        b.close()


def test_settle_writes_each_send_its_provider_id_whether_shared_or_not(rclient: redis.Redis) -> None:
    """One provider id for a whole request (SendGrid's) goes to Redis once: every delivery's record
    still holds it; ids that differ, even by one, go one per delivery."""
    ids = [f"d{i}" for i in range(300)]
    a = Claims(rclient, "host-a-1", 30, 60)
    try:
        assert a.take(ids) == [OK] * 300
        a.settle({d: "pm-shared" for d in ids[:250]}, ids[250:])
        assert rclient.mget([keys.sent(d) for d in ids[:250]]) == [b"sent:pm-shared"] * 250
        assert rclient.exists(*[keys.sent(d) for d in ids[250:]]) == 0
        rclient.delete(*[keys.sent(d) for d in ids])
        assert a.take(ids[:3]) == [OK] * 3
        a.settle({"d0": "pm-a", "d1": "pm-a", "d2": "pm-b"}, [])
        assert rclient.mget([keys.sent(d) for d in ids[:3]]) == [b"sent:pm-a", b"sent:pm-a", b"sent:pm-b"]
        assert a.take(ids[3:4]) == [OK]
        a.settle({"d3": "pm-c"}, [])
        assert rclient.get(keys.sent("d3")) == b"sent:pm-c"
    finally:
        a.close()


def test_a_lease_flagged_by_an_earlier_holder_checks_each_delivery(rclient: redis.Redis) -> None:
    """A, cut off past its lease, comes back and records a send B had taken over: B's fence refuses
    that delivery and keeps the others."""
    a, b = Claims(rclient, "host-a-1", 0.3, 60), Claims(rclient, "host-b-1", 30, 60)
    try:
        assert a.take(["d1", "d2", "d3"]) == [OK] * 3
        assert a.fence(["d1", "d2", "d3"]) == [True] * 3
        a.drop()  # cut off: no renewal
        got = wait_for(lambda: (r := b.take(["d1", "d2", "d3"]))[0] != BUSY and r, 10, 0.02)
        assert got == [DOUBT + "host-a-1"] * 3
        a.settle({"d2": "pm-a"}, ["d1", "d3"])  # A's provider had accepted d2 before the cut
        assert b.fence(["d1", "d2", "d3"]) == [True, False, True]
        assert b.fence(["d3"]) == [True]
        b.settle({"d1": "pm-b1", "d3": "pm-b3"}, ["d2"])
        assert rclient.mget([keys.sent(d) for d in ("d1", "d2", "d3")]) == [b"sent:pm-b1", b"sent:pm-a", b"sent:pm-b3"]
    finally:
        a.close()
        b.close()


def test_a_lease_of_the_per_delivery_format_is_still_honoured(rclient: redis.Redis) -> None:
    """A send record left by a worker of the previous version (one lease per delivery) is busy until
    it expires, then taken over in doubt if it was in flight."""
    (sec, us) = rclient.time()
    now_ms = sec * 1000 + us // 1000
    rclient.set(keys.sent("d1"), f"lease|old-1|tok|{now_ms + 300}|f", ex=60)
    rclient.set(keys.sent("d2"), f"lease|old-1|tok|{now_ms + 300}|c", ex=60)
    b = Claims(rclient, "host-b-1", 30, 60)
    try:
        assert b.take(["d1", "d2"]) == [BUSY, BUSY]
        got = wait_for(lambda: (r := b.take(["d1", "d2"]))[0] != BUSY and r, 10, 0.02)
        assert got == [DOUBT + "old-1", OK]
    finally:
        b.close()


def test_lease_costs_two_writes_per_delivery(rclient: redis.Redis) -> None:
    """Take, fence (three provider calls), renew and settle a batch of 500: every Redis command run,
    the scripts' own included (INFO commandstats), is at most two per delivery (its take, then its send
    record or its release) plus a few per call."""

    def calls() -> dict[str, int]:
        return {k: v["calls"] for k, v in rclient.info("commandstats").items()}

    ids = [f"d{i}" for i in range(500)]
    a = Claims(rclient, "host-a-1", 30, 60)
    try:
        a.take(ids)  # loads the scripts before counting
        a.settle({}, ids)
        rclient.delete(*[keys.sent(d) for d in ids])
        before = calls()
        assert a.take(ids) == [OK] * 500
        for part in (ids[:100], ids[100:300], ids[300:]):
            assert a.fence(part) == [True] * len(part)
        a.renew()
        a.settle({d: f"pm-{d}" for d in ids[:450]}, ids[450:])
        after = calls()
    finally:
        a.close()
    ran = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    ran.pop("cmdstat_info", None)
    assert ran.get("cmdstat_set", 0) <= 500 + 450 + 5, ran  # a take and a send record, one lease write per call
    assert ran.get("cmdstat_del", 0) <= 50 + 1, ran  # the released records, the lease
    assert sum(ran.values()) <= 500 + 500 + 30, ran


def test_a_worker_fenced_out_of_its_batch_calls_no_provider(
    home: Path, redis_url: str, rclient: redis.Redis, sandbox: SendgridSandbox
) -> None:
    """A's batch lease ran out (cut off) and B took the batch over: A's provider call sends nothing
    (every message ``Fenced``), B's sends each message once."""
    from worker.pipeline.send import _fenced_send
    from worker.providers import Message
    from worker.providers.base import Fenced
    from worker.providers.h2mux import drive

    ctx = sendgrid_ctx(home, redis_url, sandbox, claim_ttl=0.3)
    a, b = Runtime(ctx, "host-a-1"), Runtime(ctx, "host-b-1")
    msgs = [
        Message(delivery_id=f"d{i}", notification_id=f"n{i}", channel="email", route="email",
                address=f"u{i}@example.com", content={"subject": "s", "text": f"hello {i}"}, category="transactional",
                priority="normal")
        for i in range(4)
    ]  # fmt: skip
    ids = [m.delivery_id for m in msgs]
    try:
        assert a.claims.take(ids) == [OK] * 4
        a.claims.drop()  # cut off from Redis: no renewal
        assert wait_for(lambda: b.claims.take(ids) == [OK] * 4, 10, 0.02)
        out = drive(_fenced_send(a, a.provider("sendgrid"), "sendgrid", msgs))
        assert all(isinstance(o, Fenced) for o in out)
        assert len(sandbox.recorder) == 0 and sandbox.api_requests == 0
        out = drive(_fenced_send(b, b.provider("sendgrid"), "sendgrid", msgs))
        assert not any(isinstance(o, Fenced) for o in out)
        assert sent_ids(sandbox) == Counter({d: 1 for d in ids})
    finally:
        a.close()
        b.close()
        ctx.close()
