"""Per-user opt-outs, read through a Redis cache (preferences change rarely; sends are many).

``notif:prefs:<user>`` holds the user's opt-outs as ``channel:category`` items joined by commas
(empty = none), for ``PREFS_TTL`` seconds. Every write of an opt-out calls ``invalidate`` after
its commit, so the next read goes to SQL; the TTL bounds staleness should a writer die between
its commit and the invalidation.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis
from sqlalchemy import select
from sqlmodel import Session

from notifyctl import keys
from notifyctl.models import OptOut

PREFS_TTL = 300


def invalidate(client: redis.Redis, user_ids: Iterable[str]) -> None:
    ks = [keys.prefs(u) for u in dict.fromkeys(user_ids)]
    if ks:
        client.delete(*ks)


def load(client: redis.Redis, session: Session, user_ids: Iterable[str]) -> dict[str, set[tuple[str, str]]]:
    """Opt-outs for each user: one MGET, then one SQL query for the misses (and one pipeline to cache them)."""
    ids = list(dict.fromkeys(user_ids))
    out: dict[str, set[tuple[str, str]]] = {}
    if not ids:
        return out
    cached = client.mget([keys.prefs(u) for u in ids])
    misses: list[str] = []
    for uid, raw in zip(ids, cached, strict=True):
        if raw is None:
            misses.append(uid)
        else:
            out[uid] = {tuple(item.split(":", 1)) for item in raw.decode().split(",") if item}  # type: ignore[misc]
    if misses:
        o: Any = OptOut.__table__.c  # type: ignore[attr-defined]
        found: dict[str, set[tuple[str, str]]] = {u: set() for u in misses}
        for uid, ch, cat in session.execute(select(o.user_id, o.channel, o.category).where(o.user_id.in_(misses))):
            found[uid].add((ch, cat))
        pipe = client.pipeline(transaction=False)
        for uid, items in found.items():
            pipe.set(keys.prefs(uid), ",".join(f"{c}:{k}" for c, k in sorted(items)), ex=PREFS_TTL)
        pipe.execute()
        out.update(found)
    return out
