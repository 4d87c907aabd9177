"""The system's status for ``notifyctl status``: queues, live workers, provider circuits, counts.

It lives in the worker layer because it reads the workers' own state (liveness keys, circuits).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

from sqlalchemy import func, select
from sqlmodel import Session, col

from notifyctl import metrics
from notifyctl.circuit import Circuits
from notifyctl.context import Context
from notifyctl.liveness import live_workers_of
from notifyctl.metrics import queue_stats
from notifyctl.models import Delivery, Notification, utcnow
from notifyctl.pacing import Pacer
from notifyctl.vocabulary import ROUTES


def status_report(ctx: Context) -> dict[str, Any]:
    """Queues, live workers, circuits, counts: what ``notifyctl status`` shows."""
    r = ctx.redis
    queues = queue_stats(ctx)
    # from notifyctl's own liveness keys (not RQ's registry, which keeps a killed worker for
    # minutes): a worker that stopped beating is gone within worker_alive_ttl, whatever host it ran on
    workers = live_workers_of(ctx)
    # the client does not decode responses (notifyctl.redisconn): keys and values are bytes
    in_doubt = {k.decode(): int(v) for k, v in cast("dict[bytes, bytes]", r.hgetall(metrics.IN_DOUBT)).items()}
    s = ctx.settings
    names = sorted({n for route in ROUTES for n in s.providers_for(route)}
                   | set(s.providers_voice))  # fmt: skip
    paced = Pacer(r).rates(names)  # requests/s learned from its 429s; None = unpaced
    circuits: dict[str, dict[str, Any]] = {
        name: {**c, "paced_at_per_s": round(paced[name] or 0.0, 1) or None}
        for name, c in Circuits(r, s.circuit_threshold, s.circuit_cooldown).all_states(names).items()
    }
    with Session(ctx.engine) as session:
        since = utcnow() - timedelta(seconds=60)
        sent_last_min = dict(
            session.execute(
                select(col(Delivery.channel), func.count())
                .where(col(Delivery.sent_at) >= since)
                .group_by(col(Delivery.channel))
            ).all()
        )
        n_status = dict(
            session.execute(select(col(Notification.status), func.count()).group_by(col(Notification.status))).all()
        )
        d_status = dict(
            session.execute(select(col(Delivery.status), func.count()).group_by(col(Delivery.status))).all()
        )
        dlq = session.scalars(
            select(func.count()).select_from(Delivery).where(col(Delivery.dead_lettered).is_(True))
        ).one()
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
