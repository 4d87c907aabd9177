"""Templates shared through the database (issue 18, item 2): `templates push` stores a host's files
in the database every host shares, its workers and intake read them there (cached per process,
invalidated by version), `templates pull` writes them back to files; intake never answers
`queued` for a template the workers cannot load. Two homes (two NOTIFY_HOME directories) share one
database — a SQLite file of neither home, or a PostgreSQL schema — and one Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import func, select
from sqlmodel import Session
from typer.testing import CliRunner

from notifyctl.api.auth import create_key
from notifyctl.cli.main import app
from notifyctl.context import Context
from notifyctl.errors import TemplateError
from notifyctl.models import Notification, SharedTemplate
from notifyctl.settings import Settings
from tests.conftest import ROOT, cli_env, invoke_cli, make_settings
from tests.util import ApiServer, seed, send
from worker.providers.outbox import read_outbox

GREETING = """id = "greeting"
category = "transactional"
priority = "normal"
[sample]
name = "Ada"
[email]
subject = "Hello {{ name }} ({{ 'EDITION' }})"
html = "<p>Hello {{ name }}</p>"
text = "Hello {{ name }}"
"""


def greeting(edition: str) -> str:
    return GREETING.replace("EDITION", edition)


def homes(tmp_path: Path, redis_url: str, db_url: str) -> tuple[Settings, Settings]:
    out = []
    for name in ("a", "b"):
        h = tmp_path / name
        h.mkdir(mode=0o700)
        out.append(make_settings(h, redis_url, database_url=db_url, host_name=f"host-{name}"))
    return out[0], out[1]


def write_template(settings: Settings, name: str, source: str) -> Path:
    d = settings.home / "templates"
    d.mkdir(mode=0o700, exist_ok=True)
    p = d / f"{name}.toml"
    p.write_text(source)
    p.chmod(0o600)  # (a home's files are private: a start warns of others)
    return p


def worker_burst(settings: Settings) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "notifyctl.cli.main", "worker", "--burst"],
        env=cli_env(settings), cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def mails(settings: Settings, nid: str) -> list[dict]:  # type: ignore[type-arg]
    return [m for m in read_outbox(settings.outbox_dir, "email") if m["notification_id"] == nid]


def notifications(ctx: Context) -> int:
    with Session(ctx.engine) as s:
        return int(s.execute(select(func.count()).select_from(Notification)).scalar_one())


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_a_template_pushed_on_host_a_is_sent_by_a_worker_of_host_b(
    tmp_path: Path, redis_url: str, rclient: redis.Redis, db_url: str
) -> None:
    a_settings, b_settings = homes(tmp_path, redis_url, db_url)
    write_template(a_settings, "greeting", greeting("first"))
    b = Context(b_settings)
    seed(b)
    with pytest.raises(TemplateError, match="unknown template 'greeting'"):  # host B has no such file
        send(b, template_id="greeting", channels=["email"], data={"name": "Ada"})

    r = invoke_cli(a_settings, "templates", "push")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:3] == ["pushed", "greeting", "v1"], r.stdout

    first = send(b, template_id="greeting", channels=["email"], data={"name": "Ada"})  # B's intake reads it
    assert first.status == "queued"
    assert b.templates.origin("greeting") == "database"
    worker_burst(b_settings)  # a worker of host B, in a process of its own
    (mail,) = mails(b_settings, first.notification_id)
    assert mail["content"]["subject"] == "Hello Ada (first)"
    assert not (b_settings.home / "templates").exists()  # B never had the file

    # A new version pushed on A reaches B's long-lived process within its refresh (1 s): cached
    # by version, not for ever.
    assert b.templates.get("greeting").version == 1
    write_template(a_settings, "greeting", greeting("second"))
    r = invoke_cli(a_settings, "templates", "push", "greeting", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [
        {"id": "greeting", "version": 2, "status": "pushed", "file": str(a_settings.home / "templates/greeting.toml")}
    ]
    pushed_at = time.monotonic()
    while b.templates.get("greeting").version != 2:
        assert time.monotonic() - pushed_at < b.templates.refresh + 2, "host B still renders version 1"
        time.sleep(0.05)
    second = send(b, template_id="greeting", channels=["email"], data={"name": "Bo"})
    worker_burst(b_settings)
    (mail,) = mails(b_settings, second.notification_id)
    assert mail["content"]["subject"] == "Hello Bo (second)"

    # the pushed template wins over a host's own file of the same id
    write_template(b_settings, "greeting", greeting("local"))
    fresh = Context(b_settings)
    assert fresh.templates.get("greeting").render("email", {"name": "X", "user": {}})["subject"] == "Hello X (second)"
    fresh.close()
    b.close()


def test_an_unknown_template_is_refused_at_intake(
    tmp_path: Path, redis_url: str, rclient: redis.Redis, db_url: str
) -> None:
    """`send`, POST /v1/notify and `campaign launch` on host B refuse a template no host pushed
    (host A has it as a file) with one line naming it, and write nothing. On PostgreSQL — a
    database other hosts share — host A refuses its own file-only template too, naming the fix."""
    a_settings, b_settings = homes(tmp_path, redis_url, db_url)
    write_template(a_settings, "greeting", greeting("first"))
    b = Context(b_settings)
    seed(b)
    seg = tmp_path / "seg.csv"
    seg.write_text("user_id\nalice\nbob\n")
    shared = db_url.startswith("postgresql")
    refusing = [(b_settings, "unknown template 'greeting'")]
    if shared:
        refusing.append((a_settings, "template 'greeting' is only in this host's files"))
    for settings, message in refusing:
        r = invoke_cli(settings, "send", "alice", "-t", "greeting", "-c", "email", "-d", "name=Ada")
        assert r.returncode == 2 and message in one_error_line(r.stderr), r.stderr
        if settings is a_settings:
            assert "notifyctl templates push greeting" in r.stderr
        r = invoke_cli(settings, "campaign", "launch", "-t", "greeting", "--segment-csv", str(seg), "-d", "name=Ada")
        assert r.returncode == 2 and message in one_error_line(r.stderr), r.stderr
        ctx = Context(settings)
        with ApiServer(ctx) as server:
            key = create_key(ctx, "tests").key
            resp = httpx.post(
                server.url + "/v1/notify",
                json={"recipient_id": "alice", "template_id": "greeting", "channels": ["email"], "data": {"name": "A"}},
                headers={"Authorization": f"Bearer {key}"},
                timeout=10,
            )
        assert resp.status_code == 422 and message in resp.json()["error"], resp.text
        ctx.close()
    assert notifications(b) == 0 and rclient.keys("rq:job:*") == []
    if not shared:  # one database of one host's own (SQLite): the host's files still serve it
        a = Context(a_settings)
        assert send(a, template_id="greeting", channels=["email"], data={"name": "Ada"}).status == "queued"
        a.close()
    b.close()


def test_push_and_pull(tmp_path: Path, redis_url: str, rclient: redis.Redis, db_url: str) -> None:
    a_settings, b_settings = homes(tmp_path, redis_url, db_url)
    runner = CliRunner()

    def invoke(settings: Settings, *args: str):  # type: ignore[no-untyped-def]
        return runner.invoke(app, list(args), env=cli_env(settings, NOTIFY_HOST_NAME=str(settings.host_name)))

    for cmd in ("push", "pull"):
        r = invoke(a_settings, "templates", cmd, "--help")
        assert r.exit_code == 0 and "--json" in r.stdout and "database" in r.stdout, r.output
    r = invoke(a_settings, "templates", "push")
    assert r.exit_code == 2 and "no template files in" in one_error_line(r.stderr)
    r = invoke(b_settings, "templates", "pull")
    assert r.exit_code == 0 and "no templates in the database" in r.stdout

    src = write_template(a_settings, "greeting", greeting("first"))
    write_template(a_settings, "farewell", greeting("bye").replace('id = "greeting"', 'id = "farewell"'))
    r = invoke(a_settings, "templates", "push", "--json")
    assert r.exit_code == 0, r.output
    assert [(x["id"], x["version"], x["status"]) for x in json.loads(r.stdout)] == [
        ("farewell", 1, "pushed"),
        ("greeting", 1, "pushed"),
    ]
    r = invoke(a_settings, "templates", "push", "--json")  # nothing changed: versions stay
    assert [(x["id"], x["version"], x["status"]) for x in json.loads(r.stdout)] == [
        ("farewell", 1, "unchanged"),
        ("greeting", 1, "unchanged"),
    ]

    # one bad file: one line naming it, exit 2, and nothing pushed (greeting's change neither)
    src.write_text(greeting("changed"))
    bad = write_template(
        a_settings,
        "broken",
        greeting("x").replace("Hello {{ name }}</p>", "{% if %}</p>").replace('id = "greeting"', 'id = "broken"'),
    )
    r = invoke(a_settings, "templates", "push")
    assert r.exit_code == 2 and "broken" in one_error_line(r.stderr) and "syntax error" in r.stderr, r.output
    bad.write_text(greeting("x"))  # its id says greeting, its name broken
    r = invoke(a_settings, "templates", "push")
    assert r.exit_code == 2 and "differs from its file name" in one_error_line(r.stderr), r.output
    bad.unlink()
    r = invoke(a_settings, "templates", "push", "nope")
    assert r.exit_code == 2 and "no template file 'nope'.toml" in one_error_line(r.stderr), r.output
    b = Context(b_settings)
    with Session(b.engine) as s:
        rows = {t.name: (t.version, t.pushed_by) for t in s.execute(select(SharedTemplate)).scalars()}
    assert rows == {"farewell": (1, "host-a"), "greeting": (1, "host-a")}

    # pull on host B writes the files as pushed
    r = invoke(b_settings, "templates", "pull", "--json")
    assert r.exit_code == 0, r.output
    assert [(x["id"], x["version"], x["status"]) for x in json.loads(r.stdout)] == [
        ("farewell", 1, "created"),
        ("greeting", 1, "created"),
    ]
    assert (b_settings.home / "templates/greeting.toml").read_text() == greeting("first")
    assert (b_settings.home / "templates/greeting.toml").stat().st_mode & 0o077 == 0
    r = invoke(a_settings, "templates", "push", "greeting")
    assert r.exit_code == 0 and r.stdout.split()[:3] == ["pushed", "greeting", "v2"], r.output
    r = invoke(b_settings, "templates", "pull", "greeting")
    assert r.exit_code == 0 and r.stdout.split()[:3] == ["updated", "greeting", "v2"], r.output
    assert (b_settings.home / "templates/greeting.toml").read_text() == greeting("changed")
    r = invoke(b_settings, "templates", "pull", "nope")
    assert r.exit_code == 2 and "holds no template 'nope'" in one_error_line(r.stderr), r.output

    # `templates list` on B says where each one comes from
    r = invoke(b_settings, "templates", "list", "--json")
    listed = {x["id"]: x for x in json.loads(r.stdout)}
    assert (listed["greeting"]["origin"], listed["greeting"]["version"]) == ("database", 2)
    assert listed["otp_code"]["origin"] == "shipped"
    b.close()


def test_hosts_pushing_at_once_each_get_a_version(
    tmp_path: Path, redis_url: str, rclient: redis.Redis, db_url: str
) -> None:
    """Four hosts push their own edition of one new template at the same moment: no push fails,
    each gets a version of its own (1 to 4), and the table holds the last one."""
    import threading

    from notifyctl.template_store import push

    hosts = []
    for i in range(4):
        h = tmp_path / f"h{i}"
        h.mkdir(mode=0o700)
        s = make_settings(h, redis_url, database_url=db_url)
        write_template(s, "greeting", greeting(f"edition {i}"))
        hosts.append(Context(s))
    for c in hosts:
        c.engine  # noqa: B018 - the schema exists before the race
    start = threading.Barrier(len(hosts))
    got: dict[int, int] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait()
            (done,) = push(hosts[i].engine, hosts[i].templates, [], f"h{i}")
            got[i] = done.version
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(hosts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and sorted(got.values()) == [1, 2, 3, 4], (errors, got)
    last = max(got, key=lambda i: got[i])
    with Session(hosts[0].engine) as s:
        row = s.get(SharedTemplate, "greeting")
        assert row is not None and row.version == 4 and row.pushed_by == f"h{last}"
        assert f"edition {last}" in row.source
    for c in hosts:
        c.close()
