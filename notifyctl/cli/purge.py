"""``notifyctl purge``: retention (``notifyctl.retention``), for cron."""

from __future__ import annotations

import typer

from notifyctl.cli.common import JsonOpt, console, err_console, fmt_time, get_ctx, print_json
from notifyctl.cli.dlq import _progress
from notifyctl.errors import InputError

# Lazy imports: a CLI noun imports its work when it runs, so that `notifyctl --help` loads only what
# the root needs (no worker, campaigns, API or phone-number modules).


def purge(
    ctx: typer.Context,
    older_than: str | None = typer.Option(
        None,
        "--older-than",
        help="Delete what was created longer ago than this: 90d, 12w, 2160h. "
        "Default: NOTIFY_RETENTION_DAYS. At least the dedup window (NOTIFY_DEDUP_TTL).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only count what would be deleted."),
    as_json: bool = JsonOpt,
) -> None:
    """Delete old notifications with their deliveries and events, in small batches (workers keep going).

    Kept however old: what is in flight (queued, retrying, scheduled, paused).

    Kept too: what has a delivery still in the DLQ (deal with it by `dlq replay` or `dlq purge` first).

    Kept too: the notifications of a campaign whose launch has not finished (`campaign launch --resume`).

    \b
    Example crontab line (04:10 every night):
      10 4 * * *  notifyctl purge --older-than 90d --json >> /var/log/notifyctl-purge.log
    """
    from notifyctl.dlq import parse_duration
    from notifyctl.retention import check_older_than, count_old
    from notifyctl.retention import purge as run_purge

    c = get_ctx(ctx)
    if older_than is not None:
        seconds = parse_duration(older_than, "--older-than")
    elif c.settings.retention_days is not None:
        seconds = c.settings.retention_days * 86400.0
    else:
        raise InputError("--older-than: give one (such as 90d) or set NOTIFY_RETENTION_DAYS")
    check_older_than(c, seconds)
    show_progress = not as_json and err_console.is_terminal
    total = count_old(c, seconds) if show_progress else 0
    with _progress(total, "counting" if dry_run else "purging", show_progress) as cb:
        res = run_purge(c, seconds, dry_run=dry_run, progress=cb)
    if as_json:
        print_json(res.to_dict())
        return
    verb = "would delete" if dry_run else "deleted"
    console.print(
        f"{verb} {res.notifications} notification(s), {res.deliveries} deliveries, {res.events} events "
        f"created before {fmt_time(res.cutoff)} UTC"
    )
    if res.dedup_keys:
        console.print(f"{verb} {res.dedup_keys} expired dedup key(s)")
    if res.kept:
        console.print(f"kept {res.kept} as old: in flight or in the DLQ")
