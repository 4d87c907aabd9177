"""APNs provider against the local HTTP/2 + TLS sandbox, over real sockets."""

from __future__ import annotations

import hashlib
import json
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from notifyctl.settings import Settings
from sandboxes.apns import ApnsSandbox
from tests.net import ClosedPort
from worker.providers.apns import CHECK_TOKEN, Provider, apns_id_for, collapse_id_for
from worker.providers.base import InvalidAddress, Message, Misconfigured, Permanent, Retry, Sent

KEY_ID = "ABC123DEFG"
TEAM_ID = "TEAM123456"
TOPIC = "com.example.app"


def _pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture(scope="module")
def p8() -> str:
    return _pem(ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture
def sandbox(p8: str) -> Iterator[ApnsSandbox]:
    with ApnsSandbox({KEY_ID: p8}, topic=TOPIC, team_id=TEAM_ID) as sb:
        yield sb


@pytest.fixture
def make(sandbox: ApnsSandbox, p8: str, tmp_path: Path) -> Iterator[Any]:
    made: list[Provider] = []

    def factory(**options: Any) -> Provider:
        opts = {
            "key": p8,
            "key_id": KEY_ID,
            "team_id": TEAM_ID,
            "topic": TOPIC,
            "base_url": sandbox.url,
            "ca_file": str(sandbox.ca_file),
            "timeout": 5,
            **options,
        }
        p = Provider(Settings(home=tmp_path, provider_options={"apns": opts}))
        made.append(p)
        return p

    yield factory
    for p in made:
        p.close()


def token(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()  # 64 hex chars, like a real device token


def msg(i: int, **kw: Any) -> Message:
    base: dict[str, Any] = {
        "delivery_id": f"d-{i}",
        "notification_id": f"n-{i}",
        "channel": "push",
        "route": "push.ios",
        "address": token(i),
        "content": {"title": f"Hello {i}", "body": "World"},
        "category": "transactional",
        "priority": "normal",
    }
    base.update(kw)
    return Message(**base)


def test_success_headers_and_payload_checked_at_the_sandbox(make: Any, sandbox: ApnsSandbox) -> None:
    p = make()
    msgs = [
        msg(1, dedup_key="order-42", data={"order": "42"}),
        msg(2, priority="low"),
        msg(3, priority="high"),
    ]
    before = int(time.time())
    out = p.send(msgs)
    assert out == [Sent(apns_id_for(m.delivery_id)) for m in msgs]
    rec = {r["token"]: r for r in sandbox.recorder.all()}
    assert set(rec) == {token(1), token(2), token(3)}
    r1 = rec[token(1)]
    assert r1["topic"] == TOPIC and r1["push_type"] == "alert"
    assert r1["apns_id"] == apns_id_for("d-1")
    assert r1["collapse_id"] == "order-42"
    assert r1["payload"] == {"aps": {"alert": {"title": "Hello 1", "body": "World"}, "sound": "default"}, "order": "42"}
    assert before + 86400 <= int(r1["expiration"]) <= int(time.time()) + 86400
    assert [rec[token(i)]["priority"] for i in (1, 2, 3)] == ["10", "5", "10"]
    assert rec[token(2)]["collapse_id"] is None
    # the same delivery retried carries the same apns-id
    assert p.send([msg(1)]) == [Sent(apns_id_for("d-1"))]
    assert apns_id_for("d-1") != apns_id_for("d-2")
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/notifyctl/apns-id")
    for d in ("d-1", "d_01m8a7xyz", "é-ü-42", ""):  # the same ids as every earlier version sent
        assert apns_id_for(d) == str(uuid.uuid5(namespace, d)).upper()


REASONS = [
    # (status, reason, response headers, expected outcome)
    (410, "Unregistered", {}, InvalidAddress("Unregistered")),
    (410, "ExpiredToken", {}, InvalidAddress("ExpiredToken")),
    # 410 means "the token is no longer active" whatever the reason: one APNs adds later is still one
    (410, "TokenGoneForAReasonNotYetDocumented", {}, InvalidAddress("TokenGoneForAReasonNotYetDocumented")),
    (400, "BadDeviceToken", {}, InvalidAddress("BadDeviceToken")),
    (400, "DeviceTokenNotForTopic", {}, Permanent("DeviceTokenNotForTopic")),
    (400, "BadCollapseId", {}, Permanent("BadCollapseId")),
    (400, "TopicDisallowed", {}, Permanent("TopicDisallowed")),
    (413, "PayloadTooLarge", {}, Permanent("PayloadTooLarge")),
    (403, "InvalidProviderToken", {}, Permanent("InvalidProviderToken")),
    (403, "MissingProviderToken", {}, Permanent("MissingProviderToken")),
    (404, "BadPath", {}, Permanent("BadPath")),
    (429, "TooManyRequests", {"retry-after": "7"}, Retry("TooManyRequests", 7.0, throttled=True)),
    # issue 20: our token changes, not the message: a throttle (no attempt used, no circuit failure)
    (429, "TooManyProviderTokenUpdates", {}, Retry("TooManyProviderTokenUpdates", 60.0, throttled=True)),
    (500, "InternalServerError", {}, Retry("InternalServerError", None)),
    (503, "ServiceUnavailable", {"retry-after": "30"}, Retry("ServiceUnavailable", 30.0)),
    (503, "Shutdown", {}, Retry("Shutdown", None)),
]


@pytest.mark.parametrize(("status", "reason", "headers", "expected"), REASONS, ids=[r[1] for r in REASONS])
def test_reason_table(make: Any, sandbox: ApnsSandbox, status: int, reason: str, headers: dict, expected: Any) -> None:
    p = make()
    sandbox.faults.add({"status": status, "reason": reason, "headers": headers, "match": token(7)})
    out = p.send([msg(6), msg(7), msg(8)])
    assert out[1] == expected
    assert out[0] == Sent(apns_id_for("d-6")) and out[2] == Sent(apns_id_for("d-8"))
    assert sandbox.requests.count(f"/3/device/{token(7)}") == 1  # answered: never resent


def test_real_checks_of_the_sandbox(make: Any, sandbox: ApnsSandbox) -> None:
    sandbox.unregistered.add(token(2))
    out = make().send([msg(1), msg(2)])
    assert out == [Sent(apns_id_for("d-1")), InvalidAddress("Unregistered")]
    assert make(topic="com.other.app").send([msg(3)]) == [Permanent("TopicDisallowed")]
    other = _pem(ec.generate_private_key(ec.SECP256R1()))
    assert make(key=other).send([msg(4)]) == [Permanent("InvalidProviderToken")]
    assert make(team_id="OTHERTEAM1").send([msg(5)]) == [Permanent("InvalidProviderToken")]
    assert make(key_id="UNKNOWNKID").send([msg(6)]) == [Permanent("InvalidProviderToken")]
    assert [r["token"] for r in sandbox.recorder.all()] == [token(1)]


def test_sandbox_speaks_apns_to_a_foreign_http2_client(sandbox: ApnsSandbox, p8: str) -> None:
    key = serialization.load_pem_private_key(p8.encode(), None)

    def bearer(iat: float, team: str = TEAM_ID) -> dict[str, str]:
        tok = jwt.encode({"iss": team, "iat": int(iat)}, key, algorithm="ES256", headers={"kid": KEY_ID})
        return {"authorization": f"bearer {tok}"}

    base = {"apns-topic": TOPIC, "apns-push-type": "alert"}
    body = b'{"aps":{"alert":"hi"}}'
    with httpx.Client(http2=True, verify=ssl.create_default_context(cafile=sandbox.ca_file), base_url=sandbox.url) as c:
        r = c.post(f"/3/device/{token(1)}", headers={**base, **bearer(time.time())}, content=body)
        assert r.http_version == "HTTP/2" and r.status_code == 200 and r.headers["apns-id"] and r.content == b""
        cases = [
            ({**base}, token(1), body, 403, "MissingProviderToken"),
            ({**base, **bearer(time.time() - 3700)}, token(1), body, 403, "ExpiredProviderToken"),
            ({**base, "authorization": "bearer not.a.jwt"}, token(1), body, 403, "InvalidProviderToken"),
            ({**base, **bearer(time.time())}, "xyz", body, 400, "BadDeviceToken"),
            ({"apns-push-type": "alert", **bearer(time.time())}, token(1), body, 400, "MissingTopic"),
            ({**base, **bearer(time.time()), "apns-collapse-id": "x" * 65}, token(1), body, 400, "BadCollapseId"),
            ({**base, **bearer(time.time())}, token(1), b"x" * 4097, 413, "PayloadTooLarge"),
        ]
        for headers, tok, data, status, reason in cases:
            r = c.post(f"/3/device/{tok}", headers=headers, content=data)
            assert (r.status_code, r.json()["reason"]) == (status, reason)
        sandbox.unregistered.add(token(9))
        r = c.post(f"/3/device/{token(9)}", headers={**base, **bearer(time.time())}, content=body)
        assert r.status_code == 410 and r.json()["reason"] == "Unregistered" and r.json()["timestamp"] > 0
    assert len(sandbox.recorder) == 1


def test_payloads_of_a_batch_that_shares_its_alerts(make: Any, sandbox: ApnsSandbox) -> None:
    # the aps part is serialised once per distinct alert: each push still gets its own data, an
    # "aps" key of the data never replaces ours, and a push without data is the aps alone
    shared = {"title": "Sale", "body": "10% off"}
    msgs = [
        msg(1, content=dict(shared), data={"notification_id": "n-1", "type": "promo"}),
        msg(2, content=dict(shared), data={"notification_id": "n-2", "aps": {"badge": 9}}),
        msg(3, content={"title": "Other", "body": "10% off"}, data={"notification_id": "n-3"}),
        msg(4, content=dict(shared)),
        msg(5, content={"title": "", "body": "Only a body"}, data={"n": 5, "list": [1, "é"]}),
    ]
    assert all(isinstance(o, Sent) for o in make().send(msgs))
    got = {r["token"]: r["payload"] for r in sandbox.recorder.all()}
    aps = {"alert": shared, "sound": "default"}
    assert got == {
        token(1): {"aps": aps, "notification_id": "n-1", "type": "promo"},
        token(2): {"aps": aps, "notification_id": "n-2"},
        token(3): {
            "aps": {"alert": {"title": "Other", "body": "10% off"}, "sound": "default"},
            "notification_id": "n-3",
        },
        token(4): {"aps": aps},
        token(5): {"aps": {"alert": {"body": "Only a body"}, "sound": "default"}, "n": 5, "list": [1, "é"]},
    }


def test_invalid_token_and_oversized_payload_are_never_sent(make: Any, sandbox: ApnsSandbox) -> None:
    out = make().send([msg(1, address="not-a-token"), msg(2, content={"title": "t", "body": "x" * 5000}), msg(3)])
    assert out == [InvalidAddress("BadDeviceToken"), Permanent("PayloadTooLarge"), Sent(apns_id_for("d-3"))]
    assert sandbox.requests == [f"/3/device/{token(3)}"]


def test_jwt_is_reused_across_sends(make: Any, sandbox: ApnsSandbox) -> None:
    p = make()
    for i in range(3):
        assert p.send([msg(i), msg(i + 10)]) == [Sent(apns_id_for(f"d-{i}")), Sent(apns_id_for(f"d-{i + 10}"))]
    assert len(sandbox.tokens_seen) == 1


def test_jwt_is_refreshed_after_token_ttl(make: Any, sandbox: ApnsSandbox) -> None:
    p = make(token_ttl=0.05)
    assert p.send([msg(1)]) == [Sent(apns_id_for("d-1"))]
    time.sleep(0.1)  # the TTL is wall-clock time: nothing to await
    assert p.send([msg(2)]) == [Sent(apns_id_for("d-2"))]
    assert len(sandbox.tokens_seen) == 2


def test_expired_provider_token_mints_a_new_one_and_resends_once(make: Any, sandbox: ApnsSandbox) -> None:
    p = make()
    sandbox.faults.add({"status": 403, "reason": "ExpiredProviderToken", "match": token(1)})
    assert p.send([msg(1)]) == [Sent(apns_id_for("d-1"))]
    assert sandbox.requests.count(f"/3/device/{token(1)}") == 2
    first, second = sandbox.request_auth
    assert first != second  # a fresh JWT on the resend
    assert p.send([msg(3)]) == [Sent(apns_id_for("d-3"))]
    assert sandbox.request_auth[-1] == second  # ... which is kept
    # again on the resend: Retry, not a third attempt
    sandbox.faults.add({"status": 403, "reason": "ExpiredProviderToken", "match": token(2), "count": 2})
    assert p.send([msg(2)]) == [Retry("ExpiredProviderToken")]
    assert sandbox.requests.count(f"/3/device/{token(2)}") == 2


@pytest.mark.parametrize("fault", [{"drop": True}, {"goaway": "Shutdown"}], ids=["drop", "goaway"])
def test_connection_lost_mid_batch_resends_only_unanswered(make: Any, sandbox: ApnsSandbox, fault: dict) -> None:
    p = make(connections=1)
    msgs = [msg(i) for i in range(40)]
    sandbox.faults.add({**fault, "match": token(20)})
    out = p.send(msgs)
    assert out == [Sent(apns_id_for(m.delivery_id)) for m in msgs]
    counts = Counter(r["token"] for r in sandbox.recorder.all())
    assert counts == Counter(token(i) for i in range(40))  # every push accepted exactly once
    assert p.connects == 2
    resent = [t for t, n in Counter(sandbox.requests).items() if n > 1]
    assert f"/3/device/{token(20)}" in resent and len(resent) < 40


def test_connection_lost_twice_gives_retry(make: Any, sandbox: ApnsSandbox) -> None:
    p = make(connections=1)
    sandbox.faults.add({"drop": True, "match": token(1), "count": -1})
    out = p.send([msg(1)])
    assert isinstance(out[0], Retry) and out[0].reason.startswith("connection")
    assert sandbox.requests.count(f"/3/device/{token(1)}") == 2
    sandbox.faults.clear()
    assert p.send([msg(1)]) == [Sent(apns_id_for("d-1"))]


def test_idle_connections_cut_by_the_server_are_reopened(make: Any, sandbox: ApnsSandbox) -> None:
    p = make(connections=2)
    assert p.send([msg(i) for i in range(10)]) == [Sent(apns_id_for(f"d-{i}")) for i in range(10)]
    assert p.connects == 2
    sandbox.drop_connections()
    assert p.send([msg(i) for i in range(10, 20)]) == [Sent(apns_id_for(f"d-{i}")) for i in range(10, 20)]
    assert p.connects == 4
    assert len(sandbox.recorder) == 20


def test_timeout_gives_retry_without_resend(make: Any, sandbox: ApnsSandbox) -> None:
    p = make(timeout=0.2)
    sandbox.faults.add({"delay": 1.0, "match": token(1)})
    assert p.send([msg(1), msg(2)]) == [Retry("timeout waiting for APNs"), Sent(apns_id_for("d-2"))]
    assert sandbox.requests.count(f"/3/device/{token(1)}") == 1


def test_collapse_id_is_at_most_64_bytes(make: Any, sandbox: ApnsSandbox) -> None:
    keys = ["k" * 64, "k" * 65, "é" * 40, "été-42"]
    out = make().send([msg(i, dedup_key=k) for i, k in enumerate(keys)])
    assert all(isinstance(o, Sent) for o in out)
    got = {r["token"]: r["collapse_id"] for r in sandbox.recorder.all()}
    assert got[token(0)] == "k" * 64
    assert got[token(1)] == hashlib.sha256(b"k" * 65).hexdigest() == collapse_id_for("k" * 65)
    assert len(got[token(2)].encode()) == 64 and got[token(2)] != "é" * 40
    assert got[token(3)] == "été-42"  # short and not ASCII: sent as it is, UTF-8


def test_200_pushes_in_one_send_are_in_flight_together(make: Any, sandbox: ApnsSandbox) -> None:
    p = make(connections=2)
    msgs = [msg(i) for i in range(200)]
    # every answer is held 0.3 s: the sandbox counts how many requests it held at once
    sandbox.faults.add({"delay": 0.3, "count": -1})
    out = p.send(msgs)
    assert out == [Sent(apns_id_for(m.delivery_id)) for m in msgs]
    # one at a time (or one per connection) would never have more than 2 waiting together
    assert sandbox.peak_held >= 20, sandbox.peak_held
    assert len(sandbox.recorder) == 200 and p.connects == 2


def test_stream_limit_and_flow_control_are_respected(p8: str, make: Any, tmp_path: Path) -> None:
    with ApnsSandbox({KEY_ID: p8}, topic=TOPIC, max_streams=3) as small:
        p = make(base_url=small.url, ca_file=str(small.ca_file), connections=1)
        big = "x" * 3900  # 100 x ~4 KB > the 64 KB connection window
        msgs = [msg(i, content={"title": "t", "body": big}) for i in range(100)]
        assert p.send(msgs) == [Sent(apns_id_for(m.delivery_id)) for m in msgs]
        assert len(small.recorder) == 100


def test_control_api_on_the_side_port(make: Any, sandbox: ApnsSandbox) -> None:
    assert httpx.get(sandbox.control_url + "/_sandbox/messages").status_code == 401  # the token is needed
    with httpx.Client(base_url=sandbox.control_url, headers=sandbox.control_headers) as c:
        assert c.post("/_sandbox/unregistered", content=json.dumps([token(1)])).status_code == 204
        fault = {"status": 429, "reason": "TooManyRequests", "headers": {"Retry-After": "5"}, "match": token(2)}
        assert c.post("/_sandbox/faults", json=fault).status_code == 204
        out = make().send([msg(1), msg(2), msg(3)])
        assert out == [
            InvalidAddress("Unregistered"),
            Retry("TooManyRequests", 5.0, throttled=True),
            Sent(apns_id_for("d-3")),
        ]
        assert [m["token"] for m in c.get("/_sandbox/messages").json()] == [token(3)]
        assert c.delete("/_sandbox/unregistered").status_code == 204
        assert make().send([msg(1)]) == [Sent(apns_id_for("d-1"))]


def test_check_describe_and_secrets(
    make: Any, sandbox: ApnsSandbox, p8: str, tmp_path: Path, closed_port: ClosedPort
) -> None:
    p = make()
    assert p.check() is None
    # check() delivers nothing: one push to a token no device has (answered 400 BadDeviceToken)
    assert sandbox.requests == [f"/3/device/{CHECK_TOKEN}"] and len(sandbox.recorder) == 0
    d = p.describe()
    assert d["base_url"] == sandbox.url and d["key"] == "(set)" and d["key_id"] == KEY_ID
    body = p8.splitlines()[1]
    assert body not in json.dumps(d) and body not in repr(p.config) and body not in str(p.config)
    dead = make(base_url=closed_port.url("https"))
    problem = dead.check()
    assert problem and problem.startswith("cannot connect") and "\n" not in problem
    assert isinstance(dead.send([msg(1)])[0], Retry)


def test_key_file_and_sandbox_switch(make: Any, p8: str, tmp_path: Path) -> None:
    f = tmp_path / "AuthKey.p8"
    f.write_text(p8)
    p = make(key=None, key_file=str(f))
    assert p.send([msg(1)]) == [Sent(apns_id_for("d-1"))]
    assert p.describe()["key"] == f"file {f}"
    q = make(base_url="https://api.push.apple.com", use_sandbox=True)
    assert q.base_url == "https://api.sandbox.push.apple.com"


@pytest.mark.parametrize(
    "options",
    [
        {"key": None},
        {"key": "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"},
        {"topic": ""},
        {"token_ttl": 7200},
        {"base_url": "http://api.push.apple.com"},
        {"key": None, "key_file": "/nonexistent/AuthKey.p8"},
    ],
    ids=["no-key", "bad-pem", "no-topic", "ttl-over-1h", "not-https", "missing-file"],
)
def test_misconfigured(make: Any, options: dict) -> None:
    with pytest.raises(Misconfigured) as exc:
        make(**options)
    assert "PRIVATE KEY" not in str(exc.value)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({}, None),
        ({"key_id": "WRONGKEY01"}, "InvalidProviderToken"),
        ({"team_id": "WRONGTEAM1"}, "InvalidProviderToken"),
    ],
    ids=["good", "wrong-key-id", "wrong-team-id"],
)
def test_providers_check_tells_a_wrong_key_id_or_team_id(
    sandbox: ApnsSandbox, p8: str, settings: Settings, change: dict, problem: str | None
) -> None:
    """Issue 20: `providers check` used to report ok for a wrong key id (it only signed and
    connected); the first real send then dead-lettered. Nothing is delivered either way."""
    from typer.testing import CliRunner

    from notifyctl.cli import providers
    from tests.conftest import cli_env

    opts = {"KEY": p8, "KEY_ID": KEY_ID, "TEAM_ID": TEAM_ID, "TOPIC": TOPIC, "BASE_URL": sandbox.url,
            "CA_FILE": str(sandbox.ca_file)} | {k.upper(): v for k, v in change.items()}  # fmt: skip
    env = cli_env(settings, NOTIFY_CONFIG="/nonexistent.toml", NOTIFY_PROVIDERS_PUSH_IOS='["apns"]',
                  NOTIFY_PROVIDERS_PUSH_ANDROID="[]", NOTIFY_PROVIDERS_EMAIL="[]", NOTIFY_PROVIDERS_SMS="[]",
                  **{f"NOTIFY_APNS_{k}": v for k, v in opts.items()})  # fmt: skip
    res = CliRunner().invoke(providers.app, ["check", "--json"], env=env)
    [row] = json.loads(res.stdout)
    if problem is None:
        assert res.exit_code == 0 and row["ok"], res.output
    else:
        assert res.exit_code == 1 and not row["ok"] and problem in row["problem"], res.output
        assert (change.get("key_id") or change.get("team_id")) in row["problem"]
    assert sandbox.requests == [f"/3/device/{CHECK_TOKEN}"] and len(sandbox.recorder) == 0


def test_without_ca_file_the_system_trust_store_is_used(make: Any) -> None:
    """pycurl's bundled libcurl looks for Red Hat's CA bundle path, absent on Debian: without a
    ``ca_file`` the providers must hand it the system's own, or TLS to the real APNs fails."""
    from worker.providers.h2mux import Mux, system_ca

    cafile, capath = system_ca()
    assert (cafile and Path(cafile).is_file()) or (capath and Path(capath).is_dir())
    mux = Mux()
    try:
        assert (mux.ca_file, mux.ca_path) == (cafile, capath)
    finally:
        mux.close()
    p = make(ca_file=None)  # the sandbox's CA is not in the system store: refused, not trusted
    out = p.send([msg(1)])
    assert isinstance(out[0], Retry) and "connection" in out[0].reason
