"""One module: what comes back after a send (provider events, opt-outs, SMS keywords, unsubscribes,
signed opens) all lands on the deliveries and opt-outs written here; ~420 lines.

What providers and recipients tell us after a send: status events and opt-outs.

Webhook handlers (``notifyctl.api.webhooks``) verify a request, turn it into :class:`Event` values and
hand a whole batch to :func:`apply_events`, which:

- drops events already applied (provider event ids remembered in Redis, one pipelined round trip);
- finds the deliveries in one query: by our ``delivery_id`` (a custom arg / tag / callback parameter)
  or by the provider's message id (SendGrid shares one id across the personalizations of a request,
  so the recipient address picks the right one);
- moves each delivery forward only (``STATUS_RANK``; a late ``delivered`` never overwrites
  ``opened``; a provider-reported failure may follow ``sent``), with one timeline row per step;
- upserts the opt-outs (hard bounce, complaint, unsubscribe, STOP) for the delivery's user and for
  any user holding the reported address.

The statement count per batch is fixed (a select, a bulk update, a bulk insert, a users lookup, an
upsert), whatever the number of events, so a provider burst of thousands of events is one short
transaction. Applying the same event twice changes nothing.

Also here: signed email-open pixel tokens (``/o/<token>.gif``) and the one-click unsubscribe action.
"""

from __future__ import annotations

import base64
import hmac
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlmodel import Session, col

from notifyctl import keys
from notifyctl.db import write_lock
from notifyctl.directory import upsert
from notifyctl.errors import InputError
from notifyctl.models import STATUS_RANK, Delivery, DeliveryEvent, DeliveryStatus, OptOut, SmsKeyword, User, utcnow
from notifyctl.signing import b64url, signer

log = logging.getLogger("notifyctl.inbound")

EVENT_SEEN_TTL = 3 * 86400  # providers retry for up to 24 h (SendGrid), 1 h (SNS)
_CHUNK = 5000  # ids per IN (...) list; far below SQLite's and PostgreSQL's parameter limits
_TRACKED = ("sent", "delivered", "opened", "failed")
_TIMESTAMP = {"sent": "sent_at", "delivered": "delivered_at", "opened": "opened_at", "failed": "failed_at"}
_MAX_LOGGED_UNKNOWN = 10


@dataclass(slots=True)
class Event:
    """One fact from a provider (or the app, or a pixel), already verified."""

    provider: str
    status: str | None = None  # sent | delivered | opened | failed; None = an opt-out only
    delivery_id: str | None = None
    provider_message_id: str | None = None
    address: str | None = None  # recipient email or E.164 phone
    event_id: str | None = None  # provider's unique event id, for dedupe
    detail: str | None = None  # failure reason or timeline detail
    opt_out: tuple[str, str, str] | None = None  # (channel, category, reason) for the recipient


@dataclass
class ApplyResult:
    received: int = 0
    duplicates: int = 0
    unmatched: int = 0
    transitions: int = 0
    opt_outs: int = 0
    unknown: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "duplicates": self.duplicates,
            "unmatched": self.unmatched,
            "transitions": self.transitions,
            "opt_outs": self.opt_outs,
        }


def _chunks(items: Sequence[Any], n: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def allowed(current: str, new: str) -> bool:
    """Forward-only: a higher rank, or a provider-reported failure after ``sent``."""
    if new not in _TRACKED or current == DeliveryStatus.suppressed:
        return False
    if current == DeliveryStatus.sent and new == DeliveryStatus.failed:
        return True
    return STATUS_RANK.get(new, -1) > STATUS_RANK.get(current, 99)


def _order(status: str) -> tuple[int, int]:
    return (STATUS_RANK.get(status, 0), 1 if status == "failed" else 0)


def _clip(text: str | None, n: int) -> str | None:
    if text is None:
        return None
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def apply_events(ctx: Any, events: Sequence[Event], now: datetime | None = None) -> ApplyResult:
    """Apply a verified batch; see the module docstring. Safe to call again with the same events."""
    now = now or utcnow()
    result = ApplyResult(received=len(events))
    if not events:
        return result

    # 1. Dedupe on provider event ids (Redis first; within the batch too).
    r = ctx.redis
    keyed = [(i, keys.webhook_seen(e.provider, e.event_id)) for i, e in enumerate(events) if e.event_id]
    seen: set[str] = set()
    if keyed:
        pipe = r.pipeline(transaction=False)
        for _, k in keyed:
            pipe.exists(k)
        seen = {k for (_, k), hit in zip(keyed, pipe.execute(), strict=True) if hit}
    fresh: list[Event] = []
    batch_keys: set[str] = set()
    for e in events:
        if e.event_id:
            k = keys.webhook_seen(e.provider, e.event_id)
            if k in seen or k in batch_keys:
                result.duplicates += 1
                continue
            batch_keys.add(k)
        fresh.append(e)

    with Session(ctx.engine) as session:
        # 2. Find the deliveries.
        ids = sorted({e.delivery_id for e in fresh if e.delivery_id})
        pmids = sorted({e.provider_message_id for e in fresh if e.provider_message_id})
        found: dict[str, Delivery] = {}
        locking = session.get_bind().dialect.name == "postgresql"
        for part_ids, part_pm in _paired_chunks(ids, pmids):
            conds = []
            if part_ids:
                conds.append(col(Delivery.id).in_(part_ids))
            if part_pm:
                conds.append(col(Delivery.provider_message_id).in_(part_pm))
            q = select(Delivery).where(or_(*conds))
            if locking:
                q = q.with_for_update()
            for hit in session.scalars(q):
                found[hit.id] = hit
        by_pm: dict[str, list[Delivery]] = defaultdict(list)
        for hit in found.values():
            if hit.provider_message_id:
                by_pm[hit.provider_message_id].append(hit)

        steps: dict[str, list[Event]] = defaultdict(list)
        opt_rows: dict[tuple[str, str, str], str] = {}
        addr_opts: list[tuple[str, Event]] = []
        for e in fresh:
            d = _match(e, found, by_pm)
            if d is None:
                if e.status:
                    result.unmatched += 1
                    if len(result.unknown) < _MAX_LOGGED_UNKNOWN:
                        result.unknown.append(e.provider_message_id or e.delivery_id or "?")
            elif e.status:
                steps[d.id].append(e)
            if e.opt_out:
                ch, cat, reason = e.opt_out
                if d is not None:
                    opt_rows[(d.user_id, ch, cat)] = reason
                if e.address:
                    addr_opts.append((e.address, e))

        # 3. Forward-only transitions.
        updates: list[dict[str, Any]] = []
        timeline: list[dict[str, Any]] = []
        for did, evs in steps.items():
            d = found[did]
            current = d.status
            row: dict[str, Any] = {"id": d.id}
            for e in sorted(evs, key=lambda ev: _order(ev.status or "")):
                status = e.status or ""
                if not allowed(current, status):
                    continue
                current = status
                row["status"] = status
                row[_TIMESTAMP[status]] = now
                if status == DeliveryStatus.failed:
                    row["reason"] = _clip(f"{e.provider}: {e.detail or 'failed'}", 512)
                timeline.append(
                    {
                        "notification_id": d.notification_id,
                        "delivery_id": d.id,
                        "status": status,
                        "detail": _clip(f"{e.provider}: {e.detail}" if e.detail else e.provider, 1024),
                        "at": now,
                    }
                )
            if "status" in row:
                row["updated_at"] = now
                updates.append(row)
        if updates:
            session.execute(update(Delivery), updates)
            result.transitions = len(timeline)
        if timeline:
            session.execute(DeliveryEvent.__table__.insert(), timeline)  # type: ignore[attr-defined]

        # 4. Opt-outs: the delivery's user, and every user holding the reported address.
        if addr_opts:
            emails = sorted({a.strip().lower() for a, e in addr_opts if e.opt_out and e.opt_out[0] == "email"})
            phones = sorted({a.strip() for a, e in addr_opts if e.opt_out and e.opt_out[0] == "sms"})
            owners_email: dict[str, list[str]] = defaultdict(list)
            owners_phone: dict[str, list[str]] = defaultdict(list)
            for part in _chunks(emails):
                q = select(col(User.id), func.lower(col(User.email))).where(func.lower(col(User.email)).in_(part))
                for uid, em in session.execute(q).tuples().all():
                    owners_email[em].append(uid)
            for part in _chunks(phones):
                for uid, ph in (
                    session.execute(select(col(User.id), col(User.phone)).where(col(User.phone).in_(part)))
                    .tuples()
                    .all()
                ):
                    owners_phone[ph].append(uid)
            for addr, e in addr_opts:
                ch, cat, reason = e.opt_out  # type: ignore[misc]
                owners = owners_email if ch == "email" else owners_phone
                for uid in owners.get(addr.strip().lower() if ch == "email" else addr.strip(), []):
                    opt_rows[(uid, ch, cat)] = reason
        if opt_rows:
            upsert(
                session,
                OptOut,
                [
                    {"user_id": u, "channel": c, "category": k, "reason": reason, "created_at": now}
                    for (u, c, k), reason in opt_rows.items()
                ],
                ["user_id", "channel", "category"],
                ["reason"],
            )
            result.opt_outs = len(opt_rows)
        session.commit()

    # 5. Remember the applied event ids (after the commit: a failed commit lets the provider retry).
    if batch_keys:
        pipe = r.pipeline(transaction=False)
        for k in batch_keys:
            pipe.set(k, 1, ex=EVENT_SEEN_TTL)
        pipe.execute()
    if result.unmatched:
        log.info(
            "%d event(s) for unknown messages (ignored), e.g. %s",
            result.unmatched,
            ", ".join(result.unknown),
        )
    return result


def _paired_chunks(ids: list[str], pmids: list[str]) -> Iterable[tuple[Sequence[str], Sequence[str]]]:
    n = max(len(ids), len(pmids))
    if n == 0:
        return
    for i in range(0, n, _CHUNK):
        yield ids[i : i + _CHUNK], pmids[i : i + _CHUNK]


def _match(e: Event, found: dict[str, Delivery], by_pm: dict[str, list[Delivery]]) -> Delivery | None:
    if e.delivery_id:
        d = found.get(e.delivery_id)  # our own id, from a verified request: it wins
        if d is not None:
            return d
    if e.provider_message_id:
        candidates = by_pm.get(e.provider_message_id, [])
        if len(candidates) > 1 and e.address:
            addr = e.address.strip().lower()
            candidates = [d for d in candidates if d.address.strip().lower() == addr]
        if len(candidates) == 1:
            return candidates[0]
    return None


# ------------------------------------------------------------------------------------ opt-outs


def set_opt_out(ctx: Any, user_ids: Iterable[str], channel: str, category: str, reason: str) -> int:
    rows: list[dict[str, Any]] = [
        {"user_id": u, "channel": channel, "category": category, "reason": reason, "created_at": utcnow()}
        for u in dict.fromkeys(user_ids)
    ]
    if not rows:
        return 0
    with Session(ctx.engine) as session:
        upsert(session, OptOut, rows, ["user_id", "channel", "category"], ["reason"])
        session.commit()
    return len(rows)


KEYWORDS_KEPT = 50  # keyword SIDs remembered per phone number (a person sends a handful in a lifetime)


@dataclass
class KeywordResult:
    fresh: bool  # False: this MessageSid was acted on before; nothing changed
    users: int = 0  # users holding the number
    changed: int = 0  # opt-outs set or removed


def apply_sms_keyword(ctx: Any, sid: str, phone: str, action: str) -> KeywordResult:
    """Act once on an inbound SMS keyword (``stop``: opt every user holding ``phone`` out of SMS;
    ``start``: opt them back in; ``help``: nothing to store but the SID).

    One transaction records the SID and changes the opt-outs, so a replayed or retried message
    (same SID) changes nothing, and consent changes for a number apply in the order they are
    received: the users' rows are locked first (PostgreSQL; SQLite has one writer), so of a STOP
    and a START in flight together, the one that commits last is the one that stands."""
    from sqlalchemy.exc import IntegrityError

    with write_lock(ctx.engine, urgent=True), Session(ctx.engine) as session:
        q = select(col(User.id)).where(col(User.phone) == phone).order_by(col(User.id))
        if session.get_bind().dialect.name == "postgresql":
            q = q.with_for_update()
        users = list(session.scalars(q))
        session.add(SmsKeyword(sid=sid, phone=phone, action=action, received_at=utcnow()))
        try:
            session.flush()
        except IntegrityError:
            session.rollback()
            return KeywordResult(fresh=False, users=len(users))
        changed = 0
        if users and action == "stop":
            now = utcnow()
            rows = [
                {"user_id": u, "channel": "sms", "category": "*", "reason": "stop_reply", "created_at": now}
                for u in users
            ]
            upsert(session, OptOut, rows, ["user_id", "channel", "category"], ["reason"])
            changed = len(rows)
        elif users and action == "start":
            res = session.execute(
                delete(OptOut).where(
                    col(OptOut.user_id).in_(users),
                    col(OptOut.channel) == "sms",
                    col(OptOut.category) == "*",
                )
            )
            changed = int(res.rowcount or 0)  # type: ignore[attr-defined]
        kept = (
            select(col(SmsKeyword.sid))
            .where(col(SmsKeyword.phone) == phone)
            .order_by(col(SmsKeyword.received_at).desc())
            .limit(KEYWORDS_KEPT)
        )
        session.execute(delete(SmsKeyword).where(col(SmsKeyword.phone) == phone, col(SmsKeyword.sid).not_in(kept)))
        session.commit()
    return KeywordResult(fresh=True, users=len(users), changed=changed)


def unsubscribe(ctx: Any, user_id: str, scope: str) -> None:
    """One-click unsubscribe from a signed link: email opt-out for the link's scope."""
    set_opt_out(ctx, [user_id], "email", "*" if scope == "all" else scope, "unsubscribe_link")


# ------------------------------------------------------------------------------- open pixel


_B64URL = re.compile(r"[A-Za-z0-9_-]+")  # unpadded base64url: what open_token writes
_MAX_OPEN_TOKEN = 256  # a delivery id is 32 characters


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def open_token_maker(key: bytes) -> Callable[[str], str]:
    """``open_token(key, delivery_id)`` as a function of ``delivery_id``: the keyed HMAC looked up
    once — the one place the token's form is written."""
    sign = signer(key)

    def token(delivery_id: str) -> str:
        did = delivery_id.encode()
        return b64url(did) + "." + b64url(sign(b"open\x00" + did)[:16])

    return token


def open_token(key: bytes, delivery_id: str) -> str:
    """``<delivery id, base64>.<HMAC>``, signed with the installation secret (``unsubscribe.secret_key``)."""
    return open_token_maker(key)(delivery_id)


def verify_open_token(key: bytes, token: str) -> str:
    """The delivery id of a genuine token; InputError ("malformed" / "invalid signature") otherwise.
    Anyone can request any token: whatever the text, this answers one of those three."""
    did_b64, dot, sig = token.partition(".")
    if not dot or len(token) > _MAX_OPEN_TOKEN or not _B64URL.fullmatch(did_b64) or not _B64URL.fullmatch(sig):
        raise InputError("open pixel: malformed")
    try:
        delivery_id = _unb64(did_b64).decode()
    except (ValueError, UnicodeDecodeError):
        raise InputError("open pixel: malformed") from None
    if not delivery_id or not hmac.compare_digest(sig, open_token(key, delivery_id).rpartition(".")[2]):
        raise InputError("open pixel: invalid signature")
    return delivery_id


def pixel_url(settings: Any, key: bytes, delivery_id: str) -> str | None:
    """The tracking pixel URL for an email delivery, or None when no public URL is configured."""
    url = pixel_maker(settings, key)
    return url(delivery_id) if url else None


def pixel_maker(settings: Any, key: bytes) -> Callable[[str], str] | None:
    """``pixel_url(settings, key, delivery_id)`` as a function of ``delivery_id``, for a batch: the
    base URL and ``open_token_maker`` worked out once. None when no public URL is configured."""
    base = getattr(settings, "public_url", None)
    if not base:
        return None
    head, token = f"{base.rstrip('/')}/o/", open_token_maker(key)

    def url(delivery_id: str) -> str:
        return head + token(delivery_id) + ".gif"

    return url
