"""Pacing: send to a provider no faster than it allows, at a rate every worker shares.

A provider that rate-limits us answers 429 (or its own "slow down"). Instead of finding the
limit anew with every request, each provider has one pace in Redis (``keys.pace``), shared by
every worker and host, learned from those answers (AIMD):

- unpaced until the first throttle answer: nothing is held back;
- the first throttle answer starts the pace at what the provider accepted over the last second
  (95 % of it; the pool's other answers to the same overshoot can only raise it). That is what one
  burst got through, not yet a rate: every request accepted while the pace held something back
  then adds 1 req/s (+100 % a second), until the next throttle answer;
- a later throttle answer (at most one a second: the answers of one overshoot arrive together)
  marks the rate it came at: the *ceiling*, what the provider accepted over the last second (at
  most the current rate; at least half of it the first time, 90 % after). The rate drops to 95 %
  of it and, while the pace holds requests back, returns to 97 % of it (+10 % a second);
- what the provider accepted over a second counts, besides its rate, what its bucket held at the
  start of that second: up to its burst (what the first answers got through). The slow start
  ended a second after the pace was under the provider's rate, its bucket full: the first
  ceiling is that second's count less the burst (a floor: an overshooting first ceiling costs a
  429 a second until a later one finds the rate);
- after the first ceiling the rate creeps up (+10 % a second) until the next throttle answer,
  which confirms it: the provider's bucket was empty at both answers, so what it accepted between
  them is its rate (at most the last second's count; the creep's overshoot does not count); after
  that it stays at 97 % of the ceiling for ``quiet`` seconds after the ceiling was last set, and
  only then creeps up again (a provider that raised its limit). So a paced pool keeps just under
  what the provider allows instead of overshooting it every few seconds (each overshoot costs
  429s, and each throttled request waits its ``Retry-After``);
- a lone throttle answer while the rate holds under a confirmed ceiling (requests that reached
  the provider bunched together: a stalled network or host) lowers the rate 5 % but keeps the
  ceiling, so the rate returns to it; only a second one within 3 s lowers the ceiling, by 5 %
  (a loaded host's jitter must not ratchet the pace down; what it does lower, the creep after
  ``quiet`` seconds brings back);
- a pace the provider has not throttled for ``memory`` seconds is forgotten.

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

# KEYS[1] the pace; ARGV: requests accepted, requests throttled, lowest rate, memory (s), quiet (s).
# Returns the rate (string; '0' = unpaced).
_RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ok, thr = tonumber(ARGV[1]), tonumber(ARGV[2])
local h = redis.call('HMGET', KEYS[1], 'rate', 'win', 'cnt', 'prev', 'limited', 'last_drop', 'phase', 'ceil', 'ceil_at',
                     'burst', 'p_at', 'p_cnt')
local rate = tonumber(h[1] or '') or 0
local win, cnt, prev = tonumber(h[2] or '') or 0, tonumber(h[3] or '') or 0, tonumber(h[4] or '') or 0
local last_drop = tonumber(h[6] or '') or 0
local ceil = tonumber(h[8] or '') or 0
local ceil_at = tonumber(h[9] or '') or 0
local burst = tonumber(h[10] or '') or 0
local p_at, p_cnt = tonumber(h[11] or '') or 0, (tonumber(h[12] or '') or 0) + ok
local sec = math.floor(now)
if win ~= sec then
  if win == sec - 1 then prev = cnt else prev = 0 end
  cnt, win = 0, sec
end
cnt = cnt + ok
if ok > 0 and rate > 0 and now - (tonumber(h[5] or '') or 0) < 1 then
  if h[7] == 'start' then
    rate = rate + ok
  elseif h[7] == 'probe' then
    -- (from a first ceiling that is a floor: what it overshoots the next answer does not count)
    rate = rate + 0.1 * ok
  elseif rate < 0.97 * ceil then
    rate = math.min(0.97 * ceil, rate + 0.1 * ok)
  elseif now - ceil_at >= tonumber(ARGV[5]) then
    rate = rate + 0.05 * ok
  end
end
local fields = {'win', win, 'cnt', cnt, 'prev', prev}
if h[7] == 'probe' then table.insert(fields, 'p_cnt') table.insert(fields, p_cnt) end
if thr > 0 then
  -- accepted over the last second: this second's count and the part of the last one still in it
  local seen = cnt + prev * (1 - (now - sec))
  if now - last_drop >= 1 then
    if rate <= 0 then
      -- (a burst's count, which the steps above soon correct: the larger reading of the two)
      rate = 0.95 * math.max(seen, prev)
      table.insert(fields, 'phase') table.insert(fields, 'start')
      table.insert(fields, 'burst') table.insert(fields, math.max(seen, prev))
    else
      -- a second the pool partly idled in (a stalled worker, then a burst) reads low: once the
      -- ceiling was confirmed it is trusted down to 90 % of the rate (a drop is then 5-15 %; a
      -- provider that halved its limit takes 5 drops), the first one down to half
      local low, phase = 0.9, 'steady'
      if h[7] == 'start' then low, phase = 0.5, 'probe' end
      local under = h[7] == 'steady' and rate <= 0.97 * ceil * 1.0001
      if under and now - last_drop >= 3 then
        -- a lone answer under a confirmed ceiling (requests that reached the provider bunched
        -- together): the rate drops, the ceiling stays; a second one within 3 s lowers it 5 %
        rate = 0.95 * rate
      else
        if under then
          ceil = math.max(math.min(seen, rate), 0.95 * ceil)
        elseif h[7] == 'start' then
          -- the end of the slow start: the second before it began with the provider's bucket full
          -- (the pace was under its rate), so what it accepted then counts that bucket once more
          -- than its rate: the burst the first answers revealed comes off
          ceil = math.max(math.min(seen - burst, rate), low * rate)
          table.insert(fields, 'p_at') table.insert(fields, now)
          table.insert(fields, 'p_cnt') table.insert(fields, 0)
        elseif h[7] == 'probe' and p_at > 0 and now - p_at >= 1 then
          -- the end of the probe: the provider's bucket was empty at its start (a throttle answer)
          -- and is again, so what it accepted in between is its rate over that time (less what the
          -- pool left unused); the last second's count, which also counts what the bucket held when
          -- that second began, is no lower (an idle second reads low: the larger one, 90 % of it)
          local est = p_cnt / (now - p_at)
          ceil = math.max(math.min(est, seen, rate), low * math.min(math.max(est, seen), rate))
        else
          ceil = math.max(math.min(seen, rate), low * rate)
        end
        rate = 0.95 * ceil
        table.insert(fields, 'ceil_at') table.insert(fields, now)
      end
      table.insert(fields, 'phase') table.insert(fields, phase)
      table.insert(fields, 'ceil') table.insert(fields, ceil)
    end
    rate = math.max(tonumber(ARGV[3]), rate)
    table.insert(fields, 'last_drop') table.insert(fields, now)
  elseif h[7] == 'start' then
    -- the pool's answers to the first overshoot: the first one counted only what came before it
    rate = math.max(rate, 0.95 * math.max(seen, prev))
    table.insert(fields, 'burst') table.insert(fields, math.max(burst, seen, prev))
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

    def __init__(
        self, client: redis.Redis, burst: float = 0.25, floor: float = 0.5, memory: int = 3600, quiet: float = 30.0
    ) -> None:
        self.client = client
        self.burst = burst
        self.floor = floor
        self.memory = memory
        self.quiet = quiet
        self._take = client.register_script(_TAKE)
        self._record = client.register_script(_RECORD)

    def take(self, provider: str, requests: int) -> tuple[int, float]:
        """How many of ``requests`` may go now, and seconds until the next one may (0 if all may)."""
        granted, wait = self._take(keys=[keys.pace(provider)], args=[requests, self.burst])
        return int(granted), float(wait)

    def record(self, provider: str, accepted: int, throttled: int) -> float:
        """What the provider answered to the requests of one call; returns the rate (0 = unpaced)."""
        rate = self._record(keys=[keys.pace(provider)], args=[accepted, throttled, self.floor, self.memory, self.quiet])
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
