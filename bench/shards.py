"""The email blast over 1, 2 and 4 Redis shards (issue 18, item 5): what each shard's Redis spends
per notification, and from that the paper figure for 100,000 notifications/s.

Each run is the headline's path — ``campaign launch`` over a segment CSV giving each recipient a
unique first name and code, sent through the SendGrid sandbox by ``notifyctl worker --pool N`` —
with ``NOTIFY_REDIS_SHARDS`` listing 1, 2 or 4 private redis-servers (AOF on, as the embedded one).
Measured per shard: its Redis's CPU (``INFO cpu``: the main thread, which is what one Redis is
limited by, and the whole process) and its commands (``INFO commandstats``), from the launch to the
last ``sent``. On a 2-core machine the throughput does not grow with shards (the workers are
CPU-bound, and every Redis shares the same two cores): what the runs measure is the Redis cost per
notification each shard carries, which is what the paper figure needs."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from bench.common import Env, bulk_users, start_pool
from bench.email_blast import SEGMENT_DATA, SEGMENT_PROMO_ID, write_segment_csv
from bench.harness import CpuMeter, count_sent, settings_env, stop_pool, wait_sent
from bench.sandboxes import SandboxProcess
from campaigns.launcher import LaunchSpec, launch
from notifyctl import keys
from notifyctl.context import Context
from notifyctl.redisconn import ensure_server, stop_server
from notifyctl.settings import load_settings
from notifyctl.shards import shard_of

Log = Any
TARGET = 100_000.0  # notifications/s: the paper figure's target
HEADROOM = 0.5  # a shard's Redis main thread planned at most this busy (room for bursts, AOF rewrites, failover)


def _noop(_msg: str) -> None:
    pass


class ShardedEnv(Env):
    """An ``Env`` whose Redis is ``shards`` private redis-servers (shard 0 the Env's own)."""

    def __init__(self, shards: int, **settings: Any) -> None:
        super().__init__(**settings)
        settings.pop("bench_pg", None)
        self.shard_dirs = [self.redis_dir] + [self.dir / f"redis{i}" for i in range(1, shards)]
        self.urls = [str(self.settings.redis_url)] + [ensure_server(d) for d in self.shard_dirs[1:]]
        if shards > 1:
            self.ctx.close()
            self.settings = load_settings(
                home=self.dir / "home", redis_url=self.urls[0], redis_shards=self.urls, **settings
            )
            self.ctx = Context(self.settings)

    def env(self, **extra: str) -> dict[str, str]:
        e = super().env(**extra)
        if len(self.urls) > 1:
            e["NOTIFY_REDIS_SHARDS"] = json.dumps(self.urls)
        return e

    def close(self) -> None:
        super().close()
        for d in self.shard_dirs[1:]:
            stop_server(d)


def _redis_cpu(r: Any) -> tuple[float, float]:
    """(main thread, whole process) CPU seconds of one Redis (``INFO cpu``; the main thread's own
    figure from Redis 6.2 on, else the process's)."""
    info = r.info("cpu")
    proc = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    main = info.get("used_cpu_user_main_thread")
    return (float(main) + float(info["used_cpu_sys_main_thread"]) if main is not None else proc), proc


def _calls(r: Any) -> int:
    return sum(int(v["calls"]) for v in r.info("commandstats").values())


def _wait_workers(env: ShardedEnv, n: int, timeout: float = 90) -> float:
    """Seconds until ``n`` workers have announced themselves (their liveness keys are on their shards)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        found = sum(len(list(env.ctx.shard_redis(i).scan_iter(keys.alive("*")))) for i in range(env.ctx.shard_count))
        if found >= n:
            return time.perf_counter() - t0
        time.sleep(0.05)
    raise RuntimeError(f"{n} workers did not start within {timeout:g}s")


def shard_run(n: int, shards: int, pool: int = 4, batch: int = 1000, log: Log = _noop,
              timeout: float = 1200) -> dict[str, Any]:  # fmt: skip
    sg = SandboxProcess("sendgrid")
    overrides: dict[str, Any] = {
        "providers_email": ["sendgrid"],
        "batch_size": batch,
        "public_url": "https://notify.example.com",
        "postal_address": "1 Main St, Springfield",
        "provider_options": {"sendgrid": {"api_key": sg.info["api_key"], "base_url": sg.info["url"]}},
    }
    env = ShardedEnv(shards, **overrides, bench_pg="")
    out: dict[str, Any] = {"shards": shards, "notifications": n, "pool": pool, "batch": batch}
    proc = None
    try:
        ids = bulk_users(env.ctx, n)
        per_shard_users = [0] * shards
        for uid in ids:
            per_shard_users[shard_of(uid, shards)] += 1
        csv_path = write_segment_csv(env.dir / "segment.csv", ids)
        proc = start_pool(env, pool, settings_env(overrides))
        out["pool_start_s"] = round(_wait_workers(env, pool), 2)
        rs = [env.ctx.shard_redis(i) for i in range(shards)]
        cpu0 = [_redis_cpu(r) for r in rs]
        calls0 = [_calls(r) for r in rs]
        pids = {f"redis-server shard {i}": int(r.info("server")["process_id"]) for i, r in enumerate(rs)}
        meter = CpuMeter({**pids, "SendGrid sandbox": sg.proc.pid, "bench (the launch, polling)": _self_pid()},
                         pool_pid=proc.pid)  # fmt: skip
        meter.start()
        t0 = time.perf_counter()
        spec = LaunchSpec(template_id=SEGMENT_PROMO_ID, channels=["email"], rate=1_000_000.0,
                          segment_csv=str(csv_path), quiet_hours="off", data=dict(SEGMENT_DATA))  # fmt: skip
        summary = launch(env.ctx, spec)
        out["written"] = summary.get("written")
        out["write_s"] = round(time.perf_counter() - t0, 2)
        error = wait_sent(env, "email", n, t0, timeout, "emails")  # cheap; confirmed by a SQL count below
        if error:
            out["error"] = error
        elapsed = time.perf_counter() - t0
        out["cpu"] = meter.stop()
        cpu1 = [_redis_cpu(r) for r in rs]
        calls1 = [_calls(r) for r in rs]
        sent = count_sent(env, "email")
        out["sent"] = sent
        out["elapsed_s"] = round(elapsed, 2)
        out["notifications_per_s"] = round(sent / elapsed, 1)
        out["per_shard"] = []
        for i in range(shards):
            main_s = cpu1[i][0] - cpu0[i][0]
            proc_s = cpu1[i][1] - cpu0[i][1]
            users = per_shard_users[i]
            out["per_shard"].append(
                {
                    "shard": i,
                    "recipients": users,
                    "redis_main_thread_cpu_s": round(main_s, 3),
                    "redis_process_cpu_s": round(proc_s, 3),
                    # per notification of this shard's users (shard 0 also carries what every host shares)
                    "redis_main_us_per_notification": round(main_s / max(1, users) * 1e6, 2),
                    "redis_commands": calls1[i] - calls0[i],
                    "redis_commands_per_notification": round((calls1[i] - calls0[i]) / max(1, users), 2),
                    "main_thread_busy": round(main_s / elapsed, 3),
                }
            )
        total_main = sum(s["redis_main_thread_cpu_s"] for s in out["per_shard"])
        out["redis_main_us_per_notification_all_shards"] = round(total_main / max(1, sent) * 1e6, 2)
        workers = sum(v for k, v in out["cpu"]["cpu_s"].items() if k.startswith("pool"))
        out["pool_cpu_us_per_notification"] = round(workers / max(1, sent) * 1e6, 1)
        log(
            f"  {shards} shard(s): {out['notifications_per_s']:.0f}/s, Redis main thread µs/notification per shard "
            + ", ".join(f"{s['redis_main_us_per_notification']}" for s in out["per_shard"])
        )
    finally:
        if proc is not None:
            err = stop_pool(proc)
            if "Traceback" in err:
                out["pool_stderr_tail"] = err[-800:]
        sg.stop()
        env.close()
    return out


def _self_pid() -> int:
    return os.getpid()


def paper_figure(runs: dict[str, dict[str, Any]], target: float = TARGET) -> dict[str, Any]:
    """Shards for ``target`` notifications/s from the measured costs: a shard other than 0 carries
    its users' share (µs of main-thread CPU per notification, the largest measured over the sharded
    runs); shard 0 carries its share plus what every host shares (its surplus over the others, per
    notification of the whole blast). A shard is planned at ``HEADROOM`` of one thread."""
    sharded = [r for r in runs.values() if r.get("shards", 1) > 1 and r.get("per_shard") and not r.get("error")]
    base = runs.get("1") or {}
    if not sharded:
        return {"error": "no sharded run measured"}
    per_user = max(s["redis_main_us_per_notification"] for r in sharded for s in r["per_shard"][1:])
    surplus = max(
        max(0.0, r["per_shard"][0]["redis_main_thread_cpu_s"] - r["per_shard"][0]["recipients"] * per_user / 1e6)
        / max(1, r["sent"])
        * 1e6
        for r in sharded
    )
    budget = 1e6 * HEADROOM  # µs of main thread per second, per shard
    # shard 0: its users' share (target / N each) plus the shared surplus on every notification
    if target * surplus >= budget:
        return {
            "error": f"shard 0's shared keys alone ({surplus:.2f} µs a notification) exceed a thread at {target:g}/s"
        }
    n = math.ceil(target * per_user / (budget - target * surplus))
    one_redis_max = 1e6 / (base["redis_main_us_per_notification_all_shards"]) if base.get("sent") else None
    pool_us = max(r["pool_cpu_us_per_notification"] for r in runs.values() if r.get("sent"))
    return {
        "target_per_s": target,
        "redis_main_us_per_notification_per_shard": per_user,
        "shard0_shared_us_per_notification": round(surplus, 2),
        "headroom": HEADROOM,
        "shards_needed": n,
        "one_redis_ceiling_per_s": round(one_redis_max) if one_redis_max else None,
        "worker_cores_needed": math.ceil(target * pool_us / 1e6),
        "pool_cpu_us_per_notification": pool_us,
    }


def email_shards(
    n: int, counts: tuple[int, ...] = (1, 2, 4), pool: int = 4, log: Log = _noop, repeats: int = 1
) -> dict[str, Any]:
    """The blast on each shard count in ``counts``, ``repeats`` times each (in rounds: 1, 2, 4, 1, 2,
    4...), then the paper figure. Of a count's runs, the one whose Redis spent the most per
    notification is kept whole (the conservative one, for the paper figure); every run's rate and
    per-shard costs are listed under ``repeats``."""
    all_runs: dict[str, list[dict[str, Any]]] = {str(k): [] for k in counts}
    for i in range(repeats):
        for k in counts:
            log(f"  email blast on {k} Redis shard(s), {n} recipients, --pool {pool} (run {i + 1} of {repeats})")
            try:
                all_runs[str(k)].append(shard_run(n, k, pool=pool, log=log))
            except Exception as exc:  # noqa: BLE001 - reported, the other counts still run
                all_runs[str(k)].append({"shards": k, "error": f"{type(exc).__name__}: {exc}"})
    runs: dict[str, dict[str, Any]] = {}
    for key, rs in all_runs.items():
        ok = [r for r in rs if r.get("per_shard") and not r.get("error")]
        runs[key] = dict(max(ok, key=lambda r: r["redis_main_us_per_notification_all_shards"]) if ok else rs[-1])
        runs[key]["repeats"] = [
            {
                "notifications_per_s": r.get("notifications_per_s"),
                "redis_main_us_per_notification": [p["redis_main_us_per_notification"] for p in r["per_shard"]],
            }
            for r in ok
        ]
    return {"notifications": n, "pool": pool, "repeats": repeats, "runs": runs, "paper": paper_figure(runs)}


def rows(s: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """The RESULTS.md summary rows (issue 18)."""
    out: list[tuple[str, str, str, str, str]] = []
    for k, r in (s.get("runs") or {}).items():
        if r.get("error") and not r.get("per_shard"):
            out.append(("18", f"Email blast on {k} Redis shard(s)", "—", str(r["error"]), "—"))
            continue
        reps = r.get("repeats") or [{"notifications_per_s": r.get("notifications_per_s"),
                                     "redis_main_us_per_notification": [p["redis_main_us_per_notification"]
                                                                        for p in r["per_shard"]]}]  # fmt: skip
        rates = "–".join(sorted({f"{x['notifications_per_s']:,.0f}" for x in reps}))
        per = "; ".join(", ".join(f"{v:g}" for v in x["redis_main_us_per_notification"]) for x in reps)
        share = ", ".join(f"{p['redis_main_thread_cpu_s'] / max(1, r['sent']) * 1e6:.1f}" for p in r["per_shard"])
        out.append(("18", f"Email blast, {_n(r.get('sent'))} recipients, {k} Redis shard(s), --pool {r.get('pool')} "
                    f"({len(reps)} run(s)): rate; each shard's Redis main-thread CPU per notification of its users "
                    "(shard 0 first; per run); each shard's per notification of the whole blast", "—",
                    f"{rates}/s; {per} µs; {share} µs", "—"))  # fmt: skip
    p = s.get("paper") or {}
    if p.get("shards_needed"):
        out.append(("18", f"Paper figure: {p['target_per_s']:,.0f} emails/s", "—",
                    f"{p['shards_needed']} Redis shards (each at ≤ {p['headroom']:.0%} of a thread), "
                    f"~{p['worker_cores_needed']} worker cores; one Redis tops out near {_n(p.get('one_redis_ceiling_per_s'))}/s",  # noqa: E501
                    "—"))  # fmt: skip
    return out


def _n(v: Any) -> str:
    return f"{v:,.0f}" if isinstance(v, (int, float)) else "not measured"


def details(s: dict[str, Any]) -> list[str]:
    if not s:
        return []
    out = ["### 18. The email blast over 1, 2 and 4 Redis shards (`bench/shards.py`)", ""]
    out += [f"- `campaign launch` over a segment CSV of {_n(s.get('notifications'))} recipients (unique first name and "
            f"code each), SendGrid sandbox, `notifyctl worker --pool {s.get('pool')}` (worker i on shard i mod N), "
            "SQLite; each shard a private redis-server (AOF everysec). Redis CPU from `INFO cpu` (main thread), "
            "commands from `INFO commandstats`, from the launch to the last `sent`. All on the same cores: the "
            "throughput cannot grow with shards here; the Redis cost each shard carries per notification is "
            "the figure."]  # fmt: skip
    for k, r in (s.get("runs") or {}).items():
        if r.get("error"):
            out += [f"- {k} shard(s): error: {r['error']}"]
        if not r.get("per_shard"):
            continue
        out += [f"- **{k} shard(s)**: {_n(r.get('sent'))} sent in {r.get('elapsed_s')} s = {_n(r.get('notifications_per_s'))}/s; "  # noqa: E501
                f"pool CPU {r.get('pool_cpu_us_per_notification')} µs/notification; Redis main thread "
                f"{r.get('redis_main_us_per_notification_all_shards')} µs/notification over all shards; CPU by process "
                f"{(r.get('cpu') or {}).get('cpu_s')}"]  # fmt: skip
        for x in r.get("repeats") or []:
            out += [f"  - run: {_n(x['notifications_per_s'])}/s, µs per notification of each shard's users "
                    f"{x['redis_main_us_per_notification']}"]  # fmt: skip
        for p in r["per_shard"]:
            out += [f"  - (the run kept) shard {p['shard']}: {_n(p['recipients'])} recipients, main thread {p['redis_main_thread_cpu_s']} s "  # noqa: E501
                    f"({p['main_thread_busy']:.0%} busy), process {p['redis_process_cpu_s']} s, "
                    f"{p['redis_main_us_per_notification']} µs and {p['redis_commands_per_notification']} commands "
                    "per notification of its users"]  # fmt: skip
    p = s.get("paper") or {}
    if p.get("shards_needed"):
        out += [f"- **Paper figure for {_n(p['target_per_s'])}/s**: a shard's Redis spends "
                f"{p['redis_main_us_per_notification_per_shard']} µs of its main thread per notification of its users, "
                f"shard 0 {p['shard0_shared_us_per_notification']} µs more per notification of the whole blast (what "
                f"every host shares); at ≤ {p['headroom']:.0%} of a thread per shard that is "
                f"**{p['shards_needed']} shards**; the workers, at {p['pool_cpu_us_per_notification']} µs of CPU per "
                f"notification, ~{p['worker_cores_needed']} cores. Not covered here: the database (one SQLite writer "
                "cannot; see the PostgreSQL row for what one server took)."]  # fmt: skip
    elif p.get("error"):
        out += [f"- paper figure: {p['error']}"]
    return out + [""]
