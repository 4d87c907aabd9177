"""``notifyctl apikeys``: keys for the HTTP API (``notifyctl serve``), hashed at rest."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from notifyctl.cli.common import JsonOpt, console, err_console, fmt_time, get_ctx, print_json

# Lazy imports: a CLI noun imports its work when it runs, so that `notifyctl --help` loads only what
# the root needs (no worker, campaigns, API or phone-number modules).

app = typer.Typer(help="API keys for `notifyctl serve` (stored hashed; shown once at creation).", no_args_is_help=True)


@app.command("create")
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="What the key is for, e.g. checkout-service."),
    scope: str = typer.Option(
        "admin", "--scope", help="send, read, operate or admin (what the key may do; see below)."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Create a key and print it ONCE: it cannot be shown again.

    \b
    Use it as `Authorization: Bearer <key>` or `X-API-Key: <key>`.
    Scopes:
      send     POST /v1/notify, users, device tokens, preferences, push opens (what a service needs)
      read     GET /v1/... (notifications and their timelines, users), /metrics, the console's pages
      operate  read + the console's actions: DLQ replay and purge, campaign pause/resume/cancel
      admin    everything (the default; keys made before scopes existed are admin)
    """
    from notifyctl.api.auth import create_key

    k = create_key(get_ctx(ctx), name, scope)
    if as_json:
        print_json({"id": k.id, "name": k.name, "prefix": k.prefix, "scope": k.scope, "key": k.key})
        return
    err_console.print(
        f"created API key {k.id} ({k.name}, scope {k.scope}); "
        "copy it now, it is not stored and will not be shown again:"
    )
    print(k.key)


@app.command("list")
def list_(
    ctx: typer.Context,
    revoked: bool = typer.Option(True, "--revoked/--live", help="Include revoked keys (default) or live ones only."),
    as_json: bool = JsonOpt,
) -> None:
    """List keys (id, name, prefix, dates); never the keys themselves."""
    from notifyctl.api.auth import list_keys, scope_of

    keys = list_keys(get_ctx(ctx), include_revoked=revoked)
    rows: list[dict[str, Any]] = [
        {
            "id": k.id,
            "name": k.name,
            "prefix": k.prefix,
            "scope": scope_of(k),
            "created_at": k.created_at,
            "revoked_at": k.revoked_at,
        }
        for k in keys
    ]
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"API keys ({len(rows)})")
    for col in ("id", "name", "prefix", "scope", "created", "revoked"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["id"], r["name"], r["prefix"] + "…", r["scope"], fmt_time(r["created_at"]), fmt_time(r["revoked_at"])
        )
    console.print(table)


@app.command("revoke")
def revoke(
    ctx: typer.Context, key: str = typer.Argument(..., help="Key id (key_...) or its displayed prefix.")
) -> None:
    """Revoke a key: requests with it get 401 from now on."""
    from notifyctl.api.auth import revoke_key

    row = revoke_key(get_ctx(ctx), key)
    console.print(f"revoked {row.id} ({row.name})")
