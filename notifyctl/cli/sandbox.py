"""``notifyctl sandbox``: local servers speaking each provider's real wire protocol.

Starts the chosen sandboxes (APNs over HTTP/2 + TLS, FCM with its OAuth2 token endpoint, SendGrid,
Twilio, SMTP, and SES + SNS through moto) in this process, generates throwaway credentials into
``$NOTIFY_HOME/sandbox/`` (mode 0600), prints the ``NOTIFY_*`` lines that point notifyctl at them,
and shows how many messages each one accepted until Ctrl-C.

Ports: free ones by default; with ``--base-port N`` fixed ones, in this order: apns N, apns control
N+1, fcm N+2, sendgrid N+3, twilio N+4, smtp N+5, smtp control N+6, aws (ses/sns) N+7. Every HTTP
sandbox serves the control API (``/_sandbox/messages``, ``/_sandbox/faults``) on its own port; APNs
and SMTP on their control port. The control API reads what was sent (staged OTPs) and injects
faults: it needs ``Authorization: Bearer $NOTIFY_SANDBOX_TOKEN``, a token made at start, shared by
every sandbox of the set and written with the other settings (env file 0600).

The sandboxes are the top-level package ``sandboxes`` of a source checkout (``sandboxes/sandbox_set.py``
is the library this command runs), not part of the wheel; they need the ``[sandbox]`` extra. Without
them the command says so in one line (exit 3).
"""

from __future__ import annotations

import shlex
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import typer

from notifyctl.cli.common import console, get_ctx
from notifyctl.errors import ConfigError, InputError
from notifyctl.home import write_private

if TYPE_CHECKING:
    from sandboxes.sandbox_set import SandboxSet

# Lazy imports: the fake providers (``sandboxes``, a package of the source checkout, not of the wheel)
# and the test-only extras they pull (aiosmtpd, moto) load when the command runs, so that the rest of
# the CLI works without them and this one says what to install.

INSTALL_HINT = (
    "notifyctl sandbox runs the fake providers of a source checkout (sandboxes/, not in the wheel): "
    "run `make install` there, or `pip install -e '.[sandbox]'` and run it from the checkout"
)


@contextmanager
def _needs_sandboxes() -> Iterator[None]:
    """A missing ``sandboxes`` package or extra becomes one line saying what to install."""
    try:
        yield
    except ModuleNotFoundError as exc:
        missing = (exc.name or "a module").partition(".")[0]
        if missing == "sandboxes":
            raise ConfigError(INSTALL_HINT) from None
        raise ConfigError(
            f"notifyctl sandbox needs {missing}, from the [sandbox] extra: "
            "`pip install -e '.[sandbox]'` in the checkout"
        ) from None


def _sandbox_set() -> ModuleType:
    with _needs_sandboxes():
        import sandboxes.sandbox_set

    return sandboxes.sandbox_set


def _table(sbs: SandboxSet, started_at: float) -> Any:
    from rich.table import Table

    table = Table(title=f"notifyctl sandbox — up {int(time.monotonic() - started_at)}s — Ctrl-C to stop")
    for col in ("provider", "endpoint", "control API", "accepted"):
        table.add_column(col)
    counts = sbs.counts()
    for p in sbs.providers:
        table.add_row(p, sbs.endpoint(p), sbs.control_url(sbs.provider_sandbox[p]), str(counts.get(p, 0)))
    return table


def sandbox(
    ctx: typer.Context,
    only: str | None = typer.Option(
        None, "--only", help="Comma-separated sandboxes: apns,fcm,sendgrid,twilio,smtp,ses,sns (aws = ses+sns)."
    ),
    base_port: int = typer.Option(
        0, "--base-port", min=0, max=65527, help="Fixed ports from this one (see the docs); 0 = free ports."
    ),
    env_file: Path | None = typer.Option(None, "--env-file", help="Also write the NOTIFY_* lines to this file (0600)."),
    fault: list[str] = typer.Option(
        [], "--fault", help='Preload faults: SANDBOX:JSON, e.g. apns:\'{"status": 410, "reason": "Unregistered"}\'.'
    ),
) -> None:
    """Run local provider sandboxes (real wire protocols) and print the settings that use them."""
    ss = _sandbox_set()
    providers = ss.parse_only(only)
    faults = [ss.parse_fault(f) for f in fault]  # all input checked before anything starts
    if base_port and base_port < 1024:
        raise InputError("--base-port: use a port >= 1024 (or 0 for free ports)")
    settings = get_ctx(ctx).settings
    sbs = ss.SandboxSet(
        Path(settings.home) / "sandbox",
        providers,
        base_port=base_port,
        email_from=settings.email_from,
        voice="providers_voice" in type(settings).model_fields,
    )
    for name, _ in faults:
        if name not in sbs.needed:
            raise InputError(f"--fault {name}: that sandbox is not started (see --only)")
    with _needs_sandboxes():  # moto loads when the AWS sandbox starts
        sbs.start()
    previous = None
    try:
        try:
            previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop cleanly on SIGTERM too
        except ValueError:  # not the main thread
            previous = None
        for name, fs in faults:
            sbs.add_faults(name, fs)
        lines = sbs.env_lines()
        if env_file is not None:
            try:
                write_private(env_file, ("\n".join(lines) + "\n").encode())
            except OSError as exc:
                raise InputError(f"--env-file {env_file}: {exc.strerror}") from None
        sys.stdout.write("# point notifyctl at the sandboxes (keys in " + str(sbs.directory) + "):\n")
        sys.stdout.write("\n".join(lines) + "\n")
        if env_file is not None:
            sys.stdout.write(f"# written to {env_file}; load with: set -a; . {shlex.quote(str(env_file))}; set +a\n")
        sys.stdout.flush()
        _run_until_interrupted(sbs)
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        sbs.stop()
    console.print("sandboxes stopped")


def _run_until_interrupted(sbs: SandboxSet) -> None:
    started = time.monotonic()
    if console.is_terminal:
        from rich.live import Live

        with Live(_table(sbs, started), console=console, refresh_per_second=2) as live:
            while True:
                time.sleep(0.5)
                live.update(_table(sbs, started))
    console.print(_table(sbs, started))
    last = sbs.counts()
    while True:  # not a terminal: one line per change, fit for a log
        time.sleep(0.5)
        now = sbs.counts()
        for p, n in now.items():
            if n != last.get(p):
                sys.stdout.write(f"{p}: {n} accepted\n")
        sys.stdout.flush()
        last = now
