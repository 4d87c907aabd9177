"""``notifyctl providers list|check`` and ``notifyctl sandbox``, against the real sandboxes."""

from __future__ import annotations

import contextlib
import json
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from notifyctl.cli import providers
from notifyctl.cli import sandbox as sandbox_cli
from notifyctl.cli.main import NotifyGroup
from notifyctl.settings import Settings
from sandboxes.sandbox_set import PORT_OFFSETS, SandboxSet, parse_fault, parse_only
from tests.conftest import ROOT, cli_env
from tests.net import ClosedPort, ReservedPorts, interrupt

APNS_PEM_MARKER = "-----BEGIN PRIVATE KEY-----"


def root_app() -> typer.Typer:
    """The nouns under main.py's own group class, so errors end as they do in ``notifyctl``."""
    app = typer.Typer(cls=NotifyGroup, pretty_exceptions_enable=False)

    @app.callback()
    def _root() -> None:
        pass

    app.add_typer(providers.app, name="providers")
    app.command("sandbox")(sandbox_cli.sandbox)
    return app


def invoke(settings: Settings, *args: str, **env: str) -> Any:
    return CliRunner().invoke(root_app(), list(args), env=cli_env(settings, NOTIFY_CONFIG="/nonexistent.toml", **env))


@pytest.fixture(scope="module")
def sandboxes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxSet]:
    with SandboxSet(tmp_path_factory.mktemp("sandbox-keys")) as sbs:
        yield sbs


def sandbox_env(sbs: SandboxSet, inline_keys: bool = False) -> dict[str, str]:
    """The sandbox's own NOTIFY_* lines; with ``inline_keys`` the APNs .p8 and the FCM service account
    are passed as values (NOTIFY_APNS_KEY, NOTIFY_FCM_SERVICE_ACCOUNT_JSON) instead of files."""
    env = sbs.env()
    if inline_keys:
        env["NOTIFY_APNS_KEY"] = Path(env.pop("NOTIFY_APNS_KEY_FILE")).read_text()
        env["NOTIFY_FCM_SERVICE_ACCOUNT_JSON"] = Path(env.pop("NOTIFY_FCM_SERVICE_ACCOUNT_FILE")).read_text()
    return env


def secret_values(sbs: SandboxSet, env: dict[str, str]) -> list[str]:
    sa = json.loads(Path(sbs.provider_options["fcm"]["service_account_file"]).read_text())
    p8 = Path(sbs.provider_options["apns"]["key_file"]).read_text()
    body = [line for line in p8.splitlines() if "-----" not in line]
    key_lines = [line for line in sa["private_key"].splitlines() if "-----" not in line]
    return [
        env["NOTIFY_SENDGRID_API_KEY"],
        env["NOTIFY_TWILIO_AUTH_TOKEN"],
        env["NOTIFY_SES_SECRET_ACCESS_KEY"],
        env["NOTIFY_SNS_SECRET_ACCESS_KEY"],
        *body,
        *key_lines[:3],
    ]


# -- providers list ------------------------------------------------------------------------------


@pytest.mark.parametrize("inline_keys", [False, True])
def test_list_json_shows_routes_and_masks_secrets(settings: Settings, sandboxes: SandboxSet, inline_keys: bool) -> None:
    env = sandbox_env(sandboxes, inline_keys)
    res = invoke(settings, "providers", "list", "--json", **env)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [(r["route"], r["order"], r["provider"]) for r in rows] == [
        ("push.ios", 1, "apns"),
        ("push.android", 1, "fcm"),
        ("email", 1, "sendgrid"),
        ("email", 2, "ses"),
        ("email", 3, "smtp"),
        ("sms", 1, "twilio"),
        ("sms", 2, "sns"),
    ]
    assert all(r["configured"] and r["problem"] is None for r in rows)
    by = {r["provider"]: r["settings"] for r in rows}
    assert by["apns"]["base_url"] == sandboxes.sandboxes["apns"].url
    assert by["apns"]["key_id"] == env["NOTIFY_APNS_KEY_ID"]  # identifiers are shown, keys are not
    assert by["sendgrid"]["api_key"].startswith("****")
    assert by["twilio"]["account_sid"] == env["NOTIFY_TWILIO_ACCOUNT_SID"]
    assert by["ses"]["secret_access_key"] == "(set)"
    assert by["smtp"]["port"] == env["NOTIFY_SMTP_PORT"]
    # The secret values appear nowhere, in JSON or in the table.
    table = invoke(settings, "providers", "list", **env)
    assert table.exit_code == 0, table.output
    assert "sendgrid" in table.stdout and "push.android" in table.stdout
    for secret in secret_values(sandboxes, env):
        assert secret not in res.output
        assert secret not in table.output
    assert APNS_PEM_MARKER not in res.output + table.output


def test_list_secrets_from_the_config_file_options_are_masked(settings: Settings, sandboxes: SandboxSet) -> None:
    options = {name: dict(opts) for name, opts in sandboxes.provider_options.items()}
    options["smtp"].update(username="mailer", password="smtp-pass-Zq9x")
    env = {k: v for k, v in sandboxes.env().items() if k.startswith("NOTIFY_PROVIDERS_")}
    res = invoke(settings, "providers", "list", "--json", NOTIFY_PROVIDER_OPTIONS=json.dumps(options), **env)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert all(r["configured"] for r in rows), rows
    for secret in ("smtp-pass-Zq9x", options["sendgrid"]["api_key"], options["twilio"]["auth_token"]):
        assert secret not in res.output
    assert {r["provider"]: r["settings"] for r in rows}["smtp"]["password"] == "(set)"


def test_list_incomplete_settings_show_not_configured(settings: Settings) -> None:
    res = invoke(
        settings,
        "providers",
        "list",
        "--json",
        NOTIFY_PROVIDERS_PUSH_IOS='["apns"]',
        NOTIFY_PROVIDERS_PUSH_ANDROID='["apns"]',
        NOTIFY_PROVIDERS_SMS='["twilio", "pigeon"]',
        NOTIFY_SENDGRID_API_KEY="SG.never-shown-secret",
        NOTIFY_PROVIDERS_EMAIL='["sendgrid"]',
        NOTIFY_SENDGRID_CONCURRENCY="0",
    )
    assert res.exit_code == 0, res.output
    rows = {(r["route"], r["provider"]): r for r in json.loads(res.stdout)}
    problems = {k: r["problem"] for k, r in rows.items()}
    assert problems[("push.ios", "apns")] == "not configured: apns: missing key_id, team_id, topic, key or key_file"
    assert problems[("push.android", "apns")].startswith("not configured: apns:")
    assert problems[("sms", "twilio")].startswith("not configured: twilio: account_sid")
    assert problems[("sms", "pigeon")].startswith("not configured: unknown provider 'pigeon'")
    assert problems[("email", "sendgrid")].startswith("not configured: sendgrid:")
    assert all("\n" not in p for p in problems.values())
    assert "never-shown-secret" not in res.output
    assert all(r["settings"] == {} and not r["configured"] for r in rows.values())
    # the table says the same, and nothing crashes
    table = invoke(settings, "providers", "list", NOTIFY_PROVIDERS_SMS='["twilio"]')
    assert table.exit_code == 0 and "not configured: twilio" in table.stdout
    assert "outbox" in table.stdout  # the other routes keep their default


def test_list_provider_on_a_route_it_does_not_serve(settings: Settings, sandboxes: SandboxSet) -> None:
    env = sandbox_env(sandboxes)
    res = invoke(settings, "providers", "list", "--json", **{**env, "NOTIFY_PROVIDERS_PUSH_IOS": '["fcm"]'})
    assert res.exit_code == 0, res.output
    rows = {r["route"]: r for r in json.loads(res.stdout) if r["provider"] == "fcm"}
    assert rows["push.ios"]["problem"] == "not configured: fcm does not serve push.ios (it serves push.android)"
    assert rows["push.android"]["configured"] and rows["push.android"]["settings"]["project_id"]
    check = invoke(settings, "providers", "check", "--json", **{**env, "NOTIFY_PROVIDERS_PUSH_IOS": '["fcm"]'})
    assert check.exit_code == 1
    [fcm] = [r for r in json.loads(check.stdout) if r["provider"] == "fcm"]
    assert fcm["routes"] == ["push.ios", "push.android"] and "does not serve push.ios" in fcm["problem"]


# -- providers check -----------------------------------------------------------------------------


def test_check_all_up_then_all_down(settings: Settings, tmp_path: Path) -> None:
    with SandboxSet(tmp_path / "keys") as sbs:
        env = sbs.env()
        res = invoke(settings, "providers", "check", "--json", **env)
        assert res.exit_code == 0, res.output
        rows = json.loads(res.stdout)
        assert {r["provider"]: r["ok"] for r in rows} == dict.fromkeys(
            ["apns", "fcm", "sendgrid", "ses", "smtp", "twilio", "sns"], True
        )
        assert {r["provider"]: r["routes"] for r in rows}["twilio"] == ["sms"]
        # nothing was sent by checking
        assert sbs.counts() == dict.fromkeys(sbs.providers, 0)
        table = invoke(settings, "providers", "check", **env)
        assert table.exit_code == 0 and "7 ok, 0 failed" in table.stdout
        ports = {str(sb.port) for sb in sbs.sandboxes.values()}
    # every provider down: the same settings, each sandbox's port now one that refuses connections
    with contextlib.ExitStack() as stack:
        closed = {p: str(stack.enter_context(ClosedPort()).port) for p in ports}
        down = {k: re.sub(r"(?<=127\.0\.0\.1:)\d+|^\d+$", lambda m: closed.get(m.group(), m.group()), v)
                for k, v in env.items()}  # fmt: skip
        assert down != env
        res = invoke(settings, "providers", "check", "--json", **down)
    assert res.exit_code == 1, res.output
    rows = json.loads(res.stdout)
    assert [r["provider"] for r in rows if r["ok"]] == []
    for r in rows:
        assert r["problem"] and "\n" not in r["problem"], r
    for secret in (
        env["NOTIFY_SENDGRID_API_KEY"],
        env["NOTIFY_TWILIO_AUTH_TOKEN"],
        env["NOTIFY_SES_SECRET_ACCESS_KEY"],
    ):
        assert secret not in res.output


def test_check_one_down_one_bad_key_others_ok(
    settings: Settings, sandboxes: SandboxSet, closed_port: ClosedPort
) -> None:
    env = sandbox_env(sandboxes)
    env["NOTIFY_SENDGRID_API_KEY"] = "SG.wrong-key-value-1234"
    env["NOTIFY_TWILIO_BASE_URL"] = closed_port.url()
    res = invoke(settings, "providers", "check", "--json", **env)
    assert res.exit_code == 1, res.output
    rows = {r["provider"]: r for r in json.loads(res.stdout)}
    assert not rows["sendgrid"]["ok"] and "API key rejected (401)" in rows["sendgrid"]["problem"]
    assert not rows["twilio"]["ok"] and "cannot reach" in rows["twilio"]["problem"]
    assert all(rows[p]["ok"] for p in ("apns", "fcm", "ses", "smtp", "sns")), rows
    assert "wrong-key-value-1234" not in res.output
    table = invoke(settings, "providers", "check", **env)
    assert table.exit_code == 1 and "5 ok, 2 failed" in table.stdout and "FAIL" in table.stdout


def test_check_not_configured_fails_and_default_outbox_passes(settings: Settings) -> None:
    res = invoke(settings, "providers", "check", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == [
        {
            "provider": "outbox",
            "routes": ["push.ios", "push.android", "email", "sms"],
            "ok": True,
            "problem": None,
            "seconds": json.loads(res.stdout)[0]["seconds"],
        }
    ]
    res = invoke(settings, "providers", "check", "--json", NOTIFY_PROVIDERS_SMS='["twilio"]')
    assert res.exit_code == 1
    rows = {r["provider"]: r for r in json.loads(res.stdout)}
    assert rows["outbox"]["ok"] and rows["twilio"]["problem"].startswith("not configured: twilio:")


# -- sandbox ---------------------------------------------------------------------------------------


def test_sandbox_set_writes_private_keys_and_complete_env(tmp_path: Path) -> None:
    with SandboxSet(tmp_path / "home" / "sandbox", ["apns", "fcm"]) as sbs:
        d = sbs.directory
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        p8 = Path(sbs.provider_options["apns"]["key_file"])
        sa = Path(sbs.provider_options["fcm"]["service_account_file"])
        assert p8.parent == d and p8.name.startswith("AuthKey_") and p8.suffix == ".p8"
        for f in (p8, sa):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        assert APNS_PEM_MARKER in p8.read_text()
        assert json.loads(sa.read_text())["token_uri"] == sbs.sandboxes["fcm"].token_url
        env = sbs.env()
        assert env["NOTIFY_PROVIDERS_PUSH_IOS"] == '["apns"]'
        assert env["NOTIFY_PROVIDERS_PUSH_ANDROID"] == '["fcm"]'
        assert "NOTIFY_PROVIDERS_EMAIL" not in env and "NOTIFY_SENDGRID_API_KEY" not in env
        assert "NOTIFY_PROVIDERS_PUSH_IOS='[\"apns\"]'" in sbs.env_lines()
        assert set(sbs.sandboxes) == {"apns", "fcm"}


def test_sandbox_fixed_ports_and_port_in_use(settings: Settings) -> None:
    ports = ReservedPorts(max(PORT_OFFSETS.values()) + 1)  # held until the sandboxes listen on them
    base = ports.base
    try:
        sbs = SandboxSet(settings.home / "sandbox", ["sendgrid", "twilio"], base_port=base).start()
    finally:
        ports.close()
    try:
        assert sbs.sandboxes["sendgrid"].port == base + PORT_OFFSETS["sendgrid"]
        assert sbs.sandboxes["twilio"].port == base + PORT_OFFSETS["twilio"]
        # the same ports again: the second instance cannot start, says why, and exits 3
        res = invoke(settings, "sandbox", "--only", "sendgrid", "--base-port", str(base))
        assert res.exit_code == 3, res.output
        assert "cannot start the sendgrid sandbox" in res.output and "Traceback" not in res.output
    finally:
        sbs.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--only", "apns,pigeon"], "--only: unknown sandbox 'pigeon'"),
        (["--only", " , "], "--only: name at least one sandbox"),
        (["--fault", "apns"], "expected SANDBOX:JSON"),
        (["--fault", "apns:{bad"], "--fault apns: malformed JSON"),
        (["--fault", "nope:{}"], "--fault: unknown sandbox 'nope'"),
        (["--fault", "apns:[1]"], "expected a JSON object"),
        (["--fault", 'apns:{"count": 0}'], "count must be a positive integer or -1"),
        (["--only", "apns", "--fault", 'fcm:{"status": 500}'], "--fault fcm: that sandbox is not started"),
        (["--base-port", "80"], "--base-port: use a port >= 1024"),
    ],
)
def test_sandbox_bad_input_is_one_line_exit_2(settings: Settings, args: list[str], message: str) -> None:
    res = invoke(settings, "sandbox", *args)
    assert res.exit_code == 2, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1
    assert not (settings.home / "sandbox").exists()  # nothing started, nothing written


@pytest.mark.parametrize(
    ("unload", "absent", "args", "message"),
    [
        # the wheel: no sandboxes/ at all
        ([], ["sandboxes", "sandboxes.sandbox_set"], [], "runs the fake providers of a source checkout"),
        # the checkout without the [sandbox] extra: aiosmtpd is missed when the set loads, moto when AWS starts
        (
            ["sandboxes.sandbox_set", "sandboxes.smtp"],
            ["aiosmtpd", "aiosmtpd.smtp"],
            [],
            "needs aiosmtpd, from the [sandbox] extra",
        ),
        (
            [],
            ["moto", "moto.moto_server", "moto.moto_server.werkzeug_app"],
            ["--only", "ses"],
            "needs moto, from the [sandbox] extra",
        ),
    ],
)
def test_sandbox_without_its_package_or_extra_says_what_to_install(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    unload: list[str],
    absent: list[str],
    args: list[str],
    message: str,
) -> None:
    for name in unload:  # imported again by the command, and failing on what is absent
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name in absent:  # None in sys.modules: importing it raises ModuleNotFoundError, as if not installed
        monkeypatch.setitem(sys.modules, name, None)
    res = invoke(settings, "sandbox", *args)
    assert res.exit_code == 3, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert "pip install -e '.[sandbox]'" in res.output
    assert not any((settings.home / "sandbox").glob("*.p8"))  # nothing left running or half-written


def test_parsers() -> None:
    assert parse_only(None) == ["apns", "fcm", "sendgrid", "twilio", "smtp", "ses", "sns"]
    assert parse_only("AWS, apns") == ["ses", "sns", "apns"]
    assert parse_fault('sns:{"code": "Throttled", "status": 400}') == ("aws", [{"code": "Throttled", "status": 400}])
    assert parse_fault('apns:[{"status": 410}, {"delay": 0.1, "count": -1}]')[1][1]["count"] == -1


SANDBOX_MAIN = (
    "import typer\n"
    "from notifyctl.cli.sandbox import sandbox\n"
    "app = typer.Typer()\n"
    "app.callback()(lambda: None)\n"
    "app.command('sandbox')(sandbox)\n"
    "app()\n"
)


def test_sandbox_command_runs_until_interrupted(settings: Settings, tmp_path: Path) -> None:
    env_file = tmp_path / "sandbox.env"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SANDBOX_MAIN,
            "sandbox",
            "--only",
            "sendgrid,twilio,smtp",
            "--env-file",
            str(env_file),
            "--fault",
            'sendgrid:{"status": 503, "body": {"errors": [{"message": "busy"}]}}',
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(settings),
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 20
        while not env_file.exists() or not env_file.read_text().endswith("\n"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the sandbox never wrote its env file"
            time.sleep(0.05)
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        env: dict[str, str] = {}
        for line in env_file.read_text().splitlines():
            key, _, value = line.partition("=")
            env[key] = value.strip("'")
        assert env["NOTIFY_PROVIDERS_EMAIL"] == '["sendgrid", "smtp"]'
        assert env["NOTIFY_PROVIDERS_SMS"] == '["twilio"]'
        assert env["NOTIFY_PROVIDERS_VOICE"] == '["twilio"]'
        assert "NOTIFY_PROVIDERS_PUSH_IOS" not in env and "NOTIFY_SES_ENDPOINT_URL" not in env
        # the control API wants the token the env file carries (issue 14, E)
        control = env["NOTIFY_SENDGRID_BASE_URL"] + "/_sandbox/messages"
        assert httpx.get(control).status_code == 401
        token = env["NOTIFY_SANDBOX_TOKEN"]
        assert httpx.get(control, headers={"Authorization": f"Bearer {token}"}).status_code == 200
        # the preloaded fault answers the first request (a check), then the sandbox is healthy
        first = invoke(settings, "providers", "check", "--json", **env)
        assert first.exit_code == 1, first.output
        rows = {r["provider"]: r for r in json.loads(first.stdout)}
        assert "503" in rows["sendgrid"]["problem"] and rows["twilio"]["ok"] and rows["smtp"]["ok"]
        second = invoke(settings, "providers", "check", "--json", **env)
        assert second.exit_code == 0, second.output
    finally:
        out, err = interrupt(proc, timeout=20)
    assert proc.returncode == 0, err
    assert "NOTIFY_SENDGRID_API_KEY=" in out and "sandboxes stopped" in out
    assert "Traceback" not in err
    assert (settings.home / "sandbox").is_dir()  # generated material lives under NOTIFY_HOME


def test_voice_route_is_shown_when_configured(settings: Settings, sandboxes: SandboxSet) -> None:
    env = {**sandbox_env(sandboxes), "NOTIFY_PROVIDERS_VOICE": '["twilio"]'}
    res = invoke(settings, "providers", "list", "--json", **env)
    assert res.exit_code == 0, res.output
    [voice] = [r for r in json.loads(res.stdout) if r["route"] == "voice"]
    assert voice["provider"] == "twilio" and voice["configured"]
    check = invoke(settings, "providers", "check", "--json", **env)
    assert check.exit_code == 0, check.output
    [twilio] = [r for r in json.loads(check.stdout) if r["provider"] == "twilio"]
    assert twilio["routes"] == ["sms", "voice"] and twilio["ok"]
    # without it, no voice row
    plain = invoke(settings, "providers", "list", "--json", **sandbox_env(sandboxes))
    assert "voice" not in {r["route"] for r in json.loads(plain.stdout)}
