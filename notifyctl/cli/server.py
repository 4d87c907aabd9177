from __future__ import annotations

import typer

from notifyctl.cli.common import console, get_ctx

# Lazy imports: a CLI noun imports its work when it runs, so that `notifyctl --help` loads only what
# the root needs (no worker, campaigns, API or phone-number modules).

app = typer.Typer(help="The embedded Redis server (used when NOTIFY_REDIS_URL is unset).", no_args_is_help=True)


@app.command("stop")
def stop(ctx: typer.Context) -> None:
    """Stop this home's embedded Redis server (its data is saved to disk first)."""
    from notifyctl.redisconn import stop_server

    settings = get_ctx(ctx).settings
    stopped = stop_server(settings.home / "redis")
    console.print("stopped" if stopped else "not running")


@app.command("url")
def url(
    ctx: typer.Context,
    show_password: bool = typer.Option(
        False,
        "--show-password",
        help='Print the URL with its password, e.g. for `rq info --url "$(notifyctl redis url --show-password)"`. '
        "Masked (***) by default, so the output is safe to paste.",
    ),
) -> None:
    """Print the Redis URL in use (starting the embedded server if needed); the password is
    masked unless --show-password. A redis+sentinel:// URL is printed as given (RQ's own tools do
    not read that form: give them the current master, `redis-cli -p 26379 SENTINEL
    get-master-addr-by-name SERVICE`).

    \b
    Example (RQ's own tools on notifyctl's queues):
      rq info --url "$(notifyctl redis url --show-password)"
    """
    from notifyctl.redisconn import _safe, redis_url

    real = redis_url(get_ctx(ctx).settings)
    typer.echo(real if show_password else _safe(real))
