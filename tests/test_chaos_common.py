"""The loop every chaos entry point runs its faults with (``chaos.common.run_each``): a fault that
crashes is a result that fails, not the end of the run."""

from __future__ import annotations

import time

import pytest

from chaos.common import RateLimitPlan, Result, run_each
from chaos.multihost import HostResult


def test_a_crashed_scenario_is_a_failed_result_and_the_next_still_runs(capsys: pytest.CaptureFixture[str]) -> None:
    ran = []

    def run(name: str) -> Result:
        ran.append(name)
        if name == "boom":
            raise RuntimeError("kaput")
        return Result(name, sent=2, expected=2)

    results = run_each("chaos", ["boom", "fine"], run, lambda n: Result(f"chaos: {n}"))
    assert ran == ["boom", "fine"]
    crashed, fine = results
    assert crashed.fault == "chaos: boom" and not crashed.ok
    assert crashed.problems == ["scenario crashed: RuntimeError: kaput"]
    assert "RuntimeError: kaput" in crashed.figures["traceback"]
    assert fine.ok and fine.fault == "fine" and fine.seconds >= 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "chaos: boom ..."
    assert err[1].startswith("  chaos: boom: FAILED in ") and err[1].endswith("sent 0/0, lost 0, duplicated 0")
    assert err[2] == "chaos: fine ..."
    assert err[3].startswith("  fine: ok in ") and err[3].endswith("sent 2/2, lost 0, duplicated 0")


def test_the_results_say_what_failed_them() -> None:
    assert not Result("f", sent=3, expected=3, duplicated=1).ok
    assert "resent in doubt 1" in Result("f", figures={"resent_in_doubt": 1}).summary()
    # across hosts a resend of a delivery recorded in doubt is allowed: only a problem fails
    host = HostResult("h", sent=3, expected=3, duplicated=1, in_doubt=1)
    assert host.ok and host.summary().endswith("duplicated 1, in doubt 1")
    assert host.to_dict()["ok"] is True and host.to_dict()["in_doubt"] == 1
    host.problems.append("lost 1")
    assert not host.ok


def test_the_rate_limit_plan_counts_the_allowance_nobody_used() -> None:
    plan = RateLimitPlan(rate=10.0, burst=2, retry_after=2)
    t0 = time.time()
    assert plan.take("/v3/mail/send") is None and plan.take("/v3/mail/send") is None  # the burst
    refused = plan.take("/v3/mail/send")
    assert refused is not None and refused["status"] == 429 and refused["headers"]["Retry-After"] == "2"
    assert plan.unused_between(t0, time.time()) < 0.01  # every token taken as it came
    time.sleep(0.5)  # 5 tokens' worth: the bucket holds 2, 3 go unused (0.3 s of the allowance)
    assert plan.take("/v3/mail/send") is None
    slept = time.time() - t0
    lost = plan.unused_between(t0, time.time())
    assert 0.3 - 0.05 <= lost <= slept - 0.2 + 0.01, (lost, slept)
    assert (plan.allowed, plan.refused, len(plan.refused_at)) == (3, 1, 1)
    assert t0 <= plan.refused_at[0] <= time.time()
