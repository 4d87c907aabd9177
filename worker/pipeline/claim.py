"""Stage 4, claim: the deliveries due now are claimed (``worker.claims``: one lease for the batch,
named by each delivery's send record, so that no two workers send one) and each one this worker
holds becomes a ``Message`` with this recipient's content (``render``): what another worker holds,
or what was already sent, is skipped; what a dead worker was sending (in doubt) is sent again and
recorded as such."""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from notifyctl.bulk import rows_where_in
from notifyctl.models import DeliveryStatus, utcnow
from notifyctl.secretdata import SECRET_ERASED
from worker.claims import DOUBT, OK
from worker.pipeline.batch import _D, _Batch
from worker.pipeline.record import IN_DOUBT, Record, _mark
from worker.pipeline.render import Renderer, _fill
from worker.pipeline.runtime import Runtime, Stats
from worker.providers import Message

log = logging.getLogger("notifyctl.worker")

# a busy delivery is due again this long after its holder's lease runs out (clocks and rounding)
LEASE_MARGIN = 0.1


def due_now(batch: _Batch, due_by: datetime) -> list[_D]:
    """The batch's deliveries to send now: queued, or retrying with their time come."""
    return [
        d
        for n in batch.notifications
        for d in batch.deliveries.get(n.id, [])
        if d.status in (DeliveryStatus.queued, DeliveryStatus.retrying)
        and (d.next_attempt_at is None or d.next_attempt_at <= due_by)
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
            if pmid and d.status in (DeliveryStatus.sent, DeliveryStatus.delivered, DeliveryStatus.opened):
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
                DeliveryStatus.sent,
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
            _mark(d, updates, events, DeliveryStatus.failed, now, reason=content, dead=dead)
            released.append(d.id)
            stats.failed += 1
            continue
        headers: dict[str, str] = {}
        shared: dict[str, str] | None = None
        personal: dict[str, str] = {}
        pv = probed.get((n.id, d.channel))  # the batch's rendering with tokens, this recipient's values
        if d.channel == "email":
            values = pv[1] if pv else None
            plan = email_plan(pv[0] if pv else content, values, n.category == "marketing")
            content, shared, personal, headers = plan.apply(rt, d, values)
        elif pv is not None:
            content = {part: _fill(piece, pv[1], tokens) for part, piece, tokens in fill_plan(pv)}
        msg = Message(
            delivery_id=d.id,
            notification_id=n.id,
            channel=d.channel,
            route=d.route,
            address=d.address,
            content=content,
            category=n.category,
            priority=n.priority,
            dedup_key=n.dedup_key or n.id,
            data={"notification_id": n.id, "type": n.type},
            headers=headers,
            user_id=d.user_id,
            shared=shared,
            personal=personal,
        )
        to_send[d.route].append((d, msg))
    return to_send


def _settled_in_sql(conn: Any, ids: list[str]) -> dict[str, tuple[str, str | None]]:
    """Of these deliveries, those whose outcome is already in SQL: id → (status, provider message id)."""
    sql = "SELECT id, status, provider_message_id FROM deliveries"
    return {r[0]: (r[1], r[2]) for r in rows_where_in(conn, sql, "id", ids, "AND status NOT IN ('queued', 'retrying')")}
