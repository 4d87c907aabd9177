"""The funnel read: ``funnel()`` per template, channel, campaign, day or hour from the tiers
``plan`` picks, and ``parse_since`` (``--since``)."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine

from notifyctl.analytics.plan import GROUP, plan
from notifyctl.errors import InputError

BY = ("template", "channel", "campaign", "day", "hour")


_DURATION_RE = re.compile(r"^\s*(\d+)\s*([hdw])\s*$")
_UNITS = {"h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str | None, now: datetime | None = None) -> str | None:
    """``--since``: ``24h`` / ``7d`` / ``2w`` back from now, or a UTC date or date-time
    (``2026-12-01``, ``2026-12-01T08:00``) → the first rollup hour included (``YYYY-MM-DD HH``)."""
    if text is None or not text.strip():
        return None
    now = now or datetime.now(UTC)
    m = _DURATION_RE.match(text)
    if m:
        if int(m.group(1)) <= 0:
            raise InputError(f"--since: expected a positive duration, got {text!r}")
        at = now - timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
    else:
        try:
            at = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise InputError(
                f"--since: expected a duration (24h, 7d, 2w) or a UTC date (2026-12-01), got {text!r}"
            ) from None
        if at.tzinfo is not None:
            at = at.astimezone(UTC)
    return at.strftime("%Y-%m-%d %H")


@dataclass
class Funnel:
    """One group's numbers (what each counts: the ``notifyctl.analytics`` docstring)."""

    key: str
    total: int = 0
    pending: int = 0  # queued or retrying
    sent: int = 0
    delivered: int = 0
    opened: int = 0
    failed: int = 0
    suppressed: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    suppressed_by_reason: dict[str, int] = field(default_factory=dict)

    def add(self, status: str, reason: str, n: int) -> None:
        self.total += n
        if status in ("queued", "retrying"):
            self.pending += n
        if status in ("sent", "delivered", "opened"):
            self.sent += n
        if status in ("delivered", "opened"):
            self.delivered += n
        if status == "opened":
            self.opened += n
        if status == "failed":
            self.failed += n
            self.failed_by_reason[reason or "-"] = self.failed_by_reason.get(reason or "-", 0) + n
        if status == "suppressed":
            self.suppressed += n
            self.suppressed_by_reason[reason or "-"] = self.suppressed_by_reason.get(reason or "-", 0) + n

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["delivery_rate"] = round(self.delivered / self.sent, 4) if self.sent else None
        d["open_rate"] = round(self.opened / self.sent, 4) if self.sent else None
        return d


def funnel(
    engine: Engine,
    by: str = "template",
    since: str | None = None,
    *,
    template: str | None = None,
    channel: str | None = None,
    campaign: str | None = None,
    tier: str = "coarse",
) -> dict[str, Any]:
    """The funnel per ``by`` group (template, channel, campaign, day or hour), from ``since`` (a
    rollup hour, ``parse_since``), optionally for one template / channel / campaign (``""`` is
    "no campaign"). ``{"by", "since", "groups": [Funnel dicts], "total": Funnel dict}``, groups in
    key order. One query, over the coarse tiers and what is not folded into them yet (``plan``;
    ``tier="hourly"``: over the hourly rollup alone, the same numbers, slower at scale)."""
    if by not in GROUP:
        raise InputError(f"--by: expected one of {', '.join(BY)}, got {by!r}")
    mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
    filters = {
        col: value
        for col, value in (("template_id", template), ("channel", channel), ("campaign_id", campaign))
        if value is not None
    }
    sql = "SELECT k, status, reason, sum(n) FROM ({}) AS r GROUP BY k, status, reason"
    with engine.connect() as conn:
        span: tuple[str | None, str | None] = (None, None)
        if since is not None and tier != "hourly" and by in ("template", "channel", "campaign"):
            first, last = conn.exec_driver_sql("SELECT min(day), max(day) FROM analytics_daily WHERE dim = ''").one()
            span = (None if first is None else str(first), None if last is None else str(last))
        sources, params = plan(engine.dialect.name, mark, by, since, filters, tier, span)
        sql = sql.format(" UNION ALL ".join(sources))
        rows: list[tuple[Any, ...]] = [tuple(r) for r in conn.exec_driver_sql(sql, tuple(params)).all()]
    groups: dict[str, Funnel] = defaultdict(lambda: Funnel(""))
    total = Funnel("total")
    for k, status, reason, count in rows:
        n = int(count)
        if not n:
            continue
        f = groups[str(k)]
        f.key = str(k)
        f.add(str(status), str(reason), n)
        total.add(str(status), str(reason), n)
    return {
        "by": by,
        "since": since,
        "groups": [groups[k].to_dict() for k in sorted(groups)],
        "total": total.to_dict(),
    }
