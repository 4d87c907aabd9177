"""``notifyctl demo``: the whole pipeline on embedded defaults, in one command."""

from __future__ import annotations

import io
import shutil
import time

from rich.table import Table

from notifyctl import keys
from notifyctl.cli.common import console, short
from notifyctl.context import Context
from notifyctl.db import dispose_all
from notifyctl.directory import import_users, register_token, set_prefs
from notifyctl.errors import InputError
from notifyctl.home import private_dir, write_private
from notifyctl.intake import parse_request, submit
from notifyctl.shards import split
from notifyctl.tracking import recent_deliveries

# Lazy imports: a CLI noun imports its work when it runs, so that `notifyctl --help` loads only what
# the root needs (no worker, campaigns, API or phone-number modules).

MARKER = ".notifyctl-demo"

USERS_CSV = """user_id,email,phone,timezone,locale,first_name
demo-alice,alice@example.com,+14155550101,America/Los_Angeles,en,Alice
demo-bob,bob@example.com,+447911123456,Europe/London,en,Bob
demo-carol,carol@example.com,+33612345678,Europe/Paris,fr,Carol
demo-dave,,+919876543210,Asia/Kolkata,en,Dave
"""


def _reset_home(ctx: Context) -> None:
    from notifyctl.redisconn import stop_server

    home = ctx.settings.home
    if (home / "notify.db").exists() and not (home / MARKER).exists():
        raise InputError(f"demo: {home} holds data that is not the demo's; run `notifyctl --home DIR demo` instead")
    if ctx.settings.redis_url is None:
        stop_server(home / "redis")
    dispose_all()
    if (home / MARKER).exists():
        shutil.rmtree(home)
    private_dir(home)
    write_private(home / MARKER, b"this directory belongs to `notifyctl demo` and is reset by it\n")


def run_demo(ctx: Context, keep: bool = False) -> None:
    from worker.pool import run_worker

    if not keep:
        _reset_home(ctx)
        ctx = Context(ctx.settings)
    settings = ctx.settings
    run = str(int(time.time()))
    demo_users = ["demo-alice", "demo-bob", "demo-carol", "demo-dave"]
    # With an external Redis, clear the demo users' rate windows left by an earlier run (each on its shard).
    for shard, users in split(demo_users, str, ctx.shard_count).items():
        ctx.shard_redis(shard).delete(*[keys.rate(u, rule.key) for u in users for rule in settings.rules])

    console.rule("1. users, devices, preferences")
    report = import_users(ctx, io.StringIO(USERS_CSV))
    console.print(f"imported {report.imported} users (phones normalised to E.164)")
    register_token(ctx, "demo-alice", "a1" * 32, "ios")
    register_token(  # a made-up FCM registration token, shaped like a real one
        ctx,
        "demo-bob",
        "eDemoBob0001:APA91bcfdd601be826835d6a59c993254eb5786da08ee32379b680795ebe708f0060f9"
        "cfdd601be826835d6a59c993254eb5786da08ee32379b680795ebe708f0060f9",
        "android",
    )
    set_prefs(ctx, "demo-bob", off=["marketing"], on=[])
    console.print("alice: iOS device · bob: Android device, opted out of marketing · dave: SMS only")

    console.rule("2. notifyctl send")
    requests = [
        (
            "order shipped to alice (all channels)",
            {
                "recipient_id": "demo-alice",
                "template_id": "order_shipped_v2",
                "channels": ["all"],
                "data": {"order_id": "ORD-456", "tracking_url": "https://track.example.com/ORD-456"},
                "dedup_key": f"order_shipped:ORD-456:{run}",
            },
        ),
        (
            "the same again (same dedup_key)",
            {
                "recipient_id": "demo-alice",
                "template_id": "order_shipped_v2",
                "channels": ["all"],
                "data": {"order_id": "ORD-456", "tracking_url": "https://track.example.com/ORD-456"},
                "dedup_key": f"order_shipped:ORD-456:{run}",
            },
        ),
        (
            "weekly promo to bob (opted out of marketing)",
            {
                "recipient_id": "demo-bob",
                "template_id": "weekly_promo",
                "channels": ["push", "email"],
                "data": {"first_name": "Bob", "discount": 20, "code": "WEEK20"},
            },
        ),
        (
            "weekly promo to carol by email",
            {
                "recipient_id": "demo-carol",
                "template_id": "weekly_promo",
                "channels": ["email"],
                "data": {"first_name": "Carol", "discount": 20, "code": "WEEK20"},
                "dedup_key": f"promo:w1:carol:{run}",
            },
        ),
        (
            "a second promo email to carol the same day (limit 1/day)",
            {
                "recipient_id": "demo-carol",
                "template_id": "weekly_promo",
                "channels": ["email"],
                "data": {"first_name": "Carol", "discount": 30, "code": "FLASH30"},
                "dedup_key": f"promo:flash:carol:{run}",
            },
        ),
        (
            "OTP to dave by SMS, priority high",
            {
                "recipient_id": "demo-dave",
                "template_id": "otp_code",
                "channels": ["sms"],
                "priority": "high",
                "data": {"code": "482913", "minutes": 10},
                "dedup_key": f"otp:dave:{run}",
            },
        ),
        (
            "security alert to alice (push + email)",
            {
                "recipient_id": "demo-alice",
                "template_id": "security_alert",
                "channels": ["push", "email"],
                "data": {"event": "New sign-in", "device": "Firefox on Linux", "location": "Lisbon, PT"},
            },
        ),
    ]
    sent_table = Table(title="send results")
    for col in ("what", "notification", "result"):
        sent_table.add_column(col)
    first_id = None
    for what, payload in requests:
        res = submit(ctx, parse_request(payload))
        first_id = first_id or res.notification_id
        sent_table.add_row(
            what, res.notification_id, "queued" if res.status == "queued" else f"suppressed: {res.reason}"
        )
    console.print(sent_table)

    console.rule("3. notifyctl worker --burst")
    t0 = time.perf_counter()
    for shard in range(ctx.shard_count):
        run_worker(settings, ["high", "normal", "low"], burst=True, reconcile=True, shard=shard)
    console.print(f"workers drained the queues in {time.perf_counter() - t0:.2f}s")

    console.rule("4. deliveries")
    table = Table(title="Delivery tracking (newest first)")
    for col in ("notification", "template", "prio", "channel", "route", "to", "status", "reason / provider id"):
        table.add_column(col)
    for d in recent_deliveries(ctx, 50):
        style = {"sent": "green", "suppressed": "yellow", "failed": "red"}.get(d["status"], "")
        table.add_row(
            d["notification_id"],
            d["template_id"],
            d["priority"],
            d["channel"],
            d["route"],
            short(d["address"], 22),
            f"[{style}]{d['status']}[/{style}]" if style else d["status"],
            short(d["reason"] or d["provider_message_id"], 44),
        )
    console.print(table)
    console.print(f"Rendered messages are in {settings.outbox_dir}/ (one JSON line each).")
    console.print(f"Try: notifyctl --home {settings.home} events {first_id}")
    console.print(f"     notifyctl --home {settings.home} status")
