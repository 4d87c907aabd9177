"""Shared bench plumbing: a private Redis, a fresh home, bulk users and notifications, machine facts."""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from notifyctl.bulk import prepare_insert
from notifyctl.context import Context
from notifyctl.db import dispose_all, write_lock
from notifyctl.models import Notification, User, new_id, utcnow
from notifyctl.redisconn import ensure_server, stop_server
from notifyctl.settings import load_settings


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}, {platform.system()}"


class Env:
    """A bench environment: its own redis-server and SQLite (or the given DB URL) in a temp dir."""

    def __init__(self, **settings: Any) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="notify-bench-"))
        self.redis_dir = self.dir / "redis"
        url = ensure_server(self.redis_dir)
        # NOTIFY_BENCH_DATABASE_URL (set by `bench.run --database-url`): a fresh schema per run on that server
        self._pg_schema: str | None = None
        # ``bench_pg``: this Env's PostgreSQL server (a scenario run on both databases side by side);
        # "" = SQLite whatever the environment says
        pg = settings.pop("bench_pg", None)
        if pg is None:
            pg = os.environ.get("NOTIFY_BENCH_DATABASE_URL")
        if pg and "database_url" not in settings:
            import uuid

            from sqlalchemy import create_engine, text

            self._pg_base = pg
            self._pg_schema = "bench_" + uuid.uuid4().hex[:10]
            admin = create_engine(pg)
            with admin.begin() as conn:
                conn.execute(text(f"CREATE SCHEMA {self._pg_schema}"))
            admin.dispose()
            settings["database_url"] = f"{pg}?options=-csearch_path%3D{self._pg_schema}"
        self.settings = load_settings(home=self.dir / "home", redis_url=url, **settings)
        self.ctx = Context(self.settings)

    def env(self, **extra: str) -> dict[str, str]:
        e = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
        e.update({"NOTIFY_HOME": str(self.settings.home), "NOTIFY_REDIS_URL": str(self.settings.redis_url)})
        if self.settings.database_url:
            e["NOTIFY_DATABASE_URL"] = self.settings.database_url
        e.update(extra)
        return e

    def close(self) -> None:
        self.ctx.close()
        stop_server(self.redis_dir)
        if self._pg_schema:
            from sqlalchemy import create_engine, text

            dispose_all()
            admin = create_engine(self._pg_base)
            with admin.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {self._pg_schema} CASCADE"))
            admin.dispose()


def bulk_users(ctx: Context, n: int, prefix: str = "u", chunk: int = 5000) -> list[str]:
    ids = [f"{prefix}{i:07d}" for i in range(n)]
    now = utcnow()
    with ctx.engine.begin() as conn:
        for i in range(0, n, chunk):
            conn.execute(
                insert(User),
                [
                    {"id": uid, "email": f"{uid}@example.com", "phone": None, "timezone": "UTC", "locale": "en",
                     "sms_opt_in": False, "attributes": {"first_name": uid}, "created_at": now, "updated_at": now}
                    for uid in ids[i : i + chunk]
                ],
            )  # fmt: skip
    return ids


def bulk_notifications(ctx: Context, user_ids: list[str], template_id: str, channels: list[str],
                       data: dict[str, Any] | list[dict[str, Any]], priority: str = "low", category: str = "marketing",
                       chunk: int = 5000, status: str = "scheduled") -> list[str]:  # fmt: skip
    """Write notifications as a campaign launcher does: status scheduled (or ``status``: ``queued``, as
    it writes the rows it queues itself), due now. ``data``: the same for every recipient, or one per
    recipient (a segment's columns)."""
    now = utcnow()
    campaign = new_id("c")
    nids: list[str] = []
    for i in range(0, len(user_ids), chunk):
        rows = []
        for j, uid in enumerate(user_ids[i : i + chunk], i):
            nid = new_id("n")
            nids.append(nid)
            rows.append({"id": nid, "recipient_id": uid, "type": template_id, "template_id": template_id,
                         "category": category, "priority": priority, "channels": channels,
                         "data": data if isinstance(data, dict) else data[j],
                         "dedup_key": f"campaign:{campaign}:{uid}", "campaign_id": campaign, "status": status,
                         "due_at": now, "created_at": now, "updated_at": now})  # fmt: skip
        # one transaction per chunk, under the SQLite writer lock, as the campaign launcher writes
        insert_rows = prepare_insert(ctx.engine, Notification.__table__, rows, ["campaign_id", "recipient_id"])  # type: ignore[attr-defined]
        with write_lock(ctx.engine), ctx.engine.begin() as conn:
            insert_rows(conn)
    return nids


def wait_until(pred: Any, timeout: float, step: float = 0.2) -> bool:
    """Poll ``pred`` every ``step`` seconds until it holds (True) or ``timeout`` passes (its last
    answer). The bench's and the chaos suite's one waiting loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def start_pool(env: Env, pool: int, extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "notifyctl.cli.main", "worker", "--pool", str(pool)],
        env=env.env(**(extra_env or {})), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
