"""Campaigns: segments (CSV, SQL; SQLite and PostgreSQL) with bad rows, timezone staggering across DST
changes and half-hour offsets, quiet hours, the produced rate, dry-run = real run, pause/resume/cancel,
and the CLI's refusals. Real Redis, real SQL, the real reconciler and workers (outbox provider)."""

from __future__ import annotations

import io
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from sqlalchemy import func, select, update
from sqlmodel import Session
from typer.testing import CliRunner

from campaigns.launcher import LaunchSpec, launch, resume_launch
from campaigns.report import campaign_status
from campaigns.schedule import Schedule, local_instant, parse_hhmm
from campaigns.state import cancel, pause, resume
from notifyctl.cli import campaign as campaign_cli
from notifyctl.cli.main import NotifyGroup
from notifyctl.context import Context
from notifyctl.directory import import_users, register_token, set_prefs
from notifyctl.errors import InputError, NotFound
from notifyctl.models import Campaign, Delivery, Notification, User
from notifyctl.settings import Settings
from notifyctl.tracking import timeline
from tests.conftest import cli_env
from tests.util import drain, fcm_token
from worker.pool import run_worker
from worker.providers.outbox import read_outbox
from worker.reconciler import reconcile

PROMO = {"discount": 15, "code": "SPRING"}


def add_users(ctx: Context, rows: list[str], header: str = "user_id,email,phone,timezone,sms_opt_in") -> None:
    rep = import_users(ctx, io.StringIO(header + "\n" + "\n".join(rows) + "\n"))
    assert rep.errors == [], rep.errors


def notifications(ctx: Context, cid: str) -> list[Notification]:
    with Session(ctx.engine) as s:
        return list(s.execute(select(Notification).where(Notification.campaign_id == cid)).scalars())


def utc(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


# ------------------------------------------------------------------------------------------------ segments


def test_csv_segment_with_bad_rows(any_db_ctx: Context, tmp_path: Path) -> None:
    ctx = any_db_ctx
    add_users(ctx, [f"u{i},u{i}@example.com,,Europe/Paris,false" for i in range(300)])
    seg = tmp_path / "seg.csv"
    with seg.open("wb") as f:
        f.write(b"user_id,first_name,tier\n")
        for i in range(300):
            f.write(f"u{i},Name{i},gold\n".encode())
            if i == 10:
                f.write(b"u\xff\xfe,Bad,gold\n")  # line 13: not UTF-8
            if i == 20:
                f.write(b"u20b,too,many,fields\n")  # line 24
            if i == 30:
                f.write(b",Empty,gold\n")  # line 35
            if i == 40:
                f.write(b"ghost,Nobody,gold\n")  # line 46: unknown user
        f.write(b"u5,Again,gold\n")  # line 306: a duplicate of line 7, reported; the first row is kept
    now = datetime.now(UTC)
    s = launch(
        ctx, LaunchSpec("weekly_promo", channels=["email"], segment_csv=str(seg), rate=1000, data=PROMO), now=now
    )
    assert s["written"] == 300 and s["recipients"] == 300 and s["skipped_existing"] == 0 and s["duplicates"] == 1
    bad = {(b["line"], b["kind"]) for b in s["bad_rows"]["first"]}
    assert bad == {(13, "encoding"), (24, "malformed"), (35, "malformed"), (46, "unknown_user"), (306, "duplicate")}
    assert "also on line 7" in next(b["message"] for b in s["bad_rows"]["first"] if b["line"] == 306)
    rows = notifications(ctx, s["campaign_id"])
    assert len(rows) == 300 and len({n.recipient_id for n in rows}) == 300
    assert next(n for n in rows if n.recipient_id == "u5").data["first_name"] == "Name5"
    n7 = next(n for n in rows if n.recipient_id == "u7")
    assert n7.data == {"discount": 15, "code": "SPRING", "first_name": "Name7", "tier": "gold"}
    assert n7.dedup_key == f"campaign:{s['campaign_id']}:u7"
    # `notifyctl status campaign:<id>:<user>` finds it (through the campaign's own index: campaign
    # rows are kept out of the dedup key index); a key that only looks like one is not found
    assert timeline(ctx, n7.dedup_key)["notification"]["id"] == n7.id
    for ref in (f"campaign:{s['campaign_id']}:ghost", "campaign:c_other:u7", "campaign:"):
        with pytest.raises(NotFound):
            timeline(ctx, ref)
    assert (n7.category, n7.priority, n7.channels) == ("marketing", "low", ["email"])
    # due from now at 1000/s: those already due when written are queued by the launcher, the rest scheduled
    assert {n.status for n in rows} <= {"scheduled", "queued"}
    assert all((n.status == "queued") == (n.job_id is not None) for n in rows)
    st = campaign_status(ctx, s["campaign_id"])
    assert st["recipients"] == 300 and st["bad_rows"] == 5 and sum(st["notifications"].values()) == 300


def test_sql_segment_streams_and_refuses_writes(any_db_ctx: Context) -> None:
    ctx = any_db_ctx
    add_users(ctx, [f"s{i},s{i}@example.com,,UTC,false" for i in range(2500)] + ["x1,x1@example.com,,UTC,false"])
    sql = "SELECT id AS user_id, locale AS lang, 'SQL' AS first_name FROM users WHERE id LIKE 's%' ORDER BY id;"
    s = launch(ctx, LaunchSpec("weekly_promo", channels=["email"], segment_sql=sql, rate=5000, data=PROMO))
    assert s["written"] == 2500 and s["bad_rows"]["count"] == 0
    rows = notifications(ctx, s["campaign_id"])
    assert len(rows) == 2500 and rows[0].data["lang"] == "en" and rows[0].data["first_name"] == "SQL"
    for bad_sql, msg in [
        ("DELETE FROM users", "only a SELECT"),
        ("SELECT id AS user_id FROM users; DROP TABLE users", "one statement"),
        ("SELECT id AS user_id INTO stolen FROM users", "INTO"),
        ("SELECT id AS user_id FROM users FOR UPDATE", "row locks"),
        ("SELECT id FROM users", "no user_id column"),
        ("SELECT user_id FROM no_such_table", "--segment-sql"),
    ]:
        with pytest.raises(InputError, match=msg):
            launch(ctx, LaunchSpec("weekly_promo", segment_sql=bad_sql, data=PROMO))
    with Session(ctx.engine) as sess:
        assert sess.execute(select(func.count()).select_from(Campaign)).scalar_one() == 1
        assert sess.execute(select(func.count()).select_from(Notification)).scalar_one() == 2500


def test_sql_segment_from_another_database_is_read_only(ctx: Context, tmp_path: Path) -> None:
    import sqlite3

    add_users(ctx, [f"e{i},e{i}@example.com,,UTC,false" for i in range(50)])
    other = tmp_path / "crm.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE leads (uid TEXT, score INTEGER)")
    con.executemany("INSERT INTO leads VALUES (?, ?)", [(f"e{i}", i) for i in range(50)] + [(None, 0), ("zz", 1)])
    con.commit()
    con.close()
    s = launch(
        ctx,
        LaunchSpec("weekly_promo", channels=["email"], segment_sql="SELECT uid AS user_id, score FROM leads",
                   segment_db=f"sqlite:///{other}", data={**PROMO, "first_name": "Lead"}),
    )  # fmt: skip
    assert s["written"] == 50
    assert s["bad_rows"]["by_kind"] == {"malformed": 1, "unknown_user": 1}
    assert {b["line"] for b in s["bad_rows"]["first"]} == {51, 52}
    # the query runs with SQLite's query_only on (no SELECT can write in SQLite itself: what it would
    # take is a function with side effects, which the PostgreSQL test below has): the query reports it
    s = launch(
        ctx,
        LaunchSpec("weekly_promo", channels=["email"],
                   segment_sql="SELECT uid AS user_id, (SELECT query_only FROM pragma_query_only) AS ro FROM leads",
                   segment_db=f"sqlite:///{other}", data={**PROMO, "first_name": "Lead"}),
    )  # fmt: skip
    assert s["written"] == 50
    assert {n.data["ro"] for n in notifications(ctx, s["campaign_id"])} == {1}
    with pytest.raises(InputError, match="no SQLite database"):
        launch(
            ctx,
            LaunchSpec("weekly_promo", segment_sql="SELECT 1 AS user_id", segment_db=f"sqlite:///{tmp_path}/none.db"),
        )  # noqa: E501


def test_sql_segment_from_postgresql_cannot_write_through_a_function(ctx: Context) -> None:
    """A SELECT can write on PostgreSQL: a function it calls may INSERT, and nextval() writes a
    sequence. check_select cannot see that; the read-only transaction refuses it."""
    from tests.conftest import PG_AVAILABLE, PG_URL

    if not PG_AVAILABLE:
        pytest.skip("PostgreSQL not reachable on 127.0.0.1:5432")
    import uuid

    from sqlalchemy import create_engine, text

    add_users(ctx, [f"p{i},p{i}@example.com,,UTC,false" for i in range(5)])
    schema = "t_" + uuid.uuid4().hex[:10]
    admin = create_engine(PG_URL)
    try:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
            conn.execute(text(f"CREATE TABLE {schema}.leads (uid TEXT)"))
            conn.execute(text(f"INSERT INTO {schema}.leads SELECT 'p' || g FROM generate_series(0, 4) AS g"))
            conn.execute(text(f"CREATE TABLE {schema}.stolen (uid TEXT)"))
            conn.execute(text(f"CREATE SEQUENCE {schema}.seq"))
            conn.execute(
                text(
                    f"CREATE FUNCTION {schema}.grab(u TEXT) RETURNS TEXT LANGUAGE sql AS "
                    f"$$ INSERT INTO {schema}.stolen VALUES (u) RETURNING u $$"
                )
            )
        url = f"{PG_URL}?options=-csearch_path%3D{schema}"
        for sql in ["SELECT grab(uid) AS user_id FROM leads", "SELECT uid AS user_id, nextval('seq') AS n FROM leads"]:
            with pytest.raises(InputError, match="read-only transaction"):
                launch(ctx, LaunchSpec("weekly_promo", segment_sql=sql, segment_db=url, data=PROMO))
        with admin.connect() as conn:
            assert conn.execute(text(f"SELECT count(*) FROM {schema}.stolen")).scalar_one() == 0
        s = launch(  # the same database, read: the launch goes ahead
            ctx,
            LaunchSpec("weekly_promo", channels=["email"], segment_sql="SELECT uid AS user_id FROM leads",
                       segment_db=url, data={**PROMO, "first_name": "P"}),
        )  # fmt: skip
        assert s["written"] == 5
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


# ---------------------------------------------------------------------------------------------- scheduling

# Offsets written out by hand (not computed with a tz library) for the days used below.
H = 3600


def at(base: str, offset_s: int, local: str) -> datetime:
    """The UTC instant of wall-clock ``base local`` in a zone at UTC``offset_s``."""
    return datetime.fromisoformat(f"{base}T{local}").replace(tzinfo=UTC) - timedelta(seconds=offset_s)


def test_stagger_across_zones_dst_and_half_hour_offsets(ctx: Context) -> None:
    zones = {
        "ny": "America/New_York",  # switched to EDT (-4) at 07:00Z on 2025-03-09
        "stj": "America/St_Johns",  # switched to NDT (-2:30) the same night
        "kol": "Asia/Kolkata",  # +5:30, no DST; 10:00 already passed at launch → tomorrow
        "lon": "Europe/London",  # GMT until 2025-03-30
        "lhi": "Australia/Lord_Howe",  # +11 (half-hour DST, ends in April); 10:00 passed → tomorrow
        "bad": "Mars/Olympus",  # unknown → default zone (UTC)
    }
    add_users(ctx, [f"{k},{k}@example.com,,UTC,false" for k in zones])
    from sqlalchemy import update

    from notifyctl.models import User

    with Session(ctx.engine) as s:  # a zone the importer would refuse, as another system might have written it
        for k, z in zones.items():
            s.execute(update(User).where(User.id == k).values(timezone=z))
        s.commit()
    seg = ctx.settings.home / "seg.csv"
    seg.write_text("user_id,first_name\n" + "".join(f"{k},{k}\n" for k in zones))
    now = datetime(2025, 3, 9, 5, 0, tzinfo=UTC)
    expected = {
        "ny": at("2025-03-09", -4 * H, "10:00"),
        "stj": at("2025-03-09", -(2 * H + 30 * 60), "10:00"),
        "kol": at("2025-03-10", 5 * H + 30 * 60, "10:00"),
        "lon": at("2025-03-09", 0, "10:00"),
        "lhi": at("2025-03-10", 11 * H, "10:00"),
        "bad": at("2025-03-09", 0, "10:00"),
    }
    spec = LaunchSpec("weekly_promo", channels=["email"], segment_csv=str(seg), stagger_tz=True, local_time="10:00",
                      rate=100, data=PROMO)  # fmt: skip
    s = launch(ctx, spec, now=now)
    got = {n.recipient_id: utc(n.due_at) for n in notifications(ctx, s["campaign_id"])}
    # lon and bad share the 10:00Z wave: one of them is 1/rate later
    assert got["lon"] in (expected["lon"], expected["lon"] + timedelta(seconds=0.01))
    assert {got["lon"], got["bad"]} == {expected["lon"], expected["lon"] + timedelta(seconds=0.01)}
    for k in ("ny", "stj", "kol", "lhi"):
        assert got[k] == expected[k], k
    assert s["timezone_fallbacks"] == 1

    # --if-passed now: those whose 10:00 has passed go at once
    spec.if_passed, spec.name = "now", "second"
    s2 = launch(ctx, spec, now=now)
    got2 = {n.recipient_id: utc(n.due_at) for n in notifications(ctx, s2["campaign_id"])}
    assert {got2["kol"], got2["lhi"]} == {now, now + timedelta(seconds=0.01)}
    assert got2["ny"] == expected["ny"]


def test_nonexistent_and_ambiguous_local_times() -> None:
    ny = "America/New_York"
    # 02:30 does not exist on 2025-03-09 in New York: moved forward by the gap, 03:30 EDT = 07:30Z
    sch = Schedule(now=datetime(2025, 3, 9, 4, 0, tzinfo=UTC), default_tz="UTC", local_time=parse_hhmm("02:30", "t"))
    assert sch.instant(ny)[0] == datetime(2025, 3, 9, 7, 30, tzinfo=UTC)
    # 01:30 happens twice on 2025-11-02: the first one (EDT, -4) = 05:30Z
    sch = Schedule(now=datetime(2025, 11, 2, 3, 0, tzinfo=UTC), default_tz="UTC", local_time=parse_hhmm("01:30", "t"))
    assert sch.instant(ny)[0] == datetime(2025, 11, 2, 5, 30, tzinfo=UTC)
    # St John's fall-back overlap (01:30 local twice on 2025-11-02): first = NDT -2:30 = 04:00Z
    sch = Schedule(now=datetime(2025, 11, 1, 12, 0, tzinfo=UTC), default_tz="UTC", local_time=parse_hhmm("01:30", "t"))
    assert sch.instant("America/St_Johns")[0] == datetime(2025, 11, 2, 4, 0, tzinfo=UTC)
    assert local_instant(datetime(2025, 6, 1).date(), parse_hhmm("10:00", "t"), sch_zone("Asia/Kolkata")) == datetime(
        2025, 6, 1, 4, 30, tzinfo=UTC
    )


def sch_zone(name: str):  # type: ignore[no-untyped-def]
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)


def test_quiet_hours_defer_to_the_next_allowed_local_time(ctx: Context) -> None:
    zones = {"lon": "Europe/London", "kol": "Asia/Kolkata", "ny": "America/New_York", "tok": "Asia/Tokyo",
             "stj": "America/St_Johns"}  # fmt: skip
    add_users(ctx, [f"{k},{k}@example.com,,{z},false" for k, z in zones.items()])
    seg = ctx.settings.home / "q.csv"
    seg.write_text("user_id\n" + "".join(f"{k}\n" for k in zones))
    now = datetime(2025, 6, 2, 1, 0, tzinfo=UTC)
    send_at = datetime(2025, 6, 2, 2, 0, tzinfo=UTC)
    spec = LaunchSpec("weekly_promo", channels=["email"], segment_csv=str(seg), send_at=send_at.isoformat(),
                      quiet_hours="21:00-08:00", rate=1000, data={**PROMO, "first_name": "A"})  # fmt: skip
    s = launch(ctx, spec, now=now)
    got = {n.recipient_id: utc(n.due_at) for n in notifications(ctx, s["campaign_id"])}
    assert got["lon"] == at("2025-06-02", 1 * H, "08:00")  # 03:00 BST is quiet → 08:00 BST
    assert got["kol"] == at("2025-06-02", 5 * H + 30 * 60, "08:00")  # 07:30 IST → 08:00 IST
    assert got["ny"] == at("2025-06-02", -4 * H, "08:00")  # 22:00 EDT (June 1) → next morning
    assert got["stj"] == at("2025-06-02", -(2 * H + 30 * 60), "08:00")  # 23:30 NDT → next morning
    assert got["tok"] == send_at  # 11:00 JST: allowed


def test_produced_rate_stays_at_the_rate_asked(ctx: Context) -> None:
    n, rate = 3000, 500.0
    add_users(ctx, [f"r{i},r{i}@example.com,,UTC,false" for i in range(n)])
    seg = ctx.settings.home / "r.csv"
    seg.write_text("user_id\n" + "".join(f"r{i}\n" for i in range(n)))
    t0 = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    s = launch(ctx, LaunchSpec("weekly_promo", channels=["email"], segment_csv=str(seg), send_at=t0.isoformat(),
                               rate=rate, data={**PROMO, "first_name": "R"}))  # fmt: skip
    dues = sorted(utc(x.due_at) for x in notifications(ctx, s["campaign_id"]))
    assert dues[0] == t0 and (dues[-1] - dues[0]).total_seconds() == pytest.approx((n - 1) / rate, abs=0.002)
    # the reconciler, run each simulated second, produces about `rate` per second into the low queue
    per_round = []
    base = t0.timestamp()
    for i in range(1, 7):
        per_round.append(reconcile(ctx, now=base + i - 1e-6, force=True, limit=100_000).retries_queued)
    assert sum(per_round) == n
    for k in per_round:
        assert abs(k - rate) <= 0.05 * rate, per_round
    assert ctx.redis.llen(ctx.queue("low").key) == sum(-(-k // ctx.settings.batch_size) for k in per_round)


def test_a_campaign_behind_schedule_catches_up_at_its_rate_not_faster(ctx: Context) -> None:
    """Workers were down for a minute: the backlog goes out at --rate per second, not in one burst."""
    n, rate = 3000, 500.0
    add_users(ctx, [f"b{i},b{i}@example.com,,UTC,false" for i in range(n)])
    seg = ctx.settings.home / "b.csv"
    seg.write_text("user_id\n" + "".join(f"b{i}\n" for i in range(n)))
    s = launch(ctx, LaunchSpec("weekly_promo", channels=["email"], segment_csv=str(seg), rate=rate,
                               data={**PROMO, "first_name": "B"}))  # fmt: skip
    # the first few, due when written, were queued by the launcher itself (at most the first second's)
    at_launch = campaign_status(ctx, s["campaign_id"])["notifications"].get("queued", 0)
    assert at_launch <= rate
    later = datetime.now(UTC).timestamp() + 60  # every slot is now a minute overdue
    paced = [reconcile(ctx, now=later + i, force=True, paced=True).retries_queued for i in range(3)]
    assert paced == [500, 500, 500]
    # the unpaced call (an operator's `notifyctl reconcile`) takes everything due at once
    assert reconcile(ctx, now=later + 3, force=True).retries_queued == n - 1500 - at_launch
    assert campaign_status(ctx, s["campaign_id"])["notifications"].get("scheduled", 0) == 0


# ----------------------------------------------------------------------------------------- dry run = real run


def test_dry_run_counts_equal_what_a_real_run_sends(ctx: Context) -> None:
    rows = []
    for i in range(120):
        email = f"d{i}@example.com" if i % 10 != 1 else ""
        phone = f"+1415555{i:04d}" if i % 7 != 0 else ""
        tz = ["Europe/Paris", "Asia/Kolkata", "America/St_Johns"][i % 3]
        rows.append(f"d{i},{email},{phone},{tz},{'true' if i % 4 else 'false'}")
    add_users(ctx, rows)
    for i in range(0, 120, 5):
        register_token(ctx, f"d{i}", fcm_token(f"d{i}"), "android")
    register_token(ctx, "d0", "ab" * 32, "ios")  # two tokens: two push deliveries
    for i in range(3, 120, 11):
        set_prefs(ctx, f"d{i}", ["email:marketing"], [])
    set_prefs(ctx, "d2", ["all"], [])
    # d4 already got a marketing email today: the 1/day window holds it back
    from notifyctl.intake import parse_request, submit

    submit(ctx, parse_request({"recipient_id": "d4", "template_id": "weekly_promo", "channels": ["email"],
                               "data": {**PROMO, "first_name": "D"}}))  # fmt: skip
    run_worker(ctx.settings, ["high", "normal", "low"], burst=True, reconcile=False)
    seg = ctx.settings.home / "d.csv"
    seg.write_text("user_id,first_name\n" + "".join(f"d{i},D{i}\n" for i in range(120)) + "d7,Dup\nnope,X\n")
    spec = LaunchSpec("weekly_promo", segment_csv=str(seg), stagger_tz=True, local_time="10:00", if_passed="now",
                      rate=2000, data=PROMO)  # fmt: skip

    def redis_state() -> dict[bytes, object]:
        r = ctx.redis
        return {k: (r.zrange(k, 0, -1, withscores=True) if r.type(k) == b"zset" else r.type(k)) for k in r.keys("*")}

    before = redis_state()
    dry = launch(ctx, spec, dry_run=True)
    with Session(ctx.engine) as s:
        assert s.execute(select(func.count()).select_from(Campaign)).scalar_one() == 0
        assert s.execute(select(func.count()).select_from(Notification)).scalar_one() == 1  # d4's email only
    assert redis_state() == before and any(b"notif:rate:d4:" in k for k in before)  # peeked, nothing recorded
    assert dry["audience"] == 120 and dry["duplicates"] == 1 and dry["bad_rows"]["count"] == 2
    assert {(b["line"], b["kind"]) for b in dry["bad_rows"]["first"]} == {(122, "duplicate"), (123, "unknown_user")}
    assert dry["per_channel"]["email"]["suppressed"]["rate_limited"] == 1
    assert sum(w["recipients"] for w in dry["waves"]) == 121

    real = launch(ctx, spec)
    assert real["written"] == 120 and real["duplicates"] == 1 and real["bad_rows"] == dry["bad_rows"]
    drain(ctx, due_by=datetime.now(UTC).timestamp() + 3 * 86400)
    with Session(ctx.engine) as s:
        got = s.execute(
            select(Delivery.channel, Delivery.status, Delivery.reason, func.count())
            .join(Notification, Notification.id == Delivery.notification_id)
            .where(Notification.campaign_id == real["campaign_id"])
            .group_by(Delivery.channel, Delivery.status, Delivery.reason)
        ).all()
    sent: Counter[str] = Counter()
    suppressed: dict[str, Counter[str]] = {c: Counter() for c in ("push", "email", "sms")}
    for ch, status, reason, n in got:
        if status == "sent":
            sent[ch] += n
        else:
            assert status == "suppressed", (ch, status, reason)
            suppressed[ch][reason.split(":")[0]] += n
    for ch in ("push", "email", "sms"):
        d = dry["per_channel"][ch]
        assert sent[ch] == d["deliveries"], ch
        assert dict(suppressed[ch]) == d["suppressed"], ch
    assert sent["push"] > 0 and sent["email"] > 0 and sent["sms"] > 0
    assert dry["sms_cost"]["recipients"] == sent["sms"]
    st = campaign_status(ctx, real["campaign_id"])
    assert st["state"] == "completed" and st["produced"] == 120
    assert st["per_channel"]["email"]["sent"] == sent["email"]
    assert st["per_channel"]["email"]["suppressed_by_reason"] == dry["per_channel"]["email"]["suppressed"]


# -------------------------------------------------------------------------------------- pause/resume/cancel


def test_pause_resume_cancel(ctx: Context) -> None:
    add_users(ctx, [f"p{i},p{i}@example.com,,UTC,false" for i in range(400)])
    seg = ctx.settings.home / "p.csv"
    seg.write_text("user_id\n" + "".join(f"p{i}\n" for i in range(400)))
    now = datetime.now(UTC)
    t0 = now + timedelta(minutes=10)
    spec = LaunchSpec("weekly_promo", channels=["email"], segment_csv=str(seg), send_at=t0.isoformat(), rate=100,
                      data={**PROMO, "first_name": "P"}, name="spring")  # fmt: skip
    s = launch(ctx, spec)
    cid = s["campaign_id"]
    # 100 become due and are produced; then pause holds the other 300
    assert reconcile(ctx, now=t0.timestamp() + 0.995, force=True).retries_queued == 100
    p = pause(ctx, "spring")
    assert p == {"campaign_id": cid, "name": "spring", "state": "paused", "paused": 300, "already_produced": 100}
    assert reconcile(ctx, now=t0.timestamp() + 3600, force=True).retries_queued == 0
    assert campaign_status(ctx, cid)["state"] == "paused"
    # resume an hour later: the 300 whose time passed are spaced from now at 100/s, none in a burst
    later = t0 + timedelta(hours=1)
    r = resume(ctx, cid, now=later)
    assert r["resumed"] == 300 and r["rescheduled"] == 300 and r["state"] == "sending"
    dues = sorted(utc(n.due_at) for n in notifications(ctx, cid) if n.status == "scheduled")
    assert dues[0] == later and dues[-1] == later + timedelta(seconds=2.99)
    assert reconcile(ctx, now=later.timestamp() + 0.995, force=True).retries_queued == 100
    c = cancel(ctx, cid)
    assert c["canceled"] == 200 and c["already_produced"] == 200 and c["state"] == "canceled"
    assert reconcile(ctx, now=later.timestamp() + 3600, force=True).retries_queued == 0
    st = campaign_status(ctx, cid)
    assert st["notifications"] == {"queued": 200, "canceled": 200} and st["state"] == "canceled"
    with pytest.raises(InputError, match="canceled"):
        resume(ctx, cid)


# --------------------------------------------------------------------------------------------------- the CLI

root = typer.Typer(cls=NotifyGroup)  # what main.py does for every noun
root.add_typer(campaign_cli.app, name="campaign")


@root.callback()
def _root() -> None:
    pass


def invoke(settings: Settings, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(root, ["campaign", *args], env=cli_env(settings))


def test_cli_launch_status_and_bad_flags(ctx: Context, settings: Settings) -> None:
    import json

    add_users(ctx, [f"c{i},c{i}@example.com,,Asia/Kolkata,false" for i in range(30)])
    seg = settings.home / "c.csv"
    seg.write_text("user_id,first_name\n" + "".join(f"c{i},C\n" for i in range(30)))
    base = ["launch", "-t", "weekly_promo", "--segment-csv", str(seg), "-d", "discount=5", "-d", "code=X"]
    for args, msg in [
        (["launch", "-t", "nope", "--segment-csv", str(seg)], "unknown template"),
        ([*base, "--stagger-tz"], "--local-time"),
        ([*base, "--stagger-tz", "--local-time", "25:00"], "--local-time"),
        ([*base, "--local-time", "10:00"], "only with --stagger-tz"),
        ([*base, "--stagger-tz", "--local-time", "10:00", "--if-passed", "later"], "--if-passed"),
        ([*base, "--send-at", "yesterday"], "--send-at"),
        ([*base, "--send-at", "2001-01-01T00:00:00Z"], "in the past"),
        ([*base, "--quiet-hours", "21-8"], "--quiet-hours"),
        ([*base, "--rate", "0"], "--rate"),
        ([*base, "-c", "fax"], "--channels"),
        ([*base, "--data-json", '{"n": 18446744073709551616}'], "--data-json: holds an integer beyond 64 bits"),
        ([*base, "--data-json", "[" * 100_000], "--data-json: malformed JSON"),
        (["launch", "-t", "weekly_promo", "--segment-csv", str(settings.home / "missing.csv")], "no such file"),
        (["launch", "-t", "weekly_promo"], "segment"),
        (["launch", "-t", "otp_code", "--segment-csv", str(seg)], "high-priority"),
        (["launch", "-t", "weekly_promo", "--segment-csv", str(seg)], "missing variable"),  # no template data
        (["status", "nope"], "no campaign"),
    ]:
        r = invoke(settings, *args)
        assert r.exit_code in (2, 4), (args, r.output)
        assert msg in r.output and "Traceback" not in r.output, (args, r.output)
    with Session(ctx.engine) as s:
        assert s.execute(select(func.count()).select_from(Campaign)).scalar_one() == 0
        assert s.execute(select(func.count()).select_from(Notification)).scalar_one() == 0

    r = invoke(settings, *base, "--stagger-tz", "--local-time", "10:00", "--name", "cli", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    dry = json.loads(r.stdout)
    assert dry["audience"] == 30 and dry["waves"][0]["timezones"] == ["Asia/Kolkata"]
    r = invoke(settings, *base, "--stagger-tz", "--local-time", "10:00", "--name", "cli", "--rate", "10")
    assert r.exit_code == 0, r.output
    assert "written 30" in r.stdout
    r = invoke(settings, "status", "cli", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["notifications"] == {"scheduled": 30}
    r = invoke(settings, "list", "--json")
    assert [c["name"] for c in json.loads(r.stdout)] == ["cli"]
    for cmd, word in (("pause", "paused"), ("resume", "resumed"), ("cancel", "canceled")):
        r = invoke(settings, cmd, "cli")
        assert r.exit_code == 0 and word in r.stdout, r.output
    r = invoke(settings, "status", "cli")
    assert r.exit_code == 0 and "canceled 30" in r.stdout


# ------------------------------------------------------------------------------- the README's own commands


def test_readme_campaign_commands_work_as_written(ctx: Context, settings: Settings) -> None:
    """The README launches weekly_promo from a segment of user ids (no first_name column) and
    then asks `campaign status weekly_promo-<date>`: the template greets with the user's own
    first_name or "there", the default name has no spaces, and the launch prints the state that
    `campaign list` shows."""
    import json

    add_users(ctx, ["ann,ann@example.com,,Europe/Paris,false,Ann", "bo,bo@example.com,,UTC,false,"],
              header="user_id,email,phone,timezone,sms_opt_in,first_name")  # fmt: skip
    seg = settings.home / "segment.csv"
    seg.write_text("user_id\nann\nbo\n")
    common = ["launch", "-t", "weekly_promo", "-c", "email", "--segment-csv", str(seg), "-d", "discount=20",
              "-d", "code=WEEK20", "--stagger-tz", "--local-time", "10:00"]  # fmt: skip
    r = invoke(settings, *common, "--quiet-hours", "21:00-08:00", "--rate", "500", "--dry-run")
    assert r.exit_code == 0, r.output
    r = invoke(settings, *common, "--rate", "500", "--json")
    assert r.exit_code == 0, r.output
    launched = json.loads(r.stdout)
    name = f"weekly_promo-{datetime.now(UTC):%Y-%m-%d}"
    assert launched["name"] == name and launched["state"] == "sending" and launched["written"] == 2
    r = invoke(settings, *common, "--rate", "500")
    assert r.exit_code == 0 and f"{name}-2" in r.stdout and "state sending" in r.stdout, r.output
    r = invoke(settings, "status", name)
    assert r.exit_code == 0 and launched["campaign_id"] in r.stdout and ": sending" in r.stdout, r.output
    listed = json.loads(invoke(settings, "list", "--json").stdout)
    assert [(c["name"], c["state"]) for c in listed] == [(f"{name}-2", "sending"), (name, "sending")]
    # the workers render it: the user's own first_name, else "there"
    drain(ctx, due_by=datetime.now(UTC).timestamp() + 3 * 86400)
    box = {r["to"]: r["content"] for r in read_outbox(settings.outbox_dir)}
    assert box["ann@example.com"]["text"].startswith("This week: 20% off.\nHi Ann, use the code WEEK20")
    assert "Hi there, use the code WEEK20" in box["bo@example.com"]["text"]


def test_campaign_references_id_name_or_unambiguous_prefix(ctx: Context, settings: Settings) -> None:
    add_users(ctx, [f"r{i},r{i}@example.com,,UTC,false" for i in range(3)])
    seg = settings.home / "r.csv"
    seg.write_text("user_id\nr0\nr1\nr2\n")
    now = datetime.now(UTC)
    spec = {"segment_csv": str(seg), "channels": ["email"], "data": {**PROMO, "first_name": "R"},
            "send_at": (now + timedelta(hours=1)).isoformat()}  # fmt: skip
    a = launch(ctx, LaunchSpec("weekly_promo", name="spring-sale", **spec))  # type: ignore[arg-type]
    b = launch(ctx, LaunchSpec("weekly_promo", name="spring-sale-eu", **spec))  # type: ignore[arg-type]
    c = launch(ctx, LaunchSpec("weekly_promo", **spec))  # type: ignore[arg-type]
    assert c["name"] == f"weekly_promo-{now:%Y-%m-%d}"
    assert campaign_status(ctx, "spring-sale")["campaign_id"] == a["campaign_id"]  # exact name beats prefix
    assert campaign_status(ctx, "spring-sale-e")["campaign_id"] == b["campaign_id"]
    assert campaign_status(ctx, "weekly")["campaign_id"] == c["campaign_id"]
    assert campaign_status(ctx, b["campaign_id"])["name"] == "spring-sale-eu"
    assert campaign_status(ctx, b["campaign_id"][:-3])["name"] == "spring-sale-eu"
    with pytest.raises(InputError, match=r"'spring' is ambiguous: it matches spring-sale-eu \(c_.*\), spring-sale \("):
        campaign_status(ctx, "spring")
    r = invoke(settings, "pause", "spring")
    assert r.exit_code == 2 and "ambiguous" in r.stderr
    r = invoke(settings, "status", "autumn")
    assert r.exit_code == 4 and "no campaign with id or name 'autumn'" in r.stderr
    for bad in ("spring sale", "", "-x", "a/b"):
        with pytest.raises(InputError, match="--name"):
            launch(ctx, LaunchSpec("weekly_promo", name=bad, **spec))  # type: ignore[arg-type]
    with pytest.raises(InputError, match=f"--name: campaign {a['campaign_id']} is already named 'spring-sale'"):
        launch(ctx, LaunchSpec("weekly_promo", name="spring-sale", **spec))  # type: ignore[arg-type]
    r = invoke(settings, "launch", "-t", "weekly_promo", "--segment-csv", str(seg), "--name", "spring sale",
               "-d", "discount=1", "-d", "code=X")  # fmt: skip
    assert r.exit_code == 2 and "--name: 'spring sale' has spaces" in r.stderr
    # names from before this change (with spaces) are still found, quoted
    with Session(ctx.engine) as s:
        s.execute(update(Campaign).where(Campaign.id == c["campaign_id"]).values(name="weekly_promo 2026-12-01 18:47"))
        s.commit()
    assert campaign_status(ctx, "weekly_promo 2026-12-01")["campaign_id"] == c["campaign_id"]
    again = resume_launch(ctx, "weekly_promo 2026-12-01")  # a relaunch keeps the old name
    assert again["written"] == 0 and again["skipped_existing"] == 3 and again["name"] == "weekly_promo 2026-12-01 18:47"


# ------------------------------------------------------------------------------- segment bounds and checks


def test_csv_segment_refuses_a_duplicate_column(ctx: Context, tmp_path: Path) -> None:
    add_users(ctx, ["u1,u1@example.com,,UTC,false"])
    for header, col in (("user_id,user_id", "user_id"), ("user_id,first_name,tier,first_name", "first_name")):
        seg = tmp_path / "dup.csv"
        seg.write_text(f"{header}\n" + ",".join(["u1"] * len(header.split(","))) + "\n")
        with pytest.raises(InputError, match=f"--segment-csv: column '{col}' appears 2 times in the header"):
            launch(ctx, LaunchSpec("weekly_promo", segment_csv=str(seg), data=PROMO))
    with Session(ctx.engine) as s:
        assert s.execute(select(func.count()).select_from(Campaign)).scalar_one() == 0


def test_sql_segment_accepts_read_only_ctes_and_refuses_writing_ones(any_db_ctx: Context) -> None:
    ctx = any_db_ctx
    add_users(ctx, [f"w{i},w{i}@example.com,,UTC,false" for i in range(20)])
    sql = ("WITH recent AS (SELECT id, locale FROM users WHERE id LIKE 'w%') "
           "SELECT id AS user_id, locale AS lang FROM recent ORDER BY id")  # fmt: skip
    s = launch(ctx, LaunchSpec("weekly_promo", channels=["email"], segment_sql=sql, data={**PROMO, "first_name": "W"}))
    assert s["written"] == 20
    writes = "WITH gone AS (DELETE FROM users WHERE id = 'w1' RETURNING id) SELECT id AS user_id FROM gone"
    for bad_sql, msg in [
        (writes, r"the query writes \(DELETE\)"),
        ("WITH x AS (UPDATE users SET locale = 'xx' RETURNING id) SELECT id AS user_id FROM x", r"writes \(UPDATE\)"),
        ("with x as (insert into users (id) values ('evil') returning id) select id as user_id from x", "INSERT"),
    ]:
        with pytest.raises(InputError, match=msg):
            launch(ctx, LaunchSpec("weekly_promo", segment_sql=bad_sql, data=PROMO))
    # a keyword inside a literal or a quoted name is not a write
    ok = "WITH x AS (SELECT id, 'update; delete' AS \"insert\" FROM users WHERE id = 'w3') SELECT id AS user_id FROM x"
    dry = launch(ctx, LaunchSpec("weekly_promo", segment_sql=ok, data={**PROMO, "first_name": "W"}), dry_run=True)
    assert dry["audience"] == 1
    with Session(ctx.engine) as sess:
        assert sess.execute(select(func.count()).select_from(User)).scalar_one() == 20


def test_sql_segment_is_bounded_in_time_and_value_size(any_db_ctx: Context) -> None:
    """``randomblob(1000000000)`` hung the launcher at 1 GB; a query that never ends hung it for
    ever. Both end in a one-line error naming the setting, nothing written."""
    ctx = any_db_ctx
    add_users(ctx, ["b1,b1@example.com,,UTC,false"])
    ctx.settings.campaign.segment_timeout = 0.5  # NOTIFY_CAMPAIGN_SEGMENT_TIMEOUT=0.5, had the root read it
    pg = ctx.engine.dialect.name == "postgresql"
    forever = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
               "SELECT 'b1' AS user_id, count(*) AS n FROM c")  # fmt: skip
    huge = (
        "SELECT 'b1' AS user_id, repeat('x', 2000000) AS blob"
        if pg
        else "SELECT 'b1' AS user_id, randomblob(1000000000) AS blob"
    )
    with pytest.raises(
        InputError, match=r"--segment-sql: the query worked longer than 0.5 s for one row \(segment_timeout"
    ):
        launch(ctx, LaunchSpec("weekly_promo", segment_sql=forever, data=PROMO))
    # the size bound, on its own: the time to build a 2 MB value is no bound of this test's
    ctx.settings.campaign.segment_timeout = 60.0
    if pg:  # the server builds it (PostgreSQL bounds a value at 1 GB); the row is reported, not kept
        s = launch(ctx, LaunchSpec("weekly_promo", segment_sql=huge, data=PROMO), dry_run=True)
        assert s["bad_rows"]["first"] == [
            {"line": 1, "kind": "too_long", "message": "blob is longer than 1,000,000 characters"}
        ]
    else:
        with pytest.raises(InputError, match=r"makes a value longer than 1,000,000 bytes \(segment_max_value\)"):
            launch(ctx, LaunchSpec("weekly_promo", segment_sql=huge, data=PROMO))
    with Session(ctx.engine) as s:
        assert s.execute(select(func.count()).select_from(Campaign)).scalar_one() == 0
