"""One module: stage 4 of the pipeline, the claim and the send of a batch's due deliveries, one
stage as the pipeline's other four are; ~400 lines.

Stage 4, send: the batch's due deliveries are claimed and sent.

Claim (``claim``): the deliveries due now are claimed (``worker.claims``: one lease for the batch,
named by each delivery's send record, so that no two workers send one) and each one this worker
holds becomes a ``Message`` with this recipient's content (``render``): what another worker holds,
or what was already sent, is skipped; what a dead worker was sending (in doubt) is sent again and
recorded as such.

Send (``send_routes``): the messages per route through the route's providers — routes that share
no provider at the same time (``route_groups``), each provider in failover order behind its circuit
(``notifyctl.circuit``), at its pace (``notifyctl.pacing``), every call fenced by this worker's leases
(``worker.claims``); an OTP that every SMS provider failed becomes a voice call."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

import redis

from notifyctl.bulk import rows_where_in
from notifyctl.circuit import OPEN, THROTTLED
from notifyctl.models import utcnow
from notifyctl.secretdata import SECRET_ERASED
from worker.claims import DOUBT, OK, Fenced
from worker.pipeline.batch import _D, _DELIVERED, _FAILED, _OPENED, _QUEUED, _RETRYING, _SENT, _Batch
from worker.pipeline.record import IN_DOUBT, Record, _mark
from worker.pipeline.render import Renderer, _EmailMessage, _fill
from worker.pipeline.runtime import Runtime, Stats
from worker.providers import Held, Message, Misconfigured, Outcome, Provider, Retry, Sent
from worker.providers.h2mux import Steps, drive, drive_together

log = logging.getLogger("notifyctl.worker")

# a busy delivery is due again this long after its holder's lease runs out (clocks and rounding)
LEASE_MARGIN = 0.1


def due_now(batch: _Batch, due_by: datetime) -> list[_D]:
    """The batch's deliveries to send now: queued, or retrying with their time come."""
    return [
        d
        for n in batch.notifications
        for d in batch.deliveries.get(n.id, [])
        if d.status in (_QUEUED, _RETRYING) and (d.next_attempt_at is None or d.next_attempt_at <= due_by)
    ]


def claim(
    rt: Runtime, conn: Any, batch: _Batch, due: list[_D], renderer: Renderer, rec: Record, stats: Stats
) -> dict[str, list[tuple[_D, Message]]]:
    """The messages to send per route, with their deliveries: those of ``due`` this worker claimed.
    What is skipped or settled here goes to ``rec`` (``conn``: the batch's SQL connection)."""
    now, updates, events = rec.now, rec.updates, rec.events
    sent_marks, released, lease_waits = rec.sent_marks, rec.released, rec.lease_waits
    render, probed, email_plan, fill_plan = renderer.render, renderer.probed, renderer.email_plan, renderer.fill_plan
    by_id = {n.id: n for n in batch.notifications}
    claims = rt.claims.take([d.id for d in due])
    taken_at = utcnow()
    doubts = [d.id for d, c in zip(due, claims, strict=True) if c.startswith(DOUBT)]
    # an in-doubt delivery's holder may have recorded its outcome in SQL after this batch loaded
    settled = _settled_in_sql(conn, doubts) if doubts else {}
    to_send: dict[str, list[tuple[_D, Message]]] = defaultdict(list)
    for d, lease in zip(due, claims, strict=True):
        if d.id in settled:
            d.status, pmid = settled[d.id]
            if pmid and d.status in (_SENT, _DELIVERED, _OPENED):
                sent_marks[d.id] = pmid
            else:
                released.append(d.id)
            stats.skipped += 1
            continue
        if lease.startswith(DOUBT):
            # Its previous holder died (or lost Redis for longer than its lease) with the provider
            # call under way: it may have been sent. At-least-once: sent again, and recorded.
            events.append(
                {
                    "notification_id": d.notification_id,
                    "delivery_id": d.id,
                    "status": IN_DOUBT,
                    "detail": f"worker {lease[len(DOUBT) :]} stopped with the provider call under way; "
                    "sending again (it may arrive twice)",
                    "at": now,
                }
            )
            log.warning(
                "delivery in doubt: sending again",
                extra={"notification_id": d.notification_id, "delivery_id": d.id, "route": d.route},
            )
            rt.metrics.in_doubt(d.channel)
            stats.in_doubt += 1
        elif lease.startswith("sent:"):
            # Sent before, but the SQL record was lost (crash between provider and commit).
            _mark(
                d,
                updates,
                events,
                _SENT,
                now,
                provider_message_id=lease[5:],
                detail="recovered from send record",
            )
            stats.skipped += 1
            continue
        elif lease != OK:
            left = rt.claims.busy_left.get(d.id)
            if left is not None:  # busy: looked at again the moment its lease can be taken over
                lease_waits[d.id] = taken_at + timedelta(seconds=left + LEASE_MARGIN)
            stats.skipped += 1
            continue
        n = by_id[d.notification_id]
        user = batch.users.get(d.user_id)
        content = render(n, d.channel, user) if user else "unknown_user"
        if isinstance(content, str):
            # not back to the DLQ what can never be sent: its secret data is gone
            dead = not content.startswith(SECRET_ERASED)
            _mark(d, updates, events, _FAILED, now, reason=content, dead=dead)
            released.append(d.id)
            stats.failed += 1
            continue
        headers: dict[str, str] = {}
        shared: dict[str, str] | None = None
        personal: dict[str, str] = {}
        cls: type[Message] = Message
        pv = probed.get((n.id, d.channel))  # the batch's rendering with tokens, this recipient's values
        if d.channel == "email":
            values = pv[1] if pv else None
            plan = email_plan(pv[0] if pv else content, values, n.category == "marketing")
            own, shared, personal, headers = plan.apply(rt, d, values)
            if own is None:  # a shared body with this recipient's values: their copy made only if read
                cls = _EmailMessage
            else:
                content = own
        elif pv is not None:
            content = {part: _fill(piece, pv[1], tokens) for part, piece, tokens in fill_plan(pv)}
        msg = cls(
            delivery_id=d.id,
            notification_id=n.id,
            channel=d.channel,
            route=d.route,
            address=d.address,
            content=content if cls is Message else None,  # type: ignore[arg-type]
            category=n.category,
            priority=n.priority,
            dedup_key=n.dedup_key or n.id,
            data={"notification_id": n.id, "type": n.type},
            headers=headers,
            user_id=d.user_id,
            shared=shared,
            personal=personal,
        )
        if cls is _EmailMessage:
            msg.plan = plan  # type: ignore[attr-defined]
        to_send[d.route].append((d, msg))
    return to_send


def _settled_in_sql(conn: Any, ids: list[str]) -> dict[str, tuple[str, str | None]]:
    """Of these deliveries, those whose outcome is already in SQL: id → (status, provider message id)."""
    sql = "SELECT id, status, provider_message_id FROM deliveries"
    return {r[0]: (r[1], r[2]) for r in rows_where_in(conn, sql, "id", ids, "AND status NOT IN ('queued', 'retrying')")}


THROTTLE_HOLD = 5.0  # a throttle answer asking for this many seconds or more holds the provider


def route_groups(settings: Any, routes: list[str]) -> list[list[str]]:
    """The routes in groups that share no provider (a route's providers: ``providers_for``, in
    failover order, and for SMS the voice fallback's): routes of one group go one after the other,
    groups at the same time."""
    groups: list[tuple[set[str], list[str]]] = []
    for route in routes:
        names = set(settings.providers_for(route) or ["outbox"])
        if route == "sms":
            names.update(settings.providers_voice)
        joined = [g for g in groups if g[0] & names]
        for g in joined:
            groups.remove(g)
            names |= g[0]
        groups.append((names, [r for g in joined for r in g[1]] + [route]))
    return [g[1] for g in groups]


def send_routes(rt: Runtime, batches: dict[str, list[Message]]) -> dict[str, list[tuple[str, Outcome]]]:
    """``_send_route`` for each route of a batch. Routes served by different providers are sent at
    the same time (each group of routes of ``route_groups`` one after the other within it): the
    groups whose providers send their requests as steps over HTTP/2 (``Provider.steps``: APNs,
    FCM) in this thread, all their requests under way together (``h2mux.drive_together``: a
    mix's iOS and Android pushes without a second thread), each other group in a thread of the
    runtime's pool (or in this one when it is the only one); every provider call is fenced and
    paced as before (``_call_provider``), each provider used by one thread at a time. Returns
    when every route has its outcomes; an error in one route is raised once all have ended
    (nothing left running)."""
    routes = list(batches)
    groups = route_groups(rt.settings, routes) if len(routes) > 1 else [routes]

    def steps(group: list[str]) -> Steps[dict[str, list[tuple[str, Outcome]]]]:
        out: dict[str, list[tuple[str, Outcome]]] = {}
        for route in group:
            out[route] = yield from _route_steps(rt, route, batches[route])
        return out

    def run(group: list[str]) -> dict[str, list[tuple[str, Outcome]]]:
        return drive(steps(group))

    if len(groups) == 1:
        return run(groups[0])
    stepped: list[list[str]] = []
    threaded: list[list[str]] = []
    for g in groups:
        (stepped if _steps_only(rt, g) else threaded).append(g)
    here = [] if stepped or not threaded else [threaded.pop(0)]
    futures = [rt.route_pool().submit(run, g) for g in threaded]
    out: dict[str, list[tuple[str, Outcome]]] = {}
    error: BaseException | None = None
    try:
        if stepped:
            for part in drive_together([steps(g) for g in stepped]):
                out.update(part)
        for g in here:
            out.update(run(g))
    except BaseException as exc:  # noqa: BLE001 - raised below, once the other routes have ended
        error = exc
    for f in futures:
        try:
            out.update(f.result())
        except BaseException as exc:  # noqa: BLE001 - the first one is raised
            error = error or exc
    if error is not None:
        raise error
    return out


def _steps_only(rt: Runtime, group: list[str]) -> bool:
    """Whether every provider of these routes sends as steps (``Provider.steps``); one that cannot
    load is answered at once without a call (``_call_provider``), so it does not count."""
    for route in group:
        names = rt.settings.providers_for(route) or ["outbox"]
        if route == "sms":
            names = [*names, *rt.settings.providers_voice]
        for name in names:
            try:
                provider = rt.provider(name)
            except Misconfigured:
                continue
            if getattr(provider, "steps", None) is None:
                return False
    return True


def _send_route(rt: Runtime, route: str, messages: list[Message]) -> list[tuple[str, Outcome]]:
    """``_route_steps`` run to its end in this thread."""
    return drive(_route_steps(rt, route, messages))


def _route_steps(rt: Runtime, route: str, messages: list[Message]) -> Steps[list[tuple[str, Outcome]]]:
    """Send through the route's providers in order, skipping open circuits: what one provider
    answers "retry later" goes to the next. An OTP that every SMS provider failed becomes a
    voice call when a voice provider is configured. Returns (provider, outcome) per message."""
    names = rt.settings.providers_for(route) or ["outbox"]
    states = rt.circuits.states(names)
    usable = [n for n in names if states[n][0] not in (OPEN, THROTTLED)]
    results: list[tuple[str, Outcome] | None] = [None] * len(messages)
    if not usable:
        # No provider is called: the delivery waits for the first circuit that may close (or
        # throttle that ends) without using an attempt, or a long outage would drain its attempts
        # with no call made.
        wait = max(1.0, min(until for _, until in states.values()) - time.time())
        if any(state == THROTTLED for state, _ in states.values()):
            why = f"every {route} provider is throttling or down"
        else:
            why = f"every {route} provider's circuit is open"
        return [(names[0], Held(why, retry_after=wait)) for _ in messages]
    pending = list(range(len(messages)))
    for name in usable:
        outcomes = yield from _call_provider(rt, name, [messages[i] for i in pending])
        called = [o for o in outcomes if not isinstance(o, (Fenced, Held))]  # (these never reached it)
        accepted = any(isinstance(o, Sent) for o in called)
        retries = [o for o in called if isinstance(o, Retry)]
        throttled = [o for o in retries if o.throttled]
        provider_down = not accepted and len(retries) == len(called) and not throttled
        try:  # bookkeeping after the provider answered: a Redis failure here must not lose the answers
            if called:
                rt.circuits.record(name, ok=not provider_down, was=states[name][0])
            longest = max((o.retry_after or 1.0) for o in throttled) if throttled else 0.0
            if longest >= THROTTLE_HOLD and not accepted:
                # a long wait is a quota, not a rate (APNs' token updates, a daily cap): every
                # worker holds off the provider; a short one only lowers its pace (notifyctl.pacing)
                rt.circuits.throttle(name, longest)
        except redis.RedisError:
            log.warning("circuit state of %s not recorded: Redis unavailable", name)
        still: list[int] = []
        for i, o in zip(pending, outcomes, strict=True):
            results[i] = (name, o)
            if isinstance(o, Retry):
                still.append(i)
        pending = still
        if not pending:
            break
    if pending and route == "sms" and rt.settings.providers_voice:
        otps = [i for i in pending if messages[i].priority == "high" and messages[i].category == "transactional"]
        voiced = yield from _send_voice(rt, [messages[i] for i in otps])
        for i, (name, o) in zip(otps, voiced, strict=True):
            if isinstance(o, (Sent, Fenced)):
                results[i] = (f"{name}:voice", o)
    return [r for r in results if r is not None]


def _send_voice(rt: Runtime, messages: list[Message]) -> Steps[list[tuple[str, Outcome]]]:
    if not messages:
        return []
    name = rt.settings.providers_voice[0]
    calls = [
        Message(delivery_id=m.delivery_id, notification_id=m.notification_id, channel="sms", route="voice",
                address=m.address, content=m.content, category=m.category, priority=m.priority,
                dedup_key=m.dedup_key, user_id=m.user_id)
        for m in messages
    ]  # fmt: skip
    outcomes = yield from _call_provider(rt, name, calls)
    return [(name, o) for o in outcomes]


def _call_provider(rt: Runtime, name: str, messages: list[Message]) -> Steps[list[Outcome]]:
    """Send through one provider at its pace (``notifyctl.pacing``), request by request group: what
    the pace lets go now (after waiting at most ``pace_max_wait`` s in all), until the provider
    throttles us; the rest is ``Held`` (no attempt used), spread over the time the pace needs.
    Each call is fenced (``_fenced_send``) right before it is made."""
    try:
        provider = rt.provider(name)
    except Misconfigured as exc:
        return [Retry(f"{name} misconfigured: {exc}") for _ in messages]
    plan = getattr(provider, "requests", None)
    groups: list[list[int]] = plan(messages) if plan is not None else [[i] for i in range(len(messages))]
    outcomes: list[Outcome | None] = [None] * len(messages)
    pos, slept, why = 0, 0.0, f"{name}: paced"
    while pos < len(groups):
        granted, wait = rt.pacer.take(name, len(groups) - pos)
        if not granted:
            if slept + wait > rt.settings.pace_max_wait:
                break
            time.sleep(wait)
            slept += wait
            continue
        part = groups[pos : pos + granted]
        pos += granted
        idx = [i for g in part for i in g]
        answers = yield from _fenced_send(rt, provider, name, [messages[i] for i in idx])
        accepted = throttled = off = 0
        for g in part:
            first = answers[off]
            for i in g:
                outcomes[i] = answers[off]
                off += 1
            if isinstance(first, Sent):
                accepted += 1
            elif isinstance(first, Retry) and first.throttled:
                throttled += 1
        try:
            rt.pacer.record(name, accepted, throttled)
        except redis.RedisError:
            log.debug("pace of %s not recorded: Redis unavailable", name)
        if throttled:  # stop at the first throttle answer: the rest waits for the (lowered) pace
            why = f"{name}: paced (it throttled this batch)"
            break
    if pos < len(groups):
        try:
            rate = rt.pacer.rate(name) or 1.0
        except redis.RedisError:
            rate = 1.0
        for k, g in enumerate(groups[pos:]):
            held = Held(why, retry_after=(k + 1) / rate)
            for i in g:
                outcomes[i] = held
    return [o if o is not None else Retry(f"{name}: no outcome") for o in outcomes]


def _fenced_send(rt: Runtime, provider: Provider, name: str, messages: list[Message]) -> Steps[list[Outcome]]:
    """The provider's outcomes, for the messages whose lease this worker still holds (checked and
    marked in flight in one Redis call right before the call: ``Claims.fence``); ``Fenced`` for
    the others, which are not sent."""
    ours = rt.claims.fence([m.delivery_id for m in messages])
    if all(ours):
        return (yield from _provider_send(rt, provider, name, messages))
    out: list[Outcome] = [Fenced() for _ in messages]
    kept = [i for i, ok in enumerate(ours) if ok]
    if kept:
        sent = yield from _provider_send(rt, provider, name, [messages[i] for i in kept])
        for i, o in zip(kept, sent, strict=True):
            out[i] = o
    return out


def _provider_send(rt: Runtime, provider: Provider, name: str, messages: list[Message]) -> Steps[list[Outcome]]:
    """The provider's outcomes: its ``send``, or its ``steps`` (each round's requests yielded, sent
    by the caller, with other providers' at the same time: ``send_routes``)."""
    # a provider that makes several requests per call asks before each whether the lease still
    # covers one more (``worker.providers.base.lease_open``)
    provider.may_start = rt.claims.may_start  # type: ignore[attr-defined]
    stepped = getattr(provider, "steps", None)
    t0 = time.perf_counter()
    try:
        outcomes = (yield from stepped(messages)) if stepped is not None else provider.send(messages)
        rt.metrics.latency(name, time.perf_counter() - t0, len(messages))
    except Exception as exc:  # noqa: BLE001 - a provider bug must not lose the batch: retry it
        log.exception("provider %s failed on a batch of %d", name, len(messages))
        return [Retry(f"{name} error: {type(exc).__name__}: {exc}") for _ in messages]
    if len(outcomes) != len(messages):
        return [Retry(f"{name} answered {len(outcomes)} outcomes for {len(messages)}") for _ in messages]
    return outcomes
