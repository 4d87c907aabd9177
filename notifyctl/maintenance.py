"""Housekeeping for cron: stale device tokens.

A token is stale when its last successful push (``last_success_at``, or ``created_at`` when it
never had one) is older than N days. Cleanup marks it removed (``removed_at`` and
``removed_reason = "stale: no success in N days"``); the row stays, so ``tokens list --removed``
shows what went and why, and ``tokens register`` brings a token back. It is idempotent (a
removed token is never touched again) and batched: keyset pages of 1000 tokens, one bulk UPDATE
each, which re-checks staleness so a push that succeeded meanwhile keeps its token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlmodel import Session, col

from notifyctl.context import Context
from notifyctl.errors import InputError
from notifyctl.models import DeviceToken, utcnow

CHUNK = 1000
MAX_STALE_DAYS = 36500


@dataclass
class CleanupResult:
    stale_days: int
    cutoff: datetime
    dry_run: bool
    removed: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stale_days": self.stale_days,
            "cutoff": self.cutoff,
            "dry_run": self.dry_run,
            "removed_count": len(self.removed),
            "removed": self.removed,
        }


def stale_reason(days: int) -> str:
    return f"stale: no success in {days} days"


def cleanup_stale_tokens(
    ctx: Context,
    stale_days: int,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    chunk: int = CHUNK,
    progress: Callable[[int], None] | None = None,
) -> CleanupResult:
    """Remove live tokens without a success in ``stale_days`` days; returns what was (or would be) removed."""
    if not 1 <= stale_days <= MAX_STALE_DAYS:
        raise InputError(f"--stale-days: must be between 1 and {MAX_STALE_DAYS}, got {stale_days}")
    now = now or utcnow()
    cutoff = now - timedelta(days=stale_days)
    reason = stale_reason(stale_days)
    res = CleanupResult(stale_days=stale_days, cutoff=cutoff, dry_run=dry_run)
    last_seen = func.coalesce(col(DeviceToken.last_success_at), col(DeviceToken.created_at))
    live_and_stale = (col(DeviceToken.removed_at).is_(None), last_seen < cutoff)
    after = ""
    while True:
        with Session(ctx.engine) as session:
            rows = session.execute(
                select(
                    col(DeviceToken.token),
                    col(DeviceToken.user_id),
                    col(DeviceToken.platform),
                    col(DeviceToken.created_at),
                    col(DeviceToken.last_success_at),
                )
                .where(*live_and_stale, col(DeviceToken.token) > after)
                .order_by(col(DeviceToken.token))
                .limit(chunk)
            ).all()
            if not rows:
                break
            after = rows[-1][0]
            tokens = [r[0] for r in rows]
            if dry_run:
                gone = set(tokens)
            else:
                gone = set(
                    session.scalars(
                        update(DeviceToken)
                        .where(col(DeviceToken.token).in_(tokens), *live_and_stale)
                        .values(removed_at=now, removed_reason=reason)
                        .returning(col(DeviceToken.token))
                    )
                )
                session.commit()
        for token, user_id, platform, created_at, last_success_at in rows:
            if token in gone:
                res.removed.append(
                    {
                        "token": token,
                        "user_id": user_id,
                        "platform": platform,
                        "created_at": created_at,
                        "last_success_at": last_success_at,
                        "reason": reason,
                    }
                )
        if progress:
            progress(len(rows))
    return res
