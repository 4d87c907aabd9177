"""The plan pass of a launch: reads the segment once, resolves users and time zones, counts each
wave, checks the template against the first recipient (``plan_pass``; ``OnePass``, the same a chunk
at a time inside the write pass, for a launch of one instant); ``SeenSet`` finds the users a
segment repeats.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

import orjson
from sqlmodel import Session

from campaigns.resolve import Progress, Resolved, check_template, stream, user_tz
from campaigns.schedule import Wave, plan_waves
from campaigns.segments import BadRows, SegmentRow
from notifyctl.context import Context


@dataclass
class Plan:
    rows: int = 0  # segment rows read (good and bad)
    recipients: int = 0  # rows with a known user (duplicates included: each holds a schedule slot)
    counts: dict[datetime, int] = field(default_factory=lambda: defaultdict(int))
    zones: dict[datetime, set[str]] = field(default_factory=lambda: defaultdict(set))
    duplicates: BadRows = field(default_factory=BadRows)  # rows of a user already in the segment
    # for the write pass of the same launch (``produce``): the rows to skip (unknown users and
    # duplicates, in ``seen``, which its caller closes)
    seen: SeenSet | None = None
    skips: int = 0
    checked: bool = False  # the first recipient's rendering was checked


UNKNOWN = "unknown_user"  # the kinds of rows a write pass skips (``SeenSet.skips``)
DUPLICATE = "duplicate"


def mark_duplicate(bad: BadRows, row: SegmentRow, first_line: int) -> None:
    bad.add(row.line, DUPLICATE, f"user {row.user_id!r} is also on line {first_line}; that first row is kept")


def plan_pass(ctx: Context, res: Resolved, bad: BadRows, progress: Progress | None) -> Plan:
    """The plan; its ``seen`` (open) holds the rows of unknown users and those repeating a user,
    which the write pass skips (``produce``): the caller closes it."""
    plan = Plan(duplicates=BadRows(keep=bad.keep))
    seen = SeenSet()
    try:
        with Session(ctx.engine) as session:
            for chunk in stream(res, bad):
                skips = plan_chunk(session, res, plan, seen, bad, chunk)
                if skips:
                    seen.keep_skips([(line, u, kind) for line, (u, kind) in skips.items()])
                    plan.skips += len(skips)
                if progress:
                    progress("plan", plan.rows, None)
    except BaseException:
        seen.close()
        raise
    plan.seen = seen
    return plan


def plan_chunk(
    session: Session, res: Resolved, plan: Plan, seen: SeenSet, bad: BadRows, chunk: list[SegmentRow]
) -> dict[int, tuple[str, str]]:
    """One chunk of the plan, counted into ``plan``; the first recipient's rendering checked. Returns
    the chunk's rows to skip, ``{line: (user id, UNKNOWN or DUPLICATE)}`` (unknown users also go to
    ``bad``, repeats to ``plan.duplicates``)."""
    plan.rows += len(chunk)
    tzs = user_tz(session, list({r.user_id for r in chunk}))
    repeats = seen.duplicates([r for r in chunk if r.user_id in tzs])
    skips = {r.line: (r.user_id, UNKNOWN if r.user_id not in tzs else DUPLICATE)
             for r in chunk if r.user_id not in tzs or id(r) in repeats}  # fmt: skip
    zones: list[str] = []  # the known rows' zones (repeats too hold a slot), counted per zone below
    for r in chunk:
        tz = tzs.get(r.user_id)
        if tz is None:
            bad.add(r.line, UNKNOWN, f"unknown user {r.user_id!r}")
            continue
        if id(r) in repeats:
            mark_duplicate(plan.duplicates, r, repeats[id(r)])
        elif not plan.checked:
            check_template(res, session, r)
            plan.checked = True
        zones.append(tz)
    for tz, k in Counter(zones).items():  # (in the order the zones came: the instants' too)
        instant, used = res.schedule.instant(tz, k)
        plan.counts[instant] += k
        plan.zones[instant].add(used)
    plan.recipients += len(zones)
    return skips


class OnePass:
    """The plan of a first launch whose recipients all share one instant (``Schedule.fixed_instant``:
    sent now or ``--send-at``, no ``--stagger-tz``, no quiet hours), made a chunk at a time as the
    write pass reads the segment, instead of a pass of its own over it: its single wave does not
    depend on how many it holds. ``start`` reads (and plans) until a chunk has a recipient, so that
    the campaign row is made only for a segment with one; ``chunks`` gives that chunk, then the
    rest, each planned by ``skips`` with the write pass's session. ``close`` it."""

    def __init__(self, res: Resolved, bad: BadRows, shards: int) -> None:
        self.res = res
        self.bad = bad
        self.plan = Plan(duplicates=BadRows(keep=bad.keep))
        self.seen = SeenSet()
        self._rest = stream(res, bad, shards)
        self._first: tuple[list[SegmentRow], dict[int, tuple[str, str]]] | None = None

    def start(self, ctx: Context, progress: Progress | None) -> bool:
        """Plan chunks until one holds a recipient (False: the segment has none)."""
        for chunk in self._rest:
            with Session(ctx.engine) as session:  # (a read transaction per chunk, not held)
                skips = plan_chunk(session, self.res, self.plan, self.seen, self.bad, chunk)
            if progress:
                progress("plan", self.plan.rows, None)
            if self.plan.recipients:
                self._first = (chunk, skips)
                return True
        return False

    def chunks(self) -> Iterator[list[SegmentRow]]:
        if self._first is not None:
            yield self._first[0]
        yield from self._rest

    def skips(self, session: Session, chunk: list[SegmentRow]) -> dict[int, tuple[str, str]]:
        if self._first is not None and chunk is self._first[0]:
            skips = self._first[1]
            self._first = None
            return skips
        return plan_chunk(session, self.res, self.plan, self.seen, self.bad, chunk)

    def waves(self) -> list[Wave]:
        return plan_waves(self.plan.counts, self.plan.zones, self.res.rate)

    def close(self) -> None:
        close = getattr(self._rest, "close", None)  # (the segment file, when a launch stops before its end)
        if close is not None:
            close()
        self.seen.close()


class SeenSet:
    """The user ids of a segment read so far, with the line each was first on: an exact set that
    keeps memory flat whatever the segment size (a throwaway SQLite table in a temporary file,
    asked and filled once per chunk); and, for a launch's write pass, the rows it is to skip
    (``keep_skips``, ``skips``)."""

    def __init__(self) -> None:
        import sqlite3
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="notify-segment-")
        self._db = sqlite3.connect(f"{self._dir.name}/seen.db")
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE seen (user_id TEXT PRIMARY KEY, line INTEGER) WITHOUT ROWID")
        self._db.execute("CREATE TABLE skips (line INTEGER PRIMARY KEY, user_id TEXT, kind TEXT)")

    def duplicates(self, rows: list[SegmentRow]) -> dict[int, int]:
        """``{id(row): line of the user's first row}`` for the rows (of one chunk, in segment order)
        whose user came earlier in the segment; records the others. One ``INSERT OR IGNORE`` a
        chunk, its rows one JSON object (``json_each``: 0.9 -> 0.35 µs a row against an
        ``executemany`` of pairs): only when it skipped some (a user of an earlier chunk) are their
        lines read."""
        out: dict[int, int] = {}
        new: dict[str, int] = {}
        for r in rows:
            line = new.setdefault(r.user_id, r.line)
            if line != r.line:
                out[id(r)] = line
        before = self._db.total_changes
        pairs = orjson.dumps(new).decode()  # {user id: line}
        self._db.execute("INSERT OR IGNORE INTO seen SELECT key, value FROM json_each(?)", (pairs,))
        if self._db.total_changes - before == len(new):
            return out
        ids = list(new)
        earlier: dict[str, int] = {}
        for i in range(0, len(ids), 900):
            part = ids[i : i + 900]
            q = f"SELECT user_id, line FROM seen WHERE user_id IN ({','.join('?' * len(part))})"
            earlier.update((u, line) for u, line in self._db.execute(q, part) if line != new[u])
        for r in rows:
            first = earlier.get(r.user_id)
            if first is not None:
                out[id(r)] = first
        return out

    def keep_skips(self, rows: list[tuple[int, str, str]]) -> None:
        """Record rows to skip, as (line, user id, ``UNKNOWN`` or ``DUPLICATE``)."""
        self._db.executemany("INSERT INTO skips VALUES (?, ?, ?)", rows)

    def skips(self, first: int, last: int) -> dict[int, tuple[str, str]]:
        """The rows to skip recorded between lines ``first`` and ``last``: {line: (user id, kind)}."""
        q = "SELECT line, user_id, kind FROM skips WHERE line BETWEEN ? AND ?"
        return {line: (u, kind) for line, u, kind in self._db.execute(q, (first, last))}

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()
