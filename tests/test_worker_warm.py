"""A worker loads its providers before its first job (issue 20: an OTP waited for the Twilio SDK's
imports, 0.3-4 s, on every worker's first SMS). In a fresh interpreter, as a pool worker is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from notifyctl.settings import Settings

_CHILD = """
import json, sys
from notifyctl.context import Context
from notifyctl.settings import load_settings
from worker.pipeline import Runtime

settings = load_settings(home=sys.argv[1], redis_url=sys.argv[2], **json.loads(sys.argv[3]))
lazy = "twilio.rest.api.v2010.account.message"  # imported by the SDK on a send's first use
before = lazy in sys.modules
rt = Runtime(Context(settings))
failed = rt.warm()
print(json.dumps({"before": before, "after": lazy in sys.modules, "loaded": sorted(rt._providers), "failed": failed}))
"""


def _warm(home: Path, redis_url: str, **overrides: object) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(home), redis_url, json.dumps(overrides)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_warm_loads_every_configured_provider_before_the_first_job(settings: Settings, redis_url: str) -> None:
    twilio = {
        "account_sid": "AC" + "0" * 32,
        "auth_token": "t0k",
        "from_number": "+15005550006",
        "base_url": "http://127.0.0.1:9",
    }  # fmt: skip  (nothing is sent: never connected)
    res = _warm(settings.home, redis_url, providers_sms=["twilio"], providers_email=["outbox"],
                provider_options={"twilio": twilio})  # fmt: skip
    assert res["before"] is False
    assert res["after"] is True, res  # the SDK's lazy part is in before any send
    assert "twilio" in res["loaded"] and "outbox" in res["loaded"]
    assert res["failed"] == []


def test_a_provider_that_cannot_load_is_left_for_the_send_path(settings: Settings, redis_url: str) -> None:
    res = _warm(settings.home, redis_url, providers_sms=["twilio"], provider_options={"twilio": {}})
    assert res["failed"] == ["twilio"]  # misconfigured: reported by name, the worker still starts
    assert "twilio" not in res["loaded"]


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="Linux scheduling policies")
def test_bulk_workers_run_sched_batch_and_the_high_worker_does_not(settings: Settings) -> None:
    """``--pool 3``: the worker on ``high`` alone keeps the ordinary policy; the bulk workers run
    ``SCHED_BATCH`` at nice 0 (not reniced: a reniced worker holding the SQLite writer lock starved)."""
    from rq import Worker

    from notifyctl.context import Context
    from tests.conftest import cli_env, start_pool, stop_pool

    ctx = Context(settings)
    pool = start_pool(cli_env(settings), "3", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(Worker.all(connection=ctx.redis)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = Worker.all(connection=ctx.redis)
        assert len(workers) == 3
        seen = [
            (tuple(w.queue_names()), os.sched_getscheduler(w.pid), os.getpriority(os.PRIO_PROCESS, w.pid))
            for w in workers
        ]
        high = [(p, n) for q, p, n in seen if q == ("notify-high",)]
        bulk = [(p, n) for q, p, n in seen if q != ("notify-high",)]
        assert high == [(os.SCHED_OTHER, 0)], seen
        assert bulk == [(os.SCHED_BATCH, 0)] * 2, seen
    finally:
        stop_pool(pool, timeout=30)
        ctx.close()
