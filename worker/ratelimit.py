"""Per-user sliding-window rate limits in Redis.

Each rule (``push:*:3/1h``) is a sorted set per user of the sends it admitted, scored by time
in ms. A check for one (notification, channel) covers every rule that applies, atomically in
one Lua call: all rules must have room, then the send is recorded in each. A whole batch of
checks goes to Redis in one pipeline.

The member is ``<notification id>:<channel>``, so re-checking the same notification after a
crash finds it already admitted instead of counting it twice. Priority ``high`` (OTPs,
security alerts) is recorded but never held back when ``rate_limit_bypass_high`` is on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis

from notifyctl import keys
from notifyctl.settings import RateRule

_SCRIPT = """
local now = tonumber(ARGV[1])
local member = ARGV[2]
local bypass = ARGV[3] == '1'
local n = #KEYS
if redis.call('ZSCORE', KEYS[1], member) then return 1 end
if not bypass then
  for i = 1, n do
    local window = tonumber(ARGV[2 + 2 * i])
    local limit = tonumber(ARGV[3 + 2 * i])
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
    if redis.call('ZCARD', KEYS[i]) >= limit then return 0 end
  end
end
for i = 1, n do
  local window = tonumber(ARGV[2 + 2 * i])
  if bypass then redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window) end
  redis.call('ZADD', KEYS[i], now, member)
  redis.call('PEXPIRE', KEYS[i], window)
end
return 1
"""


@dataclass(slots=True)
class Check:
    user_id: str
    channel: str
    category: str
    member: str
    high: bool = False


class RateLimiter:
    def __init__(self, client: redis.Redis, rules: Sequence[RateRule], bypass_high: bool = True) -> None:
        self.client = client
        self.rules = list(rules)
        self.bypass_high = bypass_high
        self._script = client.register_script(_SCRIPT)

    def check_many(self, checks: Sequence[Check], now_ms: int) -> list[bool]:
        """Admit or refuse each check; one pipeline for the batch. Checks no rule covers pass."""
        results: list[bool | None] = [None] * len(checks)
        pipe = self.client.pipeline(transaction=False)
        pending: list[int] = []
        for i, c in enumerate(checks):
            rules = [r for r in self.rules if r.applies(c.channel, c.category)]
            if not rules:
                results[i] = True
                continue
            args: list[int | str] = [now_ms, c.member, "1" if (c.high and self.bypass_high) else "0"]
            for r in rules:
                args += [r.window * 1000, r.limit]
            self._script(keys=[keys.rate(c.user_id, r.key) for r in rules], args=args, client=pipe)
            pending.append(i)
        if pending:
            for i, ok in zip(pending, pipe.execute(), strict=True):
                results[i] = bool(ok)
        return [bool(r) for r in results]
