"""``notifyctl report``: the delivery funnel (sent → delivered → opened, failed and suppressed by
reason) by template, channel, campaign or day, from the analytics rollup (``notifyctl.analytics``)."""

from __future__ import annotations

import csv
import sys

import typer
from rich.table import Table

from notifyctl.analytics.export import csv_rows, reasons_text
from notifyctl.analytics.read import BY, funnel, parse_since
from notifyctl.cli.common import JsonOpt, console, get_ctx, print_json
from notifyctl.errors import InputError


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def report(
    ctx: typer.Context,
    by: str = typer.Option("template", "--by", help="Group by template, channel, campaign or day (UTC)."),
    since: str | None = typer.Option(
        None, "--since", help="Deliveries queued since: 24h, 7d, 2w back, or a UTC date (2026-12-01). Default: all."
    ),
    template: str | None = typer.Option(None, "--template", help="Only this template_id."),
    channel: str | None = typer.Option(None, "--channel", help="Only push, email or sms."),
    campaign: str | None = typer.Option(None, "--campaign", help="Only this campaign id."),
    as_json: bool = JsonOpt,
    as_csv: bool = typer.Option(False, "--csv", help="CSV on stdout (a row per group, the total last)."),
) -> None:
    """The delivery funnel: sent → delivered → opened, failed and suppressed by reason.

    Counts deliveries by the hour they were queued, as they stand now: a delivery queued
    yesterday and opened today counts as opened in yesterday's row. `sent` is what reached the
    provider (sent, delivered or opened), `delivered` includes opened; `pending` is still
    queued or retrying. Read from the hourly rollup the database keeps up with every status
    change: instant whatever the number of deliveries, and still there after `notifyctl purge`.

    \b
    Examples:
      notifyctl report                          # by template, all time
      notifyctl report --by day --since 7d
      notifyctl report --by channel --campaign spring_sale --json
      notifyctl report --by campaign --csv > campaigns.csv
    """
    if by not in BY[:4]:
        raise InputError(f"--by: expected template, channel, campaign or day, got {by!r}")
    if as_json and as_csv:
        raise InputError("--json and --csv: choose one")
    rep = funnel(get_ctx(ctx).engine, by, parse_since(since), template=template, channel=channel, campaign=campaign)
    if as_json:
        print_json(rep)
        return
    if as_csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerows(csv_rows(rep))
        return
    t = Table(title=f"Delivery funnel by {by}" + (f" since {rep['since']}:00 UTC" if rep["since"] else ""))
    for col in (by, "total", "sent", "delivered", "opened", "deliv. %", "open %", "failed", "suppressed", "pending"):
        t.add_column(col, justify="left" if col == by else "right")
    for g in [*rep["groups"], rep["total"]]:
        label = g["key"] if g is not rep["total"] else "[bold]total[/bold]"
        if by == "campaign" and g["key"] == "":
            label = "(no campaign)"
        t.add_row(
            label, str(g["total"]), str(g["sent"]), str(g["delivered"]), str(g["opened"]),
            _pct(g["delivery_rate"]), _pct(g["open_rate"]), str(g["failed"]), str(g["suppressed"]), str(g["pending"]),
        )  # fmt: skip
    console.print(t)
    for kind in ("failed", "suppressed"):
        reasons = rep["total"][f"{kind}_by_reason"]
        if reasons:
            console.print(f"{kind} by reason: {reasons_text(reasons)}", soft_wrap=True)
