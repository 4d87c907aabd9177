"""Order per user when asked (as SNS FIFO's message group): a request carrying ``ordering_key`` is
sent after every earlier notification of the same recipient, priority and key has been sent (or
has failed, or was suppressed), whichever worker takes it and however often either is retried.

- **Intake** (``assign``) numbers it in its group, in the order accepted: a Redis counter (one
  ``INCR``, atomic for concurrent intakes on every host), never below what the database already
  holds for the group (a Redis that lost the counter goes on from there), then writes the number
  with the notification, in the same transaction (table ``ordered_notifications``).
- **The pipeline** (``hold_back``) looks at a batch's ordered notifications before doing anything
  with them: one that is not the lowest unfinished number of its group is put back (``retrying``,
  due in ``HOLD`` seconds, or when the group's first is due again if that is later: a first one
  waiting 30 minutes for its retry does not have the others queued every second meanwhile) for
  the reconciler to queue again, untouched — no delivery made, no provider called. The batch's
  load tells which notifications are ordered (a column looked up by primary key, per row), so a
  batch without any makes no further query.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from notifyctl import keys
from notifyctl.bulk import rows_where_in
from notifyctl.db import write_lock
from notifyctl.models import Notification, NotificationStatus, OrderedNotification

HOLD = 0.5  # seconds a notification waiting for its predecessors is put back for
_O = OrderedNotification.__table__  # type: ignore[attr-defined]
_N = Notification.__table__  # type: ignore[attr-defined]
_FINAL = [NotificationStatus.done, NotificationStatus.suppressed, NotificationStatus.canceled]

# INCR, but never below ARGV[1] (the database's highest number for the group, plus one)
_NEXT = """
local v = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[1])
if v < floor then
  redis.call('SET', KEYS[1], floor)
  v = floor
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return v
"""
_COUNTER_TTL = 30 * 86400  # a group idle this long starts again from the database's number


def group_key(recipient_id: str, priority: str, ordering_key: str) -> str:
    return hashlib.sha256(f"{recipient_id}\x00{priority}\x00{ordering_key}".encode()).hexdigest()[:32]


def assign(r: Any, session: Session, recipient_id: str, priority: str, ordering_key: str) -> tuple[str, int]:
    """The group and the next number in it, for a notification being accepted now."""
    group = group_key(recipient_id, priority, ordering_key)
    top = session.execute(select(func.max(_O.c.seq)).where(_O.c.group_key == group)).scalar()
    seq = int(r.eval(_NEXT, 1, keys.order(group), int(top or 0) + 1, _COUNTER_TTL))
    return group, seq


def hold_back(session: Session, ids: list[str], now: datetime) -> set[str]:
    """The notifications of ``ids`` (ordered, queued or retrying ones, loaded by a worker) that must wait
    for an earlier one of their group; they are put back (retrying, due in ``HOLD`` s) and
    committed here. Empty for notifications without an ordering key."""
    conn = session.connection()
    mine = rows_where_in(
        conn, "SELECT notification_id, group_key, seq FROM ordered_notifications", "notification_id", ids
    )
    if not mine:
        return set()
    groups = sorted({row[1] for row in mine})
    # every unfinished notification of those groups: the head of each is its lowest number
    head: dict[str, tuple[int, datetime]] = {}
    unfinished = conn.execute(
        select(_O.c.group_key, _O.c.seq, _N.c.due_at)
        .join(_N, _N.c.id == _O.c.notification_id)
        .where(_O.c.group_key.in_(groups), _N.c.status.not_in(_FINAL))
    ).all()
    for row in unfinished:
        group, seq, due = cast(tuple[str, int, datetime], tuple(row))
        if group not in head or seq < head[group][0]:
            head[group] = (seq, due if due.tzinfo else due.replace(tzinfo=UTC))
    # held until their head may be done: no sooner than HOLD, no sooner than its next attempt
    until: dict[datetime, list[str]] = {}
    for nid, group, seq in mine:
        first, due = head.get(group, (seq, now))
        if seq > first:
            until.setdefault(max(now + timedelta(seconds=HOLD), due), []).append(nid)
    held = {nid for nids in until.values() for nid in nids}
    if held:
        with write_lock(session.get_bind()):  # type: ignore[arg-type]
            for at, nids in until.items():
                session.execute(
                    update(_N)
                    .where(
                        _N.c.id.in_(sorted(nids)),
                        _N.c.status.in_([NotificationStatus.queued, NotificationStatus.retrying]),
                    )
                    .values(status=NotificationStatus.retrying, due_at=at, updated_at=now)
                )
            session.commit()
    return held
