"""Security: secrets never leak, templates are sandboxed and escaped, one user's data never reaches
another, unsubscribe links cannot be forged, SQL segments are read-only, every /v1 route needs a key."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markupsafe import escape
from sqlalchemy import select, text
from sqlmodel import Session
from typer.testing import CliRunner

from campaigns.segments import BadRows, SqlSegment
from notifyctl.api.app import ApiConfig
from notifyctl.cli.main import app as cli_app
from notifyctl.context import Context
from notifyctl.directory import import_users
from notifyctl.errors import InputError, TemplateError
from notifyctl.intake import parse_request, submit
from notifyctl.models import Delivery, DeliveryEvent, Notification, OptOut
from notifyctl.settings import Settings
from notifyctl.signing import b64url
from notifyctl.unsubscribe import make_token, verify_token
from tests.conftest import cli_env, make_settings, run_cli
from tests.net import ClosedPort
from tests.util import seed
from worker.pool import run_worker
from worker.providers.outbox import read_outbox

runner = CliRunner()

# Every secret carries the marker, so one grep finds any of them (masks keep at most the last 4 characters).
MARK = "s3cr3t"
SECRET_ENV = {
    "NOTIFY_SENDGRID_API_KEY": f"SG.{MARK}-sendgrid-0001",
    "NOTIFY_TWILIO_AUTH_TOKEN": f"{MARK}-twilio-0002",
    "NOTIFY_APNS_KEY": f"-----BEGIN PRIVATE KEY-----\nMIG{MARK}apns0003\n-----END PRIVATE KEY-----\n",
    "NOTIFY_SMTP_PASSWORD": f"{MARK}-smtp-0004",
    "NOTIFY_SES_SECRET_ACCESS_KEY": f"{MARK}-ses-0005",
    "NOTIFY_SES_SESSION_TOKEN": f"{MARK}-ses-session-0006",
    "NOTIFY_SNS_SECRET_ACCESS_KEY": f"{MARK}-sns-0007",
    "NOTIFY_FCM_SERVICE_ACCOUNT_JSON": json.dumps(
        {"type": "service_account", "project_id": "p", "private_key": f"{MARK}-fcm-0008", "client_email": "a@b.c"}
    ),
    "NOTIFY_SECRET_KEY": f"{MARK}-unsubscribe-0009",
    "NOTIFY_API_TWILIO_AUTH_TOKEN": f"{MARK}-api-twilio-0010",
}


def _leaks(*texts: str) -> list[str]:
    found = []
    for t in texts:
        for name, value in SECRET_ENV.items():
            core = value.split(MARK, 1)[1][:12]
            if MARK in t or value in t or (MARK + core) in t:
                found.append(f"{name} in: ...{t[max(0, t.find(MARK) - 200) : t.find(MARK) + 80]}...")
                break
    return found


def _redis_dump(ctx: Context) -> str:
    """Every string and hash value in Redis (RQ stores exc_info zlib-compressed: inflate it)."""
    out = []
    r = ctx.redis
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        values: list[bytes] = []
        if kind == b"string":
            values = [r.get(key) or b""]
        elif kind == b"hash":
            values = list(r.hgetall(key).values())
        elif kind == b"list":
            values = r.lrange(key, 0, -1)
        elif kind == b"zset":
            values = r.zrange(key, 0, -1)
        for v in values:
            try:
                v = zlib.decompress(v)
            except zlib.error:
                pass
            out.append(v.decode("utf-8", "replace"))
    return "\n".join(out)


def _sql_dump(ctx: Context) -> str:
    with Session(ctx.engine) as s:
        rows: list[Any] = []
        for model in (Notification, Delivery, DeliveryEvent):
            rows += [r.model_dump() for r in s.execute(select(model)).scalars()]
    return json.dumps(rows, default=str)


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch, closed_port: ClosedPort) -> Iterator[dict[str, str]]:
    from sandboxes.sendgrid import SendgridSandbox
    from sandboxes.twilio import TwilioSandbox

    # the sandboxes know other keys: every send fails on authentication
    with SendgridSandbox(api_key="SG.the-right-key") as sg, TwilioSandbox(auth_token="the-right-token") as tw:
        env = {
            **SECRET_ENV,
            "NOTIFY_SENDGRID_BASE_URL": sg.url,
            "NOTIFY_TWILIO_BASE_URL": tw.url,
            "NOTIFY_TWILIO_ACCOUNT_SID": tw.account_sid if hasattr(tw, "account_sid") else "AC" + "0" * 32,
            "NOTIFY_TWILIO_MESSAGING_SERVICE_SID": "MG" + "0" * 32,
            "NOTIFY_APNS_KEY_ID": "ABCDEFGHIJ",
            "NOTIFY_APNS_TEAM_ID": "ABCDEFGHIJ",
            "NOTIFY_APNS_TOPIC": "com.example.app",
            "NOTIFY_APNS_BASE_URL": closed_port.url("https"),
            "NOTIFY_SES_ACCESS_KEY_ID": "AKIAEXAMPLEEXAMPLE",
            "NOTIFY_SES_ENDPOINT_URL": closed_port.url(),
            "NOTIFY_SES_TIMEOUT": "1",
            "NOTIFY_SMTP_USERNAME": "mailer",
            "NOTIFY_CONFIG": "/nonexistent/config.toml",
        }
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        yield env


def test_secrets_never_in_logs_output_or_errors(
    secret_env: dict[str, str], home: Path, redis_url: str, rclient: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        home,
        redis_url,
        providers_email=["sendgrid"],
        providers_sms=["twilio"],
        providers_push_ios=["apns"],
        retry_delays=[],
    )
    ctx = Context(settings)
    seed(ctx)
    env = cli_env(settings, **secret_env)
    env.update(
        NOTIFY_PROVIDERS_EMAIL='["sendgrid"]', NOTIFY_PROVIDERS_SMS='["twilio"]', NOTIFY_PROVIDERS_PUSH_IOS='["apns"]'
    )
    env["NOTIFY_RETRY_DELAYS"] = "[]"
    texts: list[str] = []

    ids = []
    for tid, data in [
        ("order_shipped_v2", {"order_id": "ORD-1", "tracking_url": "https://t.example/1"}),
        ("otp_code", {"code": "123456", "minutes": 5}),
    ]:
        r = runner.invoke(cli_app, ["send", "alice", "-t", tid, "--data-json", json.dumps(data), "--json"], env=env)
        assert r.exit_code == 0, r.stderr
        texts += [r.stdout, r.stderr]
        ids.append(json.loads(r.stdout)["notification_id"])

    with caplog.at_level(logging.DEBUG):
        run_worker(settings, ["high", "normal", "low"], burst=True, reconcile=False)
    texts.append(caplog.text)
    texts += [rec.getMessage() + str(rec.exc_info or "") for rec in caplog.records]

    with Session(ctx.engine) as s:
        ds = list(s.execute(select(Delivery)).scalars())
    assert {d.provider for d in ds if d.provider} >= {"sendgrid", "twilio"}, [(d.provider, d.status) for d in ds]
    failed = [d for d in ds if d.status == "failed"]
    assert len(failed) >= 2 and all(d.reason for d in failed), [(d.provider, d.status, d.reason) for d in ds]

    # the same again through a real worker process, with its logs on stderr
    r = runner.invoke(cli_app, ["send", "alice", "-t", "otp_code", "-d", "code=9", "-d", "minutes=1"], env=env)
    assert r.exit_code == 0, r.stderr
    proc = run_cli(
        settings, "worker", "--burst", "--verbose", **{k: v for k, v in env.items() if k.startswith("NOTIFY_")}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    texts += [proc.stdout, proc.stderr]

    from notifyctl.cli import providers as providers_cli

    # each exits as it says: 0, and 1 for a providers check that finds a provider failing (these
    # providers' endpoints refuse connections)
    for app, argv, code in [
        (cli_app, ["status", "--json"], 0),
        (cli_app, ["status"], 0),
        (cli_app, ["events", ids[0], "--json"], 0),
        (cli_app, ["events", ids[1]], 0),
        (cli_app, ["dlq", "list", "--json"], 0),
        (providers_cli.app, ["list", "--json"], 0),
        (providers_cli.app, ["list"], 0),
        (providers_cli.app, ["check", "--json"], 1),
        (providers_cli.app, ["check"], 1),
    ]:
        res = runner.invoke(app, argv, env=env)
        assert res.exit_code == code, (argv, res.exit_code, repr(res.exception), res.stderr[-500:])
        assert "Traceback" not in res.stdout + res.stderr, argv
        texts += [res.stdout, res.stderr]
    # a bad setting next to the secrets: the error names the setting, never the values
    res = runner.invoke(cli_app, ["status", "--json"], env={**env, "NOTIFY_BATCH_SIZE": "many"})
    assert res.exit_code == 3 and "batch_size" in res.stderr, res.stderr
    texts += [res.stdout, res.stderr]

    texts += [_sql_dump(ctx), _redis_dump(ctx)]
    assert any("sendgrid" in t for t in texts) and any("****" in t or "(set)" in t for t in texts)
    assert _leaks(*texts) == []
    ctx.close()


# ------------------------------------------------------------------------------ templates

ATTACKS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ joiner.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ namespace.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
    "{{ lipsum.__globals__.__builtins__.__import__('os').system('touch MARKER') }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ self.__init__.__globals__ }}",
    "{{ order_id.__class__ }}",
    "{{ order_id.__class__.__mro__ }}",
    "{{ '{0.__class__.__mro__}'.format(order_id) }}",
    "{{ order_id.format_map.__self__ }}",
    "{% set x = order_id.__class__ %}{{ x }}",
    "{{ request.application.__globals__ }}",
    "{{ config.items() }}",
    "{{ user.__dict__ }}",
    "{{ range.__self__.__import__('os').system('touch MARKER') }}",
]


def _evil_template(dir_: Path, i: int, attack: str) -> str:
    tid = f"evil_{i}"
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / f"{tid}.toml").write_text(
        "category = 'transactional'\n[email]\nsubject = 'hi'\n"
        f"html = {json.dumps(attack)}\ntext = {json.dumps(attack)}\n"
        f"[sms]\ntext = {json.dumps(attack)}\n",
        encoding="utf-8",
    )
    return tid


def test_templates_are_sandboxed(ctx: Context, settings: Settings, tmp_path: Path) -> None:
    seed(ctx)
    marker = tmp_path / "pwned"
    tdir = settings.home / "templates"
    env = cli_env(settings)
    for i, attack in enumerate(ATTACKS):
        tid = _evil_template(tdir, i, attack.replace("MARKER", str(marker)))
        for channel in ("email", "sms"):
            with pytest.raises(TemplateError, match="unsafe|missing|cannot render") as exc:
                ctx.templates.get(tid).render(channel, {"order_id": "ORD-1", "user": {"id": "alice"}})
            assert "\n" not in str(exc.value)
        r = runner.invoke(cli_app, ["send", "alice", "-t", tid, "-d", "order_id=1"], env=env)
        assert r.exit_code == 2 and r.stderr.startswith("error: template"), (attack, r.stdout, r.stderr)
    assert not marker.exists()
    assert sum(ctx.redis.llen(ctx.queue(p).key) for p in ("high", "normal", "low")) == 0


def test_data_is_never_rendered_as_a_template(ctx: Context) -> None:
    seed(ctx)
    t = ctx.templates.get("order_shipped_v2")
    out = t.render("sms", {"order_id": "{{ 7*7 }}{% for x in range(3) %}L{% endfor %}", "tracking_url": "u"})
    assert "{{ 7*7 }}" in out["text"] and "49" not in out["text"] and "LLL" not in out["text"]


XSS = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "' onmouseover='alert(1)",
    "</strong><iframe src=javascript:alert(1)>",
]


def test_email_html_is_autoescaped_text_and_sms_are_raw(ctx: Context, settings: Settings) -> None:
    seed(ctx)
    ids = []
    for i, payload in enumerate(XSS):
        data = {"order_id": payload, "tracking_url": f"https://t.example/{i}{payload}"}
        res = submit(
            ctx,
            parse_request(
                {"recipient_id": "alice", "template_id": "order_shipped_v2", "channels": ["email", "sms"], "data": data}
            ),
        )
        assert res.status == "queued"
        ids.append(res.notification_id)
    run_worker(settings, ["high", "normal", "low"], burst=True, reconcile=False)
    by_nid = {}
    for rec in read_outbox(settings.outbox_dir):
        by_nid.setdefault(rec["notification_id"], {})[rec["route"]] = rec["content"]
    assert set(by_nid) == set(ids)
    for nid, payload in zip(ids, XSS, strict=True):
        email, sms = by_nid[nid]["email"], by_nid[nid]["sms"]
        html = email["html"]
        assert payload not in html and str(escape(payload)) in html, html
        assert set(re.findall(r"<\s*/?\s*([a-zA-Z]+)", html)) == {"p", "strong", "a"}, html  # the template's tags only
        assert re.findall(r'href="([^"]*)"', html) == [str(escape(f"https://t.example/{ids.index(nid)}{payload}"))]
        assert payload in email["text"] and payload in email["subject"]  # plain text: as given
        assert payload in sms["text"]


# ------------------------------------------------------------------------------ isolation


def test_one_users_data_never_renders_into_anothers_message(ctx: Context, settings: Settings, tmp_path: Path) -> None:
    """A campaign batch to many users, each with their own data: every message has its own and nobody else's."""
    from campaigns.launcher import LaunchSpec, launch
    from worker.reconciler import reconcile

    n = 40
    users = [f"iso{i:03d}" for i in range(n)]
    rep = import_users(
        ctx,
        io.StringIO(
            "user_id,email,phone,timezone,sms_opt_in,nickname\n"
            + "".join(f"{u},{u}@example.com,+1415555{i:04d},UTC,true,NICK-{u}-Q\n" for i, u in enumerate(users))
        ),
    )
    assert rep.errors == [] and rep.imported == n
    tdir = settings.home / "templates"
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "iso_promo.toml").write_text(
        "category = 'marketing'\npriority = 'low'\n"
        "[email]\nsubject = 'Hi {{ first_name }}'\nhtml = '<p>{{ code }} {{ user.nickname }}</p>'\n"
        "text = '{{ code }} {{ user.nickname }} {{ user.id }}'\n"
        "[sms]\ntext = '{{ first_name }} {{ code }} {{ user.nickname }}'\n",
        encoding="utf-8",
    )
    seg = tmp_path / "seg.csv"
    seg.write_text("user_id,first_name,code\n" + "".join(f"{u},FIRST-{u}-Z,CODE-{u}-K\n" for u in users))
    s = launch(
        ctx,
        LaunchSpec("iso_promo", channels=["email", "sms"], segment_csv=str(seg), rate=100_000, quiet_hours="off"),
    )
    assert s["written"] == n, s
    far = time.time() + 86400
    for _ in range(10):
        res = reconcile(ctx, now=far, force=True)
        run_worker(settings, ["high", "normal", "low"], burst=True, reconcile=False)
        if not res.retries_queued and not res.recovered:
            break
    records = read_outbox(settings.outbox_dir)
    assert len(records) == 2 * n, len(records)
    with Session(ctx.engine) as sess:
        owner = {n_.id: n_.recipient_id for n_ in sess.execute(select(Notification)).scalars()}
    seen = set()
    for rec in records:
        uid = owner[rec["notification_id"]]
        blob = json.dumps(rec["content"])
        for own in (f"CODE-{uid}-K", f"NICK-{uid}-Q"):
            assert own in blob, (uid, blob)
        others = {u for u in users if u != uid and (f"-{u}-" in blob or f"{u}@" in blob)}
        assert not others, (uid, others, blob)
        assert rec["to"] in (f"{uid}@example.com",) or rec["route"] == "sms"
        seen.add((uid, rec["route"]))
    assert len(seen) == 2 * n


# ------------------------------------------------------------------------------ unsubscribe

KEY = b"k" * 32


def test_unsubscribe_tokens_cannot_be_forged() -> None:
    good = make_token(KEY, "alice", "marketing")
    assert verify_token(KEY, good) == ("alice", "marketing")
    uid, scope, sig = good.split(".")
    forgeries = {
        "other user": f"{b64url(b'bob')}.{scope}.{sig}",
        "other scope": f"{uid}.all.{sig}",
        "signature of another user": f"{uid}.{scope}.{make_token(KEY, 'bob', 'marketing').split('.')[2]}",
        "signature of another scope": f"{uid}.{scope}.{make_token(KEY, 'alice', 'alerts').split('.')[2]}",
        "another key": make_token(b"x" * 32, "alice", "marketing"),
        "truncated signature": good[:-1],
        "truncated to user+scope": f"{uid}.{scope}",
        "empty signature": f"{uid}.{scope}.",
        "extra part": good + ".x",
        "flipped signature char": f"{uid}.{scope}.{sig[:-2]}{'A' if sig[-2] != 'A' else 'B'}{sig[-1]}",
        "empty": "",
        "dots": "..",
        "unknown scope": f"{uid}.everything.{sig}",
    }
    for what, token in forgeries.items():
        with pytest.raises(InputError, match="unsubscribe link"):
            verify_token(KEY, token)
            pytest.fail(f"accepted a forgery: {what}")


def test_fixed_bug_unsubscribe_non_ascii_signature() -> None:
    uid, scope, sig = make_token(KEY, "alice", "marketing").split(".")
    with pytest.raises(InputError, match="unsubscribe link"):
        verify_token(KEY, f"{uid}.{scope}.{sig[:-1]}é")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(
    user=st.text(min_size=1, max_size=40),
    scope=st.sampled_from(["marketing", "alerts", "transactional", "all"]),
    other=st.text(min_size=1, max_size=40),
    tamper=st.text(max_size=60),
)
def test_unsubscribe_token_for_one_user_never_verifies_as_another(
    user: str, scope: str, other: str, tamper: str
) -> None:
    token = make_token(KEY, user, scope)
    assert verify_token(KEY, token) == (user, scope)
    uid, sc, sig = token.split(".")
    if other != user:
        for forged in (f"{b64url(other.encode())}.{sc}.{sig}", make_token(KEY, other, scope)):
            try:
                got = verify_token(KEY, forged)
            except InputError:
                continue
            assert got == (other, scope) and forged == make_token(KEY, other, scope)
    if tamper != token:
        try:
            got = verify_token(KEY, tamper)
        except InputError:
            return
        assert tamper == make_token(KEY, got[0], got[1])  # only a genuine token verifies


# ------------------------------------------------------------------------------ SQL segments


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM users",
        "UPDATE users SET email = NULL",
        "INSERT INTO opt_outs (user_id, channel, category, reason) VALUES ('alice','*','*','x')",
        "DROP TABLE users",
        "SELECT id AS user_id FROM users; DELETE FROM users",
        "SELECT id AS user_id FROM users; DROP TABLE users;",
        "WITH x AS (DELETE FROM users RETURNING id) SELECT id AS user_id FROM x",
        "SELECT id AS user_id INTO stolen FROM users",
        "SELECT id AS user_id FROM users FOR UPDATE",
        "/* SELECT */ DELETE FROM users",
        "ATTACH DATABASE 'x.db' AS x",
        "PRAGMA query_only = OFF",
        "CREATE TABLE t AS SELECT id AS user_id FROM users",
        "REPLACE INTO users (id) VALUES ('zed')",
        "VACUUM",
    ],
)
def test_sql_segments_refuse_writes(any_db_ctx: Context, sql: str) -> None:
    ctx = any_db_ctx
    seed(ctx)
    url = ctx.settings.effective_database_url()
    with Session(ctx.engine) as s:
        before = s.execute(text("SELECT count(*) FROM users")).scalar_one()
    with pytest.raises(InputError):
        seg = SqlSegment(sql, url)
        list(seg.rows(BadRows()))
    with Session(ctx.engine) as s:
        assert s.execute(text("SELECT count(*) FROM users")).scalar_one() == before == 4
        assert s.execute(select(OptOut)).first() is None


@pytest.mark.fresh_pg_schema
def test_sql_segment_transaction_is_read_only_even_past_the_checker(any_db_ctx: Context) -> None:
    """A SELECT that writes through a function gets past the text check; the read-only transaction stops it."""
    ctx = any_db_ctx
    seed(ctx)
    url = ctx.settings.effective_database_url()
    if ctx.engine.dialect.name == "postgresql":
        with ctx.engine.begin() as c:
            c.execute(text("CREATE SEQUENCE fuzz_seq"))
        sql = "SELECT id AS user_id, nextval('fuzz_seq') AS n FROM users"
    else:
        # SQLite: a SELECT cannot write, but the connection must still be query_only
        sql = "SELECT id AS user_id, (SELECT count(*) FROM pragma_query_only WHERE query_only = 1) AS ro FROM users"
    seg = SqlSegment(sql, url)
    try:
        rows = list(seg.rows(BadRows()))
    except InputError as exc:
        assert "read-only" in str(exc) or "read only" in str(exc), exc
        return
    assert ctx.engine.dialect.name == "sqlite" and rows and all(r.extras["ro"] == 1 for r in rows), rows


# ------------------------------------------------------------------------------ API keys


def test_every_api_route_but_public_ones_requires_a_key(ctx: Context) -> None:
    """Enumerates the app's routes, so a route added later without the key dependency fails here."""
    from notifyctl.api.auth import create_key, revoke_key
    from tests.util import ApiServer

    seed(ctx)
    public = ("/webhooks/", "/u/", "/o/", "/healthz", "/docs", "/openapi.json", "/redoc")
    with ApiServer(ctx, config=ApiConfig()) as server, httpx.Client(base_url=server.url, timeout=10) as c:
        # every operation the app documents (routers included lazily have no flat .routes on this FastAPI)
        paths = server.app.openapi()["paths"]
        routes = [
            (m.upper(), path)
            for path, ops in paths.items()
            for m in ops
            if m.upper() not in ("HEAD", "OPTIONS") and not path.startswith(public)
        ]
        assert len(routes) >= 8, routes
        revoked = create_key(ctx, "old")
        revoke_key(ctx, revoked.id)
        for method, path in routes:
            url = path.replace("{", "").replace("}", "")  # /v1/users/{user_id} -> /v1/users/user_id
            for headers in (
                {},
                {"Authorization": "Bearer nk_forged"},
                {"X-API-Key": "nk_" + "A" * 43},
                {"Authorization": f"Bearer {revoked.key}"},
                {"X-API-Key": revoked.key},
                {"Authorization": f"Basic {base64.b64encode(b'a:b').decode()}"},
            ):
                r = c.request(method, url, headers=headers, json={})
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
        with Session(ctx.engine) as s:
            assert s.execute(select(Notification)).first() is None


@settings(max_examples=200, deadline=None)
@given(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.sampled_from(["https://n.example.com", "https://n.example.com/", "http://h:8080/base//"]),
    st.binary(min_size=1, max_size=40),
)
def test_batch_link_makers_make_the_links_of_one_call(ident: str, public_url: str, key: bytes) -> None:
    """``link_maker`` and ``pixel_maker`` (what the worker's email plan uses for a batch) give the
    links ``unsubscribe_url`` and ``pixel_url`` give, for any id (non-ASCII, empty, dots), key and
    base URL; and the links verify. ``b64url`` is ``base64.urlsafe_b64encode`` unpadded."""
    from types import SimpleNamespace

    from notifyctl.inbound import pixel_maker, pixel_url, verify_open_token
    from notifyctl.unsubscribe import link_maker, unsubscribe_url

    conf = SimpleNamespace(public_url=public_url)
    for scope in ("marketing", "all"):
        make = link_maker(conf, key, scope)
        assert make is not None and make(ident) == unsubscribe_url(conf, key, ident, scope)
        assert verify_token(key, make(ident).rsplit("/u/", 1)[1]) == (ident, scope)
    pixel = pixel_maker(conf, key)
    assert pixel is not None and pixel(ident) == pixel_url(conf, key, ident)
    if ident:
        assert verify_open_token(key, pixel(ident).rsplit("/o/", 1)[1].removesuffix(".gif")) == ident
    assert link_maker(SimpleNamespace(public_url=""), key) is None and pixel_maker(SimpleNamespace(), key) is None
    with pytest.raises(ValueError):
        link_maker(conf, key, "everything")
    raw = ident.encode()
    assert b64url(raw) == base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
