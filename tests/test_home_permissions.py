"""Data at rest: ``$NOTIFY_HOME`` is private to its owner (issue 14, C).

Under umask 022 a real run — CLI subprocesses, the embedded redis-server, SQLite in WAL mode, the
outbox, ``secret.key``, ``notifyctl sandbox`` — leaves every directory of the home 0700 and every
file 0600; an existing home with looser modes is tightened on start, and nothing else is touched.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil

from notifyctl.home import ensure_home
from tests.conftest import ROOT
from tests.net import interrupt
from tests.util import IOS_TOKEN, USERS


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
    # no NOTIFY_REDIS_URL: the embedded server, whose files live under the home
    env.update(NOTIFY_HOME=str(home), NOTIFY_RECOVERY_GRACE="1", NOTIFY_CONFIG="/nonexistent.toml", **extra)
    return env


def _cli(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "notifyctl.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(home, **env),
        cwd=ROOT,
        umask=0o022,
    )
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


def _loose(home: Path) -> list[str]:
    """Every entry of the home (the home too) that is not 0700 (directory) / 0600 (file), with its
    mode; sockets must only have no group or other bits."""
    bad: list[str] = []
    for root, dirs, files in os.walk(home):
        for p in [Path(root)] + [Path(root) / f for f in files]:
            st = os.lstat(p)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                ok = mode == 0o700
            elif stat.S_ISREG(st.st_mode):
                ok = mode == 0o600
            else:
                ok = not mode & 0o077
            if not ok:
                bad.append(f"{p.relative_to(home.parent)} {oct(mode)}")
        assert dirs is not None
    return bad


def test_a_real_run_under_umask_022_leaves_every_dir_0700_and_every_file_0600(tmp_path: Path) -> None:
    home = tmp_path / "home"  # not made here: notifyctl creates it
    users = tmp_path / "users.csv"
    users.write_text(USERS)
    web = {"NOTIFY_PUBLIC_URL": "https://notify.example.com"}  # signed links: secret.key is made
    try:
        _cli(home, "users", "import", str(users))
        _cli(home, "tokens", "register", "alice", IOS_TOKEN, "--platform", "ios")
        _cli(home, "send", "alice", "-t", "otp_code", "-d", "code=482913", "-d", "minutes=5", **web)
        _cli(home, "send", "bob", "-t", "order_shipped_v2", "-d", "order_id=O-1", "-d", "tracking_url=https://t/1",
             "-k", "ship:O-1")  # fmt: skip
        _cli(home, "worker", "--burst", **web)
        assert '"sent"' in _cli(home, "events", "--json", "ship:O-1").stdout
        _cli(home, "apikeys", "create", "svc")
        # the sandbox's generated keys (APNs .p8, the FCM service account, the CA) land in home/sandbox
        env_file = tmp_path / "sandbox.env"
        sb = subprocess.Popen(
            [sys.executable, "-m", "notifyctl.cli.main", "sandbox", "--only", "apns,fcm", "--env-file", str(env_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(home),
            cwd=ROOT,
            umask=0o022,
        )
        try:
            assert sb.stdout is not None
            for line in sb.stdout:  # the env lines are printed once the keys are written
                if line.startswith("# written to"):
                    break
            else:
                raise AssertionError(sb.communicate())
        finally:
            interrupt(sb, timeout=30)
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    finally:
        subprocess.run(
            [sys.executable, "-m", "notifyctl.cli.main", "redis", "stop"],
            env=_env(home),
            cwd=ROOT,
            capture_output=True,
            timeout=60,
        )
    _wait_for_redis_exit(home / "redis" / "redis.pid")
    names = {p.name for p in home.rglob("*")}
    for expected in ("notify.db", "secret.key", "appendonly.aof", "dump.rdb", "redis.log", "sms.jsonl"):
        assert expected in names, (expected, sorted(names))
    assert any(n.endswith(".p8") for n in names) and "fcm-service-account.json" in names
    assert _loose(home) == []


def _wait_for_redis_exit(pidfile: Path) -> None:
    """``redis stop`` asks the server to save and exit; its last files are written when it is gone."""
    try:
        pid = int(pidfile.read_text())
    except (FileNotFoundError, ValueError):
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:  # exited; init reaps it when it will
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)
    raise AssertionError("redis-server did not exit")


def test_sqlite_wal_and_shm_are_private_under_umask_022(tmp_path: Path) -> None:
    """In process: SQLite's own files take the database file's mode."""
    from sqlalchemy import text

    from notifyctl.db import dispose_all, make_engine

    old = os.umask(0o022)
    try:
        engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x)"))
            conn.execute(text("INSERT INTO t VALUES (1)"))
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        engine.dispose()
    finally:
        os.umask(old)
        dispose_all()
    assert {"x.db", "x.db-wal", "x.db-shm"} <= set(modes), modes
    assert set(modes.values()) == {0o600}, modes


def test_an_existing_loose_home_is_tightened_on_start_and_said_so(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "redis").mkdir(parents=True, mode=0o755)
    (home / "outbox").mkdir(mode=0o755)
    for rel in ("notify.db", "notify.db-wal", "redis/appendonly.aof", "outbox/sms.jsonl", "secret.key"):
        (home / rel).write_text("x")
        os.chmod(home / rel, 0o644)
    os.chmod(home, 0o755)
    os.chmod(home / "redis", 0o755)
    os.chmod(home / "outbox", 0o775)
    # not notifyctl's: a home shared with other things (even $HOME) never has those changed
    (home / "notes.txt").write_text("mine")
    os.chmod(home / "notes.txt", 0o644)
    (home / "bin").mkdir()
    os.chmod(home / "bin", 0o755)
    (home / "link").symlink_to(tmp_path)
    outside = stat.S_IMODE(tmp_path.stat().st_mode)

    # `redis stop` touches neither Redis nor the database
    proc = _cli(home, "redis", "stop", NOTIFY_REDIS_URL="redis://127.0.0.1:1/0")
    assert proc.returncode == 0, proc.stderr
    assert "entries were readable by other users, now private" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for rel in ("redis", "outbox"):
        assert stat.S_IMODE((home / rel).stat().st_mode) == 0o700
    for rel in ("notify.db", "notify.db-wal", "redis/appendonly.aof", "outbox/sms.jsonl", "secret.key"):
        assert stat.S_IMODE((home / rel).stat().st_mode) == 0o600, rel
    assert stat.S_IMODE((home / "notes.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((home / "bin").stat().st_mode) == 0o755
    assert stat.S_IMODE(tmp_path.stat().st_mode) == outside and (home / "link").is_symlink()

    # the second start finds nothing to do and says nothing
    assert ensure_home(home) == home
    again = _cli(home, "redis", "stop", NOTIFY_REDIS_URL="redis://127.0.0.1:1/0")
    assert again.returncode == 0 and again.stderr == ""
