"""The system's status for ``notifyctl status``: queues, live workers, provider circuits, counts.

It lives in the worker layer because it reads the workers' own state (liveness keys, circuits).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlmodel import Session

from notifyctl import keys, metrics
from notifyctl.context import Context
from notifyctl.models import Delivery, Notification, utcnow
from notifyctl.vocabulary import PRIORITIES, ROUTES
from worker.circuit import Circuits
from worker.liveness import live_workers


def status_report(ctx: Context) -> dict[str, Any]:
    """Queues, live workers, circuits, counts: what ``notifyctl status`` shows."""
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
    # from notifyctl's own liveness keys (not RQ's registry, which keeps a killed worker for
    # minutes): a worker that stopped beating is gone within worker_alive_ttl, whatever host it ran on
    workers = live_workers(r)
    in_doubt = {k.decode(): int(v) for k, v in r.hgetall(metrics.IN_DOUBT).items()}
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
