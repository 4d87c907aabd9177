from __future__ import annotations

import json

import typer
from rich.table import Table

from notifyctl.cli.common import JsonOpt, console, get_ctx, print_json
from notifyctl.errors import InputError

app = typer.Typer(help="Notification templates (TOML + Jinja2).", no_args_is_help=True)


@app.command("list")
def list_(ctx: typer.Context, as_json: bool = JsonOpt) -> None:
    """Every template id with its category, priority and channels."""
    ts = get_ctx(ctx).templates.all()
    if as_json:
        print_json(
            [
                {
                    "id": t.id,
                    "category": t.category,
                    "priority": t.priority,
                    "channels": t.channels,
                    "description": t.description,
                    "source": str(t.source),
                }
                for t in ts
            ]
        )
        return
    table = Table(title="Templates")
    for col in ("id", "category", "priority", "channels", "description"):
        table.add_column(col)
    for t in ts:
        table.add_row(t.id, t.category, t.priority, ",".join(t.channels), t.description)
    console.print(table)


@app.command("show")
def show(ctx: typer.Context, template_id: str, as_json: bool = JsonOpt) -> None:
    """A template's category, priority, sample data and source text of every part."""
    t = get_ctx(ctx).templates.get(template_id)
    if as_json:
        print_json({"id": t.id, "category": t.category, "priority": t.priority, "description": t.description,
                    "channels": t.channels, "sample": t.sample, "parts": t.parts, "source": str(t.source)})  # fmt: skip
        return
    console.print(f"[bold]{t.id}[/bold]  {t.category}, priority {t.priority}  ({t.source})", highlight=False)
    if t.description:
        console.print(t.description)
    console.print(f"sample data: {json.dumps(t.sample)}", markup=False)
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
    """Preview every channel of a template rendered with the given (or sample) data."""
    t = get_ctx(ctx).templates.get(template_id)
    if data is None:
        values = t.sample
    else:
        try:
            values = json.loads(data)
        except json.JSONDecodeError as exc:
            raise InputError(f"--data: malformed JSON: {exc}") from None
        if not isinstance(values, dict):
            raise InputError("--data: expected a JSON object")
    out = {c: t.render(c, values) for c in t.channels}
    if as_json:
        print_json(out)
        return
    for channel, parts in out.items():
        console.rule(f"{template_id} · {channel}")
        for name, text in parts.items():
            console.print(f"[bold]{name}:[/bold] {text}", markup=True, highlight=False)


@app.command("validate")
def validate(ctx: typer.Context) -> None:
    """Render every template with its sample data; exit 2 on the first that fails."""
    store = get_ctx(ctx).templates
    for tid in store.ids():
        t = store.get(tid)
        for c in t.channels:
            t.render(c, t.sample)
        console.print(f"ok  {tid}")
