"""Per-process worker state (``Runtime``: connections, limiter, claims, circuits, pacer, providers)
and one batch's counts (``Stats``)."""

from __future__ import annotations

import logging
import os
import socket
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from notifyctl import metrics
from notifyctl.circuit import Circuits
from notifyctl.context import Context
from notifyctl.liveness import Liveness, unique_worker_name
from notifyctl.pacing import Pacer
from notifyctl.redisconn import replica_acks
from notifyctl.unsubscribe import secret_key
from notifyctl.vocabulary import ROUTES
from worker.claims import Claims
from worker.providers import Provider, load_provider
from worker.ratelimit import RateLimiter

log = logging.getLogger("notifyctl.worker")


class Runtime:
    """Per-process worker state: connections, limiter, claims and provider instances."""

    def __init__(self, ctx: Context, worker_name: str | None = None, liveness: Liveness | None = None) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.worker_name = worker_name or unique_worker_name(f"{socket.gethostname()}-{os.getpid()}")
        # the shard this process serves holds its users' keys and its liveness (notifyctl.shards); shard
        # 0 (ctx.redis) what every host shares: circuits, pacing, provider tokens, metrics
        self.limiter = RateLimiter(ctx.served, self.settings.rules, self.settings.rate_limit_bypass_high)
        self.claims = Claims(
            ctx.served,
            self.worker_name,
            self.settings.claim_ttl,
            self.settings.sent_marker_ttl,
            replica_acks=replica_acks(self.settings, ctx.shard),
            ack_timeout=self.settings.redis_replica_ack_timeout,
        )
        self.liveness = liveness or Liveness(
            ctx.served, self.worker_name, self.settings.worker_alive_ttl, host=self.settings.host_name
        )
        self.circuits = Circuits(ctx.redis, self.settings.circuit_threshold, self.settings.circuit_cooldown)
        self.pacer = Pacer(ctx.redis)
        self._providers: dict[str, Provider] = {}
        self._route_pool: ThreadPoolExecutor | None = None
        self._unsub_key: bytes | None = None
        self.metrics = metrics.Recorder()

    @property
    def unsub_key(self) -> bytes:
        if self._unsub_key is None:
            self._unsub_key = secret_key(self.settings)
        return self._unsub_key

    def route_pool(self) -> ThreadPoolExecutor:
        """Threads that send a batch's other routes while this thread sends its first
        (``send.send_routes``); made on first use, in the process that sends."""
        if self._route_pool is None:
            self._route_pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="route")
        return self._route_pool

    def provider(self, name: str) -> Provider:
        p = self._providers.get(name)
        if p is None:
            p = self._providers[name] = load_provider(name, self.settings, redis=self.ctx.redis)
        return p

    def warm(self) -> list[str]:
        """Load every configured provider now (imports, SDK clients, their lazy parts: ``warm()``),
        and open the SQL connection: a worker's first job, an OTP say, must not pay for them (the
        Twilio SDK's imports alone took 0.3-4 s; each worker paid them on its first SMS). Nothing is
        sent. A provider that cannot load is left for the send path to report; returns their names."""
        s = self.settings
        names = [n for route in ROUTES for n in s.providers_for(route)]
        failed: list[str] = []
        for name in dict.fromkeys([*names, *s.providers_voice]):
            try:
                p = self.provider(name)
                warm = getattr(p, "warm", None)
                if warm is not None:
                    warm()
            except Exception:  # noqa: BLE001 - reported when a send needs it
                failed.append(name)
        with self.ctx.engine.connect():
            pass
        return failed

    def close(self) -> None:
        if self._route_pool is not None:
            self._route_pool.shutdown(wait=True)
            self._route_pool = None
        self.claims.close()
        for p in self._providers.values():
            try:
                p.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.exception("closing provider %s", p.name)
        self._providers.clear()


@dataclass
class Stats:
    notifications: int = 0
    created: int = 0
    sent: int = 0
    retrying: int = 0
    failed: int = 0
    suppressed: int = 0
    skipped: int = 0
    in_doubt: int = 0  # taken over from a holder that had begun sending them: sent again
    fenced: int = 0  # not sent: the lease was no longer this worker's at the provider call
    by_reason: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "by_reason"}
        d["by_reason"] = dict(self.by_reason)
        return d
