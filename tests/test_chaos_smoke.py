"""The short version of `make chaos`: every fault of issue 8, small and fast, as one real subprocess
(`python -m chaos.run --quick --json`: worker pool subprocesses, private redis-servers with AOF,
SQLite, SendGrid/Twilio sandboxes over sockets), beside the bench smoke when both run
(tests/smoke_runs.py). Both sandboxes record our delivery id on every
accepted message, so lost and duplicated are exact and must be 0."""

from __future__ import annotations

import json

import pytest

from tests import smoke_runs

FAULTS = ["workers", "launcher", "redis", "outage", "ratelimit", "hung"]


@pytest.fixture(scope="module")
def report() -> dict[str, object]:
    # started beside the bench smoke when both run (tests/smoke_runs.py), else here
    return smoke_runs.chaos_report()


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
