"""FCM HTTP v1 provider against the FCM sandbox, over real sockets."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest

from notifyctl.settings import Settings
from sandboxes.fcm import (
    FCM_ERROR_TYPE,
    GOOGLE_TOKEN_URI,
    FcmSandbox,
    error_body,
    fcm_fault,
    make_service_account,
)
from worker.providers.base import InvalidAddress, Message, Misconfigured, Permanent, Retry, Sent
from worker.providers.fcm import Provider, _Bodies, build_message, collapse_key_for

PROJECT = "notifyctl-sandbox"


@pytest.fixture(scope="module")
def _sandbox() -> Iterator[FcmSandbox]:
    with FcmSandbox(project_id=PROJECT) as sb:
        yield sb  # type: ignore[misc]


@pytest.fixture(scope="module")
def rogue_account(_sandbox: FcmSandbox) -> dict[str, Any]:
    """Same client_email as the sandbox's account, different key: the signature check fails."""
    return make_service_account(_sandbox.token_url, PROJECT, client_email=_sandbox.service_account["client_email"])


@pytest.fixture
def sandbox(_sandbox: FcmSandbox) -> FcmSandbox:
    _sandbox.reset()
    return _sandbox


@pytest.fixture
def make_provider(sandbox: FcmSandbox, tmp_path: Path) -> Iterator[Any]:
    made: list[Provider] = []
    sa_file = sandbox.write_service_account(tmp_path / "sa.json")

    def make(**options: Any) -> Provider:
        opts = {"service_account_file": str(sa_file), "base_url": sandbox.url, "timeout": 5.0, **options}
        p = Provider(Settings(home=tmp_path, provider_options={"fcm": opts}))
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def msg(i: int = 0, **kw: Any) -> Message:
    base: dict[str, Any] = {
        "delivery_id": f"dlv-{i}",
        "notification_id": f"ntf-{i}",
        "channel": "push",
        "route": "push.android",
        "address": f"token-{i}",
        "content": {"title": "Hello", "body": f"Message {i}"},
        "category": "transactional",
        "priority": "normal",
    }
    base.update(kw)
    return Message(**base)


# -- success and message shape -----------------------------------------------------------------


def test_send_success_and_exact_message_shape(sandbox: FcmSandbox, make_provider: Any) -> None:
    p = make_provider()
    out = p.send([msg(1, priority="high", dedup_key="order-42", data={"order": "42"})])
    assert len(out) == 1 and isinstance(out[0], Sent)
    assert out[0].provider_message_id.startswith(f"projects/{PROJECT}/messages/0:")
    [rec] = sandbox.recorder.all()
    assert rec["name"] == out[0].provider_message_id
    assert rec["message"] == {
        "token": "token-1",
        "notification": {"title": "Hello", "body": "Message 1"},
        "data": {"order": "42", "delivery_id": "dlv-1"},
        "android": {"priority": "high", "ttl": "86400s", "collapse_key": "order-42"},
    }


@pytest.mark.parametrize(
    ("priority", "dedup_key", "content", "expect_android", "expect_notification"),
    [
        ("normal", None, {"title": "T", "body": "B"}, {"priority": "normal", "ttl": "86400s"}, True),
        ("low", None, {"title": "T", "body": "B"}, {"priority": "normal", "ttl": "86400s"}, True),
        (
            "high",
            "k" * 200,
            {"body": "B"},
            {"priority": "high", "ttl": "86400s", "collapse_key": "HASH"},
            True,
        ),
        ("normal", "x", {}, {"priority": "normal", "ttl": "86400s", "collapse_key": "x"}, False),
    ],
)
def test_message_variants(
    sandbox: FcmSandbox,
    make_provider: Any,
    priority: str,
    dedup_key: str | None,
    content: dict[str, str],
    expect_android: dict[str, str],
    expect_notification: bool,
) -> None:
    out = make_provider().send([msg(7, priority=priority, dedup_key=dedup_key, content=content)])
    assert isinstance(out[0], Sent)
    m = sandbox.recorder.all()[0]["message"]
    if expect_android.get("collapse_key") == "HASH":
        assert dedup_key is not None
        key = m["android"]["collapse_key"]
        assert key == collapse_key_for(dedup_key) and len(key) <= 64 and key != collapse_key_for("other")
        expect_android = {**expect_android, "collapse_key": key}
    assert m["android"] == expect_android
    assert ("notification" in m) is expect_notification
    if expect_notification:
        assert m["notification"] == content


def test_request_bodies_are_the_message_objects_with_shared_parts_serialised_once(
    sandbox: FcmSandbox, make_provider: Any
) -> None:
    # a batch sharing one notification content, and messages unlike it: each body is exactly
    # {"message": build_message(m)}, and each message reaches FCM as built
    shared = {"title": "Sale", "body": "10% off"}
    msgs = [msg(i, content=dict(shared), dedup_key=f"campaign:c1:u{i}", data={"notification_id": f"n{i}"})
            for i in range(3)]  # fmt: skip
    msgs += [
        msg(3, content={"body": "B", "image": "https://example.com/i.png"}, priority="high", dedup_key="k" * 100,
            data={"delivery_id": "theirs", "n": 5, "ok": True, "none": None, "obj": {"a": [1]}}),
        msg(4, content={}, dedup_key=None, data={}),
    ]  # fmt: skip
    bodies = _Bodies()
    for m in msgs:
        assert bodies(m) == orjson.dumps({"message": build_message(m)})
    assert all(isinstance(o, Sent) for o in make_provider().send(msgs))
    got = {r["message"]["token"]: r["message"] for r in sandbox.recorder.all()}
    assert got == {m.address: build_message(m) for m in msgs}
    assert got["token-0"]["notification"] == shared and got["token-3"]["data"]["delivery_id"] == "dlv-3"
    with pytest.raises(ValueError, match="reserved"):
        bodies(msg(5, data={"google.x": "1"}))


def test_data_values_are_coerced_to_strings(sandbox: FcmSandbox, make_provider: Any) -> None:
    data: Any = {
        "n": 5,
        "f": 1.5,
        "yes": True,
        "obj": {"x": [1, 2]},
        "none": None,
        "s": "str",
        "delivery_id": "x",
    }
    out = make_provider().send([msg(3, data=data)])
    assert isinstance(out[0], Sent), out
    sent = sandbox.recorder.all()[0]["message"]["data"]
    assert sent == {
        "n": "5",
        "f": "1.5",
        "yes": "true",
        "obj": '{"x":[1,2]}',
        "s": "str",
        "delivery_id": "dlv-3",
    }
    assert all(isinstance(v, str) for v in sent.values())


def test_sandbox_rejects_non_string_data_like_fcm(sandbox: FcmSandbox, make_provider: Any) -> None:
    """Why coercion matters: FCM answers 400 with a BadRequest field violation."""
    token = make_provider().tokens.get()
    r = httpx.post(
        f"{sandbox.url}/v1/projects/{PROJECT}/messages:send",
        json={"message": {"token": "t", "data": {"a": "ok", "b": 1}}},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["status"] == "INVALID_ARGUMENT" and err["code"] == 400
    assert err["details"][0]["fieldViolations"][0]["field"] == "message.data[1].value"
    assert "TYPE_STRING" in err["message"]
    assert len(sandbox.recorder) == 0


@pytest.mark.parametrize("key", ["from", "google.sent_time", "gcm.n.e", "message_type"])
def test_reserved_data_key_is_permanent_without_a_request(sandbox: FcmSandbox, make_provider: Any, key: str) -> None:
    p = make_provider()
    out = p.send([msg(1, data={key: "v"}), msg(2)])
    assert isinstance(out[0], Permanent) and key in out[0].reason
    assert isinstance(out[1], Sent)
    assert sandbox.send_requests == 1


def test_oversized_payload_is_permanent(sandbox: FcmSandbox, make_provider: Any) -> None:
    out = make_provider().send([msg(1, data={"blob": "x" * 5000})])
    assert isinstance(out[0], Permanent) and "INVALID_ARGUMENT" in out[0].reason
    assert len(sandbox.recorder) == 0


# -- OAuth2 ------------------------------------------------------------------------------------


def test_token_fetched_once_and_reused(sandbox: FcmSandbox, make_provider: Any) -> None:
    p = make_provider()
    for i in range(3):
        assert all(isinstance(o, Sent) for o in p.send([msg(i), msg(i + 10)]))
    assert sandbox.token_requests == 1
    assert p.tokens.fetches == 1
    assert len(sandbox.recorder) == 6


def test_token_refreshed_when_about_to_expire(sandbox: FcmSandbox, make_provider: Any) -> None:
    sandbox.token_expires_in = 30  # inside the refresh margin: stale at once
    p = make_provider()
    assert isinstance(p.send([msg(1)])[0], Sent)
    assert isinstance(p.send([msg(2)])[0], Sent)
    assert sandbox.token_requests == 2


def test_expired_token_is_refused_by_sandbox_and_refreshed(sandbox: FcmSandbox, make_provider: Any) -> None:
    sandbox.token_expires_in = 0  # the sandbox refuses the token at once: 401, refresh, still 401
    p = make_provider()
    out = p.send([msg(1)])
    assert isinstance(out[0], Retry) and "UNAUTHENTICATED" in out[0].reason
    assert sandbox.token_requests == 2 and sandbox.send_requests == 2
    sandbox.token_expires_in = 3600
    assert isinstance(p.send([msg(2)])[0], Sent)


def test_401_refreshes_once_and_resends(sandbox: FcmSandbox, make_provider: Any) -> None:
    p = make_provider()
    assert isinstance(p.send([msg(1)])[0], Sent)
    sandbox.revoke_tokens()
    out = p.send([msg(i) for i in range(2, 22)])
    assert all(isinstance(o, Sent) for o in out), out
    # one refresh shared by all 20 concurrent sends that saw the 401
    assert sandbox.token_requests == 2
    assert len(sandbox.recorder) == 21


def test_401_after_refresh_is_retry(sandbox: FcmSandbox, make_provider: Any) -> None:
    p = make_provider()
    body = error_body(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
    sandbox.faults.add({"status": 401, "body": body, "count": 2, "match": "messages:send"})
    out = p.send([msg(1)])
    assert isinstance(out[0], Retry)
    assert sandbox.token_requests == 2
    assert len(sandbox.recorder) == 0


def test_third_party_auth_error_does_not_refresh(sandbox: FcmSandbox, make_provider: Any) -> None:
    p = make_provider()
    sandbox.faults.add(fcm_fault("THIRD_PARTY_AUTH_ERROR"))
    out = p.send([msg(1)])
    assert isinstance(out[0], Permanent) and "THIRD_PARTY_AUTH_ERROR" in out[0].reason
    assert sandbox.token_requests == 1


def test_untrusted_key_is_retry_for_whole_batch(
    sandbox: FcmSandbox, make_provider: Any, rogue_account: dict[str, Any]
) -> None:
    p = make_provider(service_account_file=None, service_account_json=json.dumps(rogue_account))
    out = p.send([msg(1), msg(2)])
    assert all(isinstance(o, Retry) and "invalid_grant" in o.reason for o in out), out
    assert "Signature" in out[0].reason  # type: ignore[union-attr]
    assert sandbox.send_requests == 0 and sandbox.token_requests == 0


def test_token_endpoint_unreachable_is_retry(sandbox: FcmSandbox, make_provider: Any) -> None:
    with FcmSandbox(service_account=sandbox.service_account) as other:
        dead_url = other.token_url
    out = make_provider(token_url=dead_url).send([msg(1)])
    assert isinstance(out[0], Retry) and "unreachable" in out[0].reason


def test_token_url_override_and_google_audience(sandbox: FcmSandbox, make_provider: Any) -> None:
    """A real-looking JSON (token_uri = Google) with the token endpoint pointed at the sandbox."""
    sa = {**sandbox.service_account, "token_uri": GOOGLE_TOKEN_URI}
    p = make_provider(service_account_file=None, service_account_json=json.dumps(sa), token_url=sandbox.token_url)
    assert isinstance(p.send([msg(1)])[0], Sent)
    assert sandbox.token_requests == 1


def _grant(sandbox: FcmSandbox, claims: dict[str, Any], key: Any = None) -> httpx.Response:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = key or load_pem_private_key(sandbox.service_account["private_key"].encode(), None)
    assertion = jwt.encode(claims, key, algorithm="RS256")
    form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}
    return httpx.post(sandbox.token_url, data=form)


@pytest.mark.parametrize(
    ("change", "error", "fragment"),
    [
        ({}, None, None),
        ({"exp_delta": 7200}, "invalid_grant", "short-lived"),
        ({"iat_delta": -7200, "exp_delta": 3600}, "invalid_grant", "short-lived"),
        ({"aud": "https://elsewhere.example/token"}, "invalid_grant", "audience"),
        ({"iss": "nobody@example.iam.gserviceaccount.com"}, "invalid_grant", "account not found"),
        ({"scope": ""}, "invalid_scope", "scope"),
    ],
)
def test_sandbox_verifies_the_jwt_grant(
    sandbox: FcmSandbox, change: dict[str, Any], error: str | None, fragment: str | None
) -> None:
    now = int(time.time()) + change.get("iat_delta", 0)
    claims = {
        "iss": change.get("iss", sandbox.service_account["client_email"]),
        "scope": change.get("scope", "https://www.googleapis.com/auth/firebase.messaging"),
        "aud": change.get("aud", sandbox.token_url),
        "iat": now,
        "exp": now + change.get("exp_delta", 3600),
    }
    r = _grant(sandbox, claims)
    if error is None:
        assert r.status_code == 200
        body = r.json()
        assert body["token_type"] == "Bearer" and body["expires_in"] == 3600 and body["access_token"]
    else:
        assert r.status_code == 400
        assert r.json()["error"] == error and fragment in r.json()["error_description"]  # type: ignore[operator]


def test_sandbox_send_auth_checks(sandbox: FcmSandbox, make_provider: Any) -> None:
    url = f"{sandbox.url}/v1/projects/{PROJECT}/messages:send"
    body = {"message": {"token": "t"}}
    r = httpx.post(url, json=body)
    assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED"
    r = httpx.post(url, json=body, headers={"Authorization": "Bearer ya29.forged"})
    assert r.status_code == 401 and "WWW-Authenticate" in r.headers
    token = make_provider().tokens.get()
    r = httpx.post(url.replace(PROJECT, "someone-else"), json=body, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403 and r.json()["error"]["status"] == "PERMISSION_DENIED"
    r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    assert len(sandbox.recorder) == 1


# -- error table ---------------------------------------------------------------------------------

HTTP_DATE_IN_2_MIN = "HTTPDATE+120"

ERROR_TABLE = [
    # (fault, outcome type, retry_after: None = must be None, number = approx)
    (fcm_fault("UNREGISTERED"), InvalidAddress, None),
    (fcm_fault("INVALID_ARGUMENT"), Permanent, None),
    (fcm_fault("SENDER_ID_MISMATCH"), Permanent, None),
    (fcm_fault("THIRD_PARTY_AUTH_ERROR"), Permanent, None),
    (fcm_fault("QUOTA_EXCEEDED"), Retry, 60.0),
    (fcm_fault("QUOTA_EXCEEDED", retry_after=5), Retry, 60.0),
    (fcm_fault("QUOTA_EXCEEDED", retry_after=120), Retry, 120.0),
    (fcm_fault("UNAVAILABLE", retry_after=7), Retry, 7.0),
    (fcm_fault("UNAVAILABLE", retry_after=HTTP_DATE_IN_2_MIN), Retry, 120.0),
    (fcm_fault("UNAVAILABLE"), Retry, None),
    (fcm_fault("INTERNAL"), Retry, None),
    (fcm_fault("INTERNAL", retry_after=3), Retry, 3.0),
    (fcm_fault("UNSPECIFIED_ERROR"), Retry, None),
    # no FcmError detail: fall back to error.status
    (fcm_fault("INVALID_ARGUMENT", with_detail=False), Permanent, None),
    (fcm_fault("QUOTA_EXCEEDED", with_detail=False), Retry, 60.0),
    (fcm_fault("UNAVAILABLE", with_detail=False, retry_after=9), Retry, 9.0),
    (fcm_fault("INTERNAL", with_detail=False), Retry, None),
    # NOT_FOUND / PERMISSION_DENIED without an FCM code: configuration, never delete the token
    (fcm_fault("UNREGISTERED", with_detail=False), Retry, None),
    (fcm_fault("SENDER_ID_MISMATCH", with_detail=False), Retry, None),
    # error.status is UNREGISTERED itself
    (
        {"status": 404, "body": {"error": {"code": 404, "status": "UNREGISTERED"}}, "match": ":send"},
        InvalidAddress,
        None,
    ),
    # not Google's JSON at all
    (
        {"status": 502, "body": "<html>Bad Gateway</html>", "headers": {"Content-Type": "text/html"}},
        Retry,
        None,
    ),
    ({"status": 429, "body": "slow down", "headers": {"Content-Type": "text/plain"}}, Retry, 60.0),
    ({"status": 400, "body": "nope", "headers": {"Content-Type": "text/plain"}}, Permanent, None),
    ({"drop": True, "match": ":send"}, Retry, None),
]


@pytest.mark.parametrize(("fault", "kind", "retry_after"), ERROR_TABLE)
def test_error_table(
    sandbox: FcmSandbox, make_provider: Any, fault: dict[str, Any], kind: type, retry_after: float | None
) -> None:
    p = make_provider()
    p.tokens.get()  # so the fault hits the send, not the token request
    fault = json.loads(json.dumps(fault))
    if fault.get("headers", {}).get("Retry-After") == HTTP_DATE_IN_2_MIN:
        from email.utils import formatdate

        fault["headers"]["Retry-After"] = formatdate(time.time() + 120, usegmt=True)
    sandbox.faults.add(fault)
    out = p.send([msg(1), msg(2)])
    # exactly one message hit the fault, the other went through
    kinds = sorted(type(o).__name__ for o in out)
    assert kinds == sorted([kind.__name__, "Sent"]), out
    [bad] = [o for o in out if not isinstance(o, Sent)]
    assert isinstance(bad, kind)
    if kind is Retry:
        assert isinstance(bad, Retry)
        if retry_after is None:
            assert bad.retry_after is None
        else:
            assert bad.retry_after == pytest.approx(retry_after, abs=2)
    assert len(sandbox.recorder) == 1


def test_unregistered_token_from_sandbox_is_invalid_address(sandbox: FcmSandbox, make_provider: Any) -> None:
    sandbox.unregistered.add("token-2")
    out = make_provider().send([msg(1), msg(2), msg(3)])
    assert isinstance(out[0], Sent) and isinstance(out[2], Sent)
    assert isinstance(out[1], InvalidAddress) and "UNREGISTERED" in out[1].reason
    assert [r["message"]["token"] for r in sandbox.recorder.all()].count("token-2") == 0


def test_unregistered_response_has_fcm_shape(sandbox: FcmSandbox, make_provider: Any) -> None:
    sandbox.unregistered.add("dead")
    token = make_provider().tokens.get()
    r = httpx.post(
        f"{sandbox.url}/v1/projects/{PROJECT}/messages:send",
        json={"message": {"token": "dead"}},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 404
    assert r.json()["error"]["status"] == "NOT_FOUND"
    assert r.json()["error"]["details"] == [{"@type": FCM_ERROR_TYPE, "errorCode": "UNREGISTERED"}]


def test_timeout_is_retry(sandbox: FcmSandbox, make_provider: Any) -> None:
    p = make_provider(timeout=0.2)
    p.tokens.get()
    sandbox.faults.add({"delay": 1.0, "match": ":send"})
    out = p.send([msg(1)])
    assert isinstance(out[0], Retry) and "timeout" in out[0].reason


def test_wrong_project_is_retry(sandbox: FcmSandbox, make_provider: Any) -> None:
    out = make_provider(project_id="not-mine").send([msg(1)])
    assert isinstance(out[0], Retry) and "PERMISSION_DENIED" in out[0].reason


# -- throughput ------------------------------------------------------------------------------------


def test_100_concurrent_sends_in_one_batch(sandbox: FcmSandbox, make_provider: Any) -> None:
    p = make_provider(concurrency=32)
    p.tokens.get()
    sandbox.faults.add({"delay": 0.2, "count": 100, "match": ":send"})  # each answer held 0.2 s
    sandbox.peak_active = 0
    out = p.send([msg(i) for i in range(100)])
    assert all(isinstance(o, Sent) for o in out), out
    assert len({o.provider_message_id for o in out}) == 100  # type: ignore[union-attr]
    # counted at the sandbox: many requests in flight together, never more than the concurrency
    assert 8 <= sandbox.peak_active <= 32, sandbox.peak_active
    # in order: outcome i belongs to message i
    by_name = {r["name"]: r["message"]["token"] for r in sandbox.recorder.all()}
    assert [by_name[o.provider_message_id] for o in out] == [f"token-{i}" for i in range(100)]  # type: ignore[union-attr]
    assert sandbox.token_requests == 1
    # pooled: a second batch reuses the connections
    conns = sandbox.connections
    assert conns <= 34
    assert all(isinstance(o, Sent) for o in p.send([msg(i) for i in range(100)]))
    assert sandbox.connections == conns


def test_first_batch_fetches_one_token_under_concurrency(sandbox: FcmSandbox, make_provider: Any) -> None:
    p = make_provider()
    out = p.send([msg(i) for i in range(50)])
    assert all(isinstance(o, Sent) for o in out)
    assert sandbox.token_requests == 1


# -- configuration, describe, check ---------------------------------------------------------------


def test_describe_masks_secrets(sandbox: FcmSandbox, make_provider: Any) -> None:
    sa_json = json.dumps(sandbox.service_account)
    p = make_provider(service_account_file=None, service_account_json=sa_json)
    text = json.dumps(p.describe()) + repr(p.config) + str(p.config)
    key_body = sandbox.service_account["private_key"].splitlines()[1]
    assert key_body not in text
    assert sandbox.service_account["private_key_id"] not in text
    d = p.describe()
    assert d["project_id"] == PROJECT and d["base_url"] == sandbox.url and d["token_url"] == sandbox.token_url
    assert d["service_account"].startswith("(set")
    assert d["private_key_id"].startswith("****")


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"service_account_file": None}, "SERVICE_ACCOUNT"),
        ({"service_account_file": "/nonexistent/sa.json"}, "cannot read"),
        ({"service_account_file": None, "service_account_json": "{not json SECRETKEY"}, "not valid JSON"),
        ({"service_account_file": None, "service_account_json": '{"client_email": "a@b"}'}, "private_key"),
        (
            {
                "service_account_file": None,
                "service_account_json": '{"client_email": "a@b", "private_key": "SECRETKEY"}',
            },
            "PEM",
        ),
        ({"base_url": "fcm.googleapis.com"}, "base_url"),
        ({"concurrency": 0}, "concurrency"),
    ],
)
def test_misconfigured(make_provider: Any, options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(Misconfigured) as exc:
        make_provider(**options)
    assert fragment in str(exc.value)
    assert "SECRETKEY" not in str(exc.value)


def test_project_id_required_when_json_has_none(sandbox: FcmSandbox, make_provider: Any) -> None:
    sa = {k: v for k, v in sandbox.service_account.items() if k != "project_id"}
    with pytest.raises(Misconfigured, match="project_id"):
        make_provider(service_account_file=None, service_account_json=json.dumps(sa))
    p = make_provider(service_account_file=None, service_account_json=json.dumps(sa), project_id=PROJECT)
    assert isinstance(p.send([msg(1)])[0], Sent)


def test_check_ok_sends_nothing(sandbox: FcmSandbox, make_provider: Any) -> None:
    p = make_provider()
    assert p.check() is None
    assert sandbox.token_requests == 1 and sandbox.send_requests == 1
    assert len(sandbox.recorder) == 0


def test_check_reports_bad_key_and_wrong_project(
    sandbox: FcmSandbox, make_provider: Any, rogue_account: dict[str, Any]
) -> None:
    problem = make_provider(service_account_file=None, service_account_json=json.dumps(rogue_account)).check()
    assert problem is not None and "invalid_grant" in problem
    problem = make_provider(project_id="not-mine").check()
    assert problem is not None and "PERMISSION_DENIED" in problem
    with FcmSandbox(service_account=sandbox.service_account) as other:
        dead = other.url
    problem = make_provider(base_url=dead).check()
    assert problem is not None and "unreachable" in problem


def test_control_api_unregistered_and_revoke(sandbox: FcmSandbox, make_provider: Any) -> None:
    p = make_provider()
    assert isinstance(p.send([msg(1)])[0], Sent)
    auth = sandbox.control_headers
    assert httpx.post(f"{sandbox.url}/_sandbox/unregistered", json=["token-5"]).status_code == 401
    assert httpx.post(f"{sandbox.url}/_sandbox/unregistered", json=["token-5"], headers=auth).status_code == 204
    assert httpx.post(f"{sandbox.url}/_sandbox/revoke-tokens", headers=auth).status_code == 204
    out = p.send([msg(5)])
    assert isinstance(out[0], InvalidAddress)
    assert sandbox.token_requests == 2
