"""The console's HTML: its Jinja environment (``templates/``), ``page`` (a page with the headers
every console page carries: no caching, no framing, a strict Content-Security-Policy) and the
charts, drawn as inline SVG (no JavaScript).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from markupsafe import escape

from notifyctl.console.data import shards_down

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _fmt_time(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    return str(v)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


_env.filters["t"] = _fmt_time
_env.filters["pct"] = _pct


def page(request: Request, name: str, sess: dict[str, Any] | None, status: int = 200, **values: Any) -> HTMLResponse:
    """A console page; for a logged-in session, under a banner naming each Redis shard that cannot
    be reached (``shards_down``: those the page met while reading, in ``request.state.shards_down``,
    or else each shard pinged)."""
    down = shards_down(request.app.state.ctx, getattr(request.state, "shards_down", None)) if sess else []
    html = _env.get_template(name).render(
        request_path=request.url.path, csrf=sess["csrf"] if sess else "", session=sess, shards_down=down, **values
    )
    return HTMLResponse(
        html,
        status_code=status,
        headers={
            "Cache-Control": "no-store",
            "X-Frame-Options": "DENY",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            "Referrer-Policy": "same-origin",
        },
    )


def to_login(request: Request) -> RedirectResponse:
    return RedirectResponse("/console/login", status_code=303)


def bars_svg(values: list[tuple[str, int]], width: int = 720, height: int = 120) -> str:
    """A bar chart as inline SVG (escaped labels in <title>)."""
    top = max((v for _, v in values), default=0) or 1
    bw = width / max(1, len(values))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 16}" role="img">']
    for i, (label, v) in enumerate(values):
        h = round(v / top * height, 1)
        parts.append(
            f'<rect x="{i * bw + 1:.1f}" y="{height - h:.1f}" width="{max(1.0, bw - 2):.1f}" height="{h}" '
            f'fill="#4a7bd0"><title>{escape(label)}: {v}</title></rect>'
        )
    parts.append(f'<text x="0" y="{height + 13}" font-size="11">max {top}</text></svg>')
    return "".join(parts)


def funnel_svg(groups: list[dict[str, Any]], width: int = 720) -> str:
    """Horizontal bars per group: sent, delivered, opened, failed, suppressed."""
    colors = {"sent": "#4a7bd0", "delivered": "#2e9e5b", "opened": "#8a5cc2", "failed": "#d04a4a", "suppressed": "#999"}
    top = max((g["total"] for g in groups), default=0) or 1
    row = 18
    label_w = 180
    height = max(1, len(groups)) * (row * 5 + 10)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    y = 0
    for g in groups:
        parts.append(f'<text x="0" y="{y + 13}" font-size="12">{escape(g["key"] or "(none)")}</text>')
        for k, c in colors.items():
            w = round(g[k] / top * (width - label_w - 60), 1)
            parts.append(
                f'<rect x="{label_w}" y="{y}" width="{w}" height="{row - 4}" fill="{c}">'
                f"<title>{k}: {g[k]}</title></rect>"
                f'<text x="{label_w + w + 4}" y="{y + 11}" font-size="11">{k} {g[k]}</text>'
            )
            y += row
        y += 10
    parts.append("</svg>")
    return "".join(parts)
