"""The one place that owns the SQL engine. SQLite (WAL, busy timeout) by default, any
SQLAlchemy URL (PostgreSQL in production) when ``NOTIFY_DATABASE_URL`` is set."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlmodel import SQLModel, create_engine

from notifyctl import models  # noqa: F401  (registers the tables)

try:  # tables of optional parts register themselves when their package is importable
    import campaigns.models  # noqa: F401
except ImportError:
    pass
try:
    import notifyctl.api.models  # noqa: F401
except ImportError:
    pass
from notifyctl.errors import ConfigError

_engines: dict[str, Engine] = {}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def make_engine(url: str) -> Engine:
    # JSON columns (notification data, user attributes) are read for every notification: orjson
    # parses them several times faster than the standard library.
    json_opts: dict[str, Any] = {"json_serializer": _json_dumps, "json_deserializer": orjson.loads}
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **json_opts)
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, **json_opts)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise ConfigError(f"bad database URL: {exc}") from None
    except ImportError as exc:
        raise ConfigError(f"database driver missing: {exc} (pip install 'notifyctl[postgres]')") from None
    return engine


_lock_files: dict[tuple[int, str], Any] = {}


@contextmanager
def write_lock(engine: Engine) -> Iterator[None]:
    """Serialise SQLite writers with a kernel file lock around their write transactions.

    SQLite lets one writer in at a time and makes the others poll with growing sleeps (up to 100 ms
    each), so under load writers — an OTP's intake among them — idle while the database is free.
    A blocking ``flock`` wakes the next writer the moment the lock is released. Other databases
    lock rows themselves: this is a no-op there.
    """
    if engine.dialect.name != "sqlite" or not engine.url.database or engine.url.database == ":memory:":
        yield
        return
    key = (os.getpid(), engine.url.database)  # after fork, a child needs its own open file
    fh = _lock_files.get(key)
    if fh is None:
        fh = _lock_files[key] = open(engine.url.database + ".writelock", "a")  # noqa: SIM115
    fcntl.flock(fh, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)


def engine_for(settings: Any) -> Engine:
    """The (cached, per-process) engine for these settings, with the schema created."""
    url = settings.effective_database_url()
    engine = _engines.get(url)
    if engine is None:
        engine = make_engine(url)
        try:
            SQLModel.metadata.create_all(engine)
        except OperationalError as exc:
            raise ConfigError(f"cannot open database: {str(exc.orig).splitlines()[0]}") from None
        _engines[url] = engine
    return engine


def dispose_all(close: bool = True) -> None:
    for engine in _engines.values():
        engine.dispose(close=close)
    _engines.clear()
