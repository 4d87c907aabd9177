"""PostgreSQL: the planner's statistics kept up with tables that grow faster than autovacuum looks.

The batch's statements read a thousand rows by primary key (``id IN (...)``). Planned from
statistics that say the table is small — a fresh database, users imported a minute ago, the
notifications and deliveries of a first campaign — each became a sequential scan of the whole
table: measured in a 50,000-email blast on a fresh schema, the launcher's user lookups, the
worker's loads of notifications, users and deliveries and its ``done`` mark, every one a ``Seq
Scan``, each batch's cost growing with the table. Autovacuum would analyse them, but it looks
once a minute (``autovacuum_naptime``), after the blast is over.

``analyze_grown`` analyses each of the hot tables whose rows changed since its last analysis by at
least as many as it had then (it doubled, or was rewritten) and by at least ``MIN_CHANGED``: a
few analyses while a table grows from nothing to a campaign's size (each samples at most 30,000
rows, tens of milliseconds), none in a steady state. The launcher calls it before reading a
segment and as it writes; the worker pool every few seconds (with ``analytics.fold.compact``). A no-op
on SQLite (its planner has no statistics to go stale here: ``notifyctl.bulk.unindexed``)."""

from __future__ import annotations

from sqlalchemy.engine import Engine

HOT_TABLES = ("users", "notifications", "deliveries")
MIN_CHANGED = 2000


def analyze_grown(engine: Engine, tables: tuple[str, ...] = HOT_TABLES) -> list[str]:
    """ANALYZE each of ``tables`` (in the connection's schema) that has grown past its statistics;
    returns the tables analysed."""
    if engine.dialect.name != "postgresql":
        return []
    done: list[str] = []
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT s.relname, s.n_mod_since_analyze, c.reltuples FROM pg_stat_user_tables AS s "
            "JOIN pg_class AS c ON c.oid = s.relid WHERE s.schemaname = current_schema() AND s.relname = ANY(%s)",
            (list(tables),),
        ).all()
        for name, mods, tuples in rows:
            changed, reltuples = int(str(mods)), float(str(tuples))
            if changed >= MIN_CHANGED and changed >= max(0.0, reltuples):
                conn.exec_driver_sql(f'ANALYZE "{name}"')
                done.append(str(name))
        conn.commit()
    return done
