"""The CLI as users run it: real subprocesses for the main path, CliRunner for the many bad inputs."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import select as sql_select
from sqlmodel import Session
from typer.testing import CliRunner

from notifyctl.cli.main import app
from notifyctl.context import Context
from notifyctl.models import Notification
from notifyctl.redisconn import redis_server_binary
from notifyctl.settings import Settings
from tests.conftest import ROOT, cli_env, invoke_cli, run_cli
from tests.util import ANDROID_TOKEN, count_notifications, queue_depths, seed

runner = CliRunner()


def invoke(settings: Settings, *args: str, input: str | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), input=input, env=cli_env(settings))


def test_send_worker_events_as_subprocesses(settings: Settings, tmp_path: Path) -> None:
    users = tmp_path / "users.csv"
    users.write_text("user_id,email,phone,timezone,locale\nu1,u1@example.com,+14155550199,Europe/Paris,fr\n")
    r = run_cli(settings, "users", "import", str(users))
    assert r.returncode == 0, r.stderr
    assert "imported 1 user" in r.stdout
    r = run_cli(settings, "tokens", "register", "u1", "ef" * 32, "--platform", "ios")
    assert r.returncode == 0, r.stderr
    r = run_cli(
        settings,
        "send",
        "u1",
        "-t",
        "order_shipped_v2",
        "-c",
        "push,email",
        "-d",
        "order_id=O-7",
        "-d",
        "tracking_url=https://t/7",
        "-k",
        "order:O-7",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "queued" and out["channels"] == ["push", "email"]
    nid = out["notification_id"]
    r = run_cli(
        settings,
        "send",
        "u1",
        "-t",
        "order_shipped_v2",
        "-d",
        "order_id=O-7",
        "-d",
        "tracking_url=x",
        "-k",
        "order:O-7",
    )
    assert r.returncode == 0 and r.stdout.strip() == f"{nid} suppressed: duplicate"
    r = run_cli(settings, "worker", "--burst")
    assert r.returncode == 0, r.stderr
    r = run_cli(settings, "events", "order:O-7", "--json")
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)
    assert t["notification"]["id"] == nid and t["notification"]["status"] == "done"
    assert sorted(d["status"] for d in t["deliveries"]) == ["sent", "sent"]
    assert [e["status"] for e in t["events"]].count("sent") == 2
    r = run_cli(settings, "events", nid)
    assert r.returncode == 0 and "Timeline" in r.stdout and "outbox" in r.stdout
    r = run_cli(settings, "status", "--json")
    st = json.loads(r.stdout)
    assert st["deliveries"] == {"sent": 2} and st["dlq_depth"] == 0
    assert [q["depth"] for q in st["queues"]] == [0, 0, 0]


def test_send_reads_request_json_from_stdin(ctx: Context, settings: Settings) -> None:
    seed(ctx)
    req = {
        "recipient_id": "dave",
        "template_id": "otp_code",
        "priority": "high",
        "channels": ["sms"],
        "data": {"code": "123456", "minutes": 5},
        "dedup_key": "otp:1",
    }
    r = invoke(settings, "send", "-f", "-", "--json", input=json.dumps(req))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["priority"] == "high"
    assert queue_depths(ctx) == {"high": 1, "normal": 0, "low": 0}


BAD = [
    (["send", "alice", "-t", "nope"], "template_id: unknown template 'nope'"),
    (
        ["send", "alice", "-t", "otp_code", "-c", "fax", "-d", "code=1", "-d", "minutes=1"],
        "channels: unknown channel 'fax'",
    ),
    (
        ["send", "alice", "-t", "otp_code", "-p", "urgent", "-d", "code=1", "-d", "minutes=1"],
        "priority: Input should be",
    ),
    (["send", "alice", "-t", "otp_code"], "data is missing variable 'code'"),
    (["send", "alice", "-t", "otp_code", "-d", "code"], "--data: expected KEY=VALUE"),
    (["send", "nobody", "-t", "otp_code", "-d", "code=1", "-d", "minutes=1"], "recipient_id: unknown user 'nobody'"),
    (["send", "alice", "-t", "otp_code", "-c", "all,sms", "-d", "code=1"], "'all' cannot be combined"),
    (["send", "alice", "-t", "otp_code", "--data-json", "[1]"], "--data-json: expected a JSON object"),
    (["send", "alice", "-t", "otp_code", "--data-json", "{bad"], "--data-json: malformed JSON"),
    (  # JSON allows it; the JSON columns store 64 bits (found by the fuzzer)
        [
            "send",
            "alice",
            "-t",
            "otp_code",
            "--data-json",
            '{"code": 1, "minutes": 2, "n": {"": -9223372036854775809}}',
        ],
        "data: holds an integer beyond 64 bits",
    ),
    (["send", "-t", "otp_code"], "recipient_id: missing"),
    (["send", "alice"], "template_id: missing"),
    (["send", "alice", "-t", "../../etc/passwd"], "template_id: unknown template"),
    (
        ["send", "alice", "-t", "otp_code", "-k", "x" * 300, "-d", "code=1", "-d", "minutes=1"],
        "dedup_key: String should have at most 255",
    ),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_send_input_is_one_line_exit_2_and_nothing_queued(
    ctx: Context, settings: Settings, args: list[str], message: str
) -> None:
    seed(ctx)
    r = invoke(settings, *args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.output
    assert count_notifications(ctx) == 0 and sum(queue_depths(ctx).values()) == 0
    assert ctx.redis.keys("notif:dedup:*") == []


BAD_JSON = [
    ("{not json", "request: malformed JSON"),
    ("[]", "request: expected a JSON object"),
    (
        '{"recipient_id": "alice", "template_id": "otp_code", "data": {"code": 1, "minutes": 2}, "extra": 1}',
        "extra: unknown field",
    ),
    ('{"recipient_id": "alice", "template_id": "otp_code", "data": "x"}', "data: Input should be a valid dictionary"),
    (
        '{"recipient_id": "alice", "template_id": "otp_code", "channels": [], "data": {}}',
        "channels: List should have at least 1",
    ),
    (
        '{"recipient_id": "alice", "template_id": "weekly_promo", "channels": ["email"], "data": {"first_name": "A", "discount": 1}}',
        "weekly_promo' email.html: data is missing variable 'code'",
    ),
    ('{"recipient_id": 5, "template_id": "otp_code"}', "recipient_id: Input should be a valid string"),
]


@pytest.mark.parametrize("body,message", BAD_JSON)
def test_bad_request_json(ctx: Context, settings: Settings, body: str, message: str) -> None:
    seed(ctx)
    r = invoke(settings, "send", "-f", "-", input=body)
    assert r.exit_code == 2, r.output
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert count_notifications(ctx) == 0 and sum(queue_depths(ctx).values()) == 0


def test_unknown_flag_is_usage_error(settings: Settings) -> None:
    r = invoke(settings, "send", "--bogus")
    assert r.exit_code == 2 and "No such option" in r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: No such option: --bogus"), r.stderr


def test_missing_file_is_exit_2(settings: Settings, tmp_path: Path) -> None:
    r = invoke(settings, "send", "-f", str(tmp_path / "nope.json"))
    assert r.exit_code == 2 and "--file: cannot read" in r.stderr


def test_events_unknown_is_exit_4(ctx: Context, settings: Settings) -> None:
    r = invoke(settings, "events", "n_missing")
    assert r.exit_code == 4 and "no notification with id or dedup key 'n_missing'" in r.stderr


def test_unreachable_redis_is_one_line_exit_3(settings: Settings, tmp_path: Path) -> None:
    env = cli_env(settings, NOTIFY_REDIS_URL=f"unix://{tmp_path}/no.sock")
    r = runner.invoke(app, ["status"], env=env)
    assert r.exit_code == 3 and r.stderr.startswith("error: cannot reach Redis") and "Traceback" not in r.output


def test_bad_setting_is_one_line_exit_3(settings: Settings) -> None:
    r = runner.invoke(app, ["status"], env=cli_env(settings, NOTIFY_RATE_LIMITS='["push:*:3/1y"]'))
    assert r.exit_code == 3 and "bad setting: rate_limits" in r.stderr


def test_users_import_reports_bad_rows_and_keeps_good_ones(ctx: Context, settings: Settings, tmp_path: Path) -> None:
    f = tmp_path / "u.csv"
    f.write_text(
        "user_id,email,phone,timezone,locale,plan\n"
        "ok1,ok1@example.com,(415) 555-0123,America/New_York,en,gold\n"
        ",x@example.com,,,,\n"
        "bad-phone,,12,UTC,en,\n"
        "bad-tz,,,Mars/Olympus,en,\n"
        "bad-mail,not-an-email,,,,\n"
        "extra,a@b.co,,UTC,en,x,y\n"
        "ok2,,+33 6 12 34 56 78,,,\n"
    )
    r = invoke(settings, "users", "import", str(f), "--json")
    assert r.exit_code == 1
    rep = json.loads(r.stdout)
    assert rep["imported"] == 2
    assert [e["line"] for e in rep["errors"]] == [3, 4, 5, 6, 7]
    assert "Mars/Olympus" in rep["errors"][2]["error"]
    r = invoke(settings, "users", "show", "ok1", "--json")
    u = json.loads(r.stdout)["user"]
    assert u["phone"] == "+14155550123" and u["attributes"] == {"plan": "gold"}
    r = invoke(settings, "users", "show", "ok2", "--json")
    assert json.loads(r.stdout)["user"]["phone"] == "+33612345678"


def test_users_import_reports_a_users_second_row_and_keeps_the_first(
    ctx: Context, settings: Settings, tmp_path: Path
) -> None:
    f = tmp_path / "u.csv"
    f.write_text("user_id,email\ndup,first@example.com\nother,o@example.com\ndup,second@example.com\n")
    r = invoke(settings, "users", "import", str(f), "--json")
    assert r.exit_code == 1
    rep = json.loads(r.stdout)
    assert rep["imported"] == 2
    assert rep["errors"] == [{"line": 4, "error": "user 'dup' is also on line 2; that first row is kept"}]
    assert json.loads(invoke(settings, "users", "show", "dup", "--json").stdout)["user"]["email"] == "first@example.com"


def test_users_import_refuses_a_repeated_column(ctx: Context, settings: Settings, tmp_path: Path) -> None:
    f = tmp_path / "u.csv"
    f.write_text("user_id,email,user_id\na,a@example.com,b\n")
    r = invoke(settings, "users", "import", str(f))
    assert r.exit_code == 2 and "column 'user_id' appears 2 times (columns 1, 3)" in r.stderr
    assert invoke(settings, "users", "show", "b").exit_code == 4


def test_users_import_without_user_id_column_is_exit_2(ctx: Context, settings: Settings, tmp_path: Path) -> None:
    f = tmp_path / "u.csv"
    f.write_text("id,email\n1,a@b.co\n")
    r = invoke(settings, "users", "import", str(f))
    assert r.exit_code == 2 and "lacks column user_id" in r.stderr


def test_prefs_and_tokens_commands(ctx: Context, settings: Settings) -> None:
    seed(ctx)
    r = invoke(settings, "prefs", "set", "alice", "--off", "marketing", "--off", "sms", "--json")
    assert json.loads(r.stdout)["opt_outs"] == [
        {"channel": "*", "category": "marketing"},
        {"channel": "sms", "category": "*"},
    ]
    r = invoke(settings, "prefs", "set", "alice", "--on", "sms")
    assert "*:marketing" in r.stdout and "sms:*" not in r.stdout
    r = invoke(settings, "prefs", "set", "alice", "--off", "pigeon")
    assert r.exit_code == 2 and "preference 'pigeon'" in r.stderr
    r = invoke(settings, "tokens", "register", "alice", "zz-not-hex", "--platform", "ios")
    assert r.exit_code == 2 and "hexadecimal" in r.stderr
    r = invoke(settings, "tokens", "register", "alice", "abcd", "--platform", "windows")
    assert r.exit_code == 2
    r = invoke(settings, "tokens", "list", "--json")
    assert sorted(t["user_id"] for t in json.loads(r.stdout)) == ["alice", "bob"]
    r = invoke(settings, "tokens", "revoke", ANDROID_TOKEN)
    assert r.exit_code == 0
    r = invoke(settings, "tokens", "list", "--json")
    assert [t["user_id"] for t in json.loads(r.stdout)] == ["alice"]


def test_templates_commands(settings: Settings) -> None:
    r = invoke(settings, "templates", "list", "--json")
    ids = {t["id"] for t in json.loads(r.stdout)}
    assert {"order_shipped_v2", "otp_code", "security_alert", "weekly_promo"} <= ids
    r = invoke(settings, "templates", "validate")
    assert r.exit_code == 0
    r = invoke(settings, "templates", "show", "weekly_promo", "--json")
    shown = json.loads(r.stdout)
    assert shown["category"] == "marketing" and "first_name" in shown["parts"]["email"]["subject"]
    r = invoke(settings, "templates", "show", "nope")
    assert r.exit_code == 4 and "no template 'nope'" in r.stderr
    r = invoke(settings, "templates", "render", "otp_code", "--data", '{"code": "9", "minutes": 3}', "--json")
    assert json.loads(r.stdout)["sms"]["text"].startswith("9 is your sign-in code")
    r = invoke(settings, "templates", "render", "otp_code", "--data", '{"code": "9"}')
    assert r.exit_code == 2 and "missing variable 'minutes'" in r.stderr


def test_demo_on_embedded_defaults(tmp_path: Path) -> None:
    """The newcomer's first command: embedded Redis (no URL), SQLite, outbox; whole pipeline."""
    from notifyctl.redisconn import stop_server
    from notifyctl.settings import load_settings

    home = tmp_path / "demo"
    s = load_settings(home=home)
    try:
        r = run_cli(s, "demo", NOTIFY_REDIS_URL="", timeout=120)
        assert r.returncode == 0, r.stderr
        out = r.stdout
        assert "suppressed: duplicate" in out and "suppressed: opted_out" in out
        assert "rate_limited:email" in out
        assert out.count(" sent ") >= 6
        nid = out.split("events ")[-1].split()[0]
        ev = run_cli(s, "events", nid, "--json", NOTIFY_REDIS_URL="")
        t = json.loads(ev.stdout)
        assert sorted(d["status"] for d in t["deliveries"]) == ["sent", "sent", "sent"]
        assert (home / "redis" / "appendonly.aof").exists() or (home / "redis" / "appendonlydir").exists()
        # run again: the demo resets its own home and gives the same picture
        r2 = run_cli(s, "demo", NOTIFY_REDIS_URL="", timeout=120)
        assert r2.returncode == 0 and "rate_limited:email" in r2.stdout
    finally:
        stop_server(home / "redis")


# ------------------------------------------------------------- send: flags against the file


def _req(tmp_path: Path, **fields: object) -> str:
    body = {"recipient_id": "carol", "template_id": "otp_code", "data": {"code": "1", "minutes": 5}, **fields}
    f = tmp_path / "req.json"
    f.write_text(json.dumps(body))
    return str(f)


@pytest.mark.parametrize(
    "args,message",
    [
        (["bob"], "recipient_id: RECIPIENT says 'bob' but the file says 'carol'"),
        (["-t", "security_alert"], "template_id: --template says 'security_alert' but the file says 'otp_code'"),
        (["-p", "low"], "priority: --priority says 'low' but the file says 'high'"),
        (["-c", "email"], 'channels: --channel says ["email"] but the file says ["sms"]'),
        (["-k", "otp:2"], "dedup_key: --dedup-key says 'otp:2' but the file says 'otp:1'"),
        (["-d", "code=2"], "data.code: --data says '2' but the file says '1'"),
        (["--data-json", '{"minutes": 6}'], "data.minutes: --data-json says 6 but the file says 5"),
    ],
)
def test_send_flag_conflicting_with_the_file_is_exit_2(
    ctx: Context, settings: Settings, tmp_path: Path, args: list[str], message: str
) -> None:
    seed(ctx)
    f = _req(tmp_path, priority="high", channels=["sms"], dedup_key="otp:1")
    positional, flags = (args[:1], args[1:]) if args[0] == "bob" else ([], args)
    r = invoke(settings, "send", *positional, "-f", f, *flags)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert count_notifications(ctx) == 0 and sum(queue_depths(ctx).values()) == 0
    assert ctx.redis.keys("notif:dedup:*") == []


def test_send_flags_agreeing_with_the_file_or_adding_to_it_are_fine(
    ctx: Context, settings: Settings, tmp_path: Path
) -> None:
    seed(ctx)
    f = _req(tmp_path, channels=["sms", "email"])
    r = invoke(settings, "send", "carol", "-f", f, "-c", "email,sms", "-d", "minutes=5", "-k", "new", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["status"] == "queued" and sorted(out["channels"]) == ["email", "sms"]
    with Session(ctx.engine) as s:
        [n] = s.execute(sql_select(Notification)).scalars()
    assert (n.recipient_id, n.dedup_key, n.data) == ("carol", "new", {"code": "1", "minutes": "5"})


# ------------------------------------------------------------------ worker -v: every outcome


def test_worker_verbose_logs_every_outcome_sent_included(ctx: Context, settings: Settings) -> None:
    seed(ctx)
    sent = invoke(settings, "send", "alice", "-t", "otp_code", "-c", "sms", "-d", "code=1", "-d", "minutes=2", "--json")
    nid = json.loads(sent.stdout)["notification_id"]
    opted = invoke(settings, "prefs", "set", "bob", "--off", "email")
    assert opted.exit_code == 0
    blocked = invoke(settings, "send", "bob", "-t", "otp_code", "-c", "email,sms", "-d", "code=1", "-d", "minutes=2")
    assert blocked.exit_code == 0, blocked.output
    quiet = invoke_cli(settings, "worker", "--burst")
    assert quiet.returncode == 0 and "delivery" not in quiet.stderr, quiet.stderr  # default: problems only
    sent2 = invoke(settings, "send", "alice", "-t", "otp_code", "-c", "sms", "-d", "code=2", "-d", "minutes=2")
    nid2 = sent2.stdout.split()[0]
    r = invoke_cli(settings, "worker", "--burst", "-v")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "delivery sent" in ln]
    assert len(lines) == 1 and f"notification_id={nid2}" in lines[0] and "provider=outbox" in lines[0], r.stderr
    assert nid not in r.stderr  # sent before, by the quiet run


def test_worker_verbose_logs_suppressed_outcomes_too(ctx: Context, settings: Settings) -> None:
    seed(ctx)
    assert invoke(settings, "prefs", "set", "bob", "--off", "email").exit_code == 0
    r = invoke(settings, "send", "bob", "-t", "otp_code", "-c", "email,sms", "-d", "code=1", "-d", "minutes=2")
    assert r.exit_code == 0, r.output
    w = invoke_cli(settings, "worker", "--burst", "-v")
    assert "delivery suppressed: opted_out:email:*" in w.stderr and "delivery sent" in w.stderr, w.stderr


# -------------------------------------------------------------------- users import, users list


def _pty_run(settings: Settings, *args: str, timeout: float = 60) -> tuple[int, str]:
    """Run notifyctl with stdout and stderr on a pseudo-terminal, as in an interactive shell."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "notifyctl.cli.main", *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env={**cli_env(settings), "TERM": "xterm-256color", "COLUMNS": "120"},
        cwd=ROOT,
    )
    os.close(slave)
    out = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout), out.decode("utf-8", "replace")


def test_users_import_shows_progress_on_a_terminal_only(ctx: Context, settings: Settings, tmp_path: Path) -> None:
    f = tmp_path / "many.csv"
    f.write_text("user_id,email\n" + "".join(f"u{i:05d},u{i}@example.com\n" for i in range(3000)))
    code, out = _pty_run(settings, "users", "import", str(f))
    assert code == 0, out
    assert "importing users" in out and "3,000 rows" in out and "imported 3000 user(s)" in out, out
    # not a terminal: the one line and nothing else
    r = invoke_cli(settings, "users", "import", str(f))
    assert r.returncode == 0 and r.stdout == "imported 3000 user(s)\n" and r.stderr == "", (r.stdout, r.stderr)
    # --json on a terminal: only the JSON
    code, out = _pty_run(settings, "users", "import", str(f), "--json")
    assert code == 0 and json.loads(out) == {"imported": 3000, "errors": []}, out


def test_users_list_filters_and_pages(ctx: Context, settings: Settings) -> None:
    seed(ctx)
    assert invoke(settings, "prefs", "set", "carol", "--off", "marketing").exit_code == 0

    def ids(*args: str) -> list[str]:
        r = invoke(settings, "users", "list", *args, "--json")
        assert r.exit_code == 0, r.output
        return [u["id"] for u in json.loads(r.stdout)]

    assert ids() == ["alice", "bob", "carol", "dave"]
    assert ids("--push") == ["alice", "bob"] and ids("--no-push") == ["carol", "dave"]
    assert ids("--search", "EXAMPLE.com") == ["alice", "bob", "carol"] and ids("--search", "aro") == ["carol"]
    assert ids("--search", "%") == [] and ids("--search", "_") == []  # literal, not SQL wildcards
    assert ids("--timezone", "Europe/Paris") == ["carol"] and ids("--locale", "fr") == ["carol"]
    assert ids("--opted-out", "marketing") == ["carol"] and ids("--opted-out", "email:marketing") == []
    assert ids("--limit", "2") == ["alice", "bob"] and ids("--limit", "2", "--after", "bob") == ["carol", "dave"]
    [alice] = json.loads(invoke(settings, "users", "list", "--limit", "1", "--json").stdout)
    assert alice["email"] == "alice@example.com" and alice["push_tokens"] == 1 and alice["opt_outs"] == []
    table = invoke(settings, "users", "list", "--limit", "2")
    assert "Users (2 shown)" in table.stdout and "more may follow: --after bob" in table.stdout
    for bad, message in [
        (["--limit", "0"], "--limit: must be between 1 and 10000"),
        (["--timezone", "Mars/Olympus"], "timezone 'Mars/Olympus'"),
        (["--opted-out", "pigeon"], "preference 'pigeon'"),
    ]:
        r = invoke(settings, "users", "list", *bad)
        assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---------------------------------------------------------------------------- status --watch


def test_status_watch_off_a_terminal_prints_a_snapshot_per_interval(ctx: Context, settings: Settings) -> None:
    seed(ctx)
    proc = subprocess.Popen(
        [sys.executable, "-m", "notifyctl.cli.main", "status", "--watch"],  # every second, as a user runs it
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(settings),
        cwd=ROOT,
    )
    assert proc.stdout is not None
    out = b""
    deadline = time.monotonic() + 30
    poll = select.poll()  # (not select(): descriptors may be numbered past 1023 late in a session)
    poll.register(proc.stdout, select.POLLIN)
    try:
        while out.count(b"\n--- ") < 2 and time.monotonic() < deadline:  # three snapshots begun
            ready = poll.poll(500)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
    finally:
        proc.terminate()
        proc.wait(10)
    seen = out.decode().splitlines()
    assert out.count(b"\n--- ") >= 2 and seen and seen[0].startswith("--- "), (out, proc.stderr.read())  # type: ignore[union-attr]
    first = seen[: seen.index(next(ln for ln in seen[1:] if ln.startswith("--- ")), 1)]
    assert "queue notify-high: depth=0 oldest=- running=0 failed_jobs=0" in first and "dlq depth: 0" in first, first
    assert not any("\x1b" in ln or "┃" in ln for ln in seen)  # plain lines, no terminal codes or boxes

    r = invoke_cli(settings, "status", "--watch", "--json", "--interval", "0.1", "--count", "2")
    snaps = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert r.returncode == 0 and len(snaps) == 2 and all(s["dlq_depth"] == 0 for s in snaps), r.stdout


# ------------------------------------------------------------------------------- redis url


def test_redis_url_show_password_feeds_rq_info(settings: Settings, tmp_path: Path) -> None:
    sock = tmp_path / "r.sock"
    password = "s3cret-pw"
    server = subprocess.Popen(
        [redis_server_binary(), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--requirepass", password, "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"unix://:{password}@{sock}"
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except (redis.ConnectionError, FileNotFoundError):
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        seed(Context(settings))  # users in this test's database (the default Redis for that)
        env = {"NOTIFY_REDIS_URL": url}
        sent = invoke_cli(settings, "send", "alice", "-t", "otp_code", "-c", "sms", "-d", "code=1", "-d", "minutes=2",
                          **env)  # fmt: skip
        assert sent.returncode == 0, sent.stderr

        masked = invoke_cli(settings, "redis", "url", **env)
        assert masked.returncode == 0 and password not in masked.stdout and "***" in masked.stdout
        shown = invoke_cli(settings, "redis", "url", "--show-password", **env)
        assert shown.returncode == 0 and shown.stdout == url + "\n"
        rq = str(Path(sys.executable).parent / "rq")
        ok = subprocess.run([rq, "info", "--url", shown.stdout.strip()], capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0 and "notify-high" in ok.stdout, (ok.stdout, ok.stderr)
        bad = subprocess.run([rq, "info", "--url", masked.stdout.strip()], capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0
        assert "--show-password" in invoke_cli(settings, "redis", "url", "--help").stdout
    finally:
        server.terminate()
        server.wait(10)


# --------------------------------------------------------------- the README's token commands


def test_readme_tokens_register_lines_work_as_written(ctx: Context, settings: Settings) -> None:
    seed(ctx)
    lines = [
        ln.split("#")[0].strip()
        for ln in (ROOT / "README.md").read_text().splitlines()
        if re.match(r"\s*notifyctl tokens register ", ln)
    ]
    assert len(lines) >= 2, lines  # a plain registration and a replacement
    for line in lines:
        r = invoke(settings, *shlex.split(line)[1:])
        assert r.exit_code == 0, (line, r.output)
    assert "..." not in " ".join(lines)
