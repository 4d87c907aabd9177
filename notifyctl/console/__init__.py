"""The operator console at ``/console`` on ``notifyctl serve``: server-rendered pages (Jinja, a
little inline CSS, charts as inline SVG, no JavaScript build), over the same functions as the CLI.

``install`` mounts it on the API's app. The package, a module per job:

- ``session``: log in with an API key, the session in Redis behind a cookie, CSRF on every POST;
- ``routes``: the pages and actions — Overview, DLQ (+ an entry's history, replay and purge with a
  dry run then confirm), Campaigns (+ pause / resume / cancel), Analytics (the funnel, CSV), Lookup;
- ``data``: what the pages show, from Redis and indexed SQL;
- ``render``: the HTML — the Jinja environment, the page headers, the SVG charts.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from notifyctl.console.render import page
from notifyctl.console.routes import router
from notifyctl.console.session import Refused


def install(app: Any) -> None:
    """Mount the console on the FastAPI app. Under ``/console`` an error is a page with the API's
    status and one-line message (the API's own handlers decide both), elsewhere JSON as before."""
    app.include_router(router())

    async def _refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        return page(request, "error.html", None, exc.status, message=exc.message)

    app.add_exception_handler(Refused, _refused)

    for cls, handler in list(app.exception_handlers.items()):
        if cls in (Refused,) or not (isinstance(cls, type) and issubclass(cls, Exception)):
            continue
        app.exception_handlers[cls] = _html_under_console(handler)


def _html_under_console(handler: Any) -> Any:
    async def wrapped(request: Request, exc: Exception) -> Response:
        resp: Response = await handler(request, exc)
        if not request.url.path.startswith("/console") or resp.media_type != "application/json":
            return resp
        try:
            message = json.loads(bytes(resp.body)).get("error") or "error"
        except ValueError:
            message = "error"
        return page(request, "error.html", None, resp.status_code, message=message)

    return wrapped
