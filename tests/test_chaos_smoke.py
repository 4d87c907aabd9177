"""The short version of `make chaos`: every fault of issue 8, small and fast, as one real subprocess
(`python -m chaos.run --quick --json`: worker pool subprocesses, private redis-servers with AOF,
SQLite, SendGrid/Twilio sandboxes over sockets). Both sandboxes record our delivery id on every
accepted message, so lost and duplicated are exact and must be 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

FAULTS = ["workers", "launcher", "redis", "outage", "ratelimit", "hung"]


@pytest.fixture(scope="module")
def report() -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
    proc = subprocess.run(
        [sys.executable, "-m", "chaos.run", "--quick", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.stdout.strip(), f"no report (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


@pytest.mark.parametrize("index", range(len(FAULTS)), ids=FAULTS)
def test_fault_loses_nothing_and_sends_once(report: dict, index: int) -> None:
    results = report["results"]
    assert len(results) == len(FAULTS)
    r = results[index]
    detail = json.dumps({k: r[k] for k in ("fault", "notes", "problems", "figures")}, default=str)[:4000]
    assert r["expected"] > 0 and r["sent"] == r["expected"], detail
    assert r["lost"] == 0, detail
    assert r["duplicated"] == 0, detail
    assert r["problems"] == [], detail
