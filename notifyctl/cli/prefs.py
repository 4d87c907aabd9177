from __future__ import annotations

import typer

from notifyctl.cli.common import JsonOpt, console, get_ctx, print_json
from notifyctl.errors import InputError

# Lazy imports: a CLI noun imports its work when it runs, so that `notifyctl --help` loads only what
# the root needs (no worker, campaigns, API or phone-number modules).

app = typer.Typer(help="Per-user opt-outs, per channel and per category.", no_args_is_help=True)


@app.command("set")
def set_(
    ctx: typer.Context,
    user_id: str,
    off: list[str] = typer.Option(
        [],
        "--off",
        help="Opt out: a channel (email), a category (marketing), CHANNEL:CATEGORY (sms:marketing) or all. Repeatable.",
    ),
    on: list[str] = typer.Option([], "--on", help="Remove an opt-out (same forms as --off). Repeatable."),
    as_json: bool = JsonOpt,
) -> None:
    """Change a user's opt-outs. Takes effect for every notification not yet sent."""
    from notifyctl.directory import set_prefs

    if not off and not on:
        raise InputError("give at least one --off or --on")
    result = set_prefs(get_ctx(ctx), user_id, off, on)
    _print(user_id, result, as_json)


@app.command("show")
def show(ctx: typer.Context, user_id: str, as_json: bool = JsonOpt) -> None:
    """A user's opt-outs."""
    from notifyctl.directory import set_prefs

    _print(user_id, set_prefs(get_ctx(ctx), user_id, [], []), as_json)


def _print(user_id: str, opt_outs: list[tuple[str, str]], as_json: bool) -> None:
    if as_json:
        print_json({"user_id": user_id, "opt_outs": [{"channel": c, "category": k} for c, k in opt_outs]})
    elif not opt_outs:
        console.print(f"{user_id}: no opt-outs (receives every channel and category)")
    else:
        console.print(f"{user_id} opted out of: " + ", ".join(f"{c}:{k}" for c, k in opt_outs))
