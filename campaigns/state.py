"""Pause, resume and cancel: one UPDATE over the campaign's notifications each (resume re-spaces
the ones whose time passed while paused, at the campaign's rate)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlmodel import Session, col

from campaigns.names import find_campaign
from campaigns.report import current_state
from notifyctl.context import Context
from notifyctl.errors import InputError
from notifyctl.models import Campaign, CampaignStatus, Notification, NotificationStatus, utcnow

_UNPRODUCED = (NotificationStatus.scheduled, NotificationStatus.paused, NotificationStatus.canceled)


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _produced(session: Session, cid: str) -> int:
    return session.execute(
        select(func.count()).where(
            col(Notification.campaign_id) == cid,
            col(Notification.status).not_in(_UNPRODUCED),
        )
    ).scalar_one()


def _set_status(session: Session, camp: Campaign, status: str) -> None:
    session.execute(update(Campaign).where(col(Campaign.id) == camp.id).values(status=status, updated_at=utcnow()))


def pause(ctx: Context, ref: str) -> dict[str, Any]:
    with Session(ctx.engine) as session:
        camp = find_campaign(session, ref)
        if camp.status == CampaignStatus.canceled:
            raise InputError(f"campaign {camp.id} is canceled; it cannot be paused")
        _set_status(session, camp, CampaignStatus.paused)
        res = session.execute(
            update(Notification)
            .where(col(Notification.campaign_id) == camp.id, col(Notification.status) == NotificationStatus.scheduled)
            .values(status=NotificationStatus.paused, updated_at=utcnow())
        )
        session.commit()
        return {
            "campaign_id": camp.id,
            "name": camp.name,
            "state": current_state(session, camp),
            "paused": res.rowcount,  # type: ignore[attr-defined]
            "already_produced": _produced(session, camp.id),
        }


def cancel(ctx: Context, ref: str) -> dict[str, Any]:
    with Session(ctx.engine) as session:
        camp = find_campaign(session, ref)
        _set_status(session, camp, CampaignStatus.canceled)
        res = session.execute(
            update(Notification)
            .where(
                col(Notification.campaign_id) == camp.id,
                col(Notification.status).in_([NotificationStatus.scheduled, NotificationStatus.paused]),
            )
            .values(status=NotificationStatus.canceled, reason="campaign canceled", updated_at=utcnow())
        )
        session.commit()
        return {
            "campaign_id": camp.id,
            "name": camp.name,
            "state": current_state(session, camp),
            "canceled": res.rowcount,  # type: ignore[attr-defined]
            "already_produced": _produced(session, camp.id),
        }


def resume(ctx: Context, ref: str, now: datetime | None = None, page: int = 1000) -> dict[str, Any]:
    """Paused → scheduled. Notifications whose due_at is still ahead keep it; those whose time
    passed while paused are spaced from now at the campaign's rate (so a long pause does not
    end in a burst), in due_at order."""
    now = (now or utcnow()).astimezone(UTC)
    with Session(ctx.engine) as session:
        camp = find_campaign(session, ref)
        if camp.status == CampaignStatus.canceled:
            raise InputError(f"campaign {camp.id} is canceled; it cannot be resumed")
        rate = float(camp.spec.get("rate") or 0)
        step = timedelta(seconds=1 / rate) if rate > 0 else timedelta(0)
        cursor = now
        moved = 0
        while True:  # pages in due_at order; each moved row leaves 'paused', so the next page starts after it
            rows = (
                session.execute(
                    select(col(Notification.id), col(Notification.due_at))
                    .where(
                        col(Notification.campaign_id) == camp.id,
                        col(Notification.status) == NotificationStatus.paused,
                        col(Notification.due_at) < cursor,
                    )
                    .order_by(col(Notification.due_at), col(Notification.id))
                    .limit(page)
                )
                .tuples()
                .all()
            )
            updates = []
            for nid, due in rows:
                if _aware(due) >= cursor:
                    break
                updates.append({"id": nid, "due_at": cursor, "status": NotificationStatus.scheduled, "updated_at": now})
                cursor += step
            if not updates:
                break
            session.execute(update(Notification), updates)
            session.commit()
            moved += len(updates)
        res = session.execute(
            update(Notification)
            .where(col(Notification.campaign_id) == camp.id, col(Notification.status) == NotificationStatus.paused)
            .values(status=NotificationStatus.scheduled, updated_at=utcnow())
        )
        _set_status(session, camp, CampaignStatus.active)
        session.commit()
        return {
            "campaign_id": camp.id,
            "name": camp.name,
            "state": current_state(session, camp),
            "resumed": res.rowcount + moved,  # type: ignore[attr-defined]
            "rescheduled": moved,
            "launch_incomplete": camp.launched_at is None,
        }
