"""Layer 3 of dedup: a per-delivery send record in Redis, checked and taken before sending.

``notif:sent:<delivery id>`` holds ``claim:<worker>`` while a worker sends it (with a TTL), and
``sent:<provider message id>`` once the provider accepted it. Taking claims for a whole batch is
one Lua call. A claim held by a worker whose liveness key has expired is taken over, so the
work of a killed worker resumes within seconds rather than after the claim's TTL.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from notifyctl import keys

_CLAIM = """
local mine = 'claim:' .. ARGV[1]
local out = {}
for i, k in ipairs(KEYS) do
  local v = nil
  -- the usual case, a delivery nobody has touched: one SET NX; else read who holds it
  if not redis.call('SET', k, mine, 'EX', ARGV[2], 'NX') then
    v = redis.call('GET', k)
    if not v then redis.call('SET', k, mine, 'EX', ARGV[2]) end
  end
  if not v then
    out[i] = 'ok'
  elseif string.sub(v, 1, 5) == 'sent:' then
    out[i] = v
  else
    local holder = string.sub(v, 7)
    if holder == ARGV[1] or redis.call('EXISTS', ARGV[3] .. holder) == 0 then
      redis.call('SET', k, mine, 'EX', ARGV[2]); out[i] = 'ok'
    else
      out[i] = 'busy'
    end
  end
end
return out
"""

_SETTLE = """
local ttl = ARGV[1]
local nsent = tonumber(ARGV[2])
for i = 1, nsent do
  redis.call('SET', KEYS[i], 'sent:' .. ARGV[2 + i], 'EX', ttl)
end
for i = nsent + 1, #KEYS do
  redis.call('DEL', KEYS[i])
end
return #KEYS
"""

OK = "ok"
BUSY = "busy"


class Claims:
    def __init__(self, client: redis.Redis, worker: str, ttl: int, sent_ttl: int) -> None:
        self.client = client
        self.worker = worker
        self.ttl = ttl
        self.sent_ttl = sent_ttl
        self._claim = client.register_script(_CLAIM)
        self._settle = client.register_script(_SETTLE)

    def take(self, delivery_ids: Sequence[str]) -> list[str]:
        """Per delivery: ``ok`` (ours to send), ``busy`` (a live worker has it), or ``sent:<id>``."""
        if not delivery_ids:
            return []
        res = self._claim(keys=[keys.sent(d) for d in delivery_ids], args=[self.worker, self.ttl, keys.alive("")])
        return [r.decode() if isinstance(r, bytes) else r for r in res]

    def settle(self, sent: dict[str, str], released: Sequence[str]) -> None:
        """Record accepted sends (delivery id → provider id) and release the others, in one call."""
        if not sent and not released:
            return
        ks = [keys.sent(d) for d in sent] + [keys.sent(d) for d in released]
        self._settle(keys=ks, args=[self.sent_ttl, len(sent), *sent.values()])
