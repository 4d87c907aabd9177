"""Pacing: send to a provider no faster than it allows, at a rate every worker shares.

A provider that rate-limits us answers 429 (or its own "slow down"). Instead of finding the
limit anew with every request, each provider has one pace in Redis (``keys.pace``), shared by
every worker and host, learned from those answers (AIMD):

- unpaced until the first throttle answer: nothing is held back;
- on a throttle answer the rate drops to what the provider accepted over the last second (95 %
  of it, and at most 85 % of the current rate), at most once a second (the answers of one
  overshoot arrive together); the first time, this starts the pace;
- every request accepted while the pace held something back raises the rate: quickly after a
  start (+0.5 req/s per request: +50 % a second), then slowly (+5 % a second), until the next
  throttle answer; a pace the provider has not throttled for ``memory`` seconds is forgotten.

Requests take tokens from a bucket refilled at the rate (holding ``burst`` seconds of it): one
Lua call takes as many as a batch may use now and says how long until the next. Both scripts
read Redis' clock, so that hosts share one timeline. A request is what the provider sends in one
call: one per message, except for providers that group messages (``Provider.requests``).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from notifyctl import keys

# KEYS[1] the pace; ARGV: requests wanted, bucket size in seconds of the rate.
# Returns {granted, seconds until the next token (string)}.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = tonumber(ARGV[1])
local h = redis.call('HMGET', KEYS[1], 'rate', 'tokens', 'ts')
local rate = tonumber(h[1] or '') or 0
if rate <= 0 then return {n, '0'} end
local cap = math.max(1, rate * tonumber(ARGV[2]))
local tokens = tonumber(h[2] or '') or cap
local ts = tonumber(h[3] or '') or now
tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
local g = math.min(n, math.floor(tokens))
tokens = tokens - g
local wait = 0
if g < n then
  wait = (1 - tokens) / rate
  redis.call('HSET', KEYS[1], 'limited', now)
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
return {g, tostring(wait)}
"""

# KEYS[1] the pace; ARGV: requests accepted, requests throttled, lowest rate, memory (s).
# Returns the rate (string; '0' = unpaced).
_RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ok, thr = tonumber(ARGV[1]), tonumber(ARGV[2])
local h = redis.call('HMGET', KEYS[1], 'rate', 'win', 'cnt', 'prev', 'limited', 'last_drop', 'phase')
local rate = tonumber(h[1] or '') or 0
local win, cnt, prev = tonumber(h[2] or '') or 0, tonumber(h[3] or '') or 0, tonumber(h[4] or '') or 0
local sec = math.floor(now)
if win ~= sec then
  if win == sec - 1 then prev = cnt else prev = 0 end
  cnt, win = 0, sec
end
cnt = cnt + ok
if ok > 0 and rate > 0 and now - (tonumber(h[5] or '') or 0) < 1 then
  local step = 0.05
  if h[7] == 'start' then step = 0.5 end
  rate = rate + step * ok
end
local fields = {'win', win, 'cnt', cnt, 'prev', prev}
if thr > 0 then
  local seen = math.max(prev, cnt)
  if now - (tonumber(h[6] or '') or 0) >= 1 then
    local was = rate
    if rate <= 0 then
      rate = 0.95 * seen
      table.insert(fields, 'phase') table.insert(fields, 'start')
    else
      rate = math.min(rate * 0.85, math.max(0.95 * seen, rate * 0.5))
      table.insert(fields, 'phase') table.insert(fields, 'steady')
    end
    rate = math.max(tonumber(ARGV[3]), rate)
    table.insert(fields, 'last_drop') table.insert(fields, now)
  end
  table.insert(fields, 'tokens') table.insert(fields, 0)
  table.insert(fields, 'ts') table.insert(fields, now)
  redis.call('HSET', KEYS[1], 'rate', rate, unpack(fields))
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
elseif rate > 0 then
  redis.call('HSET', KEYS[1], 'rate', rate, unpack(fields))
else
  -- unpaced: only the count of what was accepted, for the first throttle answer to start from
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('EXPIRE', KEYS[1], 5)
end
return tostring(rate)
"""


class Pacer:
    """The shared pace of each provider (see the module's docstring)."""

    def __init__(self, client: redis.Redis, burst: float = 0.25, floor: float = 0.5, memory: int = 3600) -> None:
        self.client = client
        self.burst = burst
        self.floor = floor
        self.memory = memory
        self._take = client.register_script(_TAKE)
        self._record = client.register_script(_RECORD)

    def take(self, provider: str, requests: int) -> tuple[int, float]:
        """How many of ``requests`` may go now, and seconds until the next one may (0 if all may)."""
        granted, wait = self._take(keys=[keys.pace(provider)], args=[requests, self.burst])
        return int(granted), float(wait)

    def record(self, provider: str, accepted: int, throttled: int) -> float:
        """What the provider answered to the requests of one call; returns the rate (0 = unpaced)."""
        rate = self._record(keys=[keys.pace(provider)], args=[accepted, throttled, self.floor, self.memory])
        return float(rate)

    def rate(self, provider: str) -> float | None:
        return self.rates([provider])[provider]

    def rates(self, providers: Sequence[str]) -> dict[str, float | None]:
        """Requests/s each provider is paced at; None for an unpaced one. One round trip."""
        pipe = self.client.pipeline(transaction=False)
        for p in providers:
            pipe.hget(keys.pace(p), "rate")
        out: dict[str, float | None] = {}
        for p, raw in zip(providers, pipe.execute(), strict=True):
            rate = float(raw) if raw else 0.0
            out[p] = rate if rate > 0 else None
        return out
