"""Provider webhooks over real HTTP, signed the way each provider signs.

SendGrid: an ECDSA P-256 key pair generated here (the public key configured as base64 DER).
SES/SNS: an RSA key and self-signed certificate generated here, pinned to a SigningCertURL on
sns.us-east-1.amazonaws.com through ``sns_cert_map`` (no network). Twilio: signatures computed by
twilio's own ``RequestValidator``. Sends go through the SendGrid and Twilio sandboxes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from sqlalchemy import event, insert, select
from sqlmodel import Session
from twilio.request_validator import RequestValidator

from notifyctl.context import Context
from notifyctl.db import dispose_all
from notifyctl.models import Delivery, DeliveryEvent, OptOut, utcnow
from notifyctl.settings import Settings
from notifyctl.tracking import timeline
from sandboxes.sendgrid import SendgridSandbox
from sandboxes.twilio import DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN, TwilioSandbox
from tests.conftest import invoke_cli, make_settings
from tests.test_api import ApiServer, drain, one_line_error
from tests.util import deliveries, seed, send

TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-events"
CERT_URL = f"https://sns.us-east-1.amazonaws.com/SimpleNotificationService-{uuid.uuid4().hex}.pem"
SG_API_KEY = "SG.webhook-tests-" + os.urandom(8).hex()
PROMO = {"first_name": "A", "discount": 20, "code": "WEEK20"}


# ------------------------------------------------------------------------------ keys and certs


@pytest.fixture(scope="module")
def sg_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _der_b64(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


def _self_signed(key: rsa.RSAPrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def sns_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[rsa.RSAPrivateKey, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("sns") / "cert.pem"
    path.write_bytes(_self_signed(key).public_bytes(serialization.Encoding.PEM))
    return key, path


@pytest.fixture
def wsettings(
    home: Path, redis_url: str, rclient: Any, sg_key: ec.EllipticCurvePrivateKey, sns_key: tuple[Any, Path]
) -> Settings:
    return make_settings(
        home,
        redis_url,
        provider_options={
            "api": {
                "sendgrid_public_key": _der_b64(sg_key),
                "sns_topic_arns": [TOPIC],
                "sns_cert_map": {CERT_URL: str(sns_key[1])},
                "brand": "Acme Shop",
                "help_text": "Help at acme.example/help or +1 415 555 0100.",
            },
            # the Twilio webhook checks signatures with the twilio provider's auth token (fallback)
            "twilio": {
                "account_sid": DEFAULT_ACCOUNT_SID,
                "auth_token": DEFAULT_AUTH_TOKEN,
                "from_number": "+15005550006",
            },
        },
    )


@pytest.fixture
def wctx(wsettings: Settings) -> Iterator[Context]:
    c = Context(wsettings)
    yield c
    c.close()
    dispose_all()


@pytest.fixture
def server(wctx: Context) -> Iterator[ApiServer]:
    with ApiServer(wctx) as s:
        yield s


@pytest.fixture
def http(server: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def opt_outs(ctx: Context) -> set[tuple[str, str, str, str]]:
    with Session(ctx.engine) as s:
        return {(o.user_id, o.channel, o.category, o.reason) for o in s.execute(select(OptOut)).scalars()}


def event_count(ctx: Context) -> int:
    with Session(ctx.engine) as s:
        return len(s.execute(select(DeliveryEvent.id)).all())


def assert_suppressed_later(ctx: Context, user: str, channel: str, template: str = "weekly_promo") -> None:
    """A later send through intake + worker gets a ``suppressed`` ``opted_out`` delivery on ``channel``."""
    other = "push" if channel != "push" and user in ("alice", "bob") else "sms"
    data = PROMO if template == "weekly_promo" else {"order_id": "O", "tracking_url": "https://t.example/x"}
    if template == "otp_code":
        data = {"code": "123456", "minutes": 5}
    res = send(ctx, recipient_id=user, template_id=template, channels=[channel, other], data=data)
    assert res.status == "queued", res
    drain(ctx.settings)
    got = {d.channel: d for d in deliveries(ctx, res.notification_id)}
    assert got[channel].status == "suppressed", (user, channel, got[channel])
    assert (got[channel].reason or "").startswith("opted_out"), got[channel].reason


# ========================================================================================== SendGrid


def sg_post(
    http: httpx.Client,
    key: ec.EllipticCurvePrivateKey,
    events: Any,
    *,
    ts: int | None = None,
    body: bytes | None = None,
    sent_body: bytes | None = None,
) -> httpx.Response:
    raw = body if body is not None else json.dumps(events).encode()
    stamp = str(int(time.time()) if ts is None else ts)
    sig = base64.b64encode(key.sign(stamp.encode() + raw, ec.ECDSA(hashes.SHA256()))).decode()
    return http.post(
        "/webhooks/sendgrid",
        content=sent_body if sent_body is not None else raw,
        headers={
            "Content-Type": "application/json",
            "X-Twilio-Email-Event-Webhook-Signature": sig,
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
        },
    )


def sg_event(kind: str, rec: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {"event": kind, "timestamp": int(time.time()), "sg_event_id": uuid.uuid4().hex}
    if rec is not None:
        ev.update(
            email=rec["to"][0]["email"] if isinstance(rec["to"], list) else rec["to"],
            sg_message_id=f"{rec['message_id']}.filterdrecv-1.0.{uuid.uuid4().hex[:8]}.0",
            **rec["custom_args"],
        )
    ev.update(kw)
    return ev


@pytest.fixture
def sendgrid(wsettings: Settings) -> Iterator[tuple[SendgridSandbox, Settings]]:
    with SendgridSandbox(api_key=SG_API_KEY) as sb:
        opts = dict(wsettings.provider_options)
        opts["sendgrid"] = {"api_key": SG_API_KEY, "base_url": sb.url, "from_address": "shop@acme.example"}
        yield (
            sb,
            make_settings(
                wsettings.home, wsettings.redis_url or "", providers_email=["sendgrid"], provider_options=opts
            ),
        )


def test_sendgrid_sandbox_send_reaches_delivered_and_opened_from_webhooks_alone(
    wctx: Context, http: httpx.Client, sg_key: Any, sendgrid: tuple[SendgridSandbox, Settings]
) -> None:
    sb, worker_settings = sendgrid
    seed(wctx)
    a = send(wctx, recipient_id="alice", channels=["email"])
    b = send(wctx, recipient_id="bob", channels=["email"])
    drain(worker_settings)
    recs = {r["custom_args"]["notification_id"]: r for r in sb.recorder.all()}
    assert set(recs) == {a.notification_id, b.notification_id}
    ra, rb = recs[a.notification_id], recs[b.notification_id]

    batch = [
        sg_event("processed", ra),
        sg_event("delivered", ra),
        sg_event("open", ra),
        # bob's event carries no custom args: matched by the sg_message_id prefix (X-Message-Id)
        {k: v for k, v in sg_event("open", rb).items() if k not in ("delivery_id", "notification_id")},
        sg_event("delivered", None, sg_message_id="unknown0123.filter.1", email="x@example.com"),
    ]
    r = sg_post(http, sg_key, batch)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "ok": True,
        "provider": "sendgrid",
        "received": 5,
        "duplicates": 0,
        "unmatched": 1,
        "transitions": 3,
        "opt_outs": 0,
    }
    ta = timeline(wctx, a.notification_id)
    assert [e["status"] for e in ta["events"]] == ["queued", "sent", "delivered", "opened"]
    assert ta["deliveries"][0]["status"] == "opened" and ta["deliveries"][0]["delivered_at"] is not None
    assert [d.status for d in deliveries(wctx, b.notification_id)] == ["opened"]
    cli = invoke_cli(wctx.settings, "events", a.notification_id, "--json")
    assert cli.returncode == 0 and [e["status"] for e in json.loads(cli.stdout)["events"]][-2:] == [
        "delivered",
        "opened",
    ]

    # idempotence: the same batch again is recognised (sg_event_id) and changes nothing
    before = event_count(wctx)
    r = sg_post(http, sg_key, batch)
    assert r.json()["duplicates"] == 4 and r.json()["transitions"] == 0  # "processed" is ignored, not counted
    # monotonicity: a late "delivered" (new event id) never overwrites "opened"; a late bounce neither
    r = sg_post(
        http, sg_key, [sg_event("delivered", ra), sg_event("delivered", rb), sg_event("bounce", ra, type="blocked")]
    )
    assert r.status_code == 200 and r.json()["transitions"] == 0
    assert event_count(wctx) == before
    assert [d.status for d in deliveries(wctx, a.notification_id)] == ["opened"]


def test_sendgrid_rejects_forged_replayed_truncated_and_malformed(
    wctx: Context, http: httpx.Client, sg_key: Any, server: ApiServer
) -> None:
    seed(wctx)
    events = [sg_event("spamreport", None, email="alice@example.com")]
    raw = json.dumps(events).encode()
    other = ec.generate_private_key(ec.SECP256R1())

    cases: list[tuple[httpx.Response, int, str]] = [
        (sg_post(http, other, events), 403, "signature"),  # forged: another key
        (sg_post(http, sg_key, events, ts=int(time.time()) - 3600), 401, "stale"),  # replayed an hour later
        (sg_post(http, sg_key, events, ts=int(time.time()) + 3600), 401, "future"),
        (sg_post(http, sg_key, events, sent_body=raw[:-5]), 403, "signature"),  # truncated in transit
        (sg_post(http, sg_key, events, sent_body=raw.replace(b"alice", b"bobby")), 403, "signature"),  # tampered
        (sg_post(http, sg_key, None, body=b'[{"event": "open"'), 400, "malformed JSON"),  # signed but truncated JSON
        (sg_post(http, sg_key, None, body=b'{"event": "open"}'), 400, "array"),
        (sg_post(http, sg_key, None, body=b'[{"event": 3}]'), 400, "event 0"),
        (sg_post(http, sg_key, None, body=b"[1]"), 400, "event 0"),
        (sg_post(http, sg_key, None, body=b"\xff\xfe"), 400, "malformed JSON"),
        (http.post("/webhooks/sendgrid", content=raw), 401, "missing"),
        (
            http.post(
                "/webhooks/sendgrid",
                content=raw,
                headers={
                    "X-Twilio-Email-Event-Webhook-Signature": "%%%not base64",
                    "X-Twilio-Email-Event-Webhook-Timestamp": str(int(time.time())),
                },
            ),
            401,
            "malformed",
        ),
        (
            http.post(
                "/webhooks/sendgrid",
                content=raw,
                headers={
                    "X-Twilio-Email-Event-Webhook-Signature": "AAAA",
                    "X-Twilio-Email-Event-Webhook-Timestamp": "yesterday",
                },
            ),
            401,
            "malformed",
        ),
    ]
    for resp, status, needle in cases:
        assert resp.status_code == status, (status, needle, resp.text)
        assert needle in one_line_error(resp)
    assert opt_outs(wctx) == set()  # nothing believed

    # a valid replay inside the window is harmless: the same sg_event_id is applied once
    assert sg_post(http, sg_key, events).json()["opt_outs"] == 1
    assert sg_post(http, sg_key, events).json()["duplicates"] == 1
    assert opt_outs(wctx) == {("alice", "email", "marketing", "complaint")}

    # not configured: refuse rather than believe
    bare = Context(make_settings(wctx.settings.home, wctx.settings.redis_url or ""))
    try:
        with ApiServer(bare) as s2, httpx.Client(base_url=s2.url) as c2:
            r = sg_post(c2, sg_key, events)
            assert r.status_code == 403 and "not configured" in one_line_error(r)
    finally:
        bare.close()


BAD_JSON = [
    ("[" * 1000 + "]" * 1000, "malformed JSON: nested deeper than 32 levels"),  # was a 500 RecursionError
    ('[{"event": "open", "n": ' + "1" * 5000 + "}]", "a number of 5000 digits"),  # was a 500 ValueError
    ('[{"event": "open", "n": NaN}]', "NaN is not a JSON value"),
    ('[{"event": "open", "n": -Infinity}]', "-Infinity is not a JSON value"),
    ('[{"event": "open", "email": "\\udfff"}]', "unpaired UTF-16 surrogate"),
]


def test_webhook_bodies_go_through_the_one_json_loader(
    wctx: Context, http: httpx.Client, sg_key: Any, sns_key: tuple[rsa.RSAPrivateKey, Path]
) -> None:
    """Signed SendGrid batches, unauthenticated SES bodies and signed SES records: deep nesting,
    huge numbers, NaN/Infinity and lone surrogates are a 400 naming the problem, never a 500."""
    seed(wctx)
    for body, needle in BAD_JSON:
        r = sg_post(http, sg_key, None, body=body.encode())  # correctly signed
        assert r.status_code == 400 and needle in one_line_error(r), (body[:40], r.text)
        # unsigned: refused for the missing signature, before the body is parsed
        r = http.post("/webhooks/sendgrid", content=body.encode(), headers={"Content-Type": "application/json"})
        assert r.status_code == 401 and "missing" in one_line_error(r), r.text
        obj = body[1:-1] if body.startswith("[{") else body  # one event: an object
        r = http.post("/webhooks/ses", content=obj.encode())  # SNS-shaped, no signature
        assert r.status_code == 400 and needle in one_line_error(r), (body[:40], r.text)
        record = sns_sign(sns_message(obj), sns_key[0])  # a correctly signed, hostile SES record
        r = ses_post(http, record)
        assert r.status_code == 400 and needle in one_line_error(r) and "SES record" in one_line_error(r), r.text
    assert opt_outs(wctx) == set()


def test_sendgrid_batch_size_is_limited(wctx: Context, sg_key: Any) -> None:
    from notifyctl.api.app import ApiConfig

    seed(wctx)
    cfg = ApiConfig(sendgrid_public_key=_der_b64(sg_key), max_webhook_body_bytes=64 * 1024)
    with ApiServer(wctx, config=cfg) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        batch = [sg_event("spamreport", None, email="alice@example.com", pad="p" * 1000) for _ in range(80)]
        r = sg_post(c, sg_key, batch)
        assert r.status_code == 413 and one_line_error(r) == "request body larger than 65536 bytes"
        assert opt_outs(wctx) == set()
        assert sg_post(c, sg_key, batch[:40]).json()["opt_outs"] == 1
        # the other webhooks take max_body_bytes (1 MiB by default)
        r = c.post("/webhooks/ses", content=b"{" + b" " * (2 * 1024 * 1024) + b"}")
        assert r.status_code == 413 and one_line_error(r) == "request body larger than 1048576 bytes"


def test_sendgrid_suppression_paths(wctx: Context, http: httpx.Client, sg_key: Any) -> None:
    seed(wctx)
    # alice: hard bounce of a real delivery; bob: spam report; carol: unsubscribe (by address only)
    n = send(wctx, recipient_id="alice", channels=["email"])
    drain(wctx.settings)
    (d,) = deliveries(wctx, n.notification_id)
    batch = [
        sg_event(
            "bounce", None, delivery_id=d.id, email="alice@example.com", type="bounce", reason="550 5.1.1 no such user"
        ),
        sg_event("spamreport", None, email="BOB@example.com"),
        sg_event("unsubscribe", None, email="carol@example.com"),
        sg_event("group_unsubscribe", None, email="nobody@example.com", asm_group_id=1),
        sg_event("dropped", None, email="dave@example.com", reason="Bounced Address"),
    ]
    r = sg_post(http, sg_key, batch)
    assert r.status_code == 200 and r.json()["transitions"] == 1
    assert opt_outs(wctx) == {
        ("alice", "email", "*", "hard_bounce"),
        ("bob", "email", "marketing", "complaint"),
        ("carol", "email", "marketing", "unsubscribe"),
    }
    (d,) = deliveries(wctx, n.notification_id)
    assert d.status == "failed" and "550 5.1.1" in (d.reason or "")
    assert_suppressed_later(wctx, "alice", "email", template="order_shipped_v2")  # hard bounce: all email
    assert_suppressed_later(wctx, "bob", "email")
    assert_suppressed_later(wctx, "carol", "email")


def _insert_sent_deliveries(ctx: Context, n: int, tag: str) -> list[str]:
    now = utcnow()
    rows = [
        {
            "id": f"d_{tag}{i:06d}",
            "notification_id": f"n_{tag}{i:06d}",
            "user_id": "alice",
            "channel": "email",
            "route": "email",
            "address": f"u{i}@example.com",
            "status": "sent",
            "provider": "sendgrid",
            "provider_message_id": f"pm{tag}{i // 500}",  # 500 personalizations per request
            "attempts": 1,
            "dead_lettered": False,
            "queued_at": now,
            "sent_at": now,
            "updated_at": now,
        }
        for i in range(n)
    ]
    with Session(ctx.engine) as s:
        s.execute(insert(Delivery), rows)
        s.commit()
    return [r["id"] for r in rows]


def test_sendgrid_burst_is_applied_with_a_fixed_number_of_statements(
    wctx: Context, http: httpx.Client, sg_key: Any
) -> None:
    seed(wctx)
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement.split()[0].upper())

    event.listen(wctx.engine, "before_cursor_execute", count)
    try:
        results = {}
        for n, tag in ((50, "a"), (2000, "b")):
            ids = _insert_sent_deliveries(wctx, n, tag)
            batch = []
            for i in range(n):
                rec = {"to": f"u{i}@example.com", "message_id": f"pm{tag}{i // 500}", "custom_args": {}}
                batch.append(sg_event("delivered", rec))
                batch.append(sg_event("open", rec, delivery_id=ids[i]))
            batch.append(sg_event("spamreport", None, email="carol@example.com"))
            statements.clear()
            r = sg_post(http, sg_key, batch)
            assert r.status_code == 200, r.text
            assert r.json()["transitions"] == 2 * n and r.json()["unmatched"] == 0
            results[n] = len(statements)
            with Session(wctx.engine) as s:
                statuses = s.execute(select(Delivery.status).where(Delivery.id.in_(ids))).scalars().all()
            assert set(statuses) == {"opened"}
    finally:
        event.remove(wctx.engine, "before_cursor_execute", count)
    # the same statements for 101 events as for 4001: the burst's cost is counted, not timed
    assert results[50] == results[2000] <= 12, results


# ============================================================================================ SES / SNS


def sns_sign(msg: dict[str, Any], key: rsa.RSAPrivateKey, version: str = "2") -> dict[str, Any]:
    """Sign like SNS (docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html)."""
    if msg["Type"] == "Notification":
        fields = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
    else:
        fields = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
    text = "".join(f"{f}\n{msg[f]}\n" for f in fields if f in msg)
    digest = hashes.SHA1() if version == "1" else hashes.SHA256()
    sig = key.sign(text.encode(), padding.PKCS1v15(), digest)
    return {**msg, "SignatureVersion": version, "Signature": base64.b64encode(sig).decode()}


def sns_message(
    record: dict[str, Any] | str, *, kind: str = "Notification", age: float = 0, **extra: Any
) -> dict[str, Any]:
    ts = datetime.now(UTC) - timedelta(seconds=age)
    msg = {
        "Type": kind,
        "MessageId": str(uuid.uuid4()),
        "TopicArn": TOPIC,
        "Message": record if isinstance(record, str) else json.dumps(record),
        "Timestamp": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
        "SigningCertURL": CERT_URL,
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=x",
    }
    msg.update(extra)
    return msg


def ses_post(http: httpx.Client, msg: dict[str, Any], raw: bytes | None = None) -> httpx.Response:
    return http.post(
        "/webhooks/ses",
        content=raw if raw is not None else json.dumps(msg).encode(),
        headers={"Content-Type": "text/plain; charset=UTF-8", "x-amz-sns-message-type": str(msg.get("Type", ""))},
    )


def ses_record(kind: str, d: Delivery, *, tagged: bool = True, **body: Any) -> dict[str, Any]:
    mail: dict[str, Any] = {
        "messageId": d.provider_message_id,
        "destination": [d.address],
        "source": "shop@acme.example",
    }
    if tagged:
        mail["tags"] = {"delivery_id": [d.id]}
        rec: dict[str, Any] = {"eventType": kind, "mail": mail}
    else:
        rec = {"notificationType": kind, "mail": mail}
    rec.update(body)
    return rec


def test_ses_events_v1_and_v2_delivery_open_bounce_complaint(
    wctx: Context, http: httpx.Client, sns_key: tuple[rsa.RSAPrivateKey, Path]
) -> None:
    key = sns_key[0]
    seed(wctx)
    na = send(wctx, recipient_id="alice", channels=["email"])
    nb = send(wctx, recipient_id="bob", channels=["email"])
    nc = send(wctx, recipient_id="carol", channels=["email"])
    drain(wctx.settings)
    (da,), (db,), (dc,) = (deliveries(wctx, x.notification_id) for x in (na, nb, nc))

    r = ses_post(http, sns_sign(sns_message(ses_record("Delivery", da)), key, "1"))  # SHA1withRSA
    assert r.status_code == 200 and r.json()["transitions"] == 1, r.text
    opened = sns_sign(sns_message(ses_record("Open", da, open={"ipAddress": "192.0.2.1"})), key, "2")  # SHA256withRSA
    assert ses_post(http, opened).json()["transitions"] == 1
    assert ses_post(http, opened).json()["duplicates"] == 1  # SNS redelivery of the same MessageId
    late = sns_sign(sns_message(ses_record("Delivery", da)), key)
    assert ses_post(http, late).json()["transitions"] == 0
    assert [e["status"] for e in timeline(wctx, na.notification_id)["events"]] == [
        "queued",
        "sent",
        "delivered",
        "opened",
    ]

    bounce = {
        "bounceType": "Permanent",
        "bounceSubType": "General",
        "bouncedRecipients": [{"emailAddress": db.address, "diagnosticCode": "smtp; 550 5.1.1 user unknown"}],
    }
    # identity notifications (no tags): matched by mail.messageId
    r = ses_post(http, sns_sign(sns_message(ses_record("Bounce", db, tagged=False, bounce=bounce), Subject="x"), key))
    assert r.status_code == 200 and r.json()["opt_outs"] == 1, r.text
    (db,) = deliveries(wctx, nb.notification_id)
    assert db.status == "failed" and "Permanent" in (db.reason or "")
    transient = {**bounce, "bounceType": "Transient", "bounceSubType": "MailboxFull"}
    r = ses_post(http, sns_sign(sns_message(ses_record("Bounce", dc, bounce=transient)), key))
    assert r.json()["opt_outs"] == 0 and deliveries(wctx, nc.notification_id)[0].status == "failed"
    complaint = {"complainedRecipients": [{"emailAddress": dc.address}], "complaintFeedbackType": "abuse"}
    r = ses_post(http, sns_sign(sns_message(ses_record("Complaint", dc, complaint=complaint)), key, "1"))
    assert r.json()["opt_outs"] == 1
    assert opt_outs(wctx) == {("bob", "email", "*", "hard_bounce"), ("carol", "email", "marketing", "complaint")}
    assert_suppressed_later(wctx, "bob", "email", template="order_shipped_v2")
    assert_suppressed_later(wctx, "carol", "email")
    # unknown message: logged, answered 200
    ghost = Delivery(
        id="d_ghost",
        notification_id="n_ghost",
        user_id="x",
        channel="email",
        route="email",
        address="g@example.com",
        provider_message_id="nope",
    )
    r = ses_post(http, sns_sign(sns_message(ses_record("Delivery", ghost)), key))
    assert r.status_code == 200 and r.json()["unmatched"] == 1


def test_ses_rejects_forged_replayed_and_malformed(
    wctx: Context, http: httpx.Client, sns_key: tuple[rsa.RSAPrivateKey, Path], caplog: pytest.LogCaptureFixture
) -> None:
    key = sns_key[0]
    seed(wctx)
    complaint = {
        "notificationType": "Complaint",
        "mail": {"messageId": "m-1", "destination": ["alice@example.com"]},
        "complaint": {"complainedRecipients": [{"emailAddress": "alice@example.com"}]},
    }
    good = sns_sign(sns_message(complaint), key)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tampered = {**good, "Message": good["Message"].replace("alice", "bob")}
    cases: list[tuple[dict[str, Any] | bytes, int, str]] = [
        (sns_sign(sns_message(complaint), other_key), 403, "signature"),
        (tampered, 403, "signature"),
        (
            sns_sign(sns_message(complaint, SigningCertURL=CERT_URL.replace("https", "http")), key),
            403,
            "SigningCertURL",
        ),
        (
            sns_sign(sns_message(complaint, SigningCertURL="https://sns.us-east-1.evil.example/x.pem"), key),
            403,
            "SigningCertURL",
        ),
        (
            sns_sign(
                sns_message(complaint, SigningCertURL="https://sns.us-east-1.amazonaws.com.evil.example/c.pem"), key
            ),
            403,
            "SigningCertURL",
        ),
        (sns_sign(sns_message(complaint, TopicArn="arn:aws:sns:us-east-1:999999999999:other"), key), 403, "topic"),
        (sns_sign(sns_message(complaint, age=7200), key), 401, "stale"),
        ({**good, "SignatureVersion": "3"}, 400, "SignatureVersion"),
        ({k: v for k, v in good.items() if k != "Signature"}, 400, "Signature"),
        ({**good, "Signature": "***"}, 401, "malformed"),
        ({**good, "Type": "Bogus"}, 400, "Type"),
        (sns_sign(sns_message("not json at all"), key), 400, "SES record"),
        (sns_sign(sns_message({"mail": {}}), key), 400, "SES record"),
        (json.dumps(good).encode()[:-10], 400, "malformed JSON"),
        (b"[]", 400, "SNS message"),
    ]
    for msg, status, needle in cases:
        r = ses_post(http, {}, raw=msg) if isinstance(msg, bytes) else ses_post(http, msg)
        assert r.status_code == status, (needle, r.text)
        assert needle in one_line_error(r), r.text
    # odd but well-formed records: answered 200, nothing recorded, never a 500
    for odd in (
        {"notificationType": "Bounce", "mail": {"destination": 5, "tags": []}, "bounce": {"bouncedRecipients": 7}},
        {"notificationType": "Complaint", "mail": {"messageId": 3}, "complaint": []},
        {"eventType": "Delivery", "mail": {"messageId": None, "tags": {"delivery_id": "d_x"}}},
        {"eventType": "Click", "mail": {}},
    ):
        r = ses_post(http, sns_sign(sns_message(odd), key))
        assert r.status_code == 200, (odd, r.text)
    r = http.post("/webhooks/ses", json=good, headers={"x-amz-sns-message-type": "SubscriptionConfirmation"})
    assert r.status_code == 400
    assert opt_outs(wctx) == set()
    assert ses_post(http, good).status_code == 200
    assert opt_outs(wctx) == {("alice", "email", "marketing", "complaint")}
    # RFC 3339 allows a lower-case t and z: still dated, still fresh
    lower = sns_message(complaint)
    lower["Timestamp"] = lower["Timestamp"].lower()
    assert ses_post(http, sns_sign(lower, key)).status_code == 200

    # subscription confirmation: verified, logged with its SubscribeURL, not fetched (no auto-confirm)
    sub_url = "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn=x&Token=abc"
    conf = sns_message(
        "You have chosen to subscribe to the topic...",
        kind="SubscriptionConfirmation",
        Token="abc",
        SubscribeURL=sub_url,
    )
    with caplog.at_level(logging.WARNING, logger="notifyctl.webhooks"):
        r = ses_post(http, sns_sign(conf, key, "1"))
    assert r.status_code == 200 and r.json() == {"ok": True, "subscription": "pending"}
    assert sub_url in caplog.text
    forged_conf = sns_sign(conf, other_key, "1")
    assert ses_post(http, forged_conf).status_code == 403


def _fresh_forgery(**extra: Any) -> dict[str, Any]:
    """An unauthenticated SNS message that passes every check needing no network: allowed topic,
    fresh Timestamp, a signature of an RSA key's length, a new certificate URL on the topic's
    region. Only the certificate could tell it is forged."""
    msg = sns_message(
        {"notificationType": "Complaint", "mail": {"messageId": "m"}},
        SigningCertURL=f"https://sns.us-east-1.amazonaws.com/SimpleNotificationService-{uuid.uuid4().hex}.pem",
        SignatureVersion="2",
        Signature=base64.b64encode(os.urandom(256)).decode(),
    )
    msg.update(extra)
    return msg


class FakeAwsCerts:
    """AWS's certificate host, as an httpx transport: counts requests; answers each URL ``status``."""

    def __init__(self, status: int = 404, pem: bytes = b"", gate: Any = None) -> None:
        self.requests: list[str] = []
        self.status, self.pem, self.gate = status, pem, gate

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(str(request.url))
        if self.gate is not None:
            self.gate.wait(10)
        return httpx.Response(self.status, content=self.pem if self.status == 200 else b"<Error/>")


def test_sns_checks_everything_offline_before_any_fetch_and_bounds_fetches(wctx: Context, server: ApiServer) -> None:
    """Issue 14 E2: an unauthenticated body made the server fetch first and ask questions after.
    Now nothing that fails an offline check is fetched for; a URL is fetched once; at most
    ``new_urls_per_minute`` new URLs a minute; never a 5xx."""
    from worker.providers.ses.sns_signature import SnsCertificates

    aws = FakeAwsCerts(status=404)
    certs = SnsCertificates(httpx.Client(transport=httpx.MockTransport(aws)), new_urls_per_minute=3)
    server.app.state.sns_certs = certs
    seed(wctx)
    offline = [
        (_fresh_forgery(Timestamp="2020-01-01T00:00:00.000Z"), 401, "stale"),
        (_fresh_forgery(Timestamp="yesterday"), 401, "malformed SNS Timestamp"),
        (_fresh_forgery(TopicArn="arn:aws:sns:us-east-1:123456789012:other"), 403, "topic"),
        (_fresh_forgery(SignatureVersion="3"), 400, "SignatureVersion"),
        (_fresh_forgery(Signature=base64.b64encode(b"short").decode()), 401, "malformed SNS Signature"),
        (_fresh_forgery(SigningCertURL="https://sns.eu-west-1.amazonaws.com/x.pem"), 403, "sns.us-east-1"),
        (_fresh_forgery(SigningCertURL="https://sns.u.amazonaws.com/.pem"), 403, "SigningCertURL"),
        (_fresh_forgery(SigningCertURL="https://sns.us-east-1.amazonaws.com/x.pem?a=1"), 403, "SigningCertURL"),
        (_fresh_forgery(SigningCertURL="https://sns.us-east-1.amazonaws.com:8443/x.pem"), 403, "SigningCertURL"),
        (_fresh_forgery(SigningCertURL="https://u@sns.us-east-1.amazonaws.com/x.pem"), 403, "SigningCertURL"),
        (_fresh_forgery(SigningCertURL="https://sns.us-east-1.amazonaws.com/x.txt"), 403, "SigningCertURL"),
        (_fresh_forgery(Type="Bogus"), 400, "Type"),
        ({k: v for k, v in _fresh_forgery().items() if k != "MessageId"}, 400, "MessageId"),
    ]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for msg, status, needle in offline:
            r = ses_post(http, msg)
            assert r.status_code == status and needle in one_line_error(r), (status, needle, r.text)
        assert aws.requests == [] and certs.fetches == 0

        # passes every offline check: one fetch; AWS says no such certificate; remembered (no refetch)
        forged = _fresh_forgery()
        for _ in range(3):
            r = ses_post(http, forged)
            assert r.status_code == 403 and "answered HTTP 404" in one_line_error(r), r.text
        assert aws.requests == [forged["SigningCertURL"]]
        # new URLs: at most 3 a minute here, then 429 with Retry-After and no fetch
        answers = [ses_post(http, _fresh_forgery()) for _ in range(4)]
        assert [a.status_code for a in answers] == [403, 403, 429, 429], [a.text for a in answers]
        assert "too many new SNS certificate URLs" in one_line_error(answers[-1])
        assert 1 <= int(answers[-1].headers["retry-after"]) <= 61
        assert len(aws.requests) == 3 and certs.fetches == 3
    assert opt_outs(wctx) == set()


def test_sns_certificates_are_fetched_once_cached_and_bounded(sns_key: tuple[rsa.RSAPrivateKey, Path]) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from notifyctl.api.app import ApiConfig, ApiError
    from worker.providers.ses.sns_signature import SnsCertificates

    cfg = ApiConfig(sns_topic_arns=[TOPIC])
    gate = threading.Event()
    aws = FakeAwsCerts(status=200, pem=sns_key[1].read_bytes(), gate=gate)
    certs = SnsCertificates(httpx.Client(transport=httpx.MockTransport(aws)), max_entries=2, new_urls_per_minute=10)
    url = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-a.pem"
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(certs.get, cfg, url) for _ in range(6)]
        while len(aws.requests) < 1:  # the first fetch has started; the other five are waiting on it
            gate.wait(0.01)
        gate.set()
        got = {f.result().fingerprint(hashes.SHA256()) for f in futures}
    assert len(got) == 1 and aws.requests == [url]  # six requests at once, one fetch
    assert certs.get(cfg, url) is not None and aws.requests == [url]  # cached
    for name in ("b", "c"):  # the cache holds 2: a third URL evicts the least recently used
        certs.get(cfg, url.replace("-a.", f"-{name}."))
    certs.get(cfg, url)
    assert aws.requests.count(url) == 2 and len(certs._held) == 2
    # expiry: past the ttl the certificate is fetched again
    certs.ttl = 0.0
    certs._held.clear()
    certs.get(cfg, url, now=time.time())
    certs.get(cfg, url, now=time.time() + 1)
    assert aws.requests.count(url) == 4
    # AWS unreachable: a 4xx (never a 5xx), remembered briefly
    down = SnsCertificates(httpx.Client(transport=httpx.MockTransport(_unreachable)), new_urls_per_minute=10)
    for _ in range(2):
        with pytest.raises(ApiError) as err:
            down.get(cfg, url)
        assert err.value.status == 401 and "cannot fetch" in err.value.message
    assert down.fetches == 1


def _unreachable(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("unreachable", request=request)


# ============================================================================================= Twilio


def tw_post(
    http: httpx.Client,
    path: str,
    params: dict[str, str],
    *,
    token: str = DEFAULT_AUTH_TOKEN,
    url: str | None = None,
    send_params: dict[str, str] | None = None,
) -> httpx.Response:
    signed_url = url or f"{http.base_url}".rstrip("/") + path
    sig = RequestValidator(token).compute_signature(signed_url, params)
    return http.post(
        path,
        content=urlencode(send_params if send_params is not None else params).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": sig},
    )


@pytest.fixture
def twilio(wsettings: Settings, server: ApiServer) -> Iterator[tuple[TwilioSandbox, Settings]]:
    with TwilioSandbox(stopped={"+447911123456"}) as sb:
        opts = dict(wsettings.provider_options)
        opts["twilio"] = {
            **opts["twilio"],
            "base_url": sb.url,
            "status_callback_url": f"{server.url}/webhooks/twilio/status",
        }
        yield (
            sb,
            make_settings(wsettings.home, wsettings.redis_url or "", providers_sms=["twilio"], provider_options=opts),
        )


def test_twilio_status_callbacks(wctx: Context, http: httpx.Client, twilio: tuple[TwilioSandbox, Settings]) -> None:
    sb, worker_settings = twilio
    seed(wctx)
    n = send(
        wctx, recipient_id="alice", template_id="otp_code", channels=["sms"], data={"code": "482913", "minutes": 5}
    )
    drain(worker_settings)
    (d,) = deliveries(wctx, n.notification_id)
    assert d.status == "sent" and d.provider_message_id and d.provider_message_id.startswith("SM")
    (m,) = sb.messages
    callback = m["status_callback"]
    assert callback.startswith(f"{http.base_url}".rstrip("/") + "/webhooks/twilio/status?delivery_id=")
    path = callback[len(str(http.base_url).rstrip("/")) :]
    base = {"MessageSid": m["sid"], "AccountSid": DEFAULT_ACCOUNT_SID, "To": m["to"], "From": "+15005550006"}

    assert tw_post(http, path, {**base, "MessageStatus": "sent"}).json()["transitions"] == 0
    r = tw_post(http, path, {**base, "MessageStatus": "delivered"})
    assert r.status_code == 200 and r.json()["transitions"] == 1, r.text
    assert tw_post(http, path, {**base, "MessageStatus": "delivered"}).json()["duplicates"] == 1
    late = tw_post(http, path, {**base, "MessageStatus": "undelivered", "ErrorCode": "30003"})
    assert late.status_code == 200 and late.json()["transitions"] == 0
    assert [e["status"] for e in timeline(wctx, n.notification_id)["events"]] == ["queued", "sent", "delivered"]

    forged = tw_post(http, path, {**base, "MessageStatus": "failed"}, token="not-the-auth-token")
    assert forged.status_code == 403 and "X-Twilio-Signature" in one_line_error(forged)
    tampered = tw_post(http, path, {**base, "MessageStatus": "read"}, send_params={**base, "MessageStatus": "failed"})
    assert tampered.status_code == 403
    wrong_url = tw_post(
        http, path.replace("delivery_id=", "delivery_id=x"), {**base, "MessageStatus": "read"}, url=callback
    )
    assert wrong_url.status_code == 403
    unsigned = http.post(
        path, content=urlencode(base).encode(), headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert unsigned.status_code == 401 and "missing" in one_line_error(unsigned)
    assert tw_post(http, path, {"AccountSid": DEFAULT_ACCOUNT_SID}).status_code == 400  # signed but no MessageSid
    # a repeated field: the signature is judged first (Twilio signs every value), 400 only once signed
    pairs = [*base.items(), ("MessageStatus", "failed"), ("MessageStatus", "read")]
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    signed_text = callback + "".join(k + v for k, v in sorted(pairs))
    good = base64.b64encode(hmac.new(DEFAULT_AUTH_TOKEN.encode(), signed_text.encode(), hashlib.sha1).digest())
    r = http.post(path, content=urlencode(pairs).encode(), headers={**form, "X-Twilio-Signature": "AAAA"})
    assert r.status_code == 403, r.text
    r = http.post(path, content=urlencode(pairs).encode(), headers={**form, "X-Twilio-Signature": good.decode()})
    assert r.status_code == 400 and "repeated form field 'MessageStatus'" in one_line_error(r)
    r = http.post(path, content=b"\xff\xfe=%%", headers={"X-Twilio-Signature": "abc"})
    assert r.status_code == 400 and "malformed" in one_line_error(r)
    r = tw_post(http, "/webhooks/twilio/status", {"MessageSid": "SMunknown", "MessageStatus": "delivered"})
    assert r.status_code == 200 and r.json()["unmatched"] == 1
    assert [d.status for d in deliveries(wctx, n.notification_id)] == ["delivered"]

    # a failure after "sent" is recorded; error 21610 (recipient replied STOP) opts the number out of SMS
    n2 = send(wctx, recipient_id="alice", template_id="otp_code", channels=["sms"], data={"code": "1", "minutes": 5})
    drain(worker_settings)
    (d2,) = deliveries(wctx, n2.notification_id)
    m2 = next(x for x in sb.messages if x["sid"] == d2.provider_message_id)
    path2 = m2["status_callback"][len(str(http.base_url).rstrip("/")) :]
    r = tw_post(http, path2, {"MessageSid": m2["sid"], "MessageStatus": "failed", "ErrorCode": "21610", "To": m2["to"]})
    assert r.json()["transitions"] == 1 and r.json()["opt_outs"] == 1
    (d2,) = deliveries(wctx, n2.notification_id)
    assert d2.status == "failed" and "21610" in (d2.reason or "")
    assert opt_outs(wctx) == {("alice", "sms", "*", "stop_reply")}
    assert_suppressed_later(wctx, "alice", "sms")


def test_twilio_inbound_stop_start_help(wctx: Context, http: httpx.Client, server: ApiServer) -> None:
    seed(wctx)
    path = "/webhooks/twilio/inbound"

    def inbound(body: str, sender: str = "+14155550101", **kw: Any) -> httpx.Response:
        params = {"MessageSid": "SM" + uuid.uuid4().hex, "From": sender, "To": "+15005550006", "Body": body}
        return tw_post(http, path, params, **kw)

    r = inbound("  stop ")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
    assert "<Response></Response>" in r.text
    assert opt_outs(wctx) == {("alice", "sms", "*", "stop_reply")}
    assert_suppressed_later(wctx, "alice", "sms", template="otp_code")  # STOP covers every SMS

    r = inbound("HELP")
    assert "<Message>Acme Shop: Help at acme.example/help or +1 415 555 0100.</Message>" in r.text
    assert opt_outs(wctx) == {("alice", "sms", "*", "stop_reply")}
    assert inbound("Stop sending me deals please").status_code == 200  # not a keyword: nothing happens
    assert opt_outs(wctx) == {("alice", "sms", "*", "stop_reply")}

    assert inbound("START").status_code == 200
    assert opt_outs(wctx) == set()
    res = send(wctx, recipient_id="alice", template_id="otp_code", channels=["sms"], data={"code": "1", "minutes": 5})
    drain(wctx.settings)
    assert [d.status for d in deliveries(wctx, res.notification_id)] == ["sent"]

    for word in ("STOPALL", "unsubscribe", "Cancel", "END", "quit."):
        assert inbound(word, sender="+447911123456").status_code == 200
        assert ("bob", "sms", "*", "stop_reply") in opt_outs(wctx)
        assert inbound("unstop", sender="+447911123456").status_code == 200
        assert opt_outs(wctx) == set()
    assert inbound("STOP", sender="+19998887777").status_code == 200  # unknown number: 200, nothing to do

    forged = inbound("START", token="guess")
    assert forged.status_code == 403
    r = http.post(
        path, content=b"From=%2B14155550101&Body=STOP", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 401
    assert tw_post(http, path, {"Body": "STOP"}).status_code == 400  # signed, no From


def test_twilio_inbound_replayed_or_retried_messages_change_nothing(
    wctx: Context, http: httpx.Client, server: ApiServer
) -> None:
    """Issue 14 E1: a correctly signed START replayed after a STOP undid the STOP. Twilio's signature
    carries no time, so a captured request is good forever: each MessageSid is acted on once."""
    seed(wctx)
    path = "/webhooks/twilio/inbound"

    def msg(body: str) -> dict[str, str]:
        return {"MessageSid": "SM" + uuid.uuid4().hex, "From": "+14155550101", "To": "+15005550006", "Body": body}

    start, stop = msg("START"), msg("STOP")
    assert tw_post(http, path, start).status_code == 200
    assert tw_post(http, path, stop).status_code == 200
    assert opt_outs(wctx) == {("alice", "sms", "*", "stop_reply")}
    replay = tw_post(http, path, start)  # the captured START, signed correctly, sent again
    assert replay.status_code == 200 and replay.headers["content-type"].startswith("application/xml")
    assert "<Response></Response>" in replay.text  # what Twilio expects: an empty TwiML answer
    assert opt_outs(wctx) == {("alice", "sms", "*", "stop_reply")}
    assert_suppressed_later(wctx, "alice", "sms", template="otp_code")

    # a genuine new START re-subscribes; replaying the old STOP then changes nothing either
    assert tw_post(http, path, msg("start")).status_code == 200
    assert opt_outs(wctx) == set()
    assert tw_post(http, path, stop).status_code == 200
    assert opt_outs(wctx) == set()

    # HELP is answered once per message: a retry of the same MessageSid gets no second reply SMS
    help_msg = msg("HELP")
    assert "<Message>Acme Shop: " in tw_post(http, path, help_msg).text
    assert "<Message>" not in tw_post(http, path, help_msg).text
    # a message without a MessageSid cannot be deduplicated: refused
    no_sid = {k: v for k, v in msg("STOP").items() if k != "MessageSid"}
    assert tw_post(http, path, no_sid).status_code == 400
    assert opt_outs(wctx) == set()


def test_sms_keywords_apply_in_order_and_stay_bounded(any_db_ctx: Context) -> None:
    """Concurrent STOPs and STARTs for one number (SQLite and PostgreSQL): the one that came last
    stands; replays change nothing; at most KEYWORDS_KEPT SIDs are kept per number."""
    from concurrent.futures import ThreadPoolExecutor

    from notifyctl.inbound import KEYWORDS_KEPT, apply_sms_keyword
    from notifyctl.models import SmsKeyword

    ctx = any_db_ctx
    seed(ctx)
    phone = "+14155550101"  # alice's
    sids = [f"SM{i:032x}" for i in range(40)]
    actions = ["stop" if i % 2 == 0 else "start" for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: apply_sms_keyword(ctx, sids[i], phone, actions[i]), range(40)))
    assert all(r.fresh and r.users == 1 for r in results)
    with Session(ctx.engine) as s:
        rows = s.execute(select(SmsKeyword).where(SmsKeyword.phone == phone)).scalars().all()
        last = max(rows, key=lambda r: r.received_at)
    stands = ("alice", "sms", "*", "stop_reply") in opt_outs(ctx)
    assert stands == (last.action == "stop"), (last.action, stands)
    # replays, concurrent or not, change nothing
    before = opt_outs(ctx)
    with ThreadPoolExecutor(8) as pool:
        replays = list(pool.map(lambda i: apply_sms_keyword(ctx, sids[i], phone, actions[i]), range(40)))
    assert not any(r.fresh for r in replays) and opt_outs(ctx) == before
    # bounded: the number's last KEYWORDS_KEPT keywords are remembered, older ones let go
    for i in range(KEYWORDS_KEPT):
        assert apply_sms_keyword(ctx, f"SMhelp{i:030x}", phone, "help").fresh
    with Session(ctx.engine) as s:
        kept = set(s.execute(select(SmsKeyword.sid).where(SmsKeyword.phone == phone)).scalars())
    assert len(kept) == KEYWORDS_KEPT and all(k.startswith("SMhelp") for k in kept)


def test_twilio_signature_uses_the_public_url(wctx: Context) -> None:
    seed(wctx)
    opts = dict(wctx.settings.provider_options)
    api = {
        **wctx.settings.api.model_dump(),
        "public_url": "https://notify.acme.example/",
        "twilio_auth_token": "api-token-123",
    }
    c = Context(make_settings(wctx.settings.home, wctx.settings.redis_url or "", provider_options=opts, api=api))
    with ApiServer(c) as s, httpx.Client(base_url=s.url) as http:
        params = {"MessageSid": "SM1", "From": "+14155550101", "Body": "STOP"}
        public = "https://notify.acme.example/webhooks/twilio/inbound"
        local = tw_post(http, "/webhooks/twilio/inbound", params, token="api-token-123")  # signed for the local URL
        assert local.status_code == 403
        assert (
            tw_post(http, "/webhooks/twilio/inbound", params, token=DEFAULT_AUTH_TOKEN, url=public).status_code == 403
        )
        ok = tw_post(http, "/webhooks/twilio/inbound", params, token="api-token-123", url=public)
        assert ok.status_code == 200
    assert opt_outs(wctx) == {("alice", "sms", "*", "stop_reply")}


# ======================================================================================= every database


def test_sendgrid_batch_on_every_database(any_db_ctx: Context, sg_key: Any) -> None:
    """The bulk path (row locks on PostgreSQL, upserts, case-insensitive address lookup) on SQLite and PostgreSQL."""
    from notifyctl.api.app import ApiConfig

    ctx = any_db_ctx
    seed(ctx)
    n = send(ctx, recipient_id="alice", channels=["email"])
    drain(ctx.settings)
    (d,) = deliveries(ctx, n.notification_id)
    cfg = ApiConfig(sendgrid_public_key=_der_b64(sg_key))
    with ApiServer(ctx, config=cfg) as s, httpx.Client(base_url=s.url) as http:
        batch = [
            sg_event("delivered", None, delivery_id=d.id, email=d.address),
            sg_event("open", None, delivery_id=d.id, email=d.address),
            sg_event("spamreport", None, email="Bob@Example.com"),
            sg_event("unsubscribe", None, email="bob@example.com"),
        ]
        r = sg_post(http, sg_key, batch)
        assert r.status_code == 200 and r.json()["transitions"] == 2, r.text
        assert sg_post(http, sg_key, batch).json()["duplicates"] == 4
        r = sg_post(http, sg_key, [sg_event("bounce", None, delivery_id=d.id, email=d.address, reason="550")])
        assert r.json()["transitions"] == 0 and r.json()["opt_outs"] == 1  # opened stays, the address is dead
    assert [e["status"] for e in timeline(ctx, n.notification_id)["events"]] == [
        "queued",
        "sent",
        "delivered",
        "opened",
    ]
    assert opt_outs(ctx) == {("bob", "email", "marketing", "unsubscribe"), ("alice", "email", "*", "hard_bounce")}
    assert_suppressed_later(ctx, "bob", "email")
