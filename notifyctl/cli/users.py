from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from notifyctl.cli.common import JsonOpt, console, err_console, get_ctx, print_json, short
from notifyctl.errors import InputError

# Lazy imports: a CLI noun imports its work when it runs, so that `notifyctl --help` loads only what
# the root needs (no worker, campaigns, API or phone-number modules).

app = typer.Typer(help="Import, list and inspect users.", no_args_is_help=True)


@contextmanager
def _import_progress(fh: Any, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on the terminal while a CSV is imported: bytes read of the file (rows for
    stdin). Nothing at all when stdout is not a terminal or with --json."""
    if not enabled:
        yield None
        return
    try:
        st = os.fstat(fh.fileno())
        total = st.st_size if stat.S_ISREG(st.st_mode) and st.st_size else None
    except (OSError, AttributeError, ValueError):
        total = None
    columns: list[Any] = [TextColumn("importing users")]
    if total:
        columns += [BarColumn(), DownloadColumn(), TextColumn("{task.fields[rows]:,} rows"), TimeRemainingColumn()]
    else:
        columns += [TextColumn("{task.fields[rows]:,} rows")]
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=False) as bar:
        task = bar.add_task("import", total=total, rows=0)

        def update(rows: int) -> None:
            done = fh.tell() if total else None
            bar.update(task, completed=done, rows=rows)

        yield update
        if total:
            bar.update(task, completed=total)


def _show_progress(as_json: bool) -> bool:
    return not as_json and sys.stdout.isatty() and err_console.is_terminal


@app.command("import")
def import_(
    ctx: typer.Context,
    csv_file: str = typer.Argument(
        ..., help="CSV with user_id,email,phone,timezone,locale (extra columns kept); - for stdin."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Upsert users from CSV. Phones are normalised to E.164; bad rows are reported by line number
    and skipped (exit code 1 if any). A progress bar shows on a terminal."""
    from notifyctl.directory import import_users

    if csv_file == "-":
        fh = sys.stdin.buffer
    else:
        try:
            fh = open(Path(csv_file), "rb")  # noqa: SIM115 - decoded line by line, see decoded_lines
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise InputError(f"cannot read {csv_file!r}: {why}") from None
    try:
        with _import_progress(fh, _show_progress(as_json)) as progress:
            report = import_users(get_ctx(ctx), fh, progress=progress)
    finally:
        if fh is not sys.stdin.buffer:
            fh.close()
    if as_json:
        print_json({"imported": report.imported, "errors": [{"line": ln, "error": e} for ln, e in report.errors]})
    else:
        console.print(f"imported {report.imported} user(s)")
        for line, err in report.errors:
            err_console.print(f"line {line}: {err}" if line > 0 else err, markup=False)
        if report.errors:
            err_console.print(f"{len(report.errors)} row(s) rejected")
    if report.errors:
        raise typer.Exit(1)


@app.command("list")
def list_(
    ctx: typer.Context,
    search: str | None = typer.Option(
        None, "--search", "-s", help="Only users whose id or email contains this (any case)."
    ),
    timezone: str | None = typer.Option(None, "--timezone", help="Only users in this IANA time zone."),
    locale: str | None = typer.Option(None, "--locale", help="Only users with this locale (e.g. fr)."),
    push: bool | None = typer.Option(
        None, "--push/--no-push", help="Only users with (--push) or without (--no-push) a live device token."
    ),
    opted_out: str | None = typer.Option(
        None,
        "--opted-out",
        help="Only users with this opt-out, as `prefs set` takes it: marketing, sms, email:marketing.",
    ),
    limit: int = typer.Option(50, "--limit", "-n", help="At most this many (1-10000)."),
    after: str | None = typer.Option(
        None, "--after", help="Start after this user id (the last one of the previous page)."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """List users in id order, a page at a time, with their live push tokens and opt-outs.

    \b
    Examples:
      notifyctl users list --search example.com --no-push
      notifyctl users list --opted-out marketing --json
      notifyctl users list --limit 1000 --after u0999 --json    # the next page
    """
    from notifyctl.directory import list_users

    rows = list_users(
        get_ctx(ctx),
        after=after,
        limit=limit,
        search=search,
        timezone=timezone,
        locale=locale,
        push=push,
        opted_out=opted_out,
    )
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"Users ({len(rows)}{' shown' if len(rows) == limit else ''})")
    for col in ("user", "email", "phone", "timezone", "locale", "push tokens", "opt-outs"):
        table.add_column(col)
    for u in rows:
        table.add_row(
            escape(u["id"]),
            escape(u["email"] or ""),
            u["phone"] or "",
            u["timezone"],
            escape(u["locale"]),
            str(u["push_tokens"]),
            short(", ".join(u["opt_outs"]), 40),
        )
    if len(rows) == limit:
        table.caption = f"more may follow: --after {escape(rows[-1]['id'])}"
    console.print(table)


@app.command("show")
def show(ctx: typer.Context, user_id: str, as_json: bool = JsonOpt) -> None:
    """A user, their opt-outs and device tokens."""
    from notifyctl.directory import show_user

    info = show_user(get_ctx(ctx), user_id)
    if as_json:
        print_json(info)
        return
    u = info["user"]
    t = Table(show_header=False, title=f"user {u['id']}")
    for k in ("email", "phone", "timezone", "locale"):
        t.add_row(k, str(u[k] or ""))
    for k, v in u["attributes"].items():
        t.add_row(k, str(v))
    t.add_row("opt-outs", ", ".join(f"{o['channel']}:{o['category']}" for o in info["opt_outs"]) or "none")
    t.add_row(
        "tokens",
        ", ".join(
            f"{x['platform']}:{x['token'][:12]}…" + (" (removed)" if x["removed_at"] else "") for x in info["tokens"]
        )
        or "none",
    )
    console.print(t)
