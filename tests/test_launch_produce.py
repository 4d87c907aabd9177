"""A campaign sent now (issue 15, item 3): the launcher writes each notification already queued, with
its job, so the row is written once by the launcher and once by the worker that finishes it (the
reconciler's `queued` mark, a second write of every row, is gone from that path). A launcher that
dies between its commit and the enqueue leaves missing jobs, found by the reconciler's search for
lost work: nothing lost, nothing sent twice. SQLite and PostgreSQL; real Redis, workers, outbox."""

from __future__ import annotations

import io
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from campaigns.launcher import LaunchSpec, launch
from campaigns.report import campaign_status, current_state
from notifyctl.context import Context
from notifyctl.directory import import_users
from notifyctl.models import Campaign, Delivery, Notification
from worker.pool import run_worker
from worker.providers.outbox import read_outbox
from worker.reconciler import reconcile

N = 2500  # three chunks of the launcher (1,000 rows), three jobs of the worker (batch 1,000)
_EXECUTE = re.compile(r"^\s*EXECUTE\s+(\w+)")
_WRITE = re.compile(r"^\s*(UPDATE|INSERT INTO|COPY)\s+\"?(\w+\.)?notifications\b", re.I)


@contextmanager
def notification_writes() -> Iterator[Counter[str]]:
    """Statements writing the notifications table, by kind, whoever runs them in this process."""
    seen: Counter[str] = Counter()

    def on_exec(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        run = _EXECUTE.match(statement)
        if run:  # a statement prepared on this connection (notifyctl.bulk._pg_prepared): the one it runs
            prepared = {name: sql for sql, name in conn.connection.info.get("notify_prepared", {}).items()}
            statement = prepared[run.group(1)]
        m = _WRITE.match(statement)
        if m:
            seen[m.group(1).upper()] += 1

    event.listen(Engine, "before_cursor_execute", on_exec)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", on_exec)


def _launch_now(ctx: Context, tag: str) -> str:
    rep = import_users(
        ctx, io.StringIO("user_id,email\n" + "".join(f"{tag}{i},{tag}{i}@example.com\n" for i in range(N)))
    )
    assert rep.errors == []
    seg = ctx.settings.home / f"{tag}.csv"
    seg.write_text("user_id,first_name,code\n" + "".join(f"{tag}{i},Name{i},C{i:05d}\n" for i in range(N)))
    spec = LaunchSpec("weekly_promo", channels=["email"], segment_csv=str(seg), rate=1_000_000.0, quiet_hours="off",
                      data={"discount": 20})  # fmt: skip
    return str(launch(ctx, spec)["campaign_id"])


def _sent_once(ctx: Context, cid: str) -> None:
    with Session(ctx.engine) as s:
        sent = Counter(
            uid
            for (uid,) in s.execute(
                select(Delivery.user_id)
                .join(Notification, Notification.id == Delivery.notification_id)
                .where(Notification.campaign_id == cid, Delivery.status == "sent")
            ).all()
        )
        statuses = dict(
            s.execute(
                select(Notification.status, func.count())
                .where(Notification.campaign_id == cid)
                .group_by(Notification.status)
            ).all()
        )
    assert len(sent) == N and set(sent.values()) == {1}
    assert statuses == {"done": N}
    outbox = [r for r in read_outbox(ctx.settings.outbox_dir, "email")]
    per_address = Counter(r.get("address") or r.get("to") for r in outbox)
    assert len(per_address) == N and set(per_address.values()) == {1}
    assert campaign_status(ctx, cid)["state"] == "completed" == _current_state(ctx, cid)


def _current_state(ctx: Context, cid: str) -> str:
    """``report.current_state`` (one open row looked for), to compare with the counts' state."""
    with Session(ctx.engine) as s:
        camp = s.get(Campaign, cid)
        assert camp is not None
        return current_state(s, camp)


def test_a_campaign_sent_now_writes_each_row_once_before_the_worker(any_db_ctx: Context) -> None:
    ctx = any_db_ctx
    with notification_writes() as launcher_writes:
        cid = _launch_now(ctx, "now")
    with Session(ctx.engine) as s:
        rows = s.execute(select(Notification.status, Notification.job_id).where(Notification.campaign_id == cid)).all()
    assert len(rows) == N and {st for st, _ in rows} == {"queued"}
    assert campaign_status(ctx, cid)["state"] == "sending" == _current_state(ctx, cid)
    jobs = Counter(job for _, job in rows)
    assert len(jobs) == 3 and sorted(jobs.values()) == [500, 1000, 1000]
    assert ctx.redis.llen(ctx.queue("low").key) == 3
    assert launcher_writes["UPDATE"] == 0  # inserted queued, never updated by the launch

    row_reads: list[str] = []  # statements that read queued notification rows (not the high-priority look)

    def reads(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        lost_pass = "notifications.status IN" not in statement and "priority = 'high'" not in statement
        if statement.lstrip().startswith("SELECT notifications.id") and lost_pass:
            row_reads.append(statement)

    event.listen(ctx.engine, "before_cursor_execute", reads)
    try:
        with notification_writes() as reconciler_writes:
            res = reconcile(ctx, now=time.time() + ctx.settings.recovery_grace + 5, force=True, limit=100_000)
    finally:
        event.remove(ctx.engine, "before_cursor_execute", reads)
    # nothing due, nothing lost: the jobs wait in their queue; the reconciler writes no row, and
    # reads the backlog's jobs (one row each), never its 2,500 rows
    assert (res.retries_queued, res.recovered) == (0, 0) and res.checked_jobs == 3
    assert sum(reconciler_writes.values()) == 0
    assert row_reads == []

    with notification_writes() as worker_writes:
        run_worker(ctx.settings, ["high", "normal", "low"], burst=True, reconcile=False)
    # each job's batch settled `done` at once (one UPDATE ... IN per 900 ids: SQLite's parameter limit;
    # PostgreSQL: one UPDATE ... = ANY a batch)
    per_job = (lambda k: 1) if ctx.engine.dialect.name == "postgresql" else (lambda k: -(-k // 900))
    assert worker_writes["UPDATE"] == sum(per_job(k) for k in jobs.values())
    _sent_once(ctx, cid)


def test_a_launcher_dead_between_commit_and_enqueue_loses_nothing(any_db_ctx: Context) -> None:
    """The jobs of rows committed `queued` never reached Redis (the launcher killed in between): the
    reconciler finds them missing once the grace has passed, queues them again, each is sent once."""
    ctx = any_db_ctx
    cid = _launch_now(ctx, "cut")
    with Session(ctx.engine) as s:
        job_ids = {j for (j,) in s.execute(select(Notification.job_id).where(Notification.campaign_id == cid)).all()}
    assert len(job_ids) == 3
    ctx.redis.delete(ctx.queue("low").key, *(f"rq:job:{j}" for j in job_ids))  # as if never enqueued

    with Session(ctx.engine) as s:
        first_due = s.execute(select(func.min(Notification.due_at)).where(Notification.campaign_id == cid)).scalar_one()
    first = (first_due if first_due.tzinfo else first_due.replace(tzinfo=UTC)).timestamp()
    # within the grace of the first row due: not looked at yet
    assert reconcile(ctx, now=first + ctx.settings.recovery_grace - 0.5, force=True).recovered == 0
    res = reconcile(ctx, now=time.time() + ctx.settings.recovery_grace + 1, force=True, limit=100_000)
    assert res.recovered == N and res.checked_jobs == 3
    run_worker(ctx.settings, ["high", "normal", "low"], burst=True, reconcile=False)
    again = reconcile(ctx, now=time.time() + ctx.settings.recovery_grace + 1, force=True, limit=100_000)
    assert (again.retries_queued, again.recovered) == (0, 0)
    _sent_once(ctx, cid)


def test_a_chunk_colliding_with_rows_already_written_skips_only_those(any_db_ctx: Context) -> None:
    """A concurrent relaunch wrote some of a chunk's recipients after the chunk was read: the chunk's
    other rows are written, those are skipped (PostgreSQL: the direct COPY fails on the unique
    index, its savepoint is rolled back, and the chunk goes again through ON CONFLICT DO NOTHING)."""
    from campaigns.produce import _insert_new
    from notifyctl.models import new_id, utcnow

    ctx = any_db_ctx
    now = utcnow()

    def rows(users: list[str]) -> list[dict[str, Any]]:
        return [
            {"id": new_id("n"), "recipient_id": u, "type": "weekly_promo", "template_id": "weekly_promo",
             "category": "marketing", "priority": "low", "channels": ["email"], "data": {"discount": 1},
             "dedup_key": f"campaign:c_x:{u}", "campaign_id": "c_x", "status": "scheduled", "job_id": None,
             "due_at": now, "created_at": now, "updated_at": now}
            for u in users
        ]  # fmt: skip

    def write(chunk: list[dict[str, Any]]) -> None:
        with Session(ctx.engine) as s:
            _insert_new(ctx.engine, chunk)(s)
            s.commit()

    first = rows(["a", "b", "c"])
    write(first)
    write(rows(["b", "c", "d", "e"]))
    with Session(ctx.engine) as s:
        got = dict(
            s.execute(select(Notification.recipient_id, Notification.id).where(Notification.campaign_id == "c_x")).all()
        )
    assert sorted(got) == ["a", "b", "c", "d", "e"]
    assert [got[u] for u in "abc"] == [r["id"] for r in first]  # the rows written first are kept


@pytest.mark.fresh_pg_schema
def test_the_campaign_id_index_is_retired_on_upgrade(any_db_ctx: Context) -> None:
    """The notifications' own campaign_id index (redundant: the unique (campaign_id, recipient_id)
    index starts with it) is dropped by the schema upgrade; a campaign's rows are still read by index."""
    from notifyctl.db import _existing_indexes, add_missing_columns

    ctx = any_db_ctx
    with ctx.engine.begin() as conn:  # as an earlier release left it
        conn.exec_driver_sql("CREATE INDEX ix_notifications_campaign_id ON notifications (campaign_id)")
    add_missing_columns(ctx.engine)
    with ctx.engine.connect() as conn:
        names = _existing_indexes(conn)
        assert "ix_notifications_campaign_id" not in names and "uq_notifications_campaign_recipient" in names
        if ctx.engine.dialect.name == "sqlite":
            plan = str(
                conn.exec_driver_sql(
                    "EXPLAIN QUERY PLAN SELECT status, count(*) FROM notifications WHERE campaign_id = 'c' GROUP BY status"
                ).all()
            )
            assert "uq_notifications_campaign_recipient" in plan, plan


@pytest.mark.fresh_pg_schema
def test_the_analytics_triggers_join_by_index_whatever_the_statistics(any_db_ctx: Context) -> None:
    """PostgreSQL: the statement triggers' join of the changed deliveries to their notifications is
    planned with hash and merge joins off (probes of the primary key), not from statistics that a
    fresh or fast-growing table has wrong (a hash over every notification per batch); a database
    with the previous definition gets it on start, the rollup rebuilt exact."""
    from notifyctl.analytics import checks, rollup, triggers
    from notifyctl.db import write_lock

    ctx = any_db_ctx
    if ctx.engine.dialect.name != "postgresql":
        return  # SQLite: row triggers, one primary-key lookup each
    cid = _launch_now(ctx, "plan")
    run_worker(ctx.settings, ["high", "normal", "low"], burst=True, reconcile=False)
    with ctx.engine.begin() as conn:  # as the previous release left it: v1 functions and triggers
        for name, ddl in zip(triggers.TRIGGERS, triggers._pg_ddl()[:2], strict=True):
            old = name.replace(triggers.VERSION, "v1")
            conn.exec_driver_sql(ddl.replace(name, old).replace(rollup.PG_PLAN, ""))
            conn.exec_driver_sql(f"DROP TRIGGER {name} ON deliveries")
            kind = "INSERT" if "ins" in name else "UPDATE"
            tables = "NEW TABLE AS new_rows" if kind == "INSERT" else "OLD TABLE AS old_rows NEW TABLE AS new_rows"
            conn.exec_driver_sql(
                f"CREATE TRIGGER {old} AFTER {kind} ON deliveries REFERENCING {tables} "
                f"FOR EACH STATEMENT EXECUTE FUNCTION {old}()"
            )
    assert triggers.install(ctx.engine, write_lock) is True
    with ctx.engine.connect() as conn:
        config = dict(
            conn.exec_driver_sql(
                "SELECT proname, proconfig FROM pg_proc WHERE proname LIKE 'notify_analytics_%%' "
                "AND pronamespace = current_schema()::regnamespace"
            ).all()
        )
    assert sorted(config) == sorted(triggers.TRIGGERS)  # the old functions dropped with their triggers
    for settings in config.values():
        assert {"enable_hashjoin=off", "enable_mergejoin=off"} <= set(settings)
    assert checks.rollup_counts(ctx.engine) == checks.full_counts(ctx.engine)
    assert sum(n for k, n in checks.full_counts(ctx.engine).items() if k[3] == cid and k[4] == "sent") == N


@pytest.mark.fresh_pg_schema
def test_statistics_follow_a_table_that_doubled(any_db_ctx: Context) -> None:
    """PostgreSQL: a table whose rows changed since its last analysis by as many as it had then (and
    by MIN_CHANGED at least) is analysed, once; one that did not is left alone. SQLite: nothing."""
    from notifyctl.pgstats import MIN_CHANGED, analyze_grown

    ctx = any_db_ctx
    if ctx.engine.dialect.name != "postgresql":
        assert analyze_grown(ctx.engine) == []
        return
    analyze_grown(ctx.engine)  # whatever the fixtures left
    rep = import_users(
        ctx, io.StringIO("user_id,email\n" + "".join(f"s{i},s{i}@example.com\n" for i in range(MIN_CHANGED + 10)))
    )
    assert rep.errors == []

    def stats() -> tuple[float, int]:
        with ctx.engine.connect() as conn:
            conn.exec_driver_sql("SELECT pg_stat_force_next_flush()")
            row = conn.exec_driver_sql(
                "SELECT c.reltuples, s.n_mod_since_analyze FROM pg_class AS c JOIN pg_stat_user_tables AS s "
                "ON s.relid = c.oid WHERE s.schemaname = current_schema() AND s.relname = 'users'"
            ).one()
        return float(row[0]), int(row[1])

    for _ in range(50):  # the import's counts reach the shared statistics when its backend reports them
        if stats()[1] >= MIN_CHANGED:
            break
        time.sleep(0.1)
    assert "users" in analyze_grown(ctx.engine, ("users",))
    reltuples, changed = stats()
    assert reltuples >= MIN_CHANGED and changed == 0
    assert analyze_grown(ctx.engine, ("users",)) == []  # nothing changed since


def test_a_low_rate_campaign_behind_its_slots_is_not_produced_in_a_burst(ctx: Context) -> None:
    """The launcher queues at most a second of --rate itself: a campaign at 100/s whose slots already
    passed when its rows are written (its clock half a minute back: a long segment read, say) leaves
    them all to the paced reconciler, which releases 100 a round."""
    from datetime import datetime, timedelta

    n = 1000
    rep = import_users(ctx, io.StringIO("user_id,email\n" + "".join(f"z{i},z{i}@example.com\n" for i in range(n))))
    assert rep.errors == []
    seg = ctx.settings.home / "z.csv"
    seg.write_text("user_id\n" + "".join(f"z{i}\n" for i in range(n)))
    back = datetime.now(UTC) - timedelta(seconds=30)
    spec = LaunchSpec("weekly_promo", channels=["email"], segment_csv=str(seg), rate=100.0, quiet_hours="off",
                      data={"discount": 5, "code": "Z", "first_name": "Z"})  # fmt: skip
    cid = launch(ctx, spec, now=back)["campaign_id"]
    assert campaign_status(ctx, cid)["notifications"] == {"scheduled": n}
    assert ctx.redis.llen(ctx.queue("low").key) == 0
    later = time.time()
    assert [reconcile(ctx, now=later + i, force=True, paced=True).retries_queued for i in range(3)] == [100] * 3


def test_a_campaign_due_now_at_its_rate_is_produced_within_it(ctx: Context) -> None:
    """At a rate the write keeps up with, the launcher queues what is due as it writes, never more
    than a second of the rate ahead of the clock."""
    n, rate = 3000, 1000.0
    rep = import_users(ctx, io.StringIO("user_id,email\n" + "".join(f"y{i},y{i}@example.com\n" for i in range(n))))
    assert rep.errors == []
    seg = ctx.settings.home / "y.csv"
    seg.write_text("user_id\n" + "".join(f"y{i}\n" for i in range(n)))
    t0 = time.monotonic()
    spec = LaunchSpec("weekly_promo", channels=["email"], segment_csv=str(seg), rate=rate, quiet_hours="off",
                      data={"discount": 5, "code": "Y", "first_name": "Y"})  # fmt: skip
    cid = launch(ctx, spec)["campaign_id"]
    took = time.monotonic() - t0
    queued = campaign_status(ctx, cid)["notifications"].get("queued", 0)
    assert 0 < queued <= rate * (took + 1)


def _with_chunks(ctx: Context, rows: int) -> Context:
    """``ctx``'s settings (same database and Redis) with segment chunks of ``rows`` rows."""
    s = ctx.settings
    return Context(s.model_copy(update={"campaign": s.campaign.model_copy(update={"chunk_size": rows})}))


def _dup_segment(tag: str, users: int) -> str:
    """A segment of ``tag``0..``users``-1 (first_name Name<i>) with five rows repeating a user, lines
    given for chunks of 10 rows (line 1 the header): a repeat of a user of an earlier chunk (32), two
    of one user in one later chunk (41, 42), one of a user of the chunk before (65), and one of a
    user two lines before, in its own chunk (66); then a user nobody imported (67)."""
    lines = [f"{tag}{i},Name{i}" for i in range(30)] + [f"{tag}5,Dup"]
    lines += [f"{tag}{i},Name{i}" for i in range(30, 38)] + [f"{tag}12,Dup", f"{tag}12,Dup"]
    lines += [f"{tag}{i},Name{i}" for i in range(38, users)] + [f"{tag}40,Dup", f"{tag}{users - 1},Dup", "nobody,N"]
    return "user_id,first_name\n" + "\n".join(lines) + "\n"


def _first_names(ctx: Context, cid: str) -> Counter[tuple[str, str]]:
    with Session(ctx.engine) as s:
        rows = s.execute(select(Notification.recipient_id, Notification.data).where(Notification.campaign_id == cid))
        return Counter((uid, str(data["first_name"])) for uid, data in rows.all())


def test_a_first_launch_skips_its_planned_duplicates_without_reading_its_rows(any_db_ctx: Context) -> None:
    """A campaign's first launch has no rows yet: the write pass skips the rows the plan pass found
    repeating a user (across chunks and within one) and never reads the campaign's rows back; each
    user is written once, with their first row's data; the counts are the plan's. Sent now (every
    recipient's instant the same) from a segment file as the plan read it, the write pass does not
    look the users up again: the plan's unknown user is reported all the same."""
    base = any_db_ctx
    users = 60
    rep = import_users(base, io.StringIO("user_id,email\n" + "".join(f"k{i},k{i}@example.com\n" for i in range(users))))
    assert rep.errors == []
    seg = base.settings.home / "dups.csv"
    seg.write_text(_dup_segment("k", users))
    ctx = _with_chunks(base, 10)
    lookups: list[str] = []
    user_reads = 0
    offered = 0  # rows given to SQLite's INSERT (PostgreSQL's COPY is not an event)
    retried: list[str] = []  # PostgreSQL: a chunk's COPY refused by the unique index, rolled back

    def on_exec(_conn: Any, _cursor: Any, statement: str, params: Any, _context: Any, many: bool) -> None:
        nonlocal offered, user_reads
        user_reads += bool(re.match(r"SELECT (u\.)?id, (u\.)?timezone FROM (users|json_each)", statement))
        if re.match(r"\s*SELECT recipient_id FROM notifications\b", statement):
            lookups.append(statement)
        if re.match(r"\s*INSERT INTO notifications\b", statement):
            offered += len(params) if many else 1
        if statement.startswith("ROLLBACK TO SAVEPOINT"):
            retried.append(statement)

    spec = LaunchSpec("weekly_promo", channels=["email"], segment_csv=str(seg), rate=1_000_000.0, quiet_hours="off",
                      data={"discount": 20, "code": "C"})  # fmt: skip
    event.listen(Engine, "before_cursor_execute", on_exec)
    try:
        s = launch(ctx, spec)
    finally:
        event.remove(Engine, "before_cursor_execute", on_exec)
        ctx.close()
    assert lookups == [] and retried == []
    assert user_reads == 7  # the plan pass's chunks of 10 of the 66 rows; none by the write pass
    assert offered == (users if ctx.engine.dialect.name == "sqlite" else 0)  # the repeats never reach the database
    assert (s["written"], s["recipients"], s["duplicates"], s["skipped_existing"]) == (users, users, 5, 0)
    bad = {(b["line"], b["kind"]) for b in s["bad_rows"]["first"]}
    assert bad == {(n, "duplicate") for n in (32, 41, 42, 65, 66)} | {(67, "unknown_user")}
    assert s["timezone_fallbacks"] == 0
    assert _first_names(base, s["campaign_id"]) == Counter((f"k{i}", f"Name{i}") for i in range(users))


def test_a_segment_changed_between_the_passes_still_writes_each_user_once(any_db_ctx: Context) -> None:
    """The segment file is rewritten after the plan pass: a new first row (a user the plan never saw)
    moves every line by one, so the duplicates the plan recorded (by line and user) match no row of
    the write pass. Every user is written, once, with their first row's data (the repeats are
    skipped by the unique index: PostgreSQL's COPY of such a chunk fails and goes again through ON
    CONFLICT DO NOTHING), and ``written`` counts the rows the database took. (Staggered by zone, at
    00:00 already passed everywhere: one instant for all, planned in a pass of its own.)"""
    base = any_db_ctx
    users = 60
    rep = import_users(
        base, io.StringIO("user_id,email\n" + "".join(f"m{i},m{i}@example.com\n" for i in range(users + 1)))
    )
    assert rep.errors == []
    seg = base.settings.home / "moving.csv"
    seg.write_text(_dup_segment("m", users))
    ctx = _with_chunks(base, 10)

    def progress(phase: str, done: int, _total: int | None) -> None:
        if phase == "write" and done == 0:  # between the passes
            body = _dup_segment("m", users).split("\n", 1)[1]
            seg.write_text(f"user_id,first_name\nm{users},Name{users}\n{body}")

    spec = LaunchSpec("weekly_promo", channels=["email"], segment_csv=str(seg), rate=1_000_000.0, quiet_hours="off",
                      stagger_tz=True, local_time="00:00", if_passed="now", data={"discount": 20, "code": "C"})  # fmt: skip
    retried: list[str] = []

    def on_exec(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("ROLLBACK TO SAVEPOINT"):
            retried.append(statement)

    event.listen(Engine, "before_cursor_execute", on_exec)
    try:
        s = launch(ctx, spec, progress=progress)
    finally:
        event.remove(Engine, "before_cursor_execute", on_exec)
        ctx.close()
    # PostgreSQL: the chunks holding a repeat of an earlier chunk's user (lines 33, 42-43, 66) went again
    assert len(retried) == (3 if ctx.engine.dialect.name == "postgresql" else 0)
    assert _first_names(base, s["campaign_id"]) == Counter((f"m{i}", f"Name{i}") for i in range(users + 1))
    assert s["written"] == users + 1
    # the users looked up again (the file changed): the unknown one found on its new line
    bad = {(b["line"], b["kind"]) for b in s["bad_rows"]["first"]}
    assert bad == {(n, "duplicate") for n in (32, 41, 42, 65, 66)} | {(68, "unknown_user")}
    with Session(base.engine) as session:
        n = session.execute(select(func.count()).where(Notification.campaign_id == s["campaign_id"])).scalar_one()
    assert n == users + 1


def test_a_launch_runs_few_garbage_collections_and_leaves_the_threshold_as_it_was(any_db_ctx: Context) -> None:
    """While a launch runs, the collector's youngest generation waits for ``YOUNG_GC_THRESHOLD``
    allocations (at Python's 700, these 2,500 rows took 20-31 young collections, some going on to
    the older generations); the process's own threshold is back after it, a failed launch's too."""
    import gc

    from notifyctl.errors import InputError

    ctx = any_db_ctx
    users = "".join(f"gc{i},gc{i}@example.com\n" for i in range(N))
    assert import_users(ctx, io.StringIO("user_id,email\n" + users)).errors == []
    seg = ctx.settings.home / "gc.csv"
    seg.write_text("user_id,first_name,code\n" + "".join(f"gc{i},Name{i},C{i:05d}\n" for i in range(N)))
    spec = LaunchSpec("weekly_promo", channels=["email"], segment_csv=str(seg), rate=1_000_000.0, quiet_hours="off",
                      data={"discount": 20})  # fmt: skip
    process = gc.get_threshold()  # (a worker run in this process earlier may have raised it: freeze_heap)
    before = (700, *process[1:])  # Python's own
    gc.set_threshold(*before)
    try:
        gc.collect()
        collections = gc.get_stats()[0]["collections"]
        assert launch(ctx, spec)["written"] == N
        assert gc.get_stats()[0]["collections"] - collections <= 2
        assert gc.get_threshold() == before
        empty = ctx.settings.home / "nobody.csv"
        empty.write_text("user_id,first_name\nghost,G\n")
        with pytest.raises(InputError, match="no recipient"):
            launch(ctx, LaunchSpec("weekly_promo", channels=["email"], segment_csv=str(empty), data={"discount": 1}))
        assert gc.get_threshold() == before
    finally:
        gc.set_threshold(*process)


def test_a_launch_of_one_instant_reads_its_segment_once_and_a_relaunch_counts_its_plan_anew(
    any_db_ctx: Context,
) -> None:
    """Sent now, every recipient has one instant: the launch reads its segment file once (opened
    twice in all: the header when the flags are checked, then the rows), planning each chunk as it
    writes it. While it runs, the campaign's plan is what it has written so far (``counting``); at
    its end, the whole plan. A launch stopped after a few chunks and relaunched ends with the plan,
    the counts and the schedule an uninterrupted launch of the same segment has: every recipient
    at the same offset from the wave's start, repeats and an unknown user reported on their lines."""
    import sys

    base = any_db_ctx
    users = 60
    zones = ["Europe/Paris", "America/New_York", "Asia/Kolkata", ""]
    body = "".join(f"k{i},k{i}@example.com,{zones[i % 4]}\n" for i in range(users))
    assert import_users(base, io.StringIO("user_id,email,timezone\n" + body)).errors == []
    seg = base.settings.home / "once.csv"
    seg.write_text(_dup_segment("k", users))
    ctx = _with_chunks(base, 10)
    opened: list[str] = []
    watching = [True]

    def on_audit(name: str, args: tuple[Any, ...]) -> None:
        if watching[0] and name == "open" and str(args[0]) == str(seg):
            opened.append(name)

    sys.addaudithook(on_audit)
    during: list[tuple[int, Any, Any]] = []
    stop_after = [0]  # chunks written before the launch is stopped (0: never)

    def progress(phase: str, done: int, _total: int | None) -> None:
        if phase == "write" and done:
            with Session(base.engine) as session:
                camp = session.scalars(select(Campaign).order_by(Campaign.created_at.desc())).first()  # type: ignore[attr-defined]
                assert camp is not None
                during.append((done, camp.summary, camp.plan[0]["recipients"]))
            if stop_after[0] and len(during) >= stop_after[0]:
                raise KeyboardInterrupt  # as a launcher killed between two chunks

    def spec(name: str) -> LaunchSpec:
        return LaunchSpec("weekly_promo", channels=["email"], segment_csv=str(seg), rate=100.0, quiet_hours="off",
                          name=name, data={"discount": 20, "code": "C"})  # fmt: skip

    try:
        whole = launch(ctx, spec("whole"), progress=progress)
        watching[0] = False
        assert len(opened) == 2, opened
        # the plan so far after each chunk (its known rows, repeats included), marked as counting
        assert [d[1] for d in during] == [{"planned": d[0], "counting": True} for d in during]
        assert [d[0] for d in during] == [d[2] for d in during] == [10, 20, 30, 40, 50, 60, 65]
        during.clear()
        stop_after[0] = 3
        with pytest.raises(KeyboardInterrupt):
            launch(ctx, spec("stopped"), progress=progress)
        stop_after[0] = 0
        assert campaign_status(ctx, "stopped")["state"] == "launching"
        from campaigns.launcher import resume_launch

        again = resume_launch(ctx, "stopped")
    finally:
        watching[0] = False
        ctx.close()
    # (a relaunch counts the repeats with the rows it already had: it does not look for them)
    assert whole["written"] == again["written"] + 30 == users and again["skipped_existing"] == 30 + 5
    keys = ("planned", "timezone_fallbacks")
    assert {k: whole[k] for k in keys} == {k: again[k] for k in keys} and whole["planned"] == 65
    assert {(b["line"], b["kind"]) for b in whole["bad_rows"]["first"]} == {
        (n, "duplicate") for n in (32, 41, 42, 65, 66)} | {(67, "unknown_user")}  # fmt: skip
    assert {(b["line"], b["kind"]) for b in again["bad_rows"]["first"]} == {(67, "unknown_user")}
    with Session(base.engine) as session:
        camps = {c.name: c for c in session.scalars(select(Campaign))}
        for c in camps.values():
            assert c.summary["planned"] == 65 and "counting" not in c.summary
        plans = [[{k: w[k] for k in ("recipients", "timezones")} for w in camps[n].plan] for n in ("whole", "stopped")]
        assert plans[0] == plans[1] and plans[0][0]["recipients"] == 65
        assert {"Europe/Paris", "America/New_York", "Asia/Kolkata"} <= set(plans[0][0]["timezones"])
        offsets = []
        for n in ("whole", "stopped"):
            start = datetime.fromisoformat(camps[n].plan[0]["start"])
            rows = session.execute(
                select(Notification.recipient_id, Notification.due_at).where(Notification.campaign_id == camps[n].id)
            ).all()
            offsets.append({u: (d if d.tzinfo else d.replace(tzinfo=UTC)) - start for u, d in rows})
    assert offsets[0] == offsets[1] and len(offsets[0]) == users
