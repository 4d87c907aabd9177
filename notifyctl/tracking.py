"""Reading the tracking record: a notification's timeline, the queues, the latest deliveries. (The
system's status, which reads the workers' state too, is :func:`worker.status.status_report`.)"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlmodel import Session

from notifyctl import keys
from notifyctl.context import Context
from notifyctl.errors import NotFound, TemplateError
from notifyctl.models import Delivery, DeliveryEvent, Notification
from notifyctl.secretdata import redact
from notifyctl.vocabulary import PRIORITIES


def find_notification(session: Session, ref: str) -> Notification:
    n = session.get(Notification, ref)
    if n is None:
        n = (
            session.execute(
                select(Notification).where(Notification.dedup_key == ref).order_by(Notification.created_at.desc())  # type: ignore[attr-defined]
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
        deliveries = (
            session.execute(
                select(Delivery).where(Delivery.notification_id == n.id).order_by(Delivery.channel, Delivery.queued_at)
            )
            .scalars()
            .all()
        )
        events = (
            session.execute(
                select(DeliveryEvent).where(DeliveryEvent.notification_id == n.id).order_by(DeliveryEvent.id)
            )
            .scalars()
            .all()
        )
        notification = n.model_dump()
        notification["data"] = redact(n.data, _secret_fields(ctx, n.template_id))
        return {
            "notification": notification,
            "deliveries": [d.model_dump() for d in deliveries],
            "events": [e.model_dump() for e in events],
        }


def queue_stats(ctx: Context) -> list[dict[str, Any]]:
    """Per priority: depth, oldest job's age (lag), running and failed jobs (from Redis)."""
    r = ctx.redis
    now = time.time()
    queues = []
    for p in PRIORITIES:
        q = ctx.queue(p)
        pipe = r.pipeline(transaction=False)
        pipe.llen(q.key)
        pipe.lindex(q.key, 0)
        pipe.zcard(q.started_job_registry.key)
        pipe.zcard(q.failed_job_registry.key)
        depth, head, started, failed = pipe.execute()
        oldest = None
        if head:
            enq = r.hget(keys.rq_job(head.decode()), "enqueued_at")
            if enq:
                ts = datetime.fromisoformat(enq.decode().replace("Z", "+00:00")).timestamp()
                oldest = round(max(0.0, now - ts), 3)
        queues.append(
            {
                "queue": q.name,
                "priority": p,
                "depth": depth,
                "oldest_age_s": oldest,
                "started": started,
                "failed_jobs": failed,
            }
        )
    return queues


def recent_deliveries(ctx: Context, limit: int = 50) -> list[dict[str, Any]]:
    with Session(ctx.engine) as session:
        rows = session.execute(
            select(Delivery, Notification.template_id, Notification.priority)
            .join(Notification, Notification.id == Delivery.notification_id)
            .order_by(Delivery.queued_at.desc(), Delivery.id.desc())  # type: ignore[attr-defined]
            .limit(limit)
        ).all()
        return [{**d.model_dump(), "template_id": t, "priority": p} for d, t, p in rows]
