"""When each recipient's notification goes out.

Every recipient gets a *nominal instant* (UTC), computed once per time zone:

- ``--send-at T``: T; without it (and without ``--stagger-tz``): the launch time;
- ``--stagger-tz --local-time HH:MM``: HH:MM wall-clock time, today in the recipient's zone (the
  zone's date at launch time); if that has already passed, tomorrow at HH:MM (``--if-passed
  tomorrow``) or right away (``--if-passed now``);
- then quiet hours (``21:00-08:00``, local): a nominal instant inside them moves to their end.

Local times are converted deliberately around DST changes:

- a *nonexistent* time (in the spring-forward gap, e.g. 02:30 on the night clocks jump from 02:00
  to 03:00) is moved forward by the gap: 02:30 becomes 03:30 new time (PEP 495 ``fold=0``:
  the offset in force before the transition);
- an *ambiguous* time (in the fall-back overlap, e.g. 01:30 happens twice) is the first
  occurrence (still summer time): a recipient gets it once, at the earlier instant.

Recipients sharing a nominal instant form a *wave*. With a rate, waves are laid end to end in
time order (a wave starts at its instant or when the previous one ends, whichever is later) and
recipient k of a wave is due at ``start + k / rate``: the produced rate never exceeds ``rate``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from notifyctl.errors import InputError

_HHMM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


def parse_hhmm(text: str, flag: str) -> time:
    m = _HHMM.match((text or "").strip())
    if not m:
        raise InputError(f"{flag}: expected a 24-hour time HH:MM such as 10:00, got {text!r}")
    return time(int(m.group(1)), int(m.group(2)))


def parse_quiet_hours(text: str, flag: str = "--quiet-hours") -> tuple[time, time]:
    parts = (text or "").split("-")
    if len(parts) != 2:
        raise InputError(f"{flag}: expected START-END such as 21:00-08:00, got {text!r}")
    start, end = parse_hhmm(parts[0], flag), parse_hhmm(parts[1], flag)
    if start == end:
        raise InputError(f"{flag}: start and end are equal ({text!r}); that would be quiet all day or never")
    return start, end


def parse_send_at(text: str, now: datetime) -> datetime:
    """ISO 8601; without an offset the time is UTC. Refuses times more than a minute in the past."""
    try:
        dt = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise InputError(f"--send-at: not an ISO 8601 time (e.g. 2025-06-01T09:00:00+02:00), got {text!r}") from None
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    if dt < now - timedelta(minutes=1):
        raise InputError(f"--send-at: {dt.isoformat()} is in the past")
    return dt


@lru_cache(maxsize=4096)
def zone(name: str | None) -> ZoneInfo | None:
    """The IANA zone, or None when the name is unknown or malformed."""
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def local_instant(d: date, t: time, tz: ZoneInfo) -> datetime:
    """Wall-clock ``d t`` in ``tz`` as an aware UTC instant; gaps move forward, overlaps take the first."""
    return datetime.combine(d, t).replace(tzinfo=tz, fold=0).astimezone(UTC)


def in_quiet(t: time, quiet: tuple[time, time]) -> bool:
    start, end = quiet
    if start < end:
        return start <= t < end
    return t >= start or t < end  # crosses midnight


def defer_quiet(instant: datetime, tz: ZoneInfo, quiet: tuple[time, time]) -> datetime:
    """The first allowed instant at or after ``instant`` for a recipient in ``tz``."""
    local = instant.astimezone(tz)
    t = local.time().replace(tzinfo=None)
    if not in_quiet(t, quiet):
        return instant
    start, end = quiet
    d = local.date()
    if start > end and t >= start:  # evening part of a window crossing midnight: ends tomorrow
        d += timedelta(days=1)
    return max(instant, local_instant(d, end, tz))


@dataclass
class Schedule:
    """The nominal instant for each time zone, cached per zone name."""

    now: datetime
    default_tz: str
    send_at: datetime | None = None
    local_time: time | None = None  # set = --stagger-tz
    if_passed: str = "tomorrow"
    quiet: tuple[time, time] | None = None
    fallbacks: int = 0  # recipients whose zone was unknown
    _cache: dict[str | None, tuple[datetime, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if zone(self.default_tz) is None:
            raise InputError(f"default_timezone {self.default_tz!r}: not an IANA time zone")

    def instant(self, tz_name: str | None, recipients: int = 1) -> tuple[datetime, str]:
        """(nominal instant, the zone actually used) for ``recipients`` whose zone is ``tz_name``."""
        hit = self._cache.get(tz_name)
        if hit is None:
            tz = zone(tz_name)
            used = tz_name if tz is not None else self.default_tz
            tz = tz or zone(self.default_tz)
            assert tz is not None
            hit = self._cache[tz_name] = (self._compute(tz), str(used))
        if hit[1] != tz_name:
            self.fallbacks += recipients
        return hit

    def fixed_instant(self) -> datetime | None:
        """Every recipient's instant when it does not depend on their zone (no ``--stagger-tz``, no
        quiet hours: ``--send-at`` or now), else None."""
        if self.local_time is None and self.quiet is None:
            return self.send_at or self.now
        return None

    def _compute(self, tz: ZoneInfo) -> datetime:
        if self.local_time is not None:
            today = self.now.astimezone(tz).date()
            at = local_instant(today, self.local_time, tz)
            if at < self.now and self.if_passed == "tomorrow":
                at = local_instant(today + timedelta(days=1), self.local_time, tz)
            elif at < self.now:
                at = self.now
        else:
            at = self.send_at or self.now
        if self.quiet:
            at = defer_quiet(at, tz, self.quiet)
        return at


@dataclass
class Wave:
    instant: datetime
    start: datetime
    recipients: int
    rate: float | None
    timezones: list[str] = field(default_factory=list)

    @property
    def end(self) -> datetime:
        if not self.rate:
            return self.start
        return self.start + timedelta(seconds=self.recipients / self.rate)

    def due(self, k: int) -> datetime:
        return self.start if not self.rate else self.start + timedelta(seconds=k / self.rate)

    def to_dict(self) -> dict[str, Any]:
        return {
            "instant": self.instant.isoformat(),
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "recipients": self.recipients,
            "timezones": self.timezones,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], rate: float | None) -> Wave:
        return cls(
            instant=datetime.fromisoformat(d["instant"]),
            start=datetime.fromisoformat(d["start"]),
            recipients=int(d["recipients"]),
            rate=rate,
            timezones=list(d.get("timezones", [])),
        )


MAX_WAVE_ZONES = 12


def plan_waves(counts: dict[datetime, int], zones: dict[datetime, set[str]], rate: float | None) -> list[Wave]:
    """Waves in time order, end to end when a rate is set."""
    waves: list[Wave] = []
    cursor: datetime | None = None
    for instant in sorted(counts):
        start = instant if cursor is None or not rate else max(instant, cursor)
        tzs = sorted(zones.get(instant, ()))
        if len(tzs) > MAX_WAVE_ZONES:
            tzs = [*tzs[:MAX_WAVE_ZONES], f"+{len(tzs) - MAX_WAVE_ZONES} more"]
        w = Wave(instant, start, counts[instant], rate, tzs)
        waves.append(w)
        cursor = w.end
    return waves
