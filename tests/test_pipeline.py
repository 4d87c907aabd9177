"""The whole path in-process: intake → RQ queue → burst worker → outbox, tracked in SQL."""

from __future__ import annotations

import time

from notifyctl.context import Context
from notifyctl.directory import set_prefs
from notifyctl.models import DeliveryStatus
from tests.util import IOS_TOKEN, count_notifications, deliveries, drain, events, notification, queue_depths, seed, send
from worker.providers.outbox import read_outbox


def test_send_to_outbox_tracked_end_to_end(any_db_ctx: Context) -> None:
    ctx = any_db_ctx
    seed(ctx)
    res = send(ctx, channels=["all"], dedup_key="order_shipped:ORD-1")
    assert res.status == "queued" and res.channels == ["push", "email", "sms"]
    assert queue_depths(ctx)["normal"] == 1
    drain(ctx, reconcile=True)
    ds = deliveries(ctx, res.notification_id)
    assert sorted((d.route, d.address, d.status) for d in ds) == [
        ("email", "alice@example.com", "sent"),
        ("push.ios", IOS_TOKEN, "sent"),
        ("sms", "+14155550101", "sent"),
    ]
    assert all(d.provider == "outbox" and d.provider_message_id and d.sent_at for d in ds)
    assert notification(ctx, res.notification_id).status == "done"
    # every delivery's history: queued then sent
    ev = events(ctx, res.notification_id)
    for d in ds:
        assert [s for did, s in ev if did == d.id] == ["queued", "sent"]
    # the outbox holds the rendered messages
    box = {r["delivery_id"]: r for r in read_outbox(ctx.settings.outbox_dir)}
    email = next(d for d in ds if d.channel == "email")
    assert box[email.id]["content"]["subject"] == "Order ORD-1 has shipped"
    assert "https://t.example/1" in box[email.id]["content"]["text"]
    assert box[email.id]["provider_message_id"] == email.provider_message_id
    sms = next(d for d in ds if d.channel == "sms")
    assert box[sms.id]["content"]["text"].startswith("Order ORD-1 has shipped")


def test_email_html_is_autoescaped_and_text_is_not(ctx: Context) -> None:
    seed(ctx)
    res = send(ctx, channels=["email"], data={"order_id": "<b>x</b>", "tracking_url": "https://t/?a=1&b=2"})
    drain(ctx, reconcile=True)
    d = deliveries(ctx, res.notification_id)[0]
    rec = next(r for r in read_outbox(ctx.settings.outbox_dir) if r["delivery_id"] == d.id)
    assert "&lt;b&gt;x&lt;/b&gt;" in rec["content"]["html"]
    assert "a=1&amp;b=2" in rec["content"]["html"]
    assert "<b>x</b>" in rec["content"]["text"]


def test_opt_out_per_channel(ctx: Context) -> None:
    seed(ctx)
    set_prefs(ctx, "alice", off=["email"], on=[])
    res = send(ctx, channels=["push", "email"])
    assert res.status == "queued"
    drain(ctx, reconcile=True)
    by = {d.channel: d for d in deliveries(ctx, res.notification_id)}
    assert by["push"].status == "sent"
    assert by["email"].status == "suppressed" and by["email"].reason == "opted_out:email:*"
    assert not any(r["route"] == "email" for r in read_outbox(ctx.settings.outbox_dir))


def test_opt_out_per_category_spares_other_categories(ctx: Context) -> None:
    seed(ctx)
    set_prefs(ctx, "alice", off=["marketing"], on=[])
    promo = send(
        ctx,
        template_id="weekly_promo",
        channels=["email", "push"],
        data={"first_name": "A", "discount": 5, "code": "C"},
    )
    assert (promo.status, promo.reason) == ("suppressed", "opted_out")
    assert notification(ctx, promo.notification_id).status == "suppressed"
    order = send(ctx, channels=["email"])
    assert order.status == "queued"
    drain(ctx, reconcile=True)
    assert [d.status for d in deliveries(ctx, order.notification_id)] == ["sent"]
    assert deliveries(ctx, promo.notification_id) == []


def test_opt_out_channel_and_category_combined(ctx: Context) -> None:
    seed(ctx)
    set_prefs(ctx, "alice", off=["sms:marketing"], on=[])
    res = send(
        ctx, template_id="weekly_promo", channels=["sms", "email"], data={"first_name": "A", "discount": 5, "code": "C"}
    )
    drain(ctx, reconcile=True)
    by = {d.channel: d for d in deliveries(ctx, res.notification_id)}
    assert by["sms"].status == "suppressed" and by["sms"].reason == "opted_out:sms:marketing"
    assert by["email"].status == "sent"


def test_opt_out_set_after_queueing_still_applies(ctx: Context) -> None:
    seed(ctx)
    res = send(ctx, channels=["sms"])
    set_prefs(ctx, "alice", off=["sms"], on=[])
    drain(ctx, reconcile=True)
    assert [(d.status, d.reason) for d in deliveries(ctx, res.notification_id)] == [("suppressed", "opted_out:sms:*")]


def test_dedup_key_suppresses_repeat_at_once(ctx: Context) -> None:
    seed(ctx)
    a = send(ctx, dedup_key="order_shipped:ORD-9")
    b = send(ctx, dedup_key="order_shipped:ORD-9")
    assert a.status == "queued"
    assert (b.status, b.reason, b.notification_id) == ("suppressed", "duplicate", a.notification_id)
    assert count_notifications(ctx) == 1
    assert sum(queue_depths(ctx).values()) == 1


def test_dedup_survives_loss_of_the_redis_key(ctx: Context) -> None:
    """Layer 1 in Redis can be lost (crash without fsync); the SQL record still decides."""
    seed(ctx)
    a = send(ctx, dedup_key="k-lost")
    ctx.redis.delete("notif:dedup:k-lost")
    b = send(ctx, dedup_key="k-lost")
    assert (b.status, b.reason, b.notification_id) == ("suppressed", "duplicate", a.notification_id)


def test_dedup_window_expires(home, redis_url, rclient) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import make_settings

    ctx = Context(make_settings(home, redis_url, dedup_ttl=1))
    seed(ctx)
    a = send(ctx, dedup_key="short")
    time.sleep(1.3)
    b = send(ctx, dedup_key="short")
    assert a.status == b.status == "queued" and a.notification_id != b.notification_id


def test_rate_limit_suppresses_over_the_window(ctx: Context) -> None:
    seed(ctx)
    promo = {
        "template_id": "weekly_promo",
        "channels": ["email"],
        "data": {"first_name": "A", "discount": 5, "code": "C"},
    }
    first = send(ctx, **promo)
    second = send(ctx, **promo)
    drain(ctx, reconcile=True)
    assert [d.status for d in deliveries(ctx, first.notification_id)] == ["sent"]
    d2 = deliveries(ctx, second.notification_id)
    assert [(d.status, d.reason) for d in d2] == [("suppressed", "rate_limited:email")]
    # transactional email is not under the marketing email rule
    order = send(ctx, channels=["email"])
    drain(ctx, reconcile=True)
    assert [d.status for d in deliveries(ctx, order.notification_id)] == ["sent"]


def test_push_limit_counts_per_notification_not_per_device(ctx: Context) -> None:
    from notifyctl.directory import register_token

    seed(ctx)
    register_token(ctx, "alice", "cd" * 32, "ios")  # two devices
    ids = [
        send(ctx, channels=["push"], data={"order_id": f"O{i}", "tracking_url": "u"}).notification_id for i in range(4)
    ]
    drain(ctx, reconcile=True)
    statuses = [sorted(d.status for d in deliveries(ctx, n)) for n in ids]
    assert statuses[:3] == [["sent", "sent"]] * 3
    assert statuses[3] == ["suppressed"]


def test_high_priority_is_never_held_back_but_is_counted(ctx: Context) -> None:
    seed(ctx)
    otp = {"template_id": "otp_code", "channels": ["push"], "data": {"code": "1", "minutes": 5}}
    ids = [send(ctx, **otp).notification_id for _ in range(4)]  # 4 > push limit 3/h
    drain(ctx, reconcile=True)
    assert all(deliveries(ctx, n)[0].status == "sent" for n in ids)
    normal = send(ctx, channels=["push"])
    drain(ctx, reconcile=True)
    assert deliveries(ctx, normal.notification_id)[0].reason == "rate_limited:push"


def test_priority_order_high_before_normal_before_low(ctx: Context) -> None:
    seed(ctx)
    low = send(ctx, template_id="weekly_promo", channels=["sms"], data={"first_name": "A", "discount": 1, "code": "c"})
    normal = send(ctx, channels=["sms"], recipient_id="carol")
    high = send(ctx, template_id="otp_code", channels=["sms"], recipient_id="dave", data={"code": "1", "minutes": 1})
    drain(ctx, reconcile=True)
    order = [r["notification_id"] for r in read_outbox(ctx.settings.outbox_dir, "sms")]
    assert order == [high.notification_id, normal.notification_id, low.notification_id]


def test_no_address_and_unknown_channel_content(ctx: Context) -> None:
    seed(ctx)
    res = send(ctx, recipient_id="dave", channels=["push", "email", "sms"])
    drain(ctx, reconcile=True)
    by = {d.channel: (d.status, d.reason) for d in deliveries(ctx, res.notification_id)}
    assert by == {
        "push": ("suppressed", "no_address:push"),
        "email": ("suppressed", "no_address:email"),
        "sms": ("sent", None),
    }


def test_processing_twice_sends_once(ctx: Context) -> None:
    """A duplicate job (recovery, retry) for the same notification sends nothing again."""
    from worker.pipeline import Runtime, process

    seed(ctx)
    res = send(ctx, channels=["email", "sms"])
    rt = Runtime(ctx, "w-test")
    s1 = process(rt, [res.notification_id])
    s2 = process(rt, [res.notification_id])
    assert s1.sent == 2 and s2.sent == 0 and s2.notifications == 0
    assert len(read_outbox(ctx.settings.outbox_dir)) == 2


def test_send_record_recovers_sql_state_without_resending(ctx: Context) -> None:
    """Crash after the provider accepted but before SQL commit: the Redis send record prevents a resend."""
    from sqlalchemy import update
    from sqlmodel import Session

    from notifyctl.models import Delivery, Notification
    from worker.pipeline import Runtime, process

    seed(ctx)
    res = send(ctx, channels=["email"])
    rt = Runtime(ctx, "w-test")
    process(rt, [res.notification_id])
    d = deliveries(ctx, res.notification_id)[0]
    with Session(ctx.engine) as s:  # roll the SQL record back as if the commit never happened
        s.execute(update(Delivery).where(Delivery.id == d.id).values(status="queued", provider_message_id=None))
        s.execute(update(Notification).where(Notification.id == res.notification_id).values(status="queued"))
        s.commit()
    stats = process(rt, [res.notification_id])
    assert stats.sent == 0 and stats.skipped == 1
    d2 = deliveries(ctx, res.notification_id)[0]
    assert d2.status == DeliveryStatus.sent and d2.provider_message_id == d.provider_message_id
    assert len(read_outbox(ctx.settings.outbox_dir)) == 1


def test_marketing_sms_needs_opt_in_transactional_does_not(ctx: Context) -> None:
    seed(ctx)
    promo = {
        "template_id": "weekly_promo",
        "channels": ["sms"],
        "data": {"first_name": "B", "discount": 5, "code": "C"},
    }
    bob_promo = send(ctx, recipient_id="bob", **promo)
    alice_promo = send(ctx, recipient_id="alice", **promo)
    bob_order = send(ctx, recipient_id="bob", channels=["sms"])
    drain(ctx, reconcile=True)
    assert [(d.status, d.reason) for d in deliveries(ctx, bob_promo.notification_id)] == [
        ("suppressed", "no_sms_opt_in")
    ]
    assert [d.status for d in deliveries(ctx, alice_promo.notification_id)] == ["sent"]
    assert [d.status for d in deliveries(ctx, bob_order.notification_id)] == ["sent"]


def test_marketing_email_carries_one_click_unsubscribe(home, redis_url, rclient) -> None:  # type: ignore[no-untyped-def]
    from notifyctl.unsubscribe import secret_key, verify_token
    from tests.conftest import make_settings

    ctx = Context(make_settings(home, redis_url, public_url="https://notify.example.com", postal_address="1 Main St"))
    seed(ctx)
    promo = send(ctx, template_id="weekly_promo", channels=["email"],
                 data={"first_name": "A", "discount": 5, "code": "C"})  # fmt: skip
    order = send(ctx, channels=["email"], recipient_id="bob")
    drain(ctx, reconcile=True)
    box = {r["notification_id"]: r for r in read_outbox(ctx.settings.outbox_dir, "email")}
    h = box[promo.notification_id]["headers"]
    assert h["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = h["List-Unsubscribe"].strip("<>")
    assert url.startswith("https://notify.example.com/u/")
    assert verify_token(secret_key(ctx.settings), url.rsplit("/", 1)[1]) == ("alice", "marketing")
    assert "1 Main St" in box[promo.notification_id]["content"]["text"]
    assert url in box[promo.notification_id]["content"]["text"]
    # transactional mail is exempt
    assert box[order.notification_id]["headers"] == {}


def test_a_preference_change_is_read_at_once(ctx: Context) -> None:
    """Opt-outs are read from SQL (no cache): a change holds for the next request and the next batch."""
    from sqlmodel import Session

    from notifyctl import prefs as prefs_sql

    seed(ctx)
    with Session(ctx.engine) as s:
        assert prefs_sql.load(s, ["alice"]) == {}
    first = send(ctx, channels=["push"])
    set_prefs(ctx, "alice", off=["push"], on=[])
    with Session(ctx.engine) as s:
        assert prefs_sql.load(s, ["alice"]) == {"alice": {("push", "*")}}
    assert send(ctx, channels=["push"]).reason == "opted_out"  # intake
    drain(ctx)  # the first, queued before the change: suppressed by its batch
    assert [(d.status, d.reason) for d in deliveries(ctx, first.notification_id)] == [
        ("suppressed", "opted_out:push:*")
    ]


def test_a_large_batch_reads_its_opt_outs_in_one_query(any_db_ctx: Context) -> None:
    """A batch of many users (a campaign's) reads every opt-out of its users in one query — several
    per user, ``*`` included, other users' left out."""
    import io

    from sqlmodel import Session

    from notifyctl import prefs as prefs_cache
    from notifyctl.directory import import_users

    ctx = any_db_ctx
    users = [f"p{i:03d}" for i in range(60)]
    rep = import_users(
        ctx, io.StringIO("user_id,email\n" + "".join(f"{u},{u}@example.com\n" for u in [*users, "p999"]))
    )
    assert rep.errors == []
    set_prefs(ctx, users[0], off=["email:marketing", "sms"], on=[])
    set_prefs(ctx, users[7], off=["all"], on=[])
    set_prefs(ctx, "p999", off=["push"], on=[])  # not in the batch
    with Session(ctx.engine) as s:
        got = prefs_cache.load(s, [*users, users[0]])  # (a repeated id counts once)
    assert got == {users[0]: {("email", "marketing"), ("sms", "*")}, users[7]: {("*", "*")}}


def test_batch_renders_per_recipient_only_what_reads_user(home, redis_url, rclient, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A batch renders a channel once per distinct data when the template never reads ``user``;
    one that does (``{{ user.first_name }}``) is rendered for each recipient."""
    from notifyctl.template_store import TemplateStore
    from tests.conftest import make_settings
    from worker.pipeline import Runtime, process

    tdir = tmp_path / "tpl"
    tdir.mkdir()
    (tdir / "hello_user.toml").write_text(
        'category = "marketing"\npriority = "low"\n[email]\nsubject = "Hi {{ user.first_name }}"\n'
        'html = "<p>{{ offer }} for {{ user.first_name }}</p>"\ntext = "{{ offer }} for {{ user.first_name }}"\n'
        '[push]\ntitle = "{{ offer }}"\nbody = "today only"\n'
    )
    ctx = Context(make_settings(home, redis_url, templates_dir=tdir, rate_limits=[]))
    seed(ctx)
    t = TemplateStore([tdir]).get("hello_user")
    assert t.variables("email") == {"user", "offer"} and t.variables("push") == {"offer"}
    nids = [send(ctx, recipient_id=u, template_id="hello_user", channels=["email", "push"],
                 data={"offer": "2 for 1"}).notification_id for u in ("alice", "bob", "carol")]  # fmt: skip
    stats = process(Runtime(ctx), nids)
    assert stats.sent == 3 + 2  # carol has no device token
    mails = {r["to"]: r["content"] for r in read_outbox(ctx.settings.outbox_dir, "email")}
    assert mails["alice@example.com"]["subject"] == "Hi Alice"
    assert mails["bob@example.com"]["subject"] == "Hi Bob"
    assert mails["carol@example.com"]["text"] == "2 for 1 for Carol"
    pushes = [r for r in read_outbox(ctx.settings.outbox_dir) if r["route"].startswith("push.")]
    assert [p["content"]["title"] for p in pushes] == ["2 for 1", "2 for 1"]
    ctx.close()


def test_batch_lookups_go_through_the_batch_keys(ctx: Context) -> None:
    """The worker loads a batch (and its device tokens), and the reconciler marks one queued, by id. With a
    thousand ids and a status condition, SQLite would rather walk the status index (every queued
    notification); the statements must fetch by primary key (EXPLAIN QUERY PLAN of what they run)."""
    from sqlalchemy import event, insert

    from notifyctl.models import DeviceToken, Notification, utcnow
    from worker.pipeline import Runtime, process
    from worker.reconciler import reconcile

    seed(ctx)
    now = utcnow()
    push = send(ctx, channels=["push"])  # alice has an iOS token: the batch loads device tokens

    def rows(prefix: str, status: str, n: int) -> list[dict[str, object]]:
        return [{"id": f"{prefix}{i:05d}", "recipient_id": "carol", "type": "t", "template_id": "weekly_promo",
                 "category": "marketing", "priority": "low", "channels": ["email"],
                 "data": {"first_name": "C", "discount": 1, "code": "X"}, "status": status, "due_at": now,
                 "created_at": now, "updated_at": now} for i in range(n)]  # fmt: skip

    with ctx.engine.begin() as conn:
        conn.execute(insert(Notification), rows("q", "queued", 3000) + rows("s", "scheduled", 1500))
    seen: list[str] = []

    def capture(statement: str) -> None:  # what SQLite ran, parameters filled in (SQLAlchemy's or raw)
        flat = " ".join(statement.split())
        by_id = "notifications.id IN (" in flat or ("notifications" in flat and "WHERE id IN (" in flat)
        if (by_id and "status" in flat) or "device_tokens.user_id IN" in flat or "WHERE notification_id IN" in flat:
            seen.append(flat)

    def trace(dbapi_conn, _record, _proxy) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.set_trace_callback(capture)

    event.listen(ctx.engine, "checkout", trace)
    try:
        with ctx.engine.begin() as conn:  # live device tokens: 3,000 of them, two of the batch's users
            conn.execute(insert(DeviceToken), [{"token": f"tok{i}", "user_id": f"other{i}", "platform": "ios",
                                                "created_at": now} for i in range(3000)])  # fmt: skip
        process(Runtime(ctx), [f"q{i:05d}" for i in range(1000)] + [push.notification_id])
        reconcile(ctx, force=True, check_lost=False)
    finally:
        event.remove(ctx.engine, "checkout", trace)
        ctx.engine.dispose()  # no traced connection stays in the pool
    kinds = {(s.split()[0], s.split(" FROM ")[-1].split()[0] if s.startswith("SELECT") else "") for s in seen}
    assert kinds == {
        ("SELECT", "notifications"),
        ("UPDATE", ""),
        ("SELECT", "device_tokens"),
        ("SELECT", "deliveries"),
    }, kinds
    with ctx.engine.connect() as conn:
        for statement in seen:
            plan = " ".join(r[3] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement))
            if "device_tokens" in statement:
                index = "ix_device_tokens_user_id (user_id=?)"
            elif "FROM deliveries" in statement:  # a batch's deliveries: through the unique key they lead
                index = "sqlite_autoindex_deliveries_2 (notification_id=?)"  # (uq_delivery, as SQLite names it)
            else:
                index = "notifications_1 (id=?)"
            assert index in plan, (statement[:80], plan)


def test_reconciler_queues_scheduled_work_on_each_database(any_db_ctx: Context) -> None:
    """The reconciler's UPDATE (by id, with an unindexable status test) and the batch loads, on
    SQLite and on PostgreSQL: a scheduled notification due a minute ago is queued and sent."""
    from datetime import timedelta

    from sqlalchemy import update

    from notifyctl.models import Notification, utcnow

    ctx = any_db_ctx
    seed(ctx)
    later = send(ctx, recipient_id="bob", channels=["push", "email"])
    with ctx.engine.begin() as conn:  # as a campaign row: scheduled, due a minute ago, no job
        conn.execute(
            update(Notification)
            .where(Notification.id == later.notification_id)
            .values(status="scheduled", job_id=None, due_at=utcnow() - timedelta(minutes=1))
        )
    drain(ctx, reconcile=True)  # the burst worker's reconciler queues it, the worker sends it
    assert sorted((d.route, d.status) for d in deliveries(ctx, later.notification_id)) == [
        ("email", "sent"),
        ("push.android", "sent"),
    ]
    n = notification(ctx, later.notification_id)
    assert n.status == "done" and n.job_id and n.job_id.startswith("job_")


def test_printing_user_fields_renders_once_per_batch_exactly_as_jinja_would(home, redis_url, rclient, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A channel that only prints ``user`` fields is rendered once per batch with tokens and each
    recipient's values put in; the result must be exactly the template's own rendering, whatever
    the values (HTML specials, unicode, numbers, None, edge whitespace, token look-alikes)."""
    import io

    from sqlalchemy import update

    from notifyctl.directory import import_users
    from notifyctl.intake import user_vars
    from notifyctl.models import User
    from notifyctl.template_store import TemplateStore
    from tests.conftest import make_settings
    from worker.pipeline import Runtime, process

    tdir = tmp_path / "tpl"
    tdir.mkdir()
    (tdir / "hi.toml").write_text(
        'category = "marketing"\npriority = "low"\n'
        '[email]\nsubject = "{{ user.first_name }}: {{ offer }}"\n'
        'html = "<p>{{ user.first_name }} / {{ user[\'plan\'] }}</p>"\ntext = "{{ user.first_name }}"\n'
        '[sms]\ntext = "{{ offer }} for {{ user.first_name }}"\n'
    )
    store = TemplateStore([tdir])
    t = store.get("hi")
    assert t.direct_user_fields("email") == {"first_name", "plan"}
    for body, expect in [('"{{ user.first_name|upper }}"', None), ('"{% if user.vip %}x{% endif %}"', None),
                         ('"{% for user in people %}{{ user.n }}{% endfor %}"', None), ('"{{ offer }}"', frozenset())]:  # fmt: skip
        (tdir / "x.toml").write_text(f'category = "marketing"\npriority = "low"\n[sms]\ntext = {body}\n')
        assert TemplateStore([tdir]).get("x").direct_user_fields("sms") == expect, body

    ctx = Context(make_settings(home, redis_url, templates_dir=tdir, rate_limits=[], public_url="https://n.example"))
    seed(ctx)
    values = ['Dan & <Co> "q"', "Zoë 🎉", 42, None, True, "  padded ", "%%notifyctl:t:plan%%", "a\x1e\x1db"]
    csv = "user_id,email,phone,sms_opt_in\n" + "".join(
        f"v{i},v{i}@example.com,+1415555{i:04d},true\n" for i in range(len(values))
    )
    assert import_users(ctx, io.StringIO(csv)).errors == []

    def set_names(names: list[object]) -> None:
        with ctx.engine.begin() as conn:
            for i, v in enumerate(names):
                conn.execute(update(User).where(User.id == f"v{i}").values(attributes={"first_name": v, "plan": "pro"}))

    # intake refuses a null first_name (null is missing): it becomes null after intake, before the worker
    set_names(["x" if v is None else v for v in values])
    nids = [send(ctx, recipient_id=f"v{i}", template_id="hi", channels=["email", "sms"], data={"offer": "2 for 1"})
            .notification_id for i in range(len(values))]  # fmt: skip
    set_names(values)
    stats = process(Runtime(ctx), nids)
    assert stats.sent == 2 * (len(values) - 1)  # a null first_name is missing: a template error, not "None"
    box = {(r["route"], r["to"]): r["content"] for r in read_outbox(ctx.settings.outbox_dir)}
    with ctx.engine.connect() as conn:
        users = {u.id: u for u in conn.execute(User.__table__.select())}  # type: ignore[attr-defined]
    for i in range(len(values)):
        u = users[f"v{i}"]
        for channel, route, to in (("email", "email", u.email), ("sms", "sms", u.phone)):
            if values[i] is None:
                assert (route, to) not in box
                continue
            want = t.render(channel, {"offer": "2 for 1", "user": user_vars(u)})
            got = dict(box[(route, to)])
            if channel == "email":  # the pipeline appends the unsubscribe footer and the pixel
                got = {
                    k: v if k == "subject" else v.split("\n\n--\n")[0].split("\n<p style=")[0] for k, v in got.items()
                }
            assert got == want, (values[i], channel, got, want)
    ctx.close()


def test_raw_batch_update_converts_values_and_keeps_its_condition(any_db_ctx: Context) -> None:
    """``update_where_in`` (the settle and the reconciler's mark, on the DBAPI cursor): more keys than
    one chunk of 900, datetimes stored as SQLAlchemy stores them (read back equal through the ORM),
    the extra condition applied, the count of changed rows returned; ``unindexed_in`` writes only
    the code's constants into SQL."""
    from datetime import timedelta

    import pytest
    from sqlalchemy import insert, select

    from notifyctl.bulk import unindexed_in, update_where_in
    from notifyctl.models import Notification, utcnow

    ctx = any_db_ctx
    now = utcnow().replace(microsecond=0)
    rows = [{"id": f"x{i:05d}", "recipient_id": "u", "type": "t", "template_id": "t", "category": "marketing",
             "priority": "low", "channels": ["email"], "data": {}, "status": "scheduled" if i % 3 else "done",
             "due_at": now, "created_at": now, "updated_at": now} for i in range(2000)]  # fmt: skip
    with ctx.engine.begin() as conn:
        conn.execute(insert(Notification), rows)
    later = now + timedelta(hours=1)
    with ctx.engine.begin() as conn:
        changed = update_where_in(
            conn, Notification.__table__, {"status": "queued", "job_id": "j1", "due_at": later}, "id",
            [r["id"] for r in rows[:1500]], "AND " + unindexed_in("status", ["scheduled", "retrying"]),
        )  # fmt: skip
    assert changed == sum(1 for r in rows[:1500] if r["status"] == "scheduled") == 1000
    with ctx.engine.connect() as conn:
        got = {i: (s, j, d) for i, s, j, d in conn.execute(
            select(Notification.id, Notification.status, Notification.job_id, Notification.due_at))}  # fmt: skip
    for i, r in enumerate(rows):
        status, job, due = got[r["id"]]
        if i < 1500 and r["status"] == "scheduled":
            assert (status, job, due.replace(tzinfo=None)) == ("queued", "j1", later.replace(tzinfo=None))
        else:
            assert (status, job) == (r["status"], None)
    with pytest.raises(ValueError):
        unindexed_in("status", ["done') OR ('1'='1"])


def test_prepared_insert_stores_what_an_insert_would(any_db_ctx: Context) -> None:
    """``prepare_insert`` (SQLite: converted parameters; PostgreSQL: one COPY): text with tabs, new
    lines, backslashes, a literal ``\\N`` and non-ASCII, NULLs, booleans, aware datetimes, JSON,
    and a second insert of the same key raises SQLAlchemy's IntegrityError, the batch not half-written."""
    from datetime import UTC, datetime, timedelta, timezone

    import pytest
    from sqlalchemy import select
    from sqlalchemy.exc import IntegrityError

    from notifyctl.bulk import prepare_insert
    from notifyctl.models import Delivery, DeliveryEvent, Notification

    ctx = any_db_ctx
    at = datetime(2026, 11, 26, 1, 2, 3, 456789, tzinfo=timezone(timedelta(hours=5)))
    odd = ["a\tb", "line\nnext\r\n", "back\\slash", "\\N", "Zoë 🎉 ‘q’", "", "x" * 500]
    deliveries = [{"id": f"d{i}", "notification_id": "n1", "user_id": "u1", "channel": "email", "route": "email",
                   "address": f"{i}@example.com", "status": "sent", "reason": text, "attempts": i,
                   "dead_lettered": i % 2 == 0, "queued_at": at, "updated_at": at, "provider": None,
                   "provider_message_id": None, "next_attempt_at": None if i % 2 else at + timedelta(seconds=i),
                   "sent_at": at, "suppressed_at": None, "failed_at": None}
                  for i, text in enumerate(odd)]  # fmt: skip
    data = {"quote": 'say "hi"\tthen\\n', "nested": [1, None, {"ü": True}]}
    note = {"id": "n1", "recipient_id": "u1", "type": "t", "template_id": "t", "category": "marketing",
            "priority": "low", "channels": ["email", "sms"], "data": data, "dedup_key": None, "campaign_id": None,
            "status": "done", "reason": None, "job_id": None, "due_at": at, "created_at": at, "updated_at": at}  # fmt: skip
    events = [
        {"notification_id": "n1", "delivery_id": f"d{i}", "status": "sent", "detail": t, "at": at}
        for i, t in enumerate(odd)
    ]
    with ctx.engine.begin() as conn:
        for table, rows in ((Notification.__table__, [note]), (Delivery.__table__, deliveries),
                            (DeliveryEvent.__table__, events)):  # fmt: skip
            prepare_insert(ctx.engine, table, rows)(conn)
    with ctx.engine.connect() as conn:
        got = {r.id: r for r in conn.execute(select(Delivery.__table__))}
        n = conn.execute(select(Notification.__table__)).one()
        details = [r.detail for r in conn.execute(select(DeliveryEvent.__table__).order_by(DeliveryEvent.id))]
    for row in deliveries:
        back = got[row["id"]]
        assert back.reason == row["reason"] and back.attempts == row["attempts"]
        assert back.dead_lettered is row["dead_lettered"] and back.provider is None
        assert back.queued_at == at and back.queued_at.astimezone(UTC) == at.astimezone(UTC)
        assert back.next_attempt_at == row["next_attempt_at"]
    assert (n.data, n.channels, n.due_at) == (data, ["email", "sms"], at)
    assert details == odd
    for i, t in enumerate(odd):  # one value down a whole column (PostgreSQL: converted and escaped once)
        same = [{"notification_id": "n1", "delivery_id": f"s{i}", "status": "sent", "detail": t, "at": at}] * 3
        with ctx.engine.begin() as conn:
            prepare_insert(ctx.engine, DeliveryEvent.__table__, same)(conn)
        with ctx.engine.connect() as conn:
            back = conn.execute(select(DeliveryEvent.__table__).where(DeliveryEvent.delivery_id == f"s{i}")).all()  # type: ignore[arg-type]
        assert [(r.detail, r.at) for r in back] == [(t, at)] * 3
    again = [dict(deliveries[0], id="d_new"), deliveries[1]]  # the second one exists
    with pytest.raises(IntegrityError), ctx.engine.begin() as conn:
        prepare_insert(ctx.engine, Delivery.__table__, again)(conn)
    with ctx.engine.connect() as conn:
        assert conn.execute(select(Delivery.id).where(Delivery.id == "d_new")).first() is None
    # a relaunched campaign's rows: those it already has are skipped (PostgreSQL: COPY to a staging
    # table, then INSERT ... ON CONFLICT DO NOTHING), twice in one transaction
    camp = [dict(note, id=f"c{i}", recipient_id=f"r{i}", campaign_id="camp") for i in range(3)]
    for rows in (camp[:2], camp[1:]):
        with ctx.engine.begin() as conn:
            prepare_insert(ctx.engine, Notification.__table__, rows, skip_conflicts_on=["campaign_id", "recipient_id"])(
                conn
            )
            prepare_insert(ctx.engine, Notification.__table__, rows, skip_conflicts_on=["campaign_id", "recipient_id"])(
                conn
            )
    with ctx.engine.connect() as conn:
        ids = conn.execute(select(Notification.id).where(Notification.campaign_id == "camp")).scalars().all()
    assert sorted(ids) == ["c0", "c1", "c2"]


def test_a_batchs_outcomes_counted_in_the_metrics_once_each(ctx: Context) -> None:
    """One batch of several deliveries of the same outcome: each counted (``notify_deliveries_total``,
    sent per minute), the batch's counts added up per distinct outcome."""
    from notifyctl import keys
    from worker.pipeline import Runtime, process

    seed(ctx)
    ids = [send(ctx, recipient_id=u, channels=["email"]).notification_id for u in ("alice", "bob", "carol")]
    ids.append(send(ctx, recipient_id="dave", channels=["email"]).notification_id)  # dave has no email
    ctx.redis.delete(keys.METRICS_DELIVERIES, *ctx.redis.keys(keys.metrics_sent_per_minute("*")))
    rt = Runtime(ctx, "w-metrics")
    try:
        assert process(rt, ids).sent == 3
    finally:
        rt.close()
    counts = {k.decode(): int(v) for k, v in ctx.redis.hgetall(keys.METRICS_DELIVERIES).items()}
    assert counts == {"sent|email|": 3, "suppressed|email|no_address": 1}
    per_minute = [ctx.redis.hgetall(k) for k in ctx.redis.keys(keys.metrics_sent_per_minute("*"))]
    assert sum(int(v) for h in per_minute for v in h.values()) == 3
