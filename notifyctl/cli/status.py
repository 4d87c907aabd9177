from __future__ import annotations

import json
import os
import sys
import time

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from notifyctl.cli.common import JsonOpt, console, get_ctx, print_json
from worker.status import status_report

# some Redis shards unreachable: the figures shown are the other shards' (every shard or the one
# Redis down is exit 3, as for every command)
SHARD_DOWN = 5


def _down(rep: dict) -> list[dict]:  # type: ignore[type-arg]
    return [x for x in rep.get("redis_shards", []) if not x["ok"]]


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
    wt = Table(title=f"Workers ({len(rep['workers'])} on {len(rep['hosts'])} host(s))")
    for col in ("host", "name", "state", "queues", "job"):
        wt.add_column(col)
    for w in rep["workers"]:
        wt.add_row(w["host"], w["name"], w["state"], ",".join(w["queues"]), w["current_job"] or "")
    st = Table(title="Tracking")
    st.add_column("what")
    st.add_column("counts")
    st.add_row("notifications", "  ".join(f"{k}={v}" for k, v in sorted(rep["notifications"].items())) or "-")
    st.add_row("deliveries", "  ".join(f"{k}={v}" for k, v in sorted(rep["deliveries"].items())) or "-")
    st.add_row("sent, last minute", "  ".join(f"{k}={v}" for k, v in sorted(rep["sent_last_minute"].items())) or "0")
    st.add_row("DLQ depth", str(rep["dlq_depth"]))
    st.add_row("in doubt, sent again", "  ".join(f"{k}={v}" for k, v in sorted(rep["in_doubt"].items())) or "0")
    pt = Table(title="Providers")
    for col in ("provider", "circuit", "failing batches", "retry in (s)", "paced at (req/s)"):
        pt.add_column(col)
    for name, c in rep["providers"].items():
        style = {"open": "red", "half_open": "yellow"}.get(str(c["state"]), "green")
        pt.add_row(
            name,
            f"[{style}]{c['state']}[/{style}]",
            str(c["failing_batches"]),
            str(c["retry_in_s"] or ""),
            "" if c.get("paced_at_per_s") is None else f"{c['paced_at_per_s']:g}",
        )
    if "redis_shards" not in rep:
        return Group(qt, wt, st, pt)
    # a line per shard: a shard down with its error
    lines = [Text("Redis shards", style="italic", justify="center")]
    for x in rep["redis_shards"]:
        state = Text("ok", style="green") if x["ok"] else Text("unreachable", style="bold red")
        said = (x["error"] or "").removeprefix(f"cannot reach Redis at {x['url']}: ")  # the URL is just before
        lines.append(Text.assemble(f"shard {x['shard']}  {x['url']}  ", state, f": {said}" if said else ""))
    if any(x["shard"] == 0 and not x["ok"] for x in rep["redis_shards"]):
        pt.title = "Providers (unknown: shard 0, which holds the circuits, is unreachable)"
    return Group(*lines, qt, wt, st, pt)


def plain_lines(rep: dict) -> list[str]:  # type: ignore[type-arg]
    """The snapshot as plain text lines, for a pipe or a log file (``status --watch`` off a terminal)."""

    def counts(d: dict) -> str:  # type: ignore[type-arg]
        return " ".join(f"{k}={v}" for k, v in sorted(d.items())) or "-"

    lines = [f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} status"]
    for x in rep.get("redis_shards", []):
        lines.append(f"redis shard {x['shard']} {x['url']}: " + ("ok" if x["ok"] else f"unreachable: {x['error']}"))
    for q in rep["queues"]:
        age = "-" if q["oldest_age_s"] is None else f"{q['oldest_age_s']:.1f}s"
        lines.append(
            f"queue {q['queue']}: depth={q['depth']} oldest={age} running={q['started']} failed_jobs={q['failed_jobs']}"
        )
    lines.append(f"workers: {len(rep['workers'])}")
    lines.append(f"hosts: {len(rep['hosts'])} {' '.join(rep['hosts'])}".rstrip())
    for w in rep["workers"]:
        lines.append(
            f"worker {w['name']}: host={w['host']} {w['state']} queues={','.join(w['queues'])} "
            f"job={w['current_job'] or '-'}"
        )
    lines.append(f"notifications: {counts(rep['notifications'])}")
    lines.append(f"deliveries: {counts(rep['deliveries'])}")
    lines.append(f"sent last minute: {counts(rep['sent_last_minute'])}")
    lines.append(f"dlq depth: {rep['dlq_depth']}")
    lines.append(f"in doubt (sent again): {counts(rep['in_doubt']) if rep['in_doubt'] else 0}")
    for name, c in rep["providers"].items():
        lines.append(
            f"provider {name}: circuit={c['state']} failing_batches={c['failing_batches']} "
            f"retry_in={c['retry_in_s'] or '-'} paced_at={c.get('paced_at_per_s') or '-'}"
        )
    return lines


def status(
    ctx: typer.Context,
    as_json: bool = JsonOpt,
    watch: bool = typer.Option(
        False,
        "--watch",
        "-w",
        help="Refresh until Ctrl-C: in place on a terminal; otherwise one snapshot per interval "
        "(plain lines, or one JSON object per line with --json).",
    ),
    interval: float = typer.Option(1.0, "--interval", "-i", min=0.1, help="Seconds between refreshes with --watch."),
    count: int | None = typer.Option(None, "--count", min=1, help="With --watch: stop after this many snapshots."),
) -> None:
    """Queue depth and oldest job age per priority, live workers per host, delivery counts, DLQ
    depth, and deliveries sent again because their worker died mid-send (in doubt).

    With Redis shards, a shard that cannot be reached is listed as unreachable with its error, the
    figures are the other shards', and the exit code is 5 (every shard down: 3, as for one Redis).

    \b
    Examples:
      notifyctl status --watch                         # a live view on a terminal
      notifyctl status --watch --interval 10 >> status.log
      notifyctl status --watch --json --interval 5 | jq .dlq_depth
    """
    app_ctx = get_ctx(ctx)
    if not watch:
        once = status_report(app_ctx)
        if as_json:
            print_json(once)
        else:
            console.print(_render(once))
        if _down(once):
            raise typer.Exit(SHARD_DOWN)
        return
    shown = 0
    rep: dict = {}  # type: ignore[type-arg]
    try:
        if as_json or not console.is_terminal:
            while True:
                rep = status_report(app_ctx)
                if as_json:
                    sys.stdout.write(json.dumps(rep, default=str, separators=(",", ":")) + "\n")
                else:
                    sys.stdout.write("\n".join(plain_lines(rep)) + "\n")
                sys.stdout.flush()
                shown += 1
                if count is not None and shown >= count:
                    break
                time.sleep(interval)
        else:
            rep = status_report(app_ctx)
            with Live(_render(rep), console=console, refresh_per_second=2) as live:
                shown = 1
                while count is None or shown < count:
                    time.sleep(interval)
                    rep = status_report(app_ctx)
                    live.update(_render(rep))
                    shown += 1
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `status --watch | head`: the reader is gone; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if _down(rep):  # the last snapshot's
        raise typer.Exit(SHARD_DOWN)
