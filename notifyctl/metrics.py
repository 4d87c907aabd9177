"""Prometheus metrics. Workers add to counters and latency histograms in Redis (one pipeline per
batch); ``render(ctx)`` turns them, queue lag per tier and DLQ depth into the text exposition
format for ``GET /metrics`` on ``notifyctl serve``."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import redis

from notifyctl import keys

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

    def outcome(self, status: str, channel: str, reason: str | None = None) -> None:
        self.outcomes[f"{status}|{channel}|{reason_label(reason)}"] += 1
        if status == "sent":
            self.sent += 1

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


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def render(ctx: Any) -> str:
    from sqlalchemy import func, select
    from sqlmodel import Session

    from notifyctl.models import Delivery
    from notifyctl.settings import PRIORITIES

    r: redis.Redis = ctx.redis
    lines: list[str] = []

    lines += ["# HELP notify_deliveries_total Delivery outcomes by status, channel and reason.",
              "# TYPE notify_deliveries_total counter"]  # fmt: skip
    for field, n in sorted((k.decode(), int(v)) for k, v in r.hgetall(DELIVERIES).items()):
        status, channel, reason = (field.split("|") + ["", ""])[:3]
        lines.append(
            f'notify_deliveries_total{{status="{_esc(status)}",channel="{_esc(channel)}",reason="{_esc(reason)}"}} {n}'
        )

    lines += ["# HELP notify_in_doubt_total Deliveries whose worker stopped with the provider call under way, "
              "sent again (they may have arrived twice).", "# TYPE notify_in_doubt_total counter"]  # fmt: skip
    for channel, n in sorted((k.decode(), int(v)) for k, v in r.hgetall(IN_DOUBT).items()):
        lines.append(f'notify_in_doubt_total{{channel="{_esc(channel)}"}} {n}')

    lines += ["# HELP notify_queue_depth Jobs waiting per priority queue.", "# TYPE notify_queue_depth gauge",
              "# HELP notify_queue_lag_seconds Age of the oldest waiting job per priority queue.",
              "# TYPE notify_queue_lag_seconds gauge"]  # fmt: skip
    now = time.time()
    for p in PRIORITIES:
        q = ctx.queue(p)
        depth = r.llen(q.key)
        lag = 0.0
        head = r.lindex(q.key, 0)
        if head:
            enq = r.hget(keys.rq_job(head.decode()), "enqueued_at")
            if enq:
                from datetime import datetime

                lag = max(0.0, now - datetime.fromisoformat(enq.decode().replace("Z", "+00:00")).timestamp())
        lines.append(f'notify_queue_depth{{priority="{p}"}} {depth}')
        lines.append(f'notify_queue_lag_seconds{{priority="{p}"}} {lag:.3f}')

    lines += ["# HELP notify_provider_latency_seconds Time a provider took to answer a batch, per message.",
              "# TYPE notify_provider_latency_seconds histogram"]  # fmt: skip
    for key in sorted(k.decode() for k in r.scan_iter(match=keys.METRICS_LATENCY_PATTERN, count=100)):
        provider = key[len(LATENCY) :]
        h = {k.decode(): v for k, v in r.hgetall(key).items()}
        cum = 0
        for b in (*(str(b) for b in BUCKETS), "+Inf"):
            cum += int(h.get(b, 0))
            lines.append(f'notify_provider_latency_seconds_bucket{{provider="{_esc(provider)}",le="{b}"}} {cum}')
        lines.append(f'notify_provider_latency_seconds_sum{{provider="{_esc(provider)}"}} {float(h.get("sum", 0))}')
        lines.append(f'notify_provider_latency_seconds_count{{provider="{_esc(provider)}"}} {int(h.get("count", 0))}')

    with Session(ctx.engine) as session:
        dlq = session.execute(
            select(func.count()).select_from(Delivery).where(Delivery.dead_lettered.is_(True))  # type: ignore[attr-defined]
        ).scalar_one()
    lines += ["# HELP notify_dlq_depth Dead-lettered deliveries.", "# TYPE notify_dlq_depth gauge",
              f"notify_dlq_depth {dlq}"]  # fmt: skip
    return "\n".join(lines) + "\n"
