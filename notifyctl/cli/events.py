from __future__ import annotations

import typer
from rich.table import Table

from notifyctl.cli.common import JsonOpt, console, fmt_time, get_ctx, print_json, short
from notifyctl.tracking import timeline


def events(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="A notification id (n_...) or a dedup key."),
    as_json: bool = JsonOpt,
) -> None:
    """Show a notification, each of its deliveries and their status history."""
    t = timeline(get_ctx(ctx), ref)
    if as_json:
        print_json(t)
        return
    n = t["notification"]
    console.print(
        f"[bold]{n['id']}[/bold]  {n['template_id']} → {n['recipient_id']}  priority {n['priority']}  "
        f"category {n['category']}  status [bold]{n['status']}[/bold]"
        + (f" ({n['reason']})" if n.get("reason") else "")
        + (f"  dedup_key {n['dedup_key']}" if n.get("dedup_key") else "")
    )
    table = Table(title="Deliveries", show_lines=False)
    for col in ("delivery", "channel", "route", "to", "status", "attempts", "provider", "provider id", "reason"):
        table.add_column(col)
    for d in t["deliveries"]:
        table.add_row(
            d["id"],
            d["channel"],
            d["route"],
            short(d["address"], 28),
            d["status"],
            str(d["attempts"]),
            d["provider"] or "",
            short(d["provider_message_id"], 20),
            short(d["reason"], 40),
        )
    console.print(table)
    ev = Table(title="Timeline")
    for col in ("at (UTC)", "delivery", "status", "detail"):
        ev.add_column(col)
    for e in t["events"]:
        ev.add_row(fmt_time(e["at"]), e["delivery_id"] or "", e["status"], short(e["detail"], 60))
    console.print(ev)
