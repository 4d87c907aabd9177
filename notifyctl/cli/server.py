from __future__ import annotations

import typer

from notifyctl.cli.common import console, get_ctx

# Lazy imports: a CLI noun imports its work when it runs, so that `notifyctl --help` loads only what
# the root needs (no worker, campaigns, API or phone-number modules).

app = typer.Typer(
    help="The Redis server: the embedded one (used when NOTIFY_REDIS_URL is unset), the URL, the shards.",
    no_args_is_help=True,
)


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


@app.command("shards")
def shards_cmd(
    ctx: typer.Context,
    reset: bool = typer.Option(
        False,
        "--reset",
        help="Forget the shard list the shared database recorded: after a drain, before every host starts "
        "on a new NOTIFY_REDIS_SHARDS.",
    ),
) -> None:
    """The Redis shards (NOTIFY_REDIS_SHARDS): each one's URL (password masked), identity and queue
    depth, and whether the shared database agrees with this host's list."""
    from notifyctl import keys
    from notifyctl import shards as sharding
    from notifyctl.errors import ConfigError
    from notifyctl.redisconn import _safe, shard_urls

    c = get_ctx(ctx)
    if reset:
        console.print("shard list forgotten" if sharding.reset(c.engine) else "no shard list recorded")
        return
    ids = sharding.layout(c)
    for i, (u, ident) in enumerate(zip(shard_urls(c.settings), ids, strict=True)):
        r = c.shard_redis(i)
        depth = sum(int(r.llen(keys.rq_queue(keys.queue_name(p)))) for p in ("high", "normal", "low"))
        console.print(f"shard {i}  {_safe(u)}  id {ident[:8]}  queued jobs {depth}", markup=False, highlight=False)
    try:
        sharding.check(c)
        console.print("the shared database agrees", markup=False)
    except ConfigError as exc:
        console.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(3) from None
