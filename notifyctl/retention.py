"""Retention: delete old notifications with their deliveries and delivery events (``notifyctl purge``).

What goes: notifications created before the cutoff that are over — ``done``, ``suppressed`` or
``canceled`` — with every delivery and event of theirs. What stays, however old:

- anything still in flight: a notification ``queued``, ``retrying``, ``scheduled`` or ``paused``, or
  one with a delivery ``queued`` or ``retrying`` (a DLQ replay in progress);
- anything an operator has not dealt with: a notification with a delivery still in the DLQ
  (``dead_lettered``). ``dlq replay`` or ``dlq purge`` deals with it; the next run takes it;
- the notifications of a campaign whose launch has not finished (``launched_at`` unset): a
  ``campaign launch --resume`` skips the recipients it already has by their rows;
- the dedup window: the cutoff is never younger than ``NOTIFY_DEDUP_TTL``, so intake's SQL check of
  a dedup key (``created_at`` within the window) always finds what it needs.

It never blocks the workers for long: keyset pages of ``CHUNK`` notifications (notification ids are
time-ordered, so only the ids older than the cutoff are read), each deleted in one short
transaction — on SQLite under the writer lock (``notifyctl.db.write_lock``, not urgent: an OTP's
write goes first), on PostgreSQL the same batches. The DELETE checks every condition again, so
what changed since the page was read (a replay, a late retry) is kept. Redis holds nothing per
notification that outlives it (dedup keys and send records expire on their own); the SQL record
of dedup keys (``dedup_keys``) loses the holds whose window has ended.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, exists, func, or_, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from notifyctl.bulk import unindexed
from notifyctl.context import Context
from notifyctl.db import write_lock
from notifyctl.errors import InputError
from notifyctl.models import (
    Campaign,
    DedupKey,
    Delivery,
    DeliveryEvent,
    DeliveryStatus,
    Notification,
    NotificationStatus,
    id_floor,
    utcnow,
)

CHUNK = 500
MAX_DAYS = 36500
OVER = [NotificationStatus.done, NotificationStatus.suppressed, NotificationStatus.canceled]

_N = Notification.__table__  # type: ignore[attr-defined]
_D = Delivery.__table__  # type: ignore[attr-defined]
_E = DeliveryEvent.__table__  # type: ignore[attr-defined]
_K = DedupKey.__table__  # type: ignore[attr-defined]


@dataclass
class PurgeResult:
    older_than_s: float
    cutoff: datetime
    dry_run: bool
    notifications: int = 0
    deliveries: int = 0
    events: int = 0
    kept: int = 0  # old enough, but in flight, in the DLQ or of an unfinished campaign launch
    dedup_keys: int = 0  # dedup holds whose window has ended (``purge_dedup_keys``)
    batches: int = 0
    longest_batch_ms: float = 0.0  # the longest delete transaction (on SQLite: the writer lock held)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "longest_batch_ms": round(self.longest_batch_ms, 1)}


def _old(cutoff: datetime) -> list[Any]:
    """Notifications created before ``cutoff``."""
    return [
        _N.c.id < id_floor("n", cutoff),  # a primary-key range: only the old part of the table is read
        _N.c.created_at < cutoff,
    ]


def _over() -> list[Any]:
    """Notifications that are over: a final status, no delivery in flight or in the DLQ, not of an
    unfinished campaign launch."""
    conds = [
        unindexed(_N.c.status).in_(OVER),  # (through the id range, not the status index)
        ~exists().where(
            _D.c.notification_id == _N.c.id,
            or_(unindexed(_D.c.status).in_([DeliveryStatus.queued, DeliveryStatus.retrying]), _D.c.dead_lettered),
        ),
    ]
    c = Campaign.__table__  # type: ignore[attr-defined]
    launching = select(c.c.id).where(c.c.launched_at.is_(None))
    conds.append(or_(_N.c.campaign_id.is_(None), _N.c.campaign_id.not_in(launching)))
    return conds


def check_older_than(ctx: Context, seconds: float) -> None:
    """InputError unless ``seconds`` is a retention notifyctl can honour (``--older-than``)."""
    dedup = ctx.settings.dedup_ttl
    if seconds > MAX_DAYS * 86400:
        raise InputError(f"--older-than: at most {MAX_DAYS} days")
    if seconds < dedup:
        raise InputError(
            f"--older-than: {seconds:g}s is inside the dedup window ({dedup}s, NOTIFY_DEDUP_TTL): intake looks up "
            "notifications that young to refuse a repeated dedup key; give at least that"
        )


def count_old(ctx: Context, older_than: float, now: datetime | None = None) -> int:
    """How many notifications are old enough (over or not): a purge's total, for progress."""
    cutoff = (now or utcnow()) - timedelta(seconds=older_than)
    with Session(ctx.engine) as session:
        return int(session.execute(select(func.count()).select_from(_N).where(*_old(cutoff))).scalar_one())


def purge(
    ctx: Context,
    older_than: float,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    chunk: int = CHUNK,
    progress: Callable[[int], None] | None = None,
) -> PurgeResult:
    """Delete notifications older than ``older_than`` seconds (see the module), with their deliveries
    and events; with ``dry_run``, count what would go. ``progress(n)`` after each page of n."""
    check_older_than(ctx, older_than)
    cutoff = (now or utcnow()) - timedelta(seconds=older_than)
    res = PurgeResult(older_than_s=older_than, cutoff=cutoff, dry_run=dry_run)
    old, over = _old(cutoff), _over()
    engine = ctx.engine
    after = ""
    while True:
        with Session(engine) as session:
            page = (
                session.execute(
                    select(_N.c.id, and_(*over)).where(_N.c.id > after, *old).order_by(_N.c.id).limit(chunk)
                )
                .tuples()
                .all()
            )
            if not page:
                break
            after = page[-1][0]
            ids = [i for i, is_over in page if is_over]
            res.kept += len(page) - len(ids)
            if dry_run and ids:
                res.notifications += len(ids)
                res.deliveries += _count(session, _D, ids)
                res.events += _count(session, _E, ids)
        if ids and not dry_run:
            _delete(ctx, ids, [*old, *over], res)
        if progress:
            progress(len(page))
    res.dedup_keys = purge_dedup_keys(engine, now or utcnow(), dry_run=dry_run)
    return res


def _count(session: Session, table: Any, ids: list[str]) -> int:
    q = select(func.count()).select_from(table).where(table.c.notification_id.in_(ids))
    return int(session.execute(q).scalar_one())


def _delete(ctx: Context, ids: list[str], conds: list[Any], res: PurgeResult) -> None:
    """One short transaction: the notifications that still qualify, then their deliveries and events."""
    with write_lock(ctx.engine), Session(ctx.engine) as session:
        t0 = time.perf_counter()
        gone: list[str] = list(session.scalars(delete(_N).where(_N.c.id.in_(ids), *conds).returning(_N.c.id)))
        if gone:
            res.events += session.execute(delete(_E).where(_E.c.notification_id.in_(gone))).rowcount  # type: ignore[attr-defined]
            res.deliveries += session.execute(delete(_D).where(_D.c.notification_id.in_(gone))).rowcount  # type: ignore[attr-defined]
        session.commit()
        res.longest_batch_ms = max(res.longest_batch_ms, (time.perf_counter() - t0) * 1000)
    res.notifications += len(gone)
    res.kept += len(ids) - len(gone)
    res.batches += 1


def purge_dedup_keys(engine: Engine, now: datetime | None = None, dry_run: bool = False, chunk: int = 5000) -> int:
    """Delete the dedup holds that have ended (``notifyctl.intake``'s SQL layer; or count them,
    ``dry_run``), in short transactions of at most ``chunk`` rows (on SQLite under the writer lock,
    not urgent). Returns how many."""

    now = now or utcnow()
    if dry_run:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(_K).where(_K.c.expires_at <= now)).scalar_one())
    total = 0
    while True:
        with write_lock(engine), engine.begin() as conn:
            page = select(_K.c.key).where(_K.c.expires_at <= now).limit(chunk)
            n = conn.execute(delete(_K).where(_K.c.key.in_(page), _K.c.expires_at <= now)).rowcount
        total += n
        if n < chunk:
            return total
