"""The write pass of a launch: bulk inserts (PostgreSQL COPY), one statement per chunk, skipping
the recipients a campaign already has (a relaunch); the rows already due are queued by the
launcher itself, enqueued after the commit, within the campaign's rate (``_produce_due``, ``_Pace``),
one job per Redis shard.

One module: a chunk's insert, its commit and the enqueue of its due rows are one ordered step
(committed before enqueued, so a crash between them loses nothing), with the pace that spaces them.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from operator import itemgetter
from typing import Any, cast

import redis
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from campaigns.plan import DUPLICATE, UNKNOWN, OnePass, Plan
from campaigns.report import current_state
from campaigns.resolve import Progress, Resolved, stream, user_tz
from campaigns.schedule import Wave, plan_waves
from campaigns.segments import BadRows
from notifyctl.bulk import prepare_counted_insert, rows_where_in, update_where_in
from notifyctl.context import Context
from notifyctl.db import write_lock
from notifyctl.ids import new_ids
from notifyctl.intake import enqueue
from notifyctl.models import Campaign, CampaignStatus, Notification, NotificationStatus, new_id, utcnow
from notifyctl.pgstats import analyze_grown
from notifyctl.shards import split

log = logging.getLogger("notifyctl.campaigns")

_NT = Notification.__table__  # type: ignore[attr-defined]
_CT = Campaign.__table__  # type: ignore[attr-defined]


_SAFE_ID = re.compile(r"^[A-Za-z0-9_]+$")


def _already_written(session: Session, cid: str, ids: list[str]) -> set[str]:
    """The users of ``ids`` the campaign has a notification for (a relaunch)."""
    if not _SAFE_ID.match(cid):  # (our own ids: written into the statement)
        raise ValueError(f"not a campaign id: {cid!r}")
    sql = "SELECT recipient_id FROM notifications"
    return {r[0] for r in rows_where_in(session.connection(), sql, "recipient_id", ids, f"AND campaign_id = '{cid}'")}


def produce(
    ctx: Context,
    cid: str,
    res: Resolved,
    waves: list[Wave],
    planned: int,
    *,
    run_now: datetime,
    progress: Progress | None,
    duplicates: BadRows | None = None,
    fresh: Plan | None = None,
    one_pass: OnePass | None = None,
    recount: bool = False,
) -> dict[str, Any]:
    """Write the recipients not written yet. ``duplicates``: the rows the plan pass found to repeat
    a user (reported with the bad rows; like rows already written, they are skipped here).

    ``fresh``: a first launch's plan pass, for a campaign made just before this pass and so without
    rows yet: the rows to skip are the duplicates it recorded, and the campaign's rows are not
    looked up (a relaunch looks them up a chunk at a time). A row written meanwhile all the same (a
    relaunch run beside the launch) is skipped by the unique index.

    ``one_pass``: a first launch of one instant, planned here a chunk at a time (``OnePass``): the
    campaign's plan and planned count are those written so far, marked ``counting`` in its summary,
    until the pass ends. ``recount``: the relaunch of such a launch cut short counts them anew."""
    bad = one_pass.bad if one_pass is not None else BadRows(keep=res.cfg.max_reported_errors)
    count = one_pass.plan if one_pass is not None else Plan() if recount else None
    fixed = res.schedule.fixed_instant()
    fixed_at = cast(datetime, fixed)  # (a one-pass launch's instant, set whenever its rows read it)
    first_chunk = True
    by_instant = {w.instant: w for w in waves}
    wave_of = {w.instant: i for i, w in enumerate(waves)}  # Notification.wave: the index in the plan
    slot: Counter[datetime] = Counter()
    started = utcnow()
    shift = timedelta(0)
    data0 = res.spec["data"]
    # a row's columns of one value for the whole launch (and its chunk's timestamps), given once
    shared = {"type": res.template.id, "template_id": res.template.id, "category": res.category,
              "priority": res.priority, "channels": res.channels, "campaign_id": cid}  # fmt: skip
    written = skipped = seen_rows = 0
    first_due: datetime | None = None
    last_due: datetime | None = None
    state: str = CampaignStatus.active
    canceled = False
    batch = max(1, ctx.settings.batch_size)
    pace = _Pace(res.rate)
    next_analyze = 0.0
    total = None if one_pass is not None else planned
    if progress:
        progress("write", 0, total)
    # one connection for the whole pass (a Session on the engine gave its connection back at each
    # commit and checked one out again for the next chunk: PostgreSQL's pre-ping, a round trip, a chunk)
    with ctx.engine.connect() as conn, Session(bind=conn) as session:
        for chunk in one_pass.chunks() if one_pass is not None else stream(res, bad, ctx.shard_count):
            current = _status(session, cid)
            if current != state:
                state = current
                _sync_rows(session, cid, state)
            if state == CampaignStatus.canceled:
                canceled = True
                break
            row_status = NotificationStatus.paused if state == CampaignStatus.paused else NotificationStatus.scheduled
            if first_chunk and one_pass is None:
                res.schedule.fallbacks = 0  # counted again by this pass
            first_chunk = False
            skips: dict[int, tuple[str, str]] = {}
            tzs: dict[str, str] | None = None
            if one_pass is not None:
                existing = set()
                skips = one_pass.skips(session, chunk)  # (its unknown users reported there)
            elif fresh is None:
                ids = list({r.user_id for r in chunk})
                tzs = user_tz(session, ids)
                existing = _already_written(session, cid, ids)
            else:
                existing = set()
                if fresh.skips and fresh.seen is not None:
                    skips = fresh.seen.skips(chunk[0].line, chunk[-1].line)
                tzs = user_tz(session, list({r.user_id for r in chunk}))
            now = utcnow()
            rows: list[dict[str, Any]] = []
            floor = run_now + (now - started) - _SECOND  # (the chunk's clock: the same for its rows)
            next_id = iter(new_ids("n", len(chunk))).__next__
            for r in chunk:
                skip = skips.get(r.line) if skips else None
                if skip is not None and skip[0] != r.user_id:  # (the segment changed: the row is another)
                    skip = None
                if tzs is None:  # (one_pass: planned with its users)
                    if skip is not None and skip[1] == UNKNOWN:
                        if one_pass is None:
                            bad.add(r.line, UNKNOWN, f"unknown user {r.user_id!r}")
                        continue
                    instant = fixed_at
                else:
                    tz = tzs.get(r.user_id)
                    if tz is None:
                        bad.add(r.line, UNKNOWN, f"unknown user {r.user_id!r}")
                        continue
                    instant, used = res.schedule.instant(tz)
                    if recount and count is not None:
                        count.counts[instant] += 1
                        count.zones[instant].add(used)
                seen_rows += 1
                w = by_instant.get(instant)
                if w is None:  # the segment changed since the plan: a wave of its own
                    w = by_instant[instant] = Wave(instant, instant, 0, res.rate)
                    wave_of[instant] = len(wave_of)
                k = slot[instant]
                slot[instant] = k + 1
                # Wave.due(k), its arithmetic as is (a relaunch must give each row the same due_at), inline
                nominal = w.start + timedelta(seconds=k / w.rate) if w.rate else w.start
                if r.user_id in existing or (skip is not None and skip[1] == DUPLICATE):
                    skipped += 1
                    continue
                existing.add(r.user_id)
                # A slot that has already passed when its row is written (the launcher was down, or the
                # segment was still being read) moves, with every row after it, by the same shift: the
                # schedule keeps its spacing, so the workers never get a backlog to produce faster than
                # --rate. (The launch's clock: run_now may be injected; a second's slack is the
                # reconciler's own period.)
                due = nominal + shift if shift else nominal
                if due < floor:
                    shift = floor + _SECOND - nominal
                    due = nominal + shift
                rows.append(
                    {
                        "id": next_id(),
                        "recipient_id": r.user_id,
                        "data": {**data0, **r.extras} if r.extras else data0,
                        "dedup_key": f"campaign:{cid}:{r.user_id}",
                        "wave": wave_of[instant],
                        "status": row_status,
                        "job_id": None,
                        "due_at": due,
                    }
                )
            if rows:
                dues = list(map(itemgetter("due_at"), rows))
                lo, hi = min(dues), max(dues)
                first_due = lo if first_due is None or lo < first_due else first_due
                last_due = hi if last_due is None or hi > last_due else last_due
            jobs = (
                _produce_due(rows, now, batch, pace, ctx.shard_count)
                if row_status == NotificationStatus.scheduled
                else []
            )
            # under the SQLite writer lock, so that a launch never makes the workers' and an OTP's
            # writes wait on SQLite's busy-sleep
            # parameters converted before the lock; a row the campaign already has is skipped
            insert_rows = _insert_new(ctx.engine, rows, {**shared, "created_at": now, "updated_at": now})
            with write_lock(ctx.engine):
                inserted = insert_rows(session)
                if one_pass is not None:  # the plan so far, as its rows
                    so_far = {"plan": [w.to_dict() for w in one_pass.waves()],
                              "summary": {"planned": one_pass.plan.recipients, "counting": True}}  # fmt: skip
                    update_where_in(session.connection(), _CT, so_far, "id", [cid])
                session.commit()
            _enqueue_due(ctx, res.priority, jobs)
            inserted = len(rows) if inserted < 0 else inserted
            written += inserted
            skipped += len(rows) - inserted  # rows another writer had written meanwhile: the unique index skipped them
            if time.monotonic() >= next_analyze:  # PostgreSQL: once the table doubled (looked at once a second:
                # each look is a pg_stat query and a connection checkout, measured ~1 µs a row per 1,000-row chunk)
                analyze_grown(ctx.engine, ("notifications",))
                next_analyze = time.monotonic() + 1.0
            if progress:
                progress("write", seen_rows, total)
        current = _status(session, cid)
        if current != state:
            _sync_rows(session, cid, current)
            canceled = canceled or current == CampaignStatus.canceled
        dups = duplicates.count if duplicates is not None else 0
        if duplicates is not None:
            bad.merge(duplicates)
        if count is not None:
            planned = count.recipients = seen_rows  # (every known row: repeats too hold a slot)
        summary = {
            "campaign_id": cid,
            "planned": planned,
            "rows": seen_rows + bad.count - dups,
            "recipients": seen_rows - dups,
            "written": written,
            "duplicates": dups,
            "skipped_existing": skipped - dups,
            "bad_rows": bad.to_dict(),
            "first_due": first_due.isoformat() if first_due else None,
            "last_due": last_due.isoformat() if last_due else None,
            "canceled": canceled,
            "timezone_fallbacks": res.schedule.fallbacks,
        }
        finished = utcnow()
        waves = plan_waves(count.counts, count.zones, res.rate) if count is not None else waves
        counted = {} if count is None else {"plan": [w.to_dict() for w in waves]}
        session.execute(
            update(Campaign)
            .where(col(Campaign.id) == cid)
            .values(launched_at=None if canceled else finished, summary=summary, updated_at=finished, **counted)
        )
        session.commit()
        camp = session.get(Campaign, cid)
        assert camp is not None
        summary.update(
            name=camp.name,
            state=current_state(session, camp),
            template_id=camp.template_id,
            channels=camp.channels,
            priority=camp.priority,
            rate=res.rate,
            waves=camp.plan,
        )
    return summary


_RECIPIENT = ["campaign_id", "recipient_id"]
# a row's columns that often hold one value down a chunk (its wave, status, job; its due time at no
# rate): then given once with the chunk's shared columns, which SQLite's statement takes as literals
# (``prepare_counted_insert``). None holds a secret or an address (a statement's text shows in its
# errors): recipients, data and dedup keys stay bound.
_MAYBE_SHARED = ("wave", "status", "job_id", "due_at")
_SECOND = timedelta(seconds=1)


def _hoisted(rows: list[dict[str, Any]], shared: dict[str, Any]) -> dict[str, Any]:
    """``shared`` with the columns of ``_MAYBE_SHARED`` that the rows have and that hold one value
    (of one type) down all of them (a shared column's value is taken there: the rows' own is not read)."""
    out = dict(shared)
    for c in [c for c in _MAYBE_SHARED if c in rows[0]] if rows else ():
        values = list(map(itemgetter(c), rows))
        if values.count(values[0]) == len(values) and len(set(map(type, values))) == 1:  # (True == 1)
            out[c] = values[0]
    return out


def _insert_new(
    engine: Engine, rows: list[dict[str, Any]], shared: dict[str, Any] | None = None
) -> Callable[[Session], int]:
    """The chunk's rows, parameters converted now; a row the campaign already has (a concurrent
    relaunch: the chunk was filtered of the rows existing when read) is skipped. On PostgreSQL the
    rows go by COPY straight into the table, under a savepoint; only when one collides (rare) is
    the chunk written again through a staging table and ``ON CONFLICT DO NOTHING`` (measured,
    1,000-row chunks: the staging table's create, fill and ``INSERT ... SELECT`` cost the server
    ~3 µs a row more). SQLite: one ``INSERT ... ON CONFLICT DO NOTHING``, the chunk's constant columns
    (template, campaign, status, job, timestamps) written in as literals. ``shared``: the columns of
    one value for the whole chunk, given once. Returns the rows written (-1: the driver did not say)."""
    if engine.dialect.name != "postgresql":
        skipping = prepare_counted_insert(engine, _NT, rows, _RECIPIENT, shared=_hoisted(rows, shared or {}))
        return lambda session: skipping(session.connection())
    plain = prepare_counted_insert(engine, _NT, rows, shared=shared)

    def run(session: Session) -> int:
        try:
            with session.begin_nested():
                return plain(session.connection())
        except IntegrityError:
            again = prepare_counted_insert(engine, _NT, rows, skip_conflicts_on=_RECIPIENT, shared=shared)
            return again(session.connection())

    return run


class _Pace:
    """What the launcher may queue itself without going past ``--rate``: a bucket of one second of
    the rate (what one round of the paced reconciler releases), refilled at the rate as the write
    pass goes on. The first chunk whose due rows do not fit (slots that passed while a long segment
    was read, at a low rate) leaves them, and every row after, to the reconciler, which releases
    them at the rate."""

    def __init__(self, rate: float) -> None:
        self.cap = max(1.0, rate)
        self.rate = rate
        self.tokens = self.cap
        self.at = time.monotonic()
        self.open = True

    def take(self, n: int) -> bool:
        if not self.open:
            return False
        t = time.monotonic()
        self.tokens = min(self.cap, self.tokens + (t - self.at) * self.rate)
        self.at = t
        if n > self.tokens:
            self.open = False
            return False
        self.tokens -= n
        return True


def _produce_due(
    rows: list[dict[str, Any]], now: datetime, batch: int, pace: _Pace, shards: int = 1
) -> list[tuple[str, list[str], int]]:
    """The rows already due when written (a campaign sent now; slots that passed while the segment
    was read) are produced at once, as intake produces a notification: written ``queued`` with the
    id of their job (``batch`` rows a job), enqueued after the commit (``_enqueue_due``). The
    reconciler would have queued them within its next round, writing each row a second time to mark
    it queued: for a campaign sent now (the seed's peak) the row is written once, then once by the
    worker that finishes it. A launcher killed between the commit and the enqueue leaves jobs
    missing, which the reconciler's search for lost work finds, as it does intake's. Rows due later
    stay ``scheduled`` for the reconciler, at the campaign's rate, and so do due rows past ``pace``.
    With Redis shards (``notifyctl.shards``), a job holds one shard's recipients: the chunk's due
    rows are split by shard first. Returns ``[(job id, ids, shard)]``."""
    due = [row for row in rows if row["due_at"] <= now]
    if not due or not pace.take(len(due)):
        return []
    jobs: list[tuple[str, list[str], int]] = []
    for shard, of_shard in split(due, _recipient, shards).items():
        for i in range(0, len(of_shard), batch):
            part = of_shard[i : i + batch]
            job_id = "job_" + new_id("l")
            for row in part:
                row["status"] = NotificationStatus.queued
                row["job_id"] = job_id
            jobs.append((job_id, [row["id"] for row in part], shard))
    return jobs


def _recipient(row: dict[str, Any]) -> str:
    return str(row["recipient_id"])


def _enqueue_due(ctx: Context, priority: str, jobs: list[tuple[str, list[str], int]]) -> None:
    """Enqueue what ``_produce_due`` marked (committed), each job on its shard. Redis unavailable:
    the reconciler finds them."""
    try:
        for job_id, ids, shard in jobs:
            enqueue(ctx, priority, ids, job_id, shard=shard)
    except redis.RedisError as exc:
        log.warning("campaign rows due now not enqueued (%s): the reconciler will queue them", exc)


def _status(session: Session, cid: str) -> str:
    """The campaign's state, read once a chunk: raw (~20 µs; ~150 through the ORM)."""
    return str(rows_where_in(session.connection(), "SELECT status FROM campaigns", "id", [cid], prepared=True)[0][0])


def _sync_rows(session: Session, cid: str, state: str) -> None:
    """A pause/cancel that raced with the launcher: bring rows written meanwhile in line."""
    if state == CampaignStatus.paused:
        src, dst = [NotificationStatus.scheduled], NotificationStatus.paused
    elif state == CampaignStatus.canceled:
        src, dst = [NotificationStatus.scheduled, NotificationStatus.paused], NotificationStatus.canceled
    else:
        return
    session.execute(
        update(Notification)
        .where(col(Notification.campaign_id) == cid, col(Notification.status).in_(src))
        .values(status=dst, updated_at=utcnow())
    )
    session.commit()
