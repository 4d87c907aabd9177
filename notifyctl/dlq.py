"""One module: the dead-letter queue's operations (list, show, replay, purge, stats) share one filter,
one query and the send records replay reads; ~530 lines.

The dead-letter queue: deliveries that failed for good (``status = failed``, ``dead_lettered``).

SQL is the DLQ: nothing lives in Redis but the per-delivery send records the worker writes
(``notif:sent:<delivery id>``), which replay reads to never send twice.

- ``list_entries`` / ``count_entries`` / ``show_entry``: read, filtered by :class:`DlqFilter`.
- ``replay``: back to ``retrying`` (attempts 0, due now) and the notification to ``retrying`` with
  ``due_at`` now, so the worker pool's reconciler queues it — crash-safe, nothing is sent here.
  Entries whose send record says ``sent:`` were sent meanwhile: they are skipped (and recorded
  as sent). Batched: per chunk one MGET, one UPDATE … RETURNING, one INSERT of events.
- ``purge``: out of the DLQ (``dead_lettered`` false, event ``purged``); status and history stay.
- ``stats``: depth, growth per minute (what the DLQ alert of ``notifyctl.alerts`` watches).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, insert, select, tuple_, update
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col

from notifyctl import keys
from notifyctl.context import Context
from notifyctl.errors import InputError, NotFound
from notifyctl.models import (
    DLQ_WHERE,
    Delivery,
    DeliveryEvent,
    DeliveryStatus,
    Notification,
    NotificationStatus,
    utcnow,
)
from notifyctl.tracking import implied_events, implied_marks
from notifyctl.vocabulary import CHANNELS, PROVIDERS

log = logging.getLogger("notifyctl.dlq")

CHUNK = 500
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(text: str, flag: str) -> float:
    """``30m`` / ``2h`` / ``7d`` / ``45s`` / ``1w`` → seconds; InputError naming the flag otherwise."""
    m = _DURATION_RE.match(text or "")
    if not m or float(m.group(1)) <= 0:
        raise InputError(f"{flag}: expected a duration such as 30m, 2h or 7d, got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def mask_address(address: str | None) -> str:
    """Enough to recognise an address, not enough to reuse it."""
    if not address or address == "-":
        return address or ""
    if "@" in address:
        local, _, domain = address.partition("@")
        return f"{local[:1]}***@{domain}"
    if address.startswith("+") and address[1:].isdigit():
        return address[:4] + "*" * max(0, len(address) - 6) + address[-2:]
    return address[:8] + "…" if len(address) > 8 else address[:2] + "…"


@dataclass
class DlqFilter:
    channel: str | None = None
    provider: str | None = None
    error: str | None = None
    template: str | None = None
    older_than: float | None = None  # seconds
    newer_than: float | None = None  # seconds
    ids: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        channel: str | None = None,
        provider: str | None = None,
        error: str | None = None,
        template: str | None = None,
        older_than: str | None = None,
        newer_than: str | None = None,
        ids: Sequence[str] = (),
    ) -> DlqFilter:
        """Validate the CLI's/API's raw values; InputError names the bad flag."""
        if channel is not None and channel not in CHANNELS:
            raise InputError(f"--channel: unknown channel {channel!r} (use {', '.join(CHANNELS)})")
        if provider is not None:
            if provider not in PROVIDERS:
                raise InputError(f"--provider: unknown provider {provider!r} (known: {', '.join(sorted(PROVIDERS))})")
        if error is not None and not error.strip():
            raise InputError("--error: empty text")
        if template is not None and not template.strip():
            raise InputError("--template: empty template id")
        older = parse_duration(older_than, "--older-than") if older_than is not None else None
        newer = parse_duration(newer_than, "--newer-than") if newer_than is not None else None
        if older is not None and newer is not None and newer <= older:
            raise InputError("--newer-than must be longer than --older-than, or nothing can match")
        return cls(channel, provider, error, template, older, newer, [i.strip() for i in ids if i.strip()])

    def where(self, now: datetime) -> list[ColumnElement[bool]]:
        conds: list[ColumnElement[bool]] = [DLQ_WHERE]  # failed and dead-lettered: ix_deliveries_dlq
        if self.ids:
            conds.append(col(Delivery.id).in_(self.ids))
        if self.channel:
            conds.append(col(Delivery.channel) == self.channel)
        if self.provider:
            conds.append(col(Delivery.provider) == self.provider)
        if self.error:
            esc = self.error.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            conds.append(col(Delivery.reason).ilike(f"%{esc}%", escape="\\"))
        if self.template:
            conds.append(col(Notification.template_id) == self.template)
        if self.older_than is not None:
            conds.append(col(Delivery.failed_at) <= now - timedelta(seconds=self.older_than))
        if self.newer_than is not None:
            conds.append(col(Delivery.failed_at) >= now - timedelta(seconds=self.newer_than))
        return conds


def _entry(d: Delivery, template_id: str | None) -> dict[str, Any]:
    return {
        "delivery_id": d.id,
        "notification_id": d.notification_id,
        "template_id": template_id,
        "user_id": d.user_id,
        "channel": d.channel,
        "route": d.route,
        "address": mask_address(d.address),
        "provider": d.provider,
        "attempts": d.attempts,
        "failed_at": d.failed_at,
        "reason": d.reason,
    }


def _base_query(cols: Any, f: DlqFilter, now: datetime, join: bool = True) -> Any:
    q = select(*cols).select_from(Delivery)
    if join:
        q = q.join(Notification, col(Notification.id) == col(Delivery.notification_id))
    return q.where(and_(*f.where(now)))


def list_entries(ctx: Context, f: DlqFilter, limit: int | None = 50, before: str | None = None) -> list[dict[str, Any]]:
    """DLQ entries, most recent failure first: read backwards along ``ix_deliveries_dlq``, so the
    first page costs ``limit`` rows whatever the DLQ's depth. ``before`` (a delivery id, the last
    one of the previous page) continues after it: keyset pagination on (failed_at, id)."""
    with Session(ctx.engine) as session:
        q = _base_query((Delivery, Notification.template_id), f, utcnow()).order_by(
            col(Delivery.failed_at).desc(),
            col(Delivery.id).desc(),
        )
        if before is not None:
            at = session.execute(select(col(Delivery.failed_at)).where(col(Delivery.id) == before)).first()
            if at is None or at[0] is None:
                raise NotFound(f"no DLQ entry {before!r} to list from")
            q = q.where(tuple_(Delivery.failed_at, Delivery.id) < tuple_(at[0], before))
        if limit:
            q = q.limit(limit)
        return [_entry(d, t) for d, t in session.execute(q).tuples().all()]


def count_entries(ctx: Context, f: DlqFilter) -> int:
    """How many entries match: counted in ``ix_deliveries_dlq`` alone (no join with the
    notifications unless the filter names a template, nor any table read unless it needs the reason)."""
    with Session(ctx.engine) as session:
        q = _base_query((func.count(),), f, utcnow(), join=f.template is not None)
        return int(session.execute(q).scalar_one())


def show_entry(ctx: Context, delivery_id: str) -> dict[str, Any]:
    """One delivery (in the DLQ or not), its notification's summary and the delivery's timeline."""
    with Session(ctx.engine) as session:
        d = session.get(Delivery, delivery_id)
        if d is None:
            raise NotFound(f"no delivery {delivery_id!r}")
        n = session.get(Notification, d.notification_id)
        evs = session.scalars(
            select(DeliveryEvent)
            .where(col(DeliveryEvent.notification_id) == d.notification_id, col(DeliveryEvent.delivery_id) == d.id)
            .order_by(col(DeliveryEvent.id))
        )
        delivery = d.model_dump()
        delivery["address"] = mask_address(d.address)
        return {
            "delivery": delivery,
            "in_dlq": bool(d.dead_lettered),
            "notification": {
                "id": d.notification_id,
                "template_id": n.template_id if n else None,
                "recipient_id": n.recipient_id if n else None,
                "priority": n.priority if n else None,
                "category": n.category if n else None,
                "status": n.status if n else None,
            },
            "events": [
                {"at": e["at"], "status": e["status"], "detail": e["detail"]}
                for e in implied_events([e.model_dump() for e in evs], *implied_marks([d]))
            ],
        }


def _pages(ctx: Context, f: DlqFilter, limit: int | None, now: datetime) -> Iterator[list[tuple[str, str, str | None]]]:
    """Matching (delivery id, notification id, reason) in pages of CHUNK, keyset on the id.

    Each page is read after the previous one was acted on, so a long replay neither loads every
    id at once nor sees the rows it already moved out of the DLQ."""
    last = ""
    left = limit if limit else None
    while left is None or left > 0:
        size = CHUNK if left is None else min(CHUNK, left)
        with Session(ctx.engine) as session:
            rows = session.execute(
                _base_query((Delivery.id, Delivery.notification_id, Delivery.reason), f, now)
                .where(col(Delivery.id) > last)
                .order_by(col(Delivery.id))
                .limit(size)
            ).all()
        if not rows:
            return
        last = rows[-1][0]
        if left is not None:
            left -= len(rows)
        yield [(r[0], r[1], r[2]) for r in rows]


def _send_records(ctx: Context, ks: list[str]) -> list[Any]:
    """The send records of ``ks`` (``keys.sent``): each is on its user's Redis shard and on no other
    (``notifyctl.shards``), so with several shards each shard is asked and what one has is taken."""
    if ctx.shard_count == 1:
        return list(ctx.redis.mget(ks))
    found: list[Any] = [None] * len(ks)
    for i in range(ctx.shard_count):
        for j, rec in enumerate(ctx.shard_redis(i).mget(ks)):
            found[j] = found[j] or rec
    return found


@dataclass
class ReplayResult:
    matched: int = 0
    replayed: list[str] = field(default_factory=list)
    skipped_sent: list[str] = field(default_factory=list)  # sent meanwhile (Redis send record)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "matched": self.matched,
            "replayed": len(self.replayed),
            "skipped_sent": len(self.skipped_sent),
            "replayed_ids": self.replayed,
            "skipped_sent_ids": self.skipped_sent,
        }


def _require_ids_found(ctx: Context, f: DlqFilter) -> None:
    """Named ids must each be a delivery in the DLQ: say which one is not, before doing anything."""
    if not f.ids:
        return
    with Session(ctx.engine) as session:
        rows = dict(
            session.execute(
                select(col(Delivery.id), col(Delivery.dead_lettered)).where(col(Delivery.id).in_(f.ids))
            ).all()
        )
    for i in f.ids:
        if i not in rows:
            raise NotFound(f"no delivery {i!r}")
        if not rows[i]:
            raise NotFound(f"delivery {i!r} is not in the DLQ")


def replay(
    ctx: Context,
    f: DlqFilter,
    *,
    limit: int | None = None,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ReplayResult:
    """Send matching DLQ entries again, through the reconciler. ``progress(n)`` after each chunk."""
    _require_ids_found(ctx, f)
    res = ReplayResult(dry_run=dry_run)
    now = utcnow()
    for page in _pages(ctx, f, limit, now):
        res.matched += len(page)
        records = _send_records(ctx, [keys.sent(p[0]) for p in page])
        sent: dict[str, str] = {}
        todo: list[tuple[str, str, str | None]] = []
        for p, rec in zip(page, records, strict=True):
            val = rec.decode() if isinstance(rec, bytes) else rec
            if val and val.startswith("sent:"):
                sent[p[0]] = val[5:]
            else:
                todo.append(p)
        if dry_run:
            res.replayed += [p[0] for p in todo]
            res.skipped_sent += list(sent)
        else:
            done, skipped = _replay_chunk(ctx, todo, sent)
            res.replayed += done
            res.skipped_sent += skipped
        if progress:
            progress(len(page))
    return res


def _replay_chunk(
    ctx: Context, todo: list[tuple[str, str, str | None]], sent: dict[str, str]
) -> tuple[list[str], list[str]]:
    now = utcnow()
    replayed: list[str] = []
    skipped: list[str] = []
    events: list[dict[str, Any]] = []
    notif_ids: set[str] = set()
    reasons = {p[0]: p[2] for p in todo}
    with Session(ctx.engine) as session:
        if todo:
            rows = (
                session.execute(
                    update(Delivery)
                    .where(
                        col(Delivery.id).in_([p[0] for p in todo]),
                        col(Delivery.dead_lettered).is_(True),
                        col(Delivery.status) == DeliveryStatus.failed,
                    )
                    .values(
                        status=DeliveryStatus.retrying,
                        attempts=0,
                        next_attempt_at=now,
                        dead_lettered=False,
                        reason=None,
                        updated_at=now,
                    )
                    .returning(col(Delivery.id), col(Delivery.notification_id))
                )
                .tuples()
                .all()
            )
            for did, nid in rows:
                replayed.append(did)
                notif_ids.add(nid)
                was = reasons.get(did)
                events.append(
                    {
                        "notification_id": nid,
                        "delivery_id": did,
                        "status": "replayed",
                        "detail": f"replayed from the DLQ (was: {was})"[:1024] if was else "replayed from the DLQ",
                        "at": now,
                    }
                )
        if sent:
            # Sent meanwhile: the send record is the proof. Record it, as the worker would, and leave the DLQ.
            still = (
                session.execute(
                    select(col(Delivery.id), col(Delivery.notification_id)).where(
                        col(Delivery.id).in_(list(sent)),
                        col(Delivery.dead_lettered).is_(True),
                    )
                )
                .tuples()
                .all()
            )
            if still:
                session.execute(
                    update(Delivery),
                    [
                        {
                            "id": did,
                            "status": DeliveryStatus.sent,
                            "dead_lettered": False,
                            "provider_message_id": sent[did] or None,
                            "sent_at": now,
                            "updated_at": now,
                        }
                        for did, _nid in still
                    ],
                )
            for did, nid in still:
                skipped.append(did)
                events.append(
                    {
                        "notification_id": nid,
                        "delivery_id": did,
                        "status": DeliveryStatus.sent,
                        "detail": f"replay skipped: already sent ({sent[did]}) per send record",
                        "at": now,
                    }
                )
        if events:
            session.execute(insert(DeliveryEvent), events)
        if notif_ids:
            session.execute(
                update(Notification)
                .where(
                    col(Notification.id).in_(notif_ids),
                    col(Notification.status).notin_(
                        [NotificationStatus.canceled, NotificationStatus.paused, NotificationStatus.scheduled]
                    ),
                )
                .values(status=NotificationStatus.retrying, due_at=now, job_id=None, reason=None, updated_at=now)
                .execution_options(synchronize_session=False)
            )
        session.commit()
    return replayed, skipped


@dataclass
class PurgeResult:
    matched: int = 0
    purged: int = 0
    by_channel: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def purge(
    ctx: Context,
    f: DlqFilter,
    *,
    limit: int | None = None,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> PurgeResult:
    """Take matching entries out of the DLQ for good; they stay ``failed``, with their history."""
    _require_ids_found(ctx, f)
    res = PurgeResult(dry_run=dry_run)
    channels: Counter[str] = Counter()
    now = utcnow()
    for page in _pages(ctx, f, limit, now):
        res.matched += len(page)
        with Session(ctx.engine) as session:
            if dry_run:
                rows = (
                    session.execute(
                        select(col(Delivery.id), col(Delivery.notification_id), col(Delivery.channel)).where(
                            col(Delivery.id).in_([p[0] for p in page])
                        )
                    )
                    .tuples()
                    .all()
                )
            else:
                rows = (
                    session.execute(
                        update(Delivery)
                        .where(col(Delivery.id).in_([p[0] for p in page]), col(Delivery.dead_lettered).is_(True))
                        .values(dead_lettered=False, updated_at=utcnow())
                        .returning(col(Delivery.id), col(Delivery.notification_id), col(Delivery.channel))
                    )
                    .tuples()
                    .all()
                )
                if rows:
                    session.execute(
                        insert(DeliveryEvent),
                        [
                            {
                                "notification_id": nid,
                                "delivery_id": did,
                                "status": "purged",
                                "detail": "purged from the DLQ by an operator",
                                "at": utcnow(),
                            }
                            for did, nid, _ch in rows
                        ],
                    )
                session.commit()
        res.purged += len(rows)
        channels.update(ch for _d, _n, ch in rows)
        if progress:
            progress(len(page))
    res.by_channel = dict(channels)
    return res


# ── depth, growth ───────────────────────────────────────────────────────────────────────────


def stats(ctx: Context, window_min: float = 5.0, now: datetime | None = None) -> dict[str, Any]:
    """DLQ depth, and growth per minute over the last ``window_min`` minutes (by ``failed_at``)."""
    if window_min <= 0:
        raise InputError(f"--window: must be > 0 minutes, got {window_min:g}")
    now = now or utcnow()
    since = now - timedelta(minutes=window_min)
    dead = DLQ_WHERE  # read from ix_deliveries_dlq alone (it holds channel, provider, failed_at)
    with Session(ctx.engine) as session:
        by = (
            session.execute(
                select(
                    col(Delivery.channel),
                    col(Delivery.provider),
                    func.count(col(Delivery.id)),
                    func.sum(case((col(Delivery.failed_at) >= since, 1), else_=0)),
                    func.min(col(Delivery.failed_at)),
                )
                .where(dead)
                .group_by(col(Delivery.channel), col(Delivery.provider))
            )
            .tuples()
            .all()
        )
    depth = sum(int(c) for _, _, c, _, _ in by)
    recent = sum(int(n or 0) for _, _, _, n, _ in by)
    oldest = min((o for *_, o in by if o is not None), default=None)
    by_channel: Counter[str] = Counter()
    by_provider: Counter[str] = Counter()
    for ch, prov, c, _, _ in by:
        by_channel[ch] += int(c)
        by_provider[prov or "-"] += int(c)
    return {
        "depth": depth,
        "window_min": window_min,
        "entered_in_window": recent,
        "growth_per_min": round(recent / window_min, 3),
        "oldest_failed_at": oldest,
        "by_channel": dict(by_channel),
        "by_provider": dict(by_provider),
        "at": now,
    }
