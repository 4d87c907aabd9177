"""``python -m chaos.sentinel`` (part of ``make chaos``; ~25 s even with ``--quick``, so not in the
chaos smoke): where ``redis-sentinel`` is not installed it says so on one line and exits 0, rather
than failing ``make chaos`` or passing without a word. The fault itself runs in ``make chaos``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sentinel_fault_skips_visibly_without_redis_sentinel(tmp_path: Path) -> None:
    # a PATH with redis-server but no redis-sentinel
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "redis-server").symlink_to("/usr/bin/redis-server")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
    env["PATH"] = str(bin_dir)
    r = subprocess.run(
        [sys.executable, "-m", "chaos.sentinel", "--quick"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == [
        "chaos.sentinel: redis-sentinel not installed (Debian package redis-sentinel); skipped"
    ]
    assert r.stdout == ""
