"""A funnel report as CSV rows: the CLI's ``report --csv`` and the console's export."""

from __future__ import annotations

from typing import Any

CSV_COLUMNS = (
    "key", "total", "pending", "sent", "delivered", "opened", "failed", "suppressed",
    "delivery_rate", "open_rate", "failed_by_reason", "suppressed_by_reason",
)  # fmt: skip


def reasons_text(d: dict[str, int]) -> str:
    return "; ".join(f"{k}={v}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))


def csv_rows(rep: dict[str, Any]) -> list[list[Any]]:
    """The report as CSV rows (header first, the total last): the console's export is the same."""
    rows: list[list[Any]] = [[rep["by"], *CSV_COLUMNS[1:]]]
    for g in [*rep["groups"], rep["total"]]:
        rows.append(
            [
                *(g[c] for c in CSV_COLUMNS[:8]),
                "" if g["delivery_rate"] is None else g["delivery_rate"],
                "" if g["open_rate"] is None else g["open_rate"],
                reasons_text(g["failed_by_reason"]),
                reasons_text(g["suppressed_by_reason"]),
            ]
        )
    return rows
