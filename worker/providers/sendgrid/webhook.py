"""SendGrid's Signed Event Webhook: verifying a request and turning its events into :class:`Event` values.

Verification: ECDSA P-256/SHA-256 over ``timestamp + raw body`` (headers
``X-Twilio-Email-Event-Webhook-Signature`` / ``-Timestamp``) with the public key configured as base64
DER (or PEM); timestamps older than ``max_age`` or ahead by more than ``FUTURE_SKEW`` are replays.
Events are matched back by the ``custom_args`` the client (:mod:`.client`) puts in every
personalization (``delivery_id``) or by ``sg_message_id``, whose first part is the ``X-Message-Id``
the client recorded as the provider message id; ``sg_event_id`` dedupes.

Refusals are :class:`ApiError` (401 unsigned/stale, 403 bad signature or no usable key, 400 malformed):
the HTTP route (``notifyctl.api.webhooks``) only reads the body and dispatches here.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from typing import Any

from notifyctl.errors import ApiError
from notifyctl.inbound import Event
from worker.providers.sendgrid.client import DELIVERY_ARG

log = logging.getLogger("notifyctl.webhooks")

SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"
FUTURE_SKEW = 300  # seconds a signed timestamp may be ahead of our clock

_KEY_CACHE: dict[str, Any] = {}


def _public_key(raw: str | None) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key

    raw = (raw or "").strip()
    if not raw:
        raise ApiError(403, "sendgrid webhook not configured (set NOTIFY_API_SENDGRID_PUBLIC_KEY)")
    cached = _KEY_CACHE.get(raw)
    if cached is not None:
        return cached
    try:
        if raw.startswith("-----BEGIN"):
            key = load_pem_public_key(raw.encode())
        else:
            key = load_der_public_key(base64.b64decode(raw, validate=False))
    except (ValueError, binascii.Error, TypeError):
        log.error("sendgrid_public_key is not a base64 DER (or PEM) public key")
        raise ApiError(403, "sendgrid webhook key unusable (check NOTIFY_API_SENDGRID_PUBLIC_KEY)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ApiError(403, "sendgrid webhook verification key is not an ECDSA key")
    _KEY_CACHE[raw] = key
    return key


def verify(public_key: str | None, max_age: float, headers: Any, body: bytes, now: float | None = None) -> None:
    """Raise a 401/403 ApiError unless the request carries a fresh, valid SendGrid signature."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = _public_key(public_key)
    sig_b64 = headers.get(SIGNATURE)
    ts = headers.get(TIMESTAMP)
    if not sig_b64 or not ts:
        raise ApiError(401, f"missing {SIGNATURE} or {TIMESTAMP} header")
    ts = ts.strip()
    if not ts.isdigit() or len(ts) > 12:
        raise ApiError(401, f"malformed {TIMESTAMP}")
    now = time.time() if now is None else now
    if int(ts) < now - max_age or int(ts) > now + FUTURE_SKEW:
        raise ApiError(401, "stale or future webhook timestamp (replayed request?)")
    try:
        sig = base64.b64decode(sig_b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(401, f"malformed {SIGNATURE}") from None
    try:
        key.verify(sig, ts.encode() + body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ApiError(403, "sendgrid signature does not match") from None


_DROPPED_OPT_OUT = (
    ("bounced address", ("email", "*", "hard_bounce")),
    ("unsubscribed address", ("email", "marketing", "unsubscribe")),
    ("spam reporting address", ("email", "marketing", "complaint")),
)


def events(items: Any) -> list[Event]:
    """The events of a verified request's parsed body (a JSON array), those worth recording."""
    if not isinstance(items, list):
        raise ApiError(400, "expected a JSON array of events")
    out: list[Event] = []
    for i, ev in enumerate(items):
        if not isinstance(ev, dict):
            raise ApiError(400, f"event {i}: expected a JSON object")
        kind = ev.get("event")
        if not isinstance(kind, str):
            raise ApiError(400, f"event {i}: missing 'event'")
        sg_mid = ev.get("sg_message_id")
        pmid = sg_mid.split(".", 1)[0] if isinstance(sg_mid, str) and sg_mid else None
        did = ev.get(DELIVERY_ARG)
        email = ev.get("email") if isinstance(ev.get("email"), str) else None
        eid = ev.get("sg_event_id")
        e = Event(
            "sendgrid",
            delivery_id=did if isinstance(did, str) and did else None,
            provider_message_id=pmid,
            address=email,
            event_id=str(eid) if isinstance(eid, str | int) and eid != "" else None,
        )
        reason = str(ev.get("reason") or ev.get("response") or "")[:300]
        if kind == "delivered":
            e.status = "delivered"
        elif kind == "open":
            e.status = "opened"
        elif kind == "bounce":
            e.status = "failed"
            btype = str(ev.get("type") or "bounce")
            e.detail = f"{btype}: {reason}".strip(": ")
            if btype == "bounce":  # "blocked" is a temporary refusal, not a dead address
                e.opt_out = ("email", "*", "hard_bounce")
        elif kind == "dropped":
            e.status = "failed"
            e.detail = f"dropped: {reason}".strip(": ")
            low = reason.lower()
            for needle, opt in _DROPPED_OPT_OUT:
                if needle in low:
                    e.opt_out = opt
                    break
        elif kind == "spamreport":
            e.opt_out = ("email", "marketing", "complaint")
        elif kind == "unsubscribe":
            e.opt_out = ("email", "marketing", "unsubscribe")
        elif kind == "group_unsubscribe":
            e.opt_out = ("email", "marketing", "group_unsubscribe")
        else:  # processed, deferred, click, group_resubscribe: nothing to record
            continue
        out.append(e)
    return out
