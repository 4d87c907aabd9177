"""The figures against their targets: the table at the top of bench/RESULTS.md, a row per figure
``(issue, figure, target, measured, met)`` from the raw results ``bench.run`` gathers."""

from __future__ import annotations

import math
from typing import Any

from bench import shards as shards_bench

# The email blast's rows, side by side in one run: (result key, per-recipient segment data, database)
EMAIL_VARIANTS = {
    "email": (True, "sqlite"),  # the headline: `campaign launch` over a segment CSV
    "email_pg": (True, "postgresql"),
    "email_user_fields": (False, "sqlite"),  # bodies varying only by {{ user.* }}, rows written in bulk
}
EMAIL_TARGETS = {"sqlite": 15_000, "postgresql": 10_000}


def fmt(v: Any, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "not measured"
    if isinstance(v, float):
        v = f"{v:,.1f}" if abs(v) >= 10 else f"{v:,.3g}"
    elif isinstance(v, int):
        v = f"{v:,}"
    return f"{v}{unit}"


def met(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**no**")


def summary_rows(res: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows: list[tuple[str, str, str, str, str]] = []
    for key in EMAIL_VARIANTS:
        rows += _email_rows(key, res.get(key) or {})
    p = res.get("push") or {}
    if p:
        rows += _push_rows(p)
    launcher = res.get("launcher") or {}
    if launcher:
        if launcher.get("error") and "dry_run" not in launcher:
            rows.append(("4", "Launcher peak RSS", "< 150 MB", str(launcher["error"]), "—"))
        else:
            for key, label in (("dry_run", "--dry-run"), ("real", "real launch")):
                r = launcher.get(key) or {}
                small = launcher.get(key + "_small" if key == "dry_run" else "real_small") or {}
                rss = r.get("peak_rss_mb")
                val = f"{fmt(rss)} MB ({fmt(small.get('peak_rss_mb'))} MB at a tenth of the rows)"
                if r.get("error"):
                    val = f"failed: {r['error']}"
                rows.append(("4", f"Launcher peak RSS, {label}, {fmt(launcher.get('rows'))}-row CSV", "< 150 MB, flat",
                             val, met(None if rss is None or r.get("error") else rss < 150)))  # fmt: skip
            err = launcher.get("scheduled_rate_error_pct")
            rows.append(("4", f"Produce rate vs --rate {fmt(launcher.get('rate'))}/s: scheduled (due_at spacing)", "—",
                         f"{fmt(launcher.get('scheduled_rate'))}/s, error {fmt(err)} %", "—"))  # fmt: skip
            rows.append(("4", "Produce rate: realized (reconciler rounds, 1/s, after the launch)", "—",
                         f"{fmt(launcher.get('realized_rate'))}/s, error {fmt(launcher.get('realized_rate_error_pct'))} %",  # noqa: E501
                         "—"))  # fmt: skip
    c = res.get("cost") or {}
    for ch in ("email", "push"):
        cc = c.get(ch) or {}
        if cc:
            rows.append(("5", f"Cost per {ch} notification (process() in one process)", "—",
                         f"{fmt(cc.get('sql_statements_per_notification'))} SQL statements, "
                         f"{fmt(cc.get('redis_commands_per_notification'))} Redis commands", "—"))  # fmt: skip
    for key, label in (("email", "(1)"), ("push", "(2)")):
        r = res.get(key) or {}
        if r.get("redis_commands_per_notification") is not None:
            rows.append(("5", f"Redis commands per notification in {label}, whole pool incl. RQ + reconciler", "—",
                         fmt(r["redis_commands_per_notification"]), "—"))  # fmt: skip
    cons = res.get("console") or {}
    for db, label in (("sqlite", "SQLite"), ("postgresql", "PostgreSQL")):
        d = cons.get(db) or {}
        if not d:
            continue
        n = fmt(cons.get("deliveries"))
        if d.get("error"):
            rows.append(("17", f"Console pages, {n} deliveries, {label}", "< 300 ms each", str(d["error"]), "—"))
            continue
        pages = d.get("pages_ms") or {}
        worst = max(pages.items(), key=lambda kv: kv[1]["median"]) if pages else None
        shown = ", ".join(f"{k} {v['median']:g}" for k, v in pages.items())
        rows.append(("17", f"Console pages (median of {cons.get('runs')}), {n} deliveries, {label}", "< 300 ms each",
                     f"{shown} ms", met(None if worst is None else worst[1]["median"] < 300)))  # fmt: skip
        fun = d.get("funnel_ms") or {}
        fworst = max((v["median"] for v in fun.values()), default=None)
        rows.append(("17", f"Funnel query (analytics.funnel), {n} deliveries, {label}", "< 100 ms",
                     ", ".join(f"by {k} {v['median']:g}" for k, v in fun.items()) + " ms",
                     met(None if fworst is None else fworst < 100)))  # fmt: skip
        w = d.get("waves_ms") or {}
        if w:
            rows.append(("17", f"Campaigns page's per-wave numbers, a campaign of {fmt(d.get('campaign_deliveries'))} "
                         f"deliveries in 3 waves, {label}: wave_counts / grouped count over its deliveries", "—",
                         f"{w['wave_counts']['median']:g} / {w['grouped_count']['median']:g} ms", "—"))  # fmt: skip
        c = d.get("wave_trigger_cpu_us") or {}
        if c:
            rows.append(("17", f"Per-wave triggers (analytics.waves), CPU per campaign delivery, {label}", "—",
                         f"insert {c['on insert']:g} vs {c['off insert']:g} µs without, status change "
                         f"{c['on update']:g} vs {c['off update']:g} µs (load {c['load_avg']:g})", "—"))  # fmt: skip
        rows.append(("17", f"Writing deliveries with the analytics triggers on, {label}", "—",
                     f"{fmt(d.get('write_us_per_row'))} µs/row (prepare_insert, 10,000 a transaction)",
                     "—"))  # fmt: skip
    rows += _funnel10m_rows(res.get("funnel1m") or {}, 100)
    rows += _funnel10m_rows(res.get("funnel10m") or {}, 500)
    rows += shards_bench.rows(res.get("shards") or {})
    a = res.get("apprise") or {}
    if a:
        rows.append(("6", f"{fmt(a.get('emails'))} emails to an SMTP sink: notifyctl / Apprise", "—",
                     f"{fmt(a.get('notifyctl_per_s'))}/s vs {fmt(a.get('apprise_per_s'))}/s = "
                     f"{fmt(a.get('ratio_notifyctl_over_apprise'))}x", "—"))  # fmt: skip
    return rows


def _funnel10m_rows(f: dict[str, Any], target_ms: int) -> list[tuple[str, str, str, str, str]]:
    """Issue 17's "well under a second over 10 million deliveries" and "the funnel query in < 100 ms"
    at 1,000,000 (bench/funnel10m.py, the same spread at either size)."""
    rows: list[tuple[str, str, str, str, str]] = []
    target = "< 100 ms" if target_ms == 100 else "well under 1 s (met: < 500 ms)"
    for db, label in (("sqlite", "SQLite"), ("postgresql", "PostgreSQL")):
        d = f.get(db) or {}
        if not d:
            continue
        n = fmt(d.get("deliveries") or f.get("deliveries"))
        if d.get("error"):
            rows.append(("17", f"Funnel query, {fmt(f.get('deliveries'))} deliveries, {label}", target,
                         str(d["error"]), "—"))  # fmt: skip
            continue
        fun = d.get("funnel_ms") or {}
        load = f"load average {d.get('load_before', ['?'])[0]}–{d.get('load_after', ['?'])[0]}"
        alltime = {k: v for k, v in fun.items() if "since" not in k}
        since = {k: v for k, v in fun.items() if "since" in k}
        for what, part in (("all time", alltime), ("--since 7d / 30d", since)):
            if not part:
                continue
            worst = max(v["median"] for v in part.values())
            rows.append(("17", f"Funnel (analytics.funnel, coarse tiers, median of {f.get('runs')}), {what}, {n} "
                         f"deliveries ({fmt(d.get('rollup_rows'))} hourly rollup rows), {label}", target,
                         ", ".join(f"by {k} {v['median']:g}" for k, v in part.items()) + f" ms ({load})",
                         met(worst < target_ms)))  # fmt: skip
        hourly = d.get("hourly_ms") or {}
        if hourly:
            rows.append(("17", f"The same over the hourly rollup alone (tier=hourly, once each), {n}, {label}", "—",
                         ", ".join(f"by {k} {v['median']:g}" for k, v in hourly.items() if "since" not in k)
                         + f" ms; coarse answers equal to these: {d.get('equal_to_hourly')}", "—"))  # fmt: skip
        if d.get("late_changes") is not None:
            before = d.get("funnel_ms_unfolded") or {}
            after = d.get("funnel_ms_after_fold") or {}
            rows.append(("17", f"{fmt(d['late_changes'])} late status changes to folded days, {n}, {label}", "—",
                         f"funnel before the fold ({fmt(d.get('unfolded_rows'))} rows unfolded): "
                         + ", ".join(f"by {k} {v['median']:g}" for k, v in before.items())
                         + f" ms; fold {fmt(d.get('fold_s'))} s; after: "
                         + ", ".join(f"by {k} {v['median']:g}" for k, v in after.items())
                         + f" ms; equal to the hourly rollup: {d.get('late_equal_to_hourly')}", "—"))  # fmt: skip
        pages = d.get("pages_ms") or {}
        if pages:
            rows.append(("17", f"Console Analytics page, {n} deliveries, {label}", "< 300 ms",
                         ", ".join(f"{k} {v['median']:g}" for k, v in pages.items()) + " ms",
                         met(max(v["median"] for v in pages.values()) < 300)))  # fmt: skip
        rows.append(("17", f"Bulk load (SQL, no triggers) + rollup and coarse tiers backfill (analytics.install), "
                     f"{n}, {label}", "—",
                     f"load {fmt(d.get('load_s'))} s, backfill {fmt(d.get('backfill_s'))} s; rollup and coarse "
                     f"tiers = full count over {fmt(d.get('groups_compared'))} groups: "
                     f"{d.get('rollup_equals_full_count')}", "—"))  # fmt: skip
    return rows


def email_label(key: str, e: dict[str, Any]) -> str:
    segment, db = EMAIL_VARIANTS[key]
    what = ("`campaign launch` over a segment CSV (unique first name and code each)" if segment
            else "user-field-only bodies, rows written in bulk")  # fmt: skip
    size = f"{fmt(e['notifications'])} notifications, " if e.get("notifications") else ""
    return f"Email blast, {size}{what}, {DB_LABELS[db]} → SendGrid sandbox"


DB_LABELS = {"sqlite": "SQLite", "postgresql": "PostgreSQL (server on the same cores)"}


def _email_rows(key: str, e: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    if not e:
        return []
    segment, db = EMAIL_VARIANTS[key]
    if e.get("error") and not e.get("sent"):
        return [("1", email_label(key, e), "—", str(e["error"]), "—")]
    rows: list[tuple[str, str, str, str, str]] = []
    v = e.get("notifications_per_s") if not e.get("error") or e.get("sent") else None
    runs = [r for r in e.get("runs") or [] if r.get("per_s")]
    shown = fmt(v, "/s")
    if len(runs) > 1:
        rates = sorted(r["per_s"] for r in runs)
        shown = f"median {shown} of {len(runs)} runs ({fmt(rates[0])}–{fmt(rates[-1])}/s)"
    cpu = e.get("cpu") or {}
    sent = max(1, int(e.get("sent") or 1))
    if cpu.get("cpu_total_s"):
        shown += f"; {fmt(cpu['cpu_total_s'] / sent * 1e6)} µs CPU/notification, all processes"
    n = int(e.get("notifications") or 0)
    want_requests = math.ceil(n / max(1, int(e.get("batch") or 1000))) if n else None
    requests = e.get("sandbox_requests")
    shown += f"; SendGrid requests {fmt(requests)} (expected {fmt(want_requests)})"
    target = EMAIL_TARGETS[db] if segment else None
    ok = None if v is None or target is None else (v >= target and requests == want_requests)
    rows.append(("1", email_label(key, e), f">= {target:,}/s, {fmt(want_requests)} requests" if target else "—",
                 shown, met(ok)))  # fmt: skip
    o = (e.get("otp") or {}).get("during_blast_ms") or {}
    p99 = o.get("p99")
    worst = max([r["otp_p99_ms"] for r in runs if r.get("otp_p99_ms") is not None] or [p99 or 0])
    rows.append(("3", f"OTP submit → accepted by Twilio sandbox during the blast above, n={o.get('n', 0)}",
                 "p99 < 250 ms", f"p50 {fmt(o.get('p50'))} / p99 {fmt(p99)} / max {fmt(o.get('max'))} ms"
                 + (f"; worst run's p99 {fmt(worst)} ms" if len(runs) > 1 else ""),
                 met(None if p99 is None else worst < 250)))  # fmt: skip
    return rows


PUSH_LABELS = {"ios": "iOS", "android": "Android", "mix": "50/50 mix"}


def _push_rows(p: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Issue 20's targets, against the C sink (nginx) and the strict sandboxes, same run."""
    rows: list[tuple[str, str, str, str, str]] = []
    if p.get("sink_skipped"):
        rows.append(("2", "Push against a C HTTP/2 sink", "—", f"skipped: {p['sink_skipped']}", "—"))
    for key, r in (p.get("rows") or {}).items():
        v = r.get("push_per_s") if not r.get("error") else None
        rows.append(("2", f"Push blast, {fmt(r.get('pushes'))} {PUSH_LABELS.get(key, key)} devices, pipeline → "
                     f"C sink (nginx), pool {p.get('pool')}", ">= 10,000/s",
                     fmt(v, "/s") + f" ({fmt(r.get('cpu_us_per_push_total'))} µs CPU/push, all processes"
                     + (f"; {fmt(r['cpu_us_per_push_total_without_otps'])} without the OTPs beside it)"
                        if r.get("cpu_us_per_push_total_without_otps") is not None else ")"),
                     met(None if v is None else v >= 10_000)))  # fmt: skip
    cands = (p.get("clients") or {}).get("candidates") or {}
    aio = (cands.get("aioapns") or {}).get("per_s")
    for key, label in (("apns", "APNs"), ("fcm", "FCM")):
        c = cands.get(key) or {}
        v = c.get("per_s")
        if v is None:
            continue
        times = f", {fmt(v / aio)}x aioapns" if aio else ""
        ok = v >= 12_000 and (key != "apns" or (aio is not None and v >= 5 * aio))
        rows.append(("2", f"Bare {label} provider loop, one process, same sink", ">= 12,000/s" + (", >= 5x aioapns"
                     if key == "apns" else ""), f"{fmt(v, '/s')} ({fmt(c.get('cpu_us'))} µs CPU/request{times})",
                     met(ok)))  # fmt: skip
    h = p.get("h2load") or {}
    if h.get("requests_per_s"):
        rows.append(("2", "h2load (nghttp2, C) on the same sink: the hardware's ceiling", "—",
                     f"{fmt(h['requests_per_s'], '/s')} ({fmt(h.get('cpu_us_per_request'))} µs CPU/request)",
                     "—"))  # fmt: skip
    otp = ((p.get("rows") or {}).get("mix") or {}).get("otp") or {}
    d = otp.get("during_blast_ms") or {}
    if d:
        rows.append(("3", f"OTP submit → accepted by Twilio sandbox during the push blast (mix), n={d.get('n', 0)}",
                     "p99 < 250 ms", f"p50 {fmt(d.get('p50'))} / p99 {fmt(d.get('p99'))} ms",
                     met(None if d.get("p99") is None else d["p99"] < 250)))  # fmt: skip
    st = p.get("strict") or {}
    if st:
        jwts = st.get("apns_jwts_seen")
        rows.append(("2", f"Strict sandboxes: {fmt(st.get('pushes'))} pushes (mix) by a pool, a second `worker "
                     "--burst`, a `--pool 4` start", "exactly one APNs JWT",
                     f"{jwts} JWT(s), {st.get('apns_token_updates_refused')} refused; sent {fmt(st.get('sent'))}, "
                     f"accepted {fmt((st.get('apns_accepted') or 0) + (st.get('fcm_accepted') or 0))}; FCM token "
                     f"requests {st.get('fcm_token_requests')}",
                     met(None if jwts is None else jwts == 1)))  # fmt: skip
    return rows
