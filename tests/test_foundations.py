"""Settings, the embedded Redis, templates and the rate limiter on their own."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from notifyctl import keys
from notifyctl.errors import TemplateError
from notifyctl.redisconn import ensure_server, stop_server
from notifyctl.settings import RateRule, Settings, load_settings
from notifyctl.template_store import TemplateStore
from notifyctl.templates import parse_template
from tests.conftest import run_cli
from worker.ratelimit import Check, RateLimiter

# --- settings -----------------------------------------------------------------------------


def test_settings_from_config_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.toml").write_text('dedup_ttl = 60\nrate_limits = ["sms:*:2/1h"]\nbatch_size = 7\n')
    monkeypatch.setenv("NOTIFY_HOME", str(tmp_path))
    monkeypatch.setenv("NOTIFY_BATCH_SIZE", "9")
    s = Settings()
    assert s.dedup_ttl == 60 and s.batch_size == 9  # env beats the file
    assert s.rules == [RateRule(channel="sms", category="*", limit=2, window=3600)]


def test_rate_rule_parsing() -> None:
    assert RateRule.parse("email:marketing:1/1d").window == 86400
    assert RateRule.parse("push:*:3/h").window == 3600
    with pytest.raises(ValueError, match="bad rate limit rule"):
        RateRule.parse("fax:*:1/1d")


# --- embedded redis -------------------------------------------------------------------------


def test_embedded_redis_is_shared_persistent_and_reused(tmp_path: Path) -> None:
    home = tmp_path / "h"
    env = {"NOTIFY_REDIS_URL": ""}
    s = load_settings(home=home)
    try:
        r1 = run_cli(s, "redis", "url", **env)
        assert r1.returncode == 0, r1.stderr
        assert r1.stdout.strip() == f"unix://{home / 'redis' / 'redis.sock'}"
        pid = (home / "redis" / "redis.pid").read_text()
        # a second process reuses the same server
        r2 = run_cli(s, "status", "--json", **env)
        assert r2.returncode == 0, r2.stderr
        assert (home / "redis" / "redis.pid").read_text() == pid
        client = redis.Redis(unix_socket_path=str(home / "redis" / "redis.sock"))
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.set("k", "v")
        client.close()
        # stopped and started again: the data is still there
        assert run_cli(s, "redis", "stop", **env).stdout.strip() == "stopped"
        try:  # "stopped" means gone: exited (a zombie until init reaps it) when the command returns
            assert psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            pass
        url = ensure_server(home / "redis")
        client = redis.Redis.from_url(url)
        assert client.get("k") == b"v"
        client.close()
    finally:
        stop_server(home / "redis")


def test_a_dead_servers_socket_is_asked_once_not_retried(tmp_path: Path) -> None:
    """``ensure_server``'s ping and ``stop_server``'s SHUTDOWN connect once: redis-py's default
    retries (with backoff) would spend seconds on a socket whose server dropped the connection.
    Here a socket that accepts and closes at once counts the connections each call makes."""
    d = tmp_path / "redis"
    d.mkdir(mode=0o700)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(d / "redis.sock"))
    srv.listen(16)
    accepted: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            accepted.append(1)
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        assert stop_server(d) is False  # no answer to PING: nothing to stop
        assert len(accepted) == 1, accepted
        # no server to reuse (asked twice: before its lock and under it): a new one is started
        url = ensure_server(d)
        assert len(accepted) == 3, accepted
        client = redis.Redis.from_url(url)
        assert client.ping()
        client.close()
    finally:
        stop.set()
        t.join(5)
        srv.close()
        stop_server(d)


# --- templates ------------------------------------------------------------------------------


def test_missing_variable_is_an_error_never_empty() -> None:
    t = TemplateStore([Path(__file__).parent.parent / "notifyctl" / "templates"]).get("order_shipped_v2")
    with pytest.raises(TemplateError, match="data is missing variable 'tracking_url'"):
        t.render("sms", {"order_id": "1"})
    with pytest.raises(TemplateError, match="has no fax part|has no"):
        t.render("fax", {})


def test_templates_are_sandboxed(tmp_path: Path) -> None:
    p = tmp_path / "evil.toml"
    p.write_text('category = "alerts"\n[sms]\ntext = "{{ x.__class__.__mro__ }}"\n')
    t = parse_template(p)
    with pytest.raises(TemplateError, match="unsafe|cannot render|missing"):
        t.render("sms", {"x": 1})


@pytest.mark.parametrize(
    "body,message",
    [
        ('category = "spam"\n[sms]\ntext = "x"\n', "category must be one of"),
        ('category = "alerts"\n', "no channel part"),
        ('category = "alerts"\n[email]\nsubject = "s"\n', "[email] needs html, text"),
        ("category = ", "not valid TOML"),
        ('category = "alerts"\npriority = "asap"\n[sms]\ntext = "x"\n', "priority must be one of"),
    ],
)
def test_bad_template_files(tmp_path: Path, body: str, message: str) -> None:
    p = tmp_path / "t.toml"
    p.write_text(body)
    with pytest.raises(TemplateError) as exc:
        parse_template(p)
    assert message in str(exc.value)


def test_user_templates_override_shipped(tmp_path: Path) -> None:
    (tmp_path / "otp_code.toml").write_text(
        'category = "transactional"\npriority = "high"\n[sms]\ntext = "code {{ code }}"\n'
    )
    store = TemplateStore([tmp_path, Path(__file__).parent.parent / "notifyctl" / "templates"])
    assert store.get("otp_code").render("sms", {"code": "7"}) == {"text": "code 7"}
    assert "weekly_promo" in store.ids()


# --- rate limiter window edges ----------------------------------------------------------------


def test_sliding_window_edges(rclient: redis.Redis) -> None:
    rl = RateLimiter(rclient, [RateRule.parse("push:*:3/1h")])
    t0 = 1_000_000_000
    checks = [Check("u", "push", "transactional", f"n{i}:push") for i in range(4)]
    assert [rl.check_many([c], t0 + i * 1000)[0] for i, c in enumerate(checks[:3])] == [True, True, True]
    assert rl.check_many([checks[3]], t0 + 3_599_999) == [False]  # 1 ms before the first leaves the window
    assert rl.check_many([checks[3]], t0 + 3_600_000) == [True]  # the first has left it
    assert rl.check_many([Check("u", "push", "transactional", "n5:push")], t0 + 3_600_001) == [False]
    # other users and channels are not affected
    assert rl.check_many([Check("v", "push", "marketing", "x:push"), Check("u", "email", "transactional", "y")],
                         t0 + 3_600_001) == [True, True]  # fmt: skip


def test_expired_members_kept_under_the_limit_still_make_room_at_it(rclient: redis.Redis) -> None:
    # a window under its limit is not trimmed (no ZREMRANGEBYSCORE): its expired members stay until
    # the set reaches the limit, and then the trim must count only those still in the window
    rl = RateLimiter(rclient, [RateRule.parse("push:*:2/1h")])
    key = keys.rate("u", "push:*:3600")
    t0 = 1_000_000_000
    assert rl.check_many([Check("u", "push", "promo", "a:push")], t0) == [True]
    assert rl.check_many([Check("u", "push", "promo", "b:push")], t0 + 3_600_000) == [True]  # a has left the hour
    assert rclient.zcard(key) == 2  # a kept: the set was under its limit
    # at its limit (2 members), the oldest just aged out: trimmed, room for one, not two
    c, d = Check("u", "push", "promo", "c:push"), Check("u", "push", "promo", "d:push")
    assert rl.check_many([c, d], t0 + 3_600_001) == [True, False]
    assert rclient.zrange(key, 0, -1) == [b"b:push", b"c:push"]
    assert rl.check_many([c, d], t0 + 3_600_002) == [True, False]  # a rerun: c found, d still refused
    # a second rule whose set at its limit holds only expired members: room again, nothing lost
    rl2 = RateLimiter(rclient, [RateRule.parse("sms:marketing:5/1d"), RateRule.parse("sms:*:1/1h")])
    assert rl2.check_many([Check("v", "sms", "promo", "s1")], t0) == [True]
    assert rl2.check_many([Check("v", "sms", "marketing", "s2")], t0 + 3_599_999) == [False]
    assert rl2.check_many([Check("v", "sms", "marketing", "s2")], t0 + 3_600_000) == [True]
    assert rclient.zcard(keys.rate("v", "sms:*:3600")) == 1  # s1 trimmed, s2 counted


def test_one_batch_of_checks_with_several_rule_plans_answers_each_in_order(rclient: redis.Redis) -> None:
    # one call, checks of three plans interleaved (push: one rule; sms marketing: two; email
    # transactional: none), a high-priority one among them: the same answers as one call per check
    rules = [RateRule.parse(r) for r in ("push:*:1/1h", "sms:*:2/1d", "sms:marketing:1/1h")]
    rl = RateLimiter(rclient, rules, bypass_high=True)
    t0 = 1_000_000_000
    batch = [
        Check("a", "push", "marketing", "n1:push"),
        Check("a", "sms", "marketing", "n1:sms"),
        Check("a", "push", "transactional", "n2:push"),  # a's push window is full: refused
        Check("b", "push", "marketing", "n3:push"),
        Check("a", "sms", "marketing", "n2:sms"),  # a's hourly marketing SMS window is full
        Check("a", "email", "transactional", "n1:email"),  # no rule: passes
        Check("a", "push", "transactional", "n4:push", high=True),  # full, but high: passes, counted
        Check("b", "sms", "transactional", "n5:sms"),
        Check("b", "sms", "transactional", "n6:sms"),
        Check("b", "sms", "transactional", "n7:sms"),  # b's daily SMS window (2) is full
    ]
    assert rl.check_many(batch, t0) == [True, True, False, True, False, True, True, True, True, False]
    assert rclient.zcard(keys.rate("a", rules[0].key)) == 2  # n1 and the high n4
    assert rclient.zcard(keys.rate("b", rules[1].key)) == 2
    # the same batch again (a rerun after a crash): what was admitted is found admitted
    assert rl.check_many(batch, t0 + 1000) == [True, True, False, True, False, True, True, True, True, False]
    assert rclient.zcard(keys.rate("a", rules[0].key)) == 2


def test_rate_check_is_idempotent_per_notification(rclient: redis.Redis) -> None:
    rl = RateLimiter(rclient, [RateRule.parse("sms:*:1/1d")])
    c = Check("u", "sms", "marketing", "n1:sms")
    assert rl.check_many([c], 1000) == [True]
    assert rl.check_many([c], 2000) == [True]  # the same notification re-checked after a crash
    assert rl.check_many([Check("u", "sms", "marketing", "n2:sms")], 3000) == [False]


def test_rate_rules_combine_and_high_bypasses(rclient: redis.Redis) -> None:
    rl = RateLimiter(rclient, [RateRule.parse("email:*:2/1h"), RateRule.parse("email:marketing:1/1d")])
    m = [Check("u", "email", "marketing", f"m{i}") for i in range(2)]
    assert rl.check_many(m, 1000) == [True, False]
    assert rl.check_many([Check("u", "email", "transactional", "t1")], 1000) == [True]
    assert rl.check_many([Check("u", "email", "transactional", "t2")], 1000) == [False]  # 2/h used
    assert rl.check_many([Check("u", "email", "transactional", "otp", high=True)], 1000) == [True]
    assert rclient.zcard("notif:rate:u:email:*:3600") == 3  # the bypass was still counted
    # the first rule's window empty, a later one's full: still refused (the empty-window shortcut
    # skips only the first rule's expiry and membership test)
    rl = RateLimiter(rclient, [RateRule.parse("email:marketing:1/1d"), RateRule.parse("email:*:1/1h")])
    assert rl.check_many([Check("w", "email", "transactional", "t1")], 1000) == [True]
    assert rl.check_many([Check("w", "email", "marketing", "m1")], 2000) == [False]
    assert rl.check_many([Check("w", "email", "marketing", "m1")], 1000 + 3_600_000) == [True]  # t1 left the hour
    assert rl.check_many([Check("w", "email", "marketing", "m1")], 1000 + 3_600_001) == [True]  # a rerun: the same
    assert rclient.zcard("notif:rate:w:email:marketing:86400") == 1


def test_urgent_sqlite_writer_is_not_starved_by_a_stream_of_bulk_writes(tmp_path: Path) -> None:
    """OTPs ahead of marketing at the SQLite writer lock: while a bulk writer takes the lock again
    the moment it lets go (a worker or reconciler writing batch after batch), an urgent writer
    still gets in within a few writes, and the gate never deadlocks the two. (Linux flock alone
    already wakes waiters fairly here; the gate bounds the wait when it does not.)"""
    import threading
    import time

    from notifyctl.db import make_engine, write_lock

    engine = make_engine(f"sqlite:///{tmp_path / 'lock.db'}")
    order: list[str] = []
    started = threading.Event()
    otp_done = threading.Event()

    def bulk() -> None:
        # a stream that goes on until the urgent writer got in (5,000 writes at most)
        for i in range(5000):
            if otp_done.is_set():
                return
            with write_lock(engine):
                started.set()
                order.append(f"bulk{i}")
                time.sleep(0.005)

    def otp() -> None:
        with write_lock(engine, urgent=True):
            order.append("otp")
        otp_done.set()

    b = threading.Thread(target=bulk)
    b.start()
    assert started.wait(60)
    time.sleep(0.05)
    asked_after = len(order)
    o = threading.Thread(target=otp)
    o.start()
    o.join(120)
    b.join(120)
    # counted in the bulk writes that went first once it asked, not in seconds
    assert "otp" in order and order.index("otp") - asked_after < 50, (order.index("otp"), asked_after)
    engine.dispose()


def _flock_waiters(path: str) -> int:
    """Processes' and threads' flock requests blocked on ``path`` (``/proc/locks``: ``->`` lines)."""
    ino = f":{os.stat(path).st_ino} "
    with open("/proc/locks") as f:
        return sum(1 for line in f if "->" in line and "FLOCK" in line and ino in line)


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="reads the kernel's table of waiting locks (Linux)")
def test_urgent_sqlite_writer_goes_before_the_bulk_writes_already_queued(tmp_path: Path) -> None:
    """An OTP's write waits for the write under way, not for the bulk writes queued at the lock
    before it came (a pool's other workers, a push batch each): the first bulk writer to get the
    lock after it gives it back."""
    from notifyctl.db import make_engine, write_lock
    from tests.util import wait_for

    engine = make_engine(f"sqlite:///{tmp_path / 'lock.db'}")
    lock_file = str(tmp_path / "lock.db") + ".writelock"
    order: list[str] = []
    holding, release = threading.Event(), threading.Event()

    def holder() -> None:
        with write_lock(engine):
            holding.set()
            release.wait(60)
            order.append("holder")

    def bulk(i: int) -> None:
        with write_lock(engine):
            order.append(f"bulk{i}")

    def otp() -> None:
        with write_lock(engine, urgent=True):
            order.append("otp")

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    assert holding.wait(60)
    for i in range(3):  # three bulk writers queued at the lock (each thread has its own lock files)
        threads.append(threading.Thread(target=bulk, args=(i,)))
        threads[-1].start()
    assert wait_for(lambda: _flock_waiters(lock_file) == 3, 30), _flock_waiters(lock_file)
    threads.append(threading.Thread(target=otp))
    threads[-1].start()
    assert wait_for(lambda: _flock_waiters(lock_file) == 4, 30), _flock_waiters(lock_file)
    release.set()
    for t in threads:
        t.join(60)
    assert order[:2] == ["holder", "otp"], order
    assert sorted(order[2:]) == ["bulk0", "bulk1", "bulk2"]
    engine.dispose()


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="reads the kernel's table of waiting locks (Linux)")
def test_a_write_lock_nested_in_the_same_thread_keeps_the_outer_one(tmp_path: Path) -> None:
    """A write inside this thread's own write (nested ``write_lock``) neither waits for itself nor,
    on its way out, lets go of the lock the outer write still holds."""
    from notifyctl.db import make_engine, write_lock
    from tests.util import wait_for

    engine = make_engine(f"sqlite:///{tmp_path / 'lock.db'}")
    lock_file = str(tmp_path / "lock.db") + ".writelock"
    got: list[str] = []

    def other() -> None:
        with write_lock(engine):
            got.append("other")

    with write_lock(engine):
        with write_lock(engine, urgent=True):
            pass
        t = threading.Thread(target=other)
        t.start()
        assert wait_for(lambda: _flock_waiters(lock_file) == 1, 30)  # still ours: the other thread waits
        assert got == []
    t.join(60)
    assert got == ["other"]
    engine.dispose()


def test_prepared_insert_stores_what_core_would_and_skips_conflicts(tmp_path: Path) -> None:
    """``prepare_insert`` converts values itself on SQLite: the rows must read back exactly as the
    ones Core inserts (datetimes compare in SQL, JSON and booleans round-trip)."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import insert, select
    from sqlmodel import SQLModel

    from notifyctl.bulk import prepare_insert
    from notifyctl.db import make_engine
    from notifyctl.models import Notification

    engine = make_engine(f"sqlite:///{tmp_path / 'p.db'}")
    SQLModel.metadata.create_all(engine)
    t = Notification.__table__  # type: ignore[attr-defined]
    now = datetime(2026, 3, 29, 1, 30, 15, 123456, tzinfo=UTC)
    data = {"code": "X", "n": [1, 2], "ü": "é"}

    def row(i: int, campaign: str) -> dict[str, object]:
        return {"id": f"n{i}", "recipient_id": f"u{i}", "type": "t", "template_id": "t", "category": "marketing",
                "priority": "low", "channels": ["email"], "data": data, "dedup_key": None, "campaign_id": campaign,
                "status": "scheduled", "due_at": now + timedelta(seconds=i), "created_at": now, "updated_at": now}  # fmt: skip

    with engine.begin() as conn:
        conn.execute(insert(t), [row(0, "core"), row(1, "core")])
        prepare_insert(engine, t, [row(10, "fast"), row(11, "fast")], ["campaign_id", "recipient_id"])(conn)
        # the same (campaign, recipient) again: skipped, not an error
        dup = {**row(12, "fast"), "recipient_id": "u10"}
        prepare_insert(engine, t, [dup, row(13, "fast")], ["campaign_id", "recipient_id"])(conn)
    with engine.connect() as conn:
        got = {r.id: r for r in conn.execute(select(t))}
        raw = dict(conn.exec_driver_sql("SELECT id, due_at FROM notifications").all())
        later = conn.execute(select(t.c.id).where(t.c.due_at > now + timedelta(seconds=10))).scalars().all()
    assert sorted(got) == ["n0", "n1", "n10", "n11", "n13"]
    for a, b in (("n0", "n10"), ("n1", "n11")):
        ra, rb = got[a], got[b]
        assert (ra.channels, ra.data, ra.created_at, ra.status) == (rb.channels, rb.data, rb.created_at, rb.status)
    assert got["n10"].due_at == now + timedelta(seconds=10)
    assert (raw["n0"], raw["n10"]) == ("2026-03-29 01:30:15.123456", "2026-03-29 01:30:25.123456")  # one format
    assert sorted(later) == ["n11", "n13"]  # datetimes compare in SQL
    engine.dispose()


def test_copy_insert_stores_what_core_would(pg_url: str) -> None:
    """PostgreSQL: ``prepare_insert`` writes by COPY, its text made a column at a time; every value
    must read back as Core's own insert stores it: the four characters COPY escapes (in plain and
    JSON columns), NULLs beside them, a text that looks like COPY's NULL marker, str enums,
    booleans, integers, datetimes and JSON shared by several rows."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import insert, select
    from sqlmodel import SQLModel

    from notifyctl.bulk import prepare_insert
    from notifyctl.db import make_engine
    from notifyctl.models import Delivery, DeliveryStatus

    engine = make_engine(pg_url)
    SQLModel.metadata.create_all(engine)
    t = Delivery.__table__  # type: ignore[attr-defined]
    now = datetime(2026, 3, 29, 1, 30, 15, 123456, tzinfo=UTC)
    odd = ["plain", "tab\there", "back\\slash", "new\nline", "cr\rreturn", "\\N", "", "ü é"]

    def row(i: int, prefix: str) -> dict[str, object]:
        return {"id": f"{prefix}{i}", "notification_id": f"{prefix}n{i}", "user_id": odd[i % len(odd)], "channel": "email",
                "route": "email", "address": f"{odd[(i + 3) % len(odd)]}@x", "status": DeliveryStatus.sent,
                "reason": None if i % 2 else odd[i % len(odd)], "attempts": i, "dead_lettered": i % 3 == 0,
                "queued_at": now, "updated_at": now + timedelta(seconds=i), "provider": None,
                "provider_message_id": odd[i % len(odd)] if i % 3 else None, "next_attempt_at": None,
                "sent_at": now if i % 2 else None, "suppressed_at": None, "failed_at": None}  # fmt: skip

    k = 2 * len(odd)
    with engine.begin() as conn:
        conn.execute(insert(t), [row(i, "core") for i in range(k)])
        prepare_insert(engine, t, [row(i, "copy") for i in range(k)])(conn)
    with engine.connect() as conn:
        got = {r.id: r._asdict() for r in conn.execute(select(t))}
    assert len(got) == 2 * k
    for i in range(k):
        a, b = got.pop(f"core{i}"), got.pop(f"copy{i}")
        for r in (a, b):
            r.pop("id"), r.pop("notification_id")
        assert a == b, i
        assert a["user_id"] == odd[i % len(odd)] and a["status"] == "sent"
    engine.dispose()


@pytest.mark.fresh_pg_schema
def test_upgrade_moves_dedup_keys_to_the_partial_index(db_url: str) -> None:
    """A database made with the full ``ix_notifications_dedup_key``: the first process to open it
    drops it (``RETIRED_INDEXES``) and builds ``ix_notifications_dedup_direct``, which holds intake's
    keys only (a campaign's rows are found by their unique index); lookups by key still answer."""
    from sqlalchemy import insert
    from sqlmodel import Session, SQLModel

    from notifyctl.db import _existing_indexes, add_missing_columns, make_engine
    from notifyctl.models import Notification, utcnow
    from notifyctl.tracking import find_notification

    legacy = make_engine(db_url)
    SQLModel.metadata.create_all(legacy)
    now = utcnow()

    def row(nid: str, key: str | None, campaign: str | None) -> dict[str, object]:
        return {"id": nid, "recipient_id": "u1", "type": "t", "template_id": "t", "category": "marketing",
                "priority": "low", "channels": ["email"], "data": {}, "dedup_key": key, "campaign_id": campaign,
                "status": "done", "due_at": now, "created_at": now, "updated_at": now}  # fmt: skip

    with legacy.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_notifications_dedup_direct")
        conn.exec_driver_sql("CREATE INDEX ix_notifications_dedup_key ON notifications (dedup_key)")
        conn.execute(
            insert(Notification.__table__),  # type: ignore[attr-defined]
            [row("n_a", "order:1", None), row("n_b", "campaign:c_1:u1", "c_1"), row("n_c", None, None)],
        )
    legacy.dispose()
    engine = make_engine(db_url)
    try:
        add_missing_columns(engine)
        with engine.connect() as conn:
            indexes = _existing_indexes(conn)
            assert "ix_notifications_dedup_key" not in indexes and "ix_notifications_dedup_direct" in indexes
            if engine.dialect.name == "sqlite":  # what the index holds: the direct key alone
                held = conn.exec_driver_sql(
                    "SELECT id FROM notifications INDEXED BY ix_notifications_dedup_direct "
                    "WHERE dedup_key IS NOT NULL AND campaign_id IS NULL"
                ).all()
                assert [r[0] for r in held] == ["n_a"]
        with Session(engine) as session:
            assert find_notification(session, "order:1").id == "n_a"
            assert find_notification(session, "campaign:c_1:u1").id == "n_b"
    finally:
        engine.dispose()


@pytest.mark.fresh_pg_schema
def test_upgrade_retires_the_recipient_index_and_user_lookups_read_the_unique_one(db_url: str) -> None:
    """A database made with the plain ``ix_notifications_recipient_id``: the first process to open it
    drops it (``RETIRED_INDEXES``); a user's latest notifications (the console's lookup) are still all
    found, campaign rows and direct ones, newest first, both queries reading the unique
    (campaign_id, recipient_id) index."""
    from datetime import timedelta

    from sqlalchemy import insert
    from sqlmodel import Session, SQLModel

    from notifyctl.db import _existing_indexes, add_missing_columns, make_engine
    from notifyctl.models import Campaign, Notification, utcnow
    from notifyctl.tracking import latest_of_user

    legacy = make_engine(db_url)
    SQLModel.metadata.create_all(legacy)
    now = utcnow()

    def row(nid: str, user: str, campaign: str | None, minutes: int) -> dict[str, object]:
        at = now + timedelta(minutes=minutes)
        return {"id": nid, "recipient_id": user, "type": "t", "template_id": "t", "category": "marketing",
                "priority": "low", "channels": ["email"], "data": {}, "dedup_key": None, "campaign_id": campaign,
                "status": "done", "due_at": at, "created_at": at, "updated_at": at}  # fmt: skip

    with legacy.begin() as conn:
        conn.exec_driver_sql("CREATE INDEX ix_notifications_recipient_id ON notifications (recipient_id)")
        for cid in ("c_1", "c_2"):
            conn.execute(
                insert(Campaign.__table__),  # type: ignore[attr-defined]
                [{"id": cid, "name": cid, "template_id": "t", "category": "marketing", "priority": "low",
                  "channels": ["email"], "spec": {}, "plan": [], "summary": {}, "reference_at": now,
                  "created_at": now, "updated_at": now}],
            )  # fmt: skip
        conn.execute(
            insert(Notification.__table__),  # type: ignore[attr-defined]
            [row("n_a", "u1", None, 1), row("n_b", "u1", "c_1", 3), row("n_c", "u2", None, 2),
             row("n_d", "u1", "c_2", 2), row("n_e", "u2", "c_1", 4), row("n_f", "u1", None, 5)],
        )  # fmt: skip
    legacy.dispose()
    engine = make_engine(db_url)
    try:
        add_missing_columns(engine)
        with engine.connect() as conn:
            indexes = _existing_indexes(conn)
            assert "ix_notifications_recipient_id" not in indexes and "uq_notifications_campaign_recipient" in indexes
        with Session(engine) as session:
            assert latest_of_user(session, "u1", 20) == ["n_f", "n_b", "n_d", "n_a"]
            assert latest_of_user(session, "u1", 2) == ["n_f", "n_b"]
            assert latest_of_user(session, "u2", 20) == ["n_e", "n_c"]
            assert latest_of_user(session, "nobody", 20) == []
        plans: list[tuple[str, Any]] = []

        def explain(_conn: object, _cursor: object, statement: str, parameters: Any, *_a: object) -> None:
            if statement.startswith("SELECT notifications.id"):
                plans.append((statement, parameters))

        from sqlalchemy import event

        event.listen(engine, "before_cursor_execute", explain)
        with Session(engine) as session:
            latest_of_user(session, "u1", 20)
        event.remove(engine, "before_cursor_execute", explain)
        assert len(plans) == 2
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql("SET enable_seqscan = off")
            for sql, params in plans:
                prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
                plan = str(conn.exec_driver_sql(prefix + sql, params).all())
                assert "uq_notifications_campaign_recipient" in plan, plan
    finally:
        engine.dispose()


@pytest.mark.fresh_pg_schema
def test_upgrade_leaves_room_on_the_notifications_pages_for_their_done_version(db_url: str) -> None:
    """PostgreSQL: the notifications' heap and their two unique indexes are filled half by inserts
    (``models.PG_FILLFACTOR``). A database made before gets the fillfactors on the upgrade, once; an
    operator's own fillfactor stays. Then each row of a launcher's COPY, marked done by the
    worker's UPDATE, has its new version on its own page. SQLite: the upgrade leaves the schema as
    it was."""
    from sqlmodel import Session, SQLModel

    from campaigns.produce import _NT, _insert_new
    from notifyctl.bulk import update_where_in
    from notifyctl.db import add_missing_columns, make_engine
    from notifyctl.models import PG_FILLFACTOR, utcnow

    legacy = make_engine(db_url)
    SQLModel.metadata.create_all(legacy)  # as an earlier release made it: no storage parameters
    pg = legacy.dialect.name == "postgresql"
    shape = "SELECT name, sql FROM sqlite_master ORDER BY name"
    with legacy.begin() as conn:
        if pg:  # an operator's own choice for one of them
            conn.exec_driver_sql("ALTER INDEX uq_notifications_campaign_recipient SET (fillfactor = 80)")
            before = None
        else:
            before = conn.exec_driver_sql(shape).all()
    legacy.dispose()
    engine = make_engine(db_url)
    try:
        add_missing_columns(engine)
        add_missing_columns(engine)  # a second start: nothing more to do
        with engine.connect() as conn:
            if not pg:
                assert conn.exec_driver_sql(shape).all() == before
                return
            options = dict(
                conn.exec_driver_sql(
                    "SELECT relname, reloptions FROM pg_class WHERE relnamespace = current_schema()::regnamespace"
                    " AND relname = ANY(%s)",
                    (list(PG_FILLFACTOR),),
                ).all()
            )
        assert options == {
            "notifications": ["fillfactor=50"],
            "notifications_pkey": ["fillfactor=50"],
            "uq_notifications_campaign_recipient": ["fillfactor=80"],
        }
        now = utcnow()
        rows = [{"id": f"n_{i:05d}", "recipient_id": f"u{i:05d}", "data": {"first_name": f"Name{i}", "code": "C" * 40},
                 "dedup_key": f"campaign:c_1:u{i:05d}", "wave": 0, "status": "queued", "job_id": "job_1",
                 "due_at": now} for i in range(400)]  # fmt: skip
        shared = {"type": "t", "template_id": "t", "category": "marketing", "priority": "low",
                  "channels": ["email"], "campaign_id": "c_1", "created_at": now, "updated_at": now}  # fmt: skip
        pages = "SELECT id, (ctid::text::point)[0] FROM notifications ORDER BY id"
        with engine.connect() as conn, Session(bind=conn) as session:
            _insert_new(engine, rows, shared)(session)
            session.commit()
            written = conn.exec_driver_sql(pages).all()
            assert len({page for _id, page in written}) >= 4  # (the rows span several pages)
            ids = [r["id"] for r in rows]
            values = {"status": "done", "reason": None, "updated_at": utcnow()}
            assert update_where_in(session.connection(), _NT, values, "id", ids) == 400  # the worker's done
            session.commit()
            assert conn.exec_driver_sql(pages).all() == written
    finally:
        engine.dispose()


def test_status_indexes_hold_open_rows_and_serve_their_readers(any_db_ctx: Any) -> None:
    """``ix_notifications_status_due`` and ``ix_deliveries_status`` on PostgreSQL hold the open rows
    only (the done UPDATE, a delivery inserted ``sent``, add no entry to them): a database made with
    the full indexes gets the partial ones on the schema upgrade, and every statement the
    reconciler's round runs on a status, and the waves' waiting count, can still read them (their
    plans with sequential scans off name them); the round finds every due retry and scheduled send,
    every lost queued row and the orphan (a retrying delivery of a done notification). SQLite
    keeps the full indexes. The round's every-second look for lost high-priority rows reads their
    own partial index (``ix_notifications_lost_high``) on both databases, not the queued backlog."""
    from datetime import timedelta

    from sqlalchemy import event, insert

    from notifyctl.analytics.waves import waiting
    from notifyctl.db import _pg_partial_indexes, add_missing_columns
    from notifyctl.models import OPEN_NOTIFICATION_STATUSES, Delivery, Notification, NotificationStatus, utcnow
    from worker.reconciler import reconcile

    ctx = any_db_ctx
    pg = ctx.engine.dialect.name == "postgresql"
    assert set(NotificationStatus) - set(OPEN_NOTIFICATION_STATUSES) == {"done", "suppressed", "canceled"}
    with ctx.engine.begin() as conn:  # as an earlier release left it
        conn.exec_driver_sql("DROP INDEX ix_notifications_status_due")
        conn.exec_driver_sql("CREATE INDEX ix_notifications_status_due ON notifications (status, due_at)")
        conn.exec_driver_sql("DROP INDEX ix_deliveries_status")
        conn.exec_driver_sql("CREATE INDEX ix_deliveries_status ON deliveries (status)")
    add_missing_columns(ctx.engine)
    names = ("ix_notifications_status_due", "ix_deliveries_status")
    with ctx.engine.connect() as conn:
        if pg:
            assert [_pg_partial_indexes(conn)[n] for n in names] == [True, True]
        else:
            for n in names:
                sql = conn.exec_driver_sql(f"SELECT sql FROM sqlite_master WHERE name = '{n}'").scalar_one()
                assert "WHERE" not in sql.upper(), sql
    add_missing_columns(ctx.engine)  # once: the second start finds it partial already
    now = utcnow()
    old = now - timedelta(minutes=5)
    rows = []
    for i, status in enumerate(sorted(NotificationStatus) * 3):
        rows.append({"id": f"n_{i:03d}", "recipient_id": f"u{i}", "type": "t", "template_id": "t",
                     "category": "marketing", "priority": "low", "channels": ["email"], "data": {},
                     "dedup_key": None, "campaign_id": "c_1", "wave": 0, "status": status, "job_id": None,
                     "due_at": old, "created_at": old, "updated_at": old})  # fmt: skip
    with ctx.engine.begin() as conn:
        rows.append({**rows[0], "id": "n_otp", "recipient_id": "u_otp", "campaign_id": None, "wave": None,
                     "priority": "high", "status": "queued", "job_id": "job_gone"})  # fmt: skip
        conn.execute(insert(Notification.__table__), rows)  # type: ignore[attr-defined]
        done = next(r["id"] for r in rows if r["status"] == "done")
        conn.execute(
            insert(Delivery.__table__),  # type: ignore[attr-defined]
            [{"id": "d_1", "notification_id": done, "user_id": "u", "channel": "email", "route": "email",
              "address": "a@example.com", "status": "retrying", "attempts": 1, "next_attempt_at": old,
              "dead_lettered": False, "queued_at": old, "updated_at": old}],
        )  # fmt: skip
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "notifications.status" in statement:
            seen.append((statement, params))

    event.listen(ctx.engine, "before_cursor_execute", capture)
    try:
        res = reconcile(ctx, force=True)
    finally:
        event.remove(ctx.engine, "before_cursor_execute", capture)
    # retrying + scheduled; queued, its job lost; the done one with a retrying delivery
    assert (res.retries_queued, res.recovered, res.orphans_woken) == (6, 3 + 1, 1), res
    high = [(st, p) for st, p in seen if "priority = 'high'" in st]
    assert len(high) == 1, seen
    with ctx.engine.connect() as conn:
        assert waiting(conn, "c_1") == {0: {"paused": 3}}  # the scheduled ones were queued just now
        if not pg:
            plan = str(conn.exec_driver_sql("EXPLAIN QUERY PLAN " + high[0][0], high[0][1]).all())
            assert "ix_notifications_lost_high" in plan, plan
        if pg:
            conn.exec_driver_sql("SET enable_seqscan = off")
            mark = "%s"
            readers = list(seen)
            readers.append((f"SELECT wave, status, count(*) FROM notifications WHERE status IN ('scheduled', "
                            f"'paused') AND coalesce(campaign_id, '') = {mark} GROUP BY wave, status", ("c_1",)))  # fmt: skip
            assert len(readers) >= 5, seen  # due, lost (high and all), orphans, the waves' count
            for statement, params in readers:
                plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + statement, params))
                # the orphans' join starts from the open deliveries; the others read the open notifications
                name = "ix_deliveries_status" if " JOIN " in statement.upper() else "ix_notifications_status_due"
                name = "ix_notifications_lost_high" if "priority = 'high'" in statement else name
                assert name in plan, (statement, plan)


def test_update_where_in_counts_what_it_changed(db_url: str) -> None:
    """``update_where_in`` over more keys than one SQLite chunk (900), with an extra condition: the
    rows changed and their count; on PostgreSQL one prepared statement per shape, reused (the
    second call) and kept apart from another shape's (the third)."""
    from sqlalchemy import insert, select
    from sqlmodel import SQLModel

    from notifyctl.bulk import unindexed_in, update_where_in
    from notifyctl.db import make_engine
    from notifyctl.models import Notification, utcnow

    engine = make_engine(db_url)
    SQLModel.metadata.create_all(engine)
    t = Notification.__table__  # type: ignore[attr-defined]
    now = utcnow()
    ids = [f"n_{i:05d}" for i in range(2000)]
    rows = [{"id": nid, "recipient_id": "u", "type": "t", "template_id": "t", "category": "c", "priority": "low",
             "channels": [], "data": {}, "dedup_key": None, "campaign_id": None,
             "status": "queued" if i % 4 else "scheduled", "due_at": now, "created_at": now, "updated_at": now}
            for i, nid in enumerate(ids)]  # fmt: skip
    queued = "AND " + unindexed_in("status", ["queued"])
    try:
        with engine.begin() as conn:
            conn.execute(insert(t), rows)
        with engine.begin() as conn:
            assert update_where_in(conn, t, {"status": "done", "reason": None}, "id", ids[:1500], queued) == 1125
            assert update_where_in(conn, t, {"status": "done", "reason": None}, "id", ids[1500:], queued) == 375
            assert update_where_in(conn, t, {"job_id": "j", "updated_at": now}, "id", ids[:10]) == 10
            assert update_where_in(conn, t, {"status": "done"}, "id", []) == 0
        with engine.connect() as conn:
            got = dict(conn.execute(select(t.c.id, t.c.status)).tuples().all())
            jobs = conn.execute(select(t.c.id).where(t.c.job_id == "j")).scalars().all()
        assert [nid for nid in ids if got[nid] != "done"] == ids[::4]
        assert sorted(jobs) == ids[:10]
    finally:
        engine.dispose()


def test_ids_are_time_ordered_crockford_base32() -> None:
    """Notification ids sort by creation time (the SQL primary key grows at its end) and carry
    50 random bits; the time part is the millisecond clock in Crockford base32."""
    import re
    import time

    from notifyctl.ids import _B32, new_id

    before = int(time.time() * 1000)
    first = new_id("n")
    time.sleep(0.003)
    ids = [new_id("n") for _ in range(2000)]
    after = int(time.time() * 1000)
    assert all(re.fullmatch(r"n_[0-9a-hjkmnp-tv-z]{20}", i) for i in [first, *ids])
    assert first < min(ids) and len(set(ids)) == len(ids)
    ms = 0
    for ch in first[2:12]:
        ms = ms * 32 + _B32.index(ch)
    assert before <= ms <= after
    assert len({i[12:] for i in ids}) == len(ids)  # the random part differs even within one millisecond


def test_delivery_ids_are_deterministic_and_sort_with_their_notification() -> None:
    """A delivery id is a function of (notification, channel, address) — a rerun after a crash finds
    the same send record — and sorts in its notification's order, so a batch's new rows append to
    the primary key's index; it fits the 32-character column; other notification ids are hashed."""
    import re

    from notifyctl.models import new_id
    from worker.pipeline import delivery_id

    nids = sorted(new_id("n") for _ in range(500))
    addrs = [("email", "a@example.com"), ("email", "b@example.com"), ("sms", "+15551230000"), ("push", "tok")]
    ids = [[delivery_id(n, c, a) for c, a in addrs] for n in nids]
    flat = [i for row in ids for i in row]
    assert len(set(flat)) == len(flat)
    assert all(re.fullmatch(r"d_[0-9a-hjkmnp-tv-z]{28}", i) for i in flat)
    assert [row[0] for row in ids] == sorted(row[0] for row in ids)  # the notifications' order
    assert all(i[2:22] == n[2:] for n, row in zip(nids, ids, strict=True) for i in row)
    assert ids[0] == [delivery_id(nids[0], c, a) for c, a in addrs]  # the same inputs, the same id
    assert delivery_id(nids[0], "email", "a@example.com") != delivery_id(nids[0], "email", "a@example.co")
    foreign = {delivery_id(n, "email", "x@example.com") for n in ("n1", "n2", "order-77")}
    assert len(foreign) == 3 and all(re.fullmatch(r"d_[0-9a-f]{28}", i) for i in foreign)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_prepared_insert_of_shared_columns_stores_what_whole_rows_store(
    dialect: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``prepare_counted_insert(shared=...)``: columns given once for every row store what the same
    values in each row store (SQLite's parameters and literals, PostgreSQL's COPY, and again through
    its ``ON CONFLICT`` staging table), NULLs, JSON and datetimes included."""
    from datetime import UTC, datetime

    from sqlalchemy import select
    from sqlmodel import SQLModel

    from notifyctl.bulk import prepare_counted_insert
    from notifyctl.db import make_engine
    from notifyctl.models import Notification

    url = f"sqlite:///{tmp_path / 's.db'}" if dialect == "sqlite" else request.getfixturevalue("pg_url")
    engine = make_engine(url)
    SQLModel.metadata.create_all(engine)
    t = Notification.__table__  # type: ignore[attr-defined]
    now = datetime(2026, 3, 29, 1, 30, 15, 123456, tzinfo=UTC)
    shared = {"type": "t'x", "template_id": "t", "category": "marketing", "priority": "low",
              "channels": ["email", "sms"], "campaign_id": None, "created_at": now, "updated_at": now}  # fmt: skip

    def own(i: int, tag: str) -> dict[str, object]:
        return {"id": f"{tag}{i}", "recipient_id": f"{tag}u{i}", "data": {"i": i, "é": "\t"}, "dedup_key": None,
                "status": "scheduled", "due_at": now}  # fmt: skip

    try:
        with engine.begin() as conn:
            assert prepare_counted_insert(engine, t, [{**own(i, "w"), **shared} for i in range(3)])(conn) == 3
            assert prepare_counted_insert(engine, t, [own(i, "s") for i in range(3)], shared=shared)(conn) == 3
            again = prepare_counted_insert(engine, t, [own(i, "k") for i in range(3)], ["campaign_id", "recipient_id"],
                                           shared=shared)  # fmt: skip
            assert again(conn) == 3
        with engine.connect() as conn:
            got = {r.id: r._asdict() for r in conn.execute(select(t))}
        for i in range(3):
            rows = [got[f"{tag}{i}"] for tag in "wsk"]
            for r in rows:
                r.pop("id"), r.pop("recipient_id")
            assert rows[0] == rows[1] == rows[2], i
            assert (
                rows[0]["channels"] == ["email", "sms"] and rows[0]["type"] == "t'x" and rows[0]["campaign_id"] is None
            )
    finally:
        engine.dispose()
