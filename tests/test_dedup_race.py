"""One dedup key submitted by many clients at once — a client retrying after a timeout, two hosts
handed the same job — must give one notification: exactly one ``queued``, every other answer
``duplicate`` naming it, one row in SQL. The racers are real: ``notifyctl send`` subprocesses
and concurrent requests to a real ``notifyctl serve``, on SQLite and PostgreSQL, with the Redis
key absent (a fresh key), lost (Redis restarted without it) and present.

With the Redis key present the answers must come from Redis alone: the race runs while SQL is
held (a write transaction on SQLite, the ``dedup_keys`` table locked on PostgreSQL), which a
racer that skipped Redis's answer could not get past."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import event, func, insert, select, text
from sqlmodel import Session, SQLModel

from notifyctl.api.auth import create_key
from notifyctl.context import Context
from notifyctl.db import dispose_all, engine_for, make_engine
from notifyctl.intake import claim_dedup_key, dedup_key_holder
from notifyctl.models import DedupKey, Notification, utcnow
from notifyctl.retention import purge
from notifyctl.settings import Settings
from tests.conftest import ROOT, cli_env
from tests.net import ServeProcess
from tests.util import queue_depths, seed, send

CLI_RACERS = 2
HTTP_RACERS = 8
WAIT = 120  # seconds a racer may take on a loaded machine; a racer stuck behind held SQL fails here
ORDER = {"order_id": "ORD-7", "tracking_url": "https://t.example/7"}


def _body(key: str) -> dict[str, Any]:
    return {"recipient_id": "alice", "template_id": "order_shipped_v2", "data": ORDER, "dedup_key": key}


def _start_cli(ctx: Context, n: int) -> list[subprocess.Popen[str]]:
    """``notifyctl send -f - --json`` processes: they import and then wait for the request on stdin."""
    return [
        subprocess.Popen(
            [sys.executable, "-m", "notifyctl.cli.main", "send", "-f", "-", "--json"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(ctx.settings),
            cwd=ROOT,
        )
        for _ in range(n)
    ]


def _race(ctx: Context, server: ServeProcess, api_key: str, key: str) -> list[tuple[str, str | None, str]]:
    """Every racer's answer, as ``(status, reason, notification id)``: CLI processes and HTTP requests
    let go at once."""
    procs = _start_cli(ctx, CLI_RACERS)
    http: list[Any] = [None] * HTTP_RACERS
    go = threading.Barrier(HTTP_RACERS + 1)

    def post(i: int) -> None:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": api_key}, timeout=WAIT) as c:
            c.get("/healthz")  # connected before the start
            go.wait()
            try:
                r = c.post("/v1/notify", json=_body(key))
                http[i] = (r.status_code, r.json())
            except httpx.HTTPError as exc:
                http[i] = (None, repr(exc))

    threads = [threading.Thread(target=post, args=(i,)) for i in range(HTTP_RACERS)]
    for t in threads:
        t.start()
    go.wait()
    request = json.dumps(_body(key))
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(request)
        p.stdin.close()
    answers: list[tuple[str, str | None, str]] = []
    try:
        for p in procs:
            p.wait(timeout=WAIT)  # its few lines of output fit in the pipes
            assert p.stdout is not None and p.stderr is not None
            out, err = p.stdout.read(), p.stderr.read()
            assert p.returncode == 0 and "Traceback" not in err, (p.returncode, err)
            got = json.loads(out)
            answers.append((got["status"], got["reason"], got["notification_id"]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for t in threads:
        t.join()
    for status_code, got in http:
        assert isinstance(got, dict), got
        expected = 202 if got["status"] == "queued" else 200
        assert status_code == expected, (status_code, got)
        answers.append((got["status"], got["reason"], got["notification_id"]))
    return answers


def _rows(ctx: Context, key: str) -> tuple[list[str], list[tuple[str, str]]]:
    with Session(ctx.engine) as s:
        notes = list(s.execute(select(Notification.id).where(Notification.dedup_key == key)).scalars())
        holds = [
            (k, nid) for k, nid in s.execute(select(DedupKey.key, DedupKey.notification_id).where(DedupKey.key == key))
        ]
    return notes, holds


@contextmanager
def _sql_held(ctx: Context) -> Iterator[None]:
    """Hold what a dedup claim in SQL needs until the block ends."""
    if ctx.engine.dialect.name == "sqlite":
        conn = sqlite3.connect(ctx.engine.url.database, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")  # the database's write lock (readers go on, in WAL mode)
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
    else:
        with ctx.engine.connect() as conn:
            conn.execute(text("LOCK TABLE dedup_keys IN ACCESS EXCLUSIVE MODE"))
            try:
                yield
            finally:
                conn.rollback()


def test_one_dedup_key_raced_by_cli_and_api_gives_one_notification(any_db_ctx: Context) -> None:
    ctx = any_db_ctx
    seed(ctx)
    api_key = create_key(ctx, "race").key
    with ServeProcess(cli_env(ctx.settings)) as server:
        # 1. a fresh key: nothing in Redis, nothing in SQL
        answers = _race(ctx, server, api_key, "race:fresh")
        queued = [a for a in answers if a[0] == "queued"]
        assert len(queued) == 1, answers
        winner = queued[0][2]
        assert sorted(answers) == sorted(
            [("queued", None, winner)] + [("suppressed", "duplicate", winner)] * (len(answers) - 1)
        )
        assert _rows(ctx, "race:fresh") == ([winner], [("race:fresh", winner)])
        assert ctx.redis.get("notif:dedup:race:fresh") == winner.encode()
        assert sum(queue_depths(ctx).values()) == 1  # one job: the duplicates queued nothing

        # 2. the Redis key lost (a restart without persistence): SQL decides, for every racer
        first = send(ctx, data=ORDER, dedup_key="race:lost")
        assert first.status == "queued"
        ctx.redis.delete("notif:dedup:race:lost")
        answers = _race(ctx, server, api_key, "race:lost")
        assert answers == [("suppressed", "duplicate", first.notification_id)] * len(answers)
        assert _rows(ctx, "race:lost") == ([first.notification_id], [("race:lost", first.notification_id)])
        assert ctx.redis.get("notif:dedup:race:lost") == first.notification_id.encode()  # layer 1 restored

        # 3. the Redis key present: Redis answers, without waiting for SQL
        first = send(ctx, data=ORDER, dedup_key="race:present")
        with _sql_held(ctx):
            answers = _race(ctx, server, api_key, "race:present")
        assert answers == [("suppressed", "duplicate", first.notification_id)] * len(answers)
        assert _rows(ctx, "race:present") == ([first.notification_id], [("race:present", first.notification_id)])
        assert sum(queue_depths(ctx).values()) == 3
    assert "Traceback" not in server.stderr_text()


def test_a_pending_claim_left_by_a_dead_intake_does_not_block_the_key(any_db_ctx: Context) -> None:
    """An intake that died after its Redis claim (``?<id>``) and before its SQL commit leaves a
    pending marker: the next request finds no holder in SQL and takes the key."""
    ctx = any_db_ctx
    seed(ctx)
    ctx.redis.set("notif:dedup:orphan", "?n_0000000000deaddeadx", ex=60)
    res = send(ctx, data=ORDER, dedup_key="orphan")
    assert res.status == "queued"
    assert ctx.redis.get("notif:dedup:orphan") == res.notification_id.encode()
    again = send(ctx, data=ORDER, dedup_key="orphan")
    assert (again.status, again.reason, again.notification_id) == ("suppressed", "duplicate", res.notification_id)


def test_the_database_refuses_a_second_holder_until_the_window_ends(any_db_ctx: Context) -> None:
    """The table, not intake's care, enforces one holder; an expired hold is taken over, and purge
    removes the expired ones."""
    from sqlalchemy.exc import IntegrityError

    ctx = any_db_ctx
    now = utcnow()
    with Session(ctx.engine) as s:
        s.add(DedupKey(key="k", notification_id="n_a", expires_at=now + timedelta(seconds=60)))
        s.commit()
    with Session(ctx.engine) as s:
        s.add(DedupKey(key="k", notification_id="n_b", expires_at=now + timedelta(seconds=60)))
        try:
            s.commit()
            raise AssertionError("a second holder of one dedup key was committed")
        except IntegrityError:
            s.rollback()
    with Session(ctx.engine) as s:
        assert claim_dedup_key(s, "k", "n_c", now, 60) is not None  # held: the holder is answered
        assert claim_dedup_key(s, "k", "n_c", now + timedelta(seconds=61), 60) is None  # over: taken
        s.commit()
    later = now + timedelta(seconds=200)
    with Session(ctx.engine) as s:
        held = dedup_key_holder(s, "k", now + timedelta(seconds=62))
        assert held is not None and held[0] == "n_c"
    res = purge(ctx, ctx.settings.dedup_ttl, dry_run=True, now=later + timedelta(seconds=ctx.settings.dedup_ttl))
    assert res.dedup_keys == 1
    res = purge(ctx, ctx.settings.dedup_ttl, now=later + timedelta(seconds=ctx.settings.dedup_ttl))
    assert res.dedup_keys == 1
    with Session(ctx.engine) as s:
        assert s.execute(select(func.count()).select_from(DedupKey)).scalar_one() == 0


def test_a_database_from_before_dedup_keys_is_upgraded_with_the_keys_it_holds(ctx: Context) -> None:
    """A database made before ``dedup_keys`` existed: opening it creates the table and fills it with
    the keys its notifications hold, so a repeat is still refused — by SQL, with Redis lost."""
    from notifyctl.db import dispose_all, engine_for

    seed(ctx)
    first = send(ctx, data=ORDER, dedup_key="from-before")
    with ctx.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE dedup_keys")  # as an earlier release left it
    ctx.redis.delete("notif:dedup:from-before")
    dispose_all()
    engine = engine_for(ctx.settings)  # what the next process to open the database does
    with Session(engine) as s:
        assert list(s.execute(select(DedupKey.key, DedupKey.notification_id))) == [
            ("from-before", first.notification_id)
        ]
    again = send(ctx, data=ORDER, dedup_key="from-before")
    assert (again.status, again.reason, again.notification_id) == ("suppressed", "duplicate", first.notification_id)


@pytest.mark.fresh_pg_schema
def test_upgrade_fills_dedup_keys_from_the_notifications_of_the_window(db_url: str) -> None:
    """A database made before ``dedup_keys``: the first process to open it fills the table with each
    dedup key used within the window, held by its first notification; older keys and notifications
    without one add nothing."""
    legacy = make_engine(db_url)
    SQLModel.metadata.create_all(legacy)
    now = utcnow()

    def row(nid: str, key: str | None, age: float) -> dict[str, object]:
        at = now - timedelta(seconds=age)
        return {"id": nid, "recipient_id": "u1", "type": "t", "template_id": "t", "category": "marketing",
                "priority": "low", "channels": ["email"], "data": {}, "dedup_key": key, "campaign_id": None,
                "status": "done", "due_at": at, "created_at": at, "updated_at": at}  # fmt: skip

    with legacy.begin() as conn:
        conn.exec_driver_sql("DROP TABLE dedup_keys")
        conn.execute(
            insert(Notification.__table__),  # type: ignore[attr-defined]
            [row("n_a", "k1", 10), row("n_b", "k1", 5), row("n_c", "k2", 7200), row("n_d", None, 1)],
        )
    legacy.dispose()
    dispose_all()
    try:
        engine = engine_for(Settings(database_url=db_url, dedup_ttl=3600))
        with engine.connect() as conn:
            held = conn.execute(select(DedupKey.key, DedupKey.notification_id)).all()  # type: ignore[call-overload]
        assert [tuple(r) for r in held] == [("k1", "n_a")]
    finally:
        dispose_all()


def test_a_request_never_holds_two_pooled_connections(any_db_ctx: Context) -> None:
    """Intake reads on one connection and, for a request with a dedup or ordering key, writes through
    a Session: the reads' connection must be back in the pool before the Session takes one. A request
    holding one while waiting for a second would, with every pooled connection held that way by
    concurrent requests (PostgreSQL: 15), wait for the pool's timeout and fail."""
    ctx = any_db_ctx
    seed(ctx)
    held: list[int] = [0, 0]  # now, most at once

    def checkout(*_: Any) -> None:
        held[0] += 1
        held[1] = max(held[1], held[0])

    def checkin(*_: Any) -> None:
        held[0] -= 1

    event.listen(ctx.engine, "checkout", checkout)
    event.listen(ctx.engine, "checkin", checkin)
    try:
        for payload in ({}, {"dedup_key": "two-conns"}, {"dedup_key": "two-conns"}, {"ordering_key": "o-1"}):
            held[:] = [0, 0]
            res = send(ctx, data=ORDER, **payload)
            assert res.status in ("queued", "suppressed")
            assert held == [0, 1], (payload, held)
    finally:
        event.remove(ctx.engine, "checkout", checkout)
        event.remove(ctx.engine, "checkin", checkin)
