"""Provider webhooks: the HTTP routes, each reading the request within bounds and dispatching to its
vendor's package, which verifies it before anything in it is believed and maps it to events
(``notifyctl.inbound.Event``, applied by :func:`notifyctl.inbound.apply_events`):

- ``POST /webhooks/sendgrid`` → :mod:`worker.providers.sendgrid.webhook` (Signed Event Webhook;
  ``NOTIFY_API_SENDGRID_PUBLIC_KEY``, replay window ``sendgrid_max_age``). A batch of any size is
  applied with a fixed number of SQL statements; ``sg_event_id`` dedupes.
- ``POST /webhooks/ses`` → :mod:`worker.providers.ses.webhook` (SES events through SNS, verified by
  :mod:`worker.providers.ses.sns_signature`; the app keeps one certificate cache).
  ``SubscriptionConfirmation``: logged with its SubscribeURL (fetched only with ``sns_auto_confirm``).
- ``POST /webhooks/twilio/status`` and ``/webhooks/twilio/inbound`` → :mod:`worker.providers.twilio.webhook`
  (``X-Twilio-Signature`` against the public URL; status callbacks; STOP/START/HELP, answered in TwiML).

The vendor code lives with the vendor's client (one place per vendor, issue 16): the API imports it
downwards; nothing below the API imports this module.

Bodies are read within ``max_body_bytes`` (SendGrid's batches: ``max_webhook_body_bytes``) and parsed
by the project's JSON loader (:mod:`notifyctl.jsonload`). Answers: 200 with a JSON summary (events for
unknown messages are logged and answered 200); 400 malformed, 401 unsigned/stale, 403 bad signature /
topic / certificate URL, 413 too large, 429 too many new SNS certificate URLs; one-line errors. A
request that could not be authenticated never gets a 5xx.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from notifyctl.api.limits import LimitedRoute, read_body
from notifyctl.inbound import apply_events, apply_sms_keyword
from notifyctl.jsonload import load_json
from worker.providers.sendgrid import webhook as sendgrid
from worker.providers.ses import webhook as ses
from worker.providers.ses.sns_signature import SnsCertificates, verify_sns
from worker.providers.twilio import webhook as twilio

if TYPE_CHECKING:
    from notifyctl.api.config import ApiConfig

log = logging.getLogger("notifyctl.webhooks")

router = APIRouter(prefix="/webhooks", tags=["webhooks"], route_class=LimitedRoute)


def _config(request: Request) -> ApiConfig:
    config: ApiConfig = request.app.state.api_config
    return config


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


@router.post("/sendgrid", summary="SendGrid Signed Event Webhook")
async def sendgrid_webhook(request: Request) -> JSONResponse:
    cfg = _config(request)
    body = await read_body(request, cfg.max_webhook_body_bytes)
    # the raw bytes are what SendGrid signed: nothing parsed before
    sendgrid.verify(cfg.sendgrid_public_key, cfg.sendgrid_max_age, request.headers, body)
    items = load_json(body, "body")
    events = sendgrid.events(items)
    result = await run_in_threadpool(apply_events, request.app.state.ctx, events)
    result.received = len(items)
    return _summary("sendgrid", result)


@router.post("/ses", summary="Amazon SES events through SNS")
async def ses_webhook(request: Request) -> JSONResponse:
    cfg = _config(request)
    # the signature is inside: the JSON must be read first
    msg = ses.envelope(await request.body(), request.headers.get("x-amz-sns-message-type"))
    await run_in_threadpool(verify_sns, cfg, sns_certificates(request), msg)
    answer = await run_in_threadpool(ses.control_answer, msg, cfg.sns_auto_confirm)
    if answer is not None:
        return JSONResponse(answer)
    result = await run_in_threadpool(apply_events, request.app.state.ctx, ses.events(msg))
    return _summary("ses", result)


async def _twilio_params(request: Request) -> dict[str, str]:
    cfg = _config(request)
    token = cfg.twilio_auth_token.get_secret_value() if cfg.twilio_auth_token else ""
    url = request.url
    host = request.headers.get("host") or url.netloc
    return twilio.verified_form(
        token,
        twilio.signed_url(cfg.public_url, url.scheme, host, url.path, url.query),
        await request.body(),
        request.headers.get("x-twilio-signature"),
        request.headers.get("x-twilio-webhooks-signature-settings"),
    )


@router.post("/twilio/status", summary="Twilio message status callback")
async def twilio_status(request: Request) -> JSONResponse:
    params = await _twilio_params(request)
    events = twilio.status_events(params, request.query_params)
    result = await run_in_threadpool(apply_events, request.app.state.ctx, events)
    result.received = 1
    return _summary("twilio", result)


def _twiml(message: str | None = None) -> Response:
    return Response(twilio.twiml(message), media_type="application/xml")


@router.post("/twilio/inbound", summary="Twilio inbound SMS (STOP / START / HELP)")
async def twilio_inbound(request: Request) -> Response:
    sender, sid, word = twilio.inbound(await _twilio_params(request))
    action = twilio.keyword_action(word)
    if action is None:
        return _twiml()  # not a keyword: nothing to do, nothing to remember
    res = await run_in_threadpool(apply_sms_keyword, request.app.state.ctx, sid, sender, action)
    if not res.fresh:
        log.info("SMS %s from %s (%s) already handled: ignored", word, twilio.mask_phone(sender), sid[:40])
        return _twiml()  # answered when it first came; a replay changes nothing and says nothing
    if action == "help":
        cfg = _config(request)
        return _twiml(f"{cfg.brand}: {cfg.help_text}")
    log.info(
        "SMS %s from %s: %d user(s), %d SMS opt-out(s) changed", word, twilio.mask_phone(sender), res.users, res.changed
    )
    return _twiml()
