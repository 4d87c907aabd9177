"""Launching a campaign: read the segment, schedule every recipient, write one ``scheduled``
notification per recipient. The worker pool's reconciler queues them (in batches, into the
priority queue of the campaign) as their ``due_at`` comes; those already due when written (a
campaign sent now) are queued by the launcher itself, in the same write, within the campaign's rate
(``campaigns.produce``).

A launch reads the segment twice: a *plan* pass (resolves users and time zones, counts each
wave, checks the template against the first recipient) and a *write* pass (bulk inserts, one
statement per chunk). The campaign row is created between the two, with the plan and the
reference time, so that a launcher killed mid-way can be relaunched (``resume_launch``): it
reads the segment again, gives every recipient the same ``due_at`` as the first run would have,
and skips, by the unique index on (campaign_id, recipient_id), those already written.
Nobody is skipped, nobody is written twice.

A launch whose recipients all share one instant (sent now or ``--send-at``; no ``--stagger-tz``, no
quiet hours) has one wave whatever its size, starting at that instant: it reads the segment once,
each chunk planned as it is written (``OnePass``), and the campaign row, made with the first chunk
that has a recipient, holds the plan so far (``counting`` in its summary) until the launch ends. Its
relaunch counts the plan anew as it goes.

``dry_run`` does the plan pass with the full audience analysis (opt-outs, dedup, addresses,
marketing-SMS consent, a peek at the rate-limit windows, SMS cost) and writes nothing.

The passes live in modules of their own: ``campaigns.resolve`` (the flags checked),
``campaigns.plan`` (the plan pass), ``campaigns.produce`` (the write pass and the rows queued at
once), ``campaigns.dryrun`` (the dry run); this module is the entry, ``launch`` and ``resume_launch``.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session

from campaigns.config import campaign_config
from campaigns.dryrun import dry_run_summary
from campaigns.names import check_name, default_name, find_campaign, taken
from campaigns.plan import OnePass, Plan, plan_pass
from campaigns.produce import produce
from campaigns.resolve import LaunchSpec, Progress, Resolved, reresolve, resolve
from campaigns.schedule import Wave, plan_waves
from campaigns.segments import BadRows
from notifyctl.context import YOUNG_GC_THRESHOLD, Context
from notifyctl.errors import InputError
from notifyctl.models import Campaign, CampaignStatus, new_id, utcnow
from notifyctl.pgstats import analyze_grown

__all__ = ["LaunchSpec", "launch", "resume_launch"]  # LaunchSpec: the argument of launch


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
    res = resolve(ctx, spec, now, cfg)
    if res.spec["name"]:
        with Session(ctx.engine) as session:
            other = taken(session, res.spec["name"])
        if other is not None:
            raise InputError(f"--name: campaign {other.id} is already named {other.name!r}; choose another name")
    if dry_run:
        with fewer_collections():
            return dry_run_summary(ctx, res, progress, campaign=None)
    bad = BadRows(keep=cfg.max_reported_errors)
    analyze_grown(ctx.engine, ("users", "notifications"))  # PostgreSQL: users imported just now, say
    with fewer_collections():
        if res.schedule.fixed_instant() is not None:
            return _launch_one_pass(ctx, res, bad, now, progress)
        plan = plan_pass(ctx, res, bad, progress)
        assert plan.seen is not None
        try:
            return _launch_planned(ctx, res, plan, bad, now, progress)
        finally:
            plan.seen.close()


@contextmanager
def fewer_collections() -> Iterator[None]:
    """The cyclic garbage collector's youngest generation collected every ``YOUNG_GC_THRESHOLD``
    allocations instead of Python's 700 while a launch runs (then as it was). A chunk's rows, their
    data and segment rows are a few thousand objects alive at once, freed by reference counting:
    at 700, a 100,000-row launch ran ~740 collections, some of them over the whole heap (every
    module, SQLAlchemy's caches; in the bench, the bench's own objects too), ~2-3 µs a row; now one
    or two. The memory a launch holds stays a chunk's."""
    old = gc.get_threshold()
    gc.set_threshold(max(old[0], YOUNG_GC_THRESHOLD), *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


def _launch_planned(
    ctx: Context, res: Resolved, plan: Plan, bad: BadRows, now: datetime, progress: Progress | None
) -> dict[str, Any]:
    """The campaign row, with its plan, then the write pass."""
    if plan.recipients == 0:
        _no_recipient(bad)
    waves = plan_waves(plan.counts, plan.zones, res.rate)
    cid = _new_campaign(ctx, res, waves, {"planned": plan.recipients}, now)
    planned, dups = plan.recipients, plan.duplicates
    return produce(ctx, cid, res, waves, planned, run_now=now, progress=progress, duplicates=dups, fresh=plan)


def _launch_one_pass(
    ctx: Context, res: Resolved, bad: BadRows, now: datetime, progress: Progress | None
) -> dict[str, Any]:
    """A launch of one instant: the segment read once, each chunk planned as it is written
    (``OnePass``); the campaign row made once a chunk has a recipient."""
    one = OnePass(res, bad, ctx.shard_count)
    try:
        if not one.start(ctx, progress):
            _no_recipient(bad)
        waves = one.waves()
        cid = _new_campaign(ctx, res, waves, {"planned": one.plan.recipients, "counting": True}, now)
        dups = one.plan.duplicates
        return produce(ctx, cid, res, waves, one.plan.recipients, run_now=now, progress=progress, duplicates=dups,
                       one_pass=one)  # fmt: skip
    finally:
        one.close()


def _no_recipient(bad: BadRows) -> None:
    first = f"; first: line {bad.first[0]['line']}: {bad.first[0]['message']}" if bad.first else ""
    raise InputError(f"segment: no recipient to send to ({bad.count} bad row(s){first})")


def _new_campaign(ctx: Context, res: Resolved, waves: list[Wave], summary: dict[str, Any], now: datetime) -> str:
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
        summary=summary,
        reference_at=now,
        created_at=now,
        updated_at=now,
    )
    with Session(ctx.engine) as session:
        session.add(camp)
        session.commit()
    return cid


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
    res = reresolve(ctx, camp, segment_db)
    if dry_run:
        with fewer_collections():
            return dry_run_summary(ctx, res, progress, campaign=camp)
    waves = [Wave.from_dict(w, res.rate) for w in camp.plan]
    planned = int(camp.summary.get("planned") or sum(w.recipients for w in waves))
    recount = bool(camp.summary.get("counting"))  # a launch of one instant cut short: its plan counted anew
    with fewer_collections():
        run_now = (now or utcnow()).astimezone(UTC)
        return produce(ctx, camp.id, res, waves, planned, run_now=run_now, progress=progress, recount=recount)
