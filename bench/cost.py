"""Where the pipeline's time goes (issue 7, 5): ``process()`` run in this process on batches of
notifications, with and without cProfile, its cost per notification split by stage."""

from __future__ import annotations

import cProfile
import pstats
import time
from pathlib import Path
from typing import Any

from bench.common import Env, bulk_notifications, bulk_users
from bench.harness import (
    PROMO,
    Log,
    SqlCounter,
    bulk_ios_tokens,
    clear_rate_windows,
    commandstats,
    delta,
    mark_queued,
    noop,
    process_batches,
)
from bench.push_blast import apns_setup
from bench.sandboxes import SandboxProcess
from worker.pipeline import Runtime

_STAGES = [
    ("load batch (SQL)", "worker.pipeline.batch", "_Batch.__init__"),
    ("render (jinja)", "notifyctl.templates", "Template.render"),
    ("email per recipient: signed links, pixel, own copy", "worker.pipeline.render", "_EmailPlan.apply"),
    ("rate limit (Redis)", "worker.ratelimit", "RateLimiter.check_many"),
    ("claim (Redis)", "worker.claims", "Claims.take"),
    ("settle send records (Redis)", "worker.claims", "Claims.settle"),
    ("provider send", "worker.pipeline.send", "send_routes"),
    ("delivery ids", "worker.pipeline.fanout", "delivery_id"),
    ("record outcomes (Python)", "worker.pipeline.record", "_mark"),
    ("bulk UPDATEs (SQL)", "worker.pipeline.record", "_bulk_update"),
    ("SQL: Session.execute (all)", "sqlalchemy.orm.session", "Session.execute"),
    ("SQL: commit", "sqlalchemy.orm.session", "Session.commit"),
]


def _code_key(module: str, qual: str) -> tuple[str, int, str] | None:
    import importlib

    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    code = getattr(obj, "__code__", None)
    if code is None:
        return None
    return (code.co_filename, code.co_firstlineno, code.co_name)


def _stage_table(prof: cProfile.Profile, total_key: tuple[str, int, str] | None) -> list[dict[str, Any]]:
    st = pstats.Stats(prof)
    raw = st.stats  # type: ignore[attr-defined]
    total = raw[total_key][3] if total_key and total_key in raw else None
    rows = []
    for label, module, qual in _STAGES:
        key = _code_key(module, qual)
        if key is None or key not in raw:
            continue
        cum = raw[key][3]
        rows.append(
            {"stage": label, "cum_s": round(cum, 3), "share_pct": round(cum / total * 100, 1) if total else None}
        )
    return rows


def _top_functions(prof: cProfile.Profile, k: int = 12) -> list[dict[str, Any]]:
    st = pstats.Stats(prof)
    raw = st.stats  # type: ignore[attr-defined]
    items = sorted(raw.items(), key=lambda kv: -kv[1][2])[:k]
    out = []
    for (fn, line, name), (_cc, nc, tt, ct, _callers) in items:
        short = "/".join(Path(fn).parts[-2:]) if fn != "~" else "builtin"
        out.append(
            {"function": f"{short}:{line}({name})", "calls": nc, "tottime_s": round(tt, 3), "cumtime_s": round(ct, 3)}
        )
    return out


def _process_in_process(env: Env, nids: list[str], batch: int, profile: bool) -> dict[str, Any]:
    mark_queued(env, nids)
    rt = Runtime(env.ctx, worker_name="bench-inproc")
    stats0 = commandstats(env)
    prof = cProfile.Profile() if profile else None
    try:
        with SqlCounter(env.ctx.engine) as sql:
            t0 = time.perf_counter()
            sent = process_batches(rt, nids, batch, prof)
            elapsed = time.perf_counter() - t0
    finally:
        rt.close()
    cmds = delta(stats0, commandstats(env))
    n = max(1, sent)
    res: dict[str, Any] = {
        "notifications": len(nids),
        "sent": sent,
        "batches": -(-len(nids) // batch),
        "elapsed_s": round(elapsed, 3),
        "per_s_one_process": round(sent / elapsed, 1),
        "sql_statements": dict(sql.statements.most_common()),
        "sql_statements_per_notification": round(sum(sql.statements.values()) / n, 4),
        "sql_statements_per_batch": round(sum(sql.statements.values()) / max(1, -(-len(nids) // batch)), 1),
        "sql_executemany_rows_per_notification": round(sql.many_rows / n, 2),
        "redis_commands": cmds,
        "redis_commands_per_notification": round(sum(cmds.values()) / n, 2),
    }
    if prof:
        res["stages"] = _stage_table(prof, _code_key("worker.pipeline", "process"))
        res["top_functions"] = _top_functions(prof)
    return res


def cost(n: int, batch: int = 1000, log: Log = noop) -> dict[str, Any]:
    """(5) worker.pipeline.process in this process over batches: SQL statements (a
    before_cursor_execute listener), Redis commands (INFO commandstats), and a cProfile summary,
    for email (SendGrid sandbox) and push (APNs sandbox)."""
    import tempfile

    sg = SandboxProcess("sendgrid")
    sb, opts = apns_setup(Path(tempfile.mkdtemp(prefix="bench-apns-")))
    overrides = {
        "providers_email": ["sendgrid"],
        "providers_push_ios": ["apns"],
        "batch_size": batch,
        "provider_options": {"sendgrid": {"api_key": sg.info["api_key"], "base_url": sg.info["url"]}, "apns": opts},
    }
    env = Env(**overrides)
    out: dict[str, Any] = {"notifications": n, "batch": batch}
    try:
        ids = bulk_users(env.ctx, n)
        bulk_ios_tokens(env, ids)
        for label, channel in (("email", "email"), ("push", "push")):
            plain = bulk_notifications(env.ctx, ids, "weekly_promo", [channel], PROMO)
            clear_rate_windows(env)
            out[label] = _process_in_process(env, plain, batch, profile=False)
            log(f"  {label}: {out[label]['per_s_one_process']}/s in one process (no profiler); profiling...")
            profiled = bulk_notifications(env.ctx, ids, "weekly_promo", [channel], PROMO)
            clear_rate_windows(env)
            prof = _process_in_process(env, profiled, batch, profile=True)
            out[label]["profiled_elapsed_s"] = prof["elapsed_s"]
            out[label]["stages"] = prof.get("stages")
            out[label]["top_functions"] = prof.get("top_functions")
    finally:
        sg.stop()
        sb.stop()
        env.close()
    return out
