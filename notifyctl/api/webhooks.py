"""Provider webhooks: each request is verified before anything in it is believed.

- ``POST /webhooks/sendgrid`` — Signed Event Webhook: ECDSA P-256/SHA-256 over ``timestamp + raw body``
  (headers ``X-Twilio-Email-Event-Webhook-Signature`` / ``-Timestamp``), the public key configured as
  base64 DER (``NOTIFY_API_SENDGRID_PUBLIC_KEY``); timestamps outside ``sendgrid_max_age`` are replays.
  A batch of any size is applied with a fixed number of SQL statements; ``sg_event_id`` dedupes.
- ``POST /webhooks/ses`` — SES events through SNS, verified by :mod:`notifyctl.api.sns` (everything
  that needs no network first, then the certificate from ``SigningCertURL``: pinned, cached or fetched
  within bounds). ``SubscriptionConfirmation``: logged with its SubscribeURL (fetched only with
  ``sns_auto_confirm``).
- ``POST /webhooks/twilio/status`` — status callbacks, ``X-Twilio-Signature`` checked with twilio's
  ``RequestValidator`` against the public URL (``public_url`` + path + query).
- ``POST /webhooks/twilio/inbound`` — inbound SMS: STOP/STOPALL/UNSUBSCRIBE/CANCEL/END/QUIT opt the
  sender's users out of SMS, START/YES/UNSTOP opt them back in, HELP/INFO answers brand + help text (TwiML).

Bodies are read within ``max_body_bytes`` (SendGrid's batches: ``max_webhook_body_bytes``) and parsed
by the project's JSON loader (:mod:`notifyctl.jsonload`). Answers: 200 with a JSON summary (events for
unknown messages are logged and answered 200); 400 malformed, 401 unsigned/stale, 403 bad signature /
topic / certificate URL, 413 too large, 429 too many new SNS certificate URLs; one-line errors. A
request that could not be authenticated never gets a 5xx.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import threading
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from notifyctl.api.limits import LimitedRoute, read_body
from notifyctl.api.sns import FUTURE_SKEW, SnsCertificates, sns_url_ok, verify_sns
from notifyctl.errors import ApiError
from notifyctl.inbound import Event, apply_events, apply_sms_keyword
from notifyctl.jsonload import load_json

if TYPE_CHECKING:
    from notifyctl.api.config import ApiConfig

log = logging.getLogger("notifyctl.webhooks")

router = APIRouter(prefix="/webhooks", tags=["webhooks"], route_class=LimitedRoute)

SG_SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
SG_TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"


def _err(status: int, message: str) -> Exception:
    return ApiError(status, message)


def _config(request: Request) -> ApiConfig:
    return request.app.state.api_config


def sns_certificates(request: Request) -> SnsCertificates:
    """The app's SNS certificate cache (made on first use; one per app, shared by its threads)."""
    state = request.app.state
    certs = getattr(state, "sns_certs", None)
    if certs is None:
        with _STATE_LOCK:
            certs = getattr(state, "sns_certs", None)
            if certs is None:
                certs = state.sns_certs = SnsCertificates()
    return certs


_STATE_LOCK = threading.Lock()


def _summary(provider: str, result: Any) -> JSONResponse:
    return JSONResponse({"ok": True, "provider": provider, **result.to_dict()})


# ============================================================================== SendGrid


def _sendgrid_key(cfg: ApiConfig) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key

    raw = (cfg.sendgrid_public_key or "").strip()
    if not raw:
        raise _err(403, "sendgrid webhook not configured (set NOTIFY_API_SENDGRID_PUBLIC_KEY)")
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
        raise _err(403, "sendgrid webhook key unusable (check NOTIFY_API_SENDGRID_PUBLIC_KEY)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise _err(403, "sendgrid webhook verification key is not an ECDSA key")
    _KEY_CACHE[raw] = key
    return key


_KEY_CACHE: dict[str, Any] = {}


def verify_sendgrid(cfg: ApiConfig, headers: Any, body: bytes, now: float | None = None) -> None:
    """Raise a 401/403 ApiError unless the request carries a fresh, valid SendGrid signature."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = _sendgrid_key(cfg)
    sig_b64 = headers.get(SG_SIGNATURE)
    ts = headers.get(SG_TIMESTAMP)
    if not sig_b64 or not ts:
        raise _err(401, f"missing {SG_SIGNATURE} or {SG_TIMESTAMP} header")
    ts = ts.strip()
    if not ts.isdigit() or len(ts) > 12:
        raise _err(401, f"malformed {SG_TIMESTAMP}")
    now = time.time() if now is None else now
    if int(ts) < now - cfg.sendgrid_max_age or int(ts) > now + FUTURE_SKEW:
        raise _err(401, "stale or future webhook timestamp (replayed request?)")
    try:
        sig = base64.b64decode(sig_b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise _err(401, f"malformed {SG_SIGNATURE}") from None
    try:
        key.verify(sig, ts.encode() + body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise _err(403, "sendgrid signature does not match") from None


_SG_DROPPED_OPT_OUT = (
    ("bounced address", ("email", "*", "hard_bounce")),
    ("unsubscribed address", ("email", "marketing", "unsubscribe")),
    ("spam reporting address", ("email", "marketing", "complaint")),
)


def sendgrid_events(items: list[Any]) -> list[Event]:
    out: list[Event] = []
    for i, ev in enumerate(items):
        if not isinstance(ev, dict):
            raise _err(400, f"event {i}: expected a JSON object")
        kind = ev.get("event")
        if not isinstance(kind, str):
            raise _err(400, f"event {i}: missing 'event'")
        sg_mid = ev.get("sg_message_id")
        pmid = sg_mid.split(".", 1)[0] if isinstance(sg_mid, str) and sg_mid else None
        did = ev.get("delivery_id")
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
            for needle, opt in _SG_DROPPED_OPT_OUT:
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


@router.post("/sendgrid", summary="SendGrid Signed Event Webhook")
async def sendgrid_webhook(request: Request) -> JSONResponse:
    cfg = _config(request)
    body = await read_body(request, cfg.max_webhook_body_bytes)
    verify_sendgrid(cfg, request.headers, body)  # the raw bytes are what SendGrid signed: nothing parsed before
    items = load_json(body, "body")
    if not isinstance(items, list):
        raise _err(400, "expected a JSON array of events")
    events = sendgrid_events(items)
    result = await run_in_threadpool(apply_events, request.app.state.ctx, events)
    result.received = len(items)
    return _summary("sendgrid", result)


# ============================================================================== SES via SNS


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def ses_events(record: dict[str, Any], sns_message_id: str) -> list[Event]:
    kind = record.get("eventType") or record.get("notificationType")
    mail = record.get("mail")
    if not isinstance(kind, str) or not isinstance(mail, dict):
        raise _err(400, "SES record lacks eventType/notificationType or mail")
    mid = mail.get("messageId") if isinstance(mail.get("messageId"), str) else None
    tags = mail.get("tags") if isinstance(mail.get("tags"), dict) else {}
    tag = tags.get("delivery_id")
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
        b = record.get("bounce") if isinstance(record.get("bounce"), dict) else {}
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
        c = record.get("complaint") if isinstance(record.get("complaint"), dict) else {}
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


@router.post("/ses", summary="Amazon SES events through SNS")
async def ses_webhook(request: Request) -> JSONResponse:
    cfg = _config(request)
    msg = load_json(await request.body(), "body")  # the signature is inside: the JSON must be read first
    if not isinstance(msg, dict):
        raise _err(400, "expected an SNS message (JSON object)")
    header_type = request.headers.get("x-amz-sns-message-type")
    if header_type and header_type != msg.get("Type"):
        raise _err(400, "x-amz-sns-message-type does not match the message Type")
    await run_in_threadpool(verify_sns, cfg, sns_certificates(request), msg)
    kind = msg["Type"]
    if kind == "SubscriptionConfirmation":
        url = msg.get("SubscribeURL", "")
        log.warning("SNS subscription confirmation for %s: confirm by visiting %s", msg["TopicArn"], url)
        confirmed = False
        if cfg.sns_auto_confirm and sns_url_ok(url):
            confirmed = await run_in_threadpool(_confirm, url)
        return JSONResponse({"ok": True, "subscription": "confirmed" if confirmed else "pending"})
    if kind == "UnsubscribeConfirmation":
        log.warning("SNS unsubscribe confirmation for %s", msg["TopicArn"])
        return JSONResponse({"ok": True})
    record = load_json(msg["Message"], "SES record")
    if not isinstance(record, dict):
        raise _err(400, "SNS Message is not a JSON SES record")
    events = ses_events(record, msg["MessageId"])
    result = await run_in_threadpool(apply_events, request.app.state.ctx, events)
    return _summary("ses", result)


def _confirm(url: str) -> bool:
    import httpx

    try:
        httpx.get(url, timeout=5.0, follow_redirects=False).raise_for_status()
        return True
    except httpx.HTTPError as exc:
        log.warning("SNS subscription confirmation failed: %s", type(exc).__name__)
        return False


# ============================================================================== Twilio


def _twilio_token(cfg: ApiConfig) -> str:
    token = cfg.twilio_auth_token.get_secret_value() if cfg.twilio_auth_token else ""
    if not token:
        raise _err(403, "twilio webhook not configured (set NOTIFY_API_TWILIO_AUTH_TOKEN)")
    return token


def twilio_url(cfg: ApiConfig, request: Request) -> str:
    """The URL Twilio requested (and signed): the public URL when configured, else the request's own."""
    query = request.url.query
    if cfg.public_url:
        base = cfg.public_url.rstrip("/") + request.url.path
    else:
        base = f"{request.url.scheme}://{request.headers.get('host') or request.url.netloc}{request.url.path}"
    return f"{base}?{query}" if query else base


class _MultiForm(dict[str, list[str]]):
    """A form with every value of a repeated field, in the shape Twilio's validator reads
    (``getall``, as Flask's MultiDict)."""

    def getall(self, key: str) -> list[str]:
        return self[key]


async def _twilio_params(request: Request) -> dict[str, str]:
    from twilio import request_validator as rv

    cfg = _config(request)
    token = _twilio_token(cfg)
    body = await request.body()
    signature = request.headers.get("x-twilio-signature")
    if not signature:
        raise _err(401, "missing X-Twilio-Signature header")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise _err(400, "malformed form body") from None
    # the signature first, over every value as Twilio signs them (each of a repeated field's
    # values): an unsigned request learns nothing about the form beyond that it is unsigned
    signed = _MultiForm()
    for k, v in pairs:
        signed.setdefault(k, []).append(v)
    get_algo = getattr(rv, "get_signature_algorithm", None)
    kwargs: dict[str, Any] = {}
    if get_algo is not None:
        kwargs["algorithm"] = get_algo(request.headers.get("x-twilio-webhooks-signature-settings"))
    if not rv.RequestValidator(token).validate(twilio_url(cfg, request), signed, signature, **kwargs):
        raise _err(403, "X-Twilio-Signature does not match")
    for k, values in signed.items():
        if len(values) > 1:
            raise _err(400, f"repeated form field {k[:40]!r}")
    return {k: values[0] for k, values in signed.items()}


_TWILIO_STATUS = {
    "sent": "sent",
    "delivered": "delivered",
    "read": "opened",
    "failed": "failed",
    "undelivered": "failed",
}


@router.post("/twilio/status", summary="Twilio message status callback")
async def twilio_status(request: Request) -> JSONResponse:
    params = await _twilio_params(request)
    sid = params.get("MessageSid") or params.get("SmsSid")
    status = params.get("MessageStatus") or params.get("SmsStatus")
    if not sid or not status:
        raise _err(400, "missing MessageSid or MessageStatus")
    mapped = _TWILIO_STATUS.get(status)
    events: list[Event] = []
    if mapped:
        code = params.get("ErrorCode") or ""
        e = Event(
            "twilio",
            status=mapped,
            delivery_id=request.query_params.get("delivery_id") or None,
            provider_message_id=sid,
            address=params.get("To") or None,
            event_id=f"{sid}:{status}",
        )
        if mapped == "failed":
            e.detail = f"{status}" + (f" (error {code})" if code else "")
            if code == "21610":  # the recipient replied STOP: carrier-level opt-out
                e.opt_out = ("sms", "*", "stop_reply")
        events.append(e)
    result = await run_in_threadpool(apply_events, request.app.state.ctx, events)
    result.received = 1
    return _summary("twilio", result)


OPT_OUT_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
OPT_IN_WORDS = frozenset({"START", "YES", "UNSTOP"})
HELP_WORDS = frozenset({"HELP", "INFO"})


def keyword(body: str) -> str:
    return re.sub(r"[\s.!]+$", "", body.strip()).upper()


def _twiml(message: str | None = None) -> Response:
    inner = f"<Message>{escape(message)}</Message>" if message else ""
    return Response(f'<?xml version="1.0" encoding="UTF-8"?><Response>{inner}</Response>', media_type="application/xml")


@router.post("/twilio/inbound", summary="Twilio inbound SMS (STOP / START / HELP)")
async def twilio_inbound(request: Request) -> Response:
    params = await _twilio_params(request)
    sender = params.get("From")
    sid = params.get("MessageSid") or params.get("SmsSid")
    if not sender or "Body" not in params or not sid:
        raise _err(400, "missing From, Body or MessageSid")
    if len(sid) > 64 or len(sender) > 32:
        raise _err(400, "MessageSid or From too long")
    word = keyword(params["Body"])
    action = (
        "stop" if word in OPT_OUT_WORDS else "start" if word in OPT_IN_WORDS else "help" if word in HELP_WORDS else None
    )
    if action is None:
        return _twiml()  # not a keyword: nothing to do, nothing to remember
    res = await run_in_threadpool(apply_sms_keyword, request.app.state.ctx, sid, sender, action)
    if not res.fresh:
        log.info("SMS %s from %s (%s) already handled: ignored", word, _mask_phone(sender), sid[:40])
        return _twiml()  # answered when it first came; a replay changes nothing and says nothing
    if action == "help":
        cfg = _config(request)
        return _twiml(f"{cfg.brand}: {cfg.help_text}")
    log.info("SMS %s from %s: %d user(s), %d SMS opt-out(s) changed", word, _mask_phone(sender), res.users, res.changed)
    return _twiml()


def _mask_phone(phone: str) -> str:
    return phone[:3] + "…" + phone[-2:] if len(phone) > 6 else "…"
