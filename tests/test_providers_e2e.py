"""The issue's "Done when": with the sandboxes running and the settings pointing at them, the real
pipeline (intake → RQ → burst worker) delivers through all seven providers, and what the providers
answer acts on our data: a dead APNs/FCM token leaves ``notifyctl tokens list``, a Twilio STOP
(21610) opts the user out of SMS."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlmodel import Session
from typer.testing import CliRunner

import notifyctl.cli.tokens
from notifyctl.context import Context
from notifyctl.db import dispose_all
from notifyctl.models import OptOut
from notifyctl.settings import Settings
from sandboxes.sandbox_set import SandboxSet
from tests.conftest import cli_env, make_settings
from tests.util import ANDROID_TOKEN, IOS_TOKEN, deliveries, drain, notification, seed, send

ALICE_PHONE = "+14155550101"
BOB_ANDROID = ANDROID_TOKEN


@pytest.fixture(scope="module")
def sandboxes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxSet]:
    with SandboxSet(tmp_path_factory.mktemp("sandbox-keys")) as sbs:
        yield sbs


@pytest.fixture(autouse=True)
def _clean(sandboxes: SandboxSet) -> Iterator[None]:
    yield
    for sb in sandboxes.sandboxes.values():
        sb.faults.clear()
        sb.recorder.clear()
        for attr in ("unregistered", "stopped"):
            if hasattr(sb, attr):
                getattr(sb, attr).clear()


@pytest.fixture
def contexts(home: Path, redis_url: str, rclient: Any) -> Iterator[Any]:
    made: list[Context] = []

    def make(sbs: SandboxSet, **routes: list[str]) -> Context:
        """A Context whose settings route through the sandboxes (``push_ios=["apns"]``, ...)."""
        settings = make_settings(
            home,
            redis_url,
            rate_limits=[],
            provider_options=sbs.provider_options,
            **{"providers_" + r: names for r, names in routes.items()},
        )
        c = Context(settings)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
    dispose_all()


def tokens_json(settings: Settings, *args: str) -> list[dict[str, Any]]:
    res = CliRunner().invoke(notifyctl.cli.tokens.app, ["list", "--json", *args], env=cli_env(settings))
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def by_route(ctx: Context, nid: str) -> dict[str, Any]:
    return {d.route: d for d in deliveries(ctx, nid)}


def test_delivers_through_all_seven_providers(sandboxes: SandboxSet, contexts: Any) -> None:
    sb = sandboxes.sandboxes
    # Variant 1: push.ios via APNs, push.android via FCM, email via SendGrid, SMS via Twilio.
    ctx = contexts(sandboxes, push_ios=["apns"], push_android=["fcm"], email=["sendgrid"], sms=["twilio"])
    seed(ctx)
    a = send(ctx, channels=["all"], data={"order_id": "ORD-1", "tracking_url": "https://t.example/1"})
    b = send(ctx, recipient_id="bob", channels=["push"], data={"order_id": "ORD-B", "tracking_url": "https://t/b"})
    assert a.status == b.status == "queued"
    drain(ctx)

    ds = by_route(ctx, a.notification_id)
    assert {r: (d.status, d.provider) for r, d in ds.items()} == {
        "push.ios": ("sent", "apns"),
        "email": ("sent", "sendgrid"),
        "sms": ("sent", "twilio"),
    }
    assert notification(ctx, a.notification_id).status == "done"

    [push] = sb["apns"].recorder.all()
    assert push["token"] == IOS_TOKEN and push["topic"] == "com.example.app"
    assert push["payload"]["aps"]["alert"] == {"title": "Your order has shipped", "body": "Order ORD-1 is on its way."}
    assert push["apns_id"] == ds["push.ios"].provider_message_id

    [mail] = sb["sendgrid"].recorder.all()
    assert mail["to"] == "alice@example.com" and mail["subject"] == "Order ORD-1 has shipped"
    assert "https://t.example/1" in mail["content"]["text/plain"] and "ORD-1" in mail["content"]["text/html"]
    assert mail["custom_args"]["delivery_id"] == ds["email"].id
    assert mail["message_id"] == ds["email"].provider_message_id

    [sms] = sb["twilio"].messages
    assert sms["to"] == ALICE_PHONE and sms["body"] == "Order ORD-1 has shipped. Track it: https://t.example/1"
    assert sms["sid"] == ds["sms"].provider_message_id and sms["sid"].startswith("SM")

    [bob_push] = deliveries(ctx, b.notification_id)
    assert (bob_push.route, bob_push.status, bob_push.provider) == ("push.android", "sent", "fcm")
    [fcm] = sb["fcm"].recorder.all()
    assert fcm["message"]["token"] == BOB_ANDROID
    assert fcm["message"]["notification"] == {"title": "Your order has shipped", "body": "Order ORD-B is on its way."}
    assert fcm["message"]["data"]["delivery_id"] == bob_push.id
    assert fcm["name"] == bob_push.provider_message_id

    # Variant 2: email via SES, SMS via SNS (moto behind the SigV4-checking proxy).
    ctx2 = contexts(sandboxes, email=["ses"], sms=["sns"])
    c = send(ctx2, channels=["email", "sms"], data={"order_id": "ORD-2", "tracking_url": "https://t.example/2"})
    drain(ctx2)
    ds2 = by_route(ctx2, c.notification_id)
    assert {r: (d.status, d.provider) for r, d in ds2.items()} == {"email": ("sent", "ses"), "sms": ("sent", "sns")}
    records = {r["service"]: r for r in sb["aws"].recorder.all()}
    assert records["ses"]["to"] == ["alice@example.com"] and records["ses"]["subject"] == "Order ORD-2 has shipped"
    assert "https://t.example/2" in records["ses"]["text"]
    assert records["ses"]["message_id"] == ds2["email"].provider_message_id
    assert records["sns"]["phone"] == ALICE_PHONE
    assert records["sns"]["text"] == "Order ORD-2 has shipped. Track it: https://t.example/2"
    assert records["sns"]["attributes"]["AWS.SNS.SMS.SMSType"] == "Transactional"
    assert records["sns"]["message_id"] == ds2["sms"].provider_message_id

    # Variant 3: email via SMTP.
    ctx3 = contexts(sandboxes, email=["smtp"])
    e = send(ctx3, channels=["email"], data={"order_id": "ORD-3", "tracking_url": "https://t.example/3"})
    drain(ctx3)
    [d3] = deliveries(ctx3, e.notification_id)
    assert (d3.status, d3.provider) == ("sent", "smtp")
    [smtp] = sb["smtp"].recorder.all()
    assert smtp["subject"] == "Order ORD-3 has shipped" and smtp["delivery_id"] == d3.id
    assert "alice@example.com" in smtp["to"] and "https://t.example/3" in smtp["text"]
    assert smtp["message_id"] == f"<{d3.provider_message_id}>"  # the Message-ID header

    # every provider's sandbox saw exactly what it was sent
    assert sandboxes.counts() == {"apns": 1, "fcm": 1, "sendgrid": 1, "twilio": 1, "smtp": 1, "ses": 1, "sns": 1}


def test_apns_410_removes_the_token(sandboxes: SandboxSet, contexts: Any) -> None:
    ctx = contexts(sandboxes, push_ios=["apns"])
    seed(ctx)
    assert [t["token"] for t in tokens_json(ctx.settings, "--user", "alice")] == [IOS_TOKEN]
    # the device was uninstalled: APNs answers 410 Unregistered for this token (set over the control API)
    r = httpx.post(
        sandboxes.control_url("apns") + "/_sandbox/unregistered", json=[IOS_TOKEN], headers=sandboxes.control_headers
    )
    assert r.status_code < 300
    res = send(ctx, channels=["push"])
    drain(ctx)
    [d] = deliveries(ctx, res.notification_id)
    assert (d.status, d.provider, d.reason) == ("failed", "apns", "invalid_address: Unregistered")
    assert d.attempts == 1 and d.next_attempt_at is None and not d.dead_lettered  # never retried
    assert sandboxes.counts()["apns"] == 0

    assert tokens_json(ctx.settings, "--user", "alice") == []
    [removed] = tokens_json(ctx.settings, "--user", "alice", "--removed")
    assert removed["token"] == IOS_TOKEN and removed["removed_at"]
    assert removed["removed_reason"] == "apns: Unregistered"
    # bob's Android token is untouched
    assert [t["user_id"] for t in tokens_json(ctx.settings)] == ["bob"]

    # the next push to alice has nowhere to go
    again = send(ctx, channels=["push"])
    drain(ctx)
    assert all(x.status != "sent" for x in deliveries(ctx, again.notification_id))
    assert sandboxes.counts()["apns"] == 0


def test_fcm_unregistered_removes_the_token(sandboxes: SandboxSet, contexts: Any) -> None:
    ctx = contexts(sandboxes, push_android=["fcm"])
    seed(ctx)
    sandboxes.sandboxes["fcm"].unregistered.add(BOB_ANDROID)
    res = send(ctx, recipient_id="bob", channels=["push"])
    drain(ctx)
    [d] = deliveries(ctx, res.notification_id)
    assert (d.status, d.provider) == ("failed", "fcm") and "UNREGISTERED" in (d.reason or "")
    assert d.attempts == 1 and d.next_attempt_at is None
    assert tokens_json(ctx.settings, "--user", "bob") == []
    [removed] = tokens_json(ctx.settings, "--user", "bob", "--removed")
    assert removed["token"] == BOB_ANDROID and removed["removed_reason"].startswith("fcm: ")
    assert "UNREGISTERED" in removed["removed_reason"]
    assert sandboxes.counts()["fcm"] == 0


def test_sns_opted_out_opts_the_user_out_of_sms(sandboxes: SandboxSet, contexts: Any) -> None:
    """SNS refuses a number on its opt-out list (the user replied STOP to an SNS sender): the pipeline
    reads the outcome's kind, not a vendor code, and records the opt-out as for Twilio's 21610."""
    ctx = contexts(sandboxes, sms=["sns"])
    seed(ctx)
    aws = sandboxes.sandboxes["aws"]
    aws.faults.add(
        {"code": "OptedOut", "status": 400, "message": "Phone number is opted out", "match": "Action=Publish"}
    )
    res = send(ctx, channels=["sms"], data={"order_id": "ORD-O1", "tracking_url": "https://t/1"})
    drain(ctx)
    [d] = deliveries(ctx, res.notification_id)
    assert (d.status, d.provider) == ("failed", "sns") and "OptedOut" in (d.reason or "")
    with Session(ctx.engine) as s:
        outs = list(s.execute(select(OptOut).where(OptOut.user_id == "alice")).scalars())
    assert [(o.channel, o.category, o.reason) for o in outs] == [("sms", "*", "stop_reply")]


def test_twilio_stop_opts_the_user_out_of_sms(sandboxes: SandboxSet, contexts: Any) -> None:
    ctx = contexts(sandboxes, sms=["twilio"])
    seed(ctx)
    twilio = sandboxes.sandboxes["twilio"]
    twilio.stopped.add(ALICE_PHONE)  # alice replied STOP: Twilio answers 21610
    first = send(ctx, channels=["sms"], data={"order_id": "ORD-S1", "tracking_url": "https://t/1"})
    drain(ctx)
    [d] = deliveries(ctx, first.notification_id)
    assert (d.status, d.provider) == ("failed", "twilio") and "21610" in (d.reason or "")
    assert d.attempts == 1 and d.next_attempt_at is None
    with Session(ctx.engine) as s:
        outs = list(s.execute(select(OptOut).where(OptOut.user_id == "alice")).scalars())
    assert [(o.channel, o.category, o.reason) for o in outs] == [("sms", "*", "stop_reply")]

    # Even once Twilio would accept again, the next SMS is suppressed by us, not sent.
    twilio.stopped.clear()
    second = send(ctx, channels=["sms"], data={"order_id": "ORD-S2", "tracking_url": "https://t/2"})
    drain(ctx)
    if second.status == "queued":
        [d2] = deliveries(ctx, second.notification_id)
        assert d2.status == "suppressed" and "sms" in (d2.reason or "")
    else:
        assert second.status == "suppressed"
    assert twilio.messages == []
    # other channels still reach alice
    third = send(ctx, channels=["sms", "email"], data={"order_id": "ORD-S3", "tracking_url": "https://t/3"})
    drain(ctx)
    assert {x.channel: x.status for x in deliveries(ctx, third.notification_id)} == {
        "sms": "suppressed",
        "email": "sent",
    }


def test_sms_outage_moves_traffic_to_the_fallback_and_otp_escalates_to_voice(
    sandboxes: SandboxSet, contexts: Any
) -> None:
    twilio, aws = sandboxes.sandboxes["twilio"], sandboxes.sandboxes["aws"]
    ctx = contexts(sandboxes, sms=["twilio", "sns"])
    seed(ctx)
    twilio.faults.add({"status": 503, "body": {"code": 20500, "message": "down"}, "count": -1, "match": "Messages"})
    res = [send(ctx, recipient_id=u, channels=["sms"]) for u in ("alice", "bob", "carol")]
    drain(ctx)
    ds = [d for r in res for d in deliveries(ctx, r.notification_id)]
    assert [(d.status, d.provider) for d in ds] == [("sent", "sns")] * 3  # nothing lost
    sent_to = sorted(r["phone"] for r in aws.recorder.all() if r["service"] == "sns")
    assert sent_to == sorted(d.address for d in ds) and twilio.messages == []

    # every SMS provider down: an OTP becomes a Twilio voice call
    twilio.faults.clear()
    aws.faults.add({"status": 503, "code": "ServiceUnavailable", "message": "down", "count": -1})
    ctx2 = contexts(sandboxes, sms=["twilio", "sns"], voice=["twilio"])
    twilio.faults.add({"status": 503, "body": {"code": 20500, "message": "down"}, "count": -1, "match": "Messages"})
    otp = send(ctx2, template_id="otp_code", channels=["sms"], data={"code": "482913", "minutes": 10})
    drain(ctx2)
    [d] = deliveries(ctx2, otp.notification_id)
    assert d.status == "sent" and d.provider == "twilio:voice"
    [call] = twilio.calls
    assert call["to"] == ALICE_PHONE and call["sid"] == d.provider_message_id
    assert "4 8 2 9 1 3" in call["twiml"]


def test_marketing_batch_is_one_sendgrid_request_with_per_recipient_links(
    sandboxes: SandboxSet, home: Path, redis_url: str, rclient: Any
) -> None:
    """Marketing email carries a per-recipient unsubscribe link and open pixel: they travel as
    SendGrid substitutions, so the batch is still one request, and each recipient gets their own."""
    from notifyctl.unsubscribe import secret_key, verify_token
    from tests.util import pixel_token
    from worker.pipeline import Runtime, process

    settings = make_settings(home, redis_url, rate_limits=[], provider_options=sandboxes.provider_options,
                             providers_email=["sendgrid"], public_url="https://notify.example.com",
                             postal_address="1 Main St, Springfield")  # fmt: skip
    ctx = Context(settings)
    try:
        seed(ctx)
        promo = {"template_id": "weekly_promo", "channels": ["email"], "data": {"first_name": "Friend",
                 "discount": 15, "code": "FALL15"}}  # fmt: skip
        nids = [send(ctx, recipient_id=u, **promo).notification_id for u in ("alice", "bob")]
        sg = sandboxes.sandboxes["sendgrid"]
        before = len(sg.accepted_requests)
        stats = process(Runtime(ctx), nids)
        assert stats.sent == 2
        assert sg.accepted_requests[before:] == [2]  # one body for both, the links as substitutions
        mails = {m["to"]: m for m in sg.recorder.all()}
        key = secret_key(settings)
        for user, nid in zip(("alice", "bob"), nids, strict=True):
            mail = mails[f"{user}@example.com"]
            text, body = mail["content"]["text/plain"], mail["content"]["text/html"]
            assert "%%notifyctl:" not in text + body + mail["subject"]
            url = mail["headers"]["List-Unsubscribe"].strip("<>")
            assert verify_token(key, url.rsplit("/", 1)[1]) == (user, "marketing")
            assert f"Unsubscribe: {url}" in text and f'<a href="{url}">Unsubscribe</a>' in body
            assert "1 Main St, Springfield" in text
            [d] = deliveries(ctx, nid)
            assert f'<img src="https://notify.example.com/o/{pixel_token(key, d.id)}.gif"' in body
            assert mail["custom_args"]["delivery_id"] == d.id
    finally:
        ctx.close()
        dispose_all()


def test_template_text_that_looks_like_a_token_is_sent_as_is(
    sandboxes: SandboxSet, home: Path, redis_url: str, rclient: Any
) -> None:
    from worker.pipeline import Runtime, process

    settings = make_settings(home, redis_url, rate_limits=[], provider_options=sandboxes.provider_options,
                             providers_email=["sendgrid"], public_url="https://notify.example.com")  # fmt: skip
    ctx = Context(settings)
    try:
        seed(ctx)
        code = "%%notifyctl:unsubscribe%%"
        nid = send(ctx, template_id="weekly_promo", channels=["email"],
                   data={"first_name": "F", "discount": 5, "code": code}).notification_id  # fmt: skip
        assert process(Runtime(ctx), [nid]).sent == 1
        [mail] = sandboxes.sandboxes["sendgrid"].recorder.all()
        url = mail["headers"]["List-Unsubscribe"].strip("<>")
        text = mail["content"]["text/plain"]
        assert f"use the code {code} at checkout" in text  # the user's data, untouched
        assert f"Unsubscribe: {url}" in text
    finally:
        ctx.close()
        dispose_all()


def test_personalised_template_is_one_sendgrid_request_with_each_recipients_values(
    sandboxes: SandboxSet, home: Path, redis_url: str, rclient: Any, tmp_path: Path
) -> None:
    """``{{ user.first_name }}`` differs per recipient: it travels as a substitution (escaped for
    the HTML part), so a personalised campaign batch is still one request. A template that does
    more with a user's value than print it (a filter) is rendered per recipient, and still one
    request: the bodies' shared skeleton with each one's own parts as substitutions."""
    from notifyctl.directory import import_users
    from worker.pipeline import Runtime, process

    tdir = tmp_path / "tpl"
    tdir.mkdir()
    (tdir / "hello.toml").write_text(
        'category = "marketing"\npriority = "low"\n[email]\nsubject = "Hi {{ user.first_name }}"\n'
        'html = "<p>Dear {{ user.first_name }}, {{ offer }}</p>"\ntext = "Dear {{ user.first_name }}, {{ offer }}"\n'
    )
    (tdir / "shout.toml").write_text(
        'category = "marketing"\npriority = "low"\n[email]\nsubject = "Hi"\n'
        'html = "<p>{{ user.first_name|upper }}</p>"\ntext = "{{ user.first_name|upper }}"\n'
    )
    settings = make_settings(home, redis_url, rate_limits=[], provider_options=sandboxes.provider_options,
                             providers_email=["sendgrid"], templates_dir=tdir)  # fmt: skip
    ctx = Context(settings)
    try:
        seed(ctx)
        import io

        rep = import_users(ctx, io.StringIO("user_id,email,first_name\ndan,dan@example.com,Dan & <Co>\n"))
        assert rep.errors == []
        users = ("alice", "bob", "dan")
        sg = sandboxes.sandboxes["sendgrid"]
        before = len(sg.accepted_requests)
        nids = [send(ctx, recipient_id=u, template_id="hello", channels=["email"], data={"offer": "2 for 1"})
                .notification_id for u in users]  # fmt: skip
        assert process(Runtime(ctx), nids).sent == 3
        assert sg.accepted_requests[before:] == [3]
        mails = {m["to"]: m for m in sg.recorder.all()}
        assert mails["alice@example.com"]["content"] == {"text/plain": "Dear Alice, 2 for 1",
                                                         "text/html": "<p>Dear Alice, 2 for 1</p>"}  # fmt: skip
        dan = mails["dan@example.com"]
        assert dan["subject"] == "Hi Dan & <Co>"
        assert dan["content"] == {"text/plain": "Dear Dan & <Co>, 2 for 1",
                                  "text/html": "<p>Dear Dan &amp; &lt;Co&gt;, 2 for 1</p>"}  # fmt: skip

        sg.recorder.clear()
        before = len(sg.accepted_requests)
        nids = [send(ctx, recipient_id=u, template_id="shout", channels=["email"]).notification_id for u in users]
        assert process(Runtime(ctx), nids).sent == 3
        assert sg.accepted_requests[before:] == [3]  # different bodies, one skeleton (issue 15)
        mails = {m["to"]: m for m in sg.recorder.all()}
        assert mails["bob@example.com"]["content"]["text/plain"] == "BOB"
        assert mails["dan@example.com"]["content"]["text/html"] == "<p>DAN &amp; &lt;CO&gt;</p>"
    finally:
        ctx.close()
        dispose_all()


def test_segment_with_first_name_is_one_sendgrid_request_not_one_per_recipient(
    sandboxes: SandboxSet, home: Path, redis_url: str, rclient: Any
) -> None:
    """Issue 15: 190 recipients whose data carries their own first_name and code (a segment's
    columns), marketing (unsubscribe link, postal address, pixel): one request, and each gets
    exactly what Jinja renders for them."""
    import io

    from notifyctl.directory import import_users
    from worker.pipeline import Runtime, process

    settings = make_settings(home, redis_url, rate_limits=[], provider_options=sandboxes.provider_options,
                             providers_email=["sendgrid"], public_url="https://notify.example.com",
                             postal_address="1 Main St, Springfield")  # fmt: skip
    ctx = Context(settings)
    try:
        rows = "".join(f"u{i},u{i}@example.com\n" for i in range(190))
        assert import_users(ctx, io.StringIO("user_id,email\n" + rows)).errors == []
        names = [f"N{i} & <b>{'x' * (i % 7)}</b>" for i in range(190)]
        nids = [send(ctx, recipient_id=f"u{i}", template_id="weekly_promo", channels=["email"],
                     data={"first_name": names[i], "discount": 5 + i % 40, "code": f"C{i:04d}"}).notification_id
                for i in range(190)]  # fmt: skip
        sg = sandboxes.sandboxes["sendgrid"]
        before = len(sg.accepted_requests)
        assert process(Runtime(ctx), nids).sent == 190
        assert sg.accepted_requests[before:] == [190]
        template = ctx.templates.get("weekly_promo")
        mails = {m["to"]: m for m in sg.recorder.all()}
        for i in (0, 1, 77, 189):
            mine = template.render("email", {"first_name": names[i], "discount": 5 + i % 40, "code": f"C{i:04d}",
                                             "user": {}})  # fmt: skip
            mail = mails[f"u{i}@example.com"]
            assert mail["subject"] == mine["subject"]
            url = mail["headers"]["List-Unsubscribe"].strip("<>")
            assert mail["content"]["text/plain"] == mine["text"] + f"\n\n--\nUnsubscribe: {url}\n1 Main St, Springfield"
            assert mail["content"]["text/html"].startswith(mine["html"] + "\n")
            assert f'<a href="{url}">Unsubscribe</a>' in mail["content"]["text/html"]
    finally:
        ctx.close()
        dispose_all()
