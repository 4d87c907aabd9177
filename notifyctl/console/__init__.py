"""The operator console at ``/console`` on ``notifyctl serve``: server-rendered pages (Jinja, a
little inline CSS, charts as inline SVG, no JavaScript build), over the same functions as the CLI.

Access: log in with an API key; the console keeps a session id in a cookie (HttpOnly,
SameSite=Strict, Secure when the request came over https or ``public_url`` is https), the
session itself in Redis (the key's id and a CSRF token; 8 hours). Every POST carries the CSRF
token in a hidden field and is refused (403) without it; the login form has its own
(double-submit cookie). A revoked key ends its sessions on the next page.

Pages: Overview, DLQ (+ an entry's history, replay and purge with a dry run then confirm),
Campaigns (+ pause / resume / cancel), Analytics (the funnel, CSV), Lookup.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jinja2
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from campaigns import state
from campaigns.models import Campaign
from notifyctl import keys
from notifyctl.analytics import csv_rows, funnel, parse_since
from notifyctl.api.auth import allows, check_key, scope_of
from notifyctl.api.models import ApiKey
from notifyctl.circuit import Circuits
from notifyctl.dlq import DlqFilter, count_entries, list_entries, purge, replay, show_entry
from notifyctl.dlq import stats as dlq_stats
from notifyctl.errors import InputError, NotFound, NotifyError, one_line
from notifyctl.liveness import by_host, live_workers_of
from notifyctl.metrics import BUCKETS, IN_DOUBT, LATENCY, SENT_PER_MIN, queue_stats
from notifyctl.models import Notification
from notifyctl.tracking import timeline

COOKIE = "notify_console"
LOGIN_COOKIE = "notify_console_login"
SESSION_TTL = 8 * 3600
MAX_FORM_BYTES = 64 * 1024
LAG_THRESHOLDS = ("lag_alert_high", "lag_alert_normal", "lag_alert_low")

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


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ── sessions ──────────────────────────────────────────────────────────────────────────────────


def _sid_key(sid: str) -> str:
    return keys.console_session(hashlib.sha256(sid.encode()).hexdigest())


def _secure(request: Request) -> bool:
    public = getattr(request.app.state.ctx.settings, "public_url", None) or ""
    return request.url.scheme == "https" or public.startswith("https://")


def _set_cookie(request: Request, resp: Response, name: str, value: str, max_age: int | None) -> None:
    resp.set_cookie(
        name, value, max_age=max_age, path="/console", httponly=True, samesite="strict", secure=_secure(request)
    )


def session_of(request: Request) -> dict[str, Any] | None:
    """The logged-in session (``key_id``, ``key_name``, ``csrf``), or None."""
    sid = request.cookies.get(COOKIE)
    if not sid or len(sid) > 128:
        return None
    ctx = request.app.state.ctx
    raw = ctx.redis.get(_sid_key(sid))
    if raw is None:
        return None
    sess: dict[str, Any] = json.loads(raw)
    from sqlmodel import Session

    with Session(ctx.engine) as s:
        key = s.get(ApiKey, sess["key_id"])
    if key is None or key.revoked_at is not None or not allows(key, "read"):
        ctx.redis.delete(_sid_key(sid))
        return None
    sess["sid"] = sid
    sess["scope"] = scope_of(key)
    sess["can_operate"] = allows(key, "operate")
    return sess


def _require_operate(sess: dict[str, Any]) -> None:
    if not sess["can_operate"]:
        raise Refused(403, f"this API key's scope ({sess['scope']}) does not allow this: it needs operate or admin")


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise Refused(413, "form too large")
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "malformed form") from None


async def _checked_form(request: Request, sess: dict[str, Any]) -> dict[str, str]:
    """The POSTed form, after its CSRF token matched the session's."""
    form = await _form(request)
    if not hmac.compare_digest(form.get("csrf", ""), sess["csrf"]):
        raise Refused(403, "missing or wrong CSRF token: reload the page and try again")
    return form


def _page(request: Request, name: str, sess: dict[str, Any] | None, status: int = 200, **values: Any) -> HTMLResponse:
    html = _env.get_template(name).render(
        request_path=request.url.path, csrf=sess["csrf"] if sess else "", session=sess, **values
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


def _to_login(request: Request) -> RedirectResponse:
    return RedirectResponse("/console/login", status_code=303)


# ── overview data ─────────────────────────────────────────────────────────────────────────────


def overview_data(ctx: Any) -> dict[str, Any]:
    """Everything the Overview shows, from Redis and a few indexed SQL queries (no scan of deliveries)."""
    s = ctx.settings
    r = ctx.redis
    queues = queue_stats(ctx)
    for q in queues:
        q["threshold_s"] = float(getattr(s, f"lag_alert_{q['priority']}"))
        q["over"] = q["oldest_age_s"] is not None and q["oldest_age_s"] > q["threshold_s"]
    now = time.time()
    hours = [time.strftime("%Y%m%d%H", time.gmtime(now - 3600)), time.strftime("%Y%m%d%H", time.gmtime(now))]
    pipe = r.pipeline(transaction=False)
    for hour in hours:
        pipe.hgetall(SENT_PER_MIN + hour)
    pipe.hgetall(IN_DOUBT)
    names = sorted({n for route in ("push.ios", "push.android", "email", "sms") for n in s.providers_for(route)}
                   | set(s.providers_voice))  # fmt: skip
    for n in names:
        pipe.hgetall(LATENCY + n)
    res = pipe.execute()
    per_min: dict[str, int] = {}
    in_doubt = {k.decode(): int(v) for k, v in res[2].items()}
    for hour, counts in zip(hours, res[:2], strict=True):
        for m, n in counts.items():
            per_min[f"{hour}{m.decode()}"] = int(n)
    minutes = []
    for i in range(59, -1, -1):
        t = time.gmtime(now - i * 60)
        minutes.append((time.strftime("%H:%M", t), per_min.get(time.strftime("%Y%m%d%H%M", t), 0)))
    circuits = Circuits(r, s.circuit_threshold, s.circuit_cooldown).all_states(names)
    providers = []
    for name, hist in zip(names, res[3:], strict=True):
        h = {k.decode(): float(v) for k, v in hist.items()}
        providers.append(
            {
                "name": name,
                "circuit": circuits.get(name, {}),
                "batches": int(h.get("count", 0)),
                "p50": _quantile(h, BUCKETS, 0.5),
                "p99": _quantile(h, BUCKETS, 0.99),
            }
        )
    hosts = {h: len(ws) for h, ws in by_host(live_workers_of(ctx)).items()}
    return {
        "queues": queues,
        "sent_per_min": minutes,
        "sent_last_hour": sum(n for _, n in minutes),
        "providers": providers,
        "dlq": dlq_stats(ctx),
        "hosts": hosts,
        "in_doubt": in_doubt,
    }


def _quantile(h: dict[str, float], buckets: tuple[float, ...], q: float) -> str:
    """The bucket bound under which ``q`` of the measured batches fall ("≤ 0.25 s"), from the histogram."""
    total = h.get("count", 0)
    if not total:
        return "-"
    seen = 0.0
    for b in buckets:
        seen += h.get(str(b), 0)
        if seen >= q * total:
            return f"≤ {b:g} s"
    return f"> {buckets[-1]:g} s"


def bars_svg(values: list[tuple[str, int]], width: int = 720, height: int = 120) -> str:
    """A bar chart as inline SVG (escaped labels in <title>)."""
    from markupsafe import escape

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
    from markupsafe import escape

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


# ── routes ────────────────────────────────────────────────────────────────────────────────────


def _build_filter(args: dict[str, str | None], ids: list[str] | None = None) -> Any:
    return DlqFilter.build(
        args["channel"], args["provider"], args["error"], args["template"], args["older_than"], args["newer_than"],
        ids or (),
    )  # fmt: skip


def _dlq_filter_args(q: dict[str, str]) -> dict[str, str | None]:
    names = ("channel", "provider", "error", "template", "older_than", "newer_than")
    return {k: (q.get(k) or "").strip() or None for k in names}


def router() -> APIRouter:
    r = APIRouter(prefix="/console", include_in_schema=False)

    @r.get("/login")
    def login_page(request: Request) -> Response:
        if session_of(request):
            return RedirectResponse("/console", status_code=303)
        token = secrets.token_urlsafe(24)
        resp = _page(request, "login.html", None, login_csrf=token, error=None)
        _set_cookie(request, resp, LOGIN_COOKIE, token, 600)
        return resp

    @r.post("/login")
    async def login(request: Request) -> Response:
        form = await _form(request)
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        if not cookie or not hmac.compare_digest(form.get("csrf", ""), cookie):
            raise Refused(403, "missing or wrong CSRF token: reload the login page")
        ctx = request.app.state.ctx
        row = await run_in_threadpool(check_key, ctx, form.get("api_key", "").strip())
        error = None
        if row is None:
            status, error = 401, "invalid or revoked API key"
        elif not allows(row, "read"):
            status = 403
            error = f"this API key's scope ({scope_of(row)}) cannot open the console: it needs read or more"
        if error:
            token = secrets.token_urlsafe(24)
            resp = _page(request, "login.html", None, status, login_csrf=token, error=error)
            _set_cookie(request, resp, LOGIN_COOKIE, token, 600)
            return resp
        sid = secrets.token_urlsafe(32)
        assert row is not None
        sess = {"key_id": row.id, "key_name": row.name, "csrf": secrets.token_urlsafe(32), "at": time.time()}
        ctx.redis.set(_sid_key(sid), json.dumps(sess), ex=SESSION_TTL)
        redirect = RedirectResponse("/console", status_code=303)
        _set_cookie(request, redirect, COOKIE, sid, SESSION_TTL)
        redirect.delete_cookie(LOGIN_COOKIE, path="/console")
        return redirect

    @r.post("/logout")
    async def logout(request: Request) -> Response:
        sess = session_of(request)
        if sess is None:
            return _to_login(request)
        await _checked_form(request, sess)
        request.app.state.ctx.redis.delete(_sid_key(sess["sid"]))
        resp = RedirectResponse("/console/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/console")
        return resp

    @r.get("")
    def overview(request: Request) -> Response:
        sess = session_of(request)
        if sess is None:
            return _to_login(request)
        data = overview_data(request.app.state.ctx)
        return _page(request, "overview.html", sess, d=data, chart=bars_svg(data["sent_per_min"]))

    @r.get("/dlq")
    def dlq_page(request: Request) -> Response:
        sess = session_of(request)
        if sess is None:
            return _to_login(request)
        ctx = request.app.state.ctx
        args = _dlq_filter_args(dict(request.query_params))
        error = None
        entries: list[dict[str, Any]] = []
        total = 0
        before = (request.query_params.get("before") or "").strip() or None
        try:
            f = _build_filter(args)
            entries = list_entries(ctx, f, limit=100, before=before)  # keyset: the page after `before`
            total = count_entries(ctx, f)
        except (InputError, NotFound) as exc:
            error = one_line(exc)
        query = urlencode({k: v for k, v in args.items() if v})
        older = (
            urlencode({**{k: v for k, v in args.items() if v}, "before": entries[-1]["delivery_id"]})
            if len(entries) == 100
            else None
        )
        return _page(
            request,
            "dlq.html",
            sess,
            entries=entries,
            total=total,
            args=args,
            error=error,
            query=query,
            older=older,
            paged=bool(before),
        )

    @r.get("/dlq/{delivery_id}")
    def dlq_entry(delivery_id: str, request: Request) -> Response:
        sess = session_of(request)
        if sess is None:
            return _to_login(request)
        return _page(request, "dlq_entry.html", sess, e=show_entry(request.app.state.ctx, delivery_id))

    @r.post("/dlq/{action}")
    async def dlq_action(action: str, request: Request) -> Response:
        """replay | purge, of ``ids`` (one) or the filter (``all=1`` with no filter: everything).
        Without ``confirm=1``: a dry run, shown with a form to confirm the same selection."""
        sess = session_of(request)
        if sess is None:
            return _to_login(request)
        form = await _checked_form(request, sess)
        _require_operate(sess)
        if action not in ("replay", "purge"):
            raise NotFound(f"no DLQ action {action!r}")
        ctx = request.app.state.ctx
        args = _dlq_filter_args(form)
        ids = [i for i in form.get("ids", "").split(",") if i.strip()]
        if not ids and not any(args.values()) and form.get("all") != "1":
            raise InputError("choose entries: one id, a filter, or all")
        f = _build_filter(args, ids)
        confirm = form.get("confirm") == "1"
        fn = replay if action == "replay" else purge
        res = await run_in_threadpool(lambda: fn(ctx, f, dry_run=not confirm))
        hidden = {k: v for k, v in args.items() if v}
        if ids:
            hidden["ids"] = ",".join(ids)
        if form.get("all") == "1":
            hidden["all"] = "1"
        return _page(request, "dlq_action.html", sess, action=action, res=res, confirmed=confirm, hidden=hidden)

    @r.get("/campaigns")
    def campaigns_page(request: Request) -> Response:
        sess = session_of(request)
        if sess is None:
            return _to_login(request)
        return _page(request, "campaigns.html", sess, detail=campaign_cards(request.app.state.ctx), message=None)

    @r.post("/campaigns/{campaign_id}/{action}")
    async def campaign_action(campaign_id: str, action: str, request: Request) -> Response:
        sess = session_of(request)
        if sess is None:
            return _to_login(request)
        await _checked_form(request, sess)
        _require_operate(sess)
        fns = {"pause": state.pause, "resume": state.resume, "cancel": state.cancel}
        if action not in fns:
            raise NotFound(f"no campaign action {action!r}")
        await run_in_threadpool(fns[action], request.app.state.ctx, campaign_id)
        return RedirectResponse("/console/campaigns", status_code=303)

    def _funnel(request: Request) -> dict[str, Any]:
        q = request.query_params
        by = q.get("by") or "template"
        if by not in ("template", "channel", "campaign", "day"):
            raise InputError(f"by: expected template, channel, campaign or day, got {by!r}")
        return funnel(request.app.state.ctx.engine, by, parse_since(q.get("since") or None))

    @r.get("/analytics")
    def analytics_page(request: Request) -> Response:
        sess = session_of(request)
        if sess is None:
            return _to_login(request)
        rep = _funnel(request)
        q = urlencode({"by": rep["by"], "since": request.query_params.get("since") or ""})
        return _page(
            request, "analytics.html", sess, rep=rep, chart=funnel_svg(rep["groups"]), query=q,
            since=request.query_params.get("since") or "",
        )  # fmt: skip

    @r.get("/analytics.csv")
    def analytics_csv(request: Request) -> Response:
        import csv
        import io

        if session_of(request) is None:
            return _to_login(request)
        rep = _funnel(request)
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(csv_rows(rep))
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M")
        return Response(
            buf.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="funnel-{rep["by"]}-{stamp}.csv"',
                     "Cache-Control": "no-store"},
        )  # fmt: skip

    @r.get("/lookup")
    def lookup(request: Request) -> Response:
        sess = session_of(request)
        if sess is None:
            return _to_login(request)
        ref = (request.query_params.get("q") or "").strip()
        timelines: list[dict[str, Any]] = []
        error = None
        if ref:
            try:
                timelines = lookup_timelines(request.app.state.ctx, ref)
            except NotifyError as exc:
                error = one_line(exc)
            if not timelines and error is None:
                error = f"nothing found for {ref!r} (a notification id, dedup key or user id)"
        return _page(request, "lookup.html", sess, ref=ref, timelines=timelines, error=error)

    return r


def campaign_cards(ctx: Any, limit: int = 10) -> list[dict[str, Any]]:
    """The latest campaigns, each read without counting its rows: deliveries per channel from the
    analytics rollup, each wave's notifications still waiting through the (status, due_at) index."""
    from sqlalchemy import select
    from sqlmodel import Session

    with Session(ctx.engine) as s:
        camps: list[Campaign] = list(
            s.execute(select(Campaign).order_by(Campaign.created_at.desc()).limit(limit)).scalars()  # type: ignore[attr-defined]
        )
    out = []
    for c in camps:
        waves = wave_progress(ctx, c.id, c.plan or [])
        waiting = sum(w["waiting"] for w in waves)
        state = c.status if c.status != "active" else ("sending" if waiting else "sent")
        per_channel = {g["key"]: g for g in funnel(ctx.engine, "channel", campaign=c.id)["groups"]}
        out.append({
            "campaign_id": c.id, "name": c.name, "state": state, "template_id": c.template_id, "channels": c.channels,
            "recipients": sum(int(w.get("recipients", 0)) for w in c.plan or []), "waiting": waiting,
            "wave_progress": waves, "per_channel": per_channel,
        })  # fmt: skip
    return out


def wave_progress(ctx: Any, campaign_id: str, waves: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each time-zone wave of a campaign (its plan) with how many of its notifications still wait
    (scheduled, or paused) and how many went out (the rest of its recipients): one query per
    wave on the (status, due_at) index, which holds only what is still to go."""
    from sqlalchemy import func, select
    from sqlmodel import Session

    out = []
    with Session(ctx.engine) as s:
        for w in waves:
            start = datetime.fromisoformat(w["start"])
            end = datetime.fromisoformat(w["end"])
            rows = s.execute(
                select(Notification.status, func.count())  # type: ignore[call-overload]
                .where(Notification.status.in_(["scheduled", "paused"]))  # type: ignore[attr-defined]
                .where(Notification.due_at >= start, Notification.due_at <= end)
                .where(Notification.campaign_id == campaign_id)
                .group_by(Notification.status)
            ).all()
            by_status = {str(st): int(str(n)) for st, n in rows}
            waiting = sum(by_status.values())
            produced = max(0, int(w.get("recipients", 0)) - waiting)
            out.append({**w, "by_status": {**by_status, "produced": produced}, "waiting": waiting})
    return out


def lookup_timelines(ctx: Any, ref: str, limit: int = 20) -> list[dict[str, Any]]:
    """A notification id or dedup key → its timeline; a user id → the timelines of their latest
    ``limit`` notifications (template secret data masked, as everywhere)."""
    from sqlalchemy import select
    from sqlmodel import Session

    try:
        return [timeline(ctx, ref)]
    except NotFound:
        pass
    with Session(ctx.engine) as s:
        ids: list[str] = list(
            s.execute(
                select(Notification.id)  # type: ignore[call-overload]
                .where(Notification.recipient_id == ref)
                .order_by(Notification.created_at.desc())  # type: ignore[attr-defined]
                .limit(limit)
            ).scalars()
        )
    return [timeline(ctx, i) for i in ids]


def install(app: Any) -> None:
    """Mount the console on the FastAPI app. Under ``/console`` an error is a page with the API's
    status and one-line message (the API's own handlers decide both), elsewhere JSON as before."""
    app.include_router(router())

    async def _refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        return _page(request, "error.html", None, exc.status, message=exc.message)

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
        return _page(request, "error.html", None, resp.status_code, message=message)

    return wrapped
