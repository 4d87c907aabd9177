"""The sandboxes' control APIs need the sandbox's token (issue 14, E): without it a local user
could read the staged OTPs and inject faults. moto, behind the AWS sandbox, answers only its proxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sandboxes.sandbox_set import TOKEN_ENV, SandboxSet


@pytest.fixture(scope="module")
def sbs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxSet]:
    with SandboxSet(tmp_path_factory.mktemp("sandbox-keys")) as s:
        yield s


# (sandbox, method, path, body): every control endpoint of every sandbox
ENDPOINTS = [
    (name, method, path, body)
    for name in ("apns", "fcm", "sendgrid", "twilio", "smtp", "aws")
    for method, path, body in (
        ("GET", "/_sandbox/messages", None),
        ("POST", "/_sandbox/faults", {"status": 503, "count": -1}),
        ("DELETE", "/_sandbox/faults", None),
        ("DELETE", "/_sandbox/messages", None),
    )
] + [
    ("apns", "GET", "/_sandbox/unregistered", None),
    ("apns", "POST", "/_sandbox/unregistered", ["ab" * 32]),
    ("apns", "DELETE", "/_sandbox/unregistered", None),
    ("fcm", "POST", "/_sandbox/unregistered", ["token-1"]),
    ("fcm", "POST", "/_sandbox/revoke-tokens", None),
    ("smtp", "GET", "/_sandbox/stats", None),
]


@pytest.mark.parametrize(("name", "method", "path", "body"), ENDPOINTS, ids=lambda v: str(v)[:24])
def test_control_api_needs_the_token(sbs: SandboxSet, name: str, method: str, path: str, body: object) -> None:
    sb = sbs.sandboxes[name]
    url = sbs.control_url(name) + path
    sb.recorder.add({"to": "+15550100", "body": "482913 is your sign-in code"})  # a staged OTP
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": sbs.control_token}):
        r = httpx.request(method, url, json=body, headers=headers)
        assert r.status_code == 401, (headers, r.status_code, r.text)
        assert "482913" not in r.text and r.headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert sb.faults.pending() == 0  # an unauthenticated fault was not queued
    ok = httpx.request(method, url, json=body, headers=sbs.control_headers)
    assert ok.status_code < 300, (ok.status_code, ok.text)
    sb.faults.clear()
    sb.recorder.clear()
    if name == "apns":
        sb.unregistered.clear()


def test_every_sandbox_of_a_set_shares_the_token_the_env_carries(sbs: SandboxSet, tmp_path: Path) -> None:
    env = sbs.env()
    assert env[TOKEN_ENV] == sbs.control_token and len(sbs.control_token) >= 32
    assert {sb.control_token for sb in sbs.sandboxes.values()} == {sbs.control_token}
    # two sets never share one
    with SandboxSet(tmp_path / "other", ["sendgrid"]) as other:
        assert other.control_token != sbs.control_token
        r = httpx.get(other.control_url("sendgrid") + "/_sandbox/messages", headers=sbs.control_headers)
        assert r.status_code == 401


def test_moto_answers_only_the_aws_sandbox_proxy(sbs: SandboxSet) -> None:
    aws = sbs.sandboxes["aws"]
    # moto itself listens on 127.0.0.1: without the proxy's secret it gives nothing away
    direct = httpx.get(aws.moto_url + "/moto-api/data.json")
    assert direct.status_code == 403 and "sns" not in direct.text
    # and its own control API through the proxy needs the sandbox's token, like /_sandbox/
    assert httpx.get(aws.url + "/moto-api/data.json").status_code == 401
    assert httpx.get(aws.url + "/moto-api/data.json", headers=sbs.control_headers).status_code == 200
