"""The campaign launcher's memory (issue 7, 4): peak RSS of a launch over a segment of ``rows``
recipients against a small one, in a subprocess of its own (bench/launcher_child.py)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlmodel import col

from bench.common import Env, bulk_users
from bench.harness import (
    Log,
    noop,
)
from notifyctl.models import Notification
from worker.reconciler import reconcile


def _run_launcher(env: Env, csv_path: Path, rate: float, dry_run: bool) -> dict[str, Any]:
    """The launcher in a subprocess; peak RSS = the child's own VmHWM at its end."""
    args = [sys.executable, "-m", "bench.launcher_child", str(csv_path), str(rate)] + (["--dry-run"] if dry_run else [])
    t0 = time.perf_counter()
    p = subprocess.Popen(args, env=env.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_text, err_text = p.communicate()
    elapsed = time.perf_counter() - t0
    res: dict[str, Any] = {"elapsed_s": round(elapsed, 2)}
    if p.returncode != 0:
        res["error"] = (err_text.strip().splitlines() or ["exit " + str(p.returncode)])[-1][:300]
        return res
    res["summary"] = json.loads(out_text.strip().splitlines()[-1])
    res["peak_rss_mb"] = round(res["summary"].pop("vm_hwm_kb") / 1024, 1)
    return res


def _baseline_rss(env: Env) -> float:
    """Peak RSS of a child that only imports the launcher (the interpreter + libraries floor)."""
    code = "import bench.launcher_child as c; print(c.vm_hwm_kb())"
    out = subprocess.run([sys.executable, "-c", code], env=env.env(), capture_output=True, text=True, check=True)
    return round(int(out.stdout.strip()) / 1024, 1)


def launcher_memory(rows: int, log: Log = noop, small_fraction: float = 0.1, rounds: int = 6,
                    flat: bool = True) -> dict[str, Any]:  # fmt: skip
    """(4) peak RSS of the launcher over a CSV segment of ``rows`` users (dry run and real), the same at
    a tenth of the size (flatness), and the produce rate against --rate: scheduled (due_at span of the
    written rows) and realized (notifications the reconciler queued per second after the launch)."""
    env = Env()
    out: dict[str, Any] = {"rows": rows}
    try:
        t = time.perf_counter()
        ids = bulk_users(env.ctx, rows)
        log(f"  {rows} users written in {time.perf_counter() - t:.1f}s")
        small = max(1, int(rows * small_fraction))
        paths = {}
        for label, k in (("small", small), ("full", rows)):
            path = env.dir / f"segment_{label}.csv"
            with path.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["user_id"])
                w.writerows([u] for u in ids[:k])
            paths[label] = path
        rate = float(min(10_000, max(100, rows // 25)))  # at most the seed's peak, 10,000/s
        out["rate"] = rate
        out["baseline_rss_mb"] = _baseline_rss(env)
        if flat:
            out["dry_run_small"] = _run_launcher(env, paths["small"], rate, True)
        out["dry_run"] = _run_launcher(env, paths["full"], rate, True)
        log(f"  dry run: {out['dry_run'].get('peak_rss_mb')} MB; real launch...")
        if flat:
            out["real_small"] = _run_launcher(env, paths["small"], rate, False)
        # the small campaign is due first: let its rows go before the measured one is queued
        env.ctx.engine.dispose()
        with env.ctx.engine.begin() as conn:
            conn.execute(update(Notification).where(col(Notification.status) == "scheduled").values(status="canceled"))
        out["real"] = _run_launcher(env, paths["full"], rate, False)
        s = out["real"].get("summary") or {}
        if s.get("first_due") and s.get("last_due") and s.get("written", 0) > 1:
            from datetime import datetime

            span = (datetime.fromisoformat(s["last_due"]) - datetime.fromisoformat(s["first_due"])).total_seconds()
            sched = (s["written"] - 1) / span if span > 0 else float("inf")
            out["scheduled_rate"] = round(sched, 1)
            out["scheduled_rate_error_pct"] = round(abs(sched - rate) / rate * 100, 2)
        # realized: reconcile once a second, paced, as the pool does, and count what it queues
        queued: list[int] = []
        for _ in range(rounds):
            t_round = time.perf_counter()
            queued.append(reconcile(env.ctx, paced=True).retries_queued)  # as the pool runs it
            time.sleep(max(0.0, 1.0 - (time.perf_counter() - t_round)))
        out["reconciler_rounds"] = queued
        steady = queued[1:]
        if steady:
            realized = sum(steady) / len(steady)
            out["realized_rate"] = round(realized, 1)
            out["realized_rate_error_pct"] = round(abs(realized - rate) / rate * 100, 2)
    finally:
        env.close()
    return out
