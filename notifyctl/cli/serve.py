"""``notifyctl serve``: the HTTP API, provider webhooks, unsubscribe links and open pixels (uvicorn)."""

from __future__ import annotations

import typer

from notifyctl.cli.common import err_console, get_ctx, warn_shards_down, warn_split_stores
from notifyctl.errors import InputError

# Lazy imports: a CLI noun imports its work when it runs, so that `notifyctl --help` loads only what
# the root needs (no worker, campaigns, API or phone-number modules).


def serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (0.0.0.0 for all)."),
    port: int = typer.Option(8000, "--port", help="TCP port (0 = any free port)."),
    log_level: str = typer.Option("info", "--log-level", help="critical | error | warning | info | debug."),
    proxy_headers: bool = typer.Option(
        False, "--proxy-headers", help="Trust X-Forwarded-* from --forwarded-allow-ips (behind a reverse proxy)."
    ),
    forwarded_allow_ips: str = typer.Option("127.0.0.1", "--forwarded-allow-ips", help="Proxies trusted."),
) -> None:
    """Serve the HTTP API: POST /v1/notify and friends (API key), /webhooks/* (provider signatures),
    /u/<token> (one-click unsubscribe), /o/<token>.gif (open pixel), /healthz, docs at /docs.

    \b
    Examples:
      notifyctl apikeys create my-service        # prints the key once
      notifyctl serve --host 0.0.0.0 --port 8000
      curl -H "Authorization: Bearer $KEY" -d @request.json http://127.0.0.1:8000/v1/notify
    """
    import uvicorn

    from notifyctl import logs
    from notifyctl.api.app import create_app
    from notifyctl.api.limits import UVICORN_OPTIONS
    from notifyctl.shards import check as shard_check
    from notifyctl.unsubscribe import check_at_start

    if not 0 <= port <= 65535:
        raise InputError(f"--port: {port} is not a TCP port")
    levels = ("critical", "error", "warning", "info", "debug")
    if log_level not in levels:
        raise InputError(f"--log-level: use one of {', '.join(levels)}")
    c = get_ctx(ctx)
    # notifyctl's own lines (webhook events for unknown messages, SNS confirmations, ...) at the same
    # level as uvicorn's; without this only warnings would reach stderr
    logs.setup(log_level.upper(), json_lines=c.settings.log_format == "json")
    c.engine  # noqa: B018 - fail now (one line) if the database is unusable, not on the first request
    c.redis.ping()  # (shard 0, with shards: it holds what every host shares, sessions among them)
    check_at_start(c.settings)  # a shared database: this host signs links with the others' key, or stops
    # the same Redis shard list as the hosts sharing the database, or stop; a shard down is served
    # degraded (503 naming it), as when it goes down later
    warn_shards_down(shard_check(c).values(), "its users' requests are refused (503) until it answers")
    warn_split_stores(c)  # one line when this host's Redis or database is not the others'
    app = create_app(c)
    err_console.print(f"notifyctl API on http://{host}:{port} (docs: /docs, health: /healthz)")
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        proxy_headers=proxy_headers,
        forwarded_allow_ips=forwarded_allow_ips,
        server_header=False,
        access_log=log_level == "debug",
        **UVICORN_OPTIONS,  # the HTTP parser and its header ceiling (see notifyctl.api.limits)
    )
