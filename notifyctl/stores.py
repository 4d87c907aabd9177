"""Which stores each host runs on: a host on its embedded Redis, or its own SQLite database, while
the hosts it shares the other store with use another one, is told so at start (one line).

Each store has an identity of its own, whatever URL reaches it: the Redis a random token under
``keys.STORE_ID`` (set once), the database a row of its table ``host_stores`` (``database_id``). At start
(``worker``, ``serve``) a host writes, in each store, which one of the other it runs on — the
database's table ``host_stores`` holds every host's Redis, Redis's hash ``keys.HOST_STORES`` every
host's database — and reads what the others wrote. A host of the same database on another Redis
(or of the same Redis on another database), seen in the last ``RECENT`` days, is a split: its jobs
and records are not this host's. ``check`` returns the warning, the caller prints it once.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from notifyctl import keys
from notifyctl.models import HostStore, utcnow

DATABASE_ROW = ""  # the row of host_stores that holds the database's own identity
RECENT = timedelta(days=7)  # a host not started again for this long is no longer compared


@dataclass(frozen=True)
class Host:
    key: str  # "<host name> <home>": two homes on one machine are two hosts
    name: str
    redis_id: str
    redis_embedded: bool
    db_id: str
    db_embedded: bool


def redis_id(r: Any) -> str:
    """This Redis's identity, created by the first host to ask."""
    token = secrets.token_hex(16)
    r.set(keys.STORE_ID, token, nx=True)
    value = r.get(keys.STORE_ID)
    return value.decode() if isinstance(value, bytes) else str(value or token)


def database_id(engine: Any) -> str:
    """This database's identity, created by the first host to ask (one INSERT wins): the row of
    ``host_stores`` with the empty host name, its ``redis_id`` column holding the token."""
    t = HostStore.__table__  # type: ignore[attr-defined]
    token = secrets.token_hex(16)
    try:
        with engine.begin() as conn:
            conn.execute(insert(t).values(host=DATABASE_ROW, name="(this database)", redis_id=token))
    except IntegrityError:
        pass
    with engine.connect() as conn:
        return str(conn.execute(select(t.c.redis_id).where(t.c.host == DATABASE_ROW)).scalar_one())


def this_host(ctx: Any) -> Host:
    s = ctx.settings
    name = s.host_name or socket.gethostname()
    key = f"{name} {s.home}"
    if len(key) > 255:  # (the column's width)
        key = key[:200] + " " + hashlib.sha256(key.encode()).hexdigest()[:32]
    return Host(
        key=key,
        name=name,
        redis_id=redis_id(ctx.redis),
        redis_embedded=not s.redis_url,
        db_id=database_id(ctx.engine),
        db_embedded=_own_sqlite(s),
    )


def _own_sqlite(settings: Any) -> bool:
    """The database is a SQLite file under this host's home (the default): no other host's."""
    url = settings.effective_database_url()
    if not url.startswith("sqlite"):
        return False
    path = url.split(":///", 1)[-1].split("?", 1)[0]
    home = str(Path(settings.home).resolve())
    return str(Path(path).resolve()).startswith(home + "/")


def register(ctx: Any, me: Host) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write this host's entry in both stores; the other hosts' recent entries: (those of this
    database, with their Redis; those of this Redis, with their database)."""
    now = utcnow()
    t = HostStore.__table__  # type: ignore[attr-defined]
    row = {"name": me.name, "redis_id": me.redis_id, "redis_embedded": me.redis_embedded, "seen_at": now}
    with ctx.engine.begin() as conn:
        if not conn.execute(update(t).where(t.c.host == me.key).values(**row)).rowcount:
            try:
                with conn.begin_nested():
                    conn.execute(insert(t).values(host=me.key, **row))
            except IntegrityError:  # the same host started twice at once: either entry says the same
                pass
    with ctx.engine.connect() as conn:
        others = t.c.host.not_in([me.key, DATABASE_ROW])
        query = select(t.c.name, t.c.redis_id, t.c.redis_embedded).where(others, t.c.seen_at >= now - RECENT)
        rows = conn.execute(query).all()
    of_db = [{"name": r[0], "redis_id": r[1], "redis_embedded": bool(r[2])} for r in rows]

    entry = {"name": me.name, "db_id": me.db_id, "db_embedded": me.db_embedded, "at": now.timestamp()}
    with ctx.redis.pipeline(transaction=False) as pipe:
        pipe.hset(keys.HOST_STORES, me.key, json.dumps(entry))
        pipe.hgetall(keys.HOST_STORES)
        _, raw = pipe.execute()
    of_redis = []
    for k, v in raw.items():
        if (k.decode() if isinstance(k, bytes) else k) == me.key:
            continue
        try:
            e = json.loads(v)
        except ValueError:
            continue
        if isinstance(e, dict) and float(e.get("at", 0)) >= (now - RECENT).timestamp():
            of_redis.append(e)
    return of_db, of_redis


def _names(entries: list[dict[str, Any]]) -> str:
    names = sorted({str(e.get("name")) for e in entries})
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check(ctx: Any) -> str | None:
    """Register this host, and the one-line warning for a split between hosts, or None."""
    me = this_host(ctx)
    of_db, of_redis = register(ctx, me)
    other_redis = [e for e in of_db if e["redis_id"] != me.redis_id]
    other_db = [e for e in of_redis if e.get("db_id") != me.db_id]
    if other_redis and me.redis_embedded:
        return (
            f"this host runs on its embedded Redis while the hosts sharing its database ({_names(other_redis)}) "
            "use another Redis: jobs it queues are not theirs, their workers never run them; "
            "set NOTIFY_REDIS_URL to their Redis"
        )
    if other_db and me.db_embedded:
        return (
            f"this host keeps its records in a SQLite database of its own while the hosts sharing its Redis "
            f"({_names(other_db)}) use another database: its notifications are not theirs; "
            "set NOTIFY_DATABASE_URL to their database"
        )
    if other_redis:
        embedded = [e for e in other_redis if e["redis_embedded"]]
        what = "run on an embedded Redis" if embedded else "use another Redis"
        return (
            f"hosts sharing this database {what} ({_names(embedded or other_redis)}): jobs they queue are not "
            "this host's; every host must set the same NOTIFY_REDIS_URL"
        )
    if other_db:
        embedded = [e for e in other_db if e.get("db_embedded")]
        what = "keep their records in their own SQLite database" if embedded else "use another database"
        return (
            f"hosts sharing this Redis {what} ({_names(embedded or other_db)}): their notifications are not "
            "this host's; every host must set the same NOTIFY_DATABASE_URL"
        )
    return None
