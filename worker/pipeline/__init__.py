"""The worker's pipeline for a batch of notifications, one module per stage, in order:

1. ``batch``    load: the notifications, their users, opt-outs, device tokens and deliveries;
2. ``fanout``   one delivery per channel and address (``notifyctl.policy``: who may receive what;
                rate limits); a due push follows its device's replaced token;
3. ``render``   the content per notification and channel, shared across the batch where it can be;
4. ``send``     the due deliveries claimed under one lease (``worker.claims``), a message per
                recipient, then sent per route: providers in failover order behind circuits,
                paced, fenced;
5. ``record``   each outcome's decision (``outcome.decide``: sent, retry at, dead-letter, remove the
                address) onto its delivery, then one write: Redis send records, then SQL.

Every stage works on the whole batch: a fixed number of SQL statements and Redis round trips per
batch, whatever its size. ``runtime`` holds the per-process state (``Runtime``) and the counts
(``Stats``). Names with a leading underscore are shared by the package's modules, not outside it.

``process`` is idempotent: it can run again on the same notifications (a retry, a job
recovered from a dead worker, a duplicate job) and sends nothing twice — deliveries already
``sent`` are skipped, and the Redis send record (``worker.claims``) is checked before sending.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from notifyctl import metrics, ordering
from notifyctl.models import utcnow
from worker.pipeline.batch import _Batch
from worker.pipeline.fanout import delivery_id, fan_out, follow_replaced_tokens
from worker.pipeline.outcome import decide, retry_delay
from worker.pipeline.record import Record, record_outcomes, write
from worker.pipeline.render import Renderer
from worker.pipeline.runtime import Runtime, Stats
from worker.pipeline.send import claim, due_now, route_groups, send_routes

_route_groups = route_groups  # (its name before the split, as tests import it)

__all__ = ["Runtime", "Stats", "_route_groups", "decide", "delivery_id", "process", "retry_delay", "route_groups"]


def process(rt: Runtime, notification_ids: Iterable[str], as_of: float | None = None) -> Stats:
    """Process a batch; ``as_of`` (epoch s) is the time up to which scheduled retries are due."""
    ids = list(dict.fromkeys(notification_ids))
    stats = Stats()
    rt.liveness.beat_unless_recent()
    try:
        for attempt in range(3):
            try:
                return _process(rt, ids, as_of, stats)
            except IntegrityError:
                # Another worker fanned out the same fresh notification at the same moment: reload and go on.
                if attempt == 2:
                    raise
                stats = Stats()
    finally:
        rt.claims.drop()  # whatever happened, this batch's leases are no longer renewed
    return stats


def _process(rt: Runtime, ids: list[str], as_of: float | None, stats: Stats) -> Stats:
    """The stages in order (see the module docstring)."""
    rt.metrics = metrics.Recorder()
    now = utcnow()
    due_by = datetime.fromtimestamp(as_of, UTC) if as_of is not None else now
    renderer = Renderer(rt)
    with Session(rt.ctx.engine, expire_on_commit=False) as session:
        batch = _Batch(session, ids)  # 1
        ordered = [n.id for n in batch.notifications if n.ordered]  # with an ordering_key
        held = ordering.hold_back(session, ordered, now) if ordered else set()
        if held:  # an earlier one of their group is not final yet: back to the reconciler, untouched
            batch.notifications = [n for n in batch.notifications if n.id not in held]
        stats.notifications = len(batch.notifications)
        if not batch.notifications:
            return stats
        renderer.loaded(batch.notifications)
        events: list[dict[str, object]] = []
        new_rows, fresh = fan_out(rt, batch, renderer, now, events, stats)  # 2 (and 3, to check the content)
        rec = Record(now, new_rows, fresh, events)
        due = due_now(batch, due_by)
        if due:  # a device whose token changed since the batch loaded it (or since a retry's fan-out)
            due = follow_replaced_tokens(session.connection(), batch, due, fresh, rec.updates, events, now, stats)
        if due:
            to_send = claim(rt, session.connection(), batch, due, renderer, rec, stats)  # 4 (and 3)
            # 4: the batch's routes at the same time (iOS and Android: one network wait, not two)
            answered = send_routes(rt, {route: [m for _, m in items] for route, items in to_send.items()})
            record_outcomes(rt, to_send, answered, rec, stats)  # 5
        write(rt, session, batch, rec, renderer.secret_of)
    return stats
