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

# One call checks a whole batch. The checks come in groups of one rule plan (the same rules: one
# (channel, category)), so each rule's window and limit go once per group, not once per check.
# ARGV: now, then per group: rule count n, n pairs (window ms, limit), check count c, the bypass
# flags of the c checks as one string of '0'/'1', then the c members. KEYS: the rule keys of every
# check, in order (n per check). Returns 1/0 per check, in that order.
_SCRIPT = """
-- Lua numbers handed to redis.call are formatted with '%.17g' (a float printf; a fifth of a
-- check's redis-server instructions, by callgrind): the score and the TTLs go as the strings they
-- came in as (nowa, wins)
local nowa = ARGV[1]
local now = tonumber(nowa)
local a = 2
local k = 1
local o = 1
local out = {}
local wins, limits, cuts = {}, {}, {}
while a <= #ARGV do
  local n = tonumber(ARGV[a])
  for i = 1, n do
    wins[i] = ARGV[a + 2 * i - 1]
    cuts[i] = string.format('%d', now - tonumber(wins[i]))  -- the trim bound, formatted once per group
    limits[i] = tonumber(ARGV[a + 2 * i])
  end
  a = a + 2 * n + 1
  local c = tonumber(ARGV[a])
  local flags = ARGV[a + 1]
  a = a + 2
  for j = 1, c do
    local member = ARGV[a]
    local bypass = string.byte(flags, j) == 49
    a = a + 1
    local ok = 1
    -- an empty window (the usual case in a blast: a first send to this user today) holds nothing
    -- to expire and cannot hold this member: one ZCARD instead of ZSCORE + ZREMRANGEBYSCORE + ZCARD
    local first = redis.call('ZCARD', KEYS[k])
    if first > 0 and redis.call('ZSCORE', KEYS[k], member) then
      ok = 2  -- admitted before (a rerun after a crash): count nothing again
    elseif not bypass then
      for i = 1, n do
        local card = first
        if i > 1 then card = redis.call('ZCARD', KEYS[k + i - 1]) end
        -- fewer members than the limit, expired or not: room, whatever the window holds. Only a set
        -- at its limit is trimmed (its expired members may make room); one under it keeps them a
        -- while (it stays bounded: it is trimmed when it reaches the limit, and the key expires)
        if card >= limits[i] then
          card = card - redis.call('ZREMRANGEBYSCORE', KEYS[k + i - 1], '-inf', cuts[i])
        end
        if card >= limits[i] then ok = 0; break end
      end
    end
    if ok == 1 then
      for i = 1, n do
        if bypass then redis.call('ZREMRANGEBYSCORE', KEYS[k + i - 1], '-inf', cuts[i]) end
        redis.call('ZADD', KEYS[k + i - 1], nowa, member)
        redis.call('PEXPIRE', KEYS[k + i - 1], wins[i])
      end
    end
    out[o] = ok > 0 and 1 or 0
    o = o + 1
    k = k + n
  end
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
        groups: dict[tuple[str, str], list[int]] = {}
        for i, c in enumerate(checks):
            g = groups.get((c.channel, c.category))
            if g is None:
                g = groups[(c.channel, c.category)] = []
            g.append(i)
        ks: list[str] = []
        args: list[int | str] = [now_ms]
        pending: list[int] = []
        bypass = self.bypass_high
        for plan_of, idx in groups.items():
            n, limits, rule_keys = self._plan(*plan_of)
            if not n:
                continue
            group = [checks[i] for i in idx]
            flags = "".join("1" if (c.high and bypass) else "0" for c in group)
            args += [n, *limits, len(idx), flags]
            args += [c.member for c in group]
            if n == 1:  # (the usual case) the key around the user id, worked out once per group
                head, _, tail = keys.rate("\x00", rule_keys[0]).partition("\x00")
                ks += [head + c.user_id + tail for c in group]
            else:
                ks += [keys.rate(c.user_id, k) for c in group for k in rule_keys]
            pending += idx
        if pending:
            for i, ok in zip(pending, self._script(keys=ks, args=args), strict=True):
                results[i] = bool(ok)
        return results
