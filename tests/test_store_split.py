"""A host on its embedded Redis, or a SQLite database of its own, while the hosts it shares the
other store with use another one (issue 18, item 2): `worker` and `serve` say so at start, in one
line, naming the other hosts; hosts that share both stores say nothing. Hosts have homes of their
own; each start is `notifyctl worker --burst` run in this process (``invoke_cli``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from notifyctl.redisconn import stop_server
from notifyctl.settings import Settings
from tests.conftest import invoke_cli, make_settings


@pytest.fixture(autouse=True)
def _no_key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SECRET_KEY", raising=False)


def host(tmp_path: Path, name: str, redis_url: str | None, db_url: str | None) -> Settings:
    h = tmp_path / name
    h.mkdir(mode=0o700)
    kw = {"database_url": db_url} if db_url else {}
    return make_settings(h, redis_url or "", host_name=name, **kw)


def start(settings: Settings) -> list[str]:
    """`notifyctl worker --burst` on this host (in this process: what is checked is its output); its
    warning lines."""
    env = {"NOTIFY_HOST_NAME": str(settings.host_name)}
    if not settings.redis_url:
        env["NOTIFY_REDIS_URL"] = ""  # the embedded server under the home
    r = invoke_cli(settings, "worker", "--burst", **env)
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
