"""``notifyctl providers``: what each route sends through, and whether those providers work.

``list`` shows, per route (``push.ios``, ``push.android``, ``email``, ``sms``, and ``voice`` when the
settings have it), the ordered provider list and each provider's settings with secrets masked.
``check`` asks every configured provider to validate its keys and reach its API without sending
anything. A provider whose settings are incomplete is shown as ``not configured: <why>``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypedDict

import typer
from rich.markup import escape
from rich.table import Table

from notifyctl.cli.common import JsonOpt, console, get_ctx, print_json
from notifyctl.vocabulary import ROUTES, VOICE_ROUTE

# Lazy imports: a CLI noun imports its work when it runs, so that `notifyctl --help` loads only what
# the root needs (no worker, campaigns, API or phone-number modules).

app = typer.Typer(help="Delivery providers: what is configured per route, and whether it works.", no_args_is_help=True)

MASK = "****"
# Settings names that hold secrets (key_id / access_key_id / private_key_id are identifiers, not secrets).
_SECRET_NAME = re.compile(r"(^|_)(key|secret|token|password|json|secret_access_key|auth_token|api_key)$", re.I)
_NOT_SECRET_NAME = re.compile(r"(key_id|key_file|token_url|token_ttl|_file|_url)$", re.I)


def routes_of(settings: Any) -> list[str]:
    """The routes to show: the four channels' routes, plus ``voice`` when the settings define it."""
    routes = list(ROUTES)
    if getattr(settings, "providers_voice", None):
        routes.append(VOICE_ROUTE)
    return routes


def _providers_for(settings: Any, route: str) -> list[str]:
    return list(getattr(settings, "providers_" + route.replace(".", "_"), None) or [])


@dataclass
class Loaded:
    """One provider as loaded from the settings: the instance, or the one-line reason it is not usable."""

    name: str
    routes: list[str] = field(default_factory=list)
    provider: Any = None
    problem: str | None = None  # could not be loaded
    misrouted: list[str] = field(default_factory=list)  # routes it is listed for but does not serve

    def misrouted_problem(self) -> str | None:
        if not self.misrouted:
            return None
        served = getattr(type(self.provider), "routes", ())
        return f"{self.name} does not serve {', '.join(self.misrouted)} (it serves {', '.join(sorted(served))})"

    def problem_for(self, route: str | None = None) -> str | None:
        """Why this provider cannot serve ``route`` (any of its routes when None), or None."""
        if self.problem is not None:
            return self.problem
        if route is None:
            return self.misrouted_problem()
        if route in self.misrouted:
            served = getattr(type(self.provider), "routes", ())
            return f"{self.name} does not serve {route} (it serves {', '.join(sorted(served))})"
        return None


def _secret_values(settings: Any, providers: Iterable[Any]) -> list[str]:
    """Every secret value the output could echo: secret-named provider options (config file and
    ``NOTIFY_<NAME>_*`` environment), the secrets of the settings root and its sections, SecretStr
    fields of loaded provider configs."""
    from pydantic import SecretStr

    values: set[str] = set()

    def consider(key: str, value: Any) -> None:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, dict):
            import json

            value = json.dumps(value)
        if isinstance(value, str) and len(value) >= 4 and _SECRET_NAME.search(key) and not _NOT_SECRET_NAME.search(key):
            values.add(value)

    for options in (getattr(settings, "provider_options", None) or {}).values():
        for key, value in (options or {}).items():
            consider(str(key), value)
    sections = [settings, *(getattr(settings, name, None) for name in ("api", "dlq", "campaign"))]
    for section in sections:  # the root and its sections: SecretStr fields, and secret-named ones
        for name in getattr(type(section), "model_fields", {}):
            value = getattr(section, name, None)
            if isinstance(value, SecretStr) and len(value.get_secret_value()) >= 4:
                values.add(value.get_secret_value())
            elif not name.startswith("providers_"):
                consider(name, value)
    for p in providers:
        config = getattr(p, "config", None)
        if config is None or not hasattr(type(config), "model_fields"):
            continue
        for name in type(config).model_fields:
            value = getattr(config, name, None)
            if isinstance(value, SecretStr) and len(value.get_secret_value()) >= 4:
                values.add(value.get_secret_value())
    # longest first, so that a secret containing another is masked whole
    return sorted(values, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if s in text:
            text = text.replace(s, MASK)
    return text


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]


def load_all(settings: Any, redis: Any | None = None) -> tuple[list[str], dict[str, list[str]], dict[str, Loaded]]:
    """(routes, route -> ordered provider names, name -> Loaded) for the current settings.
    ``redis``: for the provider tokens the workers share (a check then signs with the JWT the
    workers use instead of minting one more, which a strict APNs counts as a token update)."""
    from pydantic import ValidationError

    from worker.providers import REGISTRY, Misconfigured, load_provider

    routes = routes_of(settings)
    by_route = {r: _providers_for(settings, r) for r in routes}
    loaded: dict[str, Loaded] = {}
    for route in routes:
        for name in by_route[route]:
            entry = loaded.get(name)
            if entry is None:
                entry = loaded[name] = Loaded(name)
                if name not in REGISTRY:
                    entry.problem = f"unknown provider {name!r} (known: {', '.join(sorted(REGISTRY))})"
                else:
                    try:
                        entry.provider = load_provider(name, settings, redis=redis)
                    except Misconfigured as exc:
                        entry.problem = _one_line(str(exc))
                    except ValidationError as exc:
                        # field names and messages only: the input values may be secrets
                        errs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                        entry.problem = _one_line(f"{name}: invalid settings: {errs}")
                    except Exception as exc:  # noqa: BLE001 - one line per provider, never a traceback
                        entry.problem = f"{name}: cannot load: {type(exc).__name__}"
            if route not in entry.routes:
                entry.routes.append(route)
    for entry in loaded.values():
        served = getattr(type(entry.provider), "routes", None) if entry.provider is not None else None
        if served is not None:
            entry.misrouted = [r for r in entry.routes if r not in served]
    return routes, by_route, loaded


def _shared_state(context: Any) -> Any | None:
    """The Redis client the workers share provider tokens through, when Redis answers."""
    try:
        client = context.redis
        client.ping()
    except Exception:  # noqa: BLE001 - no Redis for a check is no error: tokens are minted locally
        return None
    return client


def describe(entry: Loaded) -> dict[str, str]:
    p = entry.provider
    if p is None:
        return {}
    return {str(k): str(v) for k, v in p.describe().items()}


def check_one(entry: Loaded) -> str | None:
    """None when the provider works, else a one-line problem. Sends nothing."""
    problem = entry.problem_for()
    if problem is not None:
        return f"not configured: {problem}"
    try:
        problem = entry.provider.check()
    except Exception as exc:  # noqa: BLE001 - a check that crashes is a failed check
        return f"check crashed: {type(exc).__name__}"
    return _one_line(problem) if problem else None


def _close(loaded: dict[str, Loaded]) -> None:
    for entry in loaded.values():
        if entry.provider is not None:
            try:
                entry.provider.close()
            except Exception:  # noqa: BLE001, S110 - closing is best effort
                pass


@app.command("list")
def list_(ctx: typer.Context, as_json: bool = JsonOpt) -> None:
    """Per route, the ordered provider list and each provider's settings (secrets masked)."""
    settings = get_ctx(ctx).settings
    routes, by_route, loaded = load_all(settings)
    try:
        secrets = _secret_values(settings, [e.provider for e in loaded.values() if e.provider is not None])
        rows: list[dict[str, Any]] = []
        for route in routes:
            for order, name in enumerate(by_route[route], start=1):
                entry = loaded[name]
                problem = entry.problem_for(route)
                rows.append(
                    {
                        "route": route,
                        "order": order,
                        "provider": name,
                        "configured": problem is None,
                        "problem": None if problem is None else scrub(f"not configured: {problem}", secrets),
                        "settings": {}
                        if problem is not None
                        else {k: scrub(v, secrets) for k, v in describe(entry).items()},
                    }
                )
    finally:
        _close(loaded)
    if as_json:
        print_json(rows)
        return
    table = Table(title="Providers per route (first = primary, then fallbacks)")
    for col in ("route", "#", "provider", "settings"):
        table.add_column(col, overflow="fold")
    for r in rows:
        if r["configured"]:
            detail = escape("\n".join(f"{k}: {v}" for k, v in r["settings"].items()))
        else:
            detail = f"[yellow]{escape(r['problem'])}[/yellow]"
        table.add_row(r["route"], str(r["order"]), r["provider"], detail)
    if not rows:
        console.print("no providers configured")
        return
    console.print(table)


class _CheckRow(TypedDict):
    """One provider's line in ``providers check``."""

    provider: str
    routes: list[str]
    ok: bool
    problem: str | None
    seconds: float


@app.command("check")
def check(
    ctx: typer.Context,
    as_json: bool = JsonOpt,
) -> None:
    """Validate each configured provider's keys and reachability without delivering anything
    (APNs: a push to a device token no device has, which APNs refuses as BadDeviceToken only
    once it took the key id, team id and key). Exits 1 when any provider fails (or is listed
    for a route but not configured)."""
    context = get_ctx(ctx)
    settings = context.settings
    _, _, loaded = load_all(settings, _shared_state(context))
    entries = list(loaded.values())
    try:

        def timed(entry: Loaded) -> tuple[str | None, float]:
            t0 = time.monotonic()
            problem = check_one(entry)
            return problem, time.monotonic() - t0

        with ThreadPoolExecutor(max_workers=max(1, len(entries))) as pool:
            results = list(pool.map(timed, entries))
        secrets = _secret_values(settings, [e.provider for e in entries if e.provider is not None])
    finally:
        _close(loaded)
    rows: list[_CheckRow] = [
        {
            "provider": e.name,
            "routes": e.routes,
            "ok": problem is None,
            "problem": scrub(problem, secrets) if problem else None,
            "seconds": round(elapsed, 3),
        }
        for e, (problem, elapsed) in zip(entries, results, strict=True)
    ]
    failed = [r for r in rows if not r["ok"]]
    if as_json:
        print_json(rows)
    else:
        table = Table(title="Provider checks (nothing was sent)")
        for col in ("provider", "routes", "result", "time"):
            table.add_column(col, overflow="fold")
        for r in rows:
            result = "[green]ok[/green]" if r["ok"] else f"[red]FAIL[/red] {escape(r['problem'] or '')}"
            table.add_row(r["provider"], ", ".join(r["routes"]), result, f"{r['seconds']:.2f}s")
        console.print(table)
        console.print(f"{len(rows) - len(failed)} ok, {len(failed)} failed")
    if failed:
        raise typer.Exit(1)
