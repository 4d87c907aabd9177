"""``campaign launch --dry-run``: the plan pass with the full audience analysis (opt-outs, dedup,
addresses, marketing-SMS consent, a peek at the rate-limit windows, SMS cost); writes nothing.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlmodel import Session, col

from campaigns.plan import Plan, SeenSet, mark_duplicate
from campaigns.resolve import Progress, Resolved, check_template, stream
from campaigns.schedule import plan_waves
from campaigns.segments import BadRows
from notifyctl.context import Context
from notifyctl.errors import InputError
from notifyctl.intake import user_vars
from notifyctl.models import Campaign, DeviceToken, Notification, OptOut, User, utcnow
from notifyctl.policy import refusal
from notifyctl.shards import split
from worker.ratelimit import RateLimiter

_GSM = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXT = set("^{}\\[~]|€\f")


def sms_segments(text: str) -> int:
    """SMS segments for ``text``: GSM-7 (160, or 153 per part) else UCS-2 (70, or 67 per part)."""
    if all(c in _GSM or c in _GSM_EXT for c in text):
        n = sum(2 if c in _GSM_EXT else 1 for c in text)
        return 1 if n <= 160 else math.ceil(n / 153)
    n = len(text.encode("utf-16-le")) // 2
    return 1 if n <= 70 else math.ceil(n / 67)


@dataclass
class _ChannelCount:
    recipients: int = 0  # admitted users
    deliveries: int = 0  # admitted addresses (what would be sent)
    suppressed: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["suppressed"] = dict(self.suppressed)
        d["failed"] = dict(self.failed)
        return d


def dry_run_summary(
    ctx: Context, res: Resolved, progress: Progress | None, campaign: Campaign | None
) -> dict[str, Any]:
    """The audience after opt-outs, dedup, addresses and rate limits; nothing is written anywhere."""
    settings = ctx.settings
    bad = BadRows(keep=res.cfg.max_reported_errors)
    plan = Plan()
    per_channel = {c: _ChannelCount() for c in res.channels}
    wave_channels: dict[datetime, Counter[str]] = defaultdict(Counter)
    seen = SeenSet()  # exact in-segment dedup on disk
    duplicates = already = audience = 0
    sms_parts = sms_recipients = 0
    # one limiter per Redis shard (notifyctl.shards): each user's windows are on that user's shard
    limiters = [
        RateLimiter(ctx.shard_redis(i), settings.rules, settings.rate_limit_bypass_high) for i in range(ctx.shard_count)
    ]
    limiter = limiters[0]
    rules = [r for r in settings.rules if any(r.applies(c, res.category) for c in res.channels)]
    bypass = res.priority == "high" and limiter.bypass_high
    checked = False
    with Session(ctx.engine) as session:
        for chunk in stream(res, bad):
            plan.rows += len(chunk)
            ids = list({x.user_id for x in chunk})
            users = {u.id: u for u in session.scalars(select(User).where(col(User.id).in_(ids)))}
            opt: dict[str, set[tuple[str, str]]] = defaultdict(set)
            for o in session.scalars(select(OptOut).where(col(OptOut.user_id).in_(ids))):
                opt[o.user_id].add((o.channel, o.category))
            tokens: Counter[str] = Counter()
            if "push" in res.channels:
                tokens.update(
                    session.scalars(
                        select(col(DeviceToken.user_id)).where(
                            col(DeviceToken.user_id).in_(ids),
                            col(DeviceToken.removed_at).is_(None),
                        )
                    )
                )
            repeats = seen.duplicates([x for x in chunk if x.user_id in users])
            existing: set[str] = set()
            if campaign is not None:
                existing = set(
                    session.scalars(
                        select(col(Notification.recipient_id)).where(
                            col(Notification.campaign_id) == campaign.id,
                            col(Notification.recipient_id).in_(ids),
                        )
                    )
                )
            # the sliding windows as they stand (nothing recorded): one round trip per chunk
            now_ms = int(utcnow().timestamp() * 1000)
            window: dict[tuple[str, str], int] = {}
            for shard, of_shard in split([u for u in ids if u in users], str, ctx.shard_count).items():
                window.update(limiters[shard].counts(of_shard, rules, now_ms))
            for row in chunk:
                user = users.get(row.user_id)
                if user is None:
                    bad.add(row.line, "unknown_user", f"unknown user {row.user_id!r}")
                    continue
                if not checked:
                    check_template(res, session, row)
                    checked = True
                plan.recipients += 1
                instant, used = res.schedule.instant(user.timezone)
                plan.counts[instant] += 1
                plan.zones[instant].add(used)
                if row.user_id in existing:
                    already += 1
                    continue
                if id(row) in repeats:
                    mark_duplicate(bad, row, repeats[id(row)])
                    duplicates += 1
                    continue
                audience += 1
                blocks = opt.get(user.id, set())
                counts = {rule.key: window.get((user.id, rule.key), 0) for rule in rules}
                data: dict[str, Any] | None = None
                for ch in res.channels:
                    cc = per_channel[ch]
                    naddr = tokens[user.id] if ch == "push" else int(bool(user.email if ch == "email" else user.phone))
                    no = refusal(ch, res.category, blocks, naddr > 0, user.sms_opt_in)
                    if no is not None:
                        cc.suppressed[no.kind] += 1
                        continue
                    if data is None:
                        data = {**res.spec["data"], **row.extras, "user": user_vars(user)}
                    try:
                        content = res.template.render(ch, data)
                    except InputError:
                        cc.failed["template_error"] += naddr
                        continue
                    applicable = limiter.rules_for(ch, res.category)
                    if not bypass and any(counts[rl.key] >= rl.limit for rl in applicable):
                        cc.suppressed["rate_limited"] += 1
                        continue
                    for rl in applicable:
                        counts[rl.key] += 1
                    cc.recipients += 1
                    cc.deliveries += naddr
                    wave_channels[instant][ch] += naddr
                    if ch == "sms":
                        sms_recipients += 1
                        sms_parts += sms_segments(content["text"])
            if progress:
                progress("plan", plan.rows, None)
    waves = plan_waves(plan.counts, plan.zones, res.rate)
    wave_dicts = []
    for w in waves:
        d = w.to_dict()
        d["channels"] = dict(wave_channels.get(w.instant, {}))
        wave_dicts.append(d)
    seen.close()
    return {
        "dry_run": True,
        "campaign_id": campaign.id if campaign else None,
        "name": res.spec["name"] or (campaign.name if campaign else None),
        "template_id": res.template.id,
        "category": res.category,
        "priority": res.priority,
        "channels": res.channels,
        "rate": res.rate,
        "segment": res.segment.describe(),
        "rows": plan.rows + bad.by_kind["encoding"] + bad.by_kind["malformed"],
        "bad_rows": bad.to_dict(),
        "recipients": plan.recipients,
        "duplicates": duplicates,
        "already_in_campaign": already,
        "audience": audience,
        "per_channel": {c: v.to_dict() for c, v in per_channel.items()},
        "waves": wave_dicts,
        "timezone_fallbacks": res.schedule.fallbacks,
        "sms_cost": {
            "recipients": sms_recipients,
            "segments": sms_parts,
            "per_segment": res.cfg.sms_cost_per_segment,
            "estimate": round(sms_parts * res.cfg.sms_cost_per_segment, 4),
            "currency": res.cfg.currency,
        },
    }
