"""A host on its embedded Redis, or a SQLite database of its own, while the hosts it shares the
other store with use another one (issue 18, item 2): `worker` and `serve` say so at start, in one
line, naming the other hosts; hosts that share both stores say nothing. Hosts are real processes
with homes of their own."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from notifyctl.db import dispose_all
from notifyctl.redisconn import stop_server
from notifyctl.settings import Settings
from tests.conftest import PG_AVAILABLE, PG_URL, ROOT, cli_env, make_settings


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The hosts' shared database: a SQLite file of no home, or a PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        dispose_all()
        return
    if not PG_AVAILABLE:
        pytest.skip("PostgreSQL not reachable on 127.0.0.1:5432")
    pytest.importorskip("psycopg2")
    schema = "t_" + uuid.uuid4().hex[:10]
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    dispose_all()
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture(autouse=True)
def _no_key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SECRET_KEY", raising=False)


def host(tmp_path: Path, name: str, redis_url: str | None, db_url: str | None) -> Settings:
    h = tmp_path / name
    h.mkdir(mode=0o700)
    kw = {"database_url": db_url} if db_url else {}
    return make_settings(h, redis_url or "", host_name=name, **kw)


def start(settings: Settings) -> list[str]:
    """`notifyctl worker --burst` on this host; its warning lines."""
    env = cli_env(settings, NOTIFY_HOST_NAME=str(settings.host_name))
    if not settings.redis_url:
        env["NOTIFY_REDIS_URL"] = ""  # the embedded server under the home
    r = subprocess.run(
        [sys.executable, "-m", "notifyctl.cli.main", "worker", "--burst"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return [ln for ln in r.stderr.splitlines() if "warning" in ln]


def test_a_host_on_its_embedded_redis_among_hosts_sharing_one_is_warned(
    tmp_path: Path, redis_url: str, rclient: redis.Redis, db_url: str
) -> None:
    a = host(tmp_path, "host-a", redis_url, db_url)
    d = host(tmp_path, "host-d", redis_url, db_url)
    b = host(tmp_path, "host-b", None, db_url)  # the shared database, its own embedded Redis
    assert start(a) == []
    assert start(d) == []  # same Redis, same database: nothing to say
    try:
        (line,) = start(b)
        assert line.startswith("warning: this host runs on its embedded Redis while the hosts sharing its database")
        assert "(host-a, host-d)" in line and "NOTIFY_REDIS_URL" in line
        assert redis_url not in line
        (line,) = start(a)  # and the hosts that share the right one hear of it at their next start
        assert line.startswith("warning: hosts sharing this database run on an embedded Redis (host-b)"), line
    finally:
        stop_server(b.home / "redis")


def test_a_host_on_its_own_sqlite_among_hosts_sharing_a_database_is_warned(
    tmp_path: Path, redis_url: str, rclient: redis.Redis, db_url: str
) -> None:
    a = host(tmp_path, "host-a", redis_url, db_url)
    c = host(tmp_path, "host-c", redis_url, None)  # the shared Redis, SQLite under its home
    assert start(a) == []
    (line,) = start(c)
    assert line.startswith("warning: this host keeps its records in a SQLite database of its own while the hosts")
    assert "(host-a)" in line and "NOTIFY_DATABASE_URL" in line
    (line,) = start(a)
    assert line.startswith(
        "warning: hosts sharing this Redis keep their records in their own SQLite database (host-c)"
    ), line
    # once host C is pointed at the shared database, its next start (and A's) say nothing
    c_fixed = make_settings(c.home, redis_url, host_name="host-c", database_url=db_url)
    assert start(c_fixed) == []
    assert start(a) == []
