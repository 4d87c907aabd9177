"""Several hosts, one database (issue 18, item 2): the key that signs unsubscribe links and open
pixels lives in the shared database, so a link mailed by one host works on every other; a host
configured with a different key refuses to start. Hosts have homes of their own, on one PostgreSQL
database; the API and the racing first hosts are real processes, the workers' starts run in this
process (``invoke_cli``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import create_engine, select, text
from sqlmodel import Session

from notifyctl.context import Context
from notifyctl.models import DeliveryEvent, OptOut
from tests.conftest import PG_AVAILABLE, ROOT, cli_env, invoke_cli, make_settings
from tests.net import ServeProcess
from tests.util import seed, send
from worker.pool import run_worker
from worker.providers.outbox import read_outbox

pytestmark = pytest.mark.skipif(not PG_AVAILABLE, reason="PostgreSQL not reachable on 127.0.0.1:5432")
PUBLIC = "https://notify.example.com"


def host_home(tmp_path: Path, name: str) -> Path:
    h = tmp_path / name
    h.mkdir(mode=0o700)
    return h


def start_worker(settings, **env: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """`notifyctl worker --burst` on this host, in this process (its exit code and output are checked)."""
    return invoke_cli(settings, "worker", "--burst", **env)


def test_a_link_signed_on_host_a_works_on_host_b(
    tmp_path: Path, pg_url: str, redis_url: str, rclient: redis.Redis
) -> None:
    a = Context(make_settings(host_home(tmp_path, "a"), redis_url, database_url=pg_url, public_url=PUBLIC))
    b_settings = make_settings(host_home(tmp_path, "b"), redis_url, database_url=pg_url, public_url=PUBLIC)
    seed(a)
    promo = send(
        a, template_id="weekly_promo", channels=["email"], data={"first_name": "A", "discount": 5, "code": "C"}
    )
    run_worker(a.settings, ["high", "normal", "low"], burst=True)  # host A sends, signing with the shared key
    (mail,) = [m for m in read_outbox(a.settings.outbox_dir, "email") if m["notification_id"] == promo.notification_id]
    unsub = mail["headers"]["List-Unsubscribe"].strip("<>").removeprefix(PUBLIC)
    pixel = re.search(r'<img src="' + re.escape(PUBLIC) + r'(/o/[^"]+)"', mail["content"]["html"]).group(1)  # type: ignore[union-attr]

    # host B's API, a real `notifyctl serve` on a port it picks itself (tests/net.py)
    with ServeProcess(cli_env(b_settings, NOTIFY_PUBLIC_URL=PUBLIC)) as api:
        assert httpx.get(api.url + pixel).status_code == 200
        r = httpx.post(api.url + unsub, data={"List-Unsubscribe": "One-Click"})
        assert r.status_code == 200, r.text
    with Session(a.engine) as s:
        opted = s.execute(select(OptOut.channel, OptOut.category).where(OptOut.user_id == "alice")).all()
        opened = s.execute(select(DeliveryEvent.status).where(DeliveryEvent.notification_id == promo.notification_id))
        assert ("email", "marketing") in [tuple(o) for o in opted]
        assert "opened" in list(opened.scalars())
    assert not (b_settings.home / "secret.key").exists()  # host B made no key of its own
    a.close()


def test_first_hosts_race_to_one_key(tmp_path: Path, pg_url: str, redis_url: str, rclient: redis.Redis) -> None:
    code = "from notifyctl.settings import load_settings; from notifyctl.unsubscribe import fingerprint, secret_key; "
    code += "print(fingerprint(secret_key(load_settings())))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=cli_env(make_settings(host_home(tmp_path, f"h{i}"), redis_url, database_url=pg_url)),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _o, e in outs]
    assert len({o.strip() for o, _e in outs}) == 1


def test_a_host_with_another_key_refuses_to_start(
    tmp_path: Path, pg_url: str, redis_url: str, rclient: redis.Redis
) -> None:
    first = make_settings(host_home(tmp_path, "a"), redis_url, database_url=pg_url)
    assert start_worker(first).returncode == 0  # creates the key in the database
    other = make_settings(host_home(tmp_path, "b"), redis_url, database_url=pg_url)
    r = start_worker(other, NOTIFY_SECRET_KEY="not-the-shared-one")
    assert r.returncode == 3, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "NOTIFY_SECRET_KEY differs" in lines[0] and "Traceback" not in r.stderr
    assert "not-the-shared-one" not in r.stderr


def test_hosts_bringing_their_own_key_must_bring_the_same(
    tmp_path: Path, pg_url: str, redis_url: str, rclient: redis.Redis
) -> None:
    mk = lambda name: make_settings(host_home(tmp_path, name), redis_url, database_url=pg_url)  # noqa: E731
    assert start_worker(mk("a"), NOTIFY_SECRET_KEY="k" * 40).returncode == 0
    assert start_worker(mk("b"), NOTIFY_SECRET_KEY="k" * 40).returncode == 0
    wrong = start_worker(mk("c"), NOTIFY_SECRET_KEY="j" * 40)
    none = start_worker(mk("d"))
    assert (wrong.returncode, none.returncode) == (3, 3)
    assert "set the same NOTIFY_SECRET_KEY" in none.stderr
    with create_engine(pg_url).connect() as conn:  # only a fingerprint is stored, never the key
        assert conn.execute(text("SELECT value FROM shared_secrets")).scalar_one() is None
    assert os.environ.get("NOTIFY_SECRET_KEY") is None
