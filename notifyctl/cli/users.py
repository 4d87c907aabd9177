from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from notifyctl.cli.common import JsonOpt, console, err_console, get_ctx, print_json
from notifyctl.errors import InputError

app = typer.Typer(help="Import and inspect users.", no_args_is_help=True)


@app.command("import")
def import_(
    ctx: typer.Context,
    csv_file: str = typer.Argument(
        ..., help="CSV with user_id,email,phone,timezone,locale (extra columns kept); - for stdin."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Upsert users from CSV. Phones are normalised to E.164; bad rows are reported by line number
    and skipped (exit code 1 if any)."""
    from notifyctl.directory import import_users

    if csv_file == "-":
        report = import_users(get_ctx(ctx), sys.stdin.buffer)
    else:
        try:
            fh = open(Path(csv_file), "rb")  # noqa: SIM115 - decoded line by line, see decoded_lines
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise InputError(f"cannot read {csv_file!r}: {why}") from None
        with fh:
            report = import_users(get_ctx(ctx), fh)
    if as_json:
        print_json({"imported": report.imported, "errors": [{"line": ln, "error": e} for ln, e in report.errors]})
    else:
        console.print(f"imported {report.imported} user(s)")
        for line, err in report.errors:
            err_console.print(f"line {line}: {err}" if line > 0 else err)
        if report.errors:
            err_console.print(f"{len(report.errors)} row(s) rejected")
    if report.errors:
        raise typer.Exit(1)


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
