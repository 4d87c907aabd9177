"""Per-user sliding-window rate limits in Redis.

Each rule (``push:*:3/1h``) is a sorted set per user of the sends it admitted, scored by time
in ms. A check for one (notification, channel) covers every rule that applies, atomically: all
rules must have room, then the send is recorded in each. A whole batch of checks is one Lua
call (one round trip, one command to pack).

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

# One call checks a whole batch. ARGV: now, number of checks, then per check: member, bypass flag,
# rule count n, then n pairs (window ms, limit). KEYS: the rule keys of every check, in order.
_SCRIPT = """
local now = tonumber(ARGV[1])
local checks = tonumber(ARGV[2])
local a = 3
local k = 1
local out = {}
for c = 1, checks do
  local member = ARGV[a]
  local bypass = ARGV[a + 1] == '1'
  local n = tonumber(ARGV[a + 2])
  a = a + 3
  local ok = 1
  -- an empty window (the usual case in a blast: a first send to this user today) holds nothing to
  -- expire and cannot hold this member: one ZCARD instead of ZSCORE + ZREMRANGEBYSCORE + ZCARD
  local first = redis.call('ZCARD', KEYS[k])
  if first > 0 and redis.call('ZSCORE', KEYS[k], member) then
    ok = 2  -- admitted before (a rerun after a crash): count nothing again
  elseif not bypass then
    for i = 0, n - 1 do
      local window = tonumber(ARGV[a + 2 * i])
      local limit = tonumber(ARGV[a + 2 * i + 1])
      local card = first
      if i > 0 then card = redis.call('ZCARD', KEYS[k + i]) end
      if card > 0 then
        card = card - redis.call('ZREMRANGEBYSCORE', KEYS[k + i], '-inf', now - window)
      end
      if card >= limit then ok = 0; break end
    end
  end
  if ok == 1 then
    for i = 0, n - 1 do
      local window = tonumber(ARGV[a + 2 * i])
      if bypass then redis.call('ZREMRANGEBYSCORE', KEYS[k + i], '-inf', now - window) end
      redis.call('ZADD', KEYS[k + i], now, member)
      redis.call('PEXPIRE', KEYS[k + i], window)
    end
  end
  out[c] = ok > 0 and 1 or 0
  a = a + 2 * n
  k = k + n
end
return out
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
        # (channel, category) → (rule count, (window ms, limit) per rule, rule keys): worked out once
        self._plans: dict[tuple[str, str], tuple[int, list[int], list[str]]] = {}

    def _plan(self, channel: str, category: str) -> tuple[int, list[int], list[str]]:
        plan = self._plans.get((channel, category))
        if plan is None:
            rules = self.rules_for(channel, category)
            plan = (len(rules), [v for r in rules for v in (r.window * 1000, r.limit)], [r.key for r in rules])
            self._plans[(channel, category)] = plan
        return plan

    def rules_for(self, channel: str, category: str) -> list[RateRule]:
        return [r for r in self.rules if r.applies(channel, category)]

    def counts(self, user_ids: Sequence[str], rules: Sequence[RateRule], now_ms: int) -> dict[tuple[str, str], int]:
        """Sends in each user's current window of each rule, ``(user id, rule key) → n``, as
        ``check_many`` would count them; nothing is recorded (a dry run). One pipelined round trip."""
        if not user_ids or not rules:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for uid in user_ids:
            for rule in rules:
                pipe.zcount(keys.rate(uid, rule.key), f"({now_ms - rule.window * 1000}", "+inf")
        pairs = ((uid, rule.key) for uid in user_ids for rule in rules)
        return {pair: int(n) for pair, n in zip(pairs, pipe.execute(), strict=True)}

    def check_many(self, checks: Sequence[Check], now_ms: int) -> list[bool]:
        """Admit or refuse each check, in one Redis call for the whole batch. Checks no rule covers pass."""
        results: list[bool] = [True] * len(checks)
        ks: list[str] = []
        args: list[int | str] = [now_ms, 0]
        pending: list[int] = []
        for i, c in enumerate(checks):
            n, limits, rule_keys = self._plan(c.channel, c.category)
            if not n:
                continue
            args += [c.member, "1" if (c.high and self.bypass_high) else "0", n, *limits]
            ks += [keys.rate(c.user_id, k) for k in rule_keys]
            pending.append(i)
        if pending:
            args[1] = len(pending)
            for i, ok in zip(pending, self._script(keys=ks, args=args), strict=True):
                results[i] = bool(ok)
        return results
