"""Worker liveness: each worker process keeps ``notif:alive:<name>`` alive (value: who it is —
host, pid, queues — and a nonce of its own), refreshed every ``worker_heartbeat`` seconds with a
TTL of ``worker_alive_ttl``. The reconciler reads it to find jobs whose worker died; ``status``
lists the workers from it, per host, so a dead worker drops out within ``worker_alive_ttl``
seconds, wherever it ran.

Names are unique across hosts (``unique_worker_name``: a random suffix), and a worker deletes
its key on the way out only while it still holds its own value (compare-and-delete): a worker
never deletes another's key, even one that somehow shares its name.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import orjson
import redis

from notifyctl import keys

_DELETE_MINE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def unique_worker_name(base: str) -> str:
    """``base`` and a random suffix: unique across hosts even when two hosts share a hostname and
    each runs its supervisor as PID 1 (containers)."""
    return f"{base}-{secrets.token_hex(3)}"


class Liveness:
    """One worker's liveness key."""

    def __init__(
        self, client: redis.Redis, name: str, ttl: float, queues: Sequence[str] = (), host: str | None = None
    ) -> None:
        self.client = client
        self.name = name
        self.key = keys.alive(name)
        self.ttl = max(1, int(round(ttl)))
        self.value = orjson.dumps(
            {
                "host": host or socket.gethostname(),
                "pid": os.getpid(),
                "queues": list(queues),
                "since": round(time.time(), 3),
                "nonce": secrets.token_hex(8),
            }
        )
        self._delete = client.register_script(_DELETE_MINE)
        self._beat_at = -float("inf")  # (monotonic) this process's last beat of the key

    def beat(self, pipe: Any = None) -> None:
        (pipe or self.client).set(self.key, self.value, ex=self.ttl)
        if pipe is None:
            self._beat_at = time.monotonic()

    def beat_unless_recent(self, within: float = 1.0) -> None:
        """``beat``, unless this process beat less than ``within`` seconds ago (the key then has at
        least ``ttl - within`` seconds left): a batch's start needs a live key, not one more round
        trip — an OTP's batch paid one of its ~11 for it while the heartbeat thread beat anyway."""
        if time.monotonic() - self._beat_at >= within:
            self.beat()

    def clear(self) -> bool:
        """Delete the key if it is still this worker's; True when it was."""
        return bool(self._delete(keys=[self.key], args=[self.value]))


def running_key(name: str) -> str:
    """RQ's set of the executions a worker is running (RQ >= 2)."""
    return keys.rq_worker_executions(name)


def live_workers(client: redis.Redis) -> list[dict[str, Any]]:
    """Every worker whose liveness key is there, with what RQ says it is doing (one SCAN, one
    pipelined read): name, host, pid, queues, state, current job, sorted by host then name."""
    names = sorted(k.decode()[len(keys.alive("")) :] for k in client.scan_iter(match=keys.alive("*"), count=1000))
    if not names:
        return []
    pipe = client.pipeline(transaction=False)
    for n in names:
        pipe.get(keys.alive(n))
        pipe.hmget(keys.rq_worker(n), "state", "current_job", "queues")
        pipe.smembers(running_key(n))
    res = pipe.execute()
    out = []
    for i, n in enumerate(names):
        raw, (state, job, queues), running = res[3 * i], res[3 * i + 1], res[3 * i + 2]
        if running:  # RQ 2 keeps what a worker runs as executions "<job id>:<execution id>"
            job = sorted(running)[0].split(b":", 1)[0]
        if raw is None:  # expired between the scan and the read
            continue
        try:
            info = orjson.loads(raw)
            if not isinstance(info, dict):
                info = {}
        except orjson.JSONDecodeError:
            info = {}  # a key written by an older version ("1")
        rq_queues = queues.decode().split(",") if queues else []
        out.append(
            {
                "name": n,
                "host": str(info.get("host") or "?"),
                "pid": info.get("pid"),
                "queues": [q for q in (info.get("queues") or rq_queues) if q],
                "state": state.decode() if state else "starting",
                "current_job": job.decode() if job else None,
                "since": info.get("since"),
            }
        )
    out.sort(key=lambda w: (w["host"], w["name"]))
    return out


def live_workers_of(ctx: Any) -> list[dict[str, Any]]:
    """``live_workers`` of every Redis shard (``notifyctl.shards``: a worker's liveness key is on the
    shard it serves, beside its jobs), each worker with its ``shard`` when there are several."""
    if ctx.shard_count == 1:
        return live_workers(ctx.redis)
    out = [{**w, "shard": i} for i in range(ctx.shard_count) for w in live_workers(ctx.shard_redis(i))]
    out.sort(key=lambda w: (w["host"], w["name"]))
    return out


def by_host(workers: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    hosts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for w in workers:
        hosts[w["host"]].append(w)
    return dict(hosts)
