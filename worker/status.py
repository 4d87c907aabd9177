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
from notifyctl.liveness import live_workers, live_workers_of
from notifyctl.metrics import queue_stats
from notifyctl.models import Delivery, Notification, utcnow
from notifyctl.pacing import Pacer
from notifyctl.redisconn import _safe, shard_urls
from notifyctl.shards import ShardDown, each


def status_report(ctx: Context) -> dict[str, Any]:
    """Queues, live workers, circuits, counts: what ``notifyctl status`` shows.

    With Redis shards, a shard that cannot be reached hides nothing of the others: the figures are
    those of the shards that answered, and ``redis_shards`` lists every shard with ``ok`` and, when
    down, its ``error`` (one line). Shard 0 down also leaves out what it holds for every host (in
    doubt counts, circuits). Every shard down raises, as one Redis down does."""
    sharded = ctx.shard_count > 1
    down: dict[int, ShardDown] = {}
    queues = queue_stats(ctx, down) if sharded else queue_stats(ctx)
    # from notifyctl's own liveness keys (not RQ's registry, which keeps a killed worker for
    # minutes): a worker that stopped beating is gone within worker_alive_ttl, whatever host it ran on
    if sharded:
        # a shard found down above is not asked again (a silent one would cost another timeout)
        per, gone = each(
            ctx, lambda i: [] if i in down else [{**w, "shard": i} for w in live_workers(ctx.shard_redis(i))]
        )
        down.update(gone)
        workers = sorted((w for ws in per.values() for w in ws), key=lambda w: (w["host"], w["name"]))
    else:
        workers = live_workers_of(ctx)
    in_doubt: dict[str, int] = {}
    circuits: dict[str, dict[str, Any]] = {}
    if 0 not in down:  # shard 0 holds these for every host
        r = ctx.redis
        # the client does not decode responses (notifyctl.redisconn): keys and values are bytes
        in_doubt = {k.decode(): int(v) for k, v in cast("dict[bytes, bytes]", r.hgetall(metrics.IN_DOUBT)).items()}
        s = ctx.settings
        names = s.provider_names()
        paced = Pacer(r).rates(names)  # requests/s learned from its 429s; None = unpaced
        circuits = {
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
    out: dict[str, Any] = {
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
    if sharded:
        urls = shard_urls(ctx.settings)
        out["redis_shards"] = [
            {"shard": i, "url": _safe(urls[i]), "ok": i not in down, "error": down[i].error if i in down else None}
            for i in range(ctx.shard_count)
        ]
    return out
