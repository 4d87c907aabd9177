"""Stage 5, record: each outcome onto its delivery (``outcome.decide``), then the batch's writes —
Redis send records first (they survive a crash before the commit), then SQL in one transaction
under the writer lock: new deliveries, status changes, events, device tokens, SMS opt-outs, each
notification's status (``_settle_notifications``) — then the metrics.

One module: stage 5, as each other stage is one; the outcomes it records and the write that
stores them share the batch's ``Record``; ~500 lines."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from operator import itemgetter
from typing import Any

import redis
from sqlalchemy import bindparam, insert, literal, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from notifyctl import metrics
from notifyctl.analytics.triggers import counted_insert
from notifyctl.bulk import prepare_insert, update_where_in
from notifyctl.db import write_lock
from notifyctl.models import FINAL_STATUSES, DeviceToken, NotificationStatus, OptOut
from notifyctl.secretdata import erase
from notifyctl.tracking import IMPLIED_FIRST, sent_detail
from worker.claims import Fenced
from worker.pipeline.batch import (
    _D,
    _DT,
    _ET,
    _FAILED,
    _N,
    _QUEUED,
    _RETRYING,
    _SENT,
    _SUPPRESSED,
    _TT,
    _Batch,
)
from worker.pipeline.outcome import decide
from worker.pipeline.runtime import Runtime, Stats
from worker.providers import Message, Outcome, Sent

log = logging.getLogger("notifyctl.worker")

# A new delivery's columns that hold code's own values (statuses, routes, providers, counts, flags,
# the batch's timestamps), never an address or a recipient's data (a statement's text shows in its
# errors): on SQLite, where a batch's rows hold one value down the column (a blast's: all but ids,
# users, addresses and provider message ids), it is written into the statement once
# (``prepare_insert(shared=...)``) instead of bound on each row.
_MAYBE_SHARED = ("channel", "route", "status", "reason", "attempts", "dead_lettered", "queued_at", "updated_at",
                 "provider", "next_attempt_at", "sent_at", "suppressed_at", "failed_at")  # fmt: skip
_SHARED_FROM = 50  # rows: a smaller insert (an OTP's one row) keeps one statement text, cached by the driver


def _constant_columns(engine: Any, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Of ``_MAYBE_SHARED``, the columns holding one value (of one type: ``True == 1``) in every
    row, with that value; None on PostgreSQL (its COPY writes such a column's text once already)
    and for fewer than ``_SHARED_FROM`` rows."""
    if len(rows) < _SHARED_FROM or engine.dialect.name != "sqlite":
        return None
    out: dict[str, Any] = {}
    for c in _MAYBE_SHARED:
        values = list(map(itemgetter(c), rows))
        v = values[0]
        if values.count(v) == len(values) and len(set(map(type, values))) == 1:
            out[c] = v
    return out


IN_DOUBT = "in_doubt"  # the event recorded for a delivery taken over in flight (``Claims.take``)


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


class Record:
    """What a batch writes at its end, gathered by the stages: new delivery rows (``fresh``: by id)
    and changes to loaded ones (``updates``), events, Redis send records to set (``sent_marks``)
    and leases to release, and what follows from the outcomes."""

    __slots__ = (
        "now", "new_rows", "fresh", "events", "updates", "sent_marks", "released", "lease_waits",
        "token_success", "removed_tokens", "sms_stops", "fresh_sent",
    )  # fmt: skip

    def __init__(self, now: datetime, new_rows: list[dict[str, Any]], fresh: dict[str, dict[str, Any]],
                 events: list[dict[str, Any]]) -> None:  # fmt: skip
        self.now, self.new_rows, self.fresh, self.events = now, new_rows, fresh, events
        self.updates = _Updates(fresh)
        self.sent_marks: dict[str, str] = {}
        self.released: list[str] = []
        self.lease_waits: dict[str, datetime] = {}  # busy delivery → when its holder's lease runs out
        self.token_success: list[str] = []
        self.removed_tokens: dict[str, str] = {}
        self.sms_stops: set[str] = set()
        # deliveries created by this batch and sent, plainly: (delivery, provider, provider message
        # id); their ``sent`` event is built only when it is stored (``one_event_when_sent``)
        self.fresh_sent: list[tuple[_D, str, str]] = []


def record_outcomes(
    rt: Runtime,
    to_send: dict[str, list[tuple[_D, Message]]],
    answered: dict[str, list[tuple[str, Outcome]]],
    rec: Record,
    stats: Stats,
) -> None:
    """Each delivery sent (``to_send``) to the state its provider's outcome (``answered``) decides."""
    settings, now, updates, events = rt.settings, rec.now, rec.updates, rec.events
    sent_marks, released, token_success = rec.sent_marks, rec.released, rec.token_success
    fresh, fresh_sent = rec.fresh, rec.fresh_sent
    for route, items in to_send.items():
        for (d, _m), (provider_name, outcome) in zip(items, answered[route], strict=True):
            if isinstance(outcome, Fenced):
                # not ours any more: whoever holds the lease now sends and records it
                stats.fenced += 1
                stats.skipped += 1
                continue
            if isinstance(outcome, Sent):  # (``decide``'s first case, without its call)
                pmid = outcome.provider_message_id
                row = fresh.get(d.id)
                if row is not None:  # its event, most often implied, is left to ``one_event_when_sent``
                    _mark_sent_fresh(d, row, updates, now, d.attempts + 1, provider_name, pmid)
                    fresh_sent.append((d, provider_name, pmid))
                else:
                    _mark(d, updates, events, _SENT, now, attempts=d.attempts + 1, provider=provider_name,
                          provider_message_id=pmid)  # fmt: skip
                sent_marks[d.id] = pmid
                if d.channel == "push":
                    token_success.append(d.address)
                stats.sent += 1
                continue
            status, attempts, called, reason, wait, dead, detail, remove = decide(
                settings, outcome, d.attempts + 1, d.channel
            )
            _mark(
                d,
                updates,
                events,
                status,
                now,
                reason=reason,
                attempts=attempts,
                provider=provider_name if called else None,
                provider_message_id=outcome.provider_message_id if status == _SENT else None,  # type: ignore[union-attr]
                next_attempt_at=now + timedelta(seconds=wait) if wait is not None else None,
                dead=dead,
                detail=detail,
            )
            if status == _SENT:
                sent_marks[d.id] = outcome.provider_message_id  # type: ignore[union-attr]
                if d.channel == "push":
                    token_success.append(d.address)
                stats.sent += 1
                continue
            released.append(d.id)
            if status == _RETRYING:
                stats.retrying += 1
            else:
                stats.failed += 1
            if remove == "dead_token":
                rec.removed_tokens[d.address] = f"{provider_name}: {outcome.reason}"
            elif remove == "stopped":
                rec.sms_stops.add(d.user_id)


def write(
    rt: Runtime, session: Session, batch: _Batch, rec: Record, secret_of: Callable[[str], frozenset[str]]
) -> None:
    """The batch's writes (see the module docstring)."""
    now, new_rows, events, updates, sent_marks = rec.now, rec.new_rows, rec.events, rec.updates, rec.sent_marks
    token_success, removed_tokens, sms_stops = rec.token_success, rec.removed_tokens, rec.sms_stops
    try:
        rt.claims.settle(sent_marks, rec.released)
        settle_error: Exception | None = None
    except redis.RedisError as exc:
        # Redis went away after the provider accepted: the SQL record of what was sent must still
        # be written, or a rerun would find only a stale claim and send again.
        settle_error = exc
    stored = rec.events = one_event_when_sent(events, rec.fresh, rec.fresh_sent)
    # parameters converted before the writer lock is taken: inside it, only the statements run
    insert_deliveries = prepare_insert(rt.ctx.engine, _DT, new_rows, shared=_constant_columns(rt.ctx.engine, new_rows))
    insert_events = prepare_insert(rt.ctx.engine, _ET, stored)
    # the new rows counted for the analytics from the rows themselves (``counted_insert``)
    origins = {n.id: (n.template_id, n.campaign_id, n.wave) for n in batch.notifications} if new_rows else None
    urgent = any(n.priority == "high" for n in batch.notifications)
    with write_lock(rt.ctx.engine, urgent=urgent):  # one SQLite writer at a time; OTPs first
        try:
            conn = session.connection()
            counted_insert(conn, insert_deliveries, new_rows, origins)  # (and the analytics counts)
            if updates.rows:
                # only from the states this job saw: a webhook may have moved a delivery on meanwhile
                _bulk_update(session, _DT, updates.rows, only_from=[_QUEUED, _RETRYING])
            insert_events(conn)
            if token_success:  # by primary key, raw: a thousand-value IN list costs SQLAlchemy more than SQLite
                update_where_in(conn, _TT, {"last_success_at": now}, "token", token_success)
            if removed_tokens:
                for token, reason in removed_tokens.items():
                    session.execute(
                        update(DeviceToken)
                        .where(col(DeviceToken.token) == token, col(DeviceToken.removed_at).is_(None))
                        .values(removed_at=now, removed_reason=reason)
                    )
            for user_id in sms_stops:
                session.merge(OptOut(user_id=user_id, channel="sms", category="*", reason="stop_reply"))
            _settle_notifications(session, batch, now, secret_of, rec.lease_waits)
            session.commit()
        except IntegrityError:
            # Another worker wrote these new deliveries first (a takeover while their first holder,
            # cut off from Redis, was still sending): the caller reloads and goes on. What this
            # attempt sent and took over in doubt must stay on record all the same.
            session.rollback()
            # (all of them: the sends it left implied too)
            _keep_record(rt, events + _sent_events(rec.fresh_sent, rec.fresh), sent_marks)
            raise
    if settle_error is not None:
        raise settle_error
    # counted per distinct outcome (a blast's batch: one), not once a row
    outcomes: Counter[tuple[str, str, str | None]] = Counter(
        (row["status"], row["channel"], row.get("reason")) for row in new_rows
    )
    if updates.rows:
        channel_of = {d.id: d.channel for ds in batch.deliveries.values() for d in ds}
        outcomes.update((row["status"], channel_of.get(row["id"], ""), row.get("reason")) for row in updates.rows)
    for (to, channel, why), k in outcomes.items():
        rt.metrics.outcome(to, channel, why, k)
    try:
        pipe = rt.ctx.redis.pipeline(transaction=False)
        rt.metrics.flush(pipe)
        pipe.execute()
    except redis.RedisError:
        log.warning("metrics not recorded: Redis unavailable")


def one_event_when_sent(
    events: list[dict[str, Any]],
    fresh: dict[str, dict[str, Any]],
    fresh_sent: list[tuple[_D, str, str]] | None = None,
) -> list[dict[str, Any]]:
    """The events to store: ``events`` and the ``sent`` events of ``fresh_sent`` (deliveries created in
    this batch and sent, plainly, their events not yet built: each would be its delivery's last
    event) less those the rows of the deliveries created in this batch
    imply (``notifyctl.tracking.implied_events`` shows them): a ``queued`` event whose next event is
    its outcome ``sent`` or ``retrying`` (the delivery's first event then, which no delivery has
    otherwise: every other one starts ``queued``, ``suppressed`` or ``failed``), and that ``sent`` too
    when it is a plain send — the row's ``sent_at``, the detail its ``provider`` and
    ``provider_message_id`` give (``tracking.sent_detail``): a delivery with a ``sent_at`` and no
    stored ``sent`` implies it (every other write of ``sent_at`` stores one). So the common path
    (created, sent) stores no event row, and builds none for its ``sent``; every other history is
    stored as it happened (a ``fresh_sent`` event that is stored: after the others)."""
    if not fresh:
        return events
    queued_at: dict[str, int] = {}  # a fresh delivery → the index of its queued event, while it is its last
    drop: set[int] = set()
    for i, e in enumerate(events):
        did = e["delivery_id"]
        row = fresh.get(did)
        if row is None:
            continue
        j = queued_at.pop(did, None)
        status = e["status"]
        if status == _QUEUED and e["detail"] is None:
            queued_at[did] = i
        elif j is not None and status in IMPLIED_FIRST:
            drop.add(j)
            if (
                status == _SENT
                and e["at"] == row["sent_at"]
                and e["detail"] == sent_detail(row["provider"], row["provider_message_id"])
            ):
                drop.add(i)
    late: list[tuple[_D, str, str]] = []  # sent after something other than their queued event
    for sent in fresh_sent or ():
        j = queued_at.get(sent[0].id)
        if j is None:
            late.append(sent)
        else:  # its queued event was its last: both implied (the row's sent_at is now, as the event's)
            drop.add(j)
    if drop:
        events = [e for i, e in enumerate(events) if i not in drop]
    return events + _sent_events(late, fresh) if late else events


def _sent_events(fresh_sent: list[tuple[_D, str, str]], fresh: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``sent`` events of ``Record.fresh_sent``, as ``_mark`` builds them."""
    return [
        {"notification_id": d.notification_id, "delivery_id": d.id, "status": _SENT,
         "detail": sent_detail(provider, pmid), "at": fresh[d.id]["sent_at"]}
        for d, provider, pmid in fresh_sent
    ]  # fmt: skip


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


def _keep_record(rt: Runtime, events: list[dict[str, Any]], sent_marks: dict[str, str]) -> None:
    """The events of an attempt whose writes are rolled back that must not be lost: its in-doubt
    takeovers and its sends (the provider accepted them)."""
    keep = [
        {**e, "detail": f"{e['detail']} (also recorded by another worker)"} if e["status"] == _SENT else e
        for e in events
        if e["status"] == IN_DOUBT or (e["status"] == _SENT and e["delivery_id"] in sent_marks)
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
    if status == _SENT:
        row["sent_at"] = now
    elif status == _FAILED:
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
    events.append({"notification_id": d.notification_id, "delivery_id": d.id, "status": status,
                   "detail": detail or reason or sent_detail(provider, provider_message_id), "at": now})  # fmt: skip


def _mark_sent_fresh(
    d: _D, row: dict[str, Any], updates: _Updates, now: datetime, attempts: int, provider: str, pmid: str
) -> None:
    """``_mark``'s plain send (``_SENT``, ``attempts``, ``provider``, ``pmid``) for a delivery created
    by this batch, ``row`` its new row: the columns set on it in place (where ``_Updates.append``
    would merge ``_mark``'s row into it), and no event: its caller keeps what builds one
    (``Record.fresh_sent``, ``one_event_when_sent``)."""
    d.status = row["status"] = _SENT
    row["updated_at"] = now
    row["attempts"] = d.attempts = attempts
    row["provider"] = d.provider = provider
    if pmid is not None:
        row["provider_message_id"] = d.provider_message_id = pmid
    row["next_attempt_at"] = d.next_attempt_at = None
    row["sent_at"] = now
    if updates.amended and d.id in updates.amended:
        row.update(updates.amended.pop(d.id))
    if log.isEnabledFor(logging.INFO):  # as ``_mark`` logs it
        log.info(
            "delivery %s",
            _SENT,
            extra={"notification_id": d.notification_id, "delivery_id": d.id, "provider": provider, "route": d.route},
        )


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
    # Most rows of a batch get the same values (done, no reason; ``done``: one delivery, sent, no
    # secret data: no more to look at): one UPDATE ... WHERE id IN (...) per distinct set of values.
    # A notification whose secret data is erased gets its status and its erased data in one UPDATE
    # of its own (an OTP: one write).
    same: dict[tuple[tuple[str, Any], ...], list[str]] = defaultdict(list)
    erased: list[dict[str, Any]] = []
    secrets: dict[str, frozenset[str]] = {}  # template → its secret fields, once per batch
    done: list[str] = []
    deliveries = batch.deliveries
    for n in batch.notifications:
        ds = deliveries.get(n.id, ())
        if len(ds) == 1 and ds[0].status == _SENT:
            secret = secrets.get(n.template_id)
            if secret is None:
                secret = secrets[n.template_id] = secret_of(n.template_id)
            if not secret:
                done.append(n.id)
                continue
        open_ = [d for d in ds if d.status not in FINAL_STATUSES]
        values: tuple[tuple[str, Any], ...]
        if not ds:
            values = (("status", NotificationStatus.done), ("reason", "no deliveries"))
        elif not open_:
            all_suppressed = all(d.status == _SUPPRESSED for d in ds)
            status = NotificationStatus.suppressed if all_suppressed else NotificationStatus.done
            values = (("status", status), ("reason", ds[0].reason if all_suppressed else None))
        else:
            # a delivery waits for its retry time, or for the lease of the worker holding it: if that
            # worker died (kill -9), the reconciler's due pass queues it again once the lease has run
            # out, within a second — taken over then, never earlier (worker.claims)
            waits = [d.next_attempt_at if d.status == _RETRYING and d.next_attempt_at
                     else lease_waits.get(d.id) for d in open_]  # fmt: skip
            if all(waits):
                due = min(w for w in waits if w is not None)
                values = (("status", NotificationStatus.retrying), ("due_at", due), ("job_id", None))
            else:
                # Something is held by another live worker: the reconciler looks again after its grace.
                values = (("status", NotificationStatus.queued), ("due_at", now))
        if not open_:
            secret = secret_of(n.template_id)  # (empty for most templates: nothing more to do)
            data = erase(n.data, secret) if secret else None
            if data is not None:
                erased.append({"_id": n.id, **dict(values), "updated_at": now, "data": data})
                continue
        same[values].append(n.id)
    if done:
        same[_DONE].extend(done)
    conn = session.connection()
    for values, ids in same.items():
        update_where_in(conn, _N, {**dict(values), "updated_at": now}, "id", ids)
    if erased:
        session.execute(_SETTLE_ERASED, erased)


_DONE = (("status", NotificationStatus.done), ("reason", None))  # all final, not all suppressed

_SETTLE_ERASED = (
    update(_N)
    .where(_N.c.id == bindparam("_id"))
    .values(
        status=bindparam("status"),
        reason=bindparam("reason"),
        updated_at=bindparam("updated_at"),
        data=bindparam("data", type_=_N.c.data.type),
    )
)
