"""Reading the tracking record: a notification's timeline, and the system's status."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func, select
from sqlmodel import Session

from notifyctl import keys
from notifyctl.context import Context
from notifyctl.errors import NotFound, TemplateError
from notifyctl.models import Delivery, DeliveryEvent, Notification
from notifyctl.secretdata import redact
from notifyctl.vocabulary import PRIORITIES, ROUTES


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


def status_report(ctx: Context) -> dict[str, Any]:
    from notifyctl import metrics
    from worker.liveness import live_workers

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
                from datetime import datetime

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
    # from notifyctl's own liveness keys (not RQ's registry, which keeps a killed worker for
    # minutes): a worker that stopped beating is gone within worker_alive_ttl, whatever host it ran on
    workers = live_workers(r)
    in_doubt = {k.decode(): int(v) for k, v in r.hgetall(metrics.IN_DOUBT).items()}
    from datetime import timedelta

    from notifyctl.models import utcnow
    from worker.circuit import Circuits

    s = ctx.settings
    names = sorted({n for route in ROUTES for n in s.providers_for(route)}
                   | set(s.providers_voice))  # fmt: skip
    circuits = Circuits(r, s.circuit_threshold, s.circuit_cooldown).all_states(names)
    with Session(ctx.engine) as session:
        since = utcnow() - timedelta(seconds=60)
        sent_last_min = dict(
            session.execute(
                select(Delivery.channel, func.count()).where(Delivery.sent_at >= since).group_by(Delivery.channel)  # type: ignore[operator]
            ).all()
        )
        n_status = dict(session.execute(select(Notification.status, func.count()).group_by(Notification.status)).all())
        d_status = dict(session.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all())
        dlq = session.execute(
            select(func.count()).select_from(Delivery).where(Delivery.dead_lettered.is_(True))  # type: ignore[attr-defined]
        ).scalar_one()
    return {
        "queues": queues,
        "workers": workers,
        "hosts": sorted({w["host"] for w in workers}),
        "in_doubt": in_doubt,
        "dlq_depth": dlq,
        "sent_last_minute": sent_last_min,
        "providers": circuits,
        "notifications": n_status,
        "deliveries": d_status,
    }


def recent_deliveries(ctx: Context, limit: int = 50) -> list[dict[str, Any]]:
    with Session(ctx.engine) as session:
        rows = session.execute(
            select(Delivery, Notification.template_id, Notification.priority)
            .join(Notification, Notification.id == Delivery.notification_id)
            .order_by(Delivery.queued_at.desc(), Delivery.id.desc())  # type: ignore[attr-defined]
            .limit(limit)
        ).all()
        return [{**d.model_dump(), "template_id": t, "priority": p} for d, t, p in rows]
