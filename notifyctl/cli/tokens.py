from __future__ import annotations

import typer
from rich.table import Table

from notifyctl.cli.common import JsonOpt, console, fmt_time, get_ctx, print_json

app = typer.Typer(help="Device tokens for push (APNs, FCM).", no_args_is_help=True)


@app.command("register")
def register(
    ctx: typer.Context,
    user_id: str,
    token: str,
    platform: str = typer.Option(..., "--platform", help="ios or android."),
) -> None:
    """Register (or re-activate) a device token for a user."""
    from notifyctl.directory import register_token

    t = register_token(get_ctx(ctx), user_id, token, platform)
    console.print(f"registered {t.platform} token {t.token[:12]}… for {t.user_id}")


@app.command("list")
def list_(
    ctx: typer.Context,
    user: str | None = typer.Option(None, "--user", help="Only this user's tokens."),
    removed: bool = typer.Option(False, "--removed", help="Include removed tokens, with why."),
    as_json: bool = JsonOpt,
) -> None:
    """List live device tokens (and removed ones with --removed)."""
    from notifyctl.directory import list_tokens

    toks = list_tokens(get_ctx(ctx), user, removed)
    if as_json:
        print_json([t.model_dump() for t in toks])
        return
    table = Table(title=f"Device tokens ({len(toks)})")
    for col in ("user", "platform", "token", "created", "last success", "removed", "reason"):
        table.add_column(col)
    for t in toks:
        table.add_row(
            t.user_id,
            t.platform,
            t.token[:16] + "…",
            fmt_time(t.created_at),
            fmt_time(t.last_success_at),
            fmt_time(t.removed_at),
            t.removed_reason or "",
        )
    console.print(table)


@app.command("revoke")
def revoke(ctx: typer.Context, token: str) -> None:
    """Remove a token: no more pushes go to it."""
    from notifyctl.directory import revoke_token

    revoke_token(get_ctx(ctx), token)
    console.print("revoked")
