"""Stage 1, load: the rows a batch touches, one query per table (plain rows, not ORM objects), and
the shapes the other stages work on (``_D`` a delivery, ``_Note`` a notification, ``_User`` a
recipient)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from typing import Any

import orjson
from sqlmodel import Session

from notifyctl import prefs
from notifyctl.bulk import rows_where_in, unindexed_in
from notifyctl.models import Delivery, DeliveryEvent, DeliveryStatus, DeviceToken, Notification, NotificationStatus

# The delivery statuses as module constants for the other stages: ``DeliveryStatus.sent`` is a
# lookup through the enum's metaclass each time (several times a plain global's), and the hot path
# made a dozen a push. The same members: the rows and comparisons are unchanged.
_QUEUED, _RETRYING, _SENT = DeliveryStatus.queued, DeliveryStatus.retrying, DeliveryStatus.sent
_DELIVERED, _OPENED = DeliveryStatus.delivered, DeliveryStatus.opened
_FAILED, _SUPPRESSED = DeliveryStatus.failed, DeliveryStatus.suppressed


@dataclass(slots=True)
class _D:
    """A delivery as the pipeline works on it: a plain object, not an ORM instance (hot path)."""

    id: str
    notification_id: str
    user_id: str
    channel: str
    route: str
    address: str
    status: str
    attempts: int = 0
    next_attempt_at: datetime | None = None
    provider: str | None = None
    reason: str | None = None
    provider_message_id: str | None = None
    dead_lettered: bool = False


_D_SELECT = f"SELECT {', '.join(_D.__slots__)} FROM deliveries"  # a batch's deliveries, raw (rows_where_in)


def _d_time(dialect: Any) -> Any:
    """How the driver's value of ``next_attempt_at`` becomes a datetime (SQLite stores text), or None."""
    col = Delivery.__table__.c.next_attempt_at  # type: ignore[attr-defined]
    return col.type._cached_result_processor(dialect, None)


_D_FIELDS = itemgetter(*_D.__slots__)  # a new delivery row (every column) → _D's fields, in order
_N = Notification.__table__  # type: ignore[attr-defined]
_DT = Delivery.__table__  # type: ignore[attr-defined]
_ET = DeliveryEvent.__table__  # type: ignore[attr-defined]
_TT = DeviceToken.__table__  # type: ignore[attr-defined]

# The batch loads: only the columns the pipeline reads, on the DBAPI cursor (``rows_where_in``): a
# thousand plain tuples (on PostgreSQL, statements prepared once per connection). The JSON columns
# come as text and are parsed once per distinct text: a campaign batch shares one `data` and one
# `channels`. Whether a notification is ordered is looked up for those outside campaigns only: an
# ordering key comes with a request to intake (``notifyctl.ordering``), which writes no campaign_id;
# a campaign's rows skip the probe of ``ordered_notifications`` (PostgreSQL's CPU per notification
# loaded, 1,000 a batch: 3.4 -> 2.9 µs).
_N_SELECT = (
    "SELECT id, recipient_id, type, template_id, category, priority, dedup_key, CAST(channels AS TEXT), "
    "CAST(data AS TEXT), CASE WHEN campaign_id IS NULL THEN "
    "(SELECT 1 FROM ordered_notifications o WHERE o.notification_id = notifications.id) END, campaign_id, wave "
    "FROM notifications"
)
# by primary key, never through the status index (see notifyctl.bulk.unindexed)
_N_LOADABLE = "AND " + unindexed_in("status", [NotificationStatus.queued, NotificationStatus.retrying])
_U_SELECT = "SELECT id, email, phone, timezone, locale, sms_opt_in, CAST(attributes AS TEXT) FROM users"
# a batch's live device tokens (not through the removed_at index: every live token), oldest first
# per user (a user's rows are in one chunk of ``rows_where_in``)
_T_SELECT = "SELECT device_tokens.user_id, device_tokens.platform, device_tokens.token FROM device_tokens"
_T_LIVE = "AND device_tokens.removed_at || '' IS NULL ORDER BY device_tokens.created_at"
# A small batch (an OTP's: a job of one notification) loads in one statement what the four loads
# above and the opt-out read read in five round trips: each notification with its user's columns,
# its user's opt-outs as ``channel:category`` items joined by commas (``notifyctl.prefs.as_text``),
# and whether it has deliveries yet
# (only those are read: none, for a notification's first batch). Batches of ``SMALL`` or more (a
# campaign's) keep one query per table, whose per-row costs were measured table by table.
SMALL = 50
_AGG = {"postgresql": "string_agg"}  # (else SQLite's group_concat)


def _small_select(dialect: str) -> str:
    agg = _AGG.get(dialect, "group_concat")
    return (
        "SELECT n.id, n.recipient_id, n.type, n.template_id, n.category, n.priority, n.dedup_key, "
        "CAST(n.channels AS TEXT), CAST(n.data AS TEXT), CASE WHEN n.campaign_id IS NULL THEN "
        "(SELECT 1 FROM ordered_notifications o WHERE o.notification_id = n.id) END, n.campaign_id, n.wave, "
        "u.id, u.email, u.phone, u.timezone, u.locale, u.sms_opt_in, CAST(u.attributes AS TEXT), "
        f"(SELECT {agg}(p.channel || ':' || p.category, ',') FROM opt_outs p WHERE p.user_id = u.id), "
        "CASE WHEN EXISTS (SELECT 1 FROM deliveries d WHERE d.notification_id = n.id) THEN 1 END "
        "FROM notifications n LEFT JOIN users u ON u.id = n.recipient_id"
    )


_SMALL_LOADABLE = "AND " + unindexed_in("n.status", [NotificationStatus.queued, NotificationStatus.retrying])


@dataclass(slots=True)
class _Note:
    """A notification as the pipeline reads it (``data_key``: its data as stored, for caching renders)."""

    id: str
    recipient_id: str
    type: str
    template_id: str
    category: str
    priority: str
    dedup_key: str | None
    channels: list[str]
    data: dict[str, Any]
    data_key: str
    ordered: bool = False  # it carries an ordering_key (notifyctl.ordering)
    campaign_id: str | None = None
    wave: int | None = None  # its campaign's time-zone wave (the analytics count by it)


@dataclass(slots=True)
class _User:
    """A recipient as the pipeline reads it."""

    id: str
    email: str | None
    phone: str | None
    timezone: str
    locale: str
    sms_opt_in: bool
    attributes: dict[str, Any]


def _user(row: Any, i: int) -> _User:
    """The ``_User`` of ``_U_SELECT``'s columns in ``row`` from column ``i`` on."""
    attributes = row[i + 6]
    return _User(
        row[i],
        row[i + 1],
        row[i + 2],
        row[i + 3],
        row[i + 4],
        bool(row[i + 5]),
        orjson.loads(attributes) if attributes else {},
    )


class _Batch:
    """The rows a batch touches, loaded with one query per table (plain rows, not ORM objects)."""

    def __init__(self, session: Session, ids: list[str]) -> None:
        parsed: dict[str, Any] = {}

        def load(text: str | None) -> Any:
            value = parsed.get(text)  # type: ignore[arg-type]
            if value is None:
                value = parsed[text] = orjson.loads(text) if text is not None else None  # type: ignore[index]
            return value

        conn = session.connection()
        # notifications with deliveries already (None: read every notification's)
        with_deliveries: list[str] | None = None
        if len(ids) < SMALL:
            rows = rows_where_in(conn, _small_select(conn.dialect.name), "n.id", ids, _SMALL_LOADABLE, prepared=True)
            self.users: dict[str, _User] = {}
            self.opt_outs: dict[str, set[tuple[str, str]]] = {}
            with_deliveries = []
            for row in rows:
                if row[12] is not None and row[12] not in self.users:
                    self.users[row[12]] = _user(row, 12)
                    if row[19]:
                        self.opt_outs[row[12]] = prefs.parse(row[19])
                if row[20] is not None:
                    with_deliveries.append(row[0])
        else:
            rows = rows_where_in(conn, _N_SELECT, "id", ids, _N_LOADABLE, prepared=True)
        self.notifications: list[_Note] = [
            _Note(
                row[0],
                row[1],
                row[2],
                row[3],
                row[4],
                row[5],
                row[6],
                load(row[7]) or [],
                load(row[8]) or {},
                row[8] or "",
                row[9] is not None,
                row[10],
                row[11],
            )
            for row in rows
        ]
        user_ids = {n.recipient_id for n in self.notifications}
        if with_deliveries is None:
            self.users = {
                row[0]: _user(row, 0) for row in rows_where_in(conn, _U_SELECT, "id", list(user_ids), prepared=True)
            }
            self.opt_outs = prefs.load(session, user_ids)
        # a user's live device tokens, oldest first, as (platform, token): push only
        self.tokens: dict[str, list[tuple[str, str]]] = defaultdict(list)
        if user_ids and any("push" in n.channels for n in self.notifications):
            for uid, platform, token in rows_where_in(
                conn, _T_SELECT, "device_tokens.user_id", list(user_ids), _T_LIVE, prepared=True
            ):
                self.tokens[uid].append((platform, token))
        self.deliveries: dict[str, list[_D]] = defaultdict(list)
        nids = [n.id for n in self.notifications] if with_deliveries is None else with_deliveries
        if nids:  # (none, for a batch seen the first time)
            at = _d_time(conn.dialect)
            for row in rows_where_in(conn, _D_SELECT, "notification_id", nids, prepared=True):
                d = _D(*row)
                d.dead_lettered = bool(d.dead_lettered)
                if at is not None and d.next_attempt_at is not None:
                    d.next_attempt_at = at(d.next_attempt_at)
                self.deliveries[d.notification_id].append(d)
