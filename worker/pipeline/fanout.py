"""Stage 2, fan-out: a notification seen for the first time becomes one delivery per channel and
address (``notifyctl.policy.refusal``: opt-outs, address present, SMS consent; then the rate limits,
``worker.ratelimit``), each row in its final state for this batch; a push delivery due now whose
device token has since been replaced follows it to the device's live token
(``follow_replaced_tokens``)."""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

from notifyctl.bulk import rows_where_in
from notifyctl.models import derived_id
from notifyctl.policy import refusal
from worker.pipeline.batch import _D, _D_FIELDS, _FAILED, _QUEUED, _SUPPRESSED, _Batch, _Note
from worker.pipeline.record import _mark, _Updates
from worker.pipeline.render import Renderer
from worker.pipeline.runtime import Runtime, Stats
from worker.ratelimit import Check

log = logging.getLogger("notifyctl.worker")

_PUSH_ROUTES = {"ios": "push.ios", "android": "push.android"}


def _route_addresses(channel: str, user: Any, tokens: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if channel == "push":
        return [(_PUSH_ROUTES.get(platform) or f"push.{platform}", token) for platform, token in tokens]
    if channel == "email":
        return [("email", user.email)] if user.email else []
    if channel == "sms":
        return [("sms", user.phone)] if user.phone else []
    return []


def delivery_id(notification_id: str, channel: str, address: str) -> str:
    """Deterministic: the same notification, channel and address always give the same id, and
    it sorts with its notification's (``derived_id``)."""
    return derived_id("d", notification_id, channel, address)


def fan_out(
    rt: Runtime, batch: _Batch, renderer: Renderer, now: datetime, events: list[dict[str, Any]], stats: Stats
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The new delivery rows of the batch's notifications seen for the first time (each also added
    to ``batch.deliveries``, its event to ``events``), and the same rows by id."""
    new_rows: list[dict[str, Any]] = []
    render = renderer.render

    def add_delivery(n: Any, channel: str, route: str, address: str, status: str, reason: str | None = None) -> None:
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
            "suppressed_at": now if status == _SUPPRESSED else None,
            "failed_at": now if status == _FAILED else None,
        }
        new_rows.append(row)
        events.append(
            {"notification_id": n.id, "delivery_id": row["id"], "status": status, "detail": reason, "at": now}
        )
        if status == _SUPPRESSED:
            stats.suppressed += 1
            stats.by_reason[(reason or "").split(":")[0]] += 1
        elif status == _FAILED:
            stats.failed += 1
        if status != _QUEUED and log.isEnabledFor(logging.INFO):  # an outcome already
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
                add_delivery(n, channel, channel, "-", _SUPPRESSED, "unknown_user")
            continue
        opt_outs = batch.opt_outs.get(user.id)  # (most users have none)
        for channel in n.channels:
            addrs = _route_addresses(channel, user, batch.tokens.get(user.id, []))
            first = addrs[0][1] if addrs else "-"
            route0 = addrs[0][0] if addrs else channel
            no = refusal(channel, n.category, opt_outs, bool(addrs), user.sms_opt_in)
            if no is not None:
                add_delivery(n, channel, route0, first, _SUPPRESSED, no.reason)
            else:
                content = render(n, channel, user)
                if isinstance(content, str):
                    for route, addr in addrs:
                        add_delivery(n, channel, route, addr, _FAILED, content)
                    continue
                checks.append(Check(user.id, channel, n.category, f"{n.id}:{channel}", n.priority == "high"))
                pending.append((n, channel, addrs))
    if checks:
        admitted = rt.limiter.check_many(checks, int(time.time() * 1000))
        for (n, channel, addrs), ok in zip(pending, admitted, strict=True):
            for route, addr in addrs if ok else addrs[:1]:
                if ok:
                    add_delivery(n, channel, route, addr, _QUEUED)
                else:
                    add_delivery(n, channel, route, addr, _SUPPRESSED, f"rate_limited:{channel}")
    # New delivery rows are written once, at the end, in their final state. Their ids are derived
    # from (notification, channel, address), so a crash before that write is harmless: the rerun
    # computes the same ids and finds their Redis send records.
    fresh: dict[str, dict[str, Any]] = {row["id"]: row for row in new_rows}
    stats.created = len(new_rows)
    for row in new_rows:
        batch.deliveries[row["notification_id"]].append(_D(*_D_FIELDS(row)))
    return new_rows, fresh


_REPLACED_HOPS = 16  # as notifyctl.directory.MAX_CHAIN


def follow_replaced_tokens(
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
    known = {r[0]: r for r in rows_where_in(conn, sql, "token", push, "AND replaced_by IS NOT NULL", prepared=True)}
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
                _SUPPRESSED,
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
