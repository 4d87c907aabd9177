"""The directory's identifiers and a device's changing push token.

- Push tokens are checked for their platform wherever they are registered (CLI, API): APNs hex of
  a plausible length (stored lower-case), FCM registration-token shaped; no control characters.
- User ids and emails with control or invisible formatting characters (NUL, bidi overrides) are
  refused everywhere one enters: `users import`, `PUT /v1/users/{id}`, `send`, campaign segments.
- A registration that names the token it replaces (`--replaces`) or carries a device id
  (`--device-id`) retires the old token at once (reason `replaced`), and a send after that goes
  only to the new token: through the real pipeline, including when the old token was already
  loaded by the batch, and for a retry fanned out to the old token before the replacement.
- A database created before `device_tokens` had those columns is upgraded in place.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import event, func, insert, inspect, select, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel
from typer.testing import CliRunner

from notifyctl.cli.main import app as cli_app
from notifyctl.context import Context
from notifyctl.db import add_missing_columns, dispose_all, make_engine
from notifyctl.directory import register_device, register_token
from notifyctl.errors import ConfigError, InputError
from notifyctl.identifiers import check_email, check_token, check_user_id
from notifyctl.models import DeviceToken, User, utcnow
from notifyctl.settings import Settings
from tests.conftest import cli_env, make_settings
from tests.util import (
    ANDROID_TOKEN,
    IOS_TOKEN,
    ApiServer,
    count_notifications,
    deliveries,
    drain,
    fcm_token,
    seed,
    send,
)

runner = CliRunner()
OLD = "0a" * 32
NEW = "1b" * 32
OTHER = "2c" * 32


def cli(settings: Settings, *args: str, input: str | None = None) -> Any:
    return runner.invoke(cli_app, list(args), input=input, env=cli_env(settings))


def one_error_line(r: Any) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    return lines[0]


def token_rows(ctx: Context) -> dict[str, DeviceToken]:
    with Session(ctx.engine) as s:
        return {t.token: t for t in s.execute(select(DeviceToken)).scalars()}


def live_tokens(ctx: Context, user_id: str) -> set[str]:
    return {t for t, row in token_rows(ctx).items() if row.user_id == user_id and row.removed_at is None}


def outbox(settings: Settings, route: str = "push.ios") -> list[dict[str, Any]]:
    path = settings.outbox_dir / f"{route}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------------------- the validators

BAD_TOKENS = [
    ("ios", "abcd", "32 to 100 bytes"),  # the iOS token
    ("ios", "zz" * 32, "hexadecimal"),
    ("ios", "a" * 63, "odd number"),
    ("ios", "ab" * 101, "32 to 100 bytes"),
    ("ios", "ab" * 16 + "\x00" + "ab" * 16, "U+0000"),
    ("ios", "ab" * 32 + "\u202e", "U+202E RIGHT-TO-LEFT OVERRIDE"),
    ("android", "x", "100 to 512 characters"),  # the Android token
    ("android", "android-token-bob", "100 to 512 characters"),
    ("android", ANDROID_TOKEN[:80] + "\x00" + ANDROID_TOKEN[80:], "U+0000"),
    ("android", ANDROID_TOKEN[:80] + " " + ANDROID_TOKEN[80:], "only letters, digits"),
    ("android", ANDROID_TOKEN[:80] + "é" + ANDROID_TOKEN[80:], "only letters, digits"),
    ("android", ANDROID_TOKEN[:80] + "\u2066" + ANDROID_TOKEN[80:], "U+2066"),
    ("android", "a" * 513, "512 characters"),
]


@pytest.mark.parametrize("platform,token,message", BAD_TOKENS)
def test_check_token_refuses_bad_shapes(platform: str, token: str, message: str) -> None:
    with pytest.raises(InputError) as exc:
        check_token(token, platform)
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert "\x00" not in str(exc.value) and "\u202e" not in str(exc.value) and "\u2066" not in str(exc.value)


def test_check_token_accepts_real_shapes() -> None:
    assert check_token("AB" * 32, "ios") == "ab" * 32  # stored lower-case
    assert check_token("  " + "cd" * 32 + "\n", "ios") == "cd" * 32
    assert check_token("ef" * 100, "ios") == "ef" * 100  # longer tokens to come: up to 100 bytes
    assert check_token(ANDROID_TOKEN, "android") == ANDROID_TOKEN
    real_shape = "cR8Hx3kQTm2" + "-" * 0 + "3Ob_Qv0lYz:APA91bF" + "k2Jq_9-Lr" * 15  # instance id : APA91b...
    assert check_token(real_shape, "android") == real_shape


BAD_IDS = ["a\x00b", "evil\u202etxt.exe", "x\u2066y\u2069", "zero\u200bwidth", "\ufeffbom", "two\u2028lines", "tab\tin"]


@pytest.mark.parametrize("uid", BAD_IDS)
def test_check_user_id_and_email_refuse_control_and_format_characters(uid: str) -> None:
    with pytest.raises(InputError) as exc:
        check_user_id(uid)
    assert "control or invisible formatting character" in str(exc.value)
    assert str(exc.value).isprintable()  # the message never carries the character itself
    with pytest.raises(InputError):
        check_email(uid.replace("\ufeff", "b\ufeff") + "@example.com")


def test_ordinary_unicode_ids_are_fine() -> None:
    assert check_user_id("  zoë-👍 smith ") == "zoë-👍 smith"
    assert check_email("zoë@exämple.com") == "zoë@exämple.com"


# --------------------------------------------------------------- every entry point uses them


def test_tokens_register_cli_refuses_bad_tokens_and_writes_nothing(ctx: Context, settings: Settings) -> None:
    seed(ctx)
    before = token_rows(ctx)
    for platform, token, message in BAD_TOKENS:
        r = cli(settings, "tokens", "register", "carol", token, "--platform", platform)
        assert r.exit_code == 2, (token, r.output)
        assert message in one_error_line(r), (token, r.stderr)
    assert token_rows(ctx).keys() == before.keys()
    r = cli(settings, "tokens", "register", "carol", "CD" * 32, "--platform", "ios")
    assert r.exit_code == 0, r.output
    assert live_tokens(ctx, "carol") == {"cd" * 32}


def test_a_known_token_registered_in_upper_case_is_the_same_device(ctx: Context) -> None:
    seed(ctx)
    with Session(ctx.engine) as s:  # as the previous release stored it: as given
        s.add(DeviceToken(token="EF" * 32, user_id="carol", platform="ios"))
        s.commit()
    reg = register_device(ctx, "carol", "Ef" * 32, "ios")
    assert live_tokens(ctx, "carol") == {"ef" * 32} and reg.replaced == ["EF" * 32]
    assert cli(ctx.settings, "tokens", "revoke", "EF" * 32).exit_code == 0  # any case finds it
    assert live_tokens(ctx, "carol") == set()


@pytest.fixture
def client(ctx: Context) -> Iterator[httpx.Client]:
    from notifyctl.api.auth import create_key

    key = create_key(ctx, "tests").key
    with (
        ApiServer(ctx) as server,
        httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as c,
    ):
        yield c


def api_error(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and "\n" not in body["error"], body
    return str(body["error"])


def test_api_refuses_bad_tokens_ids_and_emails_with_422(ctx: Context, client: httpx.Client) -> None:
    seed(ctx)
    before = token_rows(ctx)
    for platform, token, message in BAD_TOKENS:
        r = client.post("/v1/users/carol/tokens", json={"token": token, "platform": platform})
        assert r.status_code == 422 and message in api_error(r), (token, r.text)
    assert token_rows(ctx).keys() == before.keys()
    r = client.post("/v1/users/carol/tokens", json={"token": fcm_token("carol"), "platform": "android"})
    assert r.status_code == 201 and r.json()["token"] == fcm_token("carol")

    users = count_users(ctx)
    for uid in BAD_IDS:
        r = client.put(f"/v1/users/{urllib.parse.quote(uid, safe='')}", json={"email": "x@example.com"})
        assert r.status_code == 422 and "control or invisible" in api_error(r), (uid, r.text)
    for email in ["eve\u202e@example.com", "eve@exa\x00mple.com"]:
        r = client.put("/v1/users/eve", json={"email": email})
        assert r.status_code == 422 and "email: contains U+" in api_error(r), r.text
    assert count_users(ctx) == users
    r = client.post("/v1/notify", json={"recipient_id": "car\u202eol", "template_id": "otp_code",
                                        "data": {"code": "1", "minutes": 2}})  # fmt: skip
    assert r.status_code == 422 and "recipient_id: contains U+202E" in api_error(r)
    assert count_notifications(ctx) == 0


def count_users(ctx: Context) -> int:
    with Session(ctx.engine) as s:
        return int(s.execute(select(func.count()).select_from(User)).scalar_one())


def test_users_import_refuses_bad_ids_and_emails_by_line(ctx: Context, settings: Settings, tmp_path: Path) -> None:
    f = tmp_path / "users.csv"
    rows = ["user_id,email", "ok1,ok1@example.com"]
    rows += [f"{uid},x@example.com" for uid in BAD_IDS if uid != "two\u2028lines"]
    rows += ["ok2,ok2\u202e@example.com", "ok3,ok3@exa\u200bmple.com", "zoë👍,zoe@example.com"]
    f.write_text("\n".join(rows) + "\n", encoding="utf-8")
    r = cli(settings, "users", "import", str(f), "--json")
    assert r.exit_code == 1, r.output
    rep = json.loads(r.stdout)
    assert rep["imported"] == 2
    assert [e["line"] for e in rep["errors"]] == list(range(3, 3 + len(BAD_IDS) - 1 + 2))
    assert all("control or invisible formatting character" in e["error"] for e in rep["errors"]), rep
    with Session(ctx.engine) as s:
        assert sorted(s.execute(select(User.id)).scalars()) == ["ok1", "zoë👍"]


def test_send_refuses_a_bad_recipient_id(ctx: Context, settings: Settings) -> None:
    seed(ctx)
    for uid in ["ali\x00ce", "ali\u202ece"]:
        r = cli(settings, "send", uid, "-t", "otp_code", "-d", "code=1", "-d", "minutes=2")
        assert r.exit_code == 2 and "recipient_id: contains U+" in one_error_line(r)
        body = json.dumps({"recipient_id": uid, "template_id": "otp_code", "data": {"code": "1", "minutes": 2}})
        r = cli(settings, "send", "-f", "-", input=body)
        assert r.exit_code == 2 and "recipient_id: contains U+" in one_error_line(r)
    assert count_notifications(ctx) == 0


def test_campaign_segment_rows_with_bad_user_ids_are_bad_rows(ctx: Context) -> None:
    from campaigns.segments import BadRows, CsvSegment, SqlSegment

    seg = ctx.settings.home / "seg.csv"
    seg.write_text("user_id,first_name\nalice,A\nbo\u202eb,B\nca\x00rol,C\n", encoding="utf-8")
    bad = BadRows()
    assert [r.user_id for r in CsvSegment(seg).rows(bad)] == ["alice"]
    assert [b["line"] for b in bad.first] == [3, 4] and all("U+" in b["message"] for b in bad.first)

    db = ctx.settings.home / "seg.db"
    eng = make_engine(f"sqlite:///{db}")
    with eng.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE s (user_id TEXT)")
        conn.exec_driver_sql("INSERT INTO s VALUES ('alice'), ('da\u2066ve'), ('bob')")
    eng.dispose()
    bad = BadRows()
    rows = SqlSegment("SELECT user_id FROM s ORDER BY rowid", f"sqlite:///{db}").rows(bad)
    assert [r.user_id for r in rows] == ["alice", "bob"]
    assert [b["line"] for b in bad.first] == [2] and "U+2066" in bad.first[0]["message"]


# ------------------------------------------------------------------------- token replacement


def test_replaces_retires_the_old_token_at_once(ctx: Context, settings: Settings) -> None:
    seed(ctx)
    register_token(ctx, "alice", OLD, "ios")
    r = cli(settings, "tokens", "register", "alice", NEW, "--platform", "ios", "--replaces", OLD, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["token"] == NEW and out["replaced"] == [OLD] and out["replaces_unknown"] is False
    assert live_tokens(ctx, "alice") == {IOS_TOKEN, NEW}  # alice's other device keeps its token
    old = token_rows(ctx)[OLD]
    assert old.removed_at is not None and old.removed_reason == "replaced" and old.replaced_by == NEW
    removed = json.loads(cli(settings, "tokens", "list", "--removed", "--json").stdout)
    assert [(t["token"], t["removed_reason"], t["replaced_by"]) for t in removed] == [(OLD, "replaced", NEW)]
    assert "replaced by 1b1b1b1b1b1b" in cli(settings, "tokens", "list", "--removed").stdout

    # and again, when the app did not hear the answer: nothing more to retire, no error
    r = cli(settings, "tokens", "register", "alice", NEW, "--platform", "ios", "--replaces", OLD)
    assert r.exit_code == 0 and live_tokens(ctx, "alice") == {IOS_TOKEN, NEW}
    # the device rotates again, and the app still names the first token: the live end of the chain goes
    reg = register_device(ctx, "alice", OTHER, "ios", replaces=OLD)
    assert reg.replaced == [NEW] and live_tokens(ctx, "alice") == {IOS_TOKEN, OTHER}


def test_replaces_errors_and_unknown_tokens(ctx: Context, settings: Settings) -> None:
    seed(ctx)
    register_token(ctx, "alice", OLD, "ios")
    before = token_rows(ctx)
    r = cli(settings, "tokens", "register", "bob", NEW, "--platform", "ios", "--replaces", OLD)
    assert r.exit_code == 2 and "replaces: token 0a0a0a0a0a0a… is not one of 'bob'" in one_error_line(r)
    r = cli(settings, "tokens", "register", "alice", OLD, "--platform", "ios", "--replaces", OLD.upper())
    assert r.exit_code == 2 and "replaces: names the token being registered" in one_error_line(r)
    r = cli(settings, "tokens", "register", "alice", NEW, "--platform", "ios", "--device-id", "ph\u202eone")
    assert r.exit_code == 2 and "device_id: contains U+202E" in one_error_line(r)
    r = cli(settings, "tokens", "register", "alice", NEW, "--platform", "ios", "--replaces", "x\x00y")
    assert r.exit_code == 2 and "replaces: contains U+0000" in one_error_line(r)
    assert token_rows(ctx).keys() == before.keys()
    # a token we never had (its registration was lost): the new one is registered all the same
    r = cli(settings, "tokens", "register", "alice", NEW, "--platform", "ios", "--replaces", OTHER)
    assert r.exit_code == 0 and "nothing else was retired" in r.stderr
    assert live_tokens(ctx, "alice") == {IOS_TOKEN, OLD, NEW}


def test_device_id_keeps_one_live_token_per_device(ctx: Context, settings: Settings) -> None:
    seed(ctx)
    bob1, bob2, bob3 = fcm_token("bob-pixel-1"), fcm_token("bob-pixel-2"), fcm_token("bob-tablet")
    for tok, dev in ((bob1, "pixel"), (bob3, "tablet")):
        r = cli(settings, "tokens", "register", "bob", tok, "--platform", "android", "--device-id", dev)
        assert r.exit_code == 0, r.output
    r = cli(settings, "tokens", "register", "bob", bob2, "--platform", "android", "--device-id", "pixel")
    assert r.exit_code == 0 and "retired bob-pixel-1:" in r.stdout and "(device pixel)" in r.stdout
    assert live_tokens(ctx, "bob") == {ANDROID_TOKEN, bob2, bob3}
    assert token_rows(ctx)[bob1].replaced_by == bob2 and token_rows(ctx)[bob1].removed_reason == "replaced"
    # device ids are per user: carol's "pixel" is another device
    register_device(ctx, "carol", fcm_token("carol-pixel"), "android", device_id="pixel")
    assert live_tokens(ctx, "bob") == {ANDROID_TOKEN, bob2, bob3}
    # a token that names what it replaces inherits that one's device id
    reg = register_device(ctx, "bob", fcm_token("bob-pixel-3"), "android", replaces=bob2)
    assert reg.replaced == [bob2] and reg.token.device_id == "pixel"
    assert register_device(ctx, "bob", fcm_token("bob-pixel-4"), "android", device_id="pixel").replaced == [
        fcm_token("bob-pixel-3")
    ]


def test_api_registration_replaces_too(ctx: Context, client: httpx.Client) -> None:
    seed(ctx)
    r = client.post("/v1/users/alice/tokens", json={"token": OLD.upper(), "platform": "ios", "device_id": "iphone"})
    assert r.status_code == 201 and r.json()["token"] == OLD and r.json()["replaced"] == []
    r = client.post("/v1/users/alice/tokens", json={"token": NEW, "platform": "ios", "device_id": "iphone"})
    assert r.status_code == 201 and r.json()["replaced"] == [OLD] and r.json()["device_id"] == "iphone"
    r = client.post("/v1/users/alice/tokens", json={"token": OTHER, "platform": "ios", "replaces": NEW})
    assert r.status_code == 201 and r.json()["replaced"] == [NEW] and r.json()["device_id"] == "iphone"
    assert live_tokens(ctx, "alice") == {IOS_TOKEN, OTHER}
    r = client.post("/v1/users/alice/tokens", json={"token": NEW, "platform": "ios", "replaces": ANDROID_TOKEN})
    assert r.status_code == 422 and "is not one of 'alice'" in api_error(r)


def test_racing_registrations_for_one_device_leave_one_live_token(any_db_ctx: Context) -> None:
    seed(any_db_ctx)
    tokens = [f"{i:02x}" * 32 for i in range(16, 24)]
    start = threading.Barrier(len(tokens))
    errors: list[BaseException] = []

    def register(tok: str) -> None:
        start.wait()
        try:
            register_device(any_db_ctx, "carol", tok, "ios", device_id="ipad")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(live_tokens(any_db_ctx, "carol")) == 1
    rows = token_rows(any_db_ctx)
    assert sum(rows[t].removed_reason == "replaced" for t in tokens) == len(tokens) - 1


# ----------------------------------------------------------------- sends after a replacement


def test_a_send_after_replacement_goes_only_to_the_new_token(ctx: Context, settings: Settings) -> None:
    seed(ctx)
    register_token(ctx, "carol", OLD, "ios")
    first = send(ctx, recipient_id="carol", channels=["push"])
    drain(settings)
    register_device(ctx, "carol", NEW, "ios", replaces=OLD)
    second = send(ctx, recipient_id="carol", channels=["push"], data={"order_id": "O2", "tracking_url": "u"})
    drain(settings)
    pushes = [(p["notification_id"], p["to"]) for p in outbox(settings)]
    assert pushes == [(first.notification_id, OLD), (second.notification_id, NEW)]
    assert [(d.address, d.status) for d in deliveries(ctx, second.notification_id)] == [(NEW, "sent")]


@pytest.fixture
def after_token_load() -> Iterator[list[Any]]:
    """Run the callables put in the list once, right after a worker's batch has loaded its device
    tokens (the statement runs, the replacement commits from another connection, then the batch
    goes on): the race of a registration with a batch already loaded, made to happen every time."""
    todo: list[Any] = []

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if todo and "FROM device_tokens" in statement and "device_tokens.user_id IN" in statement:
            todo.pop(0)()

    event.listen(Engine, "after_cursor_execute", hook)
    yield todo
    event.remove(Engine, "after_cursor_execute", hook)


def test_race_old_token_in_a_batch_already_loaded(ctx: Context, settings: Settings, after_token_load: list) -> None:
    seed(ctx)
    register_token(ctx, "carol", OLD, "ios")
    n = send(ctx, recipient_id="carol", channels=["push"])
    replaced: list[str] = []
    after_token_load.append(lambda: replaced.extend(register_device(ctx, "carol", NEW, "ios", replaces=OLD).replaced))
    drain(settings)
    assert replaced == [OLD] and after_token_load == []  # the replacement did land mid-batch
    assert [p["to"] for p in outbox(settings)] == [NEW]
    [d] = deliveries(ctx, n.notification_id)
    assert (d.address, d.route, d.status) == (NEW, "push.ios", "sent")
    from worker.pipeline import delivery_id

    assert d.id == delivery_id(n.notification_id, "push", NEW)  # what a rerun fanning out to NEW computes


def test_race_both_tokens_loaded_goes_to_the_device_once(
    ctx: Context, settings: Settings, after_token_load: list
) -> None:
    """NEW was registered plainly first (both live), then re-registered as replacing OLD while a
    batch had both loaded: the device gets the notification once."""
    seed(ctx)
    register_token(ctx, "carol", OLD, "ios")
    register_token(ctx, "carol", NEW, "ios")
    n = send(ctx, recipient_id="carol", channels=["push"])
    after_token_load.append(lambda: register_device(ctx, "carol", NEW, "ios", replaces=OLD))
    drain(settings)
    assert [p["to"] for p in outbox(settings)] == [NEW]
    got = sorted((d.address, d.status, d.reason) for d in deliveries(ctx, n.notification_id))
    assert got == sorted([(NEW, "sent", None), (OLD, "suppressed", "token_replaced")])


def test_race_replacement_now_registered_to_someone_else_is_not_followed(
    ctx: Context, settings: Settings, after_token_load: list
) -> None:
    """The device that had carol's OLD now has NEW, which dave registered meanwhile (a handed-down
    phone): carol's notification goes to neither."""
    seed(ctx)
    register_token(ctx, "carol", OLD, "ios")
    n = send(ctx, recipient_id="carol", channels=["push"])

    def hand_down() -> None:
        register_device(ctx, "carol", NEW, "ios", replaces=OLD)
        register_device(ctx, "dave", NEW, "ios")

    after_token_load.append(hand_down)
    drain(settings)
    assert outbox(settings) == []
    [d] = deliveries(ctx, n.notification_id)
    assert (d.address, d.status, d.reason) == (OLD, "suppressed", "token_replaced")


KEY_ID, TEAM_ID, TOPIC = "ABC123DEFG", "TEAM123456", "com.example.app"


@pytest.fixture
def apns_ctx(home: Path, redis_url: str, rclient: Any, tmp_path: Path) -> Iterator[tuple[Context, Any]]:
    from sandboxes.apns import ApnsSandbox

    p8 = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )
    with ApnsSandbox({KEY_ID: p8}, topic=TOPIC, team_id=TEAM_ID) as sb:
        opts = {"key": p8, "key_id": KEY_ID, "team_id": TEAM_ID, "topic": TOPIC, "base_url": sb.url,
                "ca_file": str(sb.ca_file), "timeout": 5}  # fmt: skip
        c = Context(make_settings(home, redis_url, providers_push_ios=["apns"], provider_options={"apns": opts}))
        yield c, sb
        from worker import jobs

        jobs.close()
        c.close()
        dispose_all()


def test_retry_fanned_out_to_the_old_token_goes_to_the_new_one(apns_ctx: tuple[Context, Any]) -> None:
    """The first attempt to OLD fails (503); the app registers NEW in its place; the retry goes
    to NEW only (APNs sandbox over HTTP/2), keeping the delivery's id and attempts."""
    import time

    from worker.pipeline import Runtime, process

    ctx, sb = apns_ctx
    seed(ctx)
    register_token(ctx, "carol", OLD, "ios")
    sb.faults.add({"match": OLD, "status": 503, "reason": "ServiceUnavailable"})
    n = send(ctx, recipient_id="carol", channels=["push"])
    drain(ctx.settings)
    [d] = deliveries(ctx, n.notification_id)
    assert (d.address, d.status, d.attempts) == (OLD, "retrying", 1)
    assert sb.recorder.all() == []

    register_device(ctx, "carol", NEW, "ios", replaces=OLD)
    rt = Runtime(ctx)
    try:  # the retry's job, as the reconciler queues it when due
        process(rt, [n.notification_id], as_of=time.time() + 3600)
    finally:
        rt.close()
    [after] = deliveries(ctx, n.notification_id)
    assert (after.id, after.address, after.status, after.attempts) == (d.id, NEW, "sent", 2)
    assert [p["token"] for p in sb.recorder.all()] == [NEW]


# ------------------------------------------------------------------ a database made by 0.x

# device_tokens exactly as the release before `device_id`/`replaced_by` created it (its
# `create_all`, compiled for each dialect); every other table is unchanged by them.
LEGACY_DEVICE_TOKENS = """CREATE TABLE device_tokens (
    token VARCHAR(512) NOT NULL,
    user_id VARCHAR(255) NOT NULL,
    platform VARCHAR(16) NOT NULL,
    created_at {ts} NOT NULL,
    last_success_at {ts},
    removed_at {ts},
    removed_reason VARCHAR(255),
    PRIMARY KEY (token)
)"""
LEGACY_INDEXES = [
    "CREATE INDEX ix_device_tokens_user_id ON device_tokens (user_id)",
    "CREATE INDEX ix_device_tokens_removed_at ON device_tokens (removed_at)",
]


@pytest.mark.fresh_pg_schema
def test_database_from_before_device_ids_is_upgraded_in_place(any_db_ctx: Context) -> None:
    ctx = any_db_ctx
    url = ctx.settings.effective_database_url()
    legacy = make_engine(url)
    ts = "DATETIME" if legacy.dialect.name == "sqlite" else "TIMESTAMP WITH TIME ZONE"
    others = [t for t in SQLModel.metadata.sorted_tables if t.name != "device_tokens"]
    SQLModel.metadata.create_all(legacy, tables=others)
    with legacy.begin() as conn:
        conn.exec_driver_sql(LEGACY_DEVICE_TOKENS.format(ts=ts))
        for ddl in LEGACY_INDEXES:
            conn.exec_driver_sql(ddl)
        conn.execute(insert(User.__table__), [{"id": "carol", "email": "carol@example.com", "attributes": {},  # type: ignore[attr-defined]
                                               "created_at": utcnow(), "updated_at": utcnow()}])  # fmt: skip
        conn.execute(
            text("INSERT INTO device_tokens (token, user_id, platform, created_at) VALUES (:t, 'carol', 'ios', :now)"),
            {"t": OLD, "now": utcnow()},
        )
    legacy.dispose()

    # the first process to open it adds the columns; existing rows read NULL
    first = send(ctx, recipient_id="carol", channels=["push"])
    cols = {c["name"] for c in inspect(ctx.engine).get_columns("device_tokens")}
    assert {"device_id", "replaced_by"} <= cols
    assert token_rows(ctx)[OLD].removed_at is None and token_rows(ctx)[OLD].device_id is None
    drain(ctx.settings)
    reg = register_device(ctx, "carol", NEW, "ios", replaces=OLD, device_id="iphone")
    assert reg.replaced == [OLD]
    second = send(ctx, recipient_id="carol", channels=["push"], data={"order_id": "O2", "tracking_url": "u"})
    drain(ctx.settings)
    assert [(p["notification_id"], p["to"]) for p in outbox(ctx.settings)] == [
        (first.notification_id, OLD),
        (second.notification_id, NEW),
    ]
    # idempotent: the next process finds nothing to add
    dispose_all()
    again = make_engine(url)
    try:
        assert add_missing_columns(again) == []
    finally:
        again.dispose()


def test_upgrade_refuses_what_it_cannot_add(ctx: Context, settings: Settings) -> None:
    """A missing column that is NOT NULL cannot be added in place: a ConfigError naming it (exit 3)."""
    url = settings.effective_database_url()
    legacy = make_engine(url)
    SQLModel.metadata.create_all(legacy)
    with legacy.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE device_tokens DROP COLUMN platform")
    legacy.dispose()
    r = cli(settings, "tokens", "list")
    assert r.exit_code == 3 and "device_tokens lacks column platform" in one_error_line(r)
    again = make_engine(url)
    try:
        with pytest.raises(ConfigError, match="cannot be added automatically"):
            add_missing_columns(again)
    finally:
        again.dispose()
