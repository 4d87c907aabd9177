"""The cost of ``worker.claims`` alone, per delivery, in the pipeline's order for a batch: ``take``, one
``fence`` per provider call, ``settle`` with every delivery sent (issue 18's lease, issue 15/20's
CPU per notification). Against a redis-server of its own (a unix socket in a temp dir), so the
figures are the lease's and nothing else's:

    python -m bench.lease_profile                  # 200 batches of 1,000, one fence per batch
    python -m bench.lease_profile --fences 4       # four provider calls per batch

Per run: Redis commands per delivery (INFO commandstats, the scripts' own included), redis-server
CPU µs per delivery (INFO cpu), and this process's CPU µs per delivery. Run it with
``PYTHONPATH`` on two trees to compare them; the machine's load is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from worker.claims import Claims


def _redis_cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _calls(r: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()}


def run(r: redis.Redis, batches: int, size: int, fences: int) -> dict[str, object]:
    c = Claims(r, "bench-lease-1", 20, 3600)
    warm = [f"warm-{i}" for i in range(size)]
    c.take(warm)
    c.fence(warm)
    c.settle({d: "pm" for d in warm}, [])
    r.config_set("save", "")
    calls0, rcpu0, t0 = _calls(r), _redis_cpu(r), os.times()
    for b in range(batches):
        ids = [f"{b}-{i}" for i in range(size)]
        c.take(ids)
        step = -(-size // fences)
        for k in range(0, size, step):
            c.fence(ids[k : k + step])
        c.settle({d: f"pm-{d}" for d in ids}, [])
    t1, rcpu1, calls1 = os.times(), _redis_cpu(r), _calls(r)
    c.close()
    n = batches * size
    ran = {k: v - calls0.get(k, 0) for k, v in calls1.items() if v - calls0.get(k, 0) > 0}
    ran.pop("info", None)
    return {
        "deliveries": n,
        "redis_commands_per_delivery": round(sum(ran.values()) / n, 3),
        "redis_commands": dict(sorted(ran.items(), key=lambda kv: -kv[1])),
        "redis_cpu_us_per_delivery": round((rcpu1 - rcpu0) / n * 1e6, 2),
        "process_cpu_us_per_delivery": round(((t1.user - t0.user) + (t1.system - t0.system)) / n * 1e6, 2),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--fences", type=int, default=1, help="provider calls (fences) per batch")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("lease_profile: redis-server not found (apt-get install -y redis-server)")
    with open("/proc/loadavg") as f:
        print("load before:", f.read().split()[:3], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "redis.sock"
        proc = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        try:
            r = redis.Redis(unix_socket_path=str(sock))
            deadline = time.monotonic() + 10
            while True:
                try:
                    r.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            for _ in range(args.repeat):
                r.flushall()
                print(run(r, args.batches, args.size, args.fences), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    with open("/proc/loadavg") as f:
        print("load after:", f.read().split()[:3], flush=True)


if __name__ == "__main__":
    main()
