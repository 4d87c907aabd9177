"""Intake dedup, layer 2: the SQL record of who holds a dedup key (``models.DedupKey``).

Layer 1 is Redis (``notifyctl.intake``): a fast ``SET NX`` that answers most repeats without a
SQL statement. It can lose a key (a restart without persistence, an eviction), and its answer
while the first request is still committing is only "pending": this table decides. Its primary
key lets one row per key exist, so two intakes racing on one key — two processes, two hosts,
SQLite or PostgreSQL — cannot both commit a notification: the second one's insert fails (on
PostgreSQL it waits for the first transaction, then fails or, if that one rolled back, succeeds)
and it answers ``duplicate`` with the holder's id.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from notifyctl.models import DedupKey, Notification, utcnow
from notifyctl.sqllock import write_lock

_K = DedupKey.__table__  # type: ignore[attr-defined]
CLAIM_TRIES = 5  # a holder that rolls back between our insert and our read: try again


def holder(session: Session | Connection, key: str, now: datetime) -> tuple[str, datetime] | None:
    """The notification id holding ``key`` at ``now`` and when its hold ends, or None."""
    row = session.execute(
        select(_K.c.notification_id, _K.c.expires_at).where(_K.c.key == key, _K.c.expires_at > now)
    ).first()
    return (row[0], row[1]) if row is not None else None


def claim(session: Session, key: str, notification_id: str, now: datetime, ttl: int) -> tuple[str, datetime] | None:
    """Take ``key`` for ``notification_id`` in the session's transaction (nothing else may be pending
    in it: a lost race rolls it back). None when taken — the caller adds its notification and
    commits, which makes the hold final — else the current holder's id and the end of its hold."""
    for _ in range(CLAIM_TRIES):
        session.execute(delete(_K).where(_K.c.key == key, _K.c.expires_at <= now))  # an expired hold is over
        session.add(DedupKey(key=key, notification_id=notification_id, expires_at=now + timedelta(seconds=ttl)))
        try:
            session.flush()
            return None
        except IntegrityError:
            session.rollback()
        found = holder(session, key, now)
        session.rollback()  # end the read: the caller's transaction starts afresh
        if found is not None:
            return found
    raise RuntimeError(f"dedup key {key!r}: could not be claimed nor its holder read after {CLAIM_TRIES} tries")


def purge_expired(engine: Engine, now: datetime | None = None, dry_run: bool = False, chunk: int = 5000) -> int:
    """Delete the holds that have ended (or count them, ``dry_run``), in short transactions of at most
    ``chunk`` rows (on SQLite under the writer lock, not urgent). Returns how many."""

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


def backfill(conn: Connection, ttl: int, now: datetime | None = None) -> int:
    """Fill a new ``dedup_keys`` table from the notifications of a database made before it existed:
    each dedup key used within the window, held by its first notification. Returns rows added."""
    n = Notification.__table__  # type: ignore[attr-defined]
    now = now or utcnow()
    since = now - timedelta(seconds=ttl)
    rows: Sequence[Any] = conn.execute(
        select(n.c.dedup_key, func.min(n.c.id), func.min(n.c.created_at))
        .where(n.c.dedup_key.is_not(None), n.c.created_at > since)
        .group_by(n.c.dedup_key)
    ).all()
    if rows:
        conn.execute(
            _K.insert(),
            [
                {"key": k, "notification_id": nid, "expires_at": _aware(at) + timedelta(seconds=ttl)}
                for k, nid, at in rows
            ],
        )
    return len(rows)


def _aware(at: datetime) -> datetime:
    from datetime import UTC

    return at if at.tzinfo else at.replace(tzinfo=UTC)
