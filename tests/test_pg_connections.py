"""A process that runs burst workers one after another (the tests' ``drain``, ``notifyctl worker
--burst`` in a script) keeps no PostgreSQL connection of the runs before: each run used to leave a
pool's worth open for the life of the process (its heap frozen, the collector never freed them),
and a test process reached the server's ``max_connections`` ("too many clients": "cannot open
database" in whatever test came next)."""

from __future__ import annotations

import uuid
from pathlib import Path

import redis
from sqlalchemy import create_engine, text

from notifyctl.context import Context
from notifyctl.db import dispose_all
from tests.conftest import PG_URL, make_settings
from tests.util import drain, seed, send


def test_burst_workers_in_one_process_keep_no_connection_of_the_runs_before(
    pg_url: str, home: Path, redis_url: str, rclient: redis.Redis
) -> None:
    app = f"burst_{uuid.uuid4().hex[:10]}"  # this test's connections, told apart from any other's
    admin = create_engine(PG_URL)

    def held() -> int:
        with admin.connect() as conn:
            q = text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :a")
            return int(conn.execute(q, {"a": app}).scalar_one())

    ctx = Context(make_settings(home, redis_url, database_url=f"{pg_url}&application_name={app}"))
    try:
        seed(ctx)
        counts = []
        for _ in range(5):
            send(ctx, recipient_id="alice", channels=["email"])
            drain(ctx)
            counts.append(held())
        assert counts[0] > 0  # the count does see this process's connections
        assert len(set(counts)) == 1, counts  # (before: two more a run, 3, 5, 7, 9, 11)
        dispose_all()  # also the engine ``ctx`` cached before the first run (before: one left open)
        assert held() == 0
    finally:
        ctx.close()
        admin.dispose()
