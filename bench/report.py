"""bench/RESULTS.md and bench/results.json from the raw results ``bench.run`` gathers: the targets
table (``bench.targets``), each scenario's details, where the time goes, and the hand-written notes
kept across runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import shards as shards_bench
from bench.targets import DB_LABELS, EMAIL_VARIANTS, PUSH_LABELS, email_label, fmt, summary_rows

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
RAW = HERE / "results.json"


def _email_details(key: str, e: dict[str, Any], res: dict[str, Any]) -> list[str]:
    if not e:
        return []
    segment, db = EMAIL_VARIANTS[key]
    out = [f"### 1 + 3. {email_label(key, e)}, with OTPs", ""]
    if e.get("error") and not e.get("sent"):
        return out + [f"- {e['error']}", ""]
    if segment:
        how = (f"`campaigns.launcher.launch` (what `campaign launch` calls) over a segment CSV of "
               f"{e.get('notifications')} rows (`user_id,first_name,code`, each name and code unique), template "
               f"`{e.get('template')}` with `--data discount=20`, --rate above any throughput (everyone due now). "
               "Timed from the launch (its plan and write passes over the CSV, workers already up)")  # fmt: skip
    else:
        how = (f"{e.get('notifications')} marketing emails (`{e.get('template')}`: each greets its recipient with "
               "`{{ user.first_name }}`), the campaign's `scheduled` rows written in bulk as the launcher writes "
               "them. Timed from the first bulk write (workers already up)")  # fmt: skip
    out += [f"- {how} to the last `sent` row tracked: the workers' sent counter (bumped after each SQL commit) "
            f"polled every 50 ms, then the `sent` rows counted in SQL. Pool of {e.get('pool')} (worker 1 on `high` "
            f"only), batch {e.get('batch')}, rate limits kept at the defaults `{e.get('rate_limits')}`, "
            f"database: {DB_LABELS[db]}."]  # fmt: skip
    write = "launch" if segment else "bulk write"
    out += [f"- sent {fmt(e.get('sent'))} in {fmt(e.get('elapsed_s'))} s ({write} {e.get('write_s')} s) "
            f"= **{fmt(e.get('notifications_per_s'))}/s**; SendGrid sandbox accepted "
            f"{fmt(e.get('sandbox_accepted_emails'))} in {fmt(e.get('sandbox_requests'))} requests. "
            "Each email carries its own unsubscribe link (RFC 8058 headers and footer), the postal address "
            "and an open pixel; the per-recipient parts travel as "
            f"SendGrid `substitutions`."]  # fmt: skip
    cpu = e.get("cpu")
    if cpu:
        out += [f"- CPU during the blast ({cpu.get('wall_s')} s wall, {cpu.get('cores_busy')} of "
                f"{res.get('machine_cores', '?')} cores busy on average), seconds and µs per "
                "notification:"]  # fmt: skip
        sent = max(1, int(e.get("sent") or 1))
        out += [""]
        out += ["  | part | CPU s | µs / notification |", "  |---|---|---|"]
        for part, sec in sorted(cpu.get("cpu_s", {}).items(), key=lambda kv: -kv[1]):
            out += [f"  | {part} | {sec} | {round(sec / sent * 1e6, 1)} |"]
        out += [
            f"  | **total** | {cpu.get('cpu_total_s')} | {round(cpu.get('cpu_total_s', 0) / sent * 1e6, 1)} |",
            "",
        ]
    o = e.get("otp") or {}
    out += [f"- OTPs: {o.get('submitted')} submitted through `intake.submit` from the bench process, "
            f"{o.get('submitted_during_blast')} while the blast ran; accepted by the Twilio sandbox: "
            f"{o.get('accepted_by_sandbox')}. During the blast: {o.get('during_blast_ms')}; all: {o.get('all_ms')}; "  # noqa: E501
            f"the `submit()` call alone: {o.get('intake_submit_call_ms')}; idle, before the blast: "
            f"{o.get('idle_ms')} (ms)."]  # fmt: skip
    if e.get("error"):
        out += [f"- error: {e['error']}"]
    out += [f"- Redis commands during the blast: {_cmds(e.get('redis_commands'))}"]
    if len(e.get("runs") or []) > 1:
        out += ["- Every run (the figures above are the median one's; `redis_us`, redis-server's CPU per "
                "notification for the same commands, shows how fast the machine was during each run):", "",
                "  | run | emails/s | CPU µs / notification | redis-server µs | cores busy | OTP p99 ms |",
                "  |---|---|---|---|---|---|"]  # fmt: skip
        for i, r in enumerate(e["runs"], 1):
            out += [f"  | {i} | {fmt(r.get('per_s'))} | {r.get('cpu_us')} | {r.get('redis_us')} | "
                    f"{r.get('cores_busy')} | {fmt(r.get('otp_p99_ms'))} |"]  # fmt: skip
    out += [""]
    return out


def _details(res: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key in EMAIL_VARIANTS:
        out += _email_details(key, res.get(key) or {}, res)

    p = res.get("push")
    if p:
        out += _push_details(p)
    lm = res.get("launcher")
    if lm:
        out += ["### 4. Launcher memory and produce rate", ""]
        if lm.get("error") and "dry_run" not in lm:
            out += [f"- {lm['error']}", ""]
        else:
            out += [f"- `campaigns.launcher.launch` in a subprocess (`bench/launcher_child.py`; the `campaign` CLI "
                    f"noun calls the same function), CSV segment of {fmt(lm.get('rows'))} user ids, --rate "
                    f"{fmt(lm.get('rate'))}. Peak RSS from `wait4` of that child. An interpreter that only imports "
                    f"the launcher peaks at {fmt(lm.get('baseline_rss_mb'))} MB."]  # fmt: skip
            for key in ("dry_run_small", "dry_run", "real_small", "real"):
                r = lm.get(key) or {}
                out += [f"- {key}: peak {fmt(r.get('peak_rss_mb'))} MB in {fmt(r.get('elapsed_s'))} s"
                        + (f", error: {r['error']}" if r.get("error") else "")
                        + (f", written {fmt((r.get('summary') or {}).get('written'))}" if key.startswith("real") else "")]  # noqa: E501  # fmt: skip
            out += [
                f"- reconciler rounds after the launch (notifications queued per 1 s round): {lm.get('reconciler_rounds')}",  # noqa: E501
                "",
            ]
    out += shards_bench.details(res.get("shards") or {})
    c = res.get("cost")
    if c:
        out += ["### 5. Cost per notification (`worker.pipeline.process` in the bench process)", ""]
        for ch in ("email", "push"):
            cc = c.get(ch) or {}
            if not cc:
                continue
            out += [f"- **{ch}**: {cc.get('notifications')} notifications in {cc.get('batches')} batches: "
                    f"{fmt(cc.get('per_s_one_process'))}/s in one process without profiler; "
                    f"{cc.get('sql_statements_per_batch')} SQL statements per batch "
                    f"({cc.get('sql_statements_per_notification')}/notification; executemany rows "
                    f"{cc.get('sql_executemany_rows_per_notification')}/notification): {cc.get('sql_statements')}; "
                    f"Redis {cc.get('redis_commands_per_notification')}/notification: {_cmds(cc.get('redis_commands'))}"]  # noqa: E501  # fmt: skip
        out += [""]
    a = res.get("apprise")
    if a:
        out += ["### 6. Apprise vs notifyctl (SMTP sink: aiosmtpd `SmtpSandbox` in its own process)", ""]
        out += [f"- notifyctl, pool of {a.get('pool')}, providers_email=[\"smtp\"] (pooled connections): "
                f"{fmt(a.get('notifyctl_sent'))} in {fmt(a.get('notifyctl_s'))} s = {fmt(a.get('notifyctl_per_s'))}/s "  # noqa: E501
                f"(first write to last tracked row)."]  # fmt: skip
        out += [f"- Apprise {a.get('apprise_version', '')} (`mailto://` one `notify()` per recipient, the same rendered "  # noqa: E501
                f"subject/text): {fmt(a.get('apprise_sent'))} in {fmt(a.get('apprise_s'))} s = {fmt(a.get('apprise_per_s'))}/s. "  # noqa: E501
                f"Sink accepted {fmt(a.get('sink_accepted'))} in all."]  # fmt: skip
        if a.get("error"):
            out += [f"- {a['error']}"]
        out += [""]
    return out


def _push_details(p: dict[str, Any]) -> list[str]:
    out = ["### 2. Push blast (against the hardware: a C HTTP/2 sink, and the strict sandboxes)", ""]
    out += [f"- {fmt(p.get('pushes'))} devices per row, one token each, pool of {p.get('pool')} (worker 1 on `high` "
            f"only), batch {p.get('batch')}; the C sink is nginx (Debian's, TLS + HTTP/2, "
            "`http2_max_concurrent_streams 1000`, `return 200`), started and stopped by the bench "
            "(`bench/sinks.py`). Launched as `campaign launch` launches (`campaigns.launcher.launch` over a "
            "segment of the user ids, sent now: the launcher queues the rows itself), timed from the launch to "
            "the last tracked `sent` row."]  # fmt: skip
    if p.get("sink_skipped"):
        out += [f"- C sink rows skipped: {p['sink_skipped']}"]
    for key, r in (p.get("rows") or {}).items():
        out += [f"- **{PUSH_LABELS.get(key, key)}**: {fmt(r.get('sent'))} sent in {fmt(r.get('elapsed_s'))} s = "
                f"**{fmt(r.get('push_per_s'))}/s**; {(r.get('cpu') or {}).get('cores_busy')} cores busy; CPU µs per "
                f"push: {r.get('cpu_us_per_push')}" + (f"; error: {r['error']}" if r.get("error") else "")]  # fmt: skip
        if r.get("otp"):
            out += [f"  - OTPs during it: {r['otp']}"]
        if r.get("otp_cpu_us_per_push"):
            out += [f"  - of the CPU per push, the OTPs beside the pushes: {r['otp_cpu_us_per_push']}; the "
                    f"pushes' total without them: {fmt(r.get('cpu_us_per_push_total_without_otps'))} µs (a bulk "
                    "worker's OTPs and redis-server's share stay in it)"]  # fmt: skip
    c = p.get("clients") or {}
    if c.get("candidates"):
        out += ["", f"HTTP/2 clients side by side on the same sink (`bench/push_clients.py`): {fmt(c.get('n'))} "
                f"APNs-shaped requests in batches of {c.get('batch')}, each client in its own process, in turn, "
                f"{c.get('rounds')} rounds; medians; CPU of the timed loop, every thread:", "",
                "| client | requests/s | CPU µs / request | runs |", "|---|---|---|---|"]  # fmt: skip
        for name, v in c["candidates"].items():
            if v.get("error"):
                out += [f"| {name} | — | — | {str(v['error'])[:80]} |"]
            else:
                out += [f"| {name} | {fmt(v.get('per_s'))} | {fmt(v.get('cpu_us'))} | {v.get('runs')} |"]
        h = p.get("h2load") or {}
        if h.get("requests_per_s"):
            out += [f"| h2load (C; 2 connections × 100 streams) | {fmt(h['requests_per_s'])} | "
                    f"{fmt(h.get('cpu_us_per_request'))} | — |"]  # fmt: skip
        out += [""]
    st = p.get("strict")
    if st:
        out += [f"- Strict sandboxes (APNs: every JWT verified against the key, every header checked, a second "
                f"token of the key within 20 min refused; FCM: the OAuth grant verified, each message validated): "
                f"{st}"]  # fmt: skip
    out += [""]
    return out


def _cmds(d: dict[str, int] | None, k: int = 8) -> str:
    if not d:
        return "—"
    return ", ".join(f"{n} {c}" for c, n in list(d.items())[:k])


def _where_time_goes(res: dict[str, Any]) -> list[str]:
    c = res.get("cost") or {}
    out = ["## Where the time goes (measured)", ""]
    for ch in ("email", "push"):
        cc = c.get(ch) or {}
        if not cc.get("stages"):
            continue
        out += [f"`process()` stages for **{ch}** under cProfile ({cc.get('profiled_elapsed_s')} s profiled vs "
                f"{cc.get('elapsed_s')} s plain; stages nest: SQL lines include the statements of the stages above):", "",  # noqa: E501
                "| stage | cumulative s | share of process() |", "|---|---|---|"]  # fmt: skip
        out += [f"| {s['stage']} | {s['cum_s']} | {s['share_pct']} % |" for s in cc["stages"]]
        out += ["", "Top functions by own time:", "", "| function | calls | own s | cum s |", "|---|---|---|---|"]
        out += [
            f"| `{t['function']}` | {t['calls']} | {t['tottime_s']} | {t['cumtime_s']} |"
            for t in cc.get("top_functions", [])
        ]
        out += [""]
    e = res.get("email") or {}
    one = (c.get("email") or {}).get("per_s_one_process")
    if one and e.get("notifications_per_s"):
        lows = max(1, int(e.get("pool", 3)) - 1)
        out += [f"- One process runs `process()` at {fmt(one)} emails/s; the pool has {lows} worker(s) on the low "
                f"queue and reached {fmt(e['notifications_per_s'])}/s on {res.get('machine_cores', '?')} cores. "
                f"10,000/s needs ~{fmt(10_000 / one)} such processes' worth of CPU."]  # fmt: skip
    out += [""]
    return out


def write_results(res: dict[str, Any], argv: str) -> None:
    notes = ""
    if RESULTS.exists():
        text = RESULTS.read_text()
        a, b = text.find("<!-- notes -->"), text.find("<!-- /notes -->")
        if a >= 0 and b > a:
            notes = text[a : b + len("<!-- /notes -->")]
    if not notes:
        notes = "<!-- notes -->\n<!-- /notes -->"
    lines = [
        "# Benchmark results",
        "",
        f"- Date: {res['date']}",
        f"- Machine: {res['machine']}",
        f"- Command: `{argv}` (scale {res['scale']}, pool {res['pool']}); total {res['total_s']} s"
        + (f" ({res['merged']})" if res.get("merged") else ""),
        "- Every part real: redis-server, SQLite (WAL), provider sandboxes over sockets in their own processes, "
        "the worker pool as `notifyctl worker --pool N`. Figures from a shared machine are noisy; "
        "re-run `make bench` for the latest.",
        "",
        "## Figures against targets",
        "",
        "| # | Figure | Target | Measured | Met |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in summary_rows(res)]
    lines += ["", "## Scenarios", ""]
    lines += _details(res)
    lines += _where_time_goes(res)
    lines += ["## Notes", "", notes, ""]
    RESULTS.write_text("\n".join(lines))
    RAW.write_text(json.dumps(res, indent=1, default=str))
