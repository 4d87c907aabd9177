"""One module: one class, the send records and the fenced batch lease, whose Lua scripts read each
other's keys; ~500 lines.

Layer 3 of dedup: a per-delivery send record in Redis, and one fenced lease per batch while a
worker sends it.

A batch a worker holds has **one lease key** (``notif:lease:<lease id>``, the id drawn per batch
is the owner token) holding ``<worker>|<expires ms>|<flags>|<in flight>``: ``expires`` is on
Redis's clock (``TIME``: no host's clock matters), ``in flight`` a bitmap (hex) of the batch's
deliveries whose provider call has begun, ``flags`` ``x`` once an earlier holder recorded a send
of one of them (see settle). Each delivery's ``notif:sent:<delivery id>`` names the lease that
holds it, ``lease:<lease id>:<index in the batch>``, and once the provider accepted it holds
``sent:<provider message id>``. Checking, renewing and marking in flight cost one key per batch.

- **take** (one script call per batch): a delivery nobody holds is leased (one SET NX); one whose
  lease has *expired* (or is gone: settled) is taken over — never earlier, whether or not its
  holder's liveness key is still there; a ``busy`` delivery comes with how long its lease has left
  (``busy_left``), so the pipeline makes it due again right then (a killed holder's OTP is resent
  as soon as it may be). A delivery taken over whose bit is set in its old lease's in-flight bitmap
  comes back as ``doubt:<previous holder>``: the previous holder may have reached the provider
  before it died, so the delivery is **in doubt** (it is sent again — at-least-once — and the
  pipeline records that).
- **fence** (one script call per provider call): right before calling a provider, the batch's
  lease is checked, atomically, to be still this owner's and unexpired; if so the deliveries about
  to be sent are marked in flight and the lease gets a fresh expiry, else none may be sent
  (``Fenced``). Once a lease has expired it is never renewed again, so while it holds, every
  delivery naming it is this worker's — unless an earlier holder, cut off and back, recorded a send
  for one of them: it then flags the lease (``x``) and the fence checks each delivery's record.
- **renewal**: while a batch holds its lease a thread renews it (one script call per round, every
  quarter of the lease) — through the provider wait too. A worker that dies, or is cut off from
  Redis, stops renewing: its lease expires and only then can another worker take its deliveries.
- **settle** (one script call per batch): ``sent:`` records are written whatever the lease (the
  provider accepted: that is the truth), the records of the batch's other deliveries (outcome
  recorded in SQL: retry, failure, fenced) are removed where they still name this lease, and the
  lease key is deleted: those deliveries are free to take, not in doubt. So a delivery costs at
  most two writes: its take, and its send record or its release.

Every key a script touches is a delivery's send record or a lease named by one, all written by
batches of those deliveries: they live on one Redis server (with Redis shards by user, the user's).

**Replicated Redis (Sentinel).** A primary's writes reach its replicas a little later, and a
failover discards what had not: a fence known only to a demoted primary leaves the new one without
the lease, and another worker would take its deliveries as free and send them again, in no doubt.
So with ``replica_acks`` (``redis_replica_acks``: 1 by default for a ``redis+sentinel://`` URL) the
fence is sent with ``WAIT`` in one pipeline (one round trip per batch, not per notification), and a
batch is sent only once that many replicas hold its fence — and so its take; else it is ``Fenced``.
Renewals wait too, and only acknowledged ones extend ``may_start``'s horizon. A settle lost at a
failover costs nothing twice: the new primary holds the fenced lease with its in-flight bits, a
taker after its expiry finds those deliveries in doubt, and reads their outcome in SQL first.

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
# a lease key's value: worker, expiry (ms, Redis's clock), flags, in-flight bitmap (hex)
_LEASE = "^([^|]*)|(%d+)|(%a*)|(%x*)$"

# whether bit i is set in a hex bitmap (byte i // 8 at hex digits 2k+1, 2k+2; bit 0 = low bit)
_BIT = """
local function inflight(h, i)
  local k, b = math.floor(i / 8), i % 8
  local pos = 2 * k + 2
  if b >= 4 then pos = pos - 1; b = b - 4 end
  local c = tonumber(string.sub(h, pos, pos), 16)
  return c ~= nil and math.floor(c / 2 ^ b) % 2 == 1
end
"""

# KEYS: the new lease, then the deliveries' send records. ARGV: worker, lease id, lease ms, keep
# (s), the lease key prefix. Returns, for each delivery that is not plainly ``ok`` (none, in a
# blast: an answer per delivery cost ~1 us of redis-server CPU each, a sixth of the take), three
# values: its place (1-based), busy | doubt:<worker> | sent:<id>, and the ms a busy lease has left.
_TAKE = (
    _NOW
    + _BIT
    + """
local me, id, keep, prefix = ARGV[1], ARGV[2], ARGV[4], ARGV[5]
local until_ = now + tonumber(ARGV[3])
local out, leases, held = {}, {}, 0
local pre = 'lease:' .. id .. ':'
for i = 2, #KEYS do
  local k, j = KEYS[i], i - 1
  -- '%d', not `..` on a number: Lua formats that as a float ('%.14g' printf); callgrind: ~2% of
  -- redis-server's instructions for a take + fence + settle
  local mine = pre .. string.format('%d', j - 1)
  -- the usual case, a delivery nobody has touched: one SET NX; else read who holds it
  if redis.call('SET', k, mine, 'EX', keep, 'NX') then
    held = held + 1
  else
    local v = redis.call('GET', k)
    if string.sub(v, 1, 5) == 'sent:' then
      out[#out + 1] = j; out[#out + 1] = v; out[#out + 1] = 0
    else
      -- its holder, the holder's expiry, and whether the holder had begun sending it
      local w, exp, flying = '?', 0, true
      local lid, idx = string.match(v, '^lease:(%x+):(%d+)$')
      if lid then
        local l = leases[lid]
        if l == nil then
          l = false
          local lv = redis.call('GET', prefix .. lid)
          if lv then
            local o, e, _, h = string.match(lv, '"""
    + _LEASE
    + """')
            if o then l = {o, tonumber(e), h} end
          end
          leases[lid] = l
        end
        if l then
          w, exp, flying = l[1], l[2], inflight(l[3], tonumber(idx))
        else
          flying = false -- its lease is settled (deleted): its outcome is in SQL
        end
      else
        -- a lease of the per-delivery format (before batch leases): worker|token|expires|phase
        local ow, _, oe, ph = string.match(v, '^lease|(.*)|([^|]*)|(%d+)|(%a)$')
        if ow then w, exp, flying = ow, tonumber(oe), ph ~= 'c' end
      end
      if w ~= me and exp > now then
        out[#out + 1] = j; out[#out + 1] = 'busy'; out[#out + 1] = exp - now
      else
        -- expired, settled (or this worker's own, from a batch of its that ended): taken over
        redis.call('SET', k, mine, 'EX', keep)
        held = held + 1
        if flying then out[#out + 1] = j; out[#out + 1] = 'doubt:' .. w; out[#out + 1] = 0 end
      end
    end
  end
end
if held > 0 then redis.call('SET', KEYS[1], me .. '|' .. until_ .. '||', 'EX', keep) end
return out
"""
)

# KEYS: the lease (then, to check them one by one, the deliveries' send records). ARGV: worker,
# lease ms, in-flight bits to add (hex; '' = a renewal), lease id. Returns 1 (still ours: expiry
# extended, bits added), 0 (not ours), -1 (flagged: call again with the deliveries' keys), or with
# the deliveries' keys, 1 / 0 per delivery.
_FENCE = (
    _NOW
    + """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local o, e, f, h = string.match(v, '"""
    + _LEASE
    + """')
if o ~= ARGV[1] or tonumber(e) <= now then return 0 end
local add = ARGV[3]
if f ~= '' and add ~= '' and #KEYS == 1 then return -1 end
local res = 1
if #KEYS > 1 then
  res = {}
  local mine = 'lease:' .. ARGV[4] .. ':'
  for i = 2, #KEYS do
    local dv = redis.call('GET', KEYS[i])
    if dv and string.sub(dv, 1, #mine) == mine then res[i - 1] = 1 else res[i - 1] = 0 end
  end
end
if add ~= '' then
  local n, parts = math.max(#h, #add), {}
  for p = 1, n do
    local a = tonumber(string.sub(h, p, p), 16) or 0
    local b = tonumber(string.sub(add, p, p), 16) or 0
    parts[p] = string.format('%x', bit.bor(a, b))
  end
  h = table.concat(parts)
end
redis.call('SET', KEYS[1], o .. '|' .. (now + tonumber(ARGV[2])) .. '|' .. f .. '|' .. h, 'KEEPTTL')
return res
"""
)

# KEYS: the lease. ARGV: worker, in-flight bits to clear (hex): those a fence marked that too few
# replicas acknowledged (nothing was sent), so that the next take does not find them in doubt.
_UNMARK = (
    """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local o, e, f, h = string.match(v, '"""
    + _LEASE
    + """')
if o ~= ARGV[1] then return 0 end
local clr, parts = ARGV[2], {}
for p = 1, #h do
  local a = tonumber(string.sub(h, p, p), 16) or 0
  local b = tonumber(string.sub(clr, p, p), 16) or 0
  parts[p] = string.format('%x', bit.band(a, 15 - b))
end
redis.call('SET', KEYS[1], o .. '|' .. e .. '|' .. f .. '|' .. table.concat(parts), 'KEEPTTL')
return 1
"""
)

# KEYS: the lease, the send records of the deliveries sent, then of those released. ARGV: worker,
# sent ttl, lease key prefix, lease id, number sent, provider ids...
_SETTLE = (
    _NOW
    + """
local v = redis.call('GET', KEYS[1])
local ours, clean = false, false
if v then
  local o, e, f = string.match(v, '"""
    + _LEASE
    + """')
  ours = o == ARGV[1] and tonumber(e) > now
  clean = ours and f == ''
end
local ttl, prefix, id, nsent = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local mine = 'lease:' .. id .. ':'
-- one provider id for every send (a SendGrid request's): given once
local one = nsent > 1 and #ARGV == 6 and ('sent:' .. ARGV[6]) or nil
local others = {}
for i = 2, nsent + 1 do
  if not ours then
    -- this lease expired: a delivery may be another worker's now, whose fence must then see it sent
    local dv = redis.call('GET', KEYS[i])
    local lid = dv and string.match(dv, '^lease:(%x+):%d+$')
    if lid and lid ~= id then others[lid] = true end
  end
  redis.call('SET', KEYS[i], one or ('sent:' .. ARGV[4 + i]), 'EX', ttl)
end
for i = nsent + 2, #KEYS do
  -- released: its record goes (no memory kept for it), but never another's lease or a send record
  if clean then
    redis.call('DEL', KEYS[i])
  else
    local dv = redis.call('GET', KEYS[i])
    if dv and string.sub(dv, 1, #mine) == mine then redis.call('DEL', KEYS[i]) end
  end
end
for lid in pairs(others) do
  local lv = redis.call('GET', prefix .. lid)
  local o, e, _, h = string.match(lv or '', '"""
    + _LEASE
    + """')
  if o then redis.call('SET', prefix .. lid, o .. '|' .. e .. '|x|' .. h, 'KEEPTTL') end
end
if v then redis.call('DEL', KEYS[1]) end
return #KEYS - 1
"""
)

OK = "ok"
BUSY = "busy"
DOUBT = "doubt:"


def _bits(indexes: Sequence[int]) -> str:
    """The hex bitmap with these bits set (``_BIT`` reads it)."""
    if not indexes:
        return ""
    b = bytearray(max(indexes) // 8 + 1)
    for i in indexes:
        b[i >> 3] |= 1 << (i & 7)
    return b.hex()


def holder(client: redis.Redis, delivery_id: str) -> tuple[str, float] | None:
    """Who holds this delivery's lease and until when (epoch s, Redis's clock), or None (free, sent,
    or its lease settled): for traces and tests, not for the pipeline."""
    v = client.get(keys.sent(delivery_id))
    s = v.decode() if isinstance(v, bytes) else v
    if not s or not s.startswith("lease:"):
        return None
    lv = client.get(keys.lease(s.split(":")[1]))
    if not lv:
        return None
    worker, exp = (lv.decode() if isinstance(lv, bytes) else str(lv)).split("|")[:2]
    return worker, int(exp) / 1000


class Claims:
    """The leases of one worker: one at a time, the batch's. ``ttl``: the lease, seconds;
    ``sent_ttl``: how long a ``sent:`` record (and a lease left by a dead holder) stays."""

    def __init__(
        self,
        client: redis.Redis,
        worker: str,
        ttl: float,
        sent_ttl: int,
        replica_acks: int = 0,
        ack_timeout: float = 0.5,
    ) -> None:
        if "|" in worker:
            raise ValueError(f"worker name {worker!r} must not contain '|'")
        self.client = client
        # with a replicated Redis (Sentinel), how many replicas must hold a fence before its batch is
        # sent, and how long to wait for them (``_fence_call``); 0: the primary's word is enough
        self.replica_acks = max(0, int(replica_acks))
        self.ack_timeout_ms = max(1, int(ack_timeout * 1000))  # WAIT's 0 would wait for ever
        self.unacked = 0  # fences refused because too few replicas acknowledged them (tests, metrics)
        self.worker = worker
        self.ttl = float(ttl)
        self.sent_ttl = sent_ttl
        self._take = client.register_script(_TAKE)
        self._fence = client.register_script(_FENCE)
        self._settle = client.register_script(_SETTLE)
        self._unmark = client.register_script(_UNMARK)
        self._flying: set[int] = set()  # places in the lease in hand marked in flight by an acknowledged fence
        self.token = ""  # the lease id of the batch in hand (the owner token)
        self._index: dict[str, int] = {}  # delivery id → its place in the lease, for those held
        self._held = 0  # deliveries held by the lease in hand (0: nothing to renew)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        # delivery id → seconds until the lease that made it ``busy`` in the last ``take`` runs out
        # (on Redis's clock, as a duration: no host's clock matters), so that a delivery abandoned by a
        # dead holder is tried again as soon as it can be taken over, not some rounds later
        self.busy_left: dict[str, float] = {}
        self.renewals = 0  # renewal rounds that reached Redis (for tests and the curious)
        # (monotonic) until when the lease in hand surely holds: measured from before the last call
        # that set its expiry, so never later than Redis's own
        self.valid_until = 0.0

    @property
    def lease_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    def take(self, delivery_ids: Sequence[str]) -> list[str]:
        """Per delivery: ``ok`` (ours to send), ``doubt:<worker>`` (ours, taken over from a holder
        that had begun sending it), ``busy`` (another worker's unexpired lease: how long it has left is
        in ``busy_left``), or ``sent:<id>``. The lease taken is renewed until ``settle`` or ``drop``."""
        if not delivery_ids:
            return []
        token = secrets.token_hex(8)
        ks = [keys.lease(token)]
        ks += [keys.sent(d) for d in delivery_ids]
        t0 = time.monotonic()
        res = self._take(keys=ks, args=[self.worker, token, self.lease_ms, self.sent_ttl, keys.LEASE_PREFIX])
        out = [OK] * len(delivery_ids)  # the script names only the others
        busy_left: dict[str, float] = {}
        for p in range(0, len(res), 3):
            j, r, ms = int(res[p]) - 1, res[p + 1], int(res[p + 2])
            out[j] = r.decode() if isinstance(r, bytes) else r
            if ms:
                busy_left[delivery_ids[j]] = ms / 1000
        self.busy_left = busy_left
        index = {d: i for i, (d, r) in enumerate(zip(delivery_ids, out, strict=True)) if r == OK or r.startswith(DOUBT)}
        with self._lock:
            self.token = token
            self._index = index
            self._held = len(index)
            self._flying = set()
            self.valid_until = t0 + self.ttl
        if index:
            self._start_renewing()
        return out

    def fence(self, delivery_ids: Sequence[str]) -> list[bool]:
        """Right before a provider call: which of these deliveries are still ours (the batch's lease
        checked, extended and these marked in flight, atomically, in one call). A Redis failure
        answers False for all: a worker that cannot confirm its lease must not send."""
        if not delivery_ids:
            return []
        with self._lock:
            token, index = self.token, self._index
        at = [index.get(d) for d in delivery_ids]
        mine = [i for i in at if i is not None]
        if not mine:
            return [False] * len(delivery_ids)
        lease = keys.lease(token)
        args: list[str | int] = [self.worker, self.lease_ms, _bits(mine), token]
        t0 = time.monotonic()
        try:
            res, acked = self._fence_call([lease], args)
            if res == -1:  # an earlier holder recorded sends in this batch: each delivery is checked
                res, acked = self._fence_call([lease] + [keys.sent(d) for d in delivery_ids], args)
        except redis.RedisError as exc:
            log.warning("lease check failed (%s): %d message(s) not sent", exc, len(delivery_ids))
            return [False] * len(delivery_ids)
        if not acked:
            # the fence (and the take before it) may exist on this primary only: after a failover the
            # new primary would not know the lease, and another worker would take these deliveries as
            # free. Not sent, exactly as a lost lease: released, retried later, no attempt used
            self.unacked += 1
            # nothing is sent: the bits this fence set go (not those of an acknowledged one before)
            fresh = [i for i in mine if i not in self._flying]
            if fresh:
                try:
                    self._unmark(keys=[lease], args=[self.worker, _bits(fresh)])
                except redis.RedisError:
                    pass  # the deliveries stay marked: at worst counted in doubt, as before
            log.warning(
                "lease not confirmed by %d Redis replica(s) within %d ms: %d message(s) not sent",
                self.replica_acks,
                self.ack_timeout_ms,
                len(delivery_ids),
            )
            return [False] * len(delivery_ids)
        self._flying.update(mine)
        if isinstance(res, list):
            ours = [bool(r) and i is not None for r, i in zip(res, at, strict=True)]
        else:
            ours = [bool(res) and i is not None for i in at]
        if any(ours):
            self.valid_until = max(self.valid_until, t0 + self.ttl)
        return ours

    def _fence_call(self, ks: list[str], args: list[str | int]) -> tuple[object, bool]:
        """The fence script's answer, and whether enough replicas hold its write. With
        ``replica_acks``, the script and ``WAIT <acks> <timeout>`` go in one pipeline on one
        connection: WAIT then counts the replicas that have the fence's write — and, the replication
        stream being in order, every write before it (the batch's take). One round trip per batch."""
        if not self.replica_acks:
            return self._fence(keys=ks, args=args), True
        pipe = self.client.pipeline(transaction=False)
        self._fence(keys=ks, args=args, client=pipe)
        pipe.execute_command("WAIT", self.replica_acks, self.ack_timeout_ms)  # type: ignore[no-untyped-call]
        res, n = pipe.execute()
        if res == 0 or res == -1:  # nothing written: the answer stands whatever the replicas
            return res, True
        return res, int(n) >= self.replica_acks

    def may_start(self, timeout: float) -> bool:
        """Whether a provider request that may take ``timeout`` seconds ends before the lease in hand
        could have run out: False once renewals have failed for long enough (cut off from Redis).
        A timeout as long as the lease is never held back (the lease is then too short to judge)."""
        return timeout >= self.ttl or time.monotonic() + timeout < self.valid_until

    def renew(self) -> int:
        """Extend the lease in hand (one call); returns how many deliveries it held if it is no longer
        ours (expired: cut off from Redis for longer than the lease), else 0."""
        with self._lock:
            held, token = self._held, self.token
        if not held:
            return 0
        t0 = time.monotonic()
        ok, acked = self._fence_call([keys.lease(token)], [self.worker, self.lease_ms, "", token])
        self.renewals += 1
        with self._lock:
            if self.token != token or not self._held:
                return 0  # settled or dropped meanwhile: nothing was lost
            if ok:
                # a renewal the replicas do not hold may vanish at a failover: the lease is then only
                # sure until the last one they acknowledged (``may_start`` holds further requests back)
                if acked:
                    self.valid_until = max(self.valid_until, t0 + self.ttl)
                return 0
            self._held = 0
        log.warning("lease of %d deliveries lost to expiry", held)
        return held

    def settle(self, sent: dict[str, str], released: Sequence[str]) -> None:
        """Record accepted sends (delivery id → provider id), remove the records of the others that
        are still this lease's (``released``: their outcome is in SQL; free to take, not in doubt),
        and end the batch's lease, in one call."""
        with self._lock:
            token = self.token
        self.drop()
        if not sent and not released:
            return
        ks = [keys.lease(token)]
        ks += [keys.sent(d) for d in sent]
        ks += [keys.sent(d) for d in released]
        pmids = list(sent.values())
        if len(pmids) > 1 and pmids.count(pmids[0]) == len(pmids):
            pmids = pmids[:1]  # one provider id for all (a SendGrid request's): sent once, not a thousand times
        args: list[str | int] = [self.worker, self.sent_ttl, keys.LEASE_PREFIX, token, len(sent), *pmids]
        self._settle(keys=ks, args=args)

    def drop(self) -> None:
        """Stop renewing the batch's lease (it expires on its own)."""
        with self._lock:
            self._held = 0

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
