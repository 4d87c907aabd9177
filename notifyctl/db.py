"""The one place that owns the SQL engine: SQLite (WAL, busy timeout) by default, any SQLAlchemy URL
(PostgreSQL in production) when ``NOTIFY_DATABASE_URL`` is set; the schema made and kept up to date
(tables, indexes, triggers, columns added by later versions). The statements run in bulk are
``notifyctl.bulk``'s."""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import event, func, select
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.schema import CreateIndex
from sqlmodel import SQLModel, create_engine

from notifyctl import models  # (also registers every table)
from notifyctl.analytics.triggers import install as install_analytics
from notifyctl.analytics.triggers import sqlite_connected
from notifyctl.analytics.waves import install as install_waves
from notifyctl.errors import ConfigError
from notifyctl.home import create_private
from notifyctl.sqllock import write_lock as write_lock  # (re-exported: most callers import it from here)

_engines: dict[str, Engine] = {}
# every engine made, with the process that made it, registered or not (``dispose_all``)
_made_by: weakref.WeakKeyDictionary[Engine, int] = weakref.WeakKeyDictionary()
WAL_AUTOCHECKPOINT_PAGES = 16384


def _sqlite_pragmas(dbapi_conn: Any, record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    # A bigger page cache (16 MiB instead of 2) keeps a worker's hot index pages in process. Not
    # mmap: mapped database pages count in every reader's RSS, and a launcher reading a 1,000,000-
    # row segment must stay small.
    cur.execute(f"PRAGMA cache_size=-{16 * 1024}")
    # Checkpoints: a committing writer copies the WAL back into the database once it passes
    # this many pages — while it holds the write lock. The worker pool's supervisor checkpoints
    # every second instead (``checkpoint``), off every writer's path; this is the safety net for
    # processes that write without a pool running.
    cur.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
    sqlite_connected(dbapi_conn, record)  # the analytics insert trigger's gate (counted_insert)


def _create_private_sqlite(engine: Engine) -> None:
    """Create the database file 0600 before SQLite does (it would make it 0644 under umask 022):
    SQLite gives its ``-wal``, ``-shm`` and journal files the database file's own mode."""
    database = engine.url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        try:
            create_private(database)
        except OSError:
            pass  # SQLite reports it when it opens the file, in its own words


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def make_engine(url: str) -> Engine:
    # JSON columns (notification data, user attributes) are read for every notification: orjson
    # parses them several times faster than the standard library. A statement's parameters
    # (template data with its OTP codes, addresses) never go into an exception's text, hence never
    # into a log line, a traceback or RQ's failed-job record.
    json_opts: dict[str, Any] = {
        "json_serializer": _json_dumps,
        "json_deserializer": orjson.loads,
        "hide_parameters": True,
    }
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **json_opts)
            _create_private_sqlite(engine)
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            if make_url(url).get_driver_name() == "psycopg2":
                # An executemany UPDATE (a batch's retried deliveries, a webhook's status changes) as
                # psycopg2's execute_batch, 100 statements a round trip, instead of one each: measured
                # on 1,000 deliveries, the worker's CPU per row 112-128 µs → 30-37 µs, the server's
                # 338-376 → 170-218 µs, the wall time 2.6-3.3 ms → 0.8-1.0 ms (load average 12-16).
                # (Such a statement's rowcount is then unknown: nothing here reads it.)
                json_opts["executemany_mode"] = "values_plus_batch"
            engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, **json_opts)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise ConfigError(f"bad database URL: {exc}") from None
    except ImportError as exc:
        raise ConfigError(f"database driver missing: {exc} (pip install 'notifyctl[postgres]')") from None
    return engine


def checkpoint(engine: Engine) -> None:
    """Copy SQLite's write-ahead log back into the database without waiting for (or blocking)
    readers and writers (``PRAGMA wal_checkpoint(PASSIVE)``). A no-op on other databases."""
    if engine.dialect.name != "sqlite":
        return
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").all()


def _existing_columns(conn: Connection) -> dict[str, set[str]]:
    """Table name → its column names, in one query (this runs every time a process opens the database)."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        rows = (
            conn.exec_driver_sql(
                "SELECT m.name, p.name FROM sqlite_master AS m JOIN pragma_table_info(m.name) AS p"
                " WHERE m.type = 'table'"
            )
            .tuples()
            .all()
        )
    elif dialect == "postgresql":
        rows = (
            conn.exec_driver_sql(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema()"
            )
            .tuples()
            .all()
        )
    else:
        from sqlalchemy import inspect

        insp = inspect(conn)
        rows = [(t, c["name"]) for t in insp.get_table_names() for c in insp.get_columns(t)]
    out: dict[str, set[str]] = {}
    for table, column in rows:
        out.setdefault(table, set()).add(column)
    return out


def _existing_indexes(conn: Connection) -> set[str]:
    """The names of the indexes in the database (this schema's, on PostgreSQL), in one query."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        return {r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'index'")}
    if dialect == "postgresql":
        sql = "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
        return {r[0] for r in conn.exec_driver_sql(sql)}
    from sqlalchemy import inspect

    insp = inspect(conn)
    return {str(i["name"]) for t in insp.get_table_names() for i in insp.get_indexes(t) if i["name"]}


def _pg_partial_indexes(conn: Connection) -> dict[str, bool]:
    """PostgreSQL: each index of this schema → whether it is partial (has a WHERE)."""
    sql = "SELECT c.relname, i.indpred IS NOT NULL FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
    sql += " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema()"
    return {str(name): bool(partial) for name, partial in conn.exec_driver_sql(sql)}


def _pg_set_fillfactors(conn: Connection) -> None:
    """PostgreSQL: ``models.PG_FILLFACTOR`` on each of its tables and indexes in this schema that has
    no fillfactor yet (``ALTER ... SET``: pages written from now on; it takes a lock that lets reads
    and writes go on)."""
    sql = "SELECT relname, relkind, reloptions FROM pg_class WHERE relnamespace = current_schema()::regnamespace"
    q = conn.dialect.identifier_preparer
    rows = conn.exec_driver_sql(sql + " AND relname = ANY(%s)", (list(models.PG_FILLFACTOR),)).tuples()
    for name, kind, options in rows:
        if any(str(o).startswith("fillfactor=") for o in list(options or ())):
            continue
        what, rel = "INDEX" if kind == "i" else "TABLE", str(name)
        conn.exec_driver_sql(f"ALTER {what} {q.quote(rel)} SET (fillfactor = {int(models.PG_FILLFACTOR[rel])})")


def add_missing_columns(engine: Engine) -> list[str]:
    """The schema-upgrade step: add the model's columns that an existing table lacks.

    ``create_all`` creates missing tables but never alters an existing one, so a database made by
    an earlier release would lack a column added since (``device_tokens.device_id``). Only
    nullable columns without a server default are added this way (``ALTER TABLE ... ADD COLUMN``,
    instant on SQLite and PostgreSQL: existing rows read NULL); anything else is a ConfigError
    naming the column. Idempotent, and safe when two processes upgrade at once (PostgreSQL ``IF NOT
    EXISTS``; on SQLite the loser's duplicate-column error is ignored). It also builds the model's
    indexes an existing table lacks (``CREATE INDEX IF NOT EXISTS``: once, on the first start after
    the upgrade) and drops those it retired (``models.RETIRED_INDEXES``). On PostgreSQL it sets the
    notifications' fillfactors (``models.PG_FILLFACTOR``) where none is set, and a
    non-unique index that became partial (``postgresql_where``: ``ix_notifications_status_due``
    holds only the open rows) or stopped being one is built anew under its name, once (a changed
    predicate of an index already partial needs a new name instead).
    Returns ``table.column`` of each column added."""
    added: list[str] = []
    q = engine.dialect.identifier_preparer
    with engine.begin() as conn:
        existing = _existing_columns(conn)
        indexes = _existing_indexes(conn)
        partial = _pg_partial_indexes(conn) if engine.dialect.name == "postgresql" else {}
        for table in SQLModel.metadata.sorted_tables:
            have = existing.get(table.name)
            if not have:
                continue  # not created here (another schema), or nothing to compare with
            for col in table.columns:
                if col.name in have:
                    continue
                if not col.nullable or col.primary_key or col.server_default is not None:
                    raise ConfigError(
                        f"database table {table.name} lacks column {col.name}, which cannot be added automatically"
                    )
                ddl = (
                    f"ALTER TABLE {q.format_table(table)} ADD COLUMN"
                    f"{' IF NOT EXISTS' if engine.dialect.name == 'postgresql' else ''} "
                    f"{q.quote(col.name)} {col.type.compile(dialect=engine.dialect)}"
                )
                try:
                    conn.exec_driver_sql(ddl)
                except OperationalError as exc:  # SQLite: another process added it meanwhile
                    if "duplicate column" not in str(exc.orig).lower():
                        raise
                added.append(f"{table.name}.{col.name}")
            for index in table.indexes:
                # A model index the database lacks (``ix_deliveries_dlq`` came after the first
                # release) is built now; a unique one only with its new column (existing rows
                # could break it).
                new_col = any(c.name not in have for c in index.columns)
                if index.name not in indexes and (new_col or not index.unique):
                    conn.execute(CreateIndex(index, if_not_exists=True))
                elif (
                    index.name in partial
                    and not index.unique
                    and partial[index.name] != (index.dialect_options["postgresql"]["where"] is not None)
                ):
                    conn.exec_driver_sql(f"DROP INDEX IF EXISTS {q.quote(str(index.name))}")
                    conn.execute(CreateIndex(index))
        for name in models.RETIRED_INDEXES:
            if name in indexes:
                conn.exec_driver_sql(f"DROP INDEX IF EXISTS {q.quote(name)}")
        if engine.dialect.name == "postgresql":
            _pg_set_fillfactors(conn)
    return added


_SCHEMA_LOCK = 0x6E6F7469  # PostgreSQL advisory lock id for schema creation ("noti")


@contextmanager
def _schema_lock(engine: Engine) -> Iterator[None]:
    """On PostgreSQL, one process at a time creates or upgrades the schema: hosts starting together
    on a fresh database would otherwise race their CREATE TABLEs (one fails on the catalog's
    unique index). SQLite is one host's file, serialised by SQLite itself."""
    if engine.dialect.name != "postgresql":
        yield
        return
    from sqlalchemy import text

    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _SCHEMA_LOCK})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _SCHEMA_LOCK})
            conn.commit()


def engine_for(settings: Any) -> Engine:
    """The (cached, per-process) engine for these settings, with the schema created and upgraded
    (``add_missing_columns``)."""
    url = settings.effective_database_url()
    engine = _engines.get(url)
    if engine is None:
        engine = make_engine(url)
        try:
            with _schema_lock(engine):
                with engine.connect() as conn:
                    had = set(_existing_columns(conn))
                SQLModel.metadata.create_all(engine)
                add_missing_columns(engine)
                if "notifications" in had and "dedup_keys" not in had:
                    _backfill_dedup_keys(engine, settings.dedup_ttl)
                install_analytics(engine, write_lock)
                install_waves(engine, write_lock)
        except OperationalError as exc:
            raise ConfigError(f"cannot open database: {str(exc.orig).splitlines()[0]}") from None
        _engines[url] = engine
        _made_by[engine] = os.getpid()
    return engine


def _backfill_dedup_keys(engine: Engine, ttl: int) -> None:
    """The upgrade of a database made before ``dedup_keys`` (intake's SQL dedup layer): each dedup
    key its notifications used within the window, held by its first notification. Two processes
    upgrading one SQLite file at once: the second one's rows collide, and are the same."""
    n = models.Notification.__table__  # type: ignore[attr-defined]
    since = models.utcnow() - timedelta(seconds=ttl)
    try:
        with engine.begin() as conn:
            rows: Sequence[Any] = conn.execute(
                select(n.c.dedup_key, func.min(n.c.id), func.min(n.c.created_at))
                .where(n.c.dedup_key.is_not(None), n.c.created_at > since)
                .group_by(n.c.dedup_key)
            ).all()
            if rows:
                conn.execute(
                    models.DedupKey.__table__.insert(),  # type: ignore[attr-defined]
                    [
                        {"key": k, "notification_id": nid, "expires_at": _aware(at) + timedelta(seconds=ttl)}
                        for k, nid, at in rows
                    ],
                )
    except IntegrityError:
        pass


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def dispose_all(close: bool = True) -> None:
    """Forget every engine, closing their idle connections. ``close=False`` is for a forked child:
    the connections it inherited are the parent's sessions, dropped without a word to the server
    (closing them would end the parent's); those this process opened itself are closed all the
    same, also in the engines forgotten before that a ``Context`` still holds (its ``engine`` is
    cached). Left open, they stayed for the life of the process: a worker freezes its heap
    (``context.freeze_heap``), so the collector never frees them, and a process that runs burst
    workers one after another (``notifyctl worker --burst`` in a script, the tests' ``drain``) held
    a pool's worth of idle PostgreSQL connections more per run, until the server refused new ones
    ("too many clients")."""
    me = os.getpid()
    for engine, pid in list(_made_by.items()):
        if pid == me:
            engine.dispose()
    for engine in _engines.values():
        if _made_by.get(engine) != me:
            engine.dispose(close=close)
    _engines.clear()
