"""``worker.pipeline.process`` for push, in this process, against the C HTTP/2 sink (nginx): the
pipeline's own CPU per push, apart from the pool, RQ and the other workers (issue 20).

    python -m bench.push_profile                       # iOS, Android and the mix, 20,000 each
    python -m bench.push_profile --only mix --n 10000 --profile   # + cProfile's top functions
    python -m bench.push_profile --pyspy out.txt        # py-spy (if installed) over the runs, summarised

``--pyspy`` samples this process (``pip install py-spy``; found next to this Python, else on PATH,
else ``$PYSPY``) and prints, for the samples taken inside ``worker.pipeline.process`` only (not the
set-up), each function's share of them: its own, and with what it calls (``pyspy_summary``).

Per row: pushes/s in one process, CPU µs per push of this process (every thread: the lease
renewal too), of redis-server and of nginx, and Redis commands per push (INFO commandstats).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import subprocess
import sys
import time
from typing import Any

from sqlalchemy import update
from sqlmodel import col

from bench import sinks
from bench.common import Env, bulk_notifications, bulk_users
from bench.harness import PROMO, bulk_ios_tokens, clear_rate_windows, commandstats, delta, p256_key_pem, process_cpu
from bench.push_blast import KEY_ID, MIXES, TEAM_ID, TOPIC, device_platforms, sink_service_account
from notifyctl.context import freeze_heap
from notifyctl.models import Notification
from worker.pipeline import Runtime, process

# a sample is the pipeline's when its stack holds process(), or the route pool's thread sending a
# batch's other routes (send_routes' run, in a thread of its own: the mix)
_PIPELINE_FRAMES = ("process (worker/pipeline/__init__", "send_routes.<locals>.run (worker/pipeline/send")


def pyspy_summary(path: str, top: int = 30) -> list[str]:
    """Lines of a summary of a py-spy raw file: of the samples inside ``worker.pipeline.process``
    (and the route pool's threads),
    the share of each function's own (the innermost frame) and of its cumulative (anywhere in the
    stack), line numbers dropped."""
    import re
    from collections import Counter

    own: Counter[str] = Counter()
    cum: Counter[str] = Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            if not count.isdigit() or not any(x.startswith(_PIPELINE_FRAMES) for x in frames):
                continue
            n = int(count)
            total += n
            names = [re.sub(r":\d+\)$", ")", re.sub(r"/\S*site-packages/", "", x)) for x in frames]
            own[names[-1]] += n
            for name in set(names):
                cum[name] += n
    if not total:
        return ["py-spy: no sample inside worker.pipeline.process"]
    out = [f"py-spy: {total} samples in the pipeline (its route threads too); own share:"]
    out += [f"  {v / total * 100:5.1f} %  {k}" for k, v in own.most_common(top)]
    out.append("cumulative share:")
    out += [f"  {v / total * 100:5.1f} %  {k}" for k, v in cum.most_common(top + 10)]
    return out


def _pyspy_exe() -> str:
    near = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return os.environ.get("PYSPY") or (near if os.path.exists(near) else "py-spy")


def run(label: str, n: int, batch: int, sink: Any, profile: bool, rounds: int = 1) -> dict[str, Any]:
    apns = {"key": p256_key_pem().decode(), "key_id": KEY_ID, "team_id": TEAM_ID, "topic": TOPIC,
            "base_url": sink.url, "ca_file": sink.ca_file}  # fmt: skip
    fcm = {"service_account_json": json.dumps(sink_service_account(sink.url)), "base_url": sink.url,
           "ca_file": sink.ca_file, "token_url": sink.url + "/token"}  # fmt: skip
    env = Env(providers_push_ios=["apns"], providers_push_android=["fcm"], batch_size=batch,
              provider_options={"apns": apns, "fcm": fcm})  # fmt: skip
    out: dict[str, Any] = {"pushes": n, "batch": batch}
    try:
        ids = bulk_users(env.ctx, n)
        bulk_ios_tokens(env, ids, platforms=device_platforms(n, MIXES[label]))
        rt = Runtime(env.ctx, worker_name=f"bench-push-{label}")
        rt.warm()
        if os.environ.get("PUSH_PROFILE_NOGC"):
            gc.disable()
        freeze_heap()  # as a pool worker does once set up
        best: dict[str, Any] | None = None
        for r in range(rounds):
            nids = bulk_notifications(env.ctx, ids, "weekly_promo", ["push"], PROMO)
            clear_rate_windows(env)
            with env.ctx.engine.begin() as conn:
                for i in range(0, len(nids), 5000):
                    conn.execute(update(Notification).where(col(Notification.id).in_(nids[i : i + 5000]))
                                 .values(status="queued"))  # fmt: skip
            redis_pid = int(env.ctx.redis.info("server")["process_id"])
            nginx_pids = [p for k, p in sink.pids.items() if k != "nginx master"]
            stats0 = commandstats(env)
            prof = cProfile.Profile() if profile and r == rounds - 1 else None
            c0, r0, g0 = os.times(), process_cpu(redis_pid), sum(process_cpu(p) for p in nginx_pids)
            t0 = time.perf_counter()
            sent = 0
            if prof:
                prof.enable()
            for i in range(0, n, batch):
                sent += process(rt, nids[i : i + batch]).sent
            if prof:
                prof.disable()
            wall = time.perf_counter() - t0
            c1, r1, g1 = os.times(), process_cpu(redis_pid), sum(process_cpu(p) for p in nginx_pids)
            cmds = delta(stats0, commandstats(env))
            k = max(1, sent)
            res = {
                "sent": sent,
                "per_s_one_process": round(sent / wall, 1),
                "us_per_push": {
                    "this process": round(((c1.user - c0.user) + (c1.system - c0.system)) / k * 1e6, 1),
                    "redis-server": round((r1 - r0) / k * 1e6, 1),
                    "nginx": round((g1 - g0) / k * 1e6, 1),
                },
                "redis_commands_per_push": round(sum(cmds.values()) / k, 2),
                "redis_commands": dict(sorted(cmds.items(), key=lambda kv: -kv[1])[:10]),
                "profiled": prof is not None,
            }
            if prof is not None:
                st = pstats.Stats(prof)
                rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:25]  # type: ignore[attr-defined]
                res["top_own"] = [
                    f"{v[2] / k * 1e6:7.1f} µs own {v[3] / k * 1e6:7.1f} cum  {f[0].split('/')[-1]}:{f[1]}({f[2]})"
                    for f, v in rows
                ]
                crow = sorted(st.stats.items(), key=lambda kv: -kv[1][3])[:40]  # type: ignore[attr-defined]
                res["top_cum"] = [
                    f"{v[3] / k * 1e6:7.1f} µs cum  {f[0].split('/')[-1]}:{f[1]}({f[2]})" for f, v in crow
                ]
            if best is None or (not res["profiled"] and res["per_s_one_process"] > best.get("per_s_one_process", 0)):
                best = res if not res["profiled"] else (best or res)
            out.setdefault("rounds", []).append(res)
        rt.close()
        out["best"] = best
    finally:
        env.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--only", default="ios,android,mix")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="cProfile the last round")
    ap.add_argument("--pyspy", help="record a py-spy flame summary of this process into this file")
    args = ap.parse_args(argv)
    hint = sinks.missing()
    if hint:
        sys.exit(f"push_profile: {hint}")
    spy = None
    if args.pyspy:
        spy = subprocess.Popen([_pyspy_exe(), "record", "-p", str(os.getpid()), "-f", "raw",
                                "-r", "250", "-o", args.pyspy, "--nonblocking"])  # fmt: skip
    with open("/proc/loadavg") as f:
        print("load before:", f.read().split()[:3], flush=True)
    sink = sinks.NginxSink()
    try:
        for label in args.only.split(","):
            r = run(label, args.n, args.batch, sink, args.profile, args.rounds)
            for i, res in enumerate(r["rounds"]):
                print(f"{label} round {i + 1}: {res['per_s_one_process']}/s  µs/push {res['us_per_push']}  "
                      f"redis cmds/push {res['redis_commands_per_push']} {res['redis_commands']}",
                      flush=True)  # fmt: skip
                for line in res.get("top_own", []):
                    print("   ", line)
                if res.get("top_cum"):
                    print("  cumulative:")
                    for line in res["top_cum"]:
                        print("   ", line)
    finally:
        sink.stop()
        if spy is not None:
            spy.send_signal(2)
            spy.wait(timeout=30)
            for line in pyspy_summary(args.pyspy):
                print(line)
    with open("/proc/loadavg") as f:
        print("load after:", f.read().split()[:3], flush=True)


if __name__ == "__main__":
    main()
