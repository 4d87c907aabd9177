"""SES events through SNS: the envelope, its verification, and the SES records' mapping to :class:`Event`.

An SNS message is read (JSON; its signature is inside, so it must be parsed first), verified by
:mod:`.sns_signature` (everything that needs no network first, then the certificate from
``SigningCertURL``: pinned, cached or fetched within bounds), and then either answered as a
subscription control message (``SubscriptionConfirmation``: logged with its SubscribeURL, fetched
only with ``auto_confirm``) or read as an SES event record. Records are matched back by the
``delivery_id`` tag the client (:mod:`.client`, :mod:`.bulk`) puts on every message, or by the SES
``MessageId`` it recorded; the SNS ``MessageId`` (plus the recipient's position) dedupes.

Refusals are :class:`ApiError` (400 malformed, 401/403/429 from verification).
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from notifyctl.errors import ApiError
from notifyctl.inbound import Event
from notifyctl.jsonload import load_json
from worker.providers.ses.client import DELIVERY_TAG
from worker.providers.ses.sns_signature import sns_url_ok

log = logging.getLogger("notifyctl.webhooks")


def envelope(body: bytes, header_type: str | None) -> dict[str, Any]:
    """The SNS message of a request body (not yet verified)."""
    msg = load_json(body, "body")
    if not isinstance(msg, dict):
        raise ApiError(400, "expected an SNS message (JSON object)")
    if header_type and header_type != msg.get("Type"):
        raise ApiError(400, "x-amz-sns-message-type does not match the message Type")
    return msg


def control_answer(msg: dict[str, Any], auto_confirm: bool) -> dict[str, Any] | None:
    """The answer to a verified subscription control message (blocking: may fetch the SubscribeURL),
    or None for a notification, whose events :func:`events` reads."""
    kind = msg["Type"]
    if kind == "SubscriptionConfirmation":
        url = msg.get("SubscribeURL", "")
        log.warning("SNS subscription confirmation for %s: confirm by visiting %s", msg["TopicArn"], url)
        confirmed = auto_confirm and sns_url_ok(url) and _confirm(url)
        return {"ok": True, "subscription": "confirmed" if confirmed else "pending"}
    if kind == "UnsubscribeConfirmation":
        log.warning("SNS unsubscribe confirmation for %s", msg["TopicArn"])
        return {"ok": True}
    return None


def _confirm(url: str) -> bool:
    try:
        httpx.get(url, timeout=5.0, follow_redirects=False).raise_for_status()
        return True
    except httpx.HTTPError as exc:
        log.warning("SNS subscription confirmation failed: %s", type(exc).__name__)
        return False


def events(msg: dict[str, Any]) -> list[Event]:
    """The events of a verified SNS notification carrying an SES event record."""
    record = load_json(msg["Message"], "SES record")
    if not isinstance(record, dict):
        raise ApiError(400, "SNS Message is not a JSON SES record")
    return record_events(record, msg["MessageId"])


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def record_events(record: dict[str, Any], sns_message_id: str) -> list[Event]:
    """One SES event record (event publishing v2 ``eventType`` or v1 ``notificationType``) → events."""
    kind = record.get("eventType") or record.get("notificationType")
    mail = record.get("mail")
    if not isinstance(kind, str) or not isinstance(mail, dict):
        raise ApiError(400, "SES record lacks eventType/notificationType or mail")
    mid = mail.get("messageId") if isinstance(mail.get("messageId"), str) else None
    tags = _dict(mail.get("tags"))
    tag = tags.get(DELIVERY_TAG)
    did = tag[0] if isinstance(tag, list) and tag and isinstance(tag[0], str) else None
    dests = [d for d in _list(mail.get("destination")) if isinstance(d, str)]

    def ev(n: int, **kw: Any) -> Event:
        return Event("ses", delivery_id=did, provider_message_id=mid, event_id=f"{sns_message_id}:{n}", **kw)

    if kind == "Delivery":
        return [ev(0, status="delivered", address=dests[0] if dests else None)]
    if kind == "Open":
        return [ev(0, status="opened", address=dests[0] if dests else None)]
    if kind in ("Reject", "Rendering Failure", "RenderingFailure"):
        return [ev(0, status="failed", detail=kind.lower())]
    if kind == "Bounce":
        b = _dict(record.get("bounce"))
        btype = str(b.get("bounceType") or "Undetermined")
        sub = str(b.get("bounceSubType") or "")
        recips = [r for r in _list(b.get("bouncedRecipients")) if isinstance(r, dict)]
        out = []
        for n, r in enumerate(recips or [{}]):
            diag = str(r.get("diagnosticCode") or r.get("status") or "")[:300]
            out.append(
                ev(
                    n,
                    status="failed",
                    address=r.get("emailAddress") if isinstance(r.get("emailAddress"), str) else None,
                    detail=f"bounce {btype}/{sub}: {diag}".rstrip(": "),
                    opt_out=("email", "*", "hard_bounce") if btype == "Permanent" else None,
                )
            )
        return out
    if kind == "Complaint":
        c = _dict(record.get("complaint"))
        if c.get("complaintFeedbackType") == "not-spam":
            return []
        recips = [r for r in _list(c.get("complainedRecipients")) if isinstance(r, dict)]
        # CAN-SPAM: a complaint is a request to stop commercial mail; transactional mail still flows.
        return [
            ev(
                n,
                address=r.get("emailAddress") if isinstance(r.get("emailAddress"), str) else None,
                opt_out=("email", "marketing", "complaint"),
            )
            for n, r in enumerate(recips or [{"emailAddress": dests[0] if dests else None}])
        ]
    return []  # Send, DeliveryDelay, Click, Subscription: nothing to record
