"""Pipeline ceiling: N marketing emails through the whole pipeline to the outbox provider
(no network provider), with a pool of workers. Separates our own cost from any provider's.

    python -m bench.pipeline_outbox --users 50000 --pool 2
"""

from __future__ import annotations

import argparse
import json
import signal
import time

from sqlalchemy import func, select
from sqlmodel import Session, col

from bench.common import Env, bulk_notifications, bulk_users, start_pool, wait_until
from notifyctl.models import Delivery


def run(users: int, pool: int, batch: int) -> dict[str, float]:
    env = Env(batch_size=batch, rate_limits=[])
    try:
        ids = bulk_users(env.ctx, users)
        t0 = time.perf_counter()
        bulk_notifications(env.ctx, ids, "weekly_promo", ["email"], {"discount": 10, "code": "X", "first_name": "F"})
        t_written = time.perf_counter()
        stats0 = env.ctx.redis.info("commandstats")
        proc = start_pool(env, pool, {"NOTIFY_BATCH_SIZE": str(batch), "NOTIFY_RATE_LIMITS": "[]"})

        def done() -> bool:
            with Session(env.ctx.engine) as s:
                return (
                    s.execute(
                        select(func.count()).select_from(Delivery).where(col(Delivery.status) == "sent")
                    ).scalar_one()
                    >= users
                )

        ok = wait_until(done, 600, 0.5)
        t_end = time.perf_counter()
        stats1 = env.ctx.redis.info("commandstats")
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        calls = sum(v["calls"] for v in stats1.values()) - sum(v["calls"] for v in stats0.values())
        return {
            "users": users, "pool": pool, "batch": batch, "completed": ok,
            "write_s": round(t_written - t0, 2),
            "pipeline_s": round(t_end - t_written, 2),
            "notifications_per_s": round(users / (t_end - t0), 1),
            "redis_commands_per_notification": round(calls / users, 2),
        }  # fmt: skip
    finally:
        env.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=20000)
    ap.add_argument("--pool", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1000)
    a = ap.parse_args()
    print(json.dumps(run(a.users, a.pool, a.batch)))


if __name__ == "__main__":
    main()
