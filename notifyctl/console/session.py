"""The console's sessions: log in with an API key; the console keeps a session id in a cookie
(HttpOnly, SameSite=Strict, Secure when the request came over https or ``public_url`` is https),
the session itself in Redis (the key's id and a CSRF token; 8 hours). Every POST carries the CSRF
token in a hidden field and is refused (403) without it (``checked_form``); the login form has its
own (double-submit cookie). A revoked key ends its sessions on the next page (``session_of``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from fastapi import Request
from fastapi.responses import Response
from sqlmodel import Session

from notifyctl import keys
from notifyctl.api.auth import allows, scope_of
from notifyctl.api.models import ApiKey
from notifyctl.redisconn import RedisUnreachable, unreachable

T = TypeVar("T")

COOKIE = "notify_console"
LOGIN_COOKIE = "notify_console_login"
SESSION_TTL = 8 * 3600
MAX_FORM_BYTES = 64 * 1024


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def sid_key(sid: str) -> str:
    return keys.console_session(hashlib.sha256(sid.encode()).hexdigest())


def _secure(request: Request) -> bool:
    public = getattr(request.app.state.ctx.settings, "public_url", None) or ""
    return request.url.scheme == "https" or public.startswith("https://")


def set_cookie(request: Request, resp: Response, name: str, value: str, max_age: int | None) -> None:
    resp.set_cookie(
        name, value, max_age=max_age, path="/console", httponly=True, samesite="strict", secure=_secure(request)
    )


def sessions(ctx: Any, fn: Callable[[Any], T]) -> T:
    """``fn`` on the sessions' Redis (shard 0 with Redis shards). Unreachable: ``Refused`` (503) naming
    it, on every page, as no session can be read without it (the other shards down, the pages
    open and name them: ``notifyctl.console.data.shards_down``)."""
    try:
        return fn(ctx.redis)
    except Exception as exc:
        if not (isinstance(exc, RedisUnreachable) or unreachable(exc)):
            raise
        where = f"Redis shard 0 of {ctx.shard_count}" if ctx.shard_count > 1 else "Redis"
        raise Refused(
            503, f"{where}, which holds the console's sessions, is unreachable: no page opens until it is back"
        ) from None


def session_of(request: Request) -> dict[str, Any] | None:
    """The logged-in session (``key_id``, ``key_name``, ``csrf``), or None."""
    sid = request.cookies.get(COOKIE)
    if not sid or len(sid) > 128:
        return None
    ctx = request.app.state.ctx
    raw = sessions(ctx, lambda r: r.get(sid_key(sid)))
    if raw is None:
        return None
    sess: dict[str, Any] = json.loads(raw)
    with Session(ctx.engine) as s:
        key = s.get(ApiKey, sess["key_id"])
    if key is None or key.revoked_at is not None or not allows(key, "read"):
        sessions(ctx, lambda r: r.delete(sid_key(sid)))
        return None
    sess["sid"] = sid
    sess["scope"] = scope_of(key)
    sess["can_operate"] = allows(key, "operate")
    return sess


def require_operate(sess: dict[str, Any]) -> None:
    if not sess["can_operate"]:
        raise Refused(403, f"this API key's scope ({sess['scope']}) does not allow this: it needs operate or admin")


async def read_form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise Refused(413, "form too large")
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "malformed form") from None


async def checked_form(request: Request, sess: dict[str, Any]) -> dict[str, str]:
    """The POSTed form, after its CSRF token matched the session's."""
    form = await read_form(request)
    if not hmac.compare_digest(form.get("csrf", ""), sess["csrf"]):
        raise Refused(403, "missing or wrong CSRF token: reload the page and try again")
    return form
