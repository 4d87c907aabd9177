"""Circuit breakers per provider, shared by every worker through Redis.

A batch in which a provider accepted nothing and answered only "retry later" (5xx, 429, timeouts,
connection errors) counts as a provider failure; any accepted message closes the circuit. After
``threshold`` failing batches in a row the circuit opens for ``cooldown`` seconds: the provider
is skipped and traffic moves to the next provider of the route. When the cooldown has passed
the circuit is half-open: the next batch is a trial — success closes it, failure opens it again.

State is one hash per provider (``notif:circuit:<name>``: ``fails``, ``open_until``); reading the
states of a route is one pipeline, recording a batch's result is one pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import redis

from notifyctl import keys

if TYPE_CHECKING:
    from redis.typing import EncodableT, FieldT

CLOSED, OPEN, HALF_OPEN, THROTTLED = "closed", "open", "half_open", "throttled"


class Circuits:
    def __init__(self, client: redis.Redis, threshold: int, cooldown: float) -> None:
        self.client = client
        self.threshold = max(1, threshold)
        self.cooldown = cooldown
        # name → its consecutive failing batches as this process's last ``states`` read them: a
        # success then resets the count without reading it again (``record``)
        self._fails_seen: dict[str, int] = {}

    def states(self, names: Sequence[str], now: float | None = None) -> dict[str, tuple[str, float]]:
        """``name -> (state, open_until)`` for each provider."""
        now = time.time() if now is None else now
        pipe = self.client.pipeline(transaction=False)
        for n in names:
            pipe.hmget(keys.circuit(n), "open_until", "throttled_until", "fails")
        out: dict[str, tuple[str, float]] = {}
        for n, (raw, thr, fails) in zip(names, pipe.execute(), strict=True):
            self._fails_seen[n] = int(fails or 0)
            until = float(raw) if raw else 0.0
            throttled = float(thr) if thr else 0.0
            if throttled > now and not until > now:
                out[n] = (THROTTLED, throttled)
            else:
                out[n] = ((OPEN if until > now else HALF_OPEN) if until else CLOSED, until)
        return out

    def throttle(self, name: str, seconds: float, now: float | None = None) -> None:
        """The provider said "slow down" (429 + Retry-After): every worker holds off it that long."""
        now = time.time() if now is None else now
        self.client.hset(keys.circuit(name), "throttled_until", now + max(0.5, seconds))

    def record(self, name: str, ok: bool, was: str, now: float | None = None) -> str:
        """Record one batch's result; returns the new state. A success after ``states`` read the
        provider's failure count resets it from that read (no round trip when it was 0: a failure
        another worker recorded in between is reset by the next success that reads it)."""
        now = time.time() if now is None else now
        key = keys.circuit(name)
        seen = self._fails_seen.pop(name, None)
        if ok:
            if was != CLOSED:
                # closed after an outage: mark it, so the pool replays what the outage dead-lettered
                self.client.hset(key, mapping={"fails": 0, "open_until": "", "recovered_at": now})
            elif seen if seen is not None else self.client.hget(key, "fails") not in (None, b"0"):
                self.client.hset(key, mapping={"fails": 0})
            return CLOSED
        pipe = self.client.pipeline(transaction=False)
        pipe.hincrby(key, "fails", 1)
        pipe.hset(key, "last_failure", now)
        fails = pipe.execute()[0]
        if was == HALF_OPEN or fails >= self.threshold:
            mapping: dict[FieldT, EncodableT] = {"open_until": now + self.cooldown}
            if was == CLOSED:
                mapping["opened_at"] = now
            self.client.hset(key, mapping=mapping)
            return OPEN
        return was

    def all_states(self, names: Sequence[str]) -> dict[str, dict[str, str | float]]:
        """For status displays: state, consecutive failing batches, seconds until a retrial."""
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        for n in names:
            pipe.hgetall(keys.circuit(n))
        out: dict[str, dict[str, str | float]] = {}
        for n, h in zip(names, pipe.execute(), strict=True):
            until = float(h.get(b"open_until") or 0)
            state = (OPEN if until > now else HALF_OPEN) if until else CLOSED
            throttled = float(h.get(b"throttled_until") or 0)
            if state == CLOSED and throttled > now:
                state, until = THROTTLED, throttled
            out[n] = {"state": state, "failing_batches": int(h.get(b"fails") or 0),
                      "retry_in_s": round(max(0.0, until - now), 1)}  # fmt: skip
        return out


def take_recoveries(client: redis.Redis, names: Sequence[str]) -> dict[str, float]:
    """Providers whose circuit closed after an outage since the last call: ``name -> opened_at``.
    Each recovery is handed out once, whichever pool asks first (HDEL decides)."""
    pipe = client.pipeline(transaction=False)
    for n in names:
        pipe.hmget(keys.circuit(n), "recovered_at", "opened_at")
    out: dict[str, float] = {}
    for n, (rec, opened) in zip(names, pipe.execute(), strict=True):
        if rec and client.hdel(keys.circuit(n), "recovered_at"):
            out[n] = float(opened or rec)
    return out
