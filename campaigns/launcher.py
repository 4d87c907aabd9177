"""Launching a campaign: read the segment, schedule every recipient, write one ``scheduled``
notification per recipient. The worker pool's reconciler queues them (in batches, into the
priority queue of the campaign) as their ``due_at`` comes; those already due when written (a
campaign sent now) are queued by the launcher itself, in the same write, within the campaign's rate
(``_produce_due``, ``_Pace``).

A launch reads the segment twice: a *plan* pass (resolves users and time zones, counts each
wave, checks the template against the first recipient) and a *write* pass (bulk inserts, one
statement per chunk). The campaign row is created between the two, with the plan and the
reference time, so that a launcher killed mid-way can be relaunched (``resume_launch``): it
reads the segment again, gives every recipient the same ``due_at`` as the first run would have,
and skips, by the unique index on (campaign_id, recipient_id), those already written.
Nobody is skipped, nobody is written twice.

``dry_run`` does the plan pass with the full audience analysis (opt-outs, dedup, addresses,
marketing-SMS consent, a peek at the rate-limit windows, SMS cost) and writes nothing.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from campaigns.config import CampaignConfig, campaign_config
from campaigns.names import check_name, default_name, find_campaign, taken
from campaigns.report import current_state
from campaigns.schedule import Schedule, Wave, parse_hhmm, parse_quiet_hours, parse_send_at, plan_waves
from campaigns.segments import BadRows, CsvSegment, SegmentRow, SqlSegment, chunked
from notifyctl.context import Context
from notifyctl.db import prepare_insert, rows_where_in, write_lock
from notifyctl.errors import InputError
from notifyctl.intake import enqueue, user_vars
from notifyctl.models import (
    Campaign,
    CampaignStatus,
    DeviceToken,
    Notification,
    NotificationStatus,
    OptOut,
    User,
    new_id,
    utcnow,
)
from notifyctl.pgstats import analyze_grown
from notifyctl.policy import refusal
from notifyctl.settings import CHANNELS
from notifyctl.shards import split
from notifyctl.templates import Template
from worker.ratelimit import RateLimiter

log = logging.getLogger("notifyctl.campaigns")

Progress = Callable[[str, int, int | None], None]  # (phase "plan" | "write", rows done, total or None)

_NT = Notification.__table__  # type: ignore[attr-defined]


@dataclass
class LaunchSpec:
    """What `campaign launch` was asked (stored on the campaign for relaunches)."""

    template_id: str
    channels: list[str] | None = None  # None = every channel the template has
    name: str | None = None
    rate: float | None = None  # notifications/s; None = CampaignConfig.default_rate
    send_at: str | None = None  # ISO 8601
    stagger_tz: bool = False
    local_time: str | None = None  # HH:MM, with stagger_tz
    if_passed: str = "tomorrow"  # tomorrow | now
    quiet_hours: str | None = None  # HH:MM-HH:MM; "off" disables CampaignConfig.default_quiet_hours
    segment_csv: str | None = None
    segment_sql: str | None = None
    segment_db: str | None = None  # URL; None = the tracking database
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Resolved:
    spec: dict[str, Any]  # normalized, JSON-able
    template: Template
    channels: list[str]
    category: str
    priority: str
    rate: float
    schedule: Schedule
    segment: CsvSegment | SqlSegment
    cfg: CampaignConfig


def _resolve(ctx: Context, spec: LaunchSpec, now: datetime, cfg: CampaignConfig) -> _Resolved:
    """Check every flag; InputError (exit 2) names the first bad one. Nothing is written."""
    template = ctx.templates.get_shared(spec.template_id)  # one every host's workers can load
    if template.priority == "high" and template.category != "marketing":
        raise InputError(
            f"--template: {template.id!r} is a high-priority {template.category} template; campaigns run at "
            "low/normal priority so that they never compete with transactional traffic"
        )
    priority = "low" if template.category == "marketing" else template.priority
    if spec.channels:
        bad = [c for c in spec.channels if c not in CHANNELS]
        if bad:
            raise InputError(f"--channels: unknown channel {bad[0]!r} (use {', '.join(CHANNELS)})")
        missing = [c for c in spec.channels if c not in template.parts]
        if missing:
            raise InputError(
                f"--channels: template {template.id!r} has no {', '.join(missing)} part "
                f"(it has: {', '.join(template.channels)})"
            )
        channels = [c for c in CHANNELS if c in spec.channels]
    else:
        channels = template.channels
    rate = cfg.default_rate if spec.rate is None else spec.rate
    if not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise InputError(f"--rate: must be a positive number of notifications per second, got {spec.rate!r}")
    if spec.if_passed not in ("tomorrow", "now"):
        raise InputError(f"--if-passed: must be tomorrow or now, got {spec.if_passed!r}")
    if spec.stagger_tz and not spec.local_time:
        raise InputError("--stagger-tz: needs --local-time HH:MM (the wall-clock time in each recipient's zone)")
    if spec.local_time and not spec.stagger_tz:
        raise InputError("--local-time: only with --stagger-tz")
    if spec.stagger_tz and spec.send_at:
        raise InputError("--send-at: cannot be combined with --stagger-tz (use one or the other)")
    local_time = parse_hhmm(spec.local_time, "--local-time") if spec.local_time else None
    send_at = parse_send_at(spec.send_at, now) if spec.send_at else None
    quiet_text = spec.quiet_hours
    if quiet_text is None and template.category == "marketing":
        quiet_text = cfg.default_quiet_hours
    if quiet_text and quiet_text.strip().lower() in ("off", "none"):
        quiet_text = None
    quiet = parse_quiet_hours(quiet_text) if quiet_text else None
    if spec.segment_csv and spec.segment_sql:
        raise InputError("--segment-csv and --segment-sql: give one segment, not both")
    if spec.segment_db and not spec.segment_sql:
        raise InputError("--segment-db: only with --segment-sql")
    segment: CsvSegment | SqlSegment
    if spec.segment_csv:
        segment = CsvSegment(spec.segment_csv)
    elif spec.segment_sql:
        if spec.segment_db:
            segment = SqlSegment(
                spec.segment_sql,
                spec.segment_db,
                cfg.chunk_size,
                timeout=cfg.segment_timeout,
                max_value=cfg.segment_max_value,
            )
        else:
            url = ctx.settings.effective_database_url()
            segment = SqlSegment(
                spec.segment_sql,
                url,
                cfg.chunk_size,
                label="tracking database",
                timeout=cfg.segment_timeout,
                max_value=cfg.segment_max_value,
            )
    else:
        raise InputError("segment: give --segment-csv FILE or --segment-sql QUERY")
    if not isinstance(spec.data, dict):
        raise InputError("--data: expected key/value pairs")
    schedule = Schedule(
        now=now,
        default_tz=ctx.settings.default_timezone,
        send_at=send_at,
        local_time=local_time,
        if_passed=spec.if_passed,
        quiet=quiet,
    )
    norm = {
        "template_id": template.id,
        "channels": channels,
        "name": spec.name,
        "rate": float(rate),
        "send_at": send_at.isoformat() if send_at else None,
        "stagger_tz": bool(spec.stagger_tz),
        "local_time": local_time.strftime("%H:%M") if local_time else None,
        "if_passed": spec.if_passed,
        "quiet_hours": f"{quiet[0]:%H:%M}-{quiet[1]:%H:%M}" if quiet else None,
        "segment_csv": str(segment.path) if isinstance(segment, CsvSegment) else None,
        "segment_sql": segment.sql if isinstance(segment, SqlSegment) else None,
        # a URL's password is never stored: a relaunch asks for --segment-db again
        "segment_db": segment.label if isinstance(segment, SqlSegment) and spec.segment_db else None,
        "segment_db_needs_password": bool(
            isinstance(segment, SqlSegment) and spec.segment_db and segment.label != spec.segment_db
        ),
        "data": spec.data,
    }
    return _Resolved(norm, template, channels, template.category, priority, float(rate), schedule, segment, cfg)


def _stream(res: _Resolved, bad: BadRows, shards: int = 1) -> Iterator[list[SegmentRow]]:
    """The segment in chunks of ``chunk_size`` rows; the write pass over N Redis shards reads N times
    that, so that each shard's share of a chunk still fills a job (``_produce_due``): jobs of a
    quarter of a batch cost every shard their per-job Redis commands four times as often."""
    return chunked(res.segment.rows(bad), res.cfg.chunk_size * shards)


def _user_tz(session: Session, ids: list[str]) -> dict[str, str]:
    """Each known user's time zone: the rows off the DBAPI cursor (a chunk's thousand-id ``IN`` list
    through SQLAlchemy's expansion cost the launcher more than the query did)."""
    return dict(rows_where_in(session.connection(), "SELECT id, timezone FROM users", "id", ids))


_SAFE_ID = re.compile(r"^[A-Za-z0-9_]+$")


def _already_written(session: Session, cid: str, ids: list[str]) -> set[str]:
    """The users of ``ids`` the campaign has a notification for (a relaunch)."""
    if not _SAFE_ID.match(cid):  # (our own ids: written into the statement)
        raise ValueError(f"not a campaign id: {cid!r}")
    sql = "SELECT recipient_id FROM notifications"
    return {r[0] for r in rows_where_in(session.connection(), sql, "recipient_id", ids, f"AND campaign_id = '{cid}'")}


def _check_template(res: _Resolved, session: Session, row: SegmentRow) -> None:
    """Render every channel for the first recipient: a missing variable stops the launch (exit 2)."""
    user = session.get(User, row.user_id)
    if user is None:
        return
    data = {**res.spec["data"], **row.extras, "user": user_vars(user)}
    for ch in res.channels:
        res.template.render(ch, data)


# ---------------------------------------------------------------------------------------------------------- plan


@dataclass
class _Plan:
    rows: int = 0  # segment rows read (good and bad)
    recipients: int = 0  # rows with a known user (duplicates included: each holds a schedule slot)
    counts: dict[datetime, int] = field(default_factory=lambda: defaultdict(int))
    zones: dict[datetime, set[str]] = field(default_factory=lambda: defaultdict(set))
    duplicates: BadRows = field(default_factory=BadRows)  # rows of a user already in the segment


def _duplicate(bad: BadRows, row: SegmentRow, first_line: int) -> None:
    bad.add(row.line, "duplicate", f"user {row.user_id!r} is also on line {first_line}; that first row is kept")


def _plan(ctx: Context, res: _Resolved, bad: BadRows, progress: Progress | None) -> _Plan:
    plan = _Plan(duplicates=BadRows(keep=bad.keep))
    checked = False
    seen = _SeenSet()
    try:
        with Session(ctx.engine) as session:
            for chunk in _stream(res, bad):
                plan.rows += len(chunk)
                tzs = _user_tz(session, list({r.user_id for r in chunk}))
                repeats = seen.duplicates([r for r in chunk if r.user_id in tzs])
                for r in chunk:
                    tz = tzs.get(r.user_id)
                    if tz is None:
                        bad.add(r.line, "unknown_user", f"unknown user {r.user_id!r}")
                        continue
                    if id(r) in repeats:
                        _duplicate(plan.duplicates, r, repeats[id(r)])
                    elif not checked:
                        _check_template(res, session, r)
                        checked = True
                    instant, used = res.schedule.instant(tz)
                    plan.counts[instant] += 1
                    plan.zones[instant].add(used)
                    plan.recipients += 1
                if progress:
                    progress("plan", plan.rows, None)
    finally:
        seen.close()
    return plan


# ------------------------------------------------------------------------------------------------------- launch


def launch(
    ctx: Context,
    spec: LaunchSpec,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Launch (or with ``dry_run``, analyse) a campaign; returns the summary."""
    now = (now or utcnow()).astimezone(UTC)
    cfg = campaign_config(ctx.settings)
    if spec.name is not None:
        check_name(spec.name)  # a new name only: a relaunch keeps the campaign's, even from before names were checked
    res = _resolve(ctx, spec, now, cfg)
    if res.spec["name"]:
        with Session(ctx.engine) as session:
            other = taken(session, res.spec["name"])
        if other is not None:
            raise InputError(f"--name: campaign {other.id} is already named {other.name!r}; choose another name")
    if dry_run:
        return _dry_run(ctx, res, progress, campaign=None)
    bad = BadRows(keep=cfg.max_reported_errors)
    analyze_grown(ctx.engine, ("users", "notifications"))  # PostgreSQL: users imported just now, say
    plan = _plan(ctx, res, bad, progress)
    if plan.recipients == 0:
        first = f"; first: line {bad.first[0]['line']}: {bad.first[0]['message']}" if bad.first else ""
        raise InputError(f"segment: no recipient to send to ({bad.count} bad row(s){first})")
    waves = plan_waves(plan.counts, plan.zones, res.rate)
    cid = new_id("c")
    with Session(ctx.engine) as session:
        name = res.spec["name"] or default_name(session, res.template.id, now)
    camp = Campaign(
        id=cid,
        name=name,
        template_id=res.template.id,
        category=res.category,
        priority=res.priority,
        channels=res.channels,
        status=CampaignStatus.active,
        spec=res.spec,
        plan=[w.to_dict() for w in waves],
        summary={"planned": plan.recipients},
        reference_at=now,
        created_at=now,
        updated_at=now,
    )
    with Session(ctx.engine) as session:
        session.add(camp)
        session.commit()
    return _produce(ctx, cid, res, waves, plan.recipients, run_now=now, progress=progress, duplicates=plan.duplicates)


def _reresolve(ctx: Context, camp: Campaign, segment_db: str | None) -> _Resolved:
    s = dict(camp.spec)
    if s.get("segment_db_needs_password") and not segment_db:
        raise InputError(f"--segment-db: campaign {camp.id} reads a database with a password; give its URL again")
    spec = LaunchSpec(
        template_id=s["template_id"],
        channels=s["channels"],
        name=camp.name,
        rate=s["rate"],
        stagger_tz=s["stagger_tz"],
        local_time=s["local_time"],
        if_passed=s["if_passed"],
        quiet_hours=s["quiet_hours"] or "off",
        segment_csv=s["segment_csv"],
        segment_sql=s["segment_sql"],
        segment_db=segment_db or s.get("segment_db"),
        data=s["data"],
    )
    ref = camp.reference_at if camp.reference_at.tzinfo else camp.reference_at.replace(tzinfo=UTC)
    res = _resolve(ctx, spec, ref, campaign_config(ctx.settings))
    if s.get("send_at"):  # not re-validated against the clock: it was valid at launch
        res.schedule.send_at = datetime.fromisoformat(s["send_at"])
        res.spec["send_at"] = s["send_at"]
    res.spec["segment_db"] = s.get("segment_db")
    res.spec["segment_db_needs_password"] = s.get("segment_db_needs_password", False)
    return res


def resume_launch(
    ctx: Context,
    ref: str,
    *,
    segment_db: str | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Relaunch an interrupted launch: writes whoever is missing, with the schedule of the first run."""
    with Session(ctx.engine) as session:
        camp = find_campaign(session, ref)
    if camp.status == CampaignStatus.canceled:
        raise InputError(f"campaign {camp.id} is canceled")
    res = _reresolve(ctx, camp, segment_db)
    if dry_run:
        return _dry_run(ctx, res, progress, campaign=camp)
    waves = [Wave.from_dict(w, res.rate) for w in camp.plan]
    planned = int(camp.summary.get("planned") or sum(w.recipients for w in waves))
    return _produce(ctx, camp.id, res, waves, planned, run_now=(now or utcnow()).astimezone(UTC), progress=progress)


# ------------------------------------------------------------------------------------------------------ produce


def _produce(
    ctx: Context,
    cid: str,
    res: _Resolved,
    waves: list[Wave],
    planned: int,
    *,
    run_now: datetime,
    progress: Progress | None,
    duplicates: BadRows | None = None,
) -> dict[str, Any]:
    """Write the recipients not written yet. ``duplicates``: the rows the plan pass found to repeat
    a user (reported with the bad rows; like rows already written, they are skipped here)."""
    bad = BadRows(keep=res.cfg.max_reported_errors)
    res.schedule.fallbacks = 0  # counted again by this pass
    by_instant = {w.instant: w for w in waves}
    slot: Counter[datetime] = Counter()
    started = utcnow()
    shift = timedelta(0)
    data0 = res.spec["data"]
    written = skipped = seen_rows = 0
    first_due: datetime | None = None
    last_due: datetime | None = None
    state: str = CampaignStatus.active
    canceled = False
    batch = max(1, ctx.settings.batch_size)
    pace = _Pace(res.rate)
    if progress:
        progress("write", 0, planned)
    with Session(ctx.engine) as session:
        for chunk in _stream(res, bad, ctx.shard_count):
            current = session.scalars(select(col(Campaign.status)).where(col(Campaign.id) == cid)).one()
            if current != state:
                state = current
                _sync_rows(session, cid, state)
            if state == CampaignStatus.canceled:
                canceled = True
                break
            row_status = NotificationStatus.paused if state == CampaignStatus.paused else NotificationStatus.scheduled
            ids = list({r.user_id for r in chunk})
            tzs = _user_tz(session, ids)
            existing = _already_written(session, cid, ids)
            now = utcnow()
            rows: list[dict[str, Any]] = []
            floor = run_now + (now - started) - _SECOND  # (the chunk's clock: the same for its rows)
            for r in chunk:
                tz = tzs.get(r.user_id)
                if tz is None:
                    bad.add(r.line, "unknown_user", f"unknown user {r.user_id!r}")
                    continue
                seen_rows += 1
                instant, _used = res.schedule.instant(tz)
                w = by_instant.get(instant)
                if w is None:  # the segment changed since the plan: a wave of its own
                    w = by_instant[instant] = Wave(instant, instant, 0, res.rate)
                due = w.due(slot[instant])
                slot[instant] += 1
                if r.user_id in existing:
                    skipped += 1
                    continue
                existing.add(r.user_id)
                # A slot that has already passed when its row is written (the launcher was down, or the
                # segment was still being read) moves, with every row after it, by the same shift: the
                # schedule keeps its spacing, so the workers never get a backlog to produce faster than
                # --rate. (The launch's clock: run_now may be injected; a second's slack is the
                # reconciler's own period.)
                if due + shift < floor:
                    shift = floor + _SECOND - due
                due = due + shift
                first_due = due if first_due is None or due < first_due else first_due
                last_due = due if last_due is None or due > last_due else last_due
                rows.append(
                    {
                        "id": new_id("n"),
                        "recipient_id": r.user_id,
                        "type": res.template.id,
                        "template_id": res.template.id,
                        "category": res.category,
                        "priority": res.priority,
                        "channels": res.channels,
                        "data": {**data0, **r.extras} if r.extras else data0,
                        "dedup_key": f"campaign:{cid}:{r.user_id}",
                        "campaign_id": cid,
                        "status": row_status,
                        "job_id": None,
                        "due_at": due,
                        "created_at": now,
                        "updated_at": now,
                    }
                )
            jobs = (
                _produce_due(rows, now, batch, pace, ctx.shard_count)
                if row_status == NotificationStatus.scheduled
                else []
            )
            # under the SQLite writer lock, so that a launch never makes the workers' and an OTP's
            # writes wait on SQLite's busy-sleep
            # parameters converted before the lock; a row the campaign already has is skipped
            insert_rows = _insert_new(ctx.engine, rows)
            with write_lock(ctx.engine):
                insert_rows(session)
                session.commit()
            _enqueue_due(ctx, res.priority, jobs)
            written += len(rows)
            analyze_grown(ctx.engine, ("notifications",))  # PostgreSQL: once the table doubled
            if progress:
                progress("write", seen_rows, planned)
        current = session.scalars(select(col(Campaign.status)).where(col(Campaign.id) == cid)).one()
        if current != state:
            _sync_rows(session, cid, current)
            canceled = canceled or current == CampaignStatus.canceled
        dups = duplicates.count if duplicates is not None else 0
        if duplicates is not None:
            bad.merge(duplicates)
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
        session.execute(
            update(Campaign)
            .where(col(Campaign.id) == cid)
            .values(launched_at=None if canceled else finished, summary=summary, updated_at=finished)
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
_SECOND = timedelta(seconds=1)


def _insert_new(engine: Engine, rows: list[dict[str, Any]]) -> Callable[[Session], None]:
    """The chunk's rows, parameters converted now; a row the campaign already has (a concurrent
    relaunch: the chunk was filtered of the rows existing when read) is skipped. On PostgreSQL the
    rows go by COPY straight into the table, under a savepoint; only when one collides (rare) is
    the chunk written again through a staging table and ``ON CONFLICT DO NOTHING`` (measured,
    1,000-row chunks: the staging table's create, fill and ``INSERT ... SELECT`` cost the server
    ~3 µs a row more). SQLite: one ``INSERT ... ON CONFLICT DO NOTHING``."""
    if engine.dialect.name != "postgresql":
        skipping = prepare_insert(engine, _NT, rows, skip_conflicts_on=_RECIPIENT)
        return lambda session: skipping(session.connection())
    plain = prepare_insert(engine, _NT, rows)

    def run(session: Session) -> None:
        try:
            with session.begin_nested():
                plain(session.connection())
        except IntegrityError:
            prepare_insert(engine, _NT, rows, skip_conflicts_on=_RECIPIENT)(session.connection())

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


# ------------------------------------------------------------------------------------------------------ dry run

_GSM = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXT = set("^{}\\[~]|€\f")


def sms_segments(text: str) -> int:
    """SMS segments for ``text``: GSM-7 (160, or 153 per part) else UCS-2 (70, or 67 per part)."""
    if all(c in _GSM or c in _GSM_EXT for c in text):
        n = sum(2 if c in _GSM_EXT else 1 for c in text)
        return 1 if n <= 160 else math.ceil(n / 153)
    n = len(text.encode("utf-16-le")) // 2
    return 1 if n <= 70 else math.ceil(n / 67)


@dataclass
class _ChannelCount:
    recipients: int = 0  # admitted users
    deliveries: int = 0  # admitted addresses (what would be sent)
    suppressed: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["suppressed"] = dict(self.suppressed)
        d["failed"] = dict(self.failed)
        return d


class _SeenSet:
    """The user ids of a segment read so far, with the line each was first on: an exact set that
    keeps memory flat whatever the segment size (a throwaway SQLite table in a temporary file,
    asked and filled once per chunk)."""

    def __init__(self) -> None:
        import sqlite3
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="notify-segment-")
        self._db = sqlite3.connect(f"{self._dir.name}/seen.db")
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE seen (user_id TEXT PRIMARY KEY, line INTEGER) WITHOUT ROWID")

    def duplicates(self, rows: list[SegmentRow]) -> dict[int, int]:
        """``{id(row): line of the user's first row}`` for the rows (of one chunk, in segment order)
        whose user came earlier in the segment; records the others."""
        ids = list({r.user_id for r in rows})
        first: dict[str, int] = {}
        for i in range(0, len(ids), 900):
            part = ids[i : i + 900]
            q = f"SELECT user_id, line FROM seen WHERE user_id IN ({','.join('?' * len(part))})"
            first.update(self._db.execute(q, part))
        out: dict[int, int] = {}
        new: dict[str, int] = {}
        for r in rows:
            line = first.get(r.user_id) or new.get(r.user_id)
            if line is None:
                new[r.user_id] = r.line
            else:
                out[id(r)] = line
        self._db.executemany("INSERT INTO seen VALUES (?, ?)", new.items())
        return out

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()


def _dry_run(ctx: Context, res: _Resolved, progress: Progress | None, campaign: Campaign | None) -> dict[str, Any]:
    """The audience after opt-outs, dedup, addresses and rate limits; nothing is written anywhere."""
    settings = ctx.settings
    bad = BadRows(keep=res.cfg.max_reported_errors)
    plan = _Plan()
    per_channel = {c: _ChannelCount() for c in res.channels}
    wave_channels: dict[datetime, Counter[str]] = defaultdict(Counter)
    seen = _SeenSet()  # exact in-segment dedup on disk
    duplicates = already = audience = 0
    sms_parts = sms_recipients = 0
    # one limiter per Redis shard (notifyctl.shards): each user's windows are on that user's shard
    limiters = [
        RateLimiter(ctx.shard_redis(i), settings.rules, settings.rate_limit_bypass_high) for i in range(ctx.shard_count)
    ]
    limiter = limiters[0]
    rules = [r for r in settings.rules if any(r.applies(c, res.category) for c in res.channels)]
    bypass = res.priority == "high" and limiter.bypass_high
    checked = False
    with Session(ctx.engine) as session:
        for chunk in _stream(res, bad):
            plan.rows += len(chunk)
            ids = list({x.user_id for x in chunk})
            users = {u.id: u for u in session.scalars(select(User).where(col(User.id).in_(ids)))}
            opt: dict[str, set[tuple[str, str]]] = defaultdict(set)
            for o in session.scalars(select(OptOut).where(col(OptOut.user_id).in_(ids))):
                opt[o.user_id].add((o.channel, o.category))
            tokens: Counter[str] = Counter()
            if "push" in res.channels:
                tokens.update(
                    session.scalars(
                        select(col(DeviceToken.user_id)).where(
                            col(DeviceToken.user_id).in_(ids),
                            col(DeviceToken.removed_at).is_(None),
                        )
                    )
                )
            repeats = seen.duplicates([x for x in chunk if x.user_id in users])
            existing: set[str] = set()
            if campaign is not None:
                existing = set(
                    session.scalars(
                        select(col(Notification.recipient_id)).where(
                            col(Notification.campaign_id) == campaign.id,
                            col(Notification.recipient_id).in_(ids),
                        )
                    )
                )
            # the sliding windows as they stand (nothing recorded): one round trip per chunk
            now_ms = int(utcnow().timestamp() * 1000)
            window: dict[tuple[str, str], int] = {}
            for shard, of_shard in split([u for u in ids if u in users], str, ctx.shard_count).items():
                window.update(limiters[shard].counts(of_shard, rules, now_ms))
            for row in chunk:
                user = users.get(row.user_id)
                if user is None:
                    bad.add(row.line, "unknown_user", f"unknown user {row.user_id!r}")
                    continue
                if not checked:
                    _check_template(res, session, row)
                    checked = True
                plan.recipients += 1
                instant, used = res.schedule.instant(user.timezone)
                plan.counts[instant] += 1
                plan.zones[instant].add(used)
                if row.user_id in existing:
                    already += 1
                    continue
                if id(row) in repeats:
                    _duplicate(bad, row, repeats[id(row)])
                    duplicates += 1
                    continue
                audience += 1
                blocks = opt.get(user.id, set())
                counts = {rule.key: window.get((user.id, rule.key), 0) for rule in rules}
                data: dict[str, Any] | None = None
                for ch in res.channels:
                    cc = per_channel[ch]
                    naddr = tokens[user.id] if ch == "push" else int(bool(user.email if ch == "email" else user.phone))
                    no = refusal(ch, res.category, blocks, naddr > 0, user.sms_opt_in)
                    if no is not None:
                        cc.suppressed[no.kind] += 1
                        continue
                    if data is None:
                        data = {**res.spec["data"], **row.extras, "user": user_vars(user)}
                    try:
                        content = res.template.render(ch, data)
                    except InputError:
                        cc.failed["template_error"] += naddr
                        continue
                    applicable = limiter.rules_for(ch, res.category)
                    if not bypass and any(counts[rl.key] >= rl.limit for rl in applicable):
                        cc.suppressed["rate_limited"] += 1
                        continue
                    for rl in applicable:
                        counts[rl.key] += 1
                    cc.recipients += 1
                    cc.deliveries += naddr
                    wave_channels[instant][ch] += naddr
                    if ch == "sms":
                        sms_recipients += 1
                        sms_parts += sms_segments(content["text"])
            if progress:
                progress("plan", plan.rows, None)
    waves = plan_waves(plan.counts, plan.zones, res.rate)
    wave_dicts = []
    for w in waves:
        d = w.to_dict()
        d["channels"] = dict(wave_channels.get(w.instant, {}))
        wave_dicts.append(d)
    seen.close()
    return {
        "dry_run": True,
        "campaign_id": campaign.id if campaign else None,
        "name": res.spec["name"] or (campaign.name if campaign else None),
        "template_id": res.template.id,
        "category": res.category,
        "priority": res.priority,
        "channels": res.channels,
        "rate": res.rate,
        "segment": res.segment.describe(),
        "rows": plan.rows + bad.by_kind["encoding"] + bad.by_kind["malformed"],
        "bad_rows": bad.to_dict(),
        "recipients": plan.recipients,
        "duplicates": duplicates,
        "already_in_campaign": already,
        "audience": audience,
        "per_channel": {c: v.to_dict() for c, v in per_channel.items()},
        "waves": wave_dicts,
        "timezone_fallbacks": res.schedule.fallbacks,
        "sms_cost": {
            "recipients": sms_recipients,
            "segments": sms_parts,
            "per_segment": res.cfg.sms_cost_per_segment,
            "estimate": round(sms_parts * res.cfg.sms_cost_per_segment, 4),
            "currency": res.cfg.currency,
        },
    }
