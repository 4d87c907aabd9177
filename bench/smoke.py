"""Every bench scenario at a tiny size, so the benches don't rot (called from tests/test_bench_smoke.py).

Sizes are far too small for the figures to mean anything; this checks that each scenario runs end
to end against the real parts and reports the figures RESULTS.md is built from.
"""

from __future__ import annotations

from typing import Any

from bench import shards, targets
from bench.apprise_compare import apprise_vs_notifyctl
from bench.cost import cost
from bench.email_blast import email_blast
from bench.launcher_memory import launcher_memory
from bench.push_blast import push_blast


def smoke(n: int = 300, pool: int = 2, apprise_n: int = 10) -> dict[str, Any]:
    res: dict[str, Any] = {
        "email": email_blast(n, pool, otps=5, timeout=60),
        # the C sink rows and the client comparison, small; the strict sandboxes' run is the push
        # smoke of tests/test_push_smoke.py
        "push": push_blast(n, pool, timeout=60, otps=5, client_rounds=1, mixes=("mix",),
                                     candidates=("apns", "fcm", "aioapns"), strict=False),
        "launcher": launcher_memory(n * 2, rounds=2, flat=False),
        "cost": cost(n),
        "apprise": apprise_vs_notifyctl(apprise_n, pool),  # one SMTP session per email: kept few
        "shards": shards.email_shards(n, counts=(1, 2), pool=2),
        "scale": 0, "pool": pool, "machine": "smoke", "date": "smoke", "total_s": 0,
    }  # fmt: skip
    res["summary_rows"] = targets.summary_rows(res)
    return res


if __name__ == "__main__":
    import json
    import time

    t = time.perf_counter()
    out = smoke()
    print(json.dumps(out, indent=1, default=str)[:4000])
    print(f"{time.perf_counter() - t:.1f}s")
