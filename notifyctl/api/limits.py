"""What the HTTP server accepts before any route looks at a request: header sizes, body sizes, JSON.

- Headers: :class:`HeaderLimits` (ASGI middleware) answers 431 with a one-line JSON error naming the
  header when one header is longer than :data:`MAX_HEADER_BYTES` or all of them together exceed
  :data:`MAX_HEADERS_BYTES`. Below it, uvicorn's HTTP/1.1 parser (h11, pinned by
  :data:`UVICORN_OPTIONS`) keeps a protocol ceiling of its own, :data:`H11_MAX_HEAD_BYTES`, above ours:
  h11 only enforces its limit when a request head arrives in several reads (then it answers a
  plain-text 400 and closes the connection, which a client still writing sees as a reset), and not
  at all when it arrives in one.
- Bodies: :func:`read_body` reads in chunks and stops keeping them at the route's limit (413). It
  then reads and discards what the client is still sending, up to :data:`DRAIN_BYTES`, so that the
  client, which writes its whole body before it reads, gets the 413 instead of a reset.
- JSON: :meth:`LimitedRequest.json` is :func:`notifyctl.jsonload.load_json`. Routes whose body
  FastAPI parses (``body: UserIn``) get it through :class:`LimitedRoute`; the others call
  ``await request.json()`` or :func:`read_body` themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from notifyctl.errors import BadJSON, one_line
from notifyctl.jsonload import load_json

MAX_HEADER_BYTES = 8 * 1024  # one header line (nginx's large_client_header_buffers default)
MAX_HEADERS_BYTES = 32 * 1024  # all of them
H11_MAX_HEAD_BYTES = 64 * 1024  # the parser's own ceiling: above ours, so that ours answers first
DRAIN_BYTES = 64 * 1024 * 1024  # read and discarded past a body limit so the client reads the 413

UVICORN_OPTIONS: dict[str, Any] = {"http": "h11", "h11_max_incomplete_event_size": H11_MAX_HEAD_BYTES}


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"request body larger than {limit} bytes")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or HTTPException 413 once it passes ``limit`` bytes (see the module docstring)."""
    cached = getattr(request, "_body", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise HTTPException(400, "malformed Content-Length")
        if int(declared) > DRAIN_BYTES:
            raise _too_large(limit)  # not worth reading; the client may see a reset
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            if size <= DRAIN_BYTES:
                continue  # discard, keep reading: the answer is 413 whatever comes
            break
        chunks.append(chunk)
    if size > limit:
        raise _too_large(limit)
    body = b"".join(chunks)
    request._body = body  # what Starlette's own Request.body() caches
    return body


class LimitedRequest(Request):
    """A Request whose ``body()`` is :func:`read_body` with the API's ``max_body_bytes`` and whose
    ``json()`` is the project's JSON loader (errors: HTTPException 400, one line)."""

    async def body(self) -> bytes:
        return await read_body(self, self.app.state.api_config.max_body_bytes)

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if not body.strip():
                raise HTTPException(400, "request: empty body (expected a JSON object)")
            try:
                self._json = load_json(body, "request")
            except BadJSON as exc:
                raise HTTPException(400, str(exc)) from None
        return self._json


def is_json(content_type: str | None) -> bool:
    """``application/json`` or an ``application/*+json`` type, whatever its parameters."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class LimitedRoute(APIRoute):
    """The route class of every router: its handler sees a :class:`LimitedRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_json = self.body_field is not None

        async def limited(request: Request) -> Response:
            scope = request.scope
            if takes_json and not is_json(request.headers.get("content-type")):
                # every /v1 body is JSON whatever its label, as POST /v1/notify reads it: `curl -d`
                # labels it a form, and FastAPI would answer 422 about its shape. (Safe: /v1 takes
                # an API key in a header, never a cookie, so no browser form can reach it.)
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
            return await handler(LimitedRequest(scope, request.receive))

        return limited


class HeaderLimits:
    """ASGI middleware: 431 with a one-line JSON error for a header or a head larger than allowed."""

    def __init__(self, app: ASGIApp, max_header: int = MAX_HEADER_BYTES, max_total: int = MAX_HEADERS_BYTES) -> None:
        self.app = app
        self.max_header = max_header
        self.max_total = max_total

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = self._problem(scope.get("headers") or [])
            if problem:
                response = JSONResponse({"error": one_line(problem)}, status_code=431, headers={"Connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _problem(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        total = 0
        for name, value in headers:
            if len(value) > self.max_header:
                shown = name.decode("latin-1")[:40]
                return f"header {shown}: {len(value)} bytes is too long (at most {self.max_header})"
            total += len(name) + len(value) + 4  # ": " and CRLF
        if total > self.max_total:
            return f"request headers: {total} bytes in all is too much (at most {self.max_total})"
        return None
