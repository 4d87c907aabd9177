"""``notifyctl templates``: list, show, render and validate the TOML + Jinja2 templates; push this
host's files to the database every host shares, pull the database's templates to files."""

from __future__ import annotations

import json
import socket
from typing import Any

import typer
from rich.table import Table

from notifyctl.cli.common import JsonOpt, console, err_console, get_ctx, print_json
from notifyctl.errors import InputError, NotFound, TemplateError
from notifyctl.jsonload import load_json
from notifyctl.template_store import TemplateStore, pull, push
from notifyctl.templates import Template

app = typer.Typer(help="Notification templates (TOML + Jinja2).", no_args_is_help=True)


def _get(store: TemplateStore, template_id: str) -> Template:
    if not store.has(template_id):
        raise NotFound(f"no template {template_id!r} (see `notifyctl templates list`)")
    return store.get(template_id)


def _data_needed(t: Template) -> list[dict[str, Any]]:
    return [
        {
            "name": n.name,
            "required": n.required,
            "secret": n.name in t.secret,
            "channels": list(n.channels),
            "sample": t.sample.get(n.name),
        }
        for n in t.needs()
    ]


@app.command("list")
def list_(ctx: typer.Context, as_json: bool = JsonOpt) -> None:
    """Every template id with its category, priority and channels. A file that cannot be read is
    listed with its problem (exit code 1); the others are listed as usual."""
    loaded = get_ctx(ctx).templates.load_all()
    if as_json:
        print_json(
            [
                {
                    "id": x.template.id,
                    "category": x.template.category,
                    "priority": x.template.priority,
                    "channels": x.template.channels,
                    "description": x.template.description,
                    "source": x.template.where,
                    "origin": x.template.origin,
                    "version": x.template.version,
                    "error": None,
                }
                if x.template is not None
                else {"id": x.id, "source": str(x.path), "error": x.error}
                for x in loaded
            ]
        )
    else:
        table = Table(title="Templates")
        for col in ("id", "category", "priority", "channels", "from", "description"):
            table.add_column(col)
        for x in loaded:
            if x.template is not None:
                t = x.template
                origin = f"database v{t.version}" if t.origin == "database" else t.origin
                table.add_row(t.id, t.category, t.priority, ",".join(t.channels), origin, t.description)
        console.print(table)
        for x in loaded:
            if x.error is not None:
                err_console.print(f"error: {x.error}", markup=False, highlight=False, soft_wrap=True)
    if any(x.error is not None for x in loaded):
        raise typer.Exit(1)


@app.command("show")
def show(ctx: typer.Context, template_id: str, as_json: bool = JsonOpt) -> None:
    """A template's category, priority, the data it needs (required or with a fallback, and its
    sample value), the recipient fields it reads, and the source text of every part."""
    t = _get(get_ctx(ctx).templates, template_id)
    data = _data_needed(t)
    if as_json:
        print_json({"id": t.id, "category": t.category, "priority": t.priority, "description": t.description,
                    "channels": t.channels, "data": data, "user_fields": t.user_fields(), "sample": t.sample,
                    "parts": t.parts, "source": t.where, "origin": t.origin})  # fmt: skip
        return
    console.print(f"[bold]{t.id}[/bold]  {t.category}, priority {t.priority}  ({t.where})", highlight=False)
    if t.description:
        console.print(t.description)
    table = Table(title="data it needs")
    for col in ("name", "required", "secret", "channels", "sample"):
        table.add_column(col)
    for d in data:
        sample = "" if d["sample"] is None else json.dumps(d["sample"])
        table.add_row(
            d["name"],
            "yes" if d["required"] else "no (has a fallback)",
            "yes (never shown, erased once sent)" if d["secret"] else "",
            ",".join(d["channels"]),
            sample,
        )
    console.print(table)
    if t.user_fields():
        console.print(f"recipient fields read: {', '.join('user.' + f for f in t.user_fields())}", markup=False)
    for channel, parts in t.parts.items():
        console.rule(channel)
        for name, text in parts.items():
            console.print(f"{name}:", style="bold")
            console.print(text.strip(), markup=False, highlight=False)


@app.command("render")
def render(
    ctx: typer.Context,
    template_id: str,
    data: str | None = typer.Option(None, "--data", help="JSON object of template data (default: the sample)."),
    as_json: bool = JsonOpt,
) -> None:
    """Preview every channel of a template rendered with the given (or sample) data; ``user`` is
    the sample's recipient ([sample.user]) or a stand-in."""
    t = _get(get_ctx(ctx).templates, template_id)
    values: Any = None
    if data is not None:
        values = load_json(data, "--data")
        if not isinstance(values, dict):
            raise InputError("--data: expected a JSON object")
    preview = t.preview_data(values)
    out = {c: t.render(c, preview) for c in t.channels}
    if as_json:
        print_json(out)
        return
    for channel, parts in out.items():
        console.rule(f"{template_id} · {channel}")
        for name, text in parts.items():
            console.print(f"[bold]{name}:[/bold] {text}", markup=True, highlight=False)


@app.command("validate")
def validate(ctx: typer.Context, as_json: bool = JsonOpt) -> None:
    """Read every template and render each channel with its sample data; each problem on one
    line. Exit code 1 when any template fails."""
    results = []
    for x in get_ctx(ctx).templates.load_all():
        error = x.error
        if x.template is not None:
            try:
                preview = x.template.preview_data()
                for c in x.template.channels:
                    x.template.render(c, preview)
            except TemplateError as exc:
                error = str(exc)
        where = x.template.where if x.template is not None else str(x.path)
        results.append({"id": x.id, "source": where, "ok": error is None, "error": error})
    if as_json:
        print_json(results)
    else:
        for r in results:
            if r["ok"]:
                console.print(f"ok     {r['id']}", markup=False)
            else:
                err_console.print(f"error  {r['id']}: {r['error']}", markup=False, highlight=False, soft_wrap=True)
    if any(not r["ok"] for r in results):
        raise typer.Exit(1)


_IDS = typer.Argument(None, help="Template ids (default: every one).", show_default=False)


@app.command("push")
def push_(ctx: typer.Context, ids: list[str] | None = _IDS, as_json: bool = JsonOpt) -> None:
    """Store this host's template files (NOTIFY_TEMPLATES_DIR, $NOTIFY_HOME/templates) in the
    database, where every host sharing it reads them (within a second). Each file is checked first;
    one bad file and nothing is pushed (exit 2). A pushed template wins over any host's file of the
    same id; an unchanged file keeps its version."""
    c = get_ctx(ctx)
    host = c.settings.host_name or socket.gethostname()
    done = push(c.engine, c.templates, list(ids or []), host)
    if as_json:
        print_json([{"id": p.id, "version": p.version, "status": p.status, "file": p.file} for p in done])
        return
    for p in done:
        console.print(f"{p.status:<9} {p.id} v{p.version}  ({p.file})", markup=False)


@app.command("pull")
def pull_(ctx: typer.Context, ids: list[str] | None = _IDS, as_json: bool = JsonOpt) -> None:
    """Write the database's templates (pushed by any host) to $NOTIFY_HOME/templates as the files
    that were pushed, replacing a local file of the same id; exit 2 for an id the database lacks."""
    c = get_ctx(ctx)
    done = pull(c.engine, c.settings.home / "templates", list(ids or []))
    if as_json:
        print_json([{"id": p.id, "version": p.version, "status": p.status, "file": p.file} for p in done])
        return
    if not done:
        console.print("no templates in the database (see `notifyctl templates push`)", markup=False)
    for p in done:
        console.print(f"{p.status:<9} {p.id} v{p.version}  ({p.file})", markup=False)
