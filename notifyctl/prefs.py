"""Per-user opt-outs, read from SQL, the one record of them.

Where a user's row is read anyway — intake, a worker's small batch (an OTP's job) — the opt-outs
come in the same statement, as ``channel:category`` items joined by commas (``as_text``, read back
with ``parse``): a probe of the table's primary key, cheaper than the Redis cache they were once
read through (its MGET a round trip of its own; on a miss a SQL query and a write more). Measured,
200 OTP submits on SQLite to users not cached, callgrind: 2.22 -> 1.84 M instructions a submit. A
campaign's batch reads them for all its users in one query (``load``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from sqlalchemy import func, literal_column, select
from sqlalchemy.engine import Connection
from sqlmodel import Session

from notifyctl.bulk import rows_where_in
from notifyctl.models import OptOut

_O = OptOut.__table__  # type: ignore[attr-defined]


def as_text(user_id: Any) -> Any:
    """A scalar subquery: the opt-outs of ``user_id`` (a column or value) as ``parse`` reads them, or NULL."""
    item = _O.c.channel + literal_column("':'") + _O.c.category
    return select(func.aggregate_strings(item, ",")).where(_O.c.user_id == user_id).scalar_subquery()


def parse(text: str) -> set[tuple[str, str]]:
    """A user's opt-outs from ``as_text``'s form: ``channel:category`` items joined by commas."""
    return {cast(tuple[str, str], tuple(item.split(":", 1))) for item in text.split(",") if item}


def load(session: Session | Connection, user_ids: Iterable[str]) -> dict[str, set[tuple[str, str]]]:
    """Opt-outs per user, in one query (a user without any is left out: read with ``.get(uid, set())``)."""
    ids = list(dict.fromkeys(user_ids))
    return _from_sql(session, ids) if ids else {}


# A batch's opt-outs, raw (``bulk.rows_where_in``): a thousand ids through SQLAlchemy's expanding IN
# cost the worker more Python than the query (1,000-user loads: 1.1 -> 0.35 us a user on SQLite,
# 1.9 -> 0.7 on PostgreSQL). Not prepared on PostgreSQL: planned each time from the table's
# statistics, a table of few opt-outs is read whole (server 0.55 us a user, as the IN list was),
# where a generic plan probed the index once per id (2.9 us).
_SELECT = "SELECT user_id, channel, category FROM opt_outs"


def _from_sql(session: Session | Connection, ids: list[str]) -> dict[str, set[tuple[str, str]]]:
    """The users among ``ids`` that have opt-outs (a user without any is left out)."""
    found: dict[str, set[tuple[str, str]]] = {}
    conn = session if isinstance(session, Connection) else session.connection()
    for uid, ch, cat in rows_where_in(conn, _SELECT, "user_id", ids):
        found.setdefault(uid, set()).add((ch, cat))
    return found
