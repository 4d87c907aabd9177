"""The reconciler's lock (issue 18): owned (a token), renewed while a round runs, released by
compare-and-delete; a round never writes without it. The rounds are made long by a real writer
holding the database (SQLite: BEGIN IMMEDIATE; PostgreSQL: LOCK TABLE), as a busy database does."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import redis
from sqlalchemy import create_engine, select, text, update
from sqlmodel import Session

from notifyctl import keys
from notifyctl.context import Context
from notifyctl.models import Notification, NotificationStatus
from tests.util import seed, send
from worker.reconciler import ReconcileResult, reconcile


@contextmanager
def database_held(ctx: Context, seconds: float) -> Iterator[threading.Event]:
    """Another connection holds the notifications table for ``seconds`` (from when the returned
    event is set, which is once it holds it)."""
    held = threading.Event()
    url = ctx.settings.effective_database_url()

    def hold() -> None:
        if url.startswith("sqlite"):
            conn = sqlite3.connect(str(ctx.settings.sqlite_path), isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            held.set()
            time.sleep(seconds)
            conn.execute("ROLLBACK")
            conn.close()
        else:
            engine = create_engine(url)
            with engine.begin() as c:
                c.execute(text("LOCK TABLE notifications IN EXCLUSIVE MODE"))
                held.set()
                time.sleep(seconds)
            engine.dispose()

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(30)
    try:
        yield held
    finally:
        t.join()


class Scene:
    """A seeded database (``any_db_ctx``) where notifications get lost, and reconcilers of their own."""

    def __init__(self, ctx: Context, rclient: redis.Redis) -> None:
        self.ctx, self.rclient = ctx, rclient
        self.later = 0.0
        self.contexts: list[Context] = []

    def lost(self, n: int) -> list[str]:
        """``n`` notifications accepted as queued whose jobs Redis lost (as after a crash); ``later``
        becomes a time past their recovery grace."""
        nids = [send(self.ctx).notification_id for _ in range(n)]
        for k in self.rclient.scan_iter("rq:*"):
            self.rclient.delete(k)
        self.later = time.time() + self.ctx.settings.recovery_grace + 1
        return nids

    def reconciler(self) -> Context:
        """A Context of its own (its own connections), as another pool or the CLI has."""
        c = Context(self.ctx.settings)
        self.contexts.append(c)
        return c


@pytest.fixture
def scene(any_db_ctx: Context, rclient: redis.Redis) -> Iterator[Scene]:
    seed(any_db_ctx)
    sc = Scene(any_db_ctx, rclient)
    yield sc
    for c in sc.contexts:
        c.close()


def jobs_per_notification(ctx: Context) -> Counter[str]:
    seen: Counter[str] = Counter()
    for prio in ("high", "normal", "low"):
        for job in ctx.queue(prio).get_jobs():
            seen.update(job.args[0])
    return seen


def in_thread(fn: Callable[[], ReconcileResult]) -> tuple[threading.Thread, list[ReconcileResult], list[float]]:
    out: list[ReconcileResult] = []
    took: list[float] = []

    def run() -> None:
        t0 = time.monotonic()
        out.append(fn())
        took.append(time.monotonic() - t0)

    t = threading.Thread(target=run)
    t.start()
    return t, out, took


def lock_taken(rclient: redis.Redis) -> None:
    """Waits on the reconciler's lock key: a round (started in a thread) holds it."""
    deadline = time.monotonic() + 60
    while rclient.get(keys.RECONCILE_LOCK) is None:
        assert time.monotonic() < deadline, "no round took the lock"
        time.sleep(0.01)


def test_a_long_round_is_not_run_twice_at_once(scene: Scene, rclient: redis.Redis) -> None:
    """Two reconcilers (two pools, each with its own connections): the second one's round comes
    1.2 s after the first began — past the old lock's 0.9 s — while the first is still waiting on
    the database. It is skipped, and every lost notification is queued again exactly once."""
    ctx = scene.ctx
    nids = scene.lost(30)
    later = scene.later
    first_ctx, second_ctx = scene.reconciler(), scene.reconciler()
    with database_held(ctx, 3.0):
        first, first_res, first_took = in_thread(lambda: reconcile(first_ctx, now=later))
        lock_taken(rclient)  # (a loaded machine may start the thread late)
        time.sleep(1.2)
        assert first.is_alive()  # waiting on the database, lock held
        second_res = reconcile(second_ctx, now=later)
        first.join(60)
    assert first_took[0] > 2.0, first_took  # a round far longer than 0.9 s
    assert first_res[0].recovered == 30 and not first_res[0].skipped_locked
    assert second_res.skipped_locked and second_res.recovered == 0
    assert jobs_per_notification(ctx) == Counter({nid: 1 for nid in nids})
    assert rclient.get(keys.RECONCILE_LOCK) is None  # released at the end, not left to expire
    # the next round (its pace past) takes the lock again at once and finds nothing lost
    time.sleep(0.95)
    again = reconcile(second_ctx, now=later)
    assert not again.skipped_locked and again.recovered == 0


def test_a_round_that_lost_its_lock_stops_and_leaves_the_new_holders_lock(scene: Scene, rclient: redis.Redis) -> None:
    """While a round runs (waiting on the database), its lock becomes another reconciler's (it ran
    out): the round writes nothing after the step it was in, and does not delete the other's lock."""
    ctx = scene.ctx
    retry, lost = scene.lost(2)
    with Session(ctx.engine) as s:
        s.execute(update(Notification).where(Notification.id == retry).values(status=NotificationStatus.retrying))
        s.commit()
    later = scene.later
    other = scene.reconciler()
    with database_held(ctx, 2.0):
        t, res, _ = in_thread(lambda: reconcile(other, now=later))
        lock_taken(rclient)
        rclient.set(keys.RECONCILE_LOCK, "another-reconciler", px=30_000)  # the new holder
        t.join(60)
    # the step it was in (due retries) finished or never began, as the steal fell; nothing after it ran
    assert res[0].lock_lost and not res[0].skipped_locked and res[0].recovered == 0
    assert rclient.get(keys.RECONCILE_LOCK) == b"another-reconciler"
    with Session(ctx.engine) as s:
        job_of_lost = s.execute(select(Notification.job_id).where(Notification.id == lost)).scalar_one()
    assert job_of_lost == f"job_{lost}"  # untouched: the lost step never ran
    assert jobs_per_notification(ctx) == Counter({retry: 1} if res[0].retries_queued else {})


def test_a_forced_round_waits_for_the_running_one(scene: Scene) -> None:
    """`notifyctl reconcile` (force) during a pool's long round: it waits for the lock, then runs."""
    ctx = scene.ctx
    nids = scene.lost(5)
    later = scene.later
    pool_ctx, cli_ctx = scene.reconciler(), scene.reconciler()
    with database_held(ctx, 2.0):
        t, res, _ = in_thread(lambda: reconcile(pool_ctx, now=later))
        lock_taken(scene.rclient)  # the pool's round runs (not a fixed sleep: a loaded machine starts it late)
        forced = reconcile(cli_ctx, now=later, force=True)  # blocks until the pool's round is over
        t.join(60)
    assert res[0].recovered == 5 and not forced.skipped_locked and forced.recovered == 0
    assert jobs_per_notification(ctx) == Counter({nid: 1 for nid in nids})
