"""Helpers for the fuzz and security tests: case counters, a real uvicorn server, state snapshots."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import func, select
from sqlmodel import Session

from notifyctl.context import Context
from notifyctl.models import Delivery, Notification, OptOut, User

# entry point -> number of hypothesis cases run against it (reported at the end of the module)
CASES: Counter[str] = Counter()


def count(entry_point: str) -> None:
    CASES[entry_point] += 1


def summary() -> list[str]:
    lines = [f"fuzz: {n:5d} cases  {name}" for name, n in sorted(CASES.items())]
    lines.append(f"fuzz: {sum(CASES.values())} cases over {len(CASES)} entry points")
    return lines


def snapshot(ctx: Context) -> dict[str, Any]:
    """Everything a rejected request must leave untouched: SQL rows, RQ jobs and queues, dedup keys."""
    r = ctx.redis
    with Session(ctx.engine) as s:
        rows = {
            m.__name__: s.execute(select(func.count()).select_from(m)).scalar_one()
            for m in (Notification, Delivery, User, OptOut)
        }
    return {
        **rows,
        "queued": sum(r.llen(ctx.queue(p).key) for p in ("high", "normal", "low")),
        "rq_jobs": sum(1 for _ in r.scan_iter("rq:job:*", count=1000)),
        "dedup_keys": sum(1 for _ in r.scan_iter("notif:dedup:*", count=1000)),
    }


class BigStr(str):
    """A huge string that prints short (hypothesis prints failing examples)."""

    def __repr__(self) -> str:
        return f"BigStr({self[:20]!r}... {len(self)} chars)"


class BigBytes(bytes):
    def __repr__(self) -> str:
        return f"BigBytes({self[:20]!r}... {len(self)} bytes)"
