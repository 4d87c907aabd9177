"""``make chaos`` / ``python -m chaos.run [--quick] [--only NAME ...] [--json]``: inject each fault
into a real system (worker pool subprocess, private redis-server with AOF, SQLite, provider
sandboxes over sockets) and print, per fault, what the provider sandboxes accepted: sent, lost,
duplicated (by our delivery id), with notes. Exit 1 if any fault lost or duplicated a message or
exposed another problem (a dead pool, a stuck circuit, a DLQ left full...)."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from rich.console import Console
from rich.table import Table

from chaos.common import Result, run_each
from chaos.scenarios import SCENARIOS

# the faults by their usual duration with --quick, longest first (measured: outage ~21 s, workers
# ~19 s, redis ~16 s, ratelimit ~15 s, launcher ~15 s, hung ~11 s at a load of 4.6 on 2 cores)
LONGEST_FIRST = ("outage", "workers", "redis", "ratelimit", "launcher", "hung")


def _in_child(name: str, quick: bool) -> Result:
    print(f"chaos: {name} (own process) ...", file=sys.stderr, flush=True)
    t = time.monotonic()
    cmd = [sys.executable, "-m", "chaos.run", "--only", name, "--json"] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    try:
        d = json.loads(proc.stdout)["results"][0]
        d.pop("ok", None)
        r = Result(**d)
    except (ValueError, LookupError, TypeError):
        r = Result(name, problems=[f"scenario process failed (exit {proc.returncode})"])
        r.figures["traceback"] = proc.stderr[-2000:]
    r.seconds = round(time.monotonic() - t, 1)
    print("  " + r.summary(), file=sys.stderr, flush=True)
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chaos.run", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes and short windows (< 60 s in all)")
    ap.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="run only these faults (repeatable)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    ap.add_argument(
        "--parallel", type=int, default=None,
        help="faults run at once, each in its own process and world (default: 3 with --quick, else 1)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    names = [n for n in SCENARIOS if not args.only or n in args.only]
    parallel = args.parallel or (3 if args.quick else 1)
    t0 = time.monotonic()
    if parallel > 1 and len(names) > 1:
        # the longest first, so that the short ones fill the gaps; results in the usual order
        order = sorted(names, key=lambda n: LONGEST_FIRST.index(n) if n in LONGEST_FIRST else len(LONGEST_FIRST))
        with ThreadPoolExecutor(parallel) as ex:
            done = dict(zip(order, ex.map(lambda n: _in_child(n, args.quick), order), strict=True))
        results = [done[n] for n in names]
    else:
        results = run_each("chaos", names, lambda n: SCENARIOS[n](args.quick), Result)
    total = round(time.monotonic() - t0, 1)
    if args.json:
        print(json.dumps({"quick": args.quick, "seconds": total, "results": [r.to_dict() for r in results]},
                         indent=2, default=str))  # fmt: skip
    else:
        table = Table(title=f"notifyctl chaos{' (quick)' if args.quick else ''}: {total}s")
        for col in ("fault", "sent", "lost", "duplicated", "notes"):
            table.add_column(col, justify="right" if col in ("sent", "lost", "duplicated") else "left")
        for r in results:
            notes = "; ".join(r.notes + [f"[red]PROBLEM: {p}[/red]" for p in r.problems])
            table.add_row(r.fault, f"{r.sent}/{r.expected}", str(r.lost), str(r.duplicated), notes)
        Console(width=200).print(table)
        for r in results:
            extra = {k: v for k, v in r.figures.items() if k not in ("pool_log_tail", "traceback")}
            print(f"{r.fault}: {json.dumps(extra, default=str)}")
            for k in ("traceback", "pool_log_tail"):
                if r.figures.get(k):
                    print(f"--- {k} ---\n{r.figures[k]}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
