"""``notifyctl``: assembles the nouns. Errors become one line on stderr and an exit code:
2 bad input, 3 configuration/environment, 4 not found, 1 anything else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from typer._click.exceptions import UsageError as _UsageError
from typer.core import TyperGroup

from notifyctl.cli import (
    apikeys,
    campaign,
    dlq,
    events,
    prefs,
    providers,
    purge,
    report,
    sandbox,
    send,
    server,
    status,
    templates,
    tokens,
    users,
    worker,
)
from notifyctl.cli import serve as serve_cmd
from notifyctl.cli.common import err_console
from notifyctl.context import Context
from notifyctl.errors import one_line, translate
from notifyctl.settings import load_settings


class NotifyGroup(TyperGroup):
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _UsageError as exc:
            # one line, like every other error, instead of a box
            where = exc.ctx.command_path if exc.ctx else "notifyctl"
            err_console.print(
                f"[red]error:[/red] {escape(one_line(exc.format_message()))} (see `{escape(where)} --help`)",
                soft_wrap=True,
            )
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except Exception as exc:  # noqa: BLE001 - every error a user can cause ends as one line
            err = translate(exc)
            if err is None:
                raise
            err_console.print(
                f"[red]error:[/red] {escape(one_line(err))}", soft_wrap=True, markup=True, highlight=False
            )
            raise typer.Exit(err.exit_code) from None


app = typer.Typer(
    cls=NotifyGroup,
    help="notifyctl: send push, email and SMS notifications, run the workers, inspect what happened.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def root(
    ctx: typer.Context,
    home: Path | None = typer.Option(
        None, "--home", envvar="NOTIFY_HOME", help="Data directory (default ~/.notifyctl)."
    ),
    redis_url: str | None = typer.Option(
        None, "--redis-url", envvar="NOTIFY_REDIS_URL", help="External Redis; unset = embedded server under home."
    ),
    database_url: str | None = typer.Option(
        None, "--database-url", envvar="NOTIFY_DATABASE_URL", help="SQL database URL; unset = SQLite under home."
    ),
) -> None:
    """Settings come from NOTIFY_* variables and $NOTIFY_HOME/config.toml; these flags override them."""
    overrides: dict[str, Any] = {}
    if home:
        overrides["home"] = home
    if redis_url:
        overrides["redis_url"] = redis_url
    if database_url:
        overrides["database_url"] = database_url
    try:
        ctx.obj = Context(load_settings(**overrides))
    except Exception as exc:
        err = translate(exc)
        if err is None:
            raise
        err_console.print(f"[red]error:[/red] {escape(one_line(err))}", soft_wrap=True)
        raise typer.Exit(err.exit_code) from None


app.command("send")(send.send)
app.command("worker")(worker.worker)
app.command("reconcile")(worker.reconcile_cmd)
app.command("events")(events.events)
app.command("status")(status.status)
app.command("demo")(worker.demo)
app.command("serve")(serve_cmd.serve)
app.command("sandbox")(sandbox.sandbox)
app.command("purge")(purge.purge)
app.command("report")(report.report)
app.add_typer(users.app, name="users")
app.add_typer(tokens.app, name="tokens")
app.add_typer(dlq.app, name="dlq")
app.add_typer(campaign.app, name="campaign")
app.add_typer(apikeys.app, name="apikeys")
app.add_typer(providers.app, name="providers")
app.add_typer(prefs.app, name="prefs")
app.add_typer(templates.app, name="templates")
app.add_typer(server.app, name="redis")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
