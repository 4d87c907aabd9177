"""The HTTP API over real HTTP: uvicorn on 127.0.0.1:<free port> in a thread, httpx as the client."""

from __future__ import annotations

import base64
import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlmodel import Session
from typer.testing import CliRunner

from notifyctl.api.auth import create_key
from notifyctl.cli import apikeys
from notifyctl.context import Context
from notifyctl.models import OptOut
from notifyctl.tracking import timeline
from notifyctl.unsubscribe import make_token, secret_key
from tests.conftest import cli_env, invoke_cli
from tests.net import ServeProcess
from tests.util import IOS_TOKEN, ApiServer, deliveries, drain, pixel_token, seed
from worker.pool import run_worker

ORDER = {"order_id": "ORD-1", "tracking_url": "https://t.example/1"}
# the 43-byte transparent 1×1 GIF every tracking pixel serves, spelled out independently of the app
PIXEL_GIF = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")
PROMO = {"first_name": "Alice", "discount": 20, "code": "WEEK20"}


def one_line_error(resp: httpx.Response) -> str:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    return body["error"]


@pytest.fixture
def server(ctx: Context) -> Iterator[ApiServer]:
    with ApiServer(ctx) as s:
        yield s


@pytest.fixture
def client(ctx: Context, server: ApiServer) -> Iterator[httpx.Client]:
    key = create_key(ctx, "tests").key
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as c:
        yield c


@pytest.fixture
def anon(server: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


# ------------------------------------------------------------------------------------- keys


def test_api_key_required_on_v1_and_not_elsewhere(ctx: Context, anon: httpx.Client) -> None:
    seed(ctx)
    for method, path in [
        ("POST", "/v1/notify"),
        ("GET", "/v1/users/alice"),
        ("PUT", "/v1/users/zed"),
        ("POST", "/v1/users/alice/tokens"),
        ("GET", "/v1/users/alice/preferences"),
        ("GET", "/v1/notifications/n_x"),
        ("POST", "/v1/deliveries/d_x/opened"),
    ]:
        r = anon.request(method, path, json={})
        assert r.status_code == 401, (path, r.text)
        assert "API key" in one_line_error(r)
        assert r.headers["www-authenticate"] == "Bearer"
    assert anon.get("/v1/users/alice", headers={"Authorization": "Bearer nk_not-a-real-key"}).status_code == 401
    assert anon.get("/v1/users/alice", headers={"Authorization": "Basic abc"}).status_code == 401

    k = create_key(ctx, "svc")
    assert anon.get("/v1/users/alice", headers={"X-API-Key": k.key}).status_code == 200
    assert anon.get("/v1/users/alice", headers={"Authorization": f"Bearer {k.key}"}).status_code == 200
    # revocation takes effect on the next request
    runner = CliRunner()
    res = runner.invoke(apikeys.app, ["revoke", k.prefix], env=cli_env(ctx.settings))
    assert res.exit_code == 0, res.output
    r = anon.get("/v1/users/alice", headers={"X-API-Key": k.key})
    assert r.status_code == 401 and "revoked" in one_line_error(r)

    # public routes
    assert anon.get("/healthz").json() == {"ok": True}
    assert anon.get("/docs").status_code == 200
    spec = anon.get("/openapi.json").json()
    assert "/v1/notify" in spec["paths"] and "/webhooks/sendgrid" in spec["paths"]
    assert "recipient_id" in str(spec["paths"]["/v1/notify"]["post"]["requestBody"])


def test_apikeys_cli_prints_the_key_once_and_stores_only_a_hash(ctx: Context, anon: httpx.Client) -> None:
    runner = CliRunner()
    env = cli_env(ctx.settings)
    res = runner.invoke(apikeys.app, ["create", "checkout"], env=env)
    assert res.exit_code == 0, res.output
    key = re.search(r"nk_[A-Za-z0-9_-]{40,}", res.output)
    assert key is not None
    listed = runner.invoke(apikeys.app, ["list", "--json"], env=env)
    assert listed.exit_code == 0 and key.group(0) not in listed.output
    assert '"name": "checkout"' in listed.output and '"prefix": "nk_' in listed.output
    with Session(ctx.engine) as s:
        from notifyctl.models import ApiKey

        rows = list(s.execute(select(ApiKey)).scalars())
    assert len(rows) == 1 and key.group(0) not in rows[0].model_dump_json()
    assert anon.get("/v1/users/nobody", headers={"X-API-Key": key.group(0)}).status_code == 404
    from notifyctl.cli.main import app as cli_app

    bad = runner.invoke(cli_app, ["apikeys", "revoke", "key_nope"], env=env)  # as `notifyctl` runs it
    assert bad.exit_code == 4, bad.output  # the README: 4 not found
    assert "key_nope" in bad.stderr and "Traceback" not in bad.output


# ----------------------------------------------------------------------------------- notify


def test_notify_queues_and_answers_like_send(ctx: Context, client: httpx.Client) -> None:
    seed(ctx)
    body = {"recipient_id": "alice", "template_id": "order_shipped_v2", "channels": ["push"], "data": ORDER}
    r = client.post("/v1/notify", json=body)
    assert r.status_code == 202, r.text
    out = r.json()
    assert out["status"] == "queued" and out["notification_id"].startswith("n_") and out["channels"] == ["push"]

    # Idempotency-Key header acts as dedup_key
    r1 = client.post("/v1/notify", json=body, headers={"Idempotency-Key": "order:ORD-1"})
    r2 = client.post("/v1/notify", json=body, headers={"Idempotency-Key": "order:ORD-1"})
    assert r1.status_code == 202 and r2.status_code == 200
    assert r2.json()["status"] == "suppressed" and r2.json()["reason"] == "duplicate"
    assert r2.json()["notification_id"] == r1.json()["notification_id"]
    # an explicit dedup_key in the body wins over the header
    r3 = client.post("/v1/notify", json={**body, "dedup_key": "other"}, headers={"Idempotency-Key": "order:ORD-1"})
    assert r3.status_code == 202
    assert client.get("/v1/notifications/other").json()["notification"]["dedup_key"] == "other"

    # bad input: one line naming the field, the same line `notifyctl send` prints
    cases = [
        ({**body, "channels": ["fax"]}, 422, "channels"),
        ({**body, "bogus": 1}, 422, "bogus: unknown field"),
        ({**body, "recipient_id": "nobody"}, 422, "recipient_id: unknown user"),
        ({**body, "data": {}}, 422, "order_id"),
        ({"template_id": "order_shipped_v2"}, 422, "recipient_id"),
    ]
    for payload, status, needle in cases:
        r = client.post("/v1/notify", json=payload)
        assert r.status_code == status, (payload, r.text)
        assert needle in one_line_error(r)
    cli = invoke_cli(
        ctx.settings, "send", "-f", "-", input=httpx.Request("POST", "/", json=cases[2][0]).content.decode()
    )
    assert cli.returncode == 2
    api_msg = client.post("/v1/notify", json=cases[2][0]).json()["error"]
    assert api_msg in cli.stderr

    r = client.post("/v1/notify", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in one_line_error(r)
    r = client.post("/v1/notify", json=[1, 2])
    assert r.status_code == 400 and "JSON object" in one_line_error(r)
    r = client.post("/v1/notify", content=b"")
    assert r.status_code == 400

    # nothing half-done: only the three accepted notifications exist
    from tests.util import count_notifications

    assert count_notifications(ctx) == 3


# -------------------------------------------------------------- what any request may carry

OTP = {"recipient_id": "carol", "template_id": "otp_code", "channels": ["sms"], "data": {"code": "1", "minutes": 5}}
V1_BODY_ROUTES = [
    ("POST", "/v1/notify"),
    ("PUT", "/v1/users/zoe"),
    ("POST", "/v1/users/alice/tokens"),
    ("POST", "/v1/users/alice/preferences"),
]
# JSON that Python's json module accepts or chokes on, and that the one loader refuses (issue 14 D)
BAD_JSON = [
    ("[" * 1000 + "]" * 1000, "malformed JSON: nested deeper than 32 levels"),  # was a 500 RecursionError
    ('{"recipient_id": "carol", "data": {"code": ' + "1" * 5000 + "}}", "a number of 5000 digits"),  # 500 ValueError
    ('{"recipient_id": "carol", "data": {"code": NaN, "minutes": 5}}', "NaN is not a JSON value"),
    ('{"recipient_id": "carol", "data": {"code": "1", "minutes": Infinity}}', "Infinity is not a JSON value"),
    ('{"recipient_id": "carol", "data": {"code": "1", "minutes": -Infinity}}', "-Infinity is not a JSON value"),
    ('{"recipient_id": "carol", "data": {"code": "1", "minutes": 1e999}}', "1e999 is out of range"),
    ('{"recipient_id": "carol", "data": {"code": "\\ud800", "minutes": 5}}', "unpaired UTF-16 surrogate"),  # a 500
]


def test_bad_json_is_a_400_naming_the_problem_on_every_v1_route(ctx: Context, client: httpx.Client) -> None:
    from tests.fuzz_util import snapshot

    seed(ctx)
    before = snapshot(ctx)
    for method, path in V1_BODY_ROUTES:
        for body, needle in BAD_JSON:
            r = client.request(method, path, content=body.encode(), headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (path, body[:60], r.text)
            assert needle in one_line_error(r), (path, r.text)
    assert snapshot(ctx) == before
    # the same text through `notifyctl send -f -` is the same one line, exit 2
    cli = invoke_cli(ctx.settings, "send", "-f", "-", input=BAD_JSON[2][0])
    assert cli.returncode == 2 and BAD_JSON[2][1] in cli.stderr and len(cli.stderr.splitlines()) == 1
    # JSON within the bounds is fine: 32 levels in all (the request, its data, 30 more)
    deep: dict[str, Any] = {"x": 1}
    for _ in range(29):
        deep = {"x": deep}
    r = client.post("/v1/notify", json={**OTP, "data": {**OTP["data"], "deep": deep}})
    assert r.status_code == 202, r.text


def test_every_v1_body_is_read_as_json_whatever_its_content_type(ctx: Context, client: httpx.Client) -> None:
    """``curl -d`` (as in the README) labels the body a form: every /v1 route reads it as JSON, as
    ``POST /v1/notify`` does, and bad JSON under any label is the same one-line 400."""
    seed(ctx)
    bodies = {
        "/v1/notify": {**OTP, "dedup_key": "curl-d"},
        "/v1/users/zoe": {"email": "zoe@example.com", "timezone": "Europe/Paris"},
        "/v1/users/alice/tokens": {"platform": "android", "token": "f" * 140},
        "/v1/users/alice/preferences": {"off": ["marketing"]},
    }
    labels = ("application/x-www-form-urlencoded", "text/plain", None, "Application/JSON; charset=utf-8")
    for method, path in V1_BODY_ROUTES:
        for ctype in labels:
            headers = {"Content-Type": ctype} if ctype else {}
            r = client.request(method, path, content=json.dumps(bodies[path]).encode(), headers=headers)
            assert r.status_code in (200, 201, 202), (method, path, ctype, r.text)
            bad = client.request(method, path, content=b"a=1&b=2", headers=headers)
            assert bad.status_code == 400 and "JSON" in one_line_error(bad), (method, path, ctype, bad.text)
    assert client.get("/v1/users/zoe").json()["user"]["timezone"] == "Europe/Paris"
    assert [t["platform"] for t in client.get("/v1/users/alice").json()["tokens"] if t["token"] == "f" * 140]


def test_v1_bodies_are_limited_in_size(ctx: Context, client: httpx.Client) -> None:
    from notifyctl.api.app import ApiConfig
    from tests.fuzz_util import snapshot

    seed(ctx)
    before = snapshot(ctx)
    # the case: 50 MB of template data became a 50 MB row; now a 413 the client reads in full
    huge = json.dumps({**OTP, "data": {**OTP["data"], "blob": "x" * (50 * 1024 * 1024)}}).encode()
    r = client.post("/v1/notify", content=huge, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and one_line_error(r) == "request body larger than 1048576 bytes", r.text
    del huge

    def chunked(n: int) -> Iterator[bytes]:  # no Content-Length: counted as it comes
        yield b'{"recipient_id": "carol", "data": {"blob": "'
        for _ in range(n):
            yield b"y" * 65536
        yield b'"}}'

    r = client.post("/v1/notify", content=chunked(40), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than 1048576 bytes" in one_line_error(r)
    big_user = {"attributes": {f"k{i}": "v" * 1000 for i in range(1100)}}
    r = client.put("/v1/users/zoe", json=big_user)
    assert r.status_code == 413 and "larger than 1048576 bytes" in one_line_error(r)
    assert snapshot(ctx) == before

    # just under the default limit is accepted
    r = client.post("/v1/notify", json={**OTP, "data": {**OTP["data"], "blob": "z" * 1_000_000}})
    assert r.status_code == 202, r.text

    # the setting is honoured
    with (
        ApiServer(ctx, config=ApiConfig(max_body_bytes=4096)) as small,
        httpx.Client(base_url=small.url, headers=client.headers, timeout=10) as c,
    ):
        body = json.dumps({**OTP, "data": {**OTP["data"], "pad": "p" * 4096}}).encode()
        r = c.post("/v1/notify", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and one_line_error(r) == "request body larger than 4096 bytes"
        assert c.post("/v1/notify", json=OTP).status_code == 202


def test_long_headers_are_a_4xx_naming_the_header(ctx: Context, client: httpx.Client) -> None:
    from tests.fuzz_util import snapshot

    seed(ctx)
    before = snapshot(ctx)
    cases = [
        ({"Idempotency-Key": "k" * 10240}, 431, "header idempotency-key: 10240 bytes is too long (at most 8192)"),
        ({"Idempotency-Key": "k" * 256}, 400, "Idempotency-Key: 256 characters is too long (at most 255)"),
        ({"Idempotency-Key": ""}, 400, "Idempotency-Key: empty"),
        ({f"X-Pad-{i}": "p" * 4000 for i in range(9)}, 431, "request headers: "),
    ]
    for headers, status, needle in cases:
        r = client.post("/v1/notify", json=OTP, headers=headers)
        assert r.status_code == status and one_line_error(r).startswith(needle), (headers.keys(), r.text)
    assert snapshot(ctx) == before
    r = client.post("/v1/notify", json=OTP, headers={"Idempotency-Key": "k" * 255})
    assert r.status_code == 202, r.text
    assert client.get(f"/v1/notifications/{'k' * 255}").json()["notification"]["dedup_key"] == "k" * 255


def test_a_path_no_route_takes_is_a_404_not_a_redirect(ctx: Context, client: httpx.Client) -> None:
    """`PUT /v1/users/zoe%2F` answered 307 to `/v1/users/zoe`: a client that follows it writes
    another user (found by fuzzing the directory routes)."""
    for method, path in [("PUT", "/v1/users/zoe%2F"), ("GET", "/v1/users/alice/"), ("POST", "/v1/notify/")]:
        r = client.request(method, path, json={"email": "zoe@example.com"})
        assert r.status_code == 404 and "location" not in r.headers, (path, r.status_code)
        assert one_line_error(r) == "Not Found"
    assert client.get("/v1/users/zoe").status_code == 404


# ------------------------------------------------------------------------ users, tokens, prefs


def test_users_tokens_and_preferences(ctx: Context, client: httpx.Client) -> None:
    r = client.put(
        "/v1/users/zoe", json={"email": "zoe@example.com", "phone": "+1 415 555 0199", "attributes": {"tier": "gold"}}
    )
    assert r.status_code == 200, r.text
    u = r.json()["user"]
    assert u["phone"] == "+14155550199" and u["attributes"] == {"tier": "gold"} and u["timezone"] == "UTC"
    r = client.put("/v1/users/zoe", json={"email": "zoe2@example.com", "timezone": "Europe/Paris"})
    assert r.json()["user"]["email"] == "zoe2@example.com" and r.json()["user"]["timezone"] == "Europe/Paris"

    for payload, needle in [
        ({"phone": "12"}, "phone"),
        ({"email": "not-an-email"}, "email"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"nickname": "z"}, "nickname: unknown field"),
        ({"attributes": {"n": 2**64}}, "integer beyond 64 bits"),
    ]:
        r = client.put("/v1/users/zoe", json=payload)
        assert r.status_code == 422 and needle in one_line_error(r), r.text
    r = client.put("/v1/users/zoe", content=b"[", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in one_line_error(r)
    assert client.get("/v1/users/zoe").json()["user"]["email"] == "zoe2@example.com"  # untouched by the failures
    assert client.get("/v1/users/ghost").status_code == 404

    r = client.post("/v1/users/zoe/tokens", json={"token": IOS_TOKEN, "platform": "ios"})
    assert r.status_code == 201 and r.json()["platform"] == "ios"
    r = client.post("/v1/users/zoe/tokens", json={"token": "xyz", "platform": "blackberry"})
    assert r.status_code == 422 and "platform" in one_line_error(r)
    assert client.post("/v1/users/ghost/tokens", json={"token": "abc", "platform": "android"}).status_code == 404
    assert [t["token"] for t in client.get("/v1/users/zoe").json()["tokens"]] == [IOS_TOKEN]
    assert client.delete(f"/v1/users/zoe/tokens/{IOS_TOKEN}").json()["removed"] is True
    assert client.delete(f"/v1/users/zoe/tokens/{IOS_TOKEN}").status_code == 404

    r = client.post("/v1/users/zoe/preferences", json={"off": ["email:marketing", "sms"]})
    assert r.status_code == 200
    got = client.get("/v1/users/zoe/preferences").json()["opt_outs"]
    assert {(o["channel"], o["category"]) for o in got} == {("email", "marketing"), ("sms", "*")}
    r = client.post("/v1/users/zoe/preferences", json={"on": ["sms"]})
    assert {(o["channel"], o["category"]) for o in r.json()["opt_outs"]} == {("email", "marketing")}
    r = client.post("/v1/users/zoe/preferences", json={"off": ["carrier-pigeon"]})
    assert r.status_code == 422 and "carrier-pigeon" in one_line_error(r)
    assert client.get("/v1/users/ghost/preferences").status_code == 404


# ------------------------------------------------------------------ tracking: reads and opens


def test_notification_read_and_push_open_reported_by_the_app(ctx: Context, client: httpx.Client) -> None:
    seed(ctx)
    nid = client.post(
        "/v1/notify",
        json={"recipient_id": "alice", "template_id": "order_shipped_v2", "channels": ["push"], "data": ORDER},
    ).json()["notification_id"]
    drain(ctx.settings)
    t = client.get(f"/v1/notifications/{nid}").json()
    assert [d["status"] for d in t["deliveries"]] == ["sent"]
    did = t["deliveries"][0]["id"]
    assert [e["status"] for e in t["events"]] == ["queued", "sent"]

    r = client.post(f"/v1/deliveries/{did}/opened")
    assert r.status_code == 200 and r.json() == {"delivery_id": did, "status": "opened", "changed": True}
    r = client.post(f"/v1/deliveries/{did}/opened")
    assert r.json()["changed"] is False
    assert [e["status"] for e in timeline(ctx, nid)["events"]] == ["queued", "sent", "opened"]
    assert client.post("/v1/deliveries/d_nope/opened").status_code == 404

    # only push opens come from the app: an SMS or email delivery is refused, naming why, unchanged
    other = client.post(
        "/v1/notify",
        json={"recipient_id": "alice", "template_id": "order_shipped_v2", "channels": ["email", "sms"], "data": ORDER},
    ).json()["notification_id"]
    drain(ctx.settings)
    for d in deliveries(ctx, other):
        assert d.status == "sent", d
        r = client.post(f"/v1/deliveries/{d.id}/opened")
        assert r.status_code == 409, r.text
        assert f"is {d.channel}, not push" in one_line_error(r)
    assert {d.channel: (d.status, d.opened_at) for d in deliveries(ctx, other)} == {
        "email": ("sent", None),
        "sms": ("sent", None),
    }
    assert "opened" not in [e["status"] for e in timeline(ctx, other)["events"]]
    r = client.get("/v1/notifications/n_nope")
    assert r.status_code == 404 and "n_nope" in one_line_error(r)


def test_email_open_pixel(ctx: Context, client: httpx.Client, anon: httpx.Client) -> None:
    seed(ctx)
    nid = client.post(
        "/v1/notify",
        json={"recipient_id": "bob", "template_id": "order_shipped_v2", "channels": ["email"], "data": ORDER},
    ).json()["notification_id"]
    drain(ctx.settings)
    (d,) = deliveries(ctx, nid)
    assert d.status == "sent"
    key = secret_key(ctx.settings)
    token = pixel_token(key, d.id)
    r = anon.get(f"/o/{token}.gif")
    assert r.status_code == 200 and r.headers["content-type"] == "image/gif" and r.content.startswith(b"GIF89a")
    assert "no-store" in r.headers["cache-control"]
    assert anon.get(f"/o/{token}.gif").status_code == 200  # reloaded image: no new event
    assert [e["status"] for e in timeline(ctx, nid)["events"]] == ["queued", "sent", "opened"]

    # Whatever the token, a mail client gets its image (never a 500, never a broken image), and only
    # a genuine token is recorded: forged, truncated, malformed and non-ASCII ones change nothing.
    nid2 = client.post(
        "/v1/notify",
        json={"recipient_id": "bob", "template_id": "order_shipped_v2", "channels": ["email"], "data": ORDER},
    ).json()["notification_id"]
    drain(ctx.settings)
    (d2,) = deliveries(ctx, nid2)
    id_b64 = base64.urlsafe_b64encode(d2.id.encode()).rstrip(b"=").decode()
    forged = pixel_token(b"another installation's secret", d2.id)
    for path in (
        f"/o/{forged}.gif",
        f"/o/{pixel_token(key, d2.id)[:-3]}.gif",  # truncated signature
        f"/o/{id_b64}.%C3%A9.gif",  # the case: a non-ASCII signature was a 500 TypeError
        f"/o/{id_b64}.%00.gif",
        f"/o/{id_b64}..gif",
        "/o/%%%.gif",
        "/o/no-dot-here.gif",
        "/o/" + "A" * 5000 + ".gif",
    ):
        r = anon.get(path)
        assert r.status_code == 200 and r.headers["content-type"] == "image/gif", (path, r.text)
        assert r.content == PIXEL_GIF and "no-store" in r.headers["cache-control"]
    assert [e["status"] for e in timeline(ctx, nid2)["events"]] == ["queued", "sent"]
    assert deliveries(ctx, nid2)[0].opened_at is None


# -------------------------------------------------------------------------------- unsubscribe


def test_one_click_unsubscribe_suppresses_the_next_marketing_email(ctx: Context, anon: httpx.Client) -> None:
    seed(ctx)
    token = make_token(secret_key(ctx.settings), "alice", "marketing")
    page = anon.get(f"/u/{token}")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'method="post"' in page.text and 'name="List-Unsubscribe" value="One-Click"' in page.text
    assert _opt_outs(ctx, "alice") == set()  # GET (link scanners) changes nothing

    r = anon.post(f"/u/{token}", content=b"")
    assert r.status_code == 400 and "List-Unsubscribe=One-Click" in one_line_error(r)
    forged = make_token(b"wrong secret", "alice", "marketing")
    assert anon.post(f"/u/{forged}", data={"List-Unsubscribe": "One-Click"}).status_code == 403
    tampered = make_token(secret_key(ctx.settings), "bob", "marketing").split(".")[0] + "." + token.split(".", 1)[1]
    assert anon.post(f"/u/{tampered}", data={"List-Unsubscribe": "One-Click"}).status_code == 403
    # malformed is not a link we made either: 403, as the OpenAPI document says
    r = anon.get("/u/garbage")
    assert r.status_code == 403 and one_line_error(r) == "unsubscribe link: malformed"
    assert _opt_outs(ctx, "alice") == set() and _opt_outs(ctx, "bob") == set()

    r = anon.post(f"/u/{token}", data={"List-Unsubscribe": "One-Click"})
    assert r.status_code == 200 and "unsubscribed" in r.text
    assert anon.post(f"/u/{token}", data={"List-Unsubscribe": "One-Click"}).status_code == 200  # idempotent
    assert _opt_outs(ctx, "alice") == {("email", "marketing", "unsubscribe_link")}

    from tests.util import send

    res = send(ctx, recipient_id="alice", template_id="weekly_promo", channels=["push", "email"], data=PROMO)
    assert res.status == "queued"  # push is still allowed
    drain(ctx.settings)
    by_channel = {d.channel: d for d in deliveries(ctx, res.notification_id)}
    assert by_channel["email"].status == "suppressed" and by_channel["email"].reason.startswith("opted_out")
    assert by_channel["push"].status == "sent"
    # transactional email still flows
    res = send(ctx, recipient_id="alice", channels=["email"])
    drain(ctx.settings)
    assert [d.status for d in deliveries(ctx, res.notification_id)] == ["sent"]


def _opt_outs(ctx: Context, user_id: str) -> set[tuple[str, str, str]]:
    with Session(ctx.engine) as s:
        rows = s.execute(select(OptOut).where(OptOut.user_id == user_id)).scalars()
        return {(o.channel, o.category, o.reason) for o in rows}


# -------------------------------------------------------------------------- `notifyctl serve`


def _raw_post(port: int, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
    """POST over a bare socket, the head written in 1 KB pieces; the status and the JSON answer."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    raw = head.encode("latin-1") + body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(raw), 1024):
            sock.sendall(raw[i : i + 1024])
            time.sleep(0.002)  # let the server read each piece on its own (nothing to wait on)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def test_serve_command_smoke(ctx: Context) -> None:
    seed(ctx)
    key = create_key(ctx, "smoke").key
    with ServeProcess(cli_env(ctx.settings)) as server:
        url, port = server.url, server.port
        body = {
            "recipient_id": "carol",
            "template_id": "otp_code",
            "channels": ["sms"],
            "data": {"code": "1", "minutes": 5},
        }
        r = httpx.post(f"{url}/v1/notify", json=body, headers={"X-API-Key": key}, timeout=10)
        assert r.status_code == 202 and r.json()["status"] == "queued" and r.json()["priority"] == "high"
        assert httpx.post(f"{url}/v1/notify", json=body, timeout=10).status_code == 401
        # Long headers, delivered in pieces as a network does: a 4xx with a one-line JSON error, not
        # a reset or uvicorn's plain-text 400 (its HTTP parser caps an incomplete head at 16 KiB).
        payload = json.dumps(body).encode()
        for extra, status, needle in [
            ({"Idempotency-Key": "k" * 10240}, 431, "header idempotency-key: 10240 bytes"),
            ({"Idempotency-Key": "k" * 300}, 400, "Idempotency-Key: 300 characters"),
            ({f"X-Pad-{i}": "p" * 4000 for i in range(10)}, 431, "request headers: "),
        ]:
            got_status, got = _raw_post(port, "/v1/notify", {"X-API-Key": key, **extra}, payload)
            assert got_status == status and set(got) == {"error"} and got["error"].startswith(needle), got
    err = server.stderr_text()
    assert "Traceback" not in err and key not in err


def test_prometheus_metrics(ctx: Context, client: httpx.Client, anon: httpx.Client) -> None:
    from notifyctl.directory import set_prefs
    from tests.util import send

    seed(ctx)
    set_prefs(ctx, "bob", off=["email"], on=[])
    send(ctx, channels=["email", "sms"])
    send(ctx, recipient_id="bob", channels=["email", "sms"])
    send(ctx, template_id="otp_code", channels=["sms"], recipient_id="dave", data={"code": "1", "minutes": 2})
    run_worker(ctx.settings, ["high", "normal", "low"], burst=True, reconcile=False)
    assert anon.get("/metrics").status_code == 401
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }
    assert samples[("notify_deliveries_total", (("channel", "email"), ("reason", ""), ("status", "sent")))] == 1
    assert samples[("notify_deliveries_total", (("channel", "sms"), ("reason", ""), ("status", "sent")))] == 3
    assert (
        samples[("notify_deliveries_total", (("channel", "email"), ("reason", "opted_out"), ("status", "suppressed")))]
        == 1
    )  # noqa: E501
    assert samples[("notify_queue_depth", (("priority", "high"),))] == 0
    assert samples[("notify_queue_lag_threshold_seconds", (("priority", "high"),))] == 1.0
    assert samples[("notify_provider_latency_seconds_count", (("provider", "outbox"),))] == 4
    assert samples[("notify_provider_latency_seconds_bucket", (("le", "+Inf"), ("provider", "outbox")))] == 4
    assert samples[("notify_circuit_open", (("provider", "outbox"),))] == 0
    assert samples[("notify_dlq_depth", ())] == 0
