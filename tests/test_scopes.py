"""API key scopes: a send key submits but cannot read notifications (OTP codes among their data),
metrics or the console, nor replay the DLQ; read reads; operate acts in the console; admin (and a
key made before scopes) does everything. Real uvicorn, Redis, SQLite; the CLI in process."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import update
from sqlmodel import Session
from typer.testing import CliRunner

from campaigns.launcher import LaunchSpec, launch
from campaigns.models import Campaign
from notifyctl.api.auth import create_key
from notifyctl.api.models import ApiKey
from notifyctl.cli.main import app as cli_app
from notifyctl.context import Context
from tests.conftest import cli_env
from tests.util import ApiServer, deliveries, seed, send
from worker.pool import run_worker

OTP = {"recipient_id": "dave", "template_id": "otp_code", "channels": ["sms"], "data": {"code": "481516", "minutes": 5}}


@pytest.fixture
def server(ctx: Context) -> Iterator[ApiServer]:
    seed(ctx)
    with ApiServer(ctx) as s:
        yield s


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextmanager
def console(server: ApiServer, key: str) -> Iterator[tuple[httpx.Client, httpx.Response]]:
    with httpx.Client(base_url=server.url) as c:
        token = re.search(r'name="csrf" value="([^"]+)"', c.get("/console/login").text).group(1)  # type: ignore[union-attr]
        yield c, c.post("/console/login", data={"csrf": token, "api_key": key})


def test_each_scope_on_the_api(ctx: Context, server: ApiServer) -> None:
    keys = {s: create_key(ctx, f"k-{s}", s).key for s in ("send", "read", "operate", "admin")}
    with httpx.Client(base_url=server.url) as c:
        sent = c.post("/v1/notify", json=OTP, headers=bearer(keys["send"]))
        assert sent.status_code == 202, sent.text
        nid = sent.json()["notification_id"]
        for path in (f"/v1/notifications/{nid}", "/v1/users/dave", "/metrics"):
            r = c.get(path, headers=bearer(keys["send"]))
            assert r.status_code == 403 and r.json() == {
                "error": "this API key's scope (send) does not allow reading here"
            }, path
        for scope in ("read", "operate", "admin"):
            assert c.get(f"/v1/notifications/{nid}", headers=bearer(keys[scope])).status_code == 200, scope
            assert c.get("/metrics", headers=bearer(keys[scope])).status_code == 200, scope
        for scope in ("read", "operate"):
            r = c.post("/v1/notify", json=OTP, headers=bearer(keys[scope]))
            assert r.status_code == 403 and "does not allow sending" in r.json()["error"], scope
        assert (
            c.post(
                "/v1/notify", json={**OTP, "data": {"code": "2", "minutes": 5}}, headers=bearer(keys["admin"])
            ).status_code
            == 202
        )  # noqa: E501
        # a key made before scopes existed (scope NULL) keeps doing everything
        with Session(ctx.engine) as s:
            s.execute(update(ApiKey).where(ApiKey.name == "k-admin").values(scope=None))
            s.commit()
        assert c.get(f"/v1/notifications/{nid}", headers=bearer(keys["admin"])).status_code == 200


def test_each_scope_in_the_console(ctx: Context, server: ApiServer) -> None:
    # one dead-lettered delivery: a sent one marked as the DLQ marks them (what is tested is who may act)
    nid = send(ctx, channels=["email"]).notification_id
    run_worker(ctx.settings, ["high", "normal", "low"], burst=True, reconcile=False)
    (d,) = deliveries(ctx, nid)
    from notifyctl.models import Delivery

    with Session(ctx.engine) as s:
        s.execute(update(Delivery).where(Delivery.id == d.id).values(status="failed", dead_lettered=True, reason="x"))
        s.commit()

    later = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    cid = launch(
        ctx,
        LaunchSpec("weekly_promo", channels=["email"], segment_sql="SELECT id AS user_id FROM users", send_at=later,
                   data={"discount": 15, "code": "SPRING"}, name="csrf-sale"),
    )["campaign_id"]  # fmt: skip

    with console(server, create_key(ctx, "svc", "send").key) as (c, r):
        assert r.status_code == 403 and "scope (send) cannot open the console" in r.text
        assert "notify_console" not in c.cookies
    with console(server, create_key(ctx, "viewer", "read").key) as (c, r):
        assert r.status_code == 303
        page = c.get("/console/dlq")
        assert "1 entry" in page.text and "Replay" not in page.text  # no action offered
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        refused = c.post("/console/dlq/replay", data={"csrf": csrf, "all": "1", "confirm": "1"})
        assert refused.status_code == 403 and "scope (read) does not allow this" in refused.text
        assert deliveries(ctx, nid)[0].dead_lettered
        campaigns = c.get("/console/campaigns").text
        assert "csrf-sale" in campaigns and 'class="pause"' not in campaigns  # no action offered
        refused = c.post(f"/console/campaigns/{cid}/pause", data={"csrf": csrf})
        assert refused.status_code == 403 and "scope (read) does not allow this" in refused.text
        with Session(ctx.engine) as s:
            assert s.get(Campaign, cid).status == "active"  # type: ignore[union-attr]
    with console(server, create_key(ctx, "oncall", "operate").key) as (c, r):
        assert r.status_code == 303
        csrf = re.search(r'name="csrf" value="([^"]+)"', c.get("/console/dlq").text).group(1)  # type: ignore[union-attr]
        done = c.post("/console/dlq/replay", data={"csrf": csrf, "all": "1", "confirm": "1"})
        # it had really gone out (its send record says so): taken out of the DLQ as sent, not sent again
        assert done.status_code == 200 and "Replayed 0, skipped 1 already sent" in done.text
        (after,) = deliveries(ctx, nid)
        assert not after.dead_lettered and after.status == "sent"


def test_apikeys_cli_scope(ctx: Context) -> None:
    runner = CliRunner()
    env = cli_env(ctx.settings)
    r = runner.invoke(cli_app, ["apikeys", "create", "checkout", "--scope", "send", "--json"], env=env)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["scope"] == "send"
    listed = json.loads(runner.invoke(cli_app, ["apikeys", "list", "--json"], env=env).stdout)
    assert [(k["name"], k["scope"]) for k in listed] == [("checkout", "send")]
    bad = runner.invoke(cli_app, ["apikeys", "create", "x", "--scope", "root"], env=env)
    assert bad.exit_code == 2 and "--scope: expected one of send, read, operate, admin, got 'root'" in bad.stderr
    assert runner.invoke(cli_app, ["apikeys", "list", "--json"], env=env).stdout.count('"name"') == 1
