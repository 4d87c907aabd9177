from __future__ import annotations

import typer

from notifyctl.cli.common import console, get_ctx

app = typer.Typer(help="The embedded Redis server (used when NOTIFY_REDIS_URL is unset).", no_args_is_help=True)


@app.command("stop")
def stop(ctx: typer.Context) -> None:
    """Stop this home's embedded Redis server (its data is saved to disk first)."""
    from notifyctl.redisconn import stop_server

    settings = get_ctx(ctx).settings
    stopped = stop_server(settings.home / "redis")
    console.print("stopped" if stopped else "not running")


@app.command("url")
def url(ctx: typer.Context) -> None:
    """Print the Redis URL in use (starting the embedded server if needed)."""
    from notifyctl.redisconn import _safe, redis_url

    console.print(_safe(redis_url(get_ctx(ctx).settings)))
