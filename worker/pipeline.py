"""The worker's pipeline for a batch of notifications: enrich → fan out → rate limit → claim →
send → record. Every stage works on the whole batch: a fixed number of SQL statements and
Redis round trips per batch, whatever its size.

``process`` is idempotent: it can run again on the same notifications (a retry, a job
recovered from a dead worker, a duplicate job) and sends nothing twice — deliveries already
``sent`` are skipped, and the Redis send record (``worker.claims``) is checked before sending.
"""

from __future__ import annotations

import html
import logging
import math
import os
import random
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any

import markupsafe
import orjson
import redis
from sqlalchemy import bindparam, insert, literal, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from notifyctl import metrics, ordering, prefs
from notifyctl.context import Context
from notifyctl.db import prepare_insert, rows_where_in, unindexed_in, update_where_in, write_lock
from notifyctl.errors import TemplateError
from notifyctl.inbound import pixel_url
from notifyctl.intake import user_vars
from notifyctl.liveness import Liveness, unique_worker_name
from notifyctl.models import (
    FINAL_STATUSES,
    Delivery,
    DeliveryEvent,
    DeliveryStatus,
    DeviceToken,
    Notification,
    NotificationStatus,
    OptOut,
    derived_id,
    utcnow,
)
from notifyctl.pacing import Pacer
from notifyctl.policy import refusal
from notifyctl.secretdata import ERASED_KEY, SECRET_ERASED, erase, erased_fields, erased_reason
from notifyctl.templates import Template
from notifyctl.unsubscribe import secret_key, unsubscribe_url
from worker.circuit import OPEN, THROTTLED, Circuits
from worker.claims import DOUBT, OK, Claims, Fenced
from worker.providers import (
    Held,
    InvalidAddress,
    Message,
    Misconfigured,
    Outcome,
    Permanent,
    Provider,
    Retry,
    Sent,
    load_provider,
)
from worker.ratelimit import Check, RateLimiter

log = logging.getLogger("notifyctl.worker")


class Runtime:
    """Per-process worker state: connections, limiter, claims and provider instances."""

    def __init__(self, ctx: Context, worker_name: str | None = None, liveness: Liveness | None = None) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.worker_name = worker_name or unique_worker_name(f"{socket.gethostname()}-{os.getpid()}")
        self.limiter = RateLimiter(ctx.redis, self.settings.rules, self.settings.rate_limit_bypass_high)
        self.claims = Claims(ctx.redis, self.worker_name, self.settings.claim_ttl, self.settings.sent_marker_ttl)
        self.liveness = liveness or Liveness(
            ctx.redis, self.worker_name, self.settings.worker_alive_ttl, host=self.settings.host_name
        )
        self.circuits = Circuits(ctx.redis, self.settings.circuit_threshold, self.settings.circuit_cooldown)
        self.pacer = Pacer(ctx.redis)
        self._providers: dict[str, Provider] = {}
        self._route_pool: ThreadPoolExecutor | None = None
        self._unsub_key: bytes | None = None
        self.metrics = metrics.Recorder()

    @property
    def unsub_key(self) -> bytes:
        if self._unsub_key is None:
            self._unsub_key = secret_key(self.settings)
        return self._unsub_key

    def route_pool(self) -> ThreadPoolExecutor:
        """Threads that send a batch's other routes while this thread sends its first
        (``_send_routes``); made on first use, in the process that sends."""
        if self._route_pool is None:
            self._route_pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="route")
        return self._route_pool

    def provider(self, name: str) -> Provider:
        p = self._providers.get(name)
        if p is None:
            p = self._providers[name] = load_provider(name, self.settings, redis=self.ctx.redis)
        return p

    def warm(self) -> list[str]:
        """Load every configured provider now (imports, SDK clients, their lazy parts: ``warm()``),
        and open the SQL connection: a worker's first job, an OTP say, must not pay for them (the
        Twilio SDK's imports alone took 0.3-4 s; each worker paid them on its first SMS). Nothing is
        sent. A provider that cannot load is left for the send path to report; returns their names."""
        s = self.settings
        names = [n for route in ("push.ios", "push.android", "email", "sms") for n in s.providers_for(route)]
        failed: list[str] = []
        for name in dict.fromkeys([*names, *s.providers_voice]):
            try:
                p = self.provider(name)
                warm = getattr(p, "warm", None)
                if warm is not None:
                    warm()
            except Exception:  # noqa: BLE001 - reported when a send needs it
                failed.append(name)
        with self.ctx.engine.connect():
            pass
        return failed

    def close(self) -> None:
        if self._route_pool is not None:
            self._route_pool.shutdown(wait=True)
            self._route_pool = None
        self.claims.close()
        for p in self._providers.values():
            try:
                p.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.exception("closing provider %s", p.name)
        self._providers.clear()


@dataclass
class Stats:
    notifications: int = 0
    created: int = 0
    sent: int = 0
    retrying: int = 0
    failed: int = 0
    suppressed: int = 0
    skipped: int = 0
    in_doubt: int = 0  # taken over from a holder that had begun sending them: sent again
    fenced: int = 0  # not sent: the lease was no longer this worker's at the provider call
    by_reason: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "by_reason"}
        d["by_reason"] = dict(self.by_reason)
        return d


_PUSH_ROUTES = {"ios": "push.ios", "android": "push.android"}


def _route_addresses(channel: str, user: Any, tokens: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if channel == "push":
        return [(_PUSH_ROUTES.get(platform) or f"push.{platform}", token) for platform, token in tokens]
    if channel == "email":
        return [("email", user.email)] if user.email else []
    if channel == "sms":
        return [("sms", user.phone)] if user.phone else []
    return []


def retry_delay(settings: Any, attempts: int, retry_after: float | None) -> float | None:
    """Seconds until the next attempt after ``attempts`` tries, or None when retries are exhausted.

    The schedule (default 30 s, 5 min, 30 min) is a floor; a provider's Retry-After can only lengthen it.
    """
    if attempts >= settings.max_attempts:
        return None
    base = float(settings.retry_delays[attempts - 1])
    return max(base, float(retry_after or 0))


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
# thousand plain tuples. The JSON columns come as text and are parsed once per distinct text: a
# campaign batch shares one `data` and one `channels`.
_N_SELECT = (
    "SELECT id, recipient_id, type, template_id, category, priority, dedup_key, CAST(channels AS TEXT), "
    "CAST(data AS TEXT), (SELECT 1 FROM ordered_notifications o WHERE o.notification_id = notifications.id) "
    "FROM notifications"
)
# by primary key, never through the status index (see notifyctl.db.unindexed)
_N_LOADABLE = "AND " + unindexed_in("status", [NotificationStatus.queued, NotificationStatus.retrying])
_U_SELECT = "SELECT id, email, phone, timezone, locale, sms_opt_in, CAST(attributes AS TEXT) FROM users"
# a batch's live device tokens (not through the removed_at index: every live token), oldest first
# per user (a user's rows are in one chunk of ``rows_where_in``)
_T_SELECT = "SELECT device_tokens.user_id, device_tokens.platform, device_tokens.token FROM device_tokens"
_T_LIVE = "AND device_tokens.removed_at || '' IS NULL ORDER BY device_tokens.created_at"


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


class _Batch:
    """The rows a batch touches, loaded with one query per table (plain rows, not ORM objects)."""

    def __init__(self, session: Session, client: Any, ids: list[str]) -> None:
        parsed: dict[str, Any] = {}

        def load(text: str | None) -> Any:
            value = parsed.get(text)  # type: ignore[arg-type]
            if value is None:
                value = parsed[text] = orjson.loads(text) if text is not None else None  # type: ignore[index]
            return value

        conn = session.connection()
        self.notifications: list[_Note] = [
            _Note(*row[:7], load(row[7]) or [], load(row[8]) or {}, row[8] or "", row[9] is not None)
            for row in rows_where_in(conn, _N_SELECT, "id", ids, _N_LOADABLE)
        ]
        user_ids = {n.recipient_id for n in self.notifications}
        self.users: dict[str, _User] = {
            row[0]: _User(*row[:5], bool(row[5]), orjson.loads(row[6]) if row[6] else {})
            for row in rows_where_in(conn, _U_SELECT, "id", list(user_ids))
        }
        self.opt_outs = prefs.load(client, session, user_ids)
        # a user's live device tokens, oldest first, as (platform, token): push only
        self.tokens: dict[str, list[tuple[str, str]]] = defaultdict(list)
        if user_ids and any("push" in n.channels for n in self.notifications):
            for uid, platform, token in rows_where_in(
                conn, _T_SELECT, "device_tokens.user_id", list(user_ids), _T_LIVE
            ):
                self.tokens[uid].append((platform, token))
        self.deliveries: dict[str, list[_D]] = defaultdict(list)
        nids = [n.id for n in self.notifications]
        if nids:  # (none, for a batch seen the first time)
            at = _d_time(conn.dialect)
            for row in rows_where_in(conn, _D_SELECT, "notification_id", nids):
                d = _D(*row)
                d.dead_lettered = bool(d.dead_lettered)
                if at is not None and d.next_attempt_at is not None:
                    d.next_attempt_at = at(d.next_attempt_at)
                self.deliveries[d.notification_id].append(d)


def process(rt: Runtime, notification_ids: Iterable[str], as_of: float | None = None) -> Stats:
    """Process a batch; ``as_of`` (epoch s) is the time up to which scheduled retries are due."""
    ids = list(dict.fromkeys(notification_ids))
    stats = Stats()
    rt.liveness.beat()
    try:
        for attempt in range(3):
            try:
                return _process(rt, ids, as_of, stats)
            except IntegrityError:
                # Another worker fanned out the same fresh notification at the same moment: reload and go on.
                if attempt == 2:
                    raise
                stats = Stats()
    finally:
        rt.claims.drop()  # whatever happened, this batch's leases are no longer renewed
    return stats


def _process(rt: Runtime, ids: list[str], as_of: float | None, stats: Stats) -> Stats:
    settings = rt.settings
    rt.metrics = metrics.Recorder()
    now = utcnow()
    due_by = datetime.fromtimestamp(as_of, UTC) if as_of is not None else now
    templates: dict[str, Template | TemplateError] = {}
    rendered: dict[tuple[str, str], dict[str, str] | str] = {}  # (notification id, channel) → content or error

    def template_for(tid: str) -> Template | TemplateError:
        t = templates.get(tid)
        if t is None:
            try:
                t = rt.ctx.templates.get(tid)
            except TemplateError as exc:
                t = exc
            templates[tid] = t
        return t

    def secret_of(tid: str) -> frozenset[str]:
        t = template_for(tid)
        return frozenset() if isinstance(t, TemplateError) else t.secret

    by_data: dict[tuple[str, str, str], dict[str, str] | str] = {}  # renders that do not read `user`
    # (notification id, channel) → (the batch's rendering with tokens, this recipient's token values)
    probed: dict[tuple[str, str], tuple[dict[str, str], dict[str, str]]] = {}

    def render(n: Any, channel: str, user: Any) -> dict[str, str] | str:
        key = (n.id, channel)
        out = rendered.get(key)
        if out is None:
            t = template_for(n.template_id)
            if isinstance(t, TemplateError):
                out = f"template_error: {t}"
            elif t.secret and ERASED_KEY in n.data:  # a DLQ replay after the code was erased
                out = erased_reason(t.id, erased_fields(n.data))
            else:
                # A channel that never reads `user` gives the same result for the same data: a
                # campaign batch (one data for all) renders it once.
                names = t.variables(channel)
                shared = None
                if names is not None and "user" not in names:
                    shared = (n.template_id, channel, n.data_key)
                    out = by_data.get(shared)
                elif user is not None and shared_data[n.data_key] > 1:
                    # A channel that only prints the recipient's variables ({{ user.first_name }}):
                    # the batch's rendering with tokens, with this recipient's values put in (for
                    # data shared by several notifications of the batch: else one render is cheaper).
                    html = "html" in t.parts.get(channel, ())  # (an HTML part: email)
                    values = _token_values(t.direct_user_fields(channel), user_vars(user), html)
                    parts = probe(n, channel, t) if values is not None else None
                    if parts is not None:
                        out = parts  # with tokens: the recipient's copy is made when sending
                        if html or any(tokens for _p, _v, tokens in fill_plan((parts, values))):  # type: ignore[arg-type]
                            probed[key] = (parts, values)  # type: ignore[assignment]
                        # else (push, SMS) no user value is printed for this data (a campaign's
                        # `first_name | default(user.first_name)`): every recipient gets the batch's
                        # rendering as it is, no copy of their own
                if out is None:
                    try:
                        out = t.render(channel, {**n.data, "user": user_vars(user)})
                    except TemplateError as exc:
                        out = f"template_error: {exc}"
                    if shared is not None:
                        by_data[shared] = out
            rendered[key] = out
        return out

    probes: dict[tuple[str, str, str], dict[str, str] | None] = {}
    shared_data: Counter[str] = Counter()  # notifications of the batch per data (filled once loaded)

    def probe(n: Any, channel: str, t: Template) -> dict[str, str] | None:
        """The channel rendered with tokens for the recipient's variables (``_UserProbe``), once
        per template and data: what a provider with substitutions sends to a whole batch."""
        key = (n.template_id, channel, n.data_key)
        if key not in probes:
            if TOKEN_PREFIX in n.data_key or any(TOKEN_PREFIX in src for src in t.parts[channel].values()):
                probes[key] = None  # text that looks like a token: no substitutions for this one
                return None
            try:
                parts = t.render(channel, {**n.data, "user": _UserProbe("t")})
                if "html" in parts:
                    parts["html"] = t.render(channel, {**n.data, "user": _UserProbe("h")})["html"]
                probes[key] = parts
            except TemplateError:
                probes[key] = None
        return probes[key]

    fills: dict[int, list[tuple[str, str, tuple[str, ...]]]] = {}

    def fill_plan(pv: tuple[dict[str, str], dict[str, str]]) -> list[tuple[str, str, tuple[str, ...]]]:
        """Per part of a rendering with tokens: (part, text, the tokens it holds), once per rendering
        (``pv[0]`` lives as long as the batch)."""
        plan = fills.get(id(pv[0]))
        if plan is None:
            plan = fills[id(pv[0])] = [(part, v, tuple(t for t in pv[1] if t in v)) for part, v in pv[0].items()]
        return plan

    plans: dict[tuple[int, bool], _EmailPlan] = {}
    footers: dict[bool, tuple[bool, bool, dict[str, str]]] = {}

    def email_plan(content: dict[str, str], values: dict[str, str] | None, marketing: bool) -> _EmailPlan:
        """One plan per distinct body in the batch (``content`` objects live as long as the batch);
        ``values``: a recipient's token values, when ``content`` is a rendering with tokens."""
        key = (id(content), marketing)
        plan = plans.get(key)
        if plan is None:
            footer = footers.get(marketing)
            if footer is None:
                footer = footers[marketing] = _EmailPlan.footer(settings, marketing)
            plan = plans[key] = _EmailPlan(settings, content, tuple(values or ()), marketing, footer)
        return plan

    with Session(rt.ctx.engine, expire_on_commit=False) as session:
        batch = _Batch(session, rt.ctx.redis, ids)
        ordered = [n.id for n in batch.notifications if n.ordered]  # with an ordering_key
        held = ordering.hold_back(session, ordered, now) if ordered else set()
        if held:  # an earlier one of their group is not final yet: back to the reconciler, untouched
            batch.notifications = [n for n in batch.notifications if n.id not in held]
        stats.notifications = len(batch.notifications)
        if not batch.notifications:
            return stats
        shared_data.update(n.data_key for n in batch.notifications)
        new_rows: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []

        def add_delivery(
            n: Any, channel: str, route: str, address: str, status: str, reason: str | None = None
        ) -> None:
            row = {
                "id": delivery_id(n.id, channel, address),
                "notification_id": n.id,
                "user_id": n.recipient_id,
                "channel": channel,
                "route": route,
                "address": address,
                "status": status,
                "reason": reason,
                "attempts": 0,
                "dead_lettered": False,
                "queued_at": now,
                "updated_at": now,
                # every row carries every column an outcome may set: one executemany needs one shape
                "provider": None,
                "provider_message_id": None,
                "next_attempt_at": None,
                "sent_at": None,
                "suppressed_at": now if status == DeliveryStatus.suppressed else None,
                "failed_at": now if status == DeliveryStatus.failed else None,
            }
            new_rows.append(row)
            events.append(
                {"notification_id": n.id, "delivery_id": row["id"], "status": status, "detail": reason, "at": now}
            )
            if status == DeliveryStatus.suppressed:
                stats.suppressed += 1
                stats.by_reason[(reason or "").split(":")[0]] += 1
            elif status == DeliveryStatus.failed:
                stats.failed += 1
            if status != DeliveryStatus.queued and log.isEnabledFor(logging.INFO):  # an outcome already
                log.info(
                    "delivery %s: %s",
                    status,
                    reason,
                    extra={"notification_id": n.id, "delivery_id": row["id"], "provider": None, "route": route},
                )

        # 1. Fan out notifications seen for the first time: opt-outs, addresses, rate limits.
        checks: list[Check] = []
        pending: list[tuple[_Note, str, list[tuple[str, str]]]] = []
        for n in batch.notifications:
            if batch.deliveries.get(n.id):
                continue
            user = batch.users.get(n.recipient_id)
            if user is None:
                for channel in n.channels:
                    add_delivery(n, channel, channel, "-", DeliveryStatus.suppressed, "unknown_user")
                continue
            opt_outs = batch.opt_outs.get(user.id)  # (most users have none)
            for channel in n.channels:
                addrs = _route_addresses(channel, user, batch.tokens.get(user.id, []))
                first = addrs[0][1] if addrs else "-"
                route0 = addrs[0][0] if addrs else channel
                no = refusal(channel, n.category, opt_outs, bool(addrs), user.sms_opt_in)
                if no is not None:
                    add_delivery(n, channel, route0, first, DeliveryStatus.suppressed, no.reason)
                else:
                    content = render(n, channel, user)
                    if isinstance(content, str):
                        for route, addr in addrs:
                            add_delivery(n, channel, route, addr, DeliveryStatus.failed, content)
                        continue
                    checks.append(Check(user.id, channel, n.category, f"{n.id}:{channel}", n.priority == "high"))
                    pending.append((n, channel, addrs))
        if checks:
            admitted = rt.limiter.check_many(checks, int(time.time() * 1000))
            for (n, channel, addrs), ok in zip(pending, admitted, strict=True):
                for route, addr in addrs if ok else addrs[:1]:
                    if ok:
                        add_delivery(n, channel, route, addr, DeliveryStatus.queued)
                    else:
                        add_delivery(n, channel, route, addr, DeliveryStatus.suppressed, f"rate_limited:{channel}")
        # New delivery rows are written once, at the end, in their final state. Their ids are derived
        # from (notification, channel, address), so a crash before that write is harmless: the rerun
        # computes the same ids and finds their Redis send records.
        fresh: dict[str, dict[str, Any]] = {row["id"]: row for row in new_rows}
        stats.created = len(new_rows)
        for row in new_rows:
            batch.deliveries[row["notification_id"]].append(_D(*_D_FIELDS(row)))

        # 2. Deliveries due now: claim, send per route, record.
        by_id = {n.id: n for n in batch.notifications}
        due = [
            d
            for n in batch.notifications
            for d in batch.deliveries.get(n.id, [])
            if d.status in (DeliveryStatus.queued, DeliveryStatus.retrying)
            and (d.next_attempt_at is None or d.next_attempt_at <= due_by)
        ]
        updates = _Updates(fresh)
        if due:  # a device whose token changed since the batch loaded it (or since a retry's fan-out)
            due = _follow_replaced_tokens(session.connection(), batch, due, fresh, updates, events, now, stats)
        sent_marks: dict[str, str] = {}
        released: list[str] = []
        lease_waits: dict[str, datetime] = {}  # busy delivery → when its holder's lease runs out
        token_success: list[str] = []
        removed_tokens: dict[str, str] = {}
        sms_stops: set[str] = set()
        if due:
            claims = rt.claims.take([d.id for d in due])
            taken_at = utcnow()
            doubts = [d.id for d, c in zip(due, claims, strict=True) if c.startswith(DOUBT)]
            # an in-doubt delivery's holder may have recorded its outcome in SQL after this batch loaded
            settled = _settled_in_sql(session.connection(), doubts) if doubts else {}
            to_send: dict[str, list[tuple[_D, Message]]] = defaultdict(list)
            for d, claim in zip(due, claims, strict=True):
                if d.id in settled:
                    d.status, pmid = settled[d.id]
                    if pmid and d.status in (DeliveryStatus.sent, DeliveryStatus.delivered, DeliveryStatus.opened):
                        sent_marks[d.id] = pmid
                    else:
                        released.append(d.id)
                    stats.skipped += 1
                    continue
                if claim.startswith(DOUBT):
                    # Its previous holder died (or lost Redis for longer than its lease) with the provider
                    # call under way: it may have been sent. At-least-once: sent again, and recorded.
                    events.append(
                        {
                            "notification_id": d.notification_id,
                            "delivery_id": d.id,
                            "status": IN_DOUBT,
                            "detail": f"worker {claim[len(DOUBT) :]} stopped with the provider call under way; "
                            "sending again (it may arrive twice)",
                            "at": now,
                        }
                    )
                    log.warning(
                        "delivery in doubt: sending again",
                        extra={"notification_id": d.notification_id, "delivery_id": d.id, "route": d.route},
                    )
                    rt.metrics.in_doubt(d.channel)
                    stats.in_doubt += 1
                elif claim.startswith("sent:"):
                    # Sent before, but the SQL record was lost (crash between provider and commit).
                    _mark(
                        d,
                        updates,
                        events,
                        DeliveryStatus.sent,
                        now,
                        provider_message_id=claim[5:],
                        detail="recovered from send record",
                    )
                    stats.skipped += 1
                    continue
                elif claim != OK:
                    left = rt.claims.busy_left.get(d.id)
                    if left is not None:  # busy: looked at again the moment its lease can be taken over
                        lease_waits[d.id] = taken_at + timedelta(seconds=left + LEASE_MARGIN)
                    stats.skipped += 1
                    continue
                n = by_id[d.notification_id]
                user = batch.users.get(d.user_id)
                content = render(n, d.channel, user) if user else "unknown_user"
                if isinstance(content, str):
                    # not back to the DLQ what can never be sent: its secret data is gone
                    dead = not content.startswith(SECRET_ERASED)
                    _mark(d, updates, events, DeliveryStatus.failed, now, reason=content, dead=dead)
                    released.append(d.id)
                    stats.failed += 1
                    continue
                headers: dict[str, str] = {}
                shared: dict[str, str] | None = None
                personal: dict[str, str] = {}
                pv = probed.get((n.id, d.channel))  # the batch's rendering with tokens, this recipient's values
                if d.channel == "email":
                    values = pv[1] if pv else None
                    plan = email_plan(pv[0] if pv else content, values, n.category == "marketing")
                    content, shared, personal, headers = plan.apply(rt, d, values)
                elif pv is not None:
                    content = {part: _fill(piece, pv[1], tokens) for part, piece, tokens in fill_plan(pv)}
                msg = Message(
                    delivery_id=d.id,
                    notification_id=n.id,
                    channel=d.channel,
                    route=d.route,
                    address=d.address,
                    content=content,
                    category=n.category,
                    priority=n.priority,
                    dedup_key=n.dedup_key or n.id,
                    data={"notification_id": n.id, "type": n.type},
                    headers=headers,
                    user_id=d.user_id,
                    shared=shared,
                    personal=personal,
                )
                to_send[d.route].append((d, msg))

            # the batch's routes at the same time (iOS and Android: one network wait, not two)
            answered = _send_routes(rt, {route: [m for _, m in items] for route, items in to_send.items()})
            for route, items in to_send.items():
                for (d, _m), (provider_name, outcome) in zip(items, answered[route], strict=True):
                    attempts = d.attempts + 1
                    if isinstance(outcome, Fenced):
                        # not ours any more: whoever holds the lease now sends and records it
                        stats.fenced += 1
                        stats.skipped += 1
                        continue
                    if isinstance(outcome, Sent):
                        _mark(
                            d,
                            updates,
                            events,
                            DeliveryStatus.sent,
                            now,
                            attempts=attempts,
                            provider=provider_name,
                            provider_message_id=outcome.provider_message_id,
                        )
                        sent_marks[d.id] = outcome.provider_message_id
                        if d.channel == "push":
                            token_success.append(d.address)
                        stats.sent += 1
                    elif isinstance(outcome, Held):
                        # not offered to any provider (our pace, open circuits): no attempt used;
                        # spread a little so that a held batch does not come back as one burst
                        wait = max(0.5, outcome.retry_after) * (1 + random.random() / 4)
                        _mark(
                            d,
                            updates,
                            events,
                            DeliveryStatus.retrying,
                            now,
                            reason=outcome.reason,
                            next_attempt_at=now + timedelta(seconds=wait),
                            detail=f"held: {outcome.reason}; next in {wait:.1f}s",
                        )
                        stats.retrying += 1
                        released.append(d.id)
                    elif isinstance(outcome, Retry) and outcome.throttled:
                        # the provider asks us to slow down: wait as told (spread a little so the
                        # batch does not come back as one burst) without using up an attempt
                        wait = max(1.0, outcome.retry_after or 1.0) * (1 + random.random() / 2)
                        _mark(
                            d,
                            updates,
                            events,
                            DeliveryStatus.retrying,
                            now,
                            provider=provider_name,
                            reason=outcome.reason,
                            next_attempt_at=now + timedelta(seconds=wait),
                            detail=f"throttled: {outcome.reason}; next in {wait:.1f}s",
                        )
                        stats.retrying += 1
                        released.append(d.id)
                    elif isinstance(outcome, Retry):
                        delay = retry_delay(settings, attempts, outcome.retry_after)
                        if delay is None:
                            _mark(
                                d,
                                updates,
                                events,
                                DeliveryStatus.failed,
                                now,
                                attempts=attempts,
                                provider=provider_name,
                                reason=f"retries exhausted: {outcome.reason}",
                                dead=True,
                            )
                            stats.failed += 1
                        else:
                            _mark(
                                d,
                                updates,
                                events,
                                DeliveryStatus.retrying,
                                now,
                                attempts=attempts,
                                provider=provider_name,
                                reason=outcome.reason,
                                next_attempt_at=now + timedelta(seconds=delay),
                                detail=f"attempt {attempts} failed: {outcome.reason}; next in {delay:g}s",
                            )
                            stats.retrying += 1
                        released.append(d.id)
                    elif isinstance(outcome, InvalidAddress):
                        _mark(
                            d,
                            updates,
                            events,
                            DeliveryStatus.failed,
                            now,
                            attempts=attempts,
                            provider=provider_name,
                            reason=f"invalid_address: {outcome.reason}",
                        )
                        if outcome.kind == "dead_token":
                            removed_tokens[d.address] = f"{provider_name}: {outcome.reason}"
                        elif outcome.kind == "stopped" and d.channel == "sms":
                            sms_stops.add(d.user_id)
                        released.append(d.id)
                        stats.failed += 1
                    else:
                        assert isinstance(outcome, Permanent)
                        _mark(
                            d,
                            updates,
                            events,
                            DeliveryStatus.failed,
                            now,
                            attempts=attempts,
                            provider=provider_name,
                            reason=outcome.reason,
                            dead=True,
                        )
                        released.append(d.id)
                        stats.failed += 1

        # 3. Record: Redis send records first (they survive a crash before the commit), then SQL.
        try:
            rt.claims.settle(sent_marks, released)
            settle_error: Exception | None = None
        except redis.RedisError as exc:
            # Redis went away after the provider accepted: the SQL record of what was sent must still
            # be written, or a rerun would find only a stale claim and send again.
            settle_error = exc
        # parameters converted before the writer lock is taken: inside it, only the statements run
        insert_deliveries = prepare_insert(rt.ctx.engine, _DT, new_rows)
        insert_events = prepare_insert(rt.ctx.engine, _ET, events)
        urgent = any(n.priority == "high" for n in batch.notifications)
        with write_lock(rt.ctx.engine, urgent=urgent):  # one SQLite writer at a time; OTPs first
            try:
                conn = session.connection()
                insert_deliveries(conn)
                if updates.rows:
                    # only from the states this job saw: a webhook may have moved a delivery on meanwhile
                    _bulk_update(session, _DT, updates.rows, only_from=[DeliveryStatus.queued, DeliveryStatus.retrying])
                insert_events(conn)
                if token_success:  # by primary key, raw: a thousand-value IN list costs SQLAlchemy more than SQLite
                    update_where_in(conn, _TT, {"last_success_at": now}, "token", token_success)
                if removed_tokens:
                    for token, reason in removed_tokens.items():
                        session.execute(
                            update(DeviceToken)
                            .where(DeviceToken.token == token, DeviceToken.removed_at.is_(None))  # type: ignore[union-attr]
                            .values(removed_at=now, removed_reason=reason)
                        )
                for user_id in sms_stops:
                    session.merge(OptOut(user_id=user_id, channel="sms", category="*", reason="stop_reply"))
                _settle_notifications(session, batch, now, secret_of, lease_waits)
                session.commit()
            except IntegrityError:
                # Another worker wrote these new deliveries first (a takeover while their first holder,
                # cut off from Redis, was still sending): the caller reloads and goes on. What this
                # attempt sent and took over in doubt must stay on record all the same.
                session.rollback()
                _keep_record(rt, events, sent_marks)
                raise
        if sms_stops:
            prefs.invalidate(rt.ctx.redis, sms_stops)
        if settle_error is not None:
            raise settle_error
        for row in new_rows:
            rt.metrics.outcome(row["status"], row["channel"], row.get("reason"))
        channel_of = {d.id: d.channel for ds in batch.deliveries.values() for d in ds}
        for row in updates.rows:
            rt.metrics.outcome(row["status"], channel_of.get(row["id"], ""), row.get("reason"))
        try:
            pipe = rt.ctx.redis.pipeline(transaction=False)
            rt.metrics.flush(pipe)
            pipe.execute()
        except redis.RedisError:
            log.warning("metrics not recorded: Redis unavailable")
    return stats


def _bulk_update(session: Session, table: Any, rows: list[dict[str, Any]], only_from: list[str] | None = None) -> None:
    """UPDATE ... WHERE id = ? as Core executemany, one statement per distinct set of columns."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[tuple(sorted(r))].append(r)
    for cols, items in groups.items():
        stmt = update(table).where(table.c.id == bindparam("_id"))
        if only_from:  # (an IN list is an "expanding" parameter, which executemany cannot take)
            stmt = stmt.where(or_(*[table.c.status == literal(v) for v in only_from]))
        stmt = stmt.values({c: bindparam(c) for c in cols if c != "id"})
        session.execute(stmt, [{**r, "_id": r["id"]} for r in items])


class _Updates:
    """Where delivery changes go: merged into a row not yet written, else an UPDATE."""

    def __init__(self, fresh: dict[str, dict[str, Any]]) -> None:
        self.fresh = fresh
        self.rows: list[dict[str, Any]] = []
        self.amended: dict[str, dict[str, Any]] = {}

    def append(self, row: dict[str, Any]) -> None:
        if self.amended and row["id"] in self.amended:
            row.update(self.amended.pop(row["id"]))
        new = self.fresh.get(row["id"])
        if new is None:
            self.rows.append(row)
        else:
            new.update(row)

    def amend(self, delivery_id: str, columns: dict[str, Any]) -> None:
        """Columns that change with the delivery's next status change in this batch (its outcome)."""
        new = self.fresh.get(delivery_id)
        if new is None:
            self.amended.setdefault(delivery_id, {}).update(columns)
        else:
            new.update(columns)


_REPLACED_HOPS = 16  # as notifyctl.directory.MAX_CHAIN


def _follow_replaced_tokens(
    conn: Any,
    batch: _Batch,
    due: list[_D],
    fresh: dict[str, dict[str, Any]],
    updates: _Updates,
    events: list[dict[str, Any]],
    now: datetime,
    stats: Stats,
) -> list[_D]:
    """Push deliveries due now whose token has been replaced (``tokens register --replaces`` or
    ``--device-id`` retired it) go to the device's live token instead, so a send after the
    replacement never reaches the old token, even when the old one was loaded by this batch (or
    fanned out before a retry) just before the replacement committed.

    One primary-key query per batch with push deliveries (rows only for replaced tokens: usually
    none); chains of replacements are followed. A delivery keeps its identity where it has one:
    a retried delivery (already in SQL) keeps its id and changes address; a fresh one takes the
    id ``delivery_id`` derives from the new token, so a rerun after a crash, which fans out to
    the new token, finds the same send record. When the notification already has a delivery to
    that token, or the device has no live token left, the delivery is suppressed
    (``token_replaced``): the device never gets it twice. Returns the deliveries still due."""
    push = sorted({d.address for d in due if d.channel == "push"})
    if not push:
        return due
    sql = "SELECT token, platform, removed_at, replaced_by, user_id FROM device_tokens"
    known = {r[0]: r for r in rows_where_in(conn, sql, "token", push, "AND replaced_by IS NOT NULL")}
    if not known:
        return due
    for _ in range(_REPLACED_HOPS):
        ahead = sorted({r[3] for r in known.values() if r[3] and r[3] not in known})
        if not ahead:
            break
        known.update({r[0]: r for r in rows_where_in(conn, sql, "token", ahead)})

    def live_end(token: str, user_id: str) -> tuple[str, str] | None:  # (token, platform): the device's live token
        for _ in range(_REPLACED_HOPS + 1):
            row = known.get(token)
            if row is None or row[4] != user_id:  # a token since registered by someone else is not this device's
                return None
            if row[2] is None:
                return row[0], row[1]
            if not row[3]:
                return None
            token = row[3]
        return None

    still: list[_D] = []
    for d in due:
        row = known.get(d.address) if d.channel == "push" else None
        if row is None or row[3] is None or row[2] is None:  # not replaced (or live again)
            still.append(d)
            continue
        end = live_end(row[3], d.user_id)
        taken = {x.address for x in batch.deliveries.get(d.notification_id, ()) if x.channel == "push" and x is not d}
        if end is None or end[0] in taken:
            why = "no live token" if end is None else "the new token has its own delivery"
            updates.amend(d.id, {"suppressed_at": now})
            _mark(
                d,
                updates,
                events,
                DeliveryStatus.suppressed,
                now,
                reason="token_replaced",
                detail=f"token replaced: {why}",
            )
            stats.suppressed += 1
            stats.by_reason["token_replaced"] += 1
            continue
        token, platform = end
        route = f"push.{platform}"
        if d.id in fresh:
            row_new = fresh.pop(d.id)
            new_id = delivery_id(d.notification_id, d.channel, token)
            for e in events:
                if e["delivery_id"] == d.id:
                    e["delivery_id"] = new_id
            row_new.update(id=new_id, address=token, route=route)
            fresh[new_id] = row_new
            d.id = new_id
        else:
            updates.amend(d.id, {"address": token, "route": route})  # written with the send's outcome
            events.append(
                {
                    "notification_id": d.notification_id,
                    "delivery_id": d.id,
                    "status": d.status,
                    "detail": f"token replaced: now {token[:12]}…",
                    "at": now,
                }
            )
        d.address, d.route = token, route
        still.append(d)
    return still


# a busy delivery is due again this long after its holder's lease runs out (clocks and rounding)
LEASE_MARGIN = 0.1
IN_DOUBT = "in_doubt"  # the event recorded for a delivery taken over in flight (``Claims.take``)


def _keep_record(rt: Runtime, events: list[dict[str, Any]], sent_marks: dict[str, str]) -> None:
    """The events of an attempt whose writes are rolled back that must not be lost: its in-doubt
    takeovers and its sends (the provider accepted them)."""
    keep = [
        {**e, "detail": f"{e['detail']} (also recorded by another worker)"} if e["status"] == DeliveryStatus.sent else e
        for e in events
        if e["status"] == IN_DOUBT or (e["status"] == DeliveryStatus.sent and e["delivery_id"] in sent_marks)
    ]
    if keep:
        with rt.ctx.engine.begin() as conn:
            conn.execute(insert(_ET), keep)
        try:
            pipe = rt.ctx.redis.pipeline(transaction=False)
            rt.metrics.flush(pipe)  # (the in-doubt counts)
            pipe.execute()
        except redis.RedisError:
            log.warning("metrics not recorded: Redis unavailable")
        rt.metrics = metrics.Recorder()


def _settled_in_sql(conn: Any, ids: list[str]) -> dict[str, tuple[str, str | None]]:
    """Of these deliveries, those whose outcome is already in SQL: id → (status, provider message id)."""
    sql = "SELECT id, status, provider_message_id FROM deliveries"
    return {r[0]: (r[1], r[2]) for r in rows_where_in(conn, sql, "id", ids, "AND status NOT IN ('queued', 'retrying')")}


def delivery_id(notification_id: str, channel: str, address: str) -> str:
    """Deterministic: the same notification, channel and address always give the same id, and
    it sorts with its notification's (``derived_id``)."""
    return derived_id("d", notification_id, channel, address)


def _mark(
    d: _D,
    updates: _Updates,
    events: list[dict[str, Any]],
    status: str,
    now: datetime,
    *,
    reason: str | None = None,
    attempts: int | None = None,
    provider: str | None = None,
    provider_message_id: str | None = None,
    next_attempt_at: datetime | None = None,
    dead: bool = False,
    detail: str | None = None,
) -> None:
    row: dict[str, Any] = {"id": d.id, "status": status, "updated_at": now}
    d.status = status
    if attempts is not None:
        row["attempts"] = d.attempts = attempts
    if provider is not None:
        row["provider"] = d.provider = provider
    if reason is not None:
        row["reason"] = d.reason = reason
    if provider_message_id is not None:
        row["provider_message_id"] = d.provider_message_id = provider_message_id
    row["next_attempt_at"] = d.next_attempt_at = next_attempt_at
    if status == DeliveryStatus.sent:
        row["sent_at"] = now
    elif status == DeliveryStatus.failed:
        row["failed_at"] = now
        row["dead_lettered"] = d.dead_lettered = dead
    updates.append(row)
    # Every outcome, sent included, at INFO: `worker -v` shows them all. The hot path pays one
    # cached level check when nobody reads them.
    if log.isEnabledFor(logging.INFO):
        log.info(
            "delivery %s%s",
            status,
            f": {reason}" if reason else "",
            extra={"notification_id": d.notification_id, "delivery_id": d.id, "provider": provider, "route": d.route},
        )
    events.append(
        {
            "notification_id": d.notification_id,
            "delivery_id": d.id,
            "status": status,
            "detail": detail or reason or (f"{provider}: {provider_message_id}" if provider_message_id else None),
            "at": now,
        }
    )


THROTTLE_HOLD = 5.0  # a throttle answer asking for this many seconds or more holds the provider


def _route_groups(settings: Any, routes: list[str]) -> list[list[str]]:
    """The routes in groups that share no provider (a route's providers: ``providers_for``, in
    failover order, and for SMS the voice fallback's): routes of one group go one after the other,
    groups at the same time."""
    groups: list[tuple[set[str], list[str]]] = []
    for route in routes:
        names = set(settings.providers_for(route) or ["outbox"])
        if route == "sms":
            names.update(settings.providers_voice)
        joined = [g for g in groups if g[0] & names]
        for g in joined:
            groups.remove(g)
            names |= g[0]
        groups.append((names, [r for g in joined for r in g[1]] + [route]))
    return [g[1] for g in groups]


def _send_routes(rt: Runtime, batches: dict[str, list[Message]]) -> dict[str, list[tuple[str, Outcome]]]:
    """``_send_route`` for each route of a batch. Routes served by different providers are sent at
    the same time: each group of routes (``_route_groups``) but the first in a thread of the
    runtime's pool, the first in this one; every provider call is fenced and paced as before
    (``_call_provider``), each provider used by one thread at a time. Returns when every route
    has its outcomes; an error in one route is raised once all have ended (nothing left running)."""
    routes = list(batches)
    groups = _route_groups(rt.settings, routes) if len(routes) > 1 else [routes]

    def run(group: list[str]) -> dict[str, list[tuple[str, Outcome]]]:
        return {route: _send_route(rt, route, batches[route]) for route in group}

    if len(groups) == 1:
        return run(groups[0])
    futures = [rt.route_pool().submit(run, g) for g in groups[1:]]
    out: dict[str, list[tuple[str, Outcome]]] = {}
    error: BaseException | None = None
    try:
        out.update(run(groups[0]))
    except BaseException as exc:  # noqa: BLE001 - raised below, once the other routes have ended
        error = exc
    for f in futures:
        try:
            out.update(f.result())
        except BaseException as exc:  # noqa: BLE001 - the first one is raised
            error = error or exc
    if error is not None:
        raise error
    return out


def _send_route(rt: Runtime, route: str, messages: list[Message]) -> list[tuple[str, Outcome]]:
    """Send through the route's providers in order, skipping open circuits: what one provider
    answers "retry later" goes to the next. An OTP that every SMS provider failed becomes a
    voice call when a voice provider is configured. Returns (provider, outcome) per message."""
    names = rt.settings.providers_for(route) or ["outbox"]
    states = rt.circuits.states(names)
    usable = [n for n in names if states[n][0] not in (OPEN, THROTTLED)]
    results: list[tuple[str, Outcome] | None] = [None] * len(messages)
    if not usable:
        # No provider is called: the delivery waits for the first circuit that may close (or
        # throttle that ends) without using an attempt, or a long outage would drain its attempts
        # with no call made.
        wait = max(1.0, min(until for _, until in states.values()) - time.time())
        if any(state == THROTTLED for state, _ in states.values()):
            why = f"every {route} provider is throttling or down"
        else:
            why = f"every {route} provider's circuit is open"
        return [(names[0], Held(why, retry_after=wait)) for _ in messages]
    pending = list(range(len(messages)))
    for name in usable:
        outcomes = _call_provider(rt, name, [messages[i] for i in pending])
        called = [o for o in outcomes if not isinstance(o, (Fenced, Held))]  # (these never reached it)
        accepted = any(isinstance(o, Sent) for o in called)
        retries = [o for o in called if isinstance(o, Retry)]
        throttled = [o for o in retries if o.throttled]
        provider_down = not accepted and len(retries) == len(called) and not throttled
        try:  # bookkeeping after the provider answered: a Redis failure here must not lose the answers
            if called:
                rt.circuits.record(name, ok=not provider_down, was=states[name][0])
            longest = max((o.retry_after or 1.0) for o in throttled) if throttled else 0.0
            if longest >= THROTTLE_HOLD and not accepted:
                # a long wait is a quota, not a rate (APNs' token updates, a daily cap): every
                # worker holds off the provider; a short one only lowers its pace (notifyctl.pacing)
                rt.circuits.throttle(name, longest)
        except redis.RedisError:
            log.warning("circuit state of %s not recorded: Redis unavailable", name)
        still: list[int] = []
        for i, o in zip(pending, outcomes, strict=True):
            results[i] = (name, o)
            if isinstance(o, Retry):
                still.append(i)
        pending = still
        if not pending:
            break
    if pending and route == "sms" and rt.settings.providers_voice:
        otps = [i for i in pending if messages[i].priority == "high" and messages[i].category == "transactional"]
        for i, (name, o) in zip(otps, _send_voice(rt, [messages[i] for i in otps]), strict=True):
            if isinstance(o, (Sent, Fenced)):
                results[i] = (f"{name}:voice", o)
    return [r for r in results if r is not None]


def _send_voice(rt: Runtime, messages: list[Message]) -> list[tuple[str, Outcome]]:
    if not messages:
        return []
    name = rt.settings.providers_voice[0]
    calls = [
        Message(delivery_id=m.delivery_id, notification_id=m.notification_id, channel="sms", route="voice",
                address=m.address, content=m.content, category=m.category, priority=m.priority,
                dedup_key=m.dedup_key, user_id=m.user_id)
        for m in messages
    ]  # fmt: skip
    return [(name, o) for o in _call_provider(rt, name, calls)]


def _call_provider(rt: Runtime, name: str, messages: list[Message]) -> list[Outcome]:
    """Send through one provider at its pace (``notifyctl.pacing``), request by request group: what
    the pace lets go now (after waiting at most ``pace_max_wait`` s in all), until the provider
    throttles us; the rest is ``Held`` (no attempt used), spread over the time the pace needs.
    Each call is fenced (``_fenced_send``) right before it is made."""
    try:
        provider = rt.provider(name)
    except Misconfigured as exc:
        return [Retry(f"{name} misconfigured: {exc}") for _ in messages]
    plan = getattr(provider, "requests", None)
    groups: list[list[int]] = plan(messages) if plan is not None else [[i] for i in range(len(messages))]
    outcomes: list[Outcome | None] = [None] * len(messages)
    pos, slept, why = 0, 0.0, f"{name}: paced"
    while pos < len(groups):
        granted, wait = rt.pacer.take(name, len(groups) - pos)
        if not granted:
            if slept + wait > rt.settings.pace_max_wait:
                break
            time.sleep(wait)
            slept += wait
            continue
        part = groups[pos : pos + granted]
        pos += granted
        idx = [i for g in part for i in g]
        answers = _fenced_send(rt, provider, name, [messages[i] for i in idx])
        accepted = throttled = off = 0
        for g in part:
            first = answers[off]
            for i in g:
                outcomes[i] = answers[off]
                off += 1
            if isinstance(first, Sent):
                accepted += 1
            elif isinstance(first, Retry) and first.throttled:
                throttled += 1
        try:
            rt.pacer.record(name, accepted, throttled)
        except redis.RedisError:
            log.debug("pace of %s not recorded: Redis unavailable", name)
        if throttled:  # stop at the first throttle answer: the rest waits for the (lowered) pace
            why = f"{name}: paced (it throttled this batch)"
            break
    if pos < len(groups):
        try:
            rate = rt.pacer.rate(name) or 1.0
        except redis.RedisError:
            rate = 1.0
        for k, g in enumerate(groups[pos:]):
            held = Held(why, retry_after=(k + 1) / rate)
            for i in g:
                outcomes[i] = held
    return [o if o is not None else Retry(f"{name}: no outcome") for o in outcomes]


def _fenced_send(rt: Runtime, provider: Provider, name: str, messages: list[Message]) -> list[Outcome]:
    """The provider's outcomes, for the messages whose lease this worker still holds (checked and
    marked in flight in one Redis call right before the call: ``Claims.fence``); ``Fenced`` for
    the others, which are not sent."""
    ours = rt.claims.fence([m.delivery_id for m in messages])
    if all(ours):
        return _provider_send(rt, provider, name, messages)  # type: ignore[return-value]
    out: list[Outcome] = [Fenced() for _ in messages]
    kept = [i for i, ok in enumerate(ours) if ok]
    if kept:
        for i, o in zip(kept, _provider_send(rt, provider, name, [messages[i] for i in kept]), strict=True):
            out[i] = o
    return out


def _provider_send(rt: Runtime, provider: Provider, name: str, messages: list[Message]) -> list[Outcome]:
    # a provider that makes several requests per call asks before each whether the lease still
    # covers one more (``worker.providers.base.lease_open``)
    provider.may_start = rt.claims.may_start  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    try:
        outcomes = provider.send(messages)
        rt.metrics.latency(name, time.perf_counter() - t0, len(messages))
    except Exception as exc:  # noqa: BLE001 - a provider bug must not lose the batch: retry it
        log.exception("provider %s failed on a batch of %d", name, len(messages))
        return [Retry(f"{name} error: {type(exc).__name__}: {exc}") for _ in messages]
    if len(outcomes) != len(messages):
        return [Retry(f"{name} answered {len(outcomes)} outcomes for {len(messages)}") for _ in messages]
    return outcomes


# Tokens for what differs per recipient in an email (see Message.shared): the recipient's
# template variables (``%%notifyctl:t:first_name%%`` as text, ``h:`` as escaped HTML) and what the
# pipeline adds (unsubscribe link, open pixel).
TOKEN_PREFIX = "%%notifyctl:"
UNSUBSCRIBE_TEXT = TOKEN_PREFIX + "unsubscribe%%"
UNSUBSCRIBE_HTML = TOKEN_PREFIX + "unsubscribe_html%%"
OPEN_PIXEL = TOKEN_PREFIX + "open_pixel%%"
_FOOTER_TOKENS = (UNSUBSCRIBE_TEXT, UNSUBSCRIBE_HTML, OPEN_PIXEL)


class _UserProbe(dict):  # type: ignore[type-arg]
    """Stands in for ``user`` when a template is rendered once for a batch: any variable read from
    it (``user.first_name``, ``user["plan"]``) renders as a token. Used only for channels that do
    nothing else with ``user`` (``Template.direct_user_fields``; see ``_token_values``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def __missing__(self, key: str) -> str:
        return f"{TOKEN_PREFIX}{self.kind}:{key}%%"


def _token_values(fields: frozenset[str] | None, user: dict[str, Any], html: bool = True) -> dict[str, str] | None:
    """A recipient's values for the tokens of ``_UserProbe`` (``t:`` as text, ``h:`` escaped for
    HTML: only with ``html``, the channel that has an HTML part), when the template only prints
    ``user`` fields (``Template.direct_user_fields``) and the recipient has them all; else None
    (rendered the ordinary way). Putting them in the probe's rendering and stripping each part is
    exactly what rendering gives: Jinja prints ``str(value)``, escaped in the HTML part."""
    if fields is None:
        return None
    values: dict[str, str] = {}
    for f in fields:
        v = user.get(f)
        if v is None or (type(v) is float and not math.isfinite(v)):
            return None  # missing or null (which templates treat as missing): rendered the ordinary way
        text = v if type(v) is str else str(v)
        if TOKEN_PREFIX in text or text != text.strip():
            # a value that looks like a token, or whose edge whitespace a part's strip() could eat
            return None
        values[f"{TOKEN_PREFIX}t:{f}%%"] = text
        if html:
            values[f"{TOKEN_PREFIX}h:{f}%%"] = str(markupsafe.escape(v))
    return values


class _EmailPlan:
    """What every recipient of one email body in a batch shares, worked out once: for marketing,
    RFC 8058 one-click unsubscribe headers and a footer (unsubscribe link, postal address —
    CAN-SPAM); the open-tracking pixel when a public URL is set; the body with tokens where each
    recipient's parts go (``Message.shared``). ``apply`` then does only what differs per
    recipient: the signed links, the token values, and the recipient's own copy of the body."""

    __slots__ = ("pieces", "shared", "tokens", "unsub", "pixel", "substitute")

    def __init__(
        self,
        settings: Any,
        content: dict[str, str],
        tokens: tuple[str, ...],
        marketing: bool,
        footer: tuple[bool, bool, dict[str, str]] | None = None,
    ) -> None:
        """``content``: the body, with ``tokens`` (from ``_token_values``) where the recipient's fields go.
        ``footer``: ``_EmailPlan.footer(settings, marketing)``, when the caller keeps it for a batch."""
        self.unsub, self.pixel, adds = footer or _EmailPlan.footer(settings, marketing)
        # a body whose own text looks like a token must not be rewritten: it goes as it is, in full
        self.substitute = bool(tokens) or not any(TOKEN_PREFIX in v for v in content.values())
        # per part: (the template's piece, its tokens, the footer's piece, its tokens)
        self.pieces: dict[str, tuple[str, tuple[str, ...], str, tuple[str, ...]]] = {}
        for part in {**content, **adds}:
            piece, add = content.get(part, ""), adds.get(part, "")
            own = tuple(t for t in tokens if t in piece)
            self.pieces[part] = (piece, own, add, tuple(t for t in _FOOTER_TOKENS if t in add))
        self.tokens = tuple(dict.fromkeys(t for p in self.pieces.values() for t in p[1] + p[3]))
        self.shared = {part: piece + add for part, (piece, _o, add, _a) in self.pieces.items()}

    @staticmethod
    def footer(settings: Any, marketing: bool) -> tuple[bool, bool, dict[str, str]]:
        """(unsubscribe link?, open pixel?, what each part gets at its end, with tokens): the same
        for every body of a batch."""
        marketing = marketing and bool(settings.public_url or settings.postal_address)
        unsub = marketing and bool(settings.public_url)
        pixel = bool(settings.public_url)
        text_footer: list[str] = []
        html_footer: list[str] = []
        if unsub:
            text_footer.append(f"Unsubscribe: {UNSUBSCRIBE_TEXT}")
            html_footer.append(f'<a href="{UNSUBSCRIBE_HTML}">Unsubscribe</a>')
        if marketing and settings.postal_address:
            text_footer.append(settings.postal_address)
            html_footer.append(html.escape(settings.postal_address))
        text_add = html_add = ""
        if text_footer:
            text_add = "\n\n--\n" + "\n".join(text_footer)
            html_add = '\n<p style="font-size:small;color:#666">' + " · ".join(html_footer) + "</p>"
        if pixel:
            html_add += f'\n<img src="{OPEN_PIXEL}" width="1" height="1" alt="">'
        return unsub, pixel, ({"text": text_add, "html": html_add} if (marketing or pixel) else {})

    def apply(
        self, rt: Runtime, d: _D, values: dict[str, str] | None
    ) -> tuple[dict[str, str], dict[str, str] | None, dict[str, str], dict[str, str]]:
        """(content, shared, personal, headers) for one recipient: ``content`` as they get it and,
        when something differs per recipient, ``shared`` with tokens and ``personal`` their values."""
        personal = dict(values) if values else {}
        headers: dict[str, str] = {}
        if self.unsub:
            url = unsubscribe_url(rt.settings, rt.unsub_key, d.user_id, "marketing") or ""
            headers = {"List-Unsubscribe": f"<{url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
            personal[UNSUBSCRIBE_TEXT] = url
            personal[UNSUBSCRIBE_HTML] = html.escape(url)
        if self.pixel:
            personal[OPEN_PIXEL] = html.escape(pixel_url(rt.settings, rt.unsub_key, d.id) or "")
        content: dict[str, str] = {}
        for part, (piece, own, add, extra) in self.pieces.items():
            for t in own:
                piece = piece.replace(t, personal[t])
            for t in extra:
                add = add.replace(t, personal[t])
            content[part] = (piece.strip() if own else piece) + add
        if not self.tokens or not self.substitute:
            return content, None, {}, headers
        if len(personal) != len(self.tokens):  # only the tokens the body has (tokens ⊆ personal)
            personal = {t: personal[t] for t in self.tokens}
        return content, self.shared, personal, headers


def _fill(piece: str, values: dict[str, str], tokens: tuple[str, ...]) -> str:
    """``piece`` with the ``tokens`` it holds replaced by their ``values``, stripped as a rendering is."""
    for token in tokens:
        piece = piece.replace(token, values[token])
    return piece.strip()


def _settle_notifications(
    session: Session,
    batch: _Batch,
    now: datetime,
    secret_of: Callable[[str], frozenset[str]],
    lease_waits: dict[str, datetime] | None = None,
) -> None:
    """Each notification's status from its deliveries; a notification whose deliveries are all
    final has its template's secret data erased (``notifyctl.secretdata``) in the same write.
    ``lease_waits``: deliveries found ``busy`` (another worker's lease) and when that lease runs out."""
    lease_waits = lease_waits or {}
    # Most rows of a batch get the same values (done, no reason): one UPDATE ... WHERE id IN (...)
    # per distinct set of values, instead of one parameter set per row.
    same: dict[tuple[tuple[str, Any], ...], list[str]] = defaultdict(list)
    erased: list[dict[str, Any]] = []
    for n in batch.notifications:
        ds = batch.deliveries.get(n.id, [])
        open_ = [d for d in ds if d.status not in FINAL_STATUSES]
        if not open_:
            secret = secret_of(n.template_id)  # (empty for most templates: nothing more to do)
            if secret:
                data = erase(n.data, secret)
                if data is not None:
                    erased.append({"_id": n.id, "data": data})
        if not ds:
            same[(("status", NotificationStatus.done), ("reason", "no deliveries"))].append(n.id)
        elif not open_:
            all_suppressed = all(d.status == DeliveryStatus.suppressed for d in ds)
            status = NotificationStatus.suppressed if all_suppressed else NotificationStatus.done
            same[(("status", status), ("reason", ds[0].reason if all_suppressed else None))].append(n.id)
        else:
            # a delivery waits for its retry time, or for the lease of the worker holding it: if that
            # worker died (kill -9), the reconciler's due pass queues it again once the lease has run
            # out, within a second — taken over then, never earlier (worker.claims)
            waits = [
                d.next_attempt_at
                if d.status == DeliveryStatus.retrying and d.next_attempt_at
                else lease_waits.get(d.id)
                for d in open_
            ]
            if all(waits):
                due = min(w for w in waits if w is not None)
                same[(("status", NotificationStatus.retrying), ("due_at", due), ("job_id", None))].append(n.id)
            else:
                # Something is held by another live worker: the reconciler looks again after its grace.
                same[(("status", NotificationStatus.queued), ("due_at", now))].append(n.id)
    conn = session.connection()
    for values, ids in same.items():
        update_where_in(conn, _N, {**dict(values), "updated_at": now}, "id", ids)
    if erased:
        session.execute(_ERASE, erased)


_ERASE = update(_N).where(_N.c.id == bindparam("_id")).values(data=bindparam("data", type_=_N.c.data.type))
