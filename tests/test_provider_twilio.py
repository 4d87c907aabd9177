"""Twilio provider (the real ``twilio`` SDK) against the Twilio sandbox, over real TCP."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from notifyctl.settings import Settings
from sandboxes.twilio import TwilioSandbox
from tests.net import ClosedPort
from worker.providers.base import InvalidAddress, Message, Misconfigured, Permanent, Retry, Sent
from worker.providers.twilio import Provider, voice_twiml

ACCOUNT_SID = "AC" + os.urandom(16).hex()
AUTH_TOKEN = os.urandom(16).hex()
SERVICE_SID = "MG" + os.urandom(16).hex()
FROM = "+15557650000"
STOPPED = "+15551110000"
LANDLINE = "+15552220000"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("TWILIO_"):  # the Twilio SDK's own
            monkeypatch.delenv(name)


@pytest.fixture
def sandbox() -> Iterator[TwilioSandbox]:
    with TwilioSandbox(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, stopped={STOPPED}, landlines={LANDLINE}) as sb:
        yield sb


def make_provider(tmp_path: Path, url: str, **options: Any) -> Provider:
    opts = {
        "account_sid": ACCOUNT_SID,
        "auth_token": AUTH_TOKEN,
        "from_number": FROM,
        "base_url": url,
        "status_callback_url": "https://hooks.notify.example/twilio/status?k=v",
        **options,
    }
    return Provider(Settings(home=tmp_path, provider_options={"twilio": opts}))


@pytest.fixture
def provider(tmp_path: Path, sandbox: TwilioSandbox) -> Iterator[Provider]:
    p = make_provider(tmp_path, sandbox.url)
    yield p
    p.close()


def sms(i: int, to: str | None = None, text: str = "Your code is 123456", route: str = "sms") -> Message:
    return Message(
        delivery_id=f"dlv-{i}",
        notification_id=f"ntf-{i}",
        channel="sms",
        route=route,
        address=to or f"+1555300{i:04d}",
        content={"text": text},
        category="transactional",
        priority="high",
    )


# --------------------------------------------------------------------------- success


def test_sms_success_shape(provider: Provider, sandbox: TwilioSandbox) -> None:
    (out,) = provider.send([sms(7)])
    assert isinstance(out, Sent)
    assert re.fullmatch(r"SM[0-9a-f]{32}", out.provider_message_id)
    (rec,) = sandbox.messages
    assert rec["sid"] == out.provider_message_id
    assert (rec["to"], rec["from"], rec["body"]) == ("+15553000007", FROM, "Your code is 123456")
    assert rec["messaging_service_sid"] is None
    assert rec["account_sid"] == ACCOUNT_SID
    callback = urlsplit(rec["status_callback"])
    assert (callback.netloc, callback.path) == ("hooks.notify.example", "/twilio/status")
    assert parse_qs(callback.query) == {"k": ["v"], "delivery_id": ["dlv-7"]}


def test_messaging_service_is_used_when_configured(tmp_path: Path, sandbox: TwilioSandbox) -> None:
    p = make_provider(tmp_path, sandbox.url, messaging_service_sid=SERVICE_SID, status_callback_url=None)
    try:
        (out,) = p.send([sms(1)])
        assert isinstance(out, Sent)
        (rec,) = sandbox.messages
        assert rec["messaging_service_sid"] == SERVICE_SID and rec["from"] is None
        assert rec["status_callback"] is None
    finally:
        p.close()


def test_voice_call(provider: Provider, sandbox: TwilioSandbox) -> None:
    (out,) = provider.send([sms(3, text="Your code is 482913 <now>", route="voice")])
    assert isinstance(out, Sent)
    assert re.fullmatch(r"CA[0-9a-f]{32}", out.provider_message_id)
    (call,) = sandbox.calls
    assert call["sid"] == out.provider_message_id
    assert (call["to"], call["from"]) == ("+15553000003", FROM)
    assert call["twiml"] == "<Response><Say>Your code is 4 8 2 9 1 3 &lt;now&gt;</Say></Response>"
    assert sandbox.messages == []


def test_voice_twiml() -> None:
    assert voice_twiml("Code 12") == "<Response><Say>Code 1 2</Say></Response>"


def test_voice_needs_a_from_number(tmp_path: Path, sandbox: TwilioSandbox) -> None:
    p = make_provider(tmp_path, sandbox.url, from_number=None, messaging_service_sid=SERVICE_SID)
    try:
        voice, text = p.send([sms(1, route="voice"), sms(2)])
        assert isinstance(voice, Permanent) and "from_number" in voice.reason
        assert isinstance(text, Sent)
    finally:
        p.close()


# --------------------------------------------------------------------------- errors the sandbox itself finds


@pytest.mark.parametrize(
    ("to", "kind", "texts"),
    [
        pytest.param("555-0100", InvalidAddress, ("21211",), id="21211-not-e164"),
        pytest.param("+15005550001", InvalidAddress, ("21211",), id="21211-magic"),
        pytest.param(STOPPED, InvalidAddress, ("21610", "unsubscribed"), id="21610-stop"),
        pytest.param("+15005550004", InvalidAddress, ("21610", "unsubscribed"), id="21610-magic"),
        pytest.param(LANDLINE, InvalidAddress, ("21614",), id="21614-landline"),
        pytest.param("+15005550002", Permanent, ("21612",), id="21612-unroutable"),
        pytest.param("+15005550003", Permanent, ("21408",), id="21408-region"),
    ],
)
def test_address_errors(provider: Provider, sandbox: TwilioSandbox, to: str, kind: type, texts: tuple[str]) -> None:
    bad, good = provider.send([sms(1, to=to), sms(2)])
    assert type(bad) is kind
    for text in texts:
        assert text in bad.reason
    assert isinstance(good, Sent)
    assert [m["to"] for m in sandbox.messages] == ["+15553000002"]


def test_body_too_long_is_permanent(provider: Provider, sandbox: TwilioSandbox) -> None:
    (out,) = provider.send([sms(1, text="x" * 1601)])
    assert isinstance(out, Permanent) and "21617" in out.reason


# --------------------------------------------------------------------------- injected faults


def _twilio_error(status: int, code: int, message: str = "error") -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


FAULTS = [
    # (fault, outcome type, expected retry_after, text in reason)
    pytest.param(
        {
            "status": 429,
            "body": _twilio_error(429, 20429, "Too Many Requests"),
            "headers": {"Retry-After": "9"},
        },
        Retry,
        9.0,
        "20429",
        id="20429-retry-after",
    ),
    pytest.param({"status": 429, "body": ""}, Retry, None, "too many", id="http-429-no-body"),
    pytest.param(
        {"status": 500, "body": _twilio_error(500, 20500, "Internal Server Error")},
        Retry,
        None,
        "500",
        id="500",
    ),
    pytest.param({"status": 503, "body": "", "headers": {"Retry-After": "4"}}, Retry, 4.0, "503", id="503-retry-after"),
    pytest.param({"drop": True}, Retry, None, "network", id="dropped-connection"),
    pytest.param(
        {"status": 400, "body": _twilio_error(400, 30003, "Unreachable destination handset")},
        Permanent,
        None,
        "30003",
        id="30003",
    ),
    pytest.param(
        {"status": 400, "body": _twilio_error(400, 30005, "Unknown destination handset")},
        Permanent,
        None,
        "30005",
        id="30005",
    ),
    pytest.param(
        {"status": 400, "body": _twilio_error(400, 30006, "Landline or unreachable carrier")},
        Permanent,
        None,
        "30006",
        id="30006",
    ),
    pytest.param(
        {"status": 400, "body": _twilio_error(400, 21602, "Message body is required.")},
        Permanent,
        None,
        "21602",
        id="other-400",
    ),
    pytest.param(
        {"status": 403, "body": _twilio_error(403, 20003, "Authenticate")}, Permanent, None, "20003", id="403"
    ),
    pytest.param({"status": 404, "body": _twilio_error(404, 20404, "Not found")}, Permanent, None, "20404", id="404"),
]


@pytest.mark.parametrize(("fault", "kind", "retry_after", "text"), FAULTS)
def test_fault_table(
    provider: Provider, sandbox: TwilioSandbox, fault: dict[str, Any], kind: type, retry_after: Any, text: str
) -> None:
    sandbox.faults.add({**fault, "match": "To=%2B15553000001"})
    bad, good = provider.send([sms(1), sms(2)])
    assert type(bad) is kind
    assert text.lower() in bad.reason.lower()
    if kind is Retry:
        assert bad.retry_after == retry_after
    assert isinstance(good, Sent)
    assert [m["to"] for m in sandbox.messages] == ["+15553000002"]


def test_wrong_token(tmp_path: Path, sandbox: TwilioSandbox) -> None:
    p = make_provider(tmp_path, sandbox.url, auth_token="0" * 32)
    try:
        (out,) = p.send([sms(1)])
        assert isinstance(out, Permanent) and "20003" in out.reason
        problem = p.check()
        assert problem is not None and "credentials rejected" in problem
        assert "0" * 32 not in problem + out.reason
        assert sandbox.messages == []
    finally:
        p.close()


def test_check(tmp_path: Path, provider: Provider, sandbox: TwilioSandbox) -> None:
    assert provider.check() is None
    assert sandbox.api_requests == 1 and len(sandbox.recorder) == 0
    with TwilioSandbox() as gone:
        url = gone.url  # closed on exit: connections are refused
    p = make_provider(tmp_path, url, timeout=0.5)
    try:
        problem = p.check()
        assert problem is not None and "cannot reach" in problem
        (out,) = p.send([sms(1)])
        assert isinstance(out, Retry) and "network" in out.reason
    finally:
        p.close()


def test_timeout_is_retry(tmp_path: Path, sandbox: TwilioSandbox) -> None:
    p = make_provider(tmp_path, sandbox.url, timeout=0.2)
    try:
        sandbox.faults.add({"delay": 0.6})
        (out,) = p.send([sms(1)])
        assert isinstance(out, Retry)
    finally:
        p.close()


# --------------------------------------------------------------------------- concurrency and pooling


@pytest.mark.parametrize("concurrency", [4, 16])
def test_concurrency(tmp_path: Path, sandbox: TwilioSandbox, concurrency: int) -> None:
    p = make_provider(tmp_path, sandbox.url, concurrency=concurrency)
    try:
        delay, n = 0.1, concurrency * 3
        sandbox.faults.add({"delay": delay, "count": -1})
        out = p.send([sms(i) for i in range(n)])
        sandbox.faults.clear()
        assert all(isinstance(o, Sent) for o in out)
        # outcomes keep the order of the batch
        sids = {m["to"]: m["sid"] for m in sandbox.messages}
        assert [o.provider_message_id for o in out] == [sids[f"+1555300{i:04d}"] for i in range(n)]
        assert sandbox.max_in_flight == concurrency  # counted at the sandbox, not timed
        # connections are pooled: never more than the concurrency, also over a second batch
        p.send([sms(i) for i in range(n, 2 * n)])
        assert len(sandbox.connections) <= concurrency
        assert sandbox.api_requests == 2 * n
    finally:
        p.close()


def test_messages_and_calls_reuse_one_connection(provider: Provider, sandbox: TwilioSandbox) -> None:
    """One request after another goes over one kept-alive connection: each URL's origin pool and
    request target looked up once (``RoutedHttpClient._target``), a message's and a call's URL
    sharing their origin's pool."""
    out = [provider.send([sms(i)])[0] for i in range(3)]
    out += provider.send([sms(3, route="voice")])
    assert all(isinstance(o, Sent) for o in out), out
    assert len(sandbox.messages) == 3 and len(sandbox.calls) == 1
    assert sandbox.api_requests == 4 and len(sandbox.connections) == 1
    targets = provider._http._targets
    assert sorted(t for _pool, t in targets.values()) == [
        f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json",
        f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json",
    ]
    assert len({id(pool) for pool, _t in targets.values()}) == 1


# --------------------------------------------------------------------------- configuration


def test_describe_masks_the_token(provider: Provider) -> None:
    d = provider.describe()
    assert d["auth_token"] == "****" + AUTH_TOKEN[-4:]
    assert d["account_sid"] == ACCOUNT_SID
    assert all(AUTH_TOKEN not in v for v in d.values())
    assert AUTH_TOKEN not in repr(provider.config)


@pytest.mark.parametrize(
    ("options", "text"),
    [
        pytest.param({"account_sid": None}, "account_sid", id="no-sid"),
        pytest.param({"account_sid": "AC123"}, "account_sid", id="bad-sid"),
        pytest.param({"auth_token": None}, "auth_token", id="no-token"),
        pytest.param({"from_number": None}, "from_number", id="no-sender"),
        pytest.param({"base_url": "api.twilio.com"}, "base_url", id="bad-url"),
        pytest.param({"concurrency": 0}, "concurrency", id="bad-concurrency"),
    ],
)
def test_misconfigured(tmp_path: Path, options: dict[str, Any], text: str, closed_port: ClosedPort) -> None:
    with pytest.raises(Misconfigured, match=text) as info:
        make_provider(tmp_path, closed_port.url(), **options)
    assert AUTH_TOKEN not in str(info.value)


# --------------------------------------------------------------------------- the sandbox itself


def test_sandbox_wire_format(sandbox: TwilioSandbox) -> None:
    url = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    with httpx.Client(base_url=sandbox.url) as c:
        r = c.post(url, data={"To": "+15550001111", "From": FROM, "Body": "hi"})
        assert r.status_code == 401
        assert r.json() == {
            "code": 20003,
            "message": "Authenticate",
            "more_info": "https://www.twilio.com/docs/errors/20003",
            "status": 401,
        }
        auth = (ACCOUNT_SID, AUTH_TOKEN)
        r = c.post(url, data={"To": "+15550001111", "From": FROM}, auth=auth)
        assert r.status_code == 400 and r.json()["code"] == 21602
        r = c.post(url, data={"To": "+15550001111", "From": FROM, "Body": "hi"}, auth=auth)
        assert r.status_code == 201
        msg = r.json()
        assert msg["status"] == "queued" and msg["direction"] == "outbound-api"
        assert (msg["to"], msg["from"], msg["body"], msg["account_sid"]) == (
            "+15550001111",
            FROM,
            "hi",
            ACCOUNT_SID,
        )
        assert msg["uri"] == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{msg['sid']}.json"
        other = "AC" + "f" * 32
        r = c.post(f"/2010-04-01/Accounts/{other}/Messages.json", data={"To": "+15550001111", "Body": "x"}, auth=auth)
        assert r.status_code == 404 and r.json()["code"] == 20404
    assert len(sandbox.messages) == 1


# --------------------------------------------------------------------------- proxy from the environment


class _ForwardProxy:
    """A plain-HTTP forward proxy on a real socket: takes requests for absolute URIs (as a client
    configured with ``HTTP_PROXY`` sends them), records each, and relays it to its origin."""

    def __init__(self) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen = self.seen = []  # type: list[str]

        class Handler(BaseHTTPRequestHandler):
            def _relay(self) -> None:
                seen.append(f"{self.command} {self.path}")
                u = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(u.hostname or "", u.port or 80, timeout=10)
                hdrs = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "connection")}
                conn.request(self.command, u.path + (f"?{u.query}" if u.query else ""), body=body or None, headers=hdrs)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = _relay

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("bypass", [False, True], ids=["proxied", "no_proxy"])
def test_proxy_from_the_environment(
    tmp_path: Path, sandbox: TwilioSandbox, monkeypatch: pytest.MonkeyPatch, bypass: bool
) -> None:
    """The SDK's requests go through the proxy the environment names for the API's scheme
    (``HTTP_PROXY`` here, the sandbox being plain HTTP; ``HTTPS_PROXY`` for Twilio's own API), as
    ``requests`` did, and straight to the API when ``NO_PROXY`` names its host."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    proxy = _ForwardProxy()
    try:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        if bypass:
            monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        p = make_provider(tmp_path, sandbox.url)
        try:
            (out,) = p.send([sms(11)])
        finally:
            p.close()
        assert isinstance(out, Sent)
        if bypass:
            assert proxy.seen == []
        else:
            assert len(proxy.seen) == 1
            assert proxy.seen[0].startswith(f"POST {sandbox.url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json")
    finally:
        proxy.close()
