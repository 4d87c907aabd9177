"""What the console's pages show, read from Redis and a few indexed SQL queries (no scan of
deliveries): the Overview's figures, the campaigns with their waves' progress, and a lookup's
timelines. The pages themselves are ``notifyctl.console.routes``.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func, select
from sqlmodel import Session

from campaigns.models import Campaign
from notifyctl.analytics.read import funnel
from notifyctl.analytics.waves import wave_progress
from notifyctl.circuit import Circuits
from notifyctl.dlq import stats as dlq_stats
from notifyctl.errors import NotFound
from notifyctl.liveness import by_host, live_workers, live_workers_of
from notifyctl.metrics import BUCKETS, IN_DOUBT, LATENCY, SENT_PER_MIN, queue_stats
from notifyctl.models import Notification
from notifyctl.redisconn import _safe, shard_urls
from notifyctl.shards import ShardDown, each
from notifyctl.tracking import latest_of_user, timeline


def probe(ctx: Any) -> dict[int, ShardDown]:
    """The Redis shards that do not answer a ping (none with one Redis)."""
    if ctx.shard_count == 1:
        return {}
    return each(ctx, lambda i: ctx.shard_redis(i).ping())[1]


def shards_down(ctx: Any, known: dict[int, ShardDown] | None = None) -> list[dict[str, Any]]:
    """The Redis shards that cannot be reached, for the banner on every page (``notifyctl status``'s
    lines): each with its number, URL (no password) and error in one line. ``known``: what a page
    found while reading (``overview_data``), so that no shard is asked twice (a silent one would cost
    another timeout); without it each shard is pinged. One Redis, unsharded: nothing to say (its
    outage is every page's error, as for every command)."""
    if ctx.shard_count == 1:
        return []
    if known is None:
        known = probe(ctx)
    urls = shard_urls(ctx.settings)
    out = []
    for i in sorted(known):
        url = _safe(urls[i])
        out.append({"shard": i, "url": url, "error": known[i].error.removeprefix(f"cannot reach Redis at {url}: ")})
    return out


def overview_data(ctx: Any) -> dict[str, Any]:
    """Everything the Overview shows, from Redis and a few indexed SQL queries (no scan of deliveries).

    With Redis shards, one shard down hides nothing of the others (``notifyctl.shards.each``): the
    queues and live workers are those of the shards that answered, and ``down`` names the others.
    Shard 0 holds the sessions: without it no page opens (``notifyctl.console.session``)."""
    s = ctx.settings
    r = ctx.redis
    down: dict[int, ShardDown] = {}
    queues = queue_stats(ctx, down) if ctx.shard_count > 1 else queue_stats(ctx)
    for q in queues:
        q["threshold_s"] = float(getattr(s, f"lag_alert_{q['priority']}"))
        q["over"] = q["oldest_age_s"] is not None and q["oldest_age_s"] > q["threshold_s"]
    now = time.time()
    hours = [time.strftime("%Y%m%d%H", time.gmtime(now - 3600)), time.strftime("%Y%m%d%H", time.gmtime(now))]
    pipe = r.pipeline(transaction=False)
    for hour in hours:
        pipe.hgetall(SENT_PER_MIN + hour)
    pipe.hgetall(IN_DOUBT)
    names = s.provider_names()
    for n in names:
        pipe.hgetall(LATENCY + n)
    res = pipe.execute()
    per_min: dict[str, int] = {}
    in_doubt = {k.decode(): int(v) for k, v in res[2].items()}
    for hour, counts in zip(hours, res[:2], strict=True):
        for m, n in counts.items():
            per_min[f"{hour}{m.decode()}"] = int(n)
    minutes = []
    for i in range(59, -1, -1):
        t = time.gmtime(now - i * 60)
        minutes.append((time.strftime("%H:%M", t), per_min.get(time.strftime("%Y%m%d%H%M", t), 0)))
    circuits = Circuits(r, s.circuit_threshold, s.circuit_cooldown).all_states(names)
    providers = []
    for name, hist in zip(names, res[3:], strict=True):
        h = {k.decode(): float(v) for k, v in hist.items()}
        providers.append(
            {
                "name": name,
                "circuit": circuits.get(name, {}),
                "batches": int(h.get("count", 0)),
                "p50": _quantile(h, BUCKETS, 0.5),
                "p99": _quantile(h, BUCKETS, 0.99),
            }
        )
    if ctx.shard_count > 1:
        # a shard found down above is not asked again
        per, gone = each(ctx, lambda i: [] if i in down else live_workers(ctx.shard_redis(i)))
        down.update(gone)
        workers = [w for ws in per.values() for w in ws]
    else:
        workers = live_workers_of(ctx)
    hosts = {h: len(ws) for h, ws in by_host(workers).items()}
    return {
        "down": down,
        "queues": queues,
        "sent_per_min": minutes,
        "sent_last_hour": sum(n for _, n in minutes),
        "providers": providers,
        "dlq": dlq_stats(ctx),
        "hosts": hosts,
        "in_doubt": in_doubt,
    }


def _quantile(h: dict[str, float], buckets: tuple[float, ...], q: float) -> str:
    """The bucket bound under which ``q`` of the measured batches fall ("≤ 0.25 s"), from the histogram."""
    total = h.get("count", 0)
    if not total:
        return "-"
    seen = 0.0
    for b in buckets:
        seen += h.get(str(b), 0)
        if seen >= q * total:
            return f"≤ {b:g} s"
    return f"> {buckets[-1]:g} s"


def campaign_cards(ctx: Any, limit: int = 10) -> list[dict[str, Any]]:
    """The latest campaigns, each read without counting its rows: deliveries per channel from the
    analytics rollup, each wave's from its counts (``analytics.waves``: sent, failed and suppressed
    by reason, ...) with its notifications still waiting (the (status, due_at) index)."""
    with Session(ctx.engine) as s:
        camps: list[Campaign] = list(
            s.execute(select(Campaign).order_by(Campaign.created_at.desc()).limit(limit)).scalars()  # type: ignore[attr-defined]
        )
    out = []
    for c in camps:
        waves = wave_progress(ctx.engine, c.id, c.plan or [])
        waiting = sum(w["scheduled"] + w["paused"] for w in waves)
        state = _campaign_state(ctx, c, waiting)
        per_channel = {g["key"]: g for g in funnel(ctx.engine, "channel", campaign=c.id)["groups"]}
        out.append({
            "campaign_id": c.id, "name": c.name, "state": state, "template_id": c.template_id, "channels": c.channels,
            "recipients": sum(int(w.get("recipients", 0)) for w in c.plan or []), "waiting": waiting,
            "wave_progress": waves, "per_channel": per_channel,
        })  # fmt: skip
    return out


def _campaign_state(ctx: Any, c: Campaign, waiting: int) -> str:
    """The state ``notifyctl campaign status`` shows (``campaigns.report.STATES``), without its count
    of every notification: launching, sending (some still scheduled or paused in a wave, or queued or
    retrying), paused, canceled, completed."""
    if c.status != "active":
        return str(c.status)
    if c.launched_at is None:
        return "launching"
    if waiting:
        return "sending"
    # the first of its notifications in flight, on the (status, due_at) index: what is in flight is
    # little beside a campaign's rows. coalesce() keeps the planner off the (campaign_id, recipient_id)
    # index, which SQLite would pick and walk through every notification of a completed campaign.
    # Its scheduled or paused rows are in its waves (counted above) when it has a plan.
    statuses = ["queued", "retrying"] + ([] if c.plan else ["scheduled", "paused"])
    with Session(ctx.engine) as s:
        in_flight = s.execute(
            select(Notification.id)  # type: ignore[call-overload]
            .where(Notification.status.in_(statuses))  # type: ignore[attr-defined]
            .where(func.coalesce(Notification.campaign_id, "") == c.id)
            .limit(1)
        ).first()
    return "sending" if in_flight else "completed"


def lookup_timelines(ctx: Any, ref: str, limit: int = 20) -> list[dict[str, Any]]:
    """A notification id or dedup key → its timeline; a user id → the timelines of their latest
    ``limit`` notifications (template secret data masked, as everywhere)."""
    try:
        return [timeline(ctx, ref)]
    except NotFound:
        pass
    with Session(ctx.engine) as s:
        ids = latest_of_user(s, ref, limit)
    return [timeline(ctx, i) for i in ids]
