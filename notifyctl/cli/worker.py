from __future__ import annotations

import typer

from notifyctl.cli.common import JsonOpt, console, get_ctx, print_json, warn_shards_down, warn_split_stores
from notifyctl.errors import InputError
from notifyctl.settings import PRIORITIES

# Lazy imports: a CLI noun imports its work when it runs, so that `notifyctl --help` loads only what
# the root needs (no worker, campaigns, API or phone-number modules).


def _queues(text: str) -> list[str]:
    qs = [q.strip() for q in text.split(",") if q.strip()]
    bad = [q for q in qs if q not in PRIORITIES]
    if bad or not qs:
        raise InputError(f"--queues: unknown queue {', '.join(bad) or '(none)'} (use high, normal, low)")
    return qs


def worker(
    ctx: typer.Context,
    queues: str = typer.Option("high,normal,low", "--queues", "-q", help="Priority queues to serve, comma-separated."),
    burst: bool = typer.Option(False, "--burst", "-b", help="Drain the queues (and due retries), then exit."),
    pool: int = typer.Option(1, "--pool", "-n", min=1, max=64, help="Number of worker processes."),
    shards: str | None = typer.Option(
        None,
        "--shards",
        help="Redis shards to serve, e.g. 0,1 (NOTIFY_REDIS_SHARDS; default: all), a worker each at least.",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every delivery outcome (INFO)."),
    log_json: bool = typer.Option(
        False, "--log-json", help="Log one JSON object per line (or NOTIFY_LOG_FORMAT=json)."
    ),
) -> None:
    """Run the RQ worker pool: enrich, apply opt-outs and rate limits, send, track.

    Workers never fork per job. With --pool 2 or more, one worker serves only the high queue,
    so OTPs never wait behind marketing. A supervisor restarts dead workers and, every second,
    queues due retries and recovers the work of killed workers.
    """
    from notifyctl import logs
    from notifyctl import shards as sharding
    from notifyctl.unsubscribe import check_at_start
    from worker.pool import Pool, run_worker

    app_ctx = get_ctx(ctx)
    s = app_ctx.settings
    logs.setup("INFO" if verbose else s.log_level.upper(), json_lines=log_json or s.log_format == "json")
    qs = _queues(queues)
    served = list(range(app_ctx.shard_count))
    if shards is not None:
        try:
            served = sharding.parse_list(shards, app_ctx.shard_count)
        except ValueError as exc:
            raise InputError(f"--shards: {exc}") from None
    if pool < len(served) and not (burst and pool == 1):
        raise InputError(f"--pool {pool}: fewer workers than the {len(served)} shards served (one each at least)")
    # start/verify Redis and the database before forking; shard 0 must answer (it holds what every
    # host shares: circuits, pacing, metrics), another shard may be down
    app_ctx.redis  # noqa: B018
    app_ctx.engine  # noqa: B018
    check_at_start(s)  # a shared database: this host signs links with the others' key, or stops
    # the same shard list as the hosts sharing the database, or stop; a shard down waits
    down = {shard: d for shard, d in sharding.check(app_ctx).items() if shard in served}
    warn_shards_down(down.values(), "its workers start when it answers and agrees with the shared database")
    warn_split_stores(app_ctx)  # one line when this host's Redis or database is not the others'
    if burst and pool == 1:
        for shard in (shard for shard in served if shard not in down):
            run_worker(app_ctx.settings, qs, burst=True, reconcile=True, shard=shard)
        return
    if not burst:
        on = f" on shards {', '.join(map(str, served))}" if app_ctx.shard_count > 1 else ""
        console.print(f"notifyctl worker: {pool} process(es){on} on queues {', '.join(qs)}; Ctrl-C to stop")
    Pool(app_ctx.settings, qs, pool, burst=burst, shards=served, pending=down).run()
    live = [shard for shard in served if shard not in down]
    if burst and live:
        from worker.reconciler import reconcile

        res = reconcile(app_ctx, force=True, shards=live)
        if res.retries_queued or res.recovered:
            for shard in live:
                run_worker(app_ctx.settings, qs, burst=True, reconcile=True, shard=shard)


def reconcile_cmd(ctx: typer.Context, as_json: bool = JsonOpt) -> None:
    """Run one reconciliation round now: queue due retries and recover lost jobs."""
    from worker.reconciler import reconcile

    res = reconcile(get_ctx(ctx), force=True)
    if as_json:
        print_json(res.__dict__)
    else:
        console.print(
            f"retries queued: {res.retries_queued}  recovered: {res.recovered}  jobs checked: {res.checked_jobs}"
        )


def demo(
    ctx: typer.Context,
    keep: bool = typer.Option(False, "--keep", help="Keep the previous demo data instead of starting afresh."),
) -> None:
    """Load demo users, devices and templates, send a handful of notifications (one duplicate,
    one opted out, one over the rate limit), run the workers and print the delivery table."""
    from notifyctl.cli.demo import run_demo

    run_demo(get_ctx(ctx), keep=keep)
