"""Installing a set of triggers on ``deliveries`` (the rollup's, ``triggers``, and the waves',
``waves``): create them when missing, drop an older definition, and fill what they keep up from a
full count, in one transaction that writers wait for, so no change is counted twice or missed."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from sqlalchemy.engine import Connection, Engine

from notifyctl.analytics.fold import FOLD_LOCK


def present(conn: Connection, prefix: str) -> list[str]:
    """The triggers on ``deliveries`` whose names start with ``prefix``."""
    if conn.dialect.name == "sqlite":
        sql = "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE ?"
    else:
        sql = "SELECT tgname FROM pg_trigger WHERE tgrelid = 'deliveries'::regclass AND tgname LIKE %s"
    return [str(r[0]) for r in conn.exec_driver_sql(sql, (prefix + "%",)).all()]


def replace_triggers(
    engine: Engine,
    write_lock: Callable[[Engine], AbstractContextManager[None]],
    names: tuple[str, ...],
    prefix: str,
    ddl: Callable[[str], list[str]],
    fill: Callable[[Connection, list[str]], None],
) -> bool:
    """Create the triggers ``names`` when missing: under ``write_lock`` and, within the
    transaction, SQLite's write lock (``BEGIN IMMEDIATE``) or PostgreSQL's ``LOCK TABLE
    deliveries`` and the compaction's advisory lock (``fold.FOLD_LOCK``), drop the other triggers
    named ``prefix…`` (an older definition; on PostgreSQL their functions too), run ``ddl(dialect)``
    and ``fill(conn, dropped)``, and commit. Returns whether it did; a database other than SQLite or
    PostgreSQL: nothing."""
    dialect = engine.dialect.name
    if dialect not in ("sqlite", "postgresql"):
        return False
    with engine.connect() as conn:
        if set(names) <= set(present(conn, prefix)):
            return False
    with write_lock(engine), engine.connect() as conn:
        if dialect == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("LOCK TABLE deliveries IN SHARE ROW EXCLUSIVE MODE")
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({FOLD_LOCK})")  # no compaction meanwhile
        found = present(conn, prefix)
        if set(names) <= set(found):  # another process did it while this one waited
            conn.rollback()
            return False
        old = [name for name in found if name not in names]
        for name in old:
            if dialect == "sqlite":
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}")
            else:
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name} ON deliveries")
                conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {name}()")
        for statement in ddl(dialect):
            conn.exec_driver_sql(statement)
        fill(conn, old)
        conn.commit()
    return True
