"""The chaos smoke's run (``python -m chaos.run --quick --json``, tests/test_chaos_smoke.py) as a
background subprocess, so that it can run beside the bench smoke (tests/test_bench_smoke.py): both
spend most of their time waiting on their own subprocesses (worker pools, sandboxes, outage windows),
so side by side they take little more than the longer of the two.

``conftest.py`` puts the chaos smoke's tests right after the bench smoke's when both are selected;
the bench test starts the chaos run first (``start_chaos``); the chaos tests read its report
(``chaos_report``, which starts the run itself when nobody did). The run is killed at the end of
the session if it is still going. Nothing here judges anything: the tests do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
CHAOS_TIMEOUT = 240.0  # seconds for the whole --quick run, on a loaded machine

wanted = False  # set by conftest.py when the chaos smoke is among the selected tests


class _Run:
    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
        self.dir = Path(tempfile.mkdtemp(prefix="notify-chaos-smoke-"))
        self.out: TextIO = open(self.dir / "stdout.json", "w+")  # noqa: SIM115 - read back at the end
        self.err: TextIO = open(self.dir / "stderr.txt", "w+")  # noqa: SIM115
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chaos.run", "--quick", "--json"],
            cwd=ROOT, env=env, stdout=self.out, stderr=self.err, text=True, start_new_session=True,
        )  # fmt: skip

    def report(self) -> dict[str, Any]:
        try:
            self.proc.wait(timeout=max(1.0, CHAOS_TIMEOUT - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.kill()
        self.out.seek(0)
        self.err.seek(0)
        out, err = self.out.read(), self.err.read()
        assert out.strip(), f"no report (exit {self.proc.returncode}):\n{err[-3000:]}"
        report: dict[str, Any] = json.loads(out)
        return report

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the run and every process it started
            except ProcessLookupError:
                pass
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        self.out.close()
        self.err.close()


_run: _Run | None = None
_report: dict[str, Any] | None = None


def start_chaos() -> None:
    """Start the chaos smoke's run now, in the background (once)."""
    global _run
    if _run is None and _report is None:
        _run = _Run()


def chaos_report() -> dict[str, Any]:
    """The chaos smoke's JSON report, once its run has ended (started here if it was not)."""
    global _run, _report
    if _report is None:
        start_chaos()
        assert _run is not None
        try:
            _report = _run.report()
        finally:
            _run.close()
            _run = None
    return _report


def stop() -> None:
    """End of the session: a run still going is killed."""
    global _run
    if _run is not None:
        _run.close()
        _run = None
