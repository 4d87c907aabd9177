"""Test fixtures: a private real redis-server per test session (flushed per test), a fresh SQLite
database per test, PostgreSQL when 127.0.0.1:5432 answers, and the sandboxes more than one file uses."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import traceback
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import typer
import typer.main
import typer.testing
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from notifyctl.cli.main import app as cli_app
from notifyctl.context import Context
from notifyctl.db import dispose_all, engine_for
from notifyctl.redisconn import ensure_server, stop_server
from notifyctl.settings import Settings, load_settings
from notifyctl.sqllock import close_lock_files
from sandboxes.smtp import SmtpSandbox
from tests import smoke_runs
from tests.net import ClosedPort
from tests.util import seed
from worker import jobs

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("NOTIFY_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


PG_AVAILABLE = _port_open("127.0.0.1", 5432)


# typer's CliRunner.invoke builds the app's click command anew on every call (typer.main.get_command:
# every parameter of every command read from its function's signature, ~17 ms for our root app), a
# third of the CPU of a fuzzed CLI case. The apps are built at import and never change afterwards,
# so each is built once per session here; an app made by a test (a new object) gets its own entry.
_built: weakref.WeakKeyDictionary[typer.Typer, Any] = weakref.WeakKeyDictionary()


def _get_command_once(app: typer.Typer) -> Any:
    cmd = _built.get(app)
    if cmd is None:
        cmd = _built[app] = typer.main.get_command(app)
    return cmd


assert hasattr(typer.testing, "_get_command"), "typer.testing changed: drop _get_command_once"
typer.testing._get_command = _get_command_once  # type: ignore[attr-defined,assignment]


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: only the tests that will run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The chaos smoke's tests come right after the bench smoke's, whose test starts the chaos run
    in the background first: the two smokes run side by side (tests/smoke_runs.py says why)."""
    chaos = [i for i in items if i.path.name == "test_chaos_smoke.py"]
    bench = [i for i in items if i.path.name == "test_bench_smoke.py"]
    smoke_runs.wanted = bool(chaos)
    if chaos and bench:
        rest = [i for i in items if i.path.name != "test_chaos_smoke.py"]
        at = rest.index(bench[-1]) + 1
        items[:] = rest[:at] + chaos + rest[at:]


# `make test` runs the suite in two pytest-xdist workers (``-n 2 --dist loadgroup``): each test goes to
# whichever worker is free, but the files below go whole to one worker, in their order, as groups:
# - the two smokes, so that the chaos run goes on beside the bench smoke (tests/smoke_runs.py) in the
#   process whose chaos tests read it (else a second chaos run: the other worker would start its own);
# - test_pg_connections.py, whose last test checks what the one before left in its process.
# (pytest-xdist's own ``xdist_group`` mark does not group under pytest 9: it renames ``item._nodeid``,
# which pytest 9 no longer reads; so the groups are named here, by file, for the scheduler below.)
XDIST_GROUPS = {
    "tests/test_bench_smoke.py": "smokes",
    "tests/test_chaos_smoke.py": "smokes",
    "tests/test_pg_connections.py": "pg_connections",
}


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``: one test at a time to the worker that is free (xdist's ``load``), but a
    group of ``XDIST_GROUPS`` as one unit of work, the largest units first."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return XDIST_GROUPS.get(nodeid.partition("::")[0], nodeid)

    return FileGroupScheduling(config, log)


def pytest_configure(config: pytest.Config) -> None:
    # A shell without job control starts a background job (`make test &`, a loop in a CI script) with
    # SIGINT ignored, and every process the suite starts would inherit that: the tests that stop a
    # `notifyctl sandbox` or a pool with Ctrl-C's SIGINT then waited for their timeout and failed.
    # The suite runs as a terminal runs it: Python's own Ctrl-C handler (each pytest-xdist worker too).
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line(
        "markers", "fresh_pg_schema: on PostgreSQL, a fresh empty schema for this test (DDL, migrations)"
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    smoke_runs.stop()  # a chaos smoke run still going (its tests deselected after a failure, -x...)


@pytest.fixture(autouse=True)
def _no_machine_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings root (``notifyctl.settings``) is the only reader of the environment, and each test
    builds its own: the NOTIFY_* of the machine running the suite (but NOTIFY_TEST_*) stay out of it."""
    for name in list(os.environ):
        if name.startswith("NOTIFY_") and not name.startswith("NOTIFY_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _close_sqlite_lock_files() -> Iterator[None]:
    """Each test's database leaves two lock files open in this thread: closed after it."""
    yield
    close_lock_files()


@pytest.fixture(autouse=True)
def _signal_handlers_restored() -> Iterator[None]:
    """A burst worker run in this process (the tests' ``drain``) installs rq's SIGINT/SIGTERM
    handlers and leaves them: afterwards Ctrl-C or a CI timeout's SIGTERM asked that finished worker
    for a warm shutdown (an HSET on the session's Redis) instead of stopping pytest, and with that
    Redis gone pytest ended in an INTERNALERROR. Each test leaves the handlers it found."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        if signal.getsignal(s) is not handler:
            signal.signal(s, handler)


@pytest.fixture(scope="session")
def redis_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("redis")
    ensure_server(d)
    yield d
    stop_server(d)


@pytest.fixture(scope="session")
def redis_url(redis_dir: Path) -> str:
    return f"unix://{redis_dir / 'redis.sock'}"


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    yield r
    r.close()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir(mode=0o700)  # as notifyctl makes it (notifyctl.home)
    return h


def make_settings(home: Path, redis_url: str, **kw: object) -> Settings:
    base: dict[str, object] = {"home": home, "redis_url": redis_url, "recovery_grace": 1}
    base.update(kw)
    return load_settings(**base)


@pytest.fixture
def settings(home: Path, redis_url: str, rclient: redis.Redis) -> Settings:
    return make_settings(home, redis_url)


@pytest.fixture
def ctx(settings: Settings) -> Iterator[Context]:
    c = Context(settings)
    yield c
    c.close()
    dispose_all()


@contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh schema in the test PostgreSQL database, as a database URL whose search_path is that
    schema; the engines are disposed of and the schema dropped on the way out."""
    schema = "t_" + uuid.uuid4().hex[:10]
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        dispose_all()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


# What a schema is made of besides its rows: relations (tables, indexes, sequences, views; logged or
# not), columns, constraints, triggers (and whether enabled), functions (and their settings), and the
# planner statistics ANALYZE leaves (which TRUNCATE keeps). Equal before and after a test: the test
# changed no DDL and left no statistics, so emptying the tables gives back the freshly migrated schema.
_PG_SHAPE = """
SELECT md5(coalesce(string_agg(x, ';' ORDER BY x), '')) FROM (
  SELECT 'r ' || c.relname || ' ' || c.relkind::text || c.relpersistence::text || coalesce(array_to_string(c.reloptions, ','), '')
    FROM pg_class c WHERE c.relnamespace = current_schema()::regnamespace
  UNION ALL SELECT 'c ' || table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable || ' '
    || coalesce(column_default, '') FROM information_schema.columns WHERE table_schema = current_schema()
  UNION ALL SELECT 'i ' || indexdef FROM pg_indexes WHERE schemaname = current_schema()
  UNION ALL SELECT 'k ' || conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
    WHERE connamespace = current_schema()::regnamespace
  UNION ALL SELECT 't ' || tgname || ' ' || tgenabled::text || ' ' || tgrelid::regclass::text FROM pg_trigger t
    JOIN pg_class c ON c.oid = t.tgrelid WHERE c.relnamespace = current_schema()::regnamespace AND NOT tgisinternal
  UNION ALL SELECT 'f ' || p.oid::regprocedure::text || ' ' || md5(p.prosrc) || coalesce(array_to_string(p.proconfig, ','), '')
    FROM pg_proc p WHERE p.pronamespace = current_schema()::regnamespace
  UNION ALL SELECT 's ' || count(*) FROM pg_statistic s JOIN pg_class c ON c.oid = s.starelid
    WHERE c.relnamespace = current_schema()::regnamespace
) AS shape(x)
"""

# Empties a schema of the shape given (else raises): one TRUNCATE ... RESTART IDENTITY CASCADE of the
# tables that ever held a row since they were made or last emptied (a non-empty heap file: rows
# deleted since count too), then any sequence that was read from all the same is restarted.
_PG_EMPTY = """
DO $$
DECLARE
  dirty text;
  seq text;
BEGIN
  IF ({shape}) <> '{want}' THEN
    RAISE EXCEPTION 'schema shape changed';
  END IF;
  SELECT string_agg(format('%I', c.relname), ', ') INTO dirty FROM pg_class c
    WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r' AND pg_relation_size(c.oid) > 0;
  IF dirty IS NOT NULL THEN
    EXECUTE 'TRUNCATE ' || dirty || ' RESTART IDENTITY CASCADE';
  END IF;
  FOR seq IN SELECT sequencename FROM pg_sequences WHERE schemaname = current_schema() AND last_value IS NOT NULL LOOP
    EXECUTE format('ALTER SEQUENCE %I RESTART', seq);
  END LOOP;
END $$
"""


class SharedPgSchema:
    """One PostgreSQL schema for the session, migrated once (``engine_for``: tables, indexes,
    triggers) and handed to one test after another, emptied between them (``_PG_EMPTY``): what the
    tests see is the schema a fresh database gets on its first start, for a fraction of the cost of
    creating, migrating and dropping one per test (~0.7 s). A test that changed the schema's shape
    (DDL, or ANALYZE's statistics) gets it replaced by a freshly migrated one; tests about DDL and
    migrations (``@pytest.mark.fresh_pg_schema``) get a fresh empty schema of their own instead."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.schema = ""
        self.shape = ""
        self.admin = create_engine(PG_URL, poolclass=NullPool)

    @property
    def url(self) -> str:
        return f"{PG_URL}?options=-csearch_path%3D{self.schema}"

    def _migrate(self) -> None:
        self.schema = "t_" + uuid.uuid4().hex[:10]
        with self.admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {self.schema}"))
        engine_for(load_settings(home=self.home, database_url=self.url))
        dispose_all()
        with self.admin.begin() as conn:
            conn.execute(text(f"SET LOCAL search_path TO {self.schema}"))
            self.shape = conn.exec_driver_sql(_PG_SHAPE).scalar_one()

    def _drop(self) -> None:
        try:
            with self.admin.begin() as conn:
                conn.execute(text("SET LOCAL lock_timeout = '30s'"))
                conn.execute(text(f"DROP SCHEMA {self.schema} CASCADE"))
        except Exception as exc:  # held by a process a test left running: left behind, named
            print(f"conftest: PostgreSQL schema {self.schema} left behind: {exc}", file=sys.stderr)
        self.schema = ""

    @contextmanager
    def lend(self) -> Iterator[str]:
        if not self.schema:
            self._migrate()
        try:
            yield self.url
        finally:
            dispose_all()
            self._empty()

    def _empty(self) -> None:
        try:
            with self.admin.begin() as conn:
                conn.execute(text(f"SET LOCAL search_path TO {self.schema}"))
                conn.execute(text("SET LOCAL lock_timeout = '30s'"))
                conn.exec_driver_sql(
                    _PG_EMPTY.format(shape=_PG_SHAPE, want=self.shape).replace("%", "%%")
                )  # (no parameters)
        except Exception:  # its shape changed (or it could not be emptied): the next test gets a new one
            self._drop()

    def close(self) -> None:
        if self.schema:
            self._drop()
        self.admin.dispose()


@pytest.fixture(scope="session")
def _shared_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedPgSchema]:
    shared = SharedPgSchema(tmp_path_factory.mktemp("pg-migrate"))
    yield shared
    shared.close()


@contextmanager
def pg_test_schema(request: pytest.FixtureRequest) -> Iterator[str]:
    """This test's PostgreSQL schema (a URL): the session's shared one, emptied, or with
    ``@pytest.mark.fresh_pg_schema`` a fresh empty one."""
    _need_pg()
    if request.node.get_closest_marker("fresh_pg_schema"):
        with pg_schema() as url:
            yield url
        return
    shared: SharedPgSchema = request.getfixturevalue("_shared_pg")
    with shared.lend() as url:
        yield url


def _need_pg() -> None:
    if not PG_AVAILABLE:
        pytest.skip("PostgreSQL not reachable on 127.0.0.1:5432")
    pytest.importorskip("psycopg2")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_ctx(request: pytest.FixtureRequest, home: Path, redis_url: str, rclient: redis.Redis) -> Iterator[Context]:
    """A context on SQLite, and again on PostgreSQL when the server answers (the session's migrated
    schema, emptied; see ``pg_test_schema``)."""
    if request.param == "postgresql":
        with pg_test_schema(request) as url:
            c = Context(make_settings(home, redis_url, database_url=url))
            yield c
            c.close()
    else:
        c = Context(make_settings(home, redis_url))
        yield c
        c.close()
        dispose_all()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL database URL of a fresh schema (skips when the server does not answer)."""
    _need_pg()
    with pg_schema() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """One database for several homes: a SQLite file in none of them, or a PostgreSQL schema (as
    ``any_db_ctx``'s)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        dispose_all()
        return
    with pg_test_schema(request) as url:
        yield url


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
    env["NOTIFY_HOME"] = str(settings.home)
    if settings.redis_url:
        env["NOTIFY_REDIS_URL"] = settings.redis_url
    if settings.database_url:
        env["NOTIFY_DATABASE_URL"] = settings.database_url
    env["NOTIFY_RECOVERY_GRACE"] = str(settings.recovery_grace)
    env.update(extra)
    return env


def run_cli(
    settings: Settings, *args: str, input: str | None = None, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``notifyctl`` as a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "notifyctl.cli.main", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(settings, **env),
        cwd=ROOT,
    )


def invoke_cli(
    settings: Settings, *args: str, input: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """``notifyctl ARGS`` in this process (typer's CliRunner, the root app; stdout and stderr apart),
    answered as ``run_cli`` answers: for tests about exit codes and output, not about the process
    (signals, kill, umask, a second process), without ``run_cli``'s ~0.75 s of CPU for the imports.
    An exception the CLI let through is in ``stderr`` as its traceback, as a process would print it."""
    # what a command sets up for its process (``notifyctl.logs.setup``: the root logger's handlers on
    # the runner's stream, closed afterwards; rq's logger) is put back as it was for the next test
    loggers = [logging.getLogger(), logging.getLogger("rq.worker")]
    saved = [(lg, lg.handlers[:], lg.level, lg.filters[:]) for lg in loggers]
    try:
        r = typer.testing.CliRunner().invoke(cli_app, list(args), input=input, env=cli_env(settings, **env))
    finally:
        for lg, handlers, level, filters in saved:
            lg.handlers[:], lg.filters[:] = handlers, filters
            lg.setLevel(level)
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        stderr += "".join(traceback.format_exception(r.exception))
    return subprocess.CompletedProcess(["notifyctl", *args], r.exit_code, r.stdout, stderr)


def start_pool(env: dict[str, str], *args: str, stdout: Any, stderr: Any) -> subprocess.Popen[str]:
    """``notifyctl worker --pool ARGS`` as a real subprocess (from the repo root, with ``env``); stop it
    with ``stop_pool``."""
    return subprocess.Popen(
        [sys.executable, "-m", "notifyctl.cli.main", "worker", "--pool", *args],
        env=env, cwd=ROOT, stdout=stdout, stderr=stderr, text=True,
    )  # fmt: skip


def stop_pool(pool: subprocess.Popen[str], timeout: float = 20) -> None:
    """Waits on the pool's exit: SIGTERM, then up to ``timeout`` seconds for it to finish and leave;
    a pool still running after that is killed and reaped."""
    pool.send_signal(signal.SIGTERM)
    try:
        pool.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pool.kill()
        pool.wait()


@pytest.fixture
def closed_port() -> Iterator[ClosedPort]:
    """A 127.0.0.1 port this test holds bound but not listening: connecting to it is refused."""
    with ClosedPort() as p:
        yield p


@pytest.fixture
def smtp() -> Iterator[SmtpSandbox]:
    """A fresh SMTP sandbox (a real SMTP server on 127.0.0.1) for this test; its recorder holds what it took."""
    with SmtpSandbox() as sb:
        yield sb


@contextmanager
def smtp_context(home: Path, redis_url: str, smtp: SmtpSandbox, **kw: object) -> Iterator[Context]:
    """A seeded Context sending email through SMTP to the sandbox ``smtp`` (the other channels to the
    outbox), with settings ``kw`` besides; closed (jobs' runtime, engines) after."""
    settings = make_settings(
        home, redis_url, providers_email=["smtp"], smtp_host=smtp.host, smtp_port=smtp.port, smtp_timeout=5, **kw
    )
    ctx = Context(settings)
    seed(ctx)
    try:
        yield ctx
    finally:
        jobs.close()
        ctx.close()
        dispose_all()


@pytest.fixture
def mctx(home: Path, redis_url: str, rclient: redis.Redis, smtp: SmtpSandbox) -> Iterator[Context]:
    """Email through SMTP to the sandbox (faults on demand: ``smtp.faults``); the other channels to the outbox."""
    with smtp_context(home, redis_url, smtp) as ctx:
        yield ctx
