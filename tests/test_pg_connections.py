"""A process that runs burst workers one after another (the tests' ``drain``, ``notifyctl worker
--burst`` in a script) keeps no PostgreSQL connection of the runs before: each run used to leave a
pool's worth open for the life of the process (its heap frozen, the collector never freed them),
and a test process reached the server's ``max_connections`` ("too many clients": "cannot open
database" in whatever test came next)."""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import redis
from sqlalchemy.engine import make_url

from notifyctl.context import Context
from notifyctl.db import dispose_all
from notifyctl.settings import Settings
from tests.conftest import PG_URL, make_settings
from tests.util import drain, seed, send


def test_burst_workers_in_one_process_keep_no_connection_of_the_runs_before(
    pg_url: str, home: Path, redis_url: str, rclient: redis.Redis
) -> None:
    server = make_url(PG_URL)
    me = psutil.Process()

    def held() -> int:
        """This process's open sockets to the server (its side: a closed one is gone at once)."""
        return sum(
            1
            for c in me.net_connections(kind="tcp")
            if c.raddr and c.raddr.port == (server.port or 5432) and c.status == psutil.CONN_ESTABLISHED
        )

    before = held()  # (none of this test's database)
    ctx = Context(make_settings(home, redis_url, database_url=pg_url))
    try:
        seed(ctx)
        counts = []
        for _ in range(5):
            send(ctx, recipient_id="alice", channels=["email"])
            drain(ctx)
            counts.append(held() - before)
        assert counts[0] > 0  # the count does see this process's connections
        assert len(set(counts)) == 1, counts  # (before: [2, 5, 7, 9, 11], then [2, 3, 3, 3, 3])
        dispose_all()  # also the engine ``ctx`` cached before the first run (before: one left open)
        assert held() == before
    finally:
        ctx.close()


def test_a_burst_worker_run_in_the_test_process(settings: Settings) -> None:
    """(With the next test.) rq's worker installs its SIGINT/SIGTERM handlers in this process."""
    drain(settings)
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL


def test_leaves_pytest_its_own_signal_handlers() -> None:
    """After the test before, Ctrl-C interrupts the run and SIGTERM ends it (conftest restores the
    handlers a test changed): not a warm shutdown of that finished worker on the session's Redis."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
