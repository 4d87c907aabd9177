from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from notifyctl.cli.common import JsonOpt, console, err_console, fmt_time, get_ctx, print_json

# Lazy imports: a CLI noun imports its work when it runs, so that `notifyctl --help` loads only what
# the root needs (no worker, campaigns, API or phone-number modules).

app = typer.Typer(help="Device tokens for push (APNs, FCM).", no_args_is_help=True)

MAX_ROWS = 200


@app.command("register")
def register(
    ctx: typer.Context,
    user_id: str,
    token: str = typer.Argument(
        ...,
        help="The device's push token: APNs, hexadecimal (64 digits today); "
        "FCM, the registration token (~160 characters).",
    ),
    platform: str = typer.Option(..., "--platform", help="ios (APNs) or android (FCM)."),
    replaces: str | None = typer.Option(
        None, "--replaces", help="The token this device had before (reinstall, restore, rotation): retired at once."
    ),
    device_id: str | None = typer.Option(
        None,
        "--device-id",
        help="The app's id for this device: the user's other live tokens on it are retired "
        "(one live token per device).",
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Register (or re-activate) a device token for a user.

    When a device gets a new token, name the old one (--replaces) or give the device's id
    (--device-id): the old token is retired at once with the reason `replaced`, and a push is
    never sent to both.

    \b
    Examples:
      notifyctl tokens register alice 8a1f5c0e9b2d47f6a3c18e0d5b7f29c4e6a1d3b8f0c2e4a6b8d0f1e3a5c7b9d2 --platform ios
      notifyctl tokens register alice NEW_TOKEN --platform ios --replaces OLD_TOKEN
      notifyctl tokens register bob FCM_TOKEN --platform android --device-id pixel-7-bob
    """
    from notifyctl.directory import register_device

    reg = register_device(get_ctx(ctx), user_id, token, platform, replaces=replaces, device_id=device_id)
    t = reg.token
    if as_json:
        print_json(
            {
                "user_id": t.user_id,
                "token": t.token,
                "platform": t.platform,
                "device_id": t.device_id,
                "replaced": reg.replaced,
                "replaces_unknown": reg.replaces_unknown,
            }
        )
        return
    device = f" (device {escape(t.device_id)})" if t.device_id else ""
    console.print(f"registered {t.platform} token {t.token[:12]}… for {escape(t.user_id)}{device}")
    for old in reg.replaced:
        console.print(f"retired {old[:12]}…: replaced")
    if reg.replaces_unknown:
        err_console.print("note: --replaces names no registered token; nothing else was retired", markup=False)


@app.command("list")
def list_(
    ctx: typer.Context,
    user: str | None = typer.Option(None, "--user", help="Only this user's tokens."),
    removed: bool = typer.Option(False, "--removed", help="Only removed tokens, with when and why."),
    as_json: bool = JsonOpt,
) -> None:
    """List live device tokens (removed ones, with the reason, with --removed)."""
    from notifyctl.directory import list_tokens

    toks = list_tokens(get_ctx(ctx), user, removed)
    if removed:
        toks = sorted((t for t in toks if t.removed_at is not None), key=lambda t: t.removed_at)  # type: ignore[arg-type,return-value]
    if as_json:
        print_json([t.model_dump() for t in toks])
        return
    table = Table(title=f"{'Removed d' if removed else 'D'}evice tokens ({len(toks)})")
    for col in ("user", "platform", "token", "device", "created", "last success", "removed", "reason"):
        table.add_column(col)
    for t in toks:
        reason = t.removed_reason or ""
        if t.replaced_by:
            reason += f" by {t.replaced_by[:12]}…"
        table.add_row(
            escape(t.user_id),
            t.platform,
            escape(t.token[:16]) + "…",
            escape(t.device_id or ""),
            fmt_time(t.created_at),
            fmt_time(t.last_success_at),
            fmt_time(t.removed_at),
            escape(reason),
        )
    console.print(table)


@app.command("revoke")
def revoke(ctx: typer.Context, token: str) -> None:
    """Remove a token: no more pushes go to it."""
    from notifyctl.directory import revoke_token

    revoke_token(get_ctx(ctx), token)
    console.print("revoked")


@app.command("cleanup")
def cleanup(
    ctx: typer.Context,
    stale_days: int = typer.Option(
        90, "--stale-days", help="Remove tokens without a successful push in this many days."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
    as_json: bool = JsonOpt,
) -> None:
    """Remove stale device tokens (for cron): idempotent, batched, prints what it removed.

    \b
    Example crontab line (03:17 every night):
      17 3 * * *  notifyctl tokens cleanup --stale-days 90 --json >> /var/log/notifyctl-tokens.log
    """
    from notifyctl.maintenance import cleanup_stale_tokens

    res = cleanup_stale_tokens(get_ctx(ctx), stale_days, dry_run=dry_run)
    if as_json:
        print_json(res.to_dict())
        return
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {len(res.removed)} stale token(s) (no success since {fmt_time(res.cutoff)} UTC)")
    if not res.removed:
        return
    shown = res.removed[:MAX_ROWS]
    table = Table()
    for col in ("user", "platform", "token", "created", "last success"):
        table.add_column(col)
    for t in shown:
        table.add_row(
            t["user_id"],
            t["platform"],
            t["token"][:16] + "…",
            fmt_time(t["created_at"]),
            fmt_time(t["last_success_at"]),
        )
    if len(res.removed) > len(shown):
        table.caption = f"first {len(shown)} of {len(res.removed)}; --json lists all"
    console.print(table)
