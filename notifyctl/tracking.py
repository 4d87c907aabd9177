"""Reading the tracking record: a notification's timeline, the configured providers and their
circuits, the latest deliveries. (The system's status is :func:`worker.status.status_report`.)

A delivery created and sent (or set to retry) by one batch stores one event, its outcome
(``worker.pipeline.record.one_event_when_sent``); its ``queued`` event is implied, at its
``queued_at``, and every reader of the timeline shows it (``implied_events``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlmodel import Session, col

from notifyctl.circuit import Circuits
from notifyctl.context import Context
from notifyctl.errors import NotFound, TemplateError
from notifyctl.models import Delivery, DeliveryEvent, DeliveryStatus, Notification
from notifyctl.secretdata import redact

IMPLIED_FIRST = frozenset({DeliveryStatus.sent, DeliveryStatus.retrying})
"""A delivery whose first stored event has one of these statuses was created ``queued`` by the batch
that stored that event: its ``queued`` event is implied (no delivery starts otherwise)."""


def implied_events(events: Iterable[dict[str, Any]], queued_at: Mapping[str, datetime]) -> list[dict[str, Any]]:
    """``events`` (one notification's or one delivery's, in the order stored: dicts with
    ``delivery_id``, ``status``, ``at``) with the implied ``queued`` event of each delivery whose
    first stored event is in ``IMPLIED_FIRST``: at its ``queued_at`` (``queued_at``: delivery id →
    its ``queued_at``), before the first event at or after that time — where the batch that created
    the delivery wrote its events — and always before the delivery's own first event. The implied
    events have ``id`` None and no detail."""
    events = list(events)
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
            "events": implied_events([e.model_dump() for e in events], {d.id: d.queued_at for d in deliveries}),
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
