"""The console's pages and actions (``router``): login and logout, Overview, DLQ (+ an entry's
history, replay and purge with a dry run then confirm), Campaigns (+ pause / resume / cancel),
Analytics (the funnel, CSV), Lookup. Each reads through ``notifyctl.console.data`` or the same
functions as the CLI, and answers with ``notifyctl.console.render.page``.
"""

from __future__ import annotations

import csv
import hmac
import io
import json
import secrets
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from campaigns import state
from notifyctl.analytics.export import csv_rows
from notifyctl.analytics.read import funnel, parse_since
from notifyctl.api.auth import allows, check_key, scope_of
from notifyctl.console.data import campaign_cards, lookup_timelines, overview_data, probe, shards_down
from notifyctl.console.render import bars_svg, funnel_svg, page, to_login
from notifyctl.console.session import (
    COOKIE,
    LOGIN_COOKIE,
    SESSION_TTL,
    Refused,
    checked_form,
    read_form,
    require_operate,
    session_of,
    sessions,
    set_cookie,
    sid_key,
)
from notifyctl.dlq import DlqFilter, count_entries, list_entries, purge, replay, show_entry
from notifyctl.errors import InputError, NotFound, NotifyError, one_line


def _build_filter(args: dict[str, str | None], ids: list[str] | None = None) -> Any:
    return DlqFilter.build(
        args["channel"], args["provider"], args["error"], args["template"], args["older_than"], args["newer_than"],
        ids or (),
    )  # fmt: skip


def _dlq_filter_args(q: dict[str, str]) -> dict[str, str | None]:
    names = ("channel", "provider", "error", "template", "older_than", "newer_than")
    return {k: (q.get(k) or "").strip() or None for k in names}


def _replay_needs_every_shard(ctx: Any, known: dict[int, Any]) -> None:
    """A replay reads each entry's send record on its user's shard (so that nothing sent meanwhile
    is sent twice): with a shard down it is refused before anything, naming the shard (a purge,
    SQL only, still works)."""
    down = shards_down(ctx, known)
    if down:
        names = ", ".join(str(x["shard"]) for x in down)
        raise Refused(
            503,
            f"cannot replay: Redis shard{'s' if len(down) > 1 else ''} {names} of {ctx.shard_count} unreachable "
            "(a replay checks each entry's send record on its user's shard, so that nothing is sent twice); "
            "try again once it is back",
        )


def router() -> APIRouter:
    r = APIRouter(prefix="/console", include_in_schema=False)

    @r.get("/login")
    def login_page(request: Request) -> Response:
        if session_of(request):
            return RedirectResponse("/console", status_code=303)
        token = secrets.token_urlsafe(24)
        resp = page(request, "login.html", None, login_csrf=token, error=None)
        set_cookie(request, resp, LOGIN_COOKIE, token, 600)
        return resp

    @r.post("/login")
    async def login(request: Request) -> Response:
        form = await read_form(request)
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
            resp = page(request, "login.html", None, status, login_csrf=token, error=error)
            set_cookie(request, resp, LOGIN_COOKIE, token, 600)
            return resp
        sid = secrets.token_urlsafe(32)
        assert row is not None
        sess = {"key_id": row.id, "key_name": row.name, "csrf": secrets.token_urlsafe(32), "at": time.time()}
        sessions(ctx, lambda r: r.set(sid_key(sid), json.dumps(sess), ex=SESSION_TTL))
        redirect = RedirectResponse("/console", status_code=303)
        set_cookie(request, redirect, COOKIE, sid, SESSION_TTL)
        redirect.delete_cookie(LOGIN_COOKIE, path="/console")
        return redirect

    @r.post("/logout")
    async def logout(request: Request) -> Response:
        sess = session_of(request)
        if sess is None:
            return to_login(request)
        await checked_form(request, sess)
        sessions(request.app.state.ctx, lambda r: r.delete(sid_key(sess["sid"])))
        resp = RedirectResponse("/console/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/console")
        return resp

    @r.get("")
    def overview(request: Request) -> Response:
        sess = session_of(request)
        if sess is None:
            return to_login(request)
        data = overview_data(request.app.state.ctx)
        request.state.shards_down = data["down"]  # the banner's: asked already
        return page(request, "overview.html", sess, d=data, chart=bars_svg(data["sent_per_min"]))

    @r.get("/dlq")
    def dlq_page(request: Request) -> Response:
        sess = session_of(request)
        if sess is None:
            return to_login(request)
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
        return page(
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
            return to_login(request)
        return page(request, "dlq_entry.html", sess, e=show_entry(request.app.state.ctx, delivery_id))

    @r.post("/dlq/{action}")
    async def dlq_action(action: str, request: Request) -> Response:
        """replay | purge, of ``ids`` (one) or the filter (``all=1`` with no filter: everything).
        Without ``confirm=1``: a dry run, shown with a form to confirm the same selection."""
        sess = session_of(request)
        if sess is None:
            return to_login(request)
        form = await checked_form(request, sess)
        require_operate(sess)
        if action not in ("replay", "purge"):
            raise NotFound(f"no DLQ action {action!r}")
        ctx = request.app.state.ctx
        args = _dlq_filter_args(form)
        ids = [i for i in form.get("ids", "").split(",") if i.strip()]
        if not ids and not any(args.values()) and form.get("all") != "1":
            raise InputError("choose entries: one id, a filter, or all")
        f = _build_filter(args, ids)
        confirm = form.get("confirm") == "1"
        request.state.shards_down = await run_in_threadpool(probe, ctx)  # off the event loop; the banner's too
        if action == "replay":
            _replay_needs_every_shard(ctx, request.state.shards_down)
        fn = replay if action == "replay" else purge
        res = await run_in_threadpool(lambda: fn(ctx, f, dry_run=not confirm))
        hidden = {k: v for k, v in args.items() if v}
        if ids:
            hidden["ids"] = ",".join(ids)
        if form.get("all") == "1":
            hidden["all"] = "1"
        return page(request, "dlq_action.html", sess, action=action, res=res, confirmed=confirm, hidden=hidden)

    @r.get("/campaigns")
    def campaigns_page(request: Request) -> Response:
        sess = session_of(request)
        if sess is None:
            return to_login(request)
        return page(request, "campaigns.html", sess, detail=campaign_cards(request.app.state.ctx), message=None)

    @r.post("/campaigns/{campaign_id}/{action}")
    async def campaign_action(campaign_id: str, action: str, request: Request) -> Response:
        sess = session_of(request)
        if sess is None:
            return to_login(request)
        await checked_form(request, sess)
        require_operate(sess)
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
            return to_login(request)
        rep = _funnel(request)
        q = urlencode({"by": rep["by"], "since": request.query_params.get("since") or ""})
        return page(
            request, "analytics.html", sess, rep=rep, chart=funnel_svg(rep["groups"]), query=q,
            since=request.query_params.get("since") or "",
        )  # fmt: skip

    @r.get("/analytics.csv")
    def analytics_csv(request: Request) -> Response:
        if session_of(request) is None:
            return to_login(request)
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
            return to_login(request)
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
        return page(request, "lookup.html", sess, ref=ref, timelines=timelines, error=error)

    return r
