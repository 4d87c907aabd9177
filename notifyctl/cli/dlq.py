"""``notifyctl dlq``: find why deliveries failed for good, replay them once the cause is fixed, or purge them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from notifyctl.cli.common import JsonOpt, console, err_console, fmt_time, get_ctx, print_json, short
from notifyctl.errors import InputError

# Lazy imports: a CLI noun imports its work when it runs, so that `notifyctl --help` loads only what
# the root needs (no worker, campaigns, API or phone-number modules).

app = typer.Typer(
    help="The dead-letter queue: deliveries that failed for good. Inspect, replay, purge.", no_args_is_help=True
)

ChannelOpt = typer.Option(None, "--channel", help="push, email or sms.")
ProviderOpt = typer.Option(None, "--provider", help="Provider that failed it (smtp, apns, twilio, ...).")
ErrorOpt = typer.Option(None, "--error", help="Text in the failure reason (case-insensitive), e.g. 554 or timeout.")
TemplateOpt = typer.Option(None, "--template", help="template_id of the notification.")
OlderOpt = typer.Option(None, "--older-than", help="Failed more than this long ago: 30m, 2h, 7d.")
NewerOpt = typer.Option(None, "--newer-than", help="Failed less than this long ago: 30m, 2h, 7d.")


def _filter(
    channel: str | None,
    provider: str | None,
    error: str | None,
    template: str | None,
    older_than: str | None,
    newer_than: str | None,
    ids: list[str] | None = None,
) -> Any:
    from notifyctl.dlq import DlqFilter

    return DlqFilter.build(channel, provider, error, template, older_than, newer_than, ids or ())


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise InputError(f"--limit: must be at least 1, got {limit}")


@contextmanager
def _progress(total: int, label: str, enabled: bool) -> Iterator[Any]:
    """A progress bar on stderr (stdout stays clean for --json); a no-op callback when disabled."""
    if not enabled or total == 0:
        yield None
        return
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as prog:
        task = prog.add_task(label, total=total)
        yield lambda n: prog.advance(task, n)


@app.command("list")
def list_(
    ctx: typer.Context,
    channel: str | None = ChannelOpt,
    provider: str | None = ProviderOpt,
    error: str | None = ErrorOpt,
    template: str | None = TemplateOpt,
    older_than: str | None = OlderOpt,
    newer_than: str | None = NewerOpt,
    limit: int = typer.Option(50, "--limit", "-n", help="At most this many, most recent first."),
    before: str | None = typer.Option(
        None,
        "--before",
        metavar="ID",
        help="The page after this entry (the previous page's last delivery id): keyset paging, as the console.",
    ),
    as_json: bool = JsonOpt,
) -> None:
    """List DLQ entries: why each failed, how many attempts, when.

    \b
    Examples:
      notifyctl dlq list --channel email --newer-than 2h
      notifyctl dlq list --provider twilio --error 30007 --json
      notifyctl dlq list --before d_01hx...        # the next page: older than that entry
    """
    from notifyctl.dlq import count_entries, list_entries

    _check_limit(limit)
    if before is not None:
        before = before.strip()
        if not before:
            raise InputError("--before: empty delivery id (give the last id of the previous page)")
    f = _filter(channel, provider, error, template, older_than, newer_than)
    c = get_ctx(ctx)
    rows = list_entries(c, f, limit, before=before)
    if as_json:
        print_json(rows)
        return
    total = count_entries(c, f) if len(rows) == limit or before else len(rows)
    table = Table(
        title=f"DLQ: {total} entr{'y' if total == 1 else 'ies'}"
        + (f", showing {len(rows)}" + (f" after {before}" if before else "") if total > len(rows) else "")
    )
    if len(rows) == limit:
        table.caption = f"next page: notifyctl dlq list --before {rows[-1]['delivery_id']} (with the same filters)"
    for col in (
        "delivery",
        "notification",
        "template",
        "channel",
        "route",
        "to",
        "provider",
        "tries",
        "failed at (UTC)",
        "reason",
    ):
        table.add_column(col, overflow="fold" if col in ("delivery", "notification") else "ellipsis")
    for r in rows:
        table.add_row(
            r["delivery_id"],
            r["notification_id"],
            r["template_id"] or "",
            r["channel"],
            r["route"],
            r["address"],
            r["provider"] or "",
            str(r["attempts"]),
            fmt_time(r["failed_at"]),
            short(r["reason"], 48),
        )
    console.print(table)


@app.command("show")
def show(
    ctx: typer.Context,
    delivery_id: str = typer.Argument(..., help="A delivery id (d_...) from `dlq list`."),
    as_json: bool = JsonOpt,
) -> None:
    """One delivery: where it was going, why it failed, and its timeline."""
    from notifyctl.dlq import show_entry

    e = show_entry(get_ctx(ctx), delivery_id.strip())
    if as_json:
        print_json(e)
        return
    d, n = e["delivery"], e["notification"]
    console.print(
        f"[bold]{d['id']}[/bold]  {d['channel']} ({d['route']}) to {d['address']}  status [bold]{d['status']}[/bold]"
        + ("  [red]in DLQ[/red]" if e["in_dlq"] else "")
    )
    console.print(
        f"notification {n['id']}  template {n['template_id']}  recipient {n['recipient_id']}  "
        f"priority {n['priority']}  status {n['status']}"
    )
    console.print(
        f"provider {d['provider'] or '-'}  attempts {d['attempts']}  failed at {fmt_time(d['failed_at']) or '-'}"
    )
    if d["reason"]:
        console.print(f"reason: {d['reason']}", soft_wrap=True)
    ev = Table(title="Timeline")
    for col in ("at (UTC)", "status", "detail"):
        ev.add_column(col)
    for x in e["events"]:
        ev.add_row(fmt_time(x["at"]), x["status"], x["detail"] or "")
    console.print(ev)


# channel, provider, error, template, older_than, newer_than: _filter's positional arguments
_Filters = tuple[str | None, str | None, str | None, str | None, str | None, str | None]


def _select(ids: list[str] | None, all_: bool, filters: _Filters, verb: str) -> Any:
    f = _filter(*filters, ids=ids)
    if ids and not f.ids:
        raise InputError("ID: empty delivery id")
    has_filters = any(v is not None for v in filters)
    if f.ids and (has_filters or all_):
        raise InputError(f"give delivery IDs, or filters, or --all — not both (to {verb})")
    if all_ and has_filters:
        raise InputError(f"--all {verb}s every entry: drop it to {verb} only those matching the filters")
    if not f.ids and not has_filters and not all_:
        raise InputError(f"say what to {verb}: delivery IDs, a filter (--channel, --provider, --error, ...) or --all")
    return f


def _chosen(
    ctx: typer.Context, ids: list[str] | None, all_: bool, filters: _Filters, limit: int | None, verb: str
) -> tuple[Any, Any, int]:
    """What ``replay`` / ``purge`` act on: the context, the filter, and how many entries (at most
    ``limit``)."""
    from notifyctl.dlq import count_entries

    _check_limit(limit)
    f = _select(ids, all_, filters, verb)
    c = get_ctx(ctx)
    total = count_entries(c, f)
    return c, f, min(total, limit) if limit else total


@app.command("replay")
def replay_cmd(
    ctx: typer.Context,
    ids: list[str] | None = typer.Argument(None, metavar="[ID]...", help="Delivery ids (d_...) to replay."),
    all_: bool = typer.Option(False, "--all", help="Replay every DLQ entry."),
    channel: str | None = ChannelOpt,
    provider: str | None = ProviderOpt,
    error: str | None = ErrorOpt,
    template: str | None = TemplateOpt,
    older_than: str | None = OlderOpt,
    newer_than: str | None = NewerOpt,
    limit: int | None = typer.Option(None, "--limit", "-n", help="At most this many."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be replayed."),
    as_json: bool = JsonOpt,
) -> None:
    """Send DLQ entries again (after fixing the cause). Already-sent ones are skipped, never sent twice.

    Replayed deliveries restart their retry schedule; the worker pool picks them up within a second.

    \b
    Examples:
      notifyctl dlq replay d_01hx...                      # one
      notifyctl dlq replay --provider smtp --newer-than 1h --dry-run
      notifyctl dlq replay --all
    """
    from notifyctl.dlq import list_entries, replay

    c, f, total = _chosen(ctx, ids, all_, (channel, provider, error, template, older_than, newer_than), limit, "replay")
    with _progress(total, "dry run" if dry_run else "replaying", not as_json) as cb:
        res = replay(c, f, limit=limit, dry_run=dry_run, progress=cb)
    if as_json:
        print_json(res.to_dict())
        return
    if dry_run:
        entries = {e["delivery_id"]: e for e in list_entries(c, f, limit=200)}
        table = Table(title=f"Would replay {len(res.replayed)}, skip {len(res.skipped_sent)} already sent")
        for col in ("delivery", "notification", "channel", "to", "provider", "reason", "action"):
            table.add_column(col)
        for did, action in [(d, "replay") for d in res.replayed] + [(d, "skip: sent") for d in res.skipped_sent]:
            e = entries.get(did)
            if e is None:
                continue
            table.add_row(
                did,
                e["notification_id"],
                e["channel"],
                e["address"],
                e["provider"] or "",
                short(e["reason"], 40),
                action,
            )
        if len(entries) < res.matched:
            table.caption = f"first {len(entries)} of {res.matched} shown; --json lists every id"
        console.print(table)
        return
    console.print(
        f"replayed {len(res.replayed)}"
        + (f", skipped {len(res.skipped_sent)} already sent" if res.skipped_sent else "")
        + (" (the worker pool sends them now)" if res.replayed else "")
    )


@app.command("purge")
def purge_cmd(
    ctx: typer.Context,
    ids: list[str] | None = typer.Argument(None, metavar="[ID]...", help="Delivery ids (d_...) to purge."),
    all_: bool = typer.Option(False, "--all", help="Purge every DLQ entry."),
    channel: str | None = ChannelOpt,
    provider: str | None = ProviderOpt,
    error: str | None = ErrorOpt,
    template: str | None = TemplateOpt,
    older_than: str | None = OlderOpt,
    newer_than: str | None = NewerOpt,
    limit: int | None = typer.Option(None, "--limit", "-n", help="At most this many."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only count what would be purged."),
    as_json: bool = JsonOpt,
) -> None:
    """Give up on DLQ entries: they leave the DLQ but stay failed, with their history.

    \b
    Examples:
      notifyctl dlq purge --older-than 30d --yes
      notifyctl dlq purge --error "invalid recipient"
    """
    from notifyctl.dlq import purge

    c, f, total = _chosen(ctx, ids, all_, (channel, provider, error, template, older_than, newer_than), limit, "purge")
    if total and not yes and not dry_run:
        typer.confirm(
            f"Purge {total} DLQ entr{'y' if total == 1 else 'ies'}? They will not be retried", abort=True, err=True
        )
    with _progress(total, "purging", not as_json and not dry_run) as cb:
        res = purge(c, f, limit=limit, dry_run=dry_run, progress=cb)
    if as_json:
        print_json(res.to_dict())
        return
    by = ", ".join(f"{k} {v}" for k, v in sorted(res.by_channel.items()))
    console.print(f"{'would purge' if dry_run else 'purged'} {res.purged}" + (f" ({by})" if by else ""))


@app.command("stats")
def stats_cmd(
    ctx: typer.Context,
    window: float = typer.Option(5.0, "--window", help="Minutes over which growth is measured."),
    as_json: bool = JsonOpt,
) -> None:
    """DLQ depth and growth rate (entries per minute), by channel and provider."""
    from notifyctl.dlq import stats

    st = stats(get_ctx(ctx), window)
    if as_json:
        print_json(st)
        return
    console.print(
        f"DLQ depth [bold]{st['depth']}[/bold]  growth {st['growth_per_min']:g}/min over {window:g} min "
        f"({st['entered_in_window']} entered)  oldest {fmt_time(st['oldest_failed_at']) or '-'}"
    )
    if st["depth"]:
        table = Table()
        table.add_column("by")
        table.add_column("entries", justify="right")
        for k, v in sorted(st["by_channel"].items()):
            table.add_row(f"channel {k}", str(v))
        for k, v in sorted(st["by_provider"].items()):
            table.add_row(f"provider {k}", str(v))
        console.print(table)
