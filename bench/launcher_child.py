"""The campaign launcher in its own process, for peak-RSS measurement (bench scenario 4).

    python -m bench.launcher_child SEGMENT.csv RATE [--dry-run]

Settings from the environment (NOTIFY_HOME, NOTIFY_REDIS_URL). Prints the launch summary as one
JSON line (waves and bad-row details left out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from campaigns.launcher import LaunchSpec, launch
from notifyctl.context import Context
from notifyctl.settings import load_settings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("rate", type=float)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    ctx = Context(load_settings())  # the root: this process's settings, read once
    spec = LaunchSpec(template_id="weekly_promo", channels=["email"], rate=a.rate, segment_csv=a.csv,
                      quiet_hours="off", data={"discount": 10, "code": "WEEK10", "first_name": "F"})  # fmt: skip
    summary = launch(ctx, spec, dry_run=a.dry_run)
    keep = {k: v for k, v in summary.items() if k not in ("waves", "bad_rows") and not isinstance(v, list | dict)}
    keep["vm_hwm_kb"] = vm_hwm_kb()
    print(json.dumps(keep, default=str))


def vm_hwm_kb() -> int:
    """Peak resident set of this process image (Linux VmHWM; reset by exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


if __name__ == "__main__":
    main()
