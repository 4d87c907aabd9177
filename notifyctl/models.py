"""One module: every table of the SQL record, the source of truth, in one place; ~570 lines
(their ids: ``notifyctl.ids``).

The SQL record. It is the source of truth: Redis holds queues, dedup keys, rate-limit windows
and sent markers, all of which can be rebuilt from here (see ``worker.reconciler``).

Delivery status moves forward only::

    queued ──► sent ──► delivered ──► opened
      │  ▲
      ▼  │
    retrying          failed (reason; dead-lettered unless the address is dead)
                      suppressed (reason: opted_out, rate_limited, no_address, duplicate, ...)
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Index,
    PrimaryKeyConstraint,
    String,
    Text,
    UniqueConstraint,
    and_,
    literal_column,
    text,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement
from sqlmodel import Field, SQLModel

from notifyctl.ids import derived_id as derived_id
from notifyctl.ids import id_floor as id_floor
from notifyctl.ids import new_id as new_id
from notifyctl.ids import utcnow as utcnow


class DeliveryStatus(StrEnum):
    queued = "queued"
    retrying = "retrying"
    sent = "sent"
    delivered = "delivered"
    opened = "opened"
    failed = "failed"
    suppressed = "suppressed"


FINAL_STATUSES = frozenset(
    {
        DeliveryStatus.sent,
        DeliveryStatus.delivered,
        DeliveryStatus.opened,
        DeliveryStatus.failed,
        DeliveryStatus.suppressed,
    }
)
# Forward-only ordering for tracking updates (webhooks arrive late and out of order).
STATUS_RANK = {"queued": 0, "retrying": 1, "sent": 2, "delivered": 3, "opened": 4, "failed": 2, "suppressed": 2}


class NotificationStatus(StrEnum):
    scheduled = "scheduled"  # not before due_at (campaign waves, --send-at); the reconciler queues it then
    paused = "paused"  # a paused campaign's scheduled notification
    canceled = "canceled"  # a canceled campaign's notification that was never queued
    queued = "queued"  # a job is (or should be) in a queue for it
    retrying = "retrying"  # some deliveries wait for their next attempt at due_at
    done = "done"  # every delivery is final
    suppressed = "suppressed"


# A notification still to go (scheduled, paused, queued or retrying): the rows the (status, due_at)
# index holds on PostgreSQL. done, suppressed and canceled are final.
OPEN_NOTIFICATION_STATUSES = (
    NotificationStatus.scheduled,
    NotificationStatus.paused,
    NotificationStatus.queued,
    NotificationStatus.retrying,
)
OPEN_WHERE = text(f"status IN ({', '.join(repr(str(s)) for s in OPEN_NOTIFICATION_STATUSES)})")
LOST_HIGH_WHERE = text("status = 'queued' AND priority = 'high'")
# A delivery still to go (queued, or retrying at next_attempt_at): the rows ``ix_deliveries_status``
# holds on PostgreSQL. Every other status is final (``FINAL_STATUSES``).
OPEN_DELIVERY_STATUSES = (DeliveryStatus.queued, DeliveryStatus.retrying)
OPEN_DELIVERY_WHERE = text(f"status IN ({', '.join(repr(str(s)) for s in OPEN_DELIVERY_STATUSES)})")


class User(SQLModel, table=True):
    __tablename__ = "users"
    id: str = Field(primary_key=True, max_length=255)
    email: str | None = Field(default=None, max_length=320)
    phone: str | None = Field(default=None, max_length=16)
    timezone: str = Field(default="UTC", max_length=64)
    locale: str = Field(default="en", max_length=16)
    sms_opt_in: bool = Field(default=False, description="explicit consent to marketing SMS")
    attributes: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class OptOut(SQLModel, table=True):
    """One opt-out: ``channel`` (push/email/sms or ``*``) × ``category`` (or ``*``)."""

    __tablename__ = "opt_outs"
    user_id: str = Field(primary_key=True, max_length=255)
    channel: str = Field(primary_key=True, max_length=16)
    category: str = Field(primary_key=True, max_length=32)
    reason: str = Field(default="user", max_length=64)
    created_at: datetime = Field(default_factory=utcnow)


class DeviceToken(SQLModel, table=True):
    """A push token. One row per token ever registered: a removed one keeps when and why
    (``removed_reason``: the provider's answer, ``stale: ...``, ``replaced``...).

    A device's token changes (reinstall, restore, rotation): a registration that names the token it
    replaces, or carries the app's ``device_id`` (one live token per device per user), retires the
    old token with the reason ``replaced`` and ``replaced_by`` pointing at the new one, which the
    worker follows for deliveries already fanned out to the old token."""

    __tablename__ = "device_tokens"
    token: str = Field(primary_key=True, max_length=512)
    user_id: str = Field(index=True, max_length=255)
    platform: str = Field(max_length=16)  # ios | android
    created_at: datetime = Field(default_factory=utcnow)
    last_success_at: datetime | None = None
    removed_at: datetime | None = Field(default=None, index=True)
    removed_reason: str | None = Field(default=None, max_length=255)
    # Added after the first release: nullable, so ``db.add_missing_columns`` can add them to an
    # existing table.
    device_id: str | None = Field(default=None, max_length=255)
    replaced_by: str | None = Field(default=None, max_length=512)


class Notification(SQLModel, table=True):
    __tablename__ = "notifications"
    __table_args__ = (
        # What is still to go, in due_at order (the reconciler's due, lost and paced passes, a
        # campaign's waiting rows). On PostgreSQL it holds the open rows only (``OPEN_WHERE``): the
        # worker's ``done`` UPDATE is never HOT (``status`` changes and is indexed), so each index
        # that takes the new row version costs a WAL record and a b-tree insert; this one no longer
        # does (done UPDATE: WAL records 6.1 → 5.1 a row). SQLite keeps the full index: its planner
        # uses a partial index only for a query repeating its WHERE, and rewrites only the indexes
        # of changed columns anyway. Built on an existing database by ``db.add_missing_columns``.
        Index(
            "ix_notifications_status_due",
            "status",
            "due_at",
            postgresql_where=OPEN_WHERE,
        ),
        # One notification per recipient per campaign: a relaunched campaign skips who it already has.
        # It also finds a user's notifications (the console's lookup by user: ``tracking.latest_of_user``):
        # outside campaigns by ``campaign_id IS NULL`` (a b-tree searches for NULL as for a value), the
        # campaigns' a probe a campaign. It so replaced a plain index on recipient_id
        # (``RETIRED_INDEXES``), which took an entry for every row written and again, on PostgreSQL,
        # for every status change (measured, 1,000-row launch COPYs and done UPDATEs of campaign rows
        # alternating with and without it, two runs at load 8-10: the server 17.7 → 15.2 and
        # 15.4 → 13.5 µs a row for the COPY, 21.3 → 18.0 and 18.6 → 15.9 for the UPDATE).
        Index("uq_notifications_campaign_recipient", "campaign_id", "recipient_id", unique=True),
        # The reconciler's every-round look for lost transactional work: high-priority rows still
        # queued, in due_at order. Without it that query read the (status, due_at) index's whole
        # queued backlog and filtered on priority (PostgreSQL: a seq scan of every notification,
        # 80 ms a round at 200,000 rows, growing with the table). Only the high rows while queued
        # are in it: a campaign's rows never touch it. Its readers repeat ``LOST_HIGH_WHERE``
        # literally (SQLite uses a partial index only for a WHERE that contains the index's); its
        # constant leading columns make it the better match than (status, due_at) for SQLite's
        # planner too, which keeps no statistics.
        Index(
            "ix_notifications_lost_high",
            "status",
            "priority",
            "due_at",
            sqlite_where=LOST_HIGH_WHERE,
            postgresql_where=LOST_HIGH_WHERE,
        ),
        # ``notifyctl status <dedup key>``: the keys given at intake only. A campaign's rows carry
        # ``campaign:<id>:<user>``, which the unique index above finds (``tracking.find_notification``):
        # kept out of this one, each row of a launch costs one index entry less when written and
        # again when its worker marks it done (PostgreSQL writes every index of a changed row anew).
        Index(
            "ix_notifications_dedup_direct",
            "dedup_key",
            sqlite_where=text("campaign_id IS NULL AND dedup_key IS NOT NULL"),
            postgresql_where=text("campaign_id IS NULL AND dedup_key IS NOT NULL"),
        ),
    )
    id: str = Field(primary_key=True, max_length=32)
    recipient_id: str = Field(max_length=255)  # no index of its own: see uq_notifications_campaign_recipient
    type: str = Field(max_length=128)
    template_id: str = Field(max_length=128)
    category: str = Field(max_length=32)
    priority: str = Field(max_length=8)
    channels: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    dedup_key: str | None = Field(default=None, max_length=255)  # indexed by ix_notifications_dedup_direct
    # no index of its own: uq_notifications_campaign_recipient starts with it (a second one cost every
    # insert, and every status change on PostgreSQL, one more index entry: ~1.5 µs a row each)
    campaign_id: str | None = Field(default=None, max_length=64)
    # A campaign notification's time-zone wave: its index in ``Campaign.plan``, written at launch
    # (``campaigns.produce``); the wave counts (``analytics.waves``) are kept per wave by it. None
    # outside campaigns (and for campaigns launched before waves were counted).
    wave: int | None = None
    status: str = Field(default=NotificationStatus.queued, max_length=16)
    reason: str | None = Field(default=None, max_length=255)
    job_id: str | None = Field(default=None, max_length=64)
    due_at: datetime = Field(default_factory=utcnow)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class DedupKey(SQLModel, table=True):
    """A dedup key held by the notification that took it, until ``expires_at`` (``NOTIFY_DEDUP_TTL``
    after). The primary key makes the database itself refuse a second holder, whatever races at
    intake (``notifyctl.intake``); an expired key is taken over by the next request that names it,
    and ``notifyctl purge`` deletes the expired ones."""

    __tablename__ = "dedup_keys"
    key: str = Field(primary_key=True, max_length=255)
    notification_id: str = Field(max_length=32)
    expires_at: datetime = Field(index=True)


class Delivery(SQLModel, table=True):
    """One notification × channel × address (device token, email address, phone number)."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("notification_id", "channel", "address", name="uq_delivery"),
        # The deliveries still to go (the reconciler's orphans pass). On PostgreSQL the open ones
        # only (``OPEN_DELIVERY_WHERE``): a delivery the worker inserts already ``sent`` (every
        # email of a batch) and each webhook's ``delivered``/``opened`` then add no entry to it.
        # SQLite keeps the full index (as ``ix_notifications_status_due``).
        Index("ix_deliveries_status", "status", postgresql_where=OPEN_DELIVERY_WHERE),
    )
    id: str = Field(primary_key=True, max_length=32)  # derived_id: sorts with its notification's
    # no index of its own: uq_delivery starts with it, and a second one cost ~0.8 µs a row
    notification_id: str = Field(max_length=32)
    user_id: str = Field(max_length=255)
    channel: str = Field(max_length=16)
    route: str = Field(max_length=16)  # push.ios, push.android, email, sms
    address: str = Field(max_length=512)
    status: str = Field(default=DeliveryStatus.queued, max_length=16)  # indexed by ix_deliveries_status
    reason: str | None = Field(default=None, max_length=512)
    provider: str | None = Field(default=None, max_length=32)
    provider_message_id: str | None = Field(default=None, index=True, max_length=255)
    attempts: int = 0
    next_attempt_at: datetime | None = None
    dead_lettered: bool = False  # indexed by ix_deliveries_dlq below (partial: only the true ones)
    queued_at: datetime = Field(default_factory=utcnow)
    sent_at: datetime | None = None
    delivered_at: datetime | None = None
    opened_at: datetime | None = None
    failed_at: datetime | None = None
    suppressed_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class sqlite_unindexed(FunctionElement[str]):
    """The column itself, written ``column || ''`` on SQLite: the same value, in a term no index
    lookup can use (see ``bulk.unindexed``), where SQLite's planner, without statistics, would pick a
    column's index over a better one. PostgreSQL plans from statistics: the plain column."""

    type = String()
    name = "sqlite_unindexed"
    inherit_cache = True


@compiles(sqlite_unindexed)
def _plain_column(element: sqlite_unindexed, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(list(element.clauses)[0], **kw))


@compiles(sqlite_unindexed, "sqlite")
def _sqlite_unindexed(element: sqlite_unindexed, compiler: Any, **kw: Any) -> str:
    return f"({compiler.process(list(element.clauses)[0], **kw)} || '')"


# The dead-letter queue's own index: partial, so it holds only the dead-lettered rows (a sliver of
# the table; inserts and status changes of the other rows never touch it). ``dlq list`` and the
# console read the latest entries backwards along (failed_at, id); the depth, the counts by
# channel or provider and ``dlq.stats`` come from the index alone. It replaced a plain index on
# dead_lettered (dropped by ``db.add_missing_columns``, with ``RETIRED_INDEXES``), which SQLite's
# planner preferred, to then sort every entry. A DLQ query carries ``DLQ_WHERE`` as is: on SQLite
# its status term is kept away from the status index (which the planner would otherwise pick);
# on PostgreSQL the index's WHERE holds both terms, so the planner counts the index's rows.
_FAILED: ColumnElement[str] = literal_column("'failed'")
_DEAD: ColumnElement[bool] = Delivery.dead_lettered.is_(True)  # type: ignore[attr-defined]
DLQ_WHERE = and_(_DEAD, sqlite_unindexed(Delivery.status) == _FAILED)
Index(
    "ix_deliveries_dlq",
    "failed_at",
    "id",
    "channel",
    "provider",
    "status",
    _table=Delivery.__table__,  # type: ignore[attr-defined]
    sqlite_where=_DEAD,
    postgresql_where=and_(_DEAD, literal_column("status") == _FAILED),
)
RETIRED_INDEXES = (
    "ix_deliveries_dead_lettered",
    "ix_notifications_campaign_id",
    "ix_notifications_dedup_key",
    "ix_notifications_recipient_id",
)
# PostgreSQL: room left by inserts on each page of a notification's heap row and of its two unique
# index entries, for the next version of the row. A notification is written twice (the launcher's
# COPY or intake's insert, then the worker's ``done``) and that UPDATE is never HOT (``status``
# changes and is indexed): the new version goes into the heap and into each index whose entry
# does not drop out (the primary key, ``uq_notifications_campaign_recipient``). Filled to the
# defaults (heap 100 %, b-tree leaves 90 % as keys ascend), every page was full: each new version
# went to another heap page, and each index entry into a full leaf, which first tried a bottom-up
# deletion (vain: the old versions are not dead yet), then deduplicated or split. Measured with
# ``python -m bench.pg_rows`` (30 launcher chunks and worker batches of 1,000; the backend's CPU;
# six runs each, alternating with the defaults, load 8.5-11): done UPDATE 11.7-12.5 → 9.1-9.6 µs a
# row, COPY 7.3-7.6 → 7.7-8.1, the worker's load of the batch between them the same (3.2, 3 runs); the two
# writes 19.0-19.9 → 16.9-17.7; WAL 1,230 → 960 bytes a row. Heap 100 % or 70 % with these indexes
# at 50 %, or the heap at 50 % with them at 70 %, gave less. The price: the table takes ~40 % more
# space (vacuumed after two launches: 683 against 492 bytes a row; the indexes the same). Set by
# ``db.add_missing_columns`` on a relation that has no fillfactor of its own yet (an operator's
# setting stays).
PG_FILLFACTOR = {
    "notifications": 50,
    "notifications_pkey": 50,
    "uq_notifications_campaign_recipient": 50,
}


class DeliveryEvent(SQLModel, table=True):
    """The timeline: one row per transition of a delivery (the seed's ``notification_events``), but
    for the ``queued`` of a delivery its first batch sends or sets to retry, which that outcome
    implies (``notifyctl.tracking.implied_events``: every reader shows it)."""

    __tablename__ = "delivery_events"
    id: int | None = Field(default=None, primary_key=True)
    notification_id: str = Field(index=True, max_length=32)
    # Not indexed: an index on it cost as much as the rest of the row's insert (an event or two per
    # delivery). A delivery's events are found through its notification's (a handful of rows),
    # ``notification_id = ? AND delivery_id = ?``.
    delivery_id: str | None = Field(default=None, max_length=32)
    status: str = Field(max_length=16)
    detail: str | None = Field(default=None, max_length=1024)
    at: datetime = Field(default_factory=utcnow)


class SmsKeyword(SQLModel, table=True):
    """An inbound SMS keyword (STOP, START, HELP...) already acted on, by Twilio ``MessageSid``: a
    replayed or retried message changes nothing (``notifyctl.inbound.apply_sms_keyword``). Twilio's
    signature carries no time, so a captured request can be replayed years later: the record is kept
    for each number's last ``inbound.KEYWORDS_KEPT`` keywords rather than for a while."""

    __tablename__ = "sms_keywords"
    sid: str = Field(primary_key=True, max_length=64)
    phone: str = Field(index=True, max_length=32)
    action: str = Field(max_length=8)  # stop | start | help
    received_at: datetime = Field(default_factory=utcnow)


class SharedSecret(SQLModel, table=True):
    """A secret every host sharing the database must agree on, created once by the first host
    (``notifyctl.unsubscribe.secret_key``: the key that signs unsubscribe links and open pixels).
    ``value`` is empty when the hosts bring it themselves (``NOTIFY_SECRET_KEY``); ``fingerprint``
    lets a host whose key differs find out at start, without the key being compared in clear."""

    __tablename__ = "shared_secrets"
    name: str = Field(primary_key=True, max_length=32)
    value: str | None = Field(default=None, max_length=256)
    fingerprint: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow)


class SharedTemplate(SQLModel, table=True):
    """A template shared by every host through the database (``notifyctl templates push``): the
    TOML file as pushed (``source``, what ``templates pull`` writes back), its channel parts,
    ``version`` (1, then one more on every push that changes it; what each host's cache is
    invalidated by) and ``hash`` (SHA-256 of ``source``: an unchanged push is a no-op)."""

    __tablename__ = "templates"
    name: str = Field(primary_key=True, max_length=128)
    source: str = Field(sa_column=Column(Text, nullable=False))
    parts: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    version: int = 1
    hash: str = Field(max_length=64)
    pushed_by: str = Field(default="", max_length=255)  # the host that pushed it last
    updated_at: datetime = Field(default_factory=utcnow)


class HostStore(SQLModel, table=True):
    """Which Redis each host sharing the database runs on, written at its start
    (``notifyctl.stores``): a host on its embedded Redis among hosts sharing another is warned. The
    row whose ``host`` is empty is the database's own: its ``redis_id`` is the database's identity."""

    __tablename__ = "host_stores"
    host: str = Field(primary_key=True, max_length=255)  # "<host name> <home>"
    name: str = Field(max_length=255)
    redis_id: str = Field(max_length=64)  # the Redis's own identity (``keys.STORE_ID``)
    redis_embedded: bool = False
    seen_at: datetime = Field(default_factory=utcnow)


class OrderedNotification(SQLModel, table=True):
    """A notification sent in order with the others of its group: one recipient, one priority, one
    ``ordering_key`` (``notifyctl.ordering``). ``seq`` is the order it was accepted in; a worker
    sends it only once every notification of the group with a lower ``seq`` is final."""

    __tablename__ = "ordered_notifications"
    __table_args__ = (Index("ix_ordered_group_seq", "group_key", "seq"),)
    notification_id: str = Field(primary_key=True, max_length=32)
    group_key: str = Field(max_length=64)  # a hash of recipient, priority and ordering key
    seq: int


class _RollupCount(SQLModel):
    """What every analytics rollup row ends with: a status, the kind of reason, how many. A
    base's fields come first in a table's columns, so each table below names its primary key's
    column order (the order its reads' key ranges need) in ``__table_args__``."""

    status: str = Field(primary_key=True, max_length=16)
    reason: str = Field(primary_key=True, max_length=64)  # "" unless failed or suppressed
    n: int = 0


class _ByDelivery(_RollupCount):
    """A row of the rollup per template × channel × campaign (``notifyctl.analytics``)."""

    template_id: str = Field(primary_key=True, max_length=128)
    channel: str = Field(primary_key=True, max_length=16)
    campaign_id: str = Field(primary_key=True, max_length=64)  # "" when none


class _ByDimension(_RollupCount):
    """A coarse tier's row per one dimension: ``dim`` is ``template``, ``channel`` or ``campaign``
    and ``value`` its value (the daily tier also has ``dim = value = ""``: all deliveries)."""

    dim: str = Field(primary_key=True, max_length=16)
    value: str = Field(primary_key=True, max_length=128)


class AnalyticsHourly(_ByDelivery, table=True):
    """The delivery rollup (``notifyctl.analytics``): how many deliveries queued in ``hour`` (UTC,
    ``YYYY-MM-DD HH``) of a template × channel × campaign are now in ``status`` (with the kind of
    their ``reason`` when failed or suppressed). Kept up by triggers on ``deliveries``, in the
    same transaction as every status change: a transition moves one count to another row."""

    __tablename__ = "analytics_hourly"
    __table_args__ = (
        PrimaryKeyConstraint("hour", "template_id", "channel", "campaign_id", "status", "reason"),
        # The rows whose count changed since they were last folded into the coarse tiers
        # (``analytics.fold``): a handful, whatever the table's size.
        Index(
            "ix_analytics_hourly_unfolded",
            "hour",
            sqlite_where=literal_column("n <> folded"),
            postgresql_where=literal_column("n <> folded"),
        ),
    )
    hour: str = Field(primary_key=True, max_length=13)
    # How much of ``n`` the coarse tiers already count (nullable only so that an existing database
    # gains the column; ``analytics.triggers.install`` rebuilds the rollup with it set).
    folded: int | None = 0


class AnalyticsTotal(_ByDelivery, table=True):
    """The coarse tier without time (``notifyctl.analytics``): ``analytics_hourly`` summed over
    every hour, as far as it is folded. The funnel without ``--since`` reads it. On SQLite a
    ``WITHOUT ROWID`` table, as ``analytics_daily``: its rows are its primary key's B-tree, so a
    read of a range of keys reads their counts with them (measured: 2.5× less CPU over 160,000
    rows than a rowid table's index scan and a row lookup each)."""

    __tablename__ = "analytics_total"
    __table_args__ = (
        PrimaryKeyConstraint("template_id", "channel", "campaign_id", "status", "reason"),
        {"sqlite_with_rowid": False},
    )


class AnalyticsDaily(_ByDimension, table=True):
    """The coarse daily tier (``notifyctl.analytics``): per day (UTC, ``YYYY-MM-DD``, the day the
    deliveries were queued), per one dimension (or all deliveries), the counts by status (and
    kind of reason), as far as ``analytics_hourly`` is folded."""

    __tablename__ = "analytics_daily"
    __table_args__ = (
        PrimaryKeyConstraint("dim", "day", "value", "status", "reason"),
        Index("ix_analytics_daily_value", "dim", "value", "day"),
        {"sqlite_with_rowid": False},
    )
    day: str = Field(primary_key=True, max_length=10)


class AnalyticsWeekly(_ByDimension, table=True):
    """The coarse weekly tier (``notifyctl.analytics``): ``analytics_daily`` summed per ISO week
    (``week`` is its Monday, ``YYYY-MM-DD``) for the template, channel and campaign dimensions, as
    far as ``analytics_hourly`` is folded. ``--since`` reads by template / channel / campaign take
    the whole weeks from here and only the days at the window's edge from the daily tier."""

    __tablename__ = "analytics_weekly"
    __table_args__ = (
        PrimaryKeyConstraint("dim", "week", "value", "status", "reason"),
        {"sqlite_with_rowid": False},
    )
    week: str = Field(primary_key=True, max_length=10)


class AnalyticsDelta(SQLModel, table=True):
    """PostgreSQL: what each statement on ``deliveries`` changed in the rollup, appended (no row
    lock shared between concurrent workers), folded into ``analytics_hourly`` by
    ``analytics.fold.compact``. Read together with it. Unused on SQLite (one writer at a time: its
    triggers update the rollup directly)."""

    __tablename__ = "analytics_delta"
    id: int | None = Field(default=None, primary_key=True)
    hour: str = Field(max_length=13)
    template_id: str = Field(max_length=128)
    channel: str = Field(max_length=16)
    campaign_id: str = Field(max_length=64)
    status: str = Field(max_length=16)
    reason: str = Field(max_length=64)
    n: int = 0


class WaveCount(SQLModel, table=True):
    """Per campaign wave (``Notification.wave``): how many of its deliveries on ``channel`` are now
    in ``status`` (with the kind of their ``reason`` when failed or suppressed), the campaigns
    page's per-wave progress (``notifyctl.analytics.waves``). Kept up by triggers on
    ``deliveries`` in the same transaction as every write, as ``analytics_hourly``; on PostgreSQL
    through ``wave_delta``. A few rows a wave, whatever the number of deliveries."""

    __tablename__ = "wave_counts"
    __table_args__ = {"sqlite_with_rowid": False}
    campaign_id: str = Field(primary_key=True, max_length=64)
    wave: int = Field(primary_key=True)
    channel: str = Field(primary_key=True, max_length=16)
    status: str = Field(primary_key=True, max_length=16)
    reason: str = Field(primary_key=True, max_length=64)
    n: int = 0


class WaveDelta(SQLModel, table=True):
    """PostgreSQL: what each statement on ``deliveries`` changed in ``wave_counts``, appended (as
    ``analytics_delta``: concurrent workers share no row lock), folded by ``analytics.fold.compact``
    and read together with it. Unused on SQLite."""

    __tablename__ = "wave_delta"
    __table_args__ = (Index("ix_wave_delta_campaign", "campaign_id"),)
    id: int | None = Field(default=None, primary_key=True)
    campaign_id: str = Field(max_length=64)
    wave: int
    channel: str = Field(max_length=16)
    status: str = Field(max_length=16)
    reason: str = Field(max_length=64)
    n: int = 0


# --- campaigns -------------------------------------------------------------------------------
# The campaign table. Recipients are ``Notification`` rows with ``campaign_id`` set (one per
# recipient, by the unique index on (campaign_id, recipient_id)); this row holds what is needed to
# display, control and relaunch the campaign (``campaigns``).


class CampaignStatus(StrEnum):
    active = "active"  # producing (launched_at unset) or sending on schedule
    paused = "paused"
    canceled = "canceled"


class Campaign(SQLModel, table=True):
    __tablename__ = "campaigns"
    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(index=True, max_length=255)
    template_id: str = Field(max_length=128)
    category: str = Field(max_length=32)
    priority: str = Field(max_length=8)
    channels: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    status: str = Field(default=CampaignStatus.active, max_length=16)
    # Everything a relaunch needs: segment source, schedule flags, template data, rate.
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # The waves: [{"instant", "start", "end", "recipients", "timezones"}], computed once at launch.
    plan: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # The last launch run's counts (rows read, written, skipped, bad rows with line numbers).
    summary: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    reference_at: datetime = Field(default_factory=utcnow)  # the "now" the schedule was computed from
    launched_at: datetime | None = None  # every recipient written
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


# --- API keys --------------------------------------------------------------------------------
# Hashed at rest. A key is ``nk_`` + 43 URL-safe characters (256 random bits), shown once at
# creation. Only its SHA-256 is stored (a fast hash is enough for a high-entropy secret: there is
# nothing to guess), plus a short prefix so an operator can tell keys apart in
# ``notifyctl apikeys list`` (``notifyctl.api.auth``).


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"
    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(max_length=128)
    key_hash: str = Field(unique=True, index=True, max_length=64)  # hex sha256
    prefix: str = Field(max_length=16)  # first characters of the key, for display only
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None
    # Added with scopes: nullable so ``db.add_missing_columns`` adds it; a key made before (NULL) is admin.
    scope: str | None = Field(default=None, max_length=16)
