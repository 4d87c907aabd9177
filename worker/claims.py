"""Layer 3 of dedup: a per-delivery send record in Redis, a fenced lease while a worker sends it.

``notif:sent:<delivery id>`` holds, while a worker has the delivery, a **lease**
``lease|<worker>|<token>|<expires ms>|<phase>`` and, once the provider accepted it,
``sent:<provider message id>``. ``token`` is drawn per batch (the owner token), ``expires`` is
on Redis's clock (``TIME``: no host's clock matters), ``phase`` is ``c`` (claimed) or ``f``
(in flight: a provider call for it has begun).

- **take** (one script call per batch): a delivery nobody holds is leased; one whose lease has
  *expired* is taken over — never earlier, whether or not its holder's liveness key is still
  there; a ``busy`` delivery comes with how long its lease has left (``busy_left``), so the
  pipeline makes it due again right then (a killed holder's OTP is resent as soon as it may be).
  A lease taken over in phase ``f`` comes back as ``doubt:<previous holder>``: the previous
  holder may have reached the provider before it died, so the delivery is **in doubt** (it is sent
  again — at-least-once — and the pipeline records that).
- **fence** (one script call per provider call): right before calling a provider, the batch's
  leases are checked, atomically, to be still this owner's and unexpired; those that are go to
  phase ``f`` with a fresh expiry, the others must not be sent (``Fenced``).
- **renewal**: while a batch holds leases a thread renews them (one script call per round, every
  third of the lease) — through the provider wait too. A worker that dies, or is cut off from
  Redis, stops renewing: its leases expire and only then can another worker take them.
- **settle** (one script call per batch): ``sent:`` records are written whatever the lease (the
  provider accepted: that is the truth), the others are released only when still this owner's
  (compare-and-delete: never another worker's lease).

The guarantee: while Redis is reachable no two workers call a provider for one delivery, and a
worker cut off from Redis stops at its next provider call; a call already on its way when the
cut came ends within the lease as long as the provider's timeout is shorter than the lease
(``claim_ttl``), and its result is written to SQL, which the next holder of an in-doubt
delivery reads before sending again.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Sequence

import redis

from notifyctl import keys
from worker.providers.base import Fenced

__all__ = ["BUSY", "DOUBT", "OK", "Claims", "Fenced"]

log = logging.getLogger("notifyctl.worker")

# Redis's clock in ms, in a script (effects replication, Redis >= 5: TIME is allowed before writes)
_NOW = "local _t = redis.call('TIME'); local now = tonumber(_t[1]) * 1000 + math.floor(tonumber(_t[2]) / 1000)\n"
_PARSE = "^lease|(.*)|([^|]*)|(%d+)|(%a)$"

_TAKE = (
    _NOW
    + """
local me, keep = ARGV[1], ARGV[4]
local lease = 'lease|' .. me .. '|' .. ARGV[2] .. '|' .. (now + tonumber(ARGV[3])) .. '|c'
local out, left = {}, {}
for i, k in ipairs(KEYS) do
  left[i] = 0
  -- the usual case, a delivery nobody has touched: one SET NX; else read who holds it
  if redis.call('SET', k, lease, 'EX', keep, 'NX') then
    out[i] = 'ok'
  else
    local v = redis.call('GET', k)
    if string.sub(v, 1, 5) == 'sent:' then
      out[i] = v
    else
      local w, tok, exp, phase = string.match(v, '"""
    + _PARSE
    + """')
      if w and w ~= me and tonumber(exp) > now then
        out[i] = 'busy'
        left[i] = tonumber(exp) - now
      else
        -- expired (or this worker's own, from a batch of its that ended): taken over
        redis.call('SET', k, lease, 'EX', keep)
        if phase == 'c' then out[i] = 'ok' else out[i] = 'doubt:' .. (w or '?') end
      end
    end
  end
end
return {out, left}
"""
)

# ARGV: worker, token, lease ms, phase ('f' = in flight, '' = keep). Returns 1 (still ours) / 0 per key.
_RENEW = (
    _NOW
    + """
local mine = 'lease|' .. ARGV[1] .. '|' .. ARGV[2] .. '|'
local until_ = now + tonumber(ARGV[3])
local out = {}
for i, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  out[i] = 0
  if v and string.sub(v, 1, #mine) == mine then
    local exp, phase = string.match(string.sub(v, #mine + 1), '^(%d+)|(%a)$')
    if exp and tonumber(exp) > now then
      if ARGV[4] ~= '' then phase = ARGV[4] end
      redis.call('SET', k, mine .. until_ .. '|' .. phase, 'KEEPTTL')
      out[i] = 1
    end
  end
end
return out
"""
)

# ARGV: sent ttl, number sent, worker, token, provider ids...
_SETTLE = """
local ttl = ARGV[1]
local nsent = tonumber(ARGV[2])
local mine = 'lease|' .. ARGV[3] .. '|' .. ARGV[4] .. '|'
for i = 1, nsent do
  redis.call('SET', KEYS[i], 'sent:' .. ARGV[4 + i], 'EX', ttl)
end
for i = nsent + 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v and string.sub(v, 1, #mine) == mine then redis.call('DEL', KEYS[i]) end
end
return #KEYS
"""

OK = "ok"
BUSY = "busy"
DOUBT = "doubt:"


class Claims:
    """The leases of one worker. ``ttl``: the lease, seconds; ``sent_ttl``: how long a ``sent:``
    record (and a lease left by a dead holder) stays."""

    def __init__(self, client: redis.Redis, worker: str, ttl: float, sent_ttl: int) -> None:
        if "|" in worker:
            raise ValueError(f"worker name {worker!r} must not contain '|'")
        self.client = client
        self.worker = worker
        self.ttl = float(ttl)
        self.sent_ttl = sent_ttl
        self._take = client.register_script(_TAKE)
        self._renew = client.register_script(_RENEW)
        self._settle = client.register_script(_SETTLE)
        self.token = ""
        self._held: list[str] = []  # send record keys of the batch in hand
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        # delivery id → seconds until the lease that made it ``busy`` in the last ``take`` runs out
        # (on Redis's clock, as a duration: no host's clock matters), so that a delivery abandoned by a
        # dead holder is tried again as soon as it can be taken over, not some rounds later
        self.busy_left: dict[str, float] = {}
        self.renewals = 0  # renewal rounds that reached Redis (for tests and the curious)
        # (monotonic) until when the leases in hand surely hold: measured from before the last call
        # that set their expiry, so never later than Redis's own
        self.valid_until = 0.0

    @property
    def lease_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    def take(self, delivery_ids: Sequence[str]) -> list[str]:
        """Per delivery: ``ok`` (ours to send), ``doubt:<worker>`` (ours, taken over from a holder
        that had begun sending it), ``busy`` (another worker's unexpired lease: how long it has left is
        in ``busy_left``), or ``sent:<id>``. The leases taken are renewed until ``settle`` or ``drop``."""
        if not delivery_ids:
            return []
        token = secrets.token_hex(8)
        ks = [keys.sent(d) for d in delivery_ids]
        t0 = time.monotonic()
        res, left = self._take(keys=ks, args=[self.worker, token, self.lease_ms, self.sent_ttl])
        out = [r.decode() if isinstance(r, bytes) else r for r in res]
        self.busy_left = {d: ms / 1000 for d, ms in zip(delivery_ids, left, strict=True) if ms}
        held = [k for k, r in zip(ks, out, strict=True) if r == OK or r.startswith(DOUBT)]
        with self._lock:
            self.token = token
            self._held = held
            self.valid_until = t0 + self.ttl
        if held:
            self._start_renewing()
        return out

    def fence(self, delivery_ids: Sequence[str]) -> list[bool]:
        """Right before a provider call: which of these deliveries are still ours (checked and
        marked in flight, atomically, in one call). A Redis failure answers False for all: a worker
        that cannot confirm its lease must not send."""
        if not delivery_ids:
            return []
        t0 = time.monotonic()
        try:
            res = self._renew(
                keys=[keys.sent(d) for d in delivery_ids], args=[self.worker, self.token, self.lease_ms, "f"]
            )
        except redis.RedisError as exc:
            log.warning("lease check failed (%s): %d message(s) not sent", exc, len(delivery_ids))
            return [False] * len(delivery_ids)
        ours = [bool(r) for r in res]
        if any(ours):
            self.valid_until = max(self.valid_until, t0 + self.ttl)
        return ours

    def may_start(self, timeout: float) -> bool:
        """Whether a provider request that may take ``timeout`` seconds ends before the leases in hand
        could have run out: False once renewals have failed for long enough (cut off from Redis).
        A timeout as long as the lease is never held back (the lease is then too short to judge)."""
        return timeout >= self.ttl or time.monotonic() + timeout < self.valid_until

    def renew(self) -> int:
        """Extend every lease in hand (one call); returns how many are no longer ours."""
        with self._lock:
            held, token = list(self._held), self.token
        if not held:
            return 0
        t0 = time.monotonic()
        res = self._renew(keys=held, args=[self.worker, token, self.lease_ms, ""])
        self.renewals += 1
        if any(res):
            with self._lock:
                if self.token == token:
                    self.valid_until = max(self.valid_until, t0 + self.ttl)
        lost = [k for k, r in zip(held, res, strict=True) if not r]
        if lost:
            log.warning("%d lease(s) lost to expiry or another worker", len(lost))
            with self._lock:
                if self.token == token:
                    gone = set(lost)
                    self._held = [k for k in self._held if k not in gone]
        return len(lost)

    def settle(self, sent: dict[str, str], released: Sequence[str]) -> None:
        """Record accepted sends (delivery id → provider id) and release the others that are still
        ours, in one call; the batch's leases are no longer renewed."""
        with self._lock:
            token = self.token
        self.drop()
        if not sent and not released:
            return
        ks = [keys.sent(d) for d in sent] + [keys.sent(d) for d in released]
        self._settle(keys=ks, args=[self.sent_ttl, len(sent), self.worker, token, *sent.values()])

    def drop(self) -> None:
        """Stop renewing the batch's leases (they expire on their own)."""
        with self._lock:
            self._held = []

    # ------------------------------------------------------------------ renewal thread

    def _start_renewing(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.worker}", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        every = max(0.05, self.ttl / 4)
        while not self._wake.wait(every):
            try:
                self.renew()
            except redis.RedisError as exc:  # cut off: the leases run out, which is the point
                log.warning("lease renewal failed: %s", exc)
            except Exception:  # noqa: BLE001 - the renewal thread must not die
                log.exception("lease renewal")

    def close(self) -> None:
        self.drop()
        self._wake.set()
