"""The HTTP API over real HTTP: uvicorn on 127.0.0.1:<free port> in a thread, httpx as the client."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlmodel import Session
from typer.testing import CliRunner

from notifyctl.api.auth import create_key
from notifyctl.cli import apikeys
from notifyctl.context import Context
from notifyctl.inbound import open_token
from notifyctl.models import OptOut
from notifyctl.settings import Settings
from notifyctl.tracking import timeline
from notifyctl.unsubscribe import make_token, secret_key
from tests.conftest import ROOT, cli_env, run_cli
from tests.util import IOS_TOKEN, ApiServer, deliveries, seed
from worker.pool import run_worker

ORDER = {"order_id": "ORD-1", "tracking_url": "https://t.example/1"}
PROMO = {"first_name": "Alice", "discount": 20, "code": "WEEK20"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith(("NOTIFY_API_", "NOTIFY_TWILIO_", "NOTIFY_SECRET_KEY")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NOTIFY_CONFIG", str(tmp_path / "absent.toml"))


def drain(settings: Settings) -> None:
    run_worker(settings, ["high", "normal", "low"], burst=True, reconcile=False)


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
        from notifyctl.api.models import ApiKey

        rows = list(s.execute(select(ApiKey)).scalars())
    assert len(rows) == 1 and key.group(0) not in rows[0].model_dump_json()
    assert anon.get("/v1/users/nobody", headers={"X-API-Key": key.group(0)}).status_code == 404
    bad = runner.invoke(apikeys.app, ["revoke", "key_nope"], env=env)
    assert bad.exit_code != 0


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
    cli = run_cli(ctx.settings, "send", "-f", "-", input=httpx.Request("POST", "/", json=cases[2][0]).content.decode())
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
    token = open_token(key, d.id)
    r = anon.get(f"/o/{token}.gif")
    assert r.status_code == 200 and r.headers["content-type"] == "image/gif" and r.content.startswith(b"GIF89a")
    assert "no-store" in r.headers["cache-control"]
    assert anon.get(f"/o/{token}.gif").status_code == 200  # reloaded image: no new event
    assert [e["status"] for e in timeline(ctx, nid)["events"]] == ["queued", "sent", "opened"]

    forged = open_token(b"another installation's secret", d.id)
    r = anon.get(f"/o/{forged}.gif")
    assert r.status_code == 403 and "invalid signature" in one_line_error(r)
    assert anon.get(f"/o/{token[:-3]}.gif").status_code == 403  # truncated signature
    assert anon.get("/o/%%%.gif").status_code in (400, 404)
    assert anon.get("/o/no-dot-here.gif").status_code == 400


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
    assert anon.get("/u/garbage").status_code == 400
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_smoke(ctx: Context) -> None:
    seed(ctx)
    key = create_key(ctx, "smoke").key
    port = _free_port()
    from notifyctl.cli import main as cli_main

    if any(c.name == "serve" for c in cli_main.app.registered_commands):
        cmd = [sys.executable, "-m", "notifyctl.cli.main", "serve", "--port", str(port)]
    else:  # not wired into main.py yet: the same command function under a bare Typer app
        code = "import typer\nfrom notifyctl.cli.serve import serve\napp = typer.Typer()\napp.command()(serve)\napp()\n"
        cmd = [sys.executable, "-c", code, "--port", str(port)]
    proc = subprocess.Popen(
        cmd, env=cli_env(ctx.settings), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        body = {
            "recipient_id": "carol",
            "template_id": "otp_code",
            "channels": ["sms"],
            "data": {"code": "1", "minutes": 5},
        }
        r = httpx.post(f"{url}/v1/notify", json=body, headers={"X-API-Key": key}, timeout=10)
        assert r.status_code == 202 and r.json()["status"] == "queued" and r.json()["priority"] == "high"
        assert httpx.post(f"{url}/v1/notify", json=body, timeout=10).status_code == 401
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=10)
    assert "Traceback" not in err and key not in err


def test_prometheus_metrics(ctx: Context, client: httpx.Client, anon: httpx.Client) -> None:
    from notifyctl.directory import set_prefs
    from tests.util import send
    from worker.pool import run_worker

    seed(ctx)
    set_prefs(ctx, "bob", off=["email"], on=[])
    send(ctx, channels=["email", "sms"])
    send(ctx, recipient_id="bob", channels=["email", "sms"])
    send(ctx, template_id="otp_code", channels=["sms"], recipient_id="dave", data={"code": "1", "minutes": 2})
    run_worker(ctx.settings, ["high", "normal", "low"], burst=True, reconcile=False)
    assert anon.get("/metrics").status_code == 401
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    body = r.text
    assert 'notify_deliveries_total{status="sent",channel="email",reason=""} 1' in body
    assert 'notify_deliveries_total{status="sent",channel="sms",reason=""} 3' in body
    assert 'notify_deliveries_total{status="suppressed",channel="email",reason="opted_out"} 1' in body
    assert 'notify_queue_depth{priority="high"} 0' in body
    assert 'notify_provider_latency_seconds_count{provider="outbox"} 4' in body
    assert 'notify_provider_latency_seconds_bucket{provider="outbox",le="+Inf"} 4' in body
    assert "notify_dlq_depth 0" in body
