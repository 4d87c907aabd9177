"""What a chaos scenario checks once its fault is over, beyond the tally: the resends of deliveries
recorded in doubt (counted apart from duplicates), the worker pool's health and log, restarts."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import select
from sqlmodel import col

from chaos.common import Result, World
from notifyctl.models import DeliveryEvent


def apply_tally(res: Result, t: Any) -> None:
    res.sent, res.lost, res.duplicated, res.expected = t.sent, t.lost, t.duplicated, t.expected
    if t.lost_ids:
        res.figures["lost_examples"] = t.lost_ids
    if t.dup_ids:
        res.figures["duplicated_examples"] = t.dup_ids
    if t.unexpected:
        res.problems.append(f"{t.unexpected} accepted message(s) for deliveries nobody asked for")


def count_in_doubt_apart(world: World, res: Result, accepted: list[str | None]) -> None:
    """A worker killed with a provider request in flight: its deliveries are sent again, as
    at-least-once requires, and recorded in doubt (the ``in_doubt`` event). Those resends are
    counted apart, as the multi-host faults do; any other duplicate stays a failure."""
    counts = Counter(a for a in accepted if a)
    with world.ctx.engine.connect() as conn:
        rows = conn.execute(select(col(DeliveryEvent.delivery_id)).where(col(DeliveryEvent.status) == "in_doubt"))
        doubt = {r[0] for r in rows}
    resent = sum(n - 1 for d, n in counts.items() if n > 1 and d in doubt)
    res.figures["in_doubt"] = len(doubt)
    if resent:
        res.duplicated -= resent
        res.figures["resent_in_doubt"] = resent
        res.notes.append(f"{resent} resend(s) of deliveries recorded in doubt (killed with the request in flight)")


def check_pool(world: World, res: Result) -> None:
    if not world.pool_alive():
        res.problems.append(f"the worker pool died (exit {world.pool.returncode if world.pool else None})")
        res.figures["pool_log_tail"] = world.pool_tail()
    text = world.pool_tail(200000)
    tb = text.count("Traceback")
    if tb:
        res.figures["pool_log_tracebacks"] = tb
        at = text.rfind("\n", 0, text.index("Traceback"))
        res.figures["pool_log_first_traceback"] = text[at + 1 : at + 1 + 2500]
        res.figures["pool_log_problem_lines"] = sorted(
            {ln[24:200] for ln in text.splitlines() if " ERROR " in ln or " CRITICAL " in ln}
        )[:20]


def restarts(world: World) -> int:
    return world.pool_tail(10**7).count("restarting")


def pct(xs: list[float], p: float) -> float:
    return round(xs[min(len(xs) - 1, int(p * len(xs)))], 2) if xs else float("nan")
