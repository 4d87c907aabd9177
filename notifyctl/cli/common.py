"""What every command shares: the Context on the Typer context, console output, JSON output."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from notifyctl.context import Context
from notifyctl.settings import load_settings

if TYPE_CHECKING:
    from notifyctl.shards import ShardDown

# Lazy imports: a CLI noun imports its work when it runs, so that `notifyctl --help` loads only what
# the root needs (no worker, campaigns, API or phone-number modules).

# Wide enough for the delivery tables when output goes to a pipe or a CI log.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False)


def get_ctx(ctx: typer.Context) -> Context:
    """The Context the root callback built. A sub-app run on its own (``notifyctl.cli.providers.app``)
    has no root callback: its first command builds the settings root here, once."""
    root = ctx.find_root()
    obj: Context | None = root.obj
    if obj is None:
        obj = root.obj = Context(load_settings())
    return obj


def warn_split_stores(c: Context) -> None:
    """At ``worker``/``serve`` start: register this host's stores, print a split (``notifyctl.stores``)."""
    from notifyctl.stores import check

    warning = check(c)
    if warning:
        err_console.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)


def warn_shards_down(down: Iterable[ShardDown], then: str) -> None:
    """At ``worker``/``serve`` start: one line per Redis shard down (``notifyctl.shards.check``)."""
    for d in down:
        err_console.print(
            f"warning: Redis shard {d.shard} ({d.url}) does not answer ({d.error}): {then}",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip


def _default(o: Any) -> Any:
    if isinstance(o, datetime):
        return o.isoformat().replace("+00:00", "Z")
    if hasattr(o, "model_dump"):
        return o.model_dump()
    return str(o)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=_default, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def fmt_time(dt: datetime | None) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%S") if dt else ""


def short(text: str | None, n: int = 24) -> str:
    if not text:
        return ""
    return text if len(text) <= n else text[: n - 1] + "…"


JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table.")
