"""Twilio's webhooks: ``X-Twilio-Signature`` verification, status callbacks and inbound SMS keywords.

- Every request is checked with twilio's own ``RequestValidator`` against the URL Twilio requested
  (:func:`signed_url`: the public URL when configured, + path + query) over every value of the
  form, repeated fields included; only then is the form believed (a repeated field is refused).
- Status callbacks (``MessageStatus``) map to delivery events, matched back by the ``MessageSid``
  the client (:mod:`.client`) recorded and the ``delivery_id`` it puts in the callback URL; error
  21610 (the recipient replied STOP) records the carrier-level SMS opt-out.
- Inbound SMS: STOP/STOPALL/UNSUBSCRIBE/CANCEL/END/QUIT → ``stop``, START/YES/UNSTOP → ``start``,
  HELP/INFO → ``help`` (:func:`keyword_action`); answers are TwiML (:func:`twiml`).

Refusals are :class:`ApiError` (401 unsigned, 403 bad signature or no token, 400 malformed).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

from notifyctl.errors import ApiError
from notifyctl.inbound import Event
from worker.providers.twilio.client import CALLBACK_PARAM, STOP_CODE

OPT_OUT_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
OPT_IN_WORDS = frozenset({"START", "YES", "UNSTOP"})
HELP_WORDS = frozenset({"HELP", "INFO"})

_STATUS = {
    "sent": "sent",
    "delivered": "delivered",
    "read": "opened",
    "failed": "failed",
    "undelivered": "failed",
}


def signed_url(public_url: str | None, scheme: str, host: str, path: str, query: str) -> str:
    """The URL Twilio requested (and signed): the public URL when configured, else the request's own."""
    base = public_url.rstrip("/") + path if public_url else f"{scheme}://{host}{path}"
    return f"{base}?{query}" if query else base


class _MultiForm(dict[str, list[str]]):
    """A form with every value of a repeated field, in the shape Twilio's validator reads
    (``getall``, as Flask's MultiDict)."""

    def getall(self, key: str) -> list[str]:
        return self[key]


def verified_form(
    auth_token: str, url: str, body: bytes, signature: str | None, signature_settings: str | None = None
) -> dict[str, str]:
    """The form of a request Twilio signed, or a 400/401/403 ApiError."""
    from twilio import request_validator as rv

    if not auth_token:
        raise ApiError(403, "twilio webhook not configured (set NOTIFY_API_TWILIO_AUTH_TOKEN)")
    if not signature:
        raise ApiError(401, "missing X-Twilio-Signature header")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "malformed form body") from None
    # the signature first, over every value as Twilio signs them (each of a repeated field's
    # values): an unsigned request learns nothing about the form beyond that it is unsigned
    signed = _MultiForm()
    for k, v in pairs:
        signed.setdefault(k, []).append(v)
    get_algo = getattr(rv, "get_signature_algorithm", None)
    kwargs: dict[str, Any] = {}
    if get_algo is not None:
        kwargs["algorithm"] = get_algo(signature_settings)
    if not rv.RequestValidator(auth_token).validate(url, signed, signature, **kwargs):
        raise ApiError(403, "X-Twilio-Signature does not match")
    for k, values in signed.items():
        if len(values) > 1:
            raise ApiError(400, f"repeated form field {k[:40]!r}")
    return {k: values[0] for k, values in signed.items()}


def status_events(params: dict[str, str], query: Any) -> list[Event]:
    """The event of a verified status callback (none for statuses not worth recording); ``query``:
    the callback URL's query parameters (the client put our delivery id there)."""
    delivery_id = query.get(CALLBACK_PARAM)
    sid = params.get("MessageSid") or params.get("SmsSid")
    status = params.get("MessageStatus") or params.get("SmsStatus")
    if not sid or not status:
        raise ApiError(400, "missing MessageSid or MessageStatus")
    mapped = _STATUS.get(status)
    if not mapped:
        return []
    e = Event(
        "twilio",
        status=mapped,
        delivery_id=delivery_id or None,
        provider_message_id=sid,
        address=params.get("To") or None,
        event_id=f"{sid}:{status}",
    )
    if mapped == "failed":
        code = params.get("ErrorCode") or ""
        e.detail = f"{status}" + (f" (error {code})" if code else "")
        if code == str(STOP_CODE):  # the recipient replied STOP: carrier-level opt-out
            e.opt_out = ("sms", "*", "stop_reply")
    return [e]


def inbound(params: dict[str, str]) -> tuple[str, str, str]:
    """(sender, MessageSid, keyword) of a verified inbound SMS."""
    sender = params.get("From")
    sid = params.get("MessageSid") or params.get("SmsSid")
    if not sender or "Body" not in params or not sid:
        raise ApiError(400, "missing From, Body or MessageSid")
    if len(sid) > 64 or len(sender) > 32:
        raise ApiError(400, "MessageSid or From too long")
    return sender, sid, keyword(params["Body"])


def keyword(body: str) -> str:
    return re.sub(r"[\s.!]+$", "", body.strip()).upper()


def keyword_action(word: str) -> str | None:
    """``stop``, ``start``, ``help``, or None for a message that is not a keyword."""
    if word in OPT_OUT_WORDS:
        return "stop"
    if word in OPT_IN_WORDS:
        return "start"
    return "help" if word in HELP_WORDS else None


def twiml(message: str | None = None) -> str:
    inner = f"<Message>{escape(message)}</Message>" if message else ""
    return f'<?xml version="1.0" encoding="UTF-8"?><Response>{inner}</Response>'


def mask_phone(phone: str) -> str:
    return phone[:3] + "…" + phone[-2:] if len(phone) > 6 else "…"
