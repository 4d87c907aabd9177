"""Prometheus metrics. Workers add to counters and latency histograms in Redis (one pipeline per
batch); ``collect(ctx)`` turns them, queue lag per tier, circuits and DLQ depth into
``prometheus_client`` metric families, which ``render(ctx)`` exposes for ``GET /metrics`` on
``notifyctl serve``. Alerting rules and a Grafana dashboard for these series: ``deploy/``."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, cast

import redis

from notifyctl import keys
from notifyctl.models import Delivery
from notifyctl.shards import each
from notifyctl.vocabulary import PRIORITIES

DELIVERIES = keys.METRICS_DELIVERIES
IN_DOUBT = keys.METRICS_IN_DOUBT
LATENCY = keys.metrics_latency("")  # + provider
SENT_PER_MIN = keys.metrics_sent_per_minute("")  # + UTC hour YYYYmmddHH
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def reason_label(reason: str | None) -> str:
    """Bounded cardinality: the reason's kind (``opted_out``, ``rate_limited``...), not its text."""
    if not reason:
        return ""
    head = reason.split(":", 1)[0].strip()
    return head if len(head) <= 40 and " " not in head else "other"


class Recorder:
    """Collects one batch's metrics; ``flush(pipe)`` adds them to Redis in the caller's pipeline."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.latencies: list[tuple[str, float, int]] = []
        self.sent = 0
        self.doubts: Counter[str] = Counter()

    def in_doubt(self, channel: str) -> None:
        self.doubts[channel] += 1

    def outcome(self, status: str, channel: str, reason: str | None = None, n: int = 1) -> None:
        """``n`` deliveries reached ``status`` (on ``channel``, for ``reason``)."""
        self.outcomes[f"{status}|{channel}|{reason_label(reason)}"] += n
        if status == "sent":
            self.sent += n

    def latency(self, provider: str, seconds: float, messages: int) -> None:
        self.latencies.append((provider, seconds, messages))

    def flush(self, pipe: Any) -> None:
        if self.sent:  # sent per minute, for the console's last hour (a hash per hour, kept two hours)
            now = time.gmtime()
            key = keys.metrics_sent_per_minute(time.strftime("%Y%m%d%H", now))
            pipe.hincrby(key, f"{now.tm_min:02d}", self.sent)
            pipe.expire(key, 7200)
        for field, n in self.outcomes.items():
            pipe.hincrby(DELIVERIES, field, n)
        for channel, n in self.doubts.items():
            pipe.hincrby(IN_DOUBT, channel, n)
        for provider, seconds, n in self.latencies:
            key = keys.metrics_latency(provider)
            le = next((str(b) for b in BUCKETS if seconds <= b), "+Inf")
            pipe.hincrby(key, le, n)
            pipe.hincrby(key, "count", n)
            pipe.hincrbyfloat(key, "sum", seconds * n)


def queue_stats(ctx: Any, down: dict[int, Any] | None = None) -> list[dict[str, Any]]:
    """Per priority: depth, oldest job's age (lag), running and failed jobs (from Redis). With Redis
    shards (``notifyctl.shards``), over every shard: depths and counts added up, the oldest job's
    age the oldest of all, and each shard's own rows under ``shards``. Given ``down`` (a dict), a
    shard that cannot be reached is left out of the sums, its row under ``shards`` None, and it is
    added to ``down`` (``shards.each``); without it, any shard down raises."""
    if ctx.shard_count == 1:
        return _queue_stats(ctx, 0)
    if down is None:
        per = dict(enumerate(_queue_stats(ctx, i) for i in range(ctx.shard_count)))
    else:
        per, gone = each(ctx, lambda i: _queue_stats(ctx, i))
        down.update(gone)
    out = []
    for rows in zip(*per.values(), strict=True):
        ages = [q["oldest_age_s"] for q in rows if q["oldest_age_s"] is not None]
        mine = dict(zip(per, rows, strict=True))
        out.append(
            {
                **rows[0],
                "depth": sum(q["depth"] for q in rows),
                "oldest_age_s": max(ages) if ages else None,
                "started": sum(q["started"] for q in rows),
                "failed_jobs": sum(q["failed_jobs"] for q in rows),
                "shards": [
                    {k: mine[i][k] for k in ("depth", "oldest_age_s", "started", "failed_jobs")} if i in mine else None
                    for i in range(ctx.shard_count)
                ],
            }
        )
    return out


def _queue_stats(ctx: Any, shard: int) -> list[dict[str, Any]]:
    r = ctx.shard_redis(shard)
    now = time.time()
    queues = []
    for p in PRIORITIES:
        q = ctx.queue(p, shard)
        pipe = r.pipeline(transaction=False)
        pipe.llen(q.key)
        pipe.lindex(q.key, 0)
        pipe.zcard(q.started_job_registry.key)
        pipe.zcard(q.failed_job_registry.key)
        depth, head, started, failed = pipe.execute()
        oldest = None
        if head:
            enq = r.hget(keys.rq_job(head.decode()), "enqueued_at")
            if isinstance(enq, bytes):
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
    return queues


def collect(ctx: Any) -> list[Any]:
    """The metric families for ``GET /metrics``, read from Redis (the workers' counters and
    histograms, the queues) and one indexed SQL count (the DLQ), as ``prometheus_client`` objects."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from sqlalchemy import func, select
    from sqlmodel import Session, col

    s = ctx.settings
    out: list[Any] = []
    # with shards, one shard down leaves out its figures only: the queues of the others, and (shard 0
    # down) the counters, histograms and circuits that shard 0 holds; notify_redis_shard_up says which
    down: dict[int, Any] = {}
    queues = queue_stats(ctx, down) if ctx.shard_count > 1 else queue_stats(ctx)
    shared = 0 not in down
    r: redis.Redis = ctx.redis if shared else None  # type: ignore[assignment]

    if shared:
        deliveries = CounterMetricFamily(
            "notify_deliveries",
            "Delivery outcomes by status, channel and reason.",
            labels=["status", "channel", "reason"],
        )
        # the client does not decode responses (notifyctl.redisconn): keys and values are bytes
        delivered = cast("dict[bytes, bytes]", r.hgetall(DELIVERIES))
        for field, n in sorted((k.decode(), int(v)) for k, v in delivered.items()):
            status, channel, reason = (field.split("|") + ["", ""])[:3]
            deliveries.add_metric([status, channel, reason], n)
        out.append(deliveries)

        doubt = CounterMetricFamily(
            "notify_in_doubt",
            "Deliveries whose worker stopped with the provider call under way, sent again "
            "(they may have arrived twice).",
            labels=["channel"],
        )
        in_doubt = cast("dict[bytes, bytes]", r.hgetall(IN_DOUBT))
        for channel, n in sorted((k.decode(), int(v)) for k, v in in_doubt.items()):
            doubt.add_metric([channel], n)
        out.append(doubt)

    depth = GaugeMetricFamily("notify_queue_depth", "Jobs waiting per priority queue.", labels=["priority"])
    lag = GaugeMetricFamily("notify_queue_lag_seconds", "Age of the oldest waiting job per priority queue.",
                            labels=["priority"])  # fmt: skip
    threshold = GaugeMetricFamily(
        "notify_queue_lag_threshold_seconds",
        "The lag each priority queue is held to (NOTIFY_LAG_ALERT_*): the pool alerts above the high one.",
        labels=["priority"],
    )
    for q in queues:
        depth.add_metric([q["priority"]], q["depth"])
        lag.add_metric([q["priority"]], round(q["oldest_age_s"] or 0.0, 3))
        threshold.add_metric([q["priority"]], float(getattr(s, f"lag_alert_{q['priority']}")))
    out += [depth, lag, threshold]

    if shared:
        latency = HistogramMetricFamily(
            "notify_provider_latency_seconds",
            "Time a provider took to answer a batch, per message.",
            labels=["provider"],
        )
        latency_keys = cast("Iterator[bytes]", r.scan_iter(match=keys.METRICS_LATENCY_PATTERN, count=100))
        for key in sorted(k.decode() for k in latency_keys):
            provider = key[len(LATENCY) :]
            h = {k.decode(): v for k, v in cast("dict[bytes, bytes]", r.hgetall(key)).items()}
            cum = 0
            buckets = []
            for b in (*(str(b) for b in BUCKETS), "+Inf"):
                cum += int(h.get(b, 0))
                buckets.append((b, cum))
            latency.add_metric([provider], buckets, float(h.get("sum", 0)))
        out.append(latency)

        names = s.provider_names()
        circuit = GaugeMetricFamily("notify_circuit_open", "1 while a provider's circuit is open.", labels=["provider"])
        pipe = r.pipeline(transaction=False)
        for name in names:
            pipe.hget(keys.circuit(name), "open_until")
        now = time.time()
        for name, until in zip(names, pipe.execute(), strict=True):
            # open while open_until is ahead (notifyctl.circuit's OPEN; half-open after it, until a batch succeeds)
            circuit.add_metric([name], 1.0 if until and float(until) > now else 0.0)
        out.append(circuit)

    up = GaugeMetricFamily("notify_redis_shard_up", "1 while a Redis shard answers, 0 while it cannot be reached.",
                           labels=["shard"])  # fmt: skip
    for i in range(ctx.shard_count):
        up.add_metric([str(i)], 0.0 if i in down else 1.0)
    out.append(up)

    with Session(ctx.engine) as session:
        dlq = session.scalars(
            select(func.count()).select_from(Delivery).where(col(Delivery.dead_lettered).is_(True))
        ).one()
    out.append(GaugeMetricFamily("notify_dlq_depth", "Dead-lettered deliveries.", value=dlq))
    return out


def render(ctx: Any) -> bytes:
    """The Prometheus text exposition of ``collect(ctx)`` (``prometheus_client.generate_latest``)."""
    from prometheus_client import CollectorRegistry, generate_latest

    class _Now:
        def collect(self) -> list[Any]:
            return collect(ctx)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Now())
    return generate_latest(registry)
