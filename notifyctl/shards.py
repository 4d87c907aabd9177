"""Sharding by user: several Redis servers (``NOTIFY_REDIS_SHARDS``), each user on one of them.

A user's shard is ``crc32(user id, UTF-8) mod N`` (``shard_of``): stable across processes, hosts
and Python versions (never Python's salted ``hash``). The shard of a user holds everything
notifyctl keeps per user — the queues and jobs of that user's notifications, the dedup keys of
requests to that user, rate windows, ordering counters, send records and leases —
and the liveness keys of the workers that serve that shard (the reconciler of a shard reads them
beside the shard's jobs). So no operation ever spans two shards: a job holds notifications of one
shard's users only (intake and the campaign launcher route each notification, the reconciler
requeues per shard), and a worker serves one shard (``notifyctl worker --shards``).

Shard 0 (``NOTIFY_REDIS_URL``, which must then be unset or the first URL of the list) also holds
what every host shares whatever the user: circuits, provider pacing, provider tokens, metrics,
alert stamps, console sessions, the stores' identities. Each pool's reconciler rounds take a lock
per shard (on that shard).

With one Redis (no ``NOTIFY_REDIS_SHARDS``) there is one shard, 0, and nothing changes: the same
keys, the same round trips.

Changing the number of shards moves users: a user's queued jobs, dedup keys, rate windows and
send records would be on the old shard while new work goes to the new one. Drain first (stop
intake and campaign launches, let the queues empty and retries end), then restart every host
with the new list. The shared database records the shard layout (each shard's Redis identity,
``notifyctl.stores.redis_id``) at the first start of a sharded host; a host with another list
refuses to start (``check``), as a host with another signing key does. A shard down at start
does not stop a host: it serves the shards that answer and each down shard once it answers and
agrees with the record (a worker's supervisor asks every few seconds).
"""

from __future__ import annotations

import hashlib
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from notifyctl.errors import ConfigError, one_line
from notifyctl.models import SharedSecret
from notifyctl.redisconn import RedisUnreachable, _safe, shard_urls, unreachable
from notifyctl.stores import redis_id

T = TypeVar("T")
LAYOUT = "redis_shards"  # the shared_secrets row that records the shard layout (not a secret)


def shard_of(user_id: str, n: int) -> int:
    """The shard of ``user_id`` among ``n``: crc32 of its UTF-8 bytes, mod ``n``."""
    if n <= 1:
        return 0
    return zlib.crc32(user_id.encode()) % n


def split(items: Iterable[T], user_of: Callable[[T], str], n: int) -> dict[int, list[T]]:
    """``items`` grouped by the shard of their user, in their order within each shard."""
    if n <= 1:
        return {0: list(items)}
    out: dict[int, list[T]] = defaultdict(list)
    for item in items:
        out[zlib.crc32(user_of(item).encode()) % n].append(item)
    return dict(out)


def parse_list(text: str, n: int) -> list[int]:
    """``0,2`` → ``[0, 2]``: shard numbers below ``n``; an InputError-worthy ValueError else."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) >= n:
            raise ValueError(f"unknown shard {part!r} (there {'is' if n == 1 else 'are'} {n}: 0-{n - 1})")
        out.append(int(part))
    if not out:
        raise ValueError("no shard given")
    return list(dict.fromkeys(out))


def layout(ctx: Any) -> list[str]:
    """Each shard's Redis identity, shard 0 first."""
    return [redis_id(ctx.shard_redis(i)) for i in range(ctx.shard_count)]


def _fingerprint(ids: list[str]) -> str:
    return hashlib.sha256(",".join(ids).encode()).hexdigest()


def check(ctx: Any) -> dict[int, ShardDown]:
    """At ``worker``/``serve`` start: this host's shard list agrees with the one the shared database
    records (the first sharded host records it), or ``ConfigError``. A one-Redis host records
    nothing (nothing changes for it), but refuses a database whose hosts shard.

    A shard that does not answer cannot disagree, but it cannot be verified either: it is returned
    (``ShardDown``), the shards that answer are checked against the record one by one, and the
    caller calls ``check`` again once it answers, before serving it (``worker.pool``). Every shard
    down raises, as one Redis down does. The record is written only by a host that reaches every
    shard."""
    t = SharedSecret.__table__  # type: ignore[attr-defined]
    engine = ctx.engine
    n = ctx.shard_count
    ids: dict[int, str] = {}
    down: dict[int, ShardDown] = {}
    if n > 1:
        ids, down = each(ctx, lambda i: redis_id(ctx.shard_redis(i)))
    mine = [ids[i] for i in range(n)] if n > 1 and not down else []
    if mine:
        proposal = {"name": LAYOUT, "value": ",".join(i[:8] for i in mine), "fingerprint": _fingerprint(mine)}
        try:
            with engine.begin() as conn:  # the first sharded host's INSERT wins
                conn.execute(insert(t).values(**proposal))
        except IntegrityError:
            pass
    with engine.connect() as conn:
        row = conn.execute(select(t.c.value, t.c.fingerprint).where(t.c.name == LAYOUT)).first()
    if row is None:
        return down
    value, stored = str(row[0] or ""), str(row[1])
    if mine and stored == _fingerprint(mine):
        return down
    recorded = value.split(",") if value else []
    if down and len(recorded) == n and all(recorded[i] == ident[:8] for i, ident in ids.items()):
        return down  # (the record keeps 8 characters of each identity: enough to tell two Redis apart)
    ours = ",".join(ids[i][:8] if i in ids else "down" for i in range(n)) if n > 1 else "one Redis, unsharded"
    raise ConfigError(
        f"this host's Redis shards ({n}: {ours}) differ from "
        f"those of the hosts sharing this database ({len(recorded)}: {value}): users would be looked for on the "
        "wrong shard; set the same NOTIFY_REDIS_SHARDS, in the same order, on every host (changing them needs a "
        "drain, then `notifyctl redis shards --reset`)"
    )


def reset(engine: Any) -> bool:
    """Forget the recorded layout (after a drain, before the hosts start on a new shard list)."""
    t = SharedSecret.__table__  # type: ignore[attr-defined]
    with engine.begin() as conn:
        return bool(conn.execute(delete(t).where(t.c.name == LAYOUT)).rowcount)


class ShardDown(NamedTuple):
    """A shard whose Redis could not be reached: its number, its URL (no password), the error in one line."""

    shard: int
    url: str
    error: str


def each(ctx: Any, fn: Callable[[int], T]) -> tuple[dict[int, T], dict[int, ShardDown]]:
    """``fn(shard)`` for every shard: the answers of the shards that answered, and those that could
    not be reached (refused, reset, silent), so that one shard down hides nothing of the others
    (``status``, ``/metrics``, ``/healthz``). Every shard down raises, as one Redis down does;
    any other error raises too."""
    got: dict[int, T] = {}
    down: dict[int, ShardDown] = {}
    first: BaseException | None = None
    for i in range(ctx.shard_count):
        try:
            got[i] = fn(i)
        except Exception as exc:
            if not (isinstance(exc, RedisUnreachable) or unreachable(exc)):
                raise
            first = first or exc
            url = shard_urls(ctx.settings)[i] if ctx.settings.redis_shards else "?"
            said = str(exc) if isinstance(exc, RedisUnreachable) else f"{type(exc).__name__}: {exc}"
            down[i] = ShardDown(i, _safe(url), one_line(said))
    if not got and first is not None:
        raise first
    return got, down
