"""The operator console in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven
by Playwright, against `create_app` served by uvicorn, the SMTP sandbox, Redis and SQLite.
A screenshot of every page is kept under each test's temporary directory."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlmodel import Session
from typer.testing import CliRunner

from notifyctl.analytics import read
from notifyctl.analytics.export import csv_rows
from notifyctl.api.auth import create_key, revoke_key
from notifyctl.cli.main import app as cli_app
from notifyctl.context import Context
from notifyctl.inbound import Event, apply_events
from sandboxes.smtp import SmtpSandbox
from tests.conftest import cli_env, make_settings
from tests.util import ApiServer, deliveries, drain, seed, send
from worker import jobs
from worker.reconciler import reconcile

CHROMIUM = "/usr/bin/chromium"
OUTAGE = {"smtp_code": 554, "smtp_message": "5.3.0 outage", "stage": "data", "count": -1}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(
            f"{CHROMIUM} missing: apt-get install -y chromium (Debian's package; Playwright's own download cannot work here)"
        )
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def cctx(home: Path, redis_url: str, rclient: redis.Redis, smtp: SmtpSandbox) -> Iterator[Context]:
    ctx = Context(
        make_settings(
            home, redis_url, providers_email=["smtp"], smtp_host=smtp.host, smtp_port=smtp.port, smtp_timeout=5,
            circuit_threshold=1000,
        )
    )  # fmt: skip
    seed(ctx)
    yield ctx
    jobs.close()
    ctx.close()


@pytest.fixture
def server(cctx: Context) -> Iterator[ApiServer]:
    with ApiServer(cctx) as s:
        yield s


@pytest.fixture
def api_key(cctx: Context) -> str:
    return create_key(cctx, "console-test").key


def login(browser: Any, server: ApiServer, key: str) -> Any:
    page = browser.new_page()
    page.goto(server.url + "/console")
    assert page.url.endswith("/console/login")
    page.fill("#api_key", key)
    page.click("#login")
    page.wait_for_url(server.url + "/console")
    return page


def shot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000


def test_login_logout_and_cookie(browser: Any, server: ApiServer, api_key: str, cctx: Context, tmp_path: Path) -> None:
    page = browser.new_page()
    page.goto(server.url + "/console/dlq")
    assert page.url.endswith("/console/login")  # not logged in: every page sends to the login
    shot(page, tmp_path, "login")
    page.fill("#api_key", "nk_wrong")
    page.click("#login")
    assert page.inner_text("#error") == "invalid or revoked API key"
    page.fill("#api_key", api_key)
    page.click("#login")
    page.wait_for_url(server.url + "/console")
    assert page.inner_text("h1") == "Overview"
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "notify_console"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]  # plain http here
    assert api_key not in cookie["value"]
    page.click("#logout")
    page.wait_for_url(server.url + "/console/login")
    page.goto(server.url + "/console")
    assert page.url.endswith("/console/login")
    # a revoked key ends its sessions
    page = login(browser, server, api_key)
    revoke_key(cctx, api_key[:10])
    page.goto(server.url + "/console/analytics")
    assert page.url.endswith("/console/login")


@contextmanager
def _session(server: ApiServer, key: str) -> Iterator[httpx.Client]:
    """A logged-in HTTP client, through the login form like a browser."""
    import re

    with httpx.Client(base_url=server.url) as c:
        form = c.get("/console/login")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
        r = c.post("/console/login", data={"csrf": token, "api_key": key})
        assert r.status_code == 303 and "notify_console" in c.cookies
        yield c


def test_posts_without_the_csrf_token_are_refused(
    server: ApiServer, api_key: str, cctx: Context, smtp: SmtpSandbox
) -> None:
    from campaigns.launcher import LaunchSpec, launch
    from campaigns.models import Campaign

    smtp.faults.add(OUTAGE)
    send(cctx, channels=["email"])
    drain(cctx)
    later = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    cid = launch(
        cctx,
        LaunchSpec("weekly_promo", channels=["email"], segment_sql="SELECT id AS user_id FROM users", send_at=later,
                   data={"discount": 15, "code": "SPRING"}, name="csrf-sale"),
    )["campaign_id"]  # fmt: skip
    with _session(server, api_key) as c:
        for path, data in (
            ("/console/dlq/replay", {"all": "1", "confirm": "1"}),
            ("/console/dlq/purge", {"all": "1", "confirm": "1", "csrf": "forged"}),
            (f"/console/campaigns/{cid}/pause", {}),
            (f"/console/campaigns/{cid}/cancel", {"csrf": "forged"}),
            ("/console/logout", {}),
        ):
            r = c.post(path, data=data)
            assert r.status_code == 403 and "CSRF" in r.text, (path, r.text)
        assert c.get("/console").status_code == 200  # still logged in: the logout was refused
    (d,) = deliveries(cctx)
    assert d.dead_lettered  # nothing was replayed or purged
    with Session(cctx.engine) as s:
        camp = s.get(Campaign, cid)
        assert camp is not None and camp.status == "active"  # nor paused nor canceled
    with httpx.Client(base_url=server.url) as anon:  # the login form has its own token
        r = anon.post("/console/login", data={"api_key": api_key})
        assert r.status_code == 403 and "notify_console" not in r.cookies


def test_cookie_is_secure_behind_https(cctx: Context, api_key: str) -> None:
    import re

    s = make_settings(cctx.settings.home, cctx.settings.redis_url or "", public_url="https://notify.example.com")
    with ApiServer(Context(s)) as srv, httpx.Client(base_url=srv.url) as c:
        form = c.get("/console/login")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
        # (a client on plain http does not send a Secure cookie back: give it by hand, as over https)
        r = c.post(
            "/console/login",
            data={"csrf": token, "api_key": api_key},
            headers={"Cookie": f"notify_console_login={token}"},
        )
        assert r.status_code == 303
        session_cookie = next(v for v in r.headers.get_list("set-cookie") if v.startswith("notify_console="))
        for attr in ("Secure", "HttpOnly", "SameSite=strict", "Path=/console"):
            assert attr in session_cookie, session_cookie


def test_dlq_flow_end_to_end(
    browser: Any, server: ApiServer, api_key: str, cctx: Context, smtp: SmtpSandbox, tmp_path: Path
) -> None:
    # A provider outage dead-letters six emails.
    smtp.faults.add(OUTAGE)
    for user in ("alice", "bob", "carol"):
        for i in range(2):
            send(cctx, recipient_id=user, channels=["email"], data={"order_id": f"O-{user}-{i}", "tracking_url": "u"})
    drain(cctx)
    dead = deliveries(cctx)
    assert len(dead) == 6 and all(d.dead_lettered for d in dead) and len(smtp.recorder) == 0
    smtp.faults.clear()

    page = login(browser, server, api_key)
    shot(page, tmp_path, "overview")
    assert page.inner_text("#dlq").startswith("depth 6")
    page.goto(server.url + "/console/dlq?channel=email&error=outage")
    assert page.inner_text("#count").startswith("6 entries")
    assert len(page.query_selector_all("#entries tr")) == 7
    shot(page, tmp_path, "dlq")
    page.goto(server.url + "/console/dlq?channel=fax")
    assert "--channel: unknown channel 'fax'" in page.inner_text("#error")
    missing = page.goto(server.url + "/console/dlq/d_nope")
    assert missing is not None and missing.status == 404 and "no delivery 'd_nope'" in page.inner_text("main")
    shot(page, tmp_path, "error")

    # One entry: its history, replayed alone (a dry run, then confirm).
    one = dead[0].id
    page.goto(server.url + f"/console/dlq/{one}")
    assert "In the DLQ." in page.inner_text("main") and "5.3.0 outage" in page.inner_text("#history")
    shot(page, tmp_path, "dlq_entry")
    page.click("#replay-one")
    assert page.inner_text("#result") == "Dry run: would replay 1 of 1."
    shot(page, tmp_path, "dlq_action")
    assert all(d.dead_lettered for d in deliveries(cctx))  # the dry run changed nothing
    page.click("#confirm")
    assert page.inner_text("#result").startswith("Replayed 1.")

    # The rest by the filter "all", once again a dry run first.
    page.goto(server.url + "/console/dlq")
    assert page.inner_text("#count").startswith("5 entries")
    page.click("#replay-filter")
    assert page.inner_text("#result") == "Dry run: would replay 5 of 5."
    page.click("#confirm")
    assert page.inner_text("#result").startswith("Replayed 5.")
    page.goto(server.url + "/console/dlq")  # they left the DLQ at once, before being sent
    assert page.inner_text("#count").startswith("0 entries") and page.query_selector("#replay-filter") is None

    # The pool's reconciler and workers send them: each exactly once; the DLQ is empty.
    reconcile(cctx, force=True)
    drain(cctx)
    assert Counter(m["delivery_id"] for m in smtp.recorder.all()) == {d.id: 1 for d in dead}
    page.goto(server.url + "/console/dlq")
    assert page.inner_text("#count").startswith("0 entries")
    page.goto(server.url + f"/console/dlq/{one}")
    assert "Not in the DLQ." in page.inner_text("main")
    reconcile(cctx, now=time.time() + 3600, force=True)
    drain(cctx)
    assert len(smtp.recorder) == 6


def test_dlq_pages_in_the_browser(
    browser: Any, server: ApiServer, api_key: str, cctx: Context, smtp: SmtpSandbox, tmp_path: Path
) -> None:
    """More entries than a page (100): "older entries" shows the rest, none twice, none missing, in
    the order of ``notifyctl dlq list`` (whose ``--before`` gives the same page); the filter stays on
    every page; "latest" goes back. A POST from the logged-in browser without the CSRF token is refused."""
    smtp.faults.add(OUTAGE)
    users = ("alice", "bob", "carol")
    for i in range(105):
        send(cctx, recipient_id=users[i % 3], channels=["email"], data={"order_id": f"P-{i}", "tracking_url": "u"})
    drain(cctx)
    dead = {d.id for d in deliveries(cctx) if d.dead_lettered}
    assert len(dead) == 105 and len(smtp.recorder) == 0
    runner = CliRunner()

    def cli_ids(*args: str) -> list[str]:
        r = runner.invoke(cli_app, ["dlq", "list", "--json", *args], env=cli_env(cctx.settings))
        assert r.exit_code == 0, r.output
        return [e["delivery_id"] for e in json.loads(r.stdout)]

    def shown(page: Any) -> list[str]:
        return [a.inner_text() for a in page.query_selector_all("#entries td a[href^='/console/dlq/d_']")]

    page = login(browser, server, api_key)
    for query in ("", "?channel=email&error=outage"):
        page.goto(server.url + "/console/dlq" + query)
        assert page.inner_text("#count") == "105 entries (latest 100 shown)"
        first = shown(page)
        if not query:
            shot(page, tmp_path, "dlq_page1")
        page.click("#older")
        page.wait_for_url("**before=*")
        assert ("channel=email" in page.url and "error=outage" in page.url) if query else "channel" not in page.url
        assert page.inner_text("#count") == "105 entries (these 5 shown)"
        second = shown(page)
        if not query:
            shot(page, tmp_path, "dlq_page2")
        assert len(first) == 100 and len(second) == 5
        assert not set(first) & set(second) and set(first) | set(second) == dead  # none twice, none missing
        assert first + second == cli_ids("--limit", "200")  # latest first, as the CLI lists them
        assert second == cli_ids("--limit", "100", "--before", first[-1])
        assert page.query_selector("#older") is None  # the last page
        page.click("#newest")
        page.wait_for_url(server.url + "/console/dlq" + query)
        assert shown(page) == first

    # the browser's own session cookie, no CSRF token: refused, nothing purged (with the page's
    # token, the same request is a dry run: the cookie went along)
    token = page.get_attribute("#purge-filter >> xpath=.. >> input[name=csrf]", "value")
    assert token
    url = server.url + "/console/dlq/purge"
    assert "Dry run: would purge 105" in page.request.post(url, form={"all": "1", "csrf": token}).text()
    r = page.request.post(url, form={"all": "1", "confirm": "1"})
    assert r.status == 403 and "CSRF" in r.text()
    assert sum(d.dead_lettered for d in deliveries(cctx)) == 105
    page.goto(server.url + "/console")
    assert page.inner_text("h1") == "Overview"  # still logged in


def test_purge_asks_first(server: ApiServer, api_key: str, cctx: Context, smtp: SmtpSandbox) -> None:
    smtp.faults.add(OUTAGE)
    send(cctx, channels=["email"])
    drain(cctx)
    import re

    with _session(server, api_key) as c:
        csrf = re.search(r'name="csrf" value="([^"]+)"', c.get("/console/dlq").text).group(1)  # type: ignore[union-attr]
        dry = c.post("/console/dlq/purge", data={"csrf": csrf, "all": "1"})
        assert "Dry run: would purge 1" in dry.text and deliveries(cctx)[0].dead_lettered
        done = c.post("/console/dlq/purge", data={"csrf": csrf, "all": "1", "confirm": "1"})
        assert "Purged 1" in done.text
        bad = c.post("/console/dlq/replay", data={"csrf": csrf})
        assert bad.status_code == 422 and "choose entries" in bad.text and "<html" in bad.text
    (d,) = deliveries(cctx)
    assert d.status == "failed" and not d.dead_lettered


def test_campaign_pause_resume(browser: Any, server: ApiServer, api_key: str, cctx: Context, tmp_path: Path) -> None:
    from campaigns.launcher import LaunchSpec, launch
    from campaigns.report import campaign_status

    later = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    s = launch(
        cctx,
        LaunchSpec("weekly_promo", channels=["email"], segment_sql="SELECT id AS user_id FROM users", send_at=later,
                   data={"discount": 15, "code": "SPRING"}, name="spring-sale"),
    )  # fmt: skip
    cid = s["campaign_id"]
    page = login(browser, server, api_key)
    page.goto(server.url + "/console/campaigns")
    section = f"#c-{cid}"
    before = page.inner_text(f"{section} .state")
    assert before != "paused" and page.inner_text(f"{section} .waves td.scheduled") == str(s["written"])
    shot(page, tmp_path, "campaigns")
    page.click(f"{section} button.pause")
    page.wait_for_url(server.url + "/console/campaigns")
    assert page.inner_text(f"{section} .state") == "paused"
    from sqlalchemy import select
    from sqlmodel import Session

    from notifyctl.models import Notification

    def states() -> set[str]:
        with Session(cctx.engine) as ses:
            return set(ses.execute(select(Notification.status).where(Notification.campaign_id == cid)).scalars())

    assert states() == {"paused"}
    page.click(f"{section} button.resume")
    page.wait_for_url(server.url + "/console/campaigns")
    assert page.inner_text(f"{section} .state") == before and states() == {"scheduled"}
    assert before == campaign_status(cctx, cid)["state"] == "sending"  # the CLI's word for it

    # a campaign sent now: "completed", as the CLI says; one canceled: "canceled"
    done = launch(cctx, LaunchSpec("weekly_promo", channels=["email"], segment_sql="SELECT id AS user_id FROM users",
                                   data={"discount": 5, "code": "NOW"}, name="now-sale"))["campaign_id"]  # fmt: skip
    reconcile(cctx, now=time.time() + 3600, force=True)  # those paced a little later too
    drain(cctx)
    page.click(f"{section} button.cancel")
    page.wait_for_url(server.url + "/console/campaigns")
    for c, word in ((done, "completed"), (cid, "canceled")):
        assert page.inner_text(f"#c-{c} .state") == campaign_status(cctx, c)["state"] == word, c


def test_funnel_equals_report_json_and_sql(
    browser: Any, server: ApiServer, api_key: str, cctx: Context, smtp: SmtpSandbox, tmp_path: Path
) -> None:
    for user in ("alice", "bob", "carol", "dave"):
        send(cctx, recipient_id=user, channels=["email", "sms"], data={"order_id": f"F-{user}", "tracking_url": "u"})
    smtp.faults.add({"smtp_code": 554, "smtp_message": "5.1.1 rejected", "stage": "data", "count": 1})
    drain(cctx)
    mails = [d for d in deliveries(cctx) if d.channel == "email" and d.status == "sent"]
    apply_events(cctx, [Event("sendgrid", "delivered", delivery_id=d.id) for d in mails])
    apply_events(cctx, [Event("sendgrid", "opened", delivery_id=mails[0].id)])

    runner = CliRunner()
    page = login(browser, server, api_key)
    for by in ("template", "channel", "day"):
        page.goto(server.url + f"/console/analytics?by={by}")
        cli = runner.invoke(cli_app, ["report", "--by", by, "--json"], env=cli_env(cctx.settings))
        assert cli.exit_code == 0, cli.output
        rep = json.loads(cli.stdout)
        shown = {}
        for tr in page.query_selector_all("#funnel tr[data-key]"):
            cells = {
                k: int(tr.query_selector(f"td.{k}").inner_text())
                for k in ("total", "sent", "delivered", "opened", "failed", "suppressed", "pending")
            }
            shown[tr.get_attribute("data-key")] = cells
        expected = {g["key"]: {k: g[k] for k in shown["total"]} for g in [*rep["groups"], rep["total"]]}
        assert shown == expected
        if by == "channel":
            shot(page, tmp_path, "analytics")
    # and to SQL counts over the deliveries
    st = Counter(d.status for d in deliveries(cctx))
    total = shown["total"]
    assert total["sent"] == st["sent"] + st["delivered"] + st["opened"] and total["opened"] == st["opened"] == 1
    assert total["delivered"] == st["delivered"] + st["opened"] and total["failed"] == st["failed"] == 1
    assert total["suppressed"] == st["suppressed"] and total["total"] == len(deliveries(cctx))
    # CSV export: the CLI's rows
    with _session(server, api_key) as c:
        r = c.get("/console/analytics.csv?by=channel")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        assert list(csv.reader(io.StringIO(r.text))) == [
            [str(v) for v in row] for row in csv_rows(read.funnel(cctx.engine, "channel"))
        ]
        assert c.get("/console/analytics?by=user").status_code == 422


def test_lookup_by_id_dedup_key_and_user(
    browser: Any, server: ApiServer, api_key: str, cctx: Context, tmp_path: Path
) -> None:
    a = send(cctx, channels=["email"], dedup_key="order-77").notification_id
    b = send(cctx, channels=["email"], data={"order_id": "ORD-2", "tracking_url": "u"}).notification_id
    drain(cctx)
    page = login(browser, server, api_key)
    for ref, expect in ((a, {a}), ("order-77", {a}), ("alice", {a, b})):
        page.goto(server.url + "/console/lookup")
        page.fill("#q", ref)
        page.click("#find")
        titles = {t.inner_text().split()[0] for t in page.query_selector_all("section.timeline h2")}
        assert titles == expect, ref
        assert "sent" in page.inner_text("main")
    shot(page, tmp_path, "lookup")
    page.goto(server.url + "/console")
    assert int(page.inner_text("#sent-hour")) == 2  # the two emails, from the workers' per-minute counter
    page.goto(server.url + "/console/lookup?q=nobody-here")
    assert "nothing found for 'nobody-here'" in page.inner_text("#error")


def test_every_page_opens_with_a_redis_shard_down(home: Path, redis_url: str, rclient: redis.Redis,
                                                  tmp_path: Path) -> None:  # fmt: skip
    """Two Redis shards, the second a redis-server of this test's, stopped while the console is open:
    every page still answers 200 with what it can show, under a banner naming shard 1 (its URL and
    error, as `notifyctl status` does); the Overview's queues are shard 0's; a replay is refused
    before anything (it needs each entry's send record on its user's shard), a purge's dry run is
    not. Shard 0 down (it holds the sessions): each page is a 503 naming shard 0."""
    import re

    from notifyctl.db import dispose_all
    from notifyctl.redisconn import ensure_server, stop_server

    d1 = tmp_path / "redis-shard1"
    url1 = ensure_server(d1)
    ctx = Context(make_settings(home, redis_url, redis_shards=[redis_url, url1], redis_socket_timeout=1))
    try:
        seed(ctx)
        assert ctx.shard_of("bob") == 0 and ctx.shard_of("alice") == 1
        send(ctx, recipient_id="bob", channels=["email"])
        alice = send(ctx, recipient_id="alice", channels=["email"]).notification_id
        key = create_key(ctx, "shards").key
        pages = ("/console", "/console/dlq", "/console/campaigns", "/console/analytics?by=channel",
                 f"/console/lookup?q={alice}", "/console/lookup?q=bob")  # fmt: skip

        def depth(html: str, priority: str) -> int:
            m = re.search(rf'<tr><td>{priority}</td><td class="n">(\d+)</td>', html)
            assert m, html
            return int(m.group(1))

        with ApiServer(ctx) as server, _session(server, key) as c:
            up = c.get("/console")
            assert up.status_code == 200 and 'id="shards-down"' not in up.text and depth(up.text, "normal") == 2
            csrf = re.search(r'name="csrf" value="([^"]+)"', up.text).group(1)  # type: ignore[union-attr]
            assert "Dry run: would replay 0" in c.post("/console/dlq/replay", data={"csrf": csrf, "all": "1"}).text

            assert stop_server(d1)
            for path in pages:
                r = c.get(path)
                assert r.status_code == 200, (path, r.text)
                banner = r.text.split('id="shards-down"', 1)[1].split("</div>", 1)[0]
                assert f"shard 1 <code>{url1}</code>" in banner and "shard 0" not in banner, (path, banner)
            overview = c.get("/console").text
            assert depth(overview, "normal") == 1  # bob's job, on shard 0
            assert alice in c.get(f"/console/lookup?q={alice}").text  # from SQL, whatever its shard
            refused = c.post("/console/dlq/replay", data={"csrf": csrf, "all": "1", "confirm": "1"})
            assert refused.status_code == 503 and "Redis shard 1 of 2 unreachable" in refused.text
            dry = c.post("/console/dlq/purge", data={"csrf": csrf, "all": "1"})
            assert dry.status_code == 200 and "Dry run: would purge 0" in dry.text and 'id="shards-down"' in dry.text
            assert c.get("/console/analytics.csv?by=channel").status_code == 200
    finally:
        stop_server(d1)
        ctx.close()
        dispose_all()

    # shard 0 down: no session can be read; each page says so (the login form itself opens)
    d0 = tmp_path / "redis-shard0"
    url0 = ensure_server(d0)
    ctx = Context(make_settings(home, url0, redis_shards=[url0, redis_url], redis_socket_timeout=1))
    try:
        key = create_key(ctx, "shards0").key
        with ApiServer(ctx) as server, _session(server, key) as c:
            assert c.get("/console").status_code == 200
            assert stop_server(d0)
            for path in pages:
                r = c.get(path)
                assert r.status_code == 503 and "<html" in r.text, (path, r.text)
                assert "Redis shard 0 of 2, which holds the console&#39;s sessions, is unreachable" in r.text, r.text
                assert url0 not in r.text
            assert httpx.get(server.url + "/console/login").status_code == 200  # no session cookie
    finally:
        stop_server(d0)
        ctx.close()
        dispose_all()


def _wave_rows(html: str, cid: str) -> dict[int, dict[str, Any]]:
    """The per-wave table of campaign ``cid`` on the Campaigns page, as numbers."""
    import re

    section = html[html.index(f'id="c-{cid}"') :]
    table = section[section.index('<table class="waves">') : section.index("</table>")]
    out: dict[int, dict[str, Any]] = {}
    for wave, row in re.findall(r'<tr data-wave="(\d+)">(.*?)</tr>', table, re.S):
        cells = dict(re.findall(r'<td class="n (\w+)">(\d+)</td>', row))
        out[int(wave)] = {
            **{k: int(v) for k, v in cells.items() if k != "recipients"},
            **{
                f"{kind}_by_reason": {r: int(n) for r, n in re.findall(rf'class="{kind}-reason" data-reason="([^"]*)">{kind} [^=]*=(\d+)', row)}
                for kind in ("failed", "suppressed")
            },
        }  # fmt: skip
    return out


def test_campaign_waves_page_equals_cli(server: ApiServer, api_key: str, cctx: Context) -> None:
    """The Campaigns page's per-wave progress (scheduled, sent, failed and suppressed by reason)
    equals ``notifyctl campaign status --json``'s, which equals SQL counts over each wave's
    deliveries (``tests/test_campaigns_waves.py``)."""
    from tests.test_campaigns_waves import KEYS, cli_status, sql_counts, staggered_campaign

    cid = staggered_campaign(cctx)
    with _session(server, api_key) as c:
        page = _wave_rows(c.get("/console/campaigns").text, cid)
    cli = {int(w["wave"]): {k: w[k] for k in KEYS} for w in cli_status(cctx, cid)["wave_progress"]}
    assert page == cli == sql_counts(cctx, cid)
    assert len(page) == 3 and page[0]["sent"] and page[2]["scheduled"]
    assert any(w["failed_by_reason"] for w in page.values()) and any(w["suppressed_by_reason"] for w in page.values())
