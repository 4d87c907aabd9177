"""Reading the tracking record: a notification's timeline, the configured providers and their
circuits, the latest deliveries. (The system's status is :func:`worker.status.status_report`.)

A delivery created and sent by one batch stores no event: its ``queued`` and ``sent`` events are
implied by its row (``queued_at``; ``sent_at``, ``provider``, ``provider_message_id``); one created
and set to retry stores its outcome, its ``queued`` implied (``worker.pipeline.record.one_event_when_sent``).
Every reader of the timeline shows them (``implied_events``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlmodel import Session, col

from notifyctl.circuit import Circuits
from notifyctl.context import Context
from notifyctl.errors import NotFound, TemplateError
from notifyctl.models import Campaign, Delivery, DeliveryEvent, DeliveryStatus, Notification
from notifyctl.secretdata import redact

IMPLIED_FIRST = frozenset({DeliveryStatus.sent, DeliveryStatus.retrying})
"""A delivery whose first stored event has one of these statuses was created ``queued`` by the batch
that stored that event: its ``queued`` event is implied (no delivery starts otherwise)."""


def sent_detail(provider: str | None, provider_message_id: str | None) -> str | None:
    """The detail of a ``sent`` event the worker records for a plain send (``record._mark``), and
    of the one a reader implies for a delivery sent by the batch that created it."""
    return f"{provider}: {provider_message_id}" if provider_message_id else None


def implied_marks(deliveries: Iterable[Any]) -> tuple[dict[str, datetime], dict[str, tuple[str, datetime, str | None]]]:
    """``implied_events``' two mappings from a notification's deliveries (rows with ``id``,
    ``notification_id``, ``queued_at``, ``sent_at``, ``provider``, ``provider_message_id``)."""
    queued_at: dict[str, datetime] = {}
    sent: dict[str, tuple[str, datetime, str | None]] = {}
    for d in deliveries:
        queued_at[d.id] = d.queued_at
        if d.sent_at is not None:
            sent[d.id] = (d.notification_id, d.sent_at, sent_detail(d.provider, d.provider_message_id))
    return queued_at, sent


def implied_events(
    events: Iterable[dict[str, Any]],
    queued_at: Mapping[str, datetime],
    sent: Mapping[str, tuple[str, datetime, str | None]] | None = None,
) -> list[dict[str, Any]]:
    """``events`` (one notification's or one delivery's, in the order stored: dicts with
    ``delivery_id``, ``status``, ``at``) with the events the deliveries' rows imply (``implied_marks``
    makes the two mappings from them):

    - ``sent``: delivery id → (notification id, ``sent_at``, detail) of each delivery sent: one that
      has no stored ``sent`` event was sent by the batch that created it, which stored nothing for
      it; its ``sent`` event is implied at its ``sent_at`` with the detail the worker gives a plain
      send (``sent_detail``), before the first event after that time and before the delivery's own
      first stored event (a webhook's, later).
    - ``queued_at``: delivery id → its ``queued_at``; a delivery whose first event (stored or implied
      above) is in ``IMPLIED_FIRST`` has its ``queued`` event implied at that time, before the first
      event at or after it — where the batch that created the delivery wrote its events — and
      always before the delivery's own first event.

    The implied events have ``id`` None; an implied ``queued`` has no detail."""
    events = list(events)
    if sent:
        has_sent = {e["delivery_id"] for e in events if e["status"] == DeliveryStatus.sent}
        extra = sorted((at, did, nid, detail) for did, (nid, at, detail) in sent.items() if did not in has_sent)
        if extra:

            def sent_event(at: datetime, did: str, nid: str, detail: str | None) -> dict[str, Any]:
                return {"id": None, "notification_id": nid, "delivery_id": did, "status": DeliveryStatus.sent.value,
                        "detail": detail, "at": at}  # fmt: skip

            merged: list[dict[str, Any]] = []
            for e in events:
                while extra and (extra[0][0] < e["at"] or any(did == e["delivery_id"] for _, did, _n, _d in extra)):
                    merged.append(sent_event(*extra.pop(0)))
                merged.append(e)
            events = merged + [sent_event(*x) for x in extra]
    first: dict[str, str] = {}
    for e in events:
        did = e["delivery_id"]
        if did is not None and did not in first:
            first[did] = e["status"]
    pending = sorted(
        (queued_at[did], did) for did, status in first.items() if status in IMPLIED_FIRST and did in queued_at
    )
    if not pending:
        return events
    nid = next(iter(events))["notification_id"]
    out: list[dict[str, Any]] = []

    def implied(at: datetime, did: str) -> dict[str, Any]:
        return {"id": None, "notification_id": nid, "delivery_id": did, "status": DeliveryStatus.queued.value,
                "detail": None, "at": at}  # fmt: skip

    for e in events:
        while pending and (pending[0][0] <= e["at"] or any(did == e["delivery_id"] for _, did in pending)):
            out.append(implied(*pending.pop(0)))
        out.append(e)
    return out


def find_notification(session: Session, ref: str) -> Notification:
    """By id, else by dedup key: a key given at intake (``ix_notifications_dedup_direct``), else a
    campaign row's ``campaign:<campaign id>:<user id>`` (by the campaign's unique index)."""
    n = session.get(Notification, ref)
    if n is None:
        n = (
            session.execute(
                select(Notification)
                .where(col(Notification.dedup_key) == ref, col(Notification.campaign_id).is_(None))
                .order_by(col(Notification.created_at).desc())
            )
            .scalars()
            .first()
        )
    if n is None and ref.startswith("campaign:") and ref.count(":") >= 2:
        _, campaign_id, user_id = ref.split(":", 2)
        n = (
            session.execute(
                select(Notification).where(
                    col(Notification.campaign_id) == campaign_id,
                    col(Notification.recipient_id) == user_id,
                    col(Notification.dedup_key) == ref,
                )
            )
            .scalars()
            .first()
        )
    if n is None:
        raise NotFound(f"no notification with id or dedup key {ref!r}")
    return n


def latest_of_user(session: Session, user_id: str, limit: int) -> list[str]:
    """The ids of ``user_id``'s latest ``limit`` notifications, newest first, both read by the unique
    (campaign_id, recipient_id) index: those outside campaigns (``campaign_id IS NULL``), then the
    campaigns', a probe a campaign."""
    created = col(Notification.created_at)
    of_user = col(Notification.recipient_id) == user_id
    direct = select(col(Notification.id), created).where(of_user, col(Notification.campaign_id).is_(None))
    campaigns = select(col(Notification.id), created).where(
        col(Notification.campaign_id).in_(select(col(Campaign.id))), of_user
    )
    rows = [r for q in (direct, campaigns) for r in session.execute(q.order_by(created.desc()).limit(limit)).tuples()]
    rows.sort(key=lambda r: r[1], reverse=True)
    return [str(r[0]) for r in rows[:limit]]


def _secret_fields(ctx: Context, template_id: str) -> frozenset[str]:
    try:
        return ctx.templates.get(template_id).secret
    except TemplateError:  # a template removed since: what was erased still reads "***"
        return frozenset()


def timeline(ctx: Context, ref: str) -> dict[str, Any]:
    """A notification (its template's secret data shown as ``"***"``), its deliveries and events."""
    with Session(ctx.engine) as session:
        n = find_notification(session, ref)
        deliveries = session.scalars(
            select(Delivery)
            .where(col(Delivery.notification_id) == n.id)
            .order_by(col(Delivery.channel), col(Delivery.queued_at))
        ).all()
        events = session.scalars(
            select(DeliveryEvent).where(col(DeliveryEvent.notification_id) == n.id).order_by(col(DeliveryEvent.id))
        ).all()
        notification = n.model_dump()
        notification["data"] = redact(n.data, _secret_fields(ctx, n.template_id))
        return {
            "notification": notification,
            "deliveries": [d.model_dump() for d in deliveries],
            "events": implied_events([e.model_dump() for e in events], *implied_marks(deliveries)),
        }


def provider_circuits(ctx: Context) -> dict[str, dict[str, str | float]]:
    """Each configured provider's circuit: state, consecutive failing batches, seconds to a retrial."""
    s = ctx.settings
    return Circuits(ctx.redis, s.circuit_threshold, s.circuit_cooldown).all_states(s.provider_names())


def recent_deliveries(ctx: Context, limit: int = 50) -> list[dict[str, Any]]:
    with Session(ctx.engine) as session:
        rows = (
            session.execute(
                select(Delivery, col(Notification.template_id), col(Notification.priority))
                .join(Notification, col(Notification.id) == col(Delivery.notification_id))
                .order_by(col(Delivery.queued_at).desc(), col(Delivery.id).desc())
                .limit(limit)
            )
            .tuples()
            .all()
        )
        return [{**d.model_dump(), "template_id": t, "priority": p} for d, t, p in rows]
