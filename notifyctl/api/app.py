"""One module: the HTTP API's routes share one error translation, one auth dependency and one
context; the webhooks and the console live apart; ~440 lines.

The FastAPI application: ``create_app(ctx)``.

Routes (all answers JSON; errors are ``{"error": "<one line>"}``):

- ``POST /v1/notify`` — the seed's request (same validation and answers as ``notifyctl send``);
  ``Idempotency-Key`` header = ``dedup_key`` when the body has none. 202 queued, 200 suppressed.
- ``PUT|GET /v1/users/{id}``; ``POST /v1/users/{id}/tokens``, ``DELETE /v1/users/{id}/tokens/{token}``;
  ``GET|POST /v1/users/{id}/preferences``; ``GET /v1/notifications/{id}`` (deliveries + timeline);
  ``POST /v1/deliveries/{id}/opened`` (push opens reported by the app).
- ``GET /o/{token}.gif`` (email open pixel), ``GET|POST /u/{token}`` (one-click unsubscribe),
  ``/webhooks/...`` (see :mod:`notifyctl.api.webhooks`), ``GET /healthz``, ``/docs``.

``/v1`` needs an API key (``Authorization: Bearer <key>`` or ``X-API-Key``); the others
authenticate differently (provider signatures, signed tokens) or not at all (health, docs).
"""

from __future__ import annotations

import html
import json
import logging
import re
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, FastAPI, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from notifyctl.api.auth import allows, check_key, scope_of
from notifyctl.api.config import ApiConfig, load_api_config
from notifyctl.api.limits import HeaderLimits, LimitedRoute
from notifyctl.api.openapi import install as install_openapi
from notifyctl.api.webhooks import router as webhooks_router
from notifyctl.console import install as install_console
from notifyctl.directory import build_user_row, list_tokens, register_device, revoke_token, show_user, upsert
from notifyctl.directory import set_prefs as _set
from notifyctl.errors import (
    ApiError,
    InputError,
    NotFound,
    NotifyError,
    errors_line,
    one_line,
    translate,
)
from notifyctl.inbound import Event, apply_events, unsubscribe, verify_open_token
from notifyctl.intake import DEDUP_KEY_MAX, NotifyRequest, parse_request, storable, submit
from notifyctl.metrics import render
from notifyctl.models import Delivery, User
from notifyctl.shards import each
from notifyctl.tracking import timeline
from notifyctl.unsubscribe import secret_key, verify_token

log = logging.getLogger("notifyctl.api")

# 1×1 transparent GIF
PIXEL = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------- auth

_bearer = HTTPBearer(auto_error=False, description="API key from `notifyctl apikeys create`")
_header_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key (alternative header)")


def require_key(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
    header_key: str | None = Security(_header_key),
) -> str:
    key = (bearer.credentials if bearer else None) or header_key
    challenge = {"WWW-Authenticate": "Bearer"}
    if not key:
        raise ApiError(401, "missing API key (Authorization: Bearer <key> or X-API-Key)", challenge)
    row = check_key(request.app.state.ctx, key.strip())
    if row is None:
        raise ApiError(401, "invalid or revoked API key", challenge)
    # a key's scope: reading (GET) needs "read", every other /v1 method "send" (see auth.GRANTS)
    need = "read" if request.method in ("GET", "HEAD") else "send"
    if not allows(row, need):
        raise ApiError(403, f"this API key's scope ({scope_of(row)}) does not allow {need}ing here")
    return row.id


# ---------------------------------------------------------------------------------- bodies


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    email: str | None = Field(None, max_length=320)
    phone: str | None = Field(None, max_length=32)
    timezone: str | None = Field(None, max_length=64)
    locale: str | None = Field(None, max_length=16)
    attributes: Annotated[dict[str, str | int | float | bool], AfterValidator(storable)] = Field(default_factory=dict)


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    token: str = Field(min_length=1, max_length=512, description="APNs: hexadecimal; FCM: the registration token")
    platform: str = Field(description="ios or android")
    replaces: str | None = Field(
        None, min_length=1, max_length=512, description="the token this device had before: retired at once"
    )
    device_id: str | None = Field(
        None, min_length=1, max_length=255, description="the app's id for the device: one live token per device"
    )


class PrefsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    off: list[str] = Field(default_factory=list, description="opt out of: email, marketing, sms:marketing, all ...")
    on: list[str] = Field(default_factory=list, description="remove these opt-outs")


def _ctx(request: Request) -> Any:
    return request.app.state.ctx


def _idempotency_key(request: Request) -> str | None:
    idem = request.headers.get("idempotency-key")
    if idem is None:
        return None
    idem = idem.strip()
    if not idem:
        raise ApiError(400, "Idempotency-Key: empty (omit the header, or give a key)")
    if len(idem) > DEDUP_KEY_MAX:
        raise ApiError(400, f"Idempotency-Key: {len(idem)} characters is too long (at most {DEDUP_KEY_MAX})")
    return idem


# ---------------------------------------------------------------------------------- the app


def create_app(ctx: Any, config: ApiConfig | None = None) -> FastAPI:
    app = FastAPI(
        title="notifyctl",
        summary="Send push, email and SMS notifications; receive provider delivery events.",
        version="1",
        docs_url="/docs",
        redoc_url=None,
        # `PUT /v1/users/a%2F` must not answer 307 to `/v1/users/a` (a client following it writes
        # another user): a path no route takes is a 404
        redirect_slashes=False,
    )
    app.router.route_class = LimitedRoute
    app.state.ctx = ctx
    app.state.api_config = config or load_api_config(ctx.settings)
    app.add_middleware(HeaderLimits)
    _install_errors(app)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)], tags=["api"], route_class=LimitedRoute)

    notify_schema = _notify_schema()

    @v1.post(
        "/notify",
        status_code=202,
        summary="Submit one notification",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": notify_schema}}}},
        responses={200: {"description": "suppressed (opted out, duplicate)"}, 202: {"description": "queued"}},
    )
    async def notify(request: Request) -> JSONResponse:
        payload = await request.json()
        if not isinstance(payload, dict):
            raise ApiError(400, "request: expected a JSON object")
        idem = _idempotency_key(request)
        if idem is not None and payload.get("dedup_key") in (None, ""):
            payload["dedup_key"] = idem
        req = parse_request(payload)
        result = await run_in_threadpool(submit, _ctx(request), req)
        return JSONResponse(result.to_dict(), status_code=202 if result.status == "queued" else 200)

    @v1.put("/users/{user_id}", summary="Create or replace a user")
    def put_user(user_id: str, body: UserIn, request: Request) -> dict[str, Any]:
        from sqlmodel import Session

        c = _ctx(request)
        s = c.settings
        row = build_user_row(
            {
                "user_id": user_id,
                "email": body.email,
                "phone": body.phone,
                "timezone": body.timezone,
                "locale": body.locale,
            },
            s.default_region,
            s.default_timezone,
        )
        row["attributes"] = dict(body.attributes)
        with Session(c.engine) as session:
            upsert(session, User, [row], ["id"], ["email", "phone", "timezone", "locale", "attributes", "updated_at"])
            session.commit()
        return show_user(c, row["id"])

    @v1.get("/users/{user_id}", summary="A user with opt-outs and device tokens")
    def get_user(user_id: str, request: Request) -> dict[str, Any]:
        return show_user(_ctx(request), user_id)

    @v1.post("/users/{user_id}/tokens", status_code=201, summary="Register (or re-activate) a device token")
    def post_token(user_id: str, body: TokenIn, request: Request) -> dict[str, Any]:
        reg = register_device(
            _ctx(request), user_id, body.token, body.platform, replaces=body.replaces, device_id=body.device_id
        )
        t = reg.token
        return {
            "user_id": t.user_id,
            "token": t.token,
            "platform": t.platform,
            "device_id": t.device_id,
            "created_at": t.created_at,
            "replaced": reg.replaced,
        }

    @v1.delete("/users/{user_id}/tokens/{token}", summary="Remove a device token")
    def delete_token(user_id: str, token: str, request: Request) -> dict[str, Any]:
        c = _ctx(request)
        if not any(t.token in (token, token.lower()) for t in list_tokens(c, user_id)):
            raise NotFound(f"user {user_id!r} has no live token {token[:12]}…")
        revoke_token(c, token, reason="removed through the API")
        return {"user_id": user_id, "token": token, "removed": True}

    @v1.get("/users/{user_id}/preferences", summary="A user's opt-outs")
    def get_prefs(user_id: str, request: Request) -> dict[str, Any]:
        u = show_user(_ctx(request), user_id)
        return {"user_id": user_id, "opt_outs": [_opt(o) for o in u["opt_outs"]]}

    @v1.post("/users/{user_id}/preferences", summary="Opt out of (off) / back into (on) channels and categories")
    def set_prefs(user_id: str, body: PrefsIn, request: Request) -> dict[str, Any]:
        c = _ctx(request)
        _set(c, user_id, body.off, body.on)
        u = show_user(c, user_id)
        return {"user_id": user_id, "opt_outs": [_opt(o) for o in u["opt_outs"]]}

    @v1.get("/notifications/{ref}", summary="A notification, its deliveries and timeline (id or dedup key)")
    def get_notification(ref: str, request: Request) -> dict[str, Any]:
        return timeline(_ctx(request), ref)

    @v1.post("/deliveries/{delivery_id}/opened", summary="Report a push open from the app")
    def delivery_opened(delivery_id: str, request: Request) -> dict[str, Any]:
        from sqlmodel import Session

        c = _ctx(request)
        with Session(c.engine) as session:
            found = session.get(Delivery, delivery_id)
            if found is None:
                raise NotFound(f"no delivery {delivery_id!r}")
            if found.channel != "push":
                raise ApiError(
                    409,
                    f"delivery {delivery_id!r} is {found.channel}, not push: the app reports push opens only "
                    "(email opens come from the tracking pixel)",
                )
        res = apply_events(c, [Event("app", "opened", delivery_id=delivery_id)])
        with Session(c.engine) as session:
            d = session.get(Delivery, delivery_id)
            return {"delivery_id": delivery_id, "status": d.status if d else None, "changed": res.transitions > 0}

    app.include_router(v1)

    @app.get("/metrics", tags=["api"], dependencies=[Depends(require_key)], summary="Prometheus metrics")
    def metrics_endpoint(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(render(_ctx(request)), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -------------------------------------------------------------- public, token-authenticated

    @app.get("/healthz", tags=["public"], summary="Liveness: SQL and Redis answer")
    def healthz(request: Request) -> JSONResponse:
        from sqlalchemy import text

        c = _ctx(request)
        try:
            with c.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            if c.shard_count == 1:
                c.redis.ping()
                return JSONResponse({"ok": True})
            # every Redis shard, each answering or not: the answer names the shards down (by
            # number: their hosts are no business of an HTTP client; `notifyctl status` shows them)
            _, down = each(c, lambda i: c.shard_redis(i).ping())
        except Exception as exc:  # noqa: BLE001 - health reports, never raises
            return _error(503, f"unhealthy: {type(exc).__name__}")
        if down:
            names = ", ".join(str(i) for i in sorted(down))
            return JSONResponse(
                {
                    "error": f"unhealthy: Redis shard{'s' if len(down) > 1 else ''} {names} of {c.shard_count} "
                    "unreachable",
                    "shards_down": sorted(down),
                },
                status_code=503,
            )
        return JSONResponse({"ok": True})

    @app.get("/o/{token}.gif", tags=["public"], summary="Email open tracking pixel", include_in_schema=True)
    def open_pixel(token: str, request: Request) -> Response:
        c = _ctx(request)
        try:
            delivery_id = verify_open_token(secret_key(c.settings), token)
        except InputError as exc:
            # A mail client gets its image whatever the token (a broken-image icon helps nobody);
            # only a genuine token is recorded.
            log.debug("open pixel not recorded: %s", exc)
        else:
            apply_events(c, [Event("pixel", "opened", delivery_id=delivery_id)])
        return Response(
            PIXEL, media_type="image/gif", headers={"Cache-Control": "no-store, no-cache, must-revalidate, private"}
        )

    @app.get("/u/{token}", tags=["public"], response_class=HTMLResponse, summary="Unsubscribe confirmation page")
    def unsubscribe_page(token: str, request: Request) -> HTMLResponse:
        c = _ctx(request)
        _user, scope = _verified(verify_token, secret_key(c.settings), token)
        what = "all email" if scope == "all" else f"{scope} email"
        cfg: ApiConfig = request.app.state.api_config
        page = _PAGE.format(
            brand=html.escape(cfg.brand),
            body=(
                f"<p>Stop receiving {html.escape(what)} from {html.escape(cfg.brand)}?</p>"
                f'<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
                f'<button type="submit">Unsubscribe</button></form>'
            ),
        )
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.post("/u/{token}", tags=["public"], response_class=HTMLResponse, summary="One-click unsubscribe (RFC 8058)")
    async def unsubscribe_post(token: str, request: Request) -> HTMLResponse:
        c = _ctx(request)
        user_id, scope = _verified(verify_token, secret_key(c.settings), token)
        body = await request.body()
        try:
            form = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        except (UnicodeDecodeError, ValueError):
            form = {}
        if form.get("List-Unsubscribe") != "One-Click":
            raise ApiError(400, "expected the form body List-Unsubscribe=One-Click")
        await run_in_threadpool(unsubscribe, c, user_id, scope)
        cfg: ApiConfig = request.app.state.api_config
        what = "all email" if scope == "all" else f"{scope} email"
        page = _PAGE.format(brand=html.escape(cfg.brand), body=f"<p>You are unsubscribed from {html.escape(what)}.</p>")
        return HTMLResponse(page)

    app.include_router(webhooks_router)
    install_console(app)
    install_openapi(app, lambda: [t.id for t in ctx.templates.load_all() if t.error is None])
    return app


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex"><title>{brand}: unsubscribe</title></head>
<body style="font-family: sans-serif; max-width: 32rem; margin: 3rem auto;">
<h1>{brand}</h1>
{body}
</body></html>
"""


def _verified(fn: Any, key: bytes, token: str) -> Any:
    try:
        return fn(key, token)
    except InputError as exc:  # malformed or forged: either way not a link we made
        raise ApiError(403, str(exc)) from None


def _allowed_methods(request: Request) -> list[str]:
    """Every method the API takes at this path, as its OpenAPI document lists them, plus the
    undocumented routes' (``/docs``). (Starlette's 405 names only the first matching route's:
    ``/v1/users/{id}`` is two routes, GET and PUT.)"""
    from starlette.routing import Match, Route

    app = request.app
    table: list[tuple[re.Pattern[str], set[str]]] | None = getattr(app.state, "path_methods", None)
    if table is None:
        table = []
        for path, ops in app.openapi().get("paths", {}).items():
            parts = re.split(r"(\{[^}/]+\})", path)
            rx = "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts)
            table.append((re.compile(f"^{rx}$"), {m.upper() for m in ops}))
        app.state.path_methods = table
    path = request.url.path
    methods = {m for rx, ms in table if rx.match(path) for m in ms}
    scope = {**request.scope, "method": "GET"}
    for route in app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(scope)[0] != Match.NONE:
            methods |= set(route.methods)
    return sorted(methods)


def _opt(o: dict[str, Any]) -> dict[str, Any]:
    return {"channel": o["channel"], "category": o["category"], "reason": o["reason"], "created_at": o["created_at"]}


def _notify_schema() -> dict[str, Any]:
    schema = NotifyRequest.model_json_schema()
    schema.pop("$defs", None)
    return schema


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(NotifyError)
    async def _notify_error(_request: Request, exc: NotifyError) -> JSONResponse:
        if exc.http_status >= 500:
            log.warning("request failed: %s", one_line(str(exc)))
        return _error(exc.http_status, exc.public or str(exc), exc.headers if isinstance(exc, ApiError) else None)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        status = 400 if errors and errors[0].get("type") == "json_invalid" else 422
        return _error(status, errors_line(errors, skip=("body",)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return _error(exc.status_code, detail, headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # a pydantic error escaping a request is a bug here, not a bad setting as on the CLI
        err = None if isinstance(exc, ValidationError) else translate(exc)
        if err is not None:
            return await _notify_error(request, err)
        log.exception("unexpected error")
        return _error(500, f"internal error ({type(exc).__name__})")
