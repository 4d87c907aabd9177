"""SendGrid provider against the SendGrid sandbox, over real TCP."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from notifyctl.settings import Settings
from sandboxes.sendgrid import SendgridSandbox
from worker.providers.base import InvalidAddress, Message, Misconfigured, Permanent, Retry, Sent
from worker.providers.sendgrid import Provider

API_KEY = "SG.test-" + os.urandom(12).hex()


@pytest.fixture
def sandbox() -> Iterator[SendgridSandbox]:
    with SendgridSandbox(api_key=API_KEY) as sb:
        yield sb


def make_provider(tmp_path: Path, sb: SendgridSandbox | str, **options: Any) -> Provider:
    url = sb if isinstance(sb, str) else sb.url
    opts = {"api_key": API_KEY, "base_url": url, "from_address": "noreply@notify.example", **options}
    return Provider(Settings(home=tmp_path, provider_options={"sendgrid": opts}))


@pytest.fixture
def provider(tmp_path: Path, sandbox: SendgridSandbox) -> Iterator[Provider]:
    p = make_provider(tmp_path, sandbox)
    yield p
    p.close()


def email(i: int, *, html: str = "<p>Hello</p>", text: str = "Hello", subject: str | None = None, **kw: Any) -> Message:
    fields: dict[str, Any] = {
        "delivery_id": f"dlv-{i}",
        "notification_id": f"ntf-{i // 10}",
        "channel": "email",
        "route": "email",
        "address": f"user{i}@example.com",
        "content": {"subject": subject or f"Subject {i}", "html": html, "text": text},
        "category": "transactional",
        "priority": "normal",
        "headers": {"List-Unsubscribe": f"<https://notify.example/u/{i}>"},
    }
    fields.update(kw)
    return Message(**fields)


# --------------------------------------------------------------------------- success


def test_success_shape(provider: Provider, sandbox: SendgridSandbox) -> None:
    msgs = [email(0, html="<p>A</p>"), email(1, html="<p>B</p>")]
    out = provider.send(msgs)
    assert all(isinstance(o, Sent) for o in out)
    recorded = {r["to"]: r for r in sandbox.recorder.all()}
    assert set(recorded) == {"user0@example.com", "user1@example.com"}
    r = recorded["user1@example.com"]
    assert r["subject"] == "Subject 1"
    assert r["from"] == "noreply@notify.example"
    assert r["custom_args"] == {"delivery_id": "dlv-1", "notification_id": "ntf-0"}
    assert r["headers"] == {"List-Unsubscribe": "<https://notify.example/u/1>"}
    assert r["content"] == {"text/plain": "Hello", "text/html": "<p>B</p>"}
    assert r["categories"] == ["transactional"]
    # different bodies: still one request (their skeleton, each one's part as a substitution);
    # the provider id is that request's X-Message-Id
    assert sandbox.accepted_requests == [2]
    assert out[1] == Sent(r["message_id"])
    assert out[0] == out[1] == Sent(recorded["user0@example.com"]["message_id"])


def test_2500_identical_messages_take_3_requests(provider: Provider, sandbox: SendgridSandbox) -> None:
    msgs = [email(i, subject=f"Hi user {i}") for i in range(2500)]
    out = provider.send(msgs)
    assert all(isinstance(o, Sent) for o in out)
    assert sandbox.api_requests == 3
    assert sorted(sandbox.accepted_requests) == [500, 1000, 1000]
    recorded = sandbox.recorder.all()
    assert len(recorded) == 2500
    by_delivery = {r["custom_args"]["delivery_id"]: r for r in recorded}
    assert len(by_delivery) == 2500
    # each personalization keeps its own subject and unsubscribe header; the id is its request's
    r = by_delivery["dlv-1234"]
    assert (r["to"], r["subject"]) == ("user1234@example.com", "Hi user 1234")
    assert r["headers"]["List-Unsubscribe"] == "<https://notify.example/u/1234>"
    assert out[1234] == Sent(r["message_id"])
    assert len({o.provider_message_id for o in out if isinstance(o, Sent)}) == 3


def test_requests_run_concurrently_on_pooled_connections(tmp_path: Path, sandbox: SendgridSandbox) -> None:
    p = make_provider(tmp_path, sandbox, concurrency=4)
    try:
        sandbox.faults.add({"delay": 0.15, "count": -1, "match": "/v3/mail/send"})
        # (one request per category: different bodies of one category would share a request)
        out = p.send([email(i, category=f"c{i}") for i in range(12)])
        sandbox.faults.clear()
        assert all(isinstance(o, Sent) for o in out)
        assert sandbox.max_in_flight == 4  # counted at the sandbox, not timed
        # a second batch reuses the same connections
        p.send([email(i, category=f"c{i}") for i in range(8)])
        assert len(sandbox.connections) <= 4
        assert sandbox.api_requests == 20
    finally:
        p.close()


# --------------------------------------------------------------------------- errors


def _reset_in(seconds: int) -> dict[str, str]:
    return {"X-RateLimit-Reset": str(int(time.time()) + seconds)}


ERROR_TABLE = [
    # (fault, outcome type, retry_after range or None, text in reason)
    pytest.param(
        {
            "status": 400,
            "body": {
                "errors": [
                    {
                        "message": "The from email does not contain a valid address.",
                        "field": "from.email",
                        "help": None,
                    }
                ]
            },
        },
        Permanent,
        None,
        "from email does not contain",
        id="400-global",
    ),
    pytest.param({"status": 400, "body": ""}, Permanent, None, "bad request", id="400-empty"),
    pytest.param(
        {"status": 401, "body": {"errors": [{"message": "authorization required", "field": None}]}},
        Permanent,
        None,
        "401",
        id="401",
    ),
    pytest.param(
        {"status": 403, "body": {"errors": [{"message": "access forbidden", "field": None}]}},
        Permanent,
        None,
        "403",
        id="403",
    ),
    pytest.param({"status": 404, "body": ""}, Permanent, None, "404", id="404"),
    pytest.param({"status": 429, "headers": {"Retry-After": "7"}}, Retry, (7, 7), "429", id="429-retry-after"),
    pytest.param({"status": 429, "headers": "RESET30"}, Retry, (25, 30), "429", id="429-ratelimit-reset"),
    pytest.param({"status": 429}, Retry, None, "429", id="429-bare"),
    pytest.param({"status": 500}, Retry, None, "500", id="500"),
    pytest.param({"status": 502, "headers": {"Retry-After": "3"}}, Retry, (3, 3), "502", id="502-retry-after"),
    pytest.param({"status": 503}, Retry, None, "503", id="503"),
    pytest.param({"drop": True}, Retry, None, "network", id="dropped-connection"),
]


@pytest.mark.parametrize(("fault", "kind", "retry_after", "text"), ERROR_TABLE)
def test_error_table(
    provider: Provider,
    sandbox: SendgridSandbox,
    fault: dict[str, Any],
    kind: type,
    retry_after: Any,
    text: str,
) -> None:
    if fault.get("headers") == "RESET30":
        fault = {**fault, "headers": _reset_in(30)}
    sandbox.faults.add(fault)
    out = provider.send([email(1), email(2)])  # same body: one request, one shared outcome
    assert sandbox.api_requests == 1
    assert len(out) == 2
    for o in out:
        assert type(o) is kind
        assert text.lower() in o.reason.lower()
        if kind is Retry:
            if retry_after is None:
                assert o.retry_after is None
            else:
                assert o.retry_after is not None and retry_after[0] <= o.retry_after <= retry_after[1]
    assert len(sandbox.recorder) == 0


def test_timeout_is_retry(tmp_path: Path, sandbox: SendgridSandbox) -> None:
    p = make_provider(tmp_path, sandbox, timeout=0.2)
    try:
        sandbox.faults.add({"delay": 0.6})
        (o,) = p.send([email(1)])
        assert isinstance(o, Retry) and "timeout" in o.reason
    finally:
        p.close()


def test_wrong_key_is_rejected_by_the_sandbox(tmp_path: Path, sandbox: SendgridSandbox) -> None:
    p = make_provider(tmp_path, sandbox, api_key="SG.wrong-key-0000000000")
    try:
        (o,) = p.send([email(1)])
        assert isinstance(o, Permanent)
        assert "401" in o.reason and "invalid, expired, or revoked" in o.reason
        assert "SG.wrong-key" not in o.reason
        problem = p.check()
        assert problem is not None and "401" in problem
        assert len(sandbox.recorder) == 0
    finally:
        p.close()


def test_key_without_mail_send_scope(tmp_path: Path) -> None:
    with SendgridSandbox(api_key=API_KEY, scopes=("scopes.read",)) as sb:
        p = make_provider(tmp_path, sb)
        try:
            (o,) = p.send([email(1)])
            assert isinstance(o, Permanent) and "403" in o.reason
            assert p.check() == "sendgrid: the API key lacks the mail.send scope"
        finally:
            p.close()


def test_check_ok_and_unreachable(tmp_path: Path, provider: Provider, sandbox: SendgridSandbox) -> None:
    assert provider.check() is None
    assert sandbox.api_requests == 1 and len(sandbox.recorder) == 0
    with SendgridSandbox(api_key=API_KEY) as gone:
        url = gone.url  # closed on exit: connections are refused
    p = make_provider(tmp_path, url, timeout=0.5)
    try:
        problem = p.check()
        assert problem is not None and "cannot reach" in problem
        (o,) = p.send([email(1)])
        assert isinstance(o, Retry) and "network" in o.reason
    finally:
        p.close()


def test_bad_personalization_fails_alone(provider: Provider, sandbox: SendgridSandbox) -> None:
    msgs = [email(i) for i in range(5)]
    msgs[3].address = "someone@localhost"  # passes our check, SendGrid rejects it
    out = provider.send(msgs)
    assert isinstance(out[3], InvalidAddress)
    assert "personalizations.3.to.0.email" in out[3].reason
    assert all(isinstance(o, Sent) for i, o in enumerate(out) if i != 3)
    assert sandbox.api_requests == 2 and sandbox.accepted_requests == [4]
    assert {r["custom_args"]["delivery_id"] for r in sandbox.recorder.all()} == {
        "dlv-0",
        "dlv-1",
        "dlv-2",
        "dlv-4",
    }


def test_413_splits_and_single_too_large_is_permanent(provider: Provider, sandbox: SendgridSandbox) -> None:
    msgs = [email(i) for i in range(10)]
    size = lambda batch: len(json.dumps(provider._body(batch), separators=(",", ":")).encode())  # noqa: E731
    sandbox.max_body_bytes = (size(msgs) + size(msgs[:5])) // 2  # 10 personalizations too large, 5 fit
    out = provider.send(msgs)
    assert all(isinstance(o, Sent) for o in out)
    assert sorted(sandbox.accepted_requests) == [5, 5]
    assert sandbox.api_requests == 3
    sandbox.max_body_bytes = 10
    (o,) = provider.send([email(99)])
    assert isinstance(o, Permanent) and "413" in o.reason


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        pytest.param(email(1, address="not-an-address"), InvalidAddress, id="no-at"),
        pytest.param(email(1, address="a b@example.com"), InvalidAddress, id="space"),
        pytest.param(email(1, subject=" "), Permanent, id="no-subject"),
        pytest.param(email(1, html="", text=""), Permanent, id="no-body"),
        pytest.param(email(1, route="sms"), Permanent, id="wrong-route"),
    ],
)
def test_local_rejections_send_nothing(
    provider: Provider, sandbox: SendgridSandbox, message: Message, kind: type
) -> None:
    out = provider.send([message, email(2)])
    assert type(out[0]) is kind
    assert isinstance(out[1], Sent)
    assert sandbox.accepted_requests == [1]


def test_text_only_and_html_only(provider: Provider, sandbox: SendgridSandbox) -> None:
    out = provider.send([email(1, html=""), email(2, text="")])
    assert all(isinstance(o, Sent) for o in out)
    contents = {r["to"]: r["content"] for r in sandbox.recorder.all()}
    assert contents == {
        "user1@example.com": {"text/plain": "Hello"},
        "user2@example.com": {"text/html": "<p>Hello</p>"},
    }


# --------------------------------------------------------------------------- configuration


def test_describe_masks_the_key(provider: Provider) -> None:
    d = provider.describe()
    assert d["api_key"] == "****" + API_KEY[-4:]
    assert all(API_KEY not in v for v in d.values())
    assert API_KEY not in repr(provider.config) and API_KEY not in str(provider.config)


def test_misconfigured(tmp_path: Path) -> None:
    with pytest.raises(Misconfigured, match="api_key"):
        Provider(Settings(home=tmp_path, provider_options={"sendgrid": {}}))
    with pytest.raises(Misconfigured, match="base_url"):
        Provider(Settings(home=tmp_path, provider_options={"sendgrid": {"api_key": API_KEY, "base_url": "ftp://x"}}))
    with pytest.raises(Misconfigured) as info:
        Provider(Settings(home=tmp_path, provider_options={"sendgrid": {"api_key": API_KEY, "concurrency": 0}}))
    assert API_KEY not in str(info.value)


def test_env_overrides_config_file_options(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sandbox: SendgridSandbox
) -> None:
    monkeypatch.setenv("NOTIFY_SENDGRID_API_KEY", API_KEY)
    monkeypatch.setenv("NOTIFY_SENDGRID_BASE_URL", sandbox.url)
    p = Provider(
        Settings(home=tmp_path, email_from="main@notify.example", provider_options={"sendgrid": {"api_key": "x"}})
    )
    try:
        assert p.describe()["from_address"] == "main@notify.example"
        assert p.check() is None
    finally:
        p.close()


# --------------------------------------------------------------------------- the sandbox itself


def _valid_body() -> dict[str, Any]:
    return {
        "personalizations": [{"to": [{"email": "a@example.com"}], "custom_args": {"delivery_id": "1"}}],
        "from": {"email": "noreply@notify.example"},
        "subject": "Hi",
        "content": [{"type": "text/plain", "value": "x"}],
    }


def _with(path: str, value: Any) -> dict[str, Any]:
    body = _valid_body()
    target: Any = body
    keys = path.split(".")
    for k in keys[:-1]:
        target = target[int(k)] if k.isdigit() else target[k]
    if value is _DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return body


_DELETE = object()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param(_with("personalizations", []), "personalizations", id="no-personalizations"),
        pytest.param(
            _with("personalizations", [{"to": [{"email": f"u{i}@example.com"}]} for i in range(1001)]),
            "personalizations",
            id="1001-personalizations",
        ),
        pytest.param(_with("personalizations.0.to", []), "personalizations.0.to", id="empty-to"),
        pytest.param(
            _with("personalizations.0.custom_args.delivery_id", 1),
            "personalizations.0.custom_args.delivery_id",
            id="custom-arg-int",
        ),
        pytest.param(
            _with("personalizations.0.substitutions", {"-name-": 7}),
            "personalizations.0.substitutions.-name-",
            id="substitution-int",
        ),
        pytest.param(
            _with("personalizations.0.substitutions", {"-big-": "x" * 10_001}),
            "personalizations.0.substitutions",
            id="substitutions-over-10000-bytes",
        ),
        pytest.param(_with("from", _DELETE), "from", id="no-from"),
        pytest.param(_with("subject", _DELETE), "subject", id="no-subject"),
        pytest.param(_with("content", _DELETE), "content", id="no-content"),
        pytest.param(
            _with("content", [{"type": "text/html", "value": "h"}, {"type": "text/plain", "value": "t"}]),
            "content",
            id="plain-not-first",
        ),
    ],
)
def test_sandbox_validates_like_sendgrid(sandbox: SendgridSandbox, body: dict[str, Any], field: str) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=sandbox.url) as c:
        assert c.post("/v3/mail/send", json=_valid_body(), headers=headers).status_code == 202
        r = c.post("/v3/mail/send", json=body, headers=headers)
    assert r.status_code == 400
    errors = r.json()["errors"]
    assert field in [e["field"] for e in errors]
    assert all(set(e) == {"message", "field", "help"} for e in errors)
    assert len(sandbox.recorder) == 1


def test_sandbox_auth_shapes(sandbox: SendgridSandbox) -> None:
    with httpx.Client(base_url=sandbox.url) as c:
        r = c.post("/v3/mail/send", json=_valid_body())
        assert r.status_code == 401 and r.json()["errors"][0]["message"] == "authorization required"
        r = c.post("/v3/mail/send", json=_valid_body(), headers={"Authorization": "Bearer SG.nope"})
        assert r.status_code == 401
        assert r.json() == {
            "errors": [
                {
                    "message": "The provided authorization grant is invalid, expired, or revoked",
                    "field": None,
                    "help": None,
                }
            ]
        }
        r = c.post("/v3/mail/send", json=_valid_body(), headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 202 and r.content == b"" and len(r.headers["X-Message-Id"]) == 22
