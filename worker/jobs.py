"""RQ jobs: thin, importable functions taking ids. The logic lives in ``worker.pipeline``.

The per-process runtime (connections, providers) is built once, at worker start, from the
settings root the worker process was given (``configure``).

A module of its own, not ``worker.pipeline``'s: every queued job stores its function's name,
``worker.jobs.process`` (``notifyctl.intake.JOB_FUNC``), so that name stays put for the jobs
queued before an upgrade to run after it.
"""

from __future__ import annotations

from typing import Any

from notifyctl.context import Context
from notifyctl.liveness import Liveness
from worker.pipeline import Runtime
from worker.pipeline import process as _process

_runtime: Runtime | None = None


def configure(ctx: Context, worker_name: str | None = None, liveness: Liveness | None = None) -> Runtime:
    global _runtime
    if _runtime is not None:
        _runtime.close()
    _runtime = Runtime(ctx, worker_name, liveness)
    return _runtime


def runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        raise RuntimeError("worker.jobs.configure(ctx) was not called: start workers with `notifyctl worker`")
    return _runtime


def close() -> None:
    """Close this process's runtime if one was configured (a test's teardown, a clean shutdown)."""
    global _runtime
    if _runtime is not None:
        _runtime.close()
        _runtime = None


def process(notification_ids: list[str], as_of: float | None = None) -> dict[str, Any]:
    """Enrich, rate-limit and send a batch of notifications (idempotent)."""
    return _process(runtime(), notification_ids, as_of).to_dict()
