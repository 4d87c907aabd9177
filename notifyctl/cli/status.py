from __future__ import annotations

import time

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from notifyctl.cli.common import JsonOpt, console, get_ctx, print_json
from notifyctl.tracking import status_report


def _render(rep: dict) -> Group:  # type: ignore[type-arg]
    qt = Table(title="Queues")
    for col in ("queue", "depth", "oldest job (s)", "running", "failed jobs"):
        qt.add_column(col)
    for q in rep["queues"]:
        qt.add_row(
            q["queue"],
            str(q["depth"]),
            "" if q["oldest_age_s"] is None else f"{q['oldest_age_s']:.1f}",
            str(q["started"]),
            str(q["failed_jobs"]),
        )
    wt = Table(title=f"Workers ({len(rep['workers'])})")
    for col in ("name", "state", "queues", "job"):
        wt.add_column(col)
    for w in rep["workers"]:
        wt.add_row(w["name"], w["state"], ",".join(w["queues"]), w["current_job"] or "")
    st = Table(title="Tracking")
    st.add_column("what")
    st.add_column("counts")
    st.add_row("notifications", "  ".join(f"{k}={v}" for k, v in sorted(rep["notifications"].items())) or "-")
    st.add_row("deliveries", "  ".join(f"{k}={v}" for k, v in sorted(rep["deliveries"].items())) or "-")
    st.add_row("sent, last minute", "  ".join(f"{k}={v}" for k, v in sorted(rep["sent_last_minute"].items())) or "0")
    st.add_row("DLQ depth", str(rep["dlq_depth"]))
    pt = Table(title="Providers")
    for col in ("provider", "circuit", "failing batches", "retry in (s)"):
        pt.add_column(col)
    for name, c in rep["providers"].items():
        style = {"open": "red", "half_open": "yellow"}.get(str(c["state"]), "green")
        pt.add_row(name, f"[{style}]{c['state']}[/{style}]", str(c["failing_batches"]), str(c["retry_in_s"] or ""))
    return Group(qt, wt, st, pt)


def status(
    ctx: typer.Context,
    as_json: bool = JsonOpt,
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh every second until Ctrl-C."),
) -> None:
    """Queue depth and oldest job age per priority, workers, delivery counts and DLQ depth."""
    app_ctx = get_ctx(ctx)
    if as_json:
        print_json(status_report(app_ctx))
        return
    if not watch:
        console.print(_render(status_report(app_ctx)))
        return
    try:
        with Live(_render(status_report(app_ctx)), console=console, refresh_per_second=2) as live:
            while True:
                time.sleep(1)
                live.update(_render(status_report(app_ctx)))
    except KeyboardInterrupt:
        pass
