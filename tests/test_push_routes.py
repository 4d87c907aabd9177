"""A batch with iOS and Android pushes sends both routes at the same time (issue 20): APNs and FCM
requests in flight together, one network wait per batch instead of one per route, driven by the
batch's own thread (no route thread), and each route's outcomes as they would be alone (sent, dead
token removed)."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select
from sqlmodel import Session

from notifyctl.context import Context
from notifyctl.db import dispose_all
from notifyctl.directory import register_token
from notifyctl.models import DeviceToken
from sandboxes.apns import ApnsSandbox
from sandboxes.fcm import FcmSandbox
from tests.conftest import make_settings
from tests.util import ANDROID_TOKEN, IOS_TOKEN, deliveries, fcm_token, seed, send
from worker.pipeline import Runtime, _route_groups, process

KEY_ID, TEAM_ID, TOPIC = "ROUTESKEY1", "ROUTESTEAM", "com.example.app"
CAROL_IOS = "cd" * 32
DAVE_ANDROID = fcm_token("android-token-dave")
DELAY = 3.0  # each sandbox holds one answer this long (1.5 s was too short a window: a fresh clone's cold first FCM request once started after the held APNs answer had gone)


@pytest.fixture
def apns() -> Iterator[tuple[ApnsSandbox, str]]:
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )
    with ApnsSandbox({KEY_ID: pem}, topic=TOPIC, team_id=TEAM_ID) as sb:
        yield sb, pem


@pytest.fixture
def fcm() -> Iterator[FcmSandbox]:
    with FcmSandbox() as sb:
        yield sb  # type: ignore[misc]


@pytest.fixture
def push_ctx(
    apns: tuple[ApnsSandbox, str], fcm: FcmSandbox, home: Path, redis_url: str, rclient: redis.Redis, tmp_path: Path
) -> Iterator[Context]:
    sb, pem = apns
    options = {
        "apns": {"key": pem, "key_id": KEY_ID, "team_id": TEAM_ID, "topic": TOPIC, "base_url": sb.url,
                 "ca_file": str(sb.ca_file)},
        "fcm": {"service_account_file": str(fcm.write_service_account(tmp_path / "sa.json")), "base_url": fcm.url},
    }  # fmt: skip
    c = Context(make_settings(home, redis_url, rate_limits=[], provider_options=options,
                              providers_push_ios=["apns"], providers_push_android=["fcm"]))  # fmt: skip
    yield c
    c.close()
    dispose_all()


def test_a_mixed_batch_has_apns_and_fcm_requests_in_flight_at_once(
    push_ctx: Context, apns: tuple[ApnsSandbox, str], fcm: FcmSandbox
) -> None:
    sb = apns[0]
    seed(push_ctx)  # alice: IOS_TOKEN, bob: ANDROID_TOKEN
    register_token(push_ctx, "carol", CAROL_IOS, "ios")
    register_token(push_ctx, "dave", DAVE_ANDROID, "android")
    sb.unregistered.add(CAROL_IOS)  # APNs: 410 Unregistered
    fcm.unregistered.add(DAVE_ANDROID)  # FCM: 404 UNREGISTERED
    # one answer of each provider held DELAY seconds: sent one route after the other, the two held
    # answers could never be pending at the same moment
    sb.faults.add({"match": IOS_TOKEN, "delay": DELAY})
    fcm.faults.add({"match": ANDROID_TOKEN, "delay": DELAY})
    ids = {
        u: send(push_ctx, recipient_id=u, channels=["push"]).notification_id for u in ("alice", "bob", "carol", "dave")
    }

    both: list[float] = []
    done = threading.Event()

    def watch() -> None:  # when both providers hold a request of this batch at once
        while not done.is_set():
            if sb.held and fcm.active:
                both.append(time.monotonic())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rt = Runtime(push_ctx)
    try:
        stats = process(rt, list(ids.values()))
        route_threads = rt._route_pool
    finally:
        done.set()
        watcher.join(5)
        rt.close()

    assert both, "APNs and FCM never had a request of the batch in flight at the same time"
    assert route_threads is None  # both driven by the batch's own thread (h2mux.drive_together)
    assert sb.peak_held == 1 and fcm.peak_active >= 1
    # (no wall-clock bound: the overlap observed above is the proof; a loaded machine stretches time)
    assert (stats.sent, stats.failed) == (2, 2)

    got = {u: deliveries(push_ctx, nid) for u, nid in ids.items()}
    alice, bob, carol, dave = (got[u][0] for u in ("alice", "bob", "carol", "dave"))
    assert all(len(ds) == 1 for ds in got.values())
    assert (alice.route, alice.status, alice.provider, alice.attempts) == ("push.ios", "sent", "apns", 1)
    assert (bob.route, bob.status, bob.provider, bob.attempts) == ("push.android", "sent", "fcm", 1)
    [pushed] = sb.recorder.all()
    assert pushed["token"] == IOS_TOKEN and pushed["apns_id"] == alice.provider_message_id
    [message] = fcm.recorder.all()
    assert message["message"]["token"] == ANDROID_TOKEN and message["name"] == bob.provider_message_id
    assert (carol.status, carol.provider, carol.reason) == ("failed", "apns", "invalid_address: Unregistered")
    assert (dave.status, dave.provider) == ("failed", "fcm") and "UNREGISTERED" in (dave.reason or "")
    assert not carol.dead_lettered and not dave.dead_lettered
    with Session(push_ctx.engine) as s:
        removed = dict(s.execute(select(DeviceToken.token, DeviceToken.removed_reason)).all())
    assert removed[CAROL_IOS] == "apns: Unregistered" and removed[DAVE_ANDROID].startswith("fcm: ")
    assert removed[IOS_TOKEN] is None and removed[ANDROID_TOKEN] is None


def test_routes_that_share_a_provider_go_one_after_the_other(home: Path, redis_url: str) -> None:
    def groups(**routes: Any) -> list[list[str]]:
        s = make_settings(home, redis_url, **{"providers_" + r: v for r, v in routes.items()})
        return _route_groups(s, ["push.ios", "push.android", "email", "sms"])

    assert groups(push_ios=["apns"], push_android=["fcm"], email=["sendgrid"], sms=["twilio"]) == [
        ["push.ios"], ["push.android"], ["email"], ["sms"]
    ]  # fmt: skip
    # a fallback shared by two routes ties them (one provider is used by one thread at a time)
    assert groups(push_ios=["apns", "outbox"], push_android=["fcm", "outbox"], email=["sendgrid"], sms=["twilio"]) == [
        ["push.ios", "push.android"], ["email"], ["sms"]
    ]  # fmt: skip
    # the SMS route's voice fallback counts as one of its providers
    assert groups(push_ios=["apns"], push_android=["fcm"], email=["sendgrid"], sms=["sns"], voice=["sendgrid"]) == [
        ["push.ios"], ["push.android"], ["email", "sms"]
    ]  # fmt: skip
    assert groups(push_ios=["apns"], push_android=["fcm"], email=["sendgrid", "smtp"], sms=["twilio", "sendgrid"]) == [
        ["push.ios"], ["push.android"], ["email", "sms"]
    ]  # fmt: skip


def test_a_campaign_push_that_prints_no_user_value_is_each_recipients_text(ctx: Context) -> None:
    # weekly_promo's push prints `first_name | default(user.first_name | default('there'))`: with the
    # campaign's first_name in the data, every recipient of the batch gets the same text (one
    # rendering for all); without it, each gets their own name, or "there" when they have none
    from notifyctl.directory import import_users
    from worker.providers.outbox import read_outbox

    rep = import_users(ctx, io.StringIO("user_id,first_name\nann,Ann\nben,Ben\ncyd,\n"))
    assert rep.errors == []
    for i, u in enumerate(("ann", "ben", "cyd")):
        register_token(ctx, u, f"{i + 1:064x}", "ios")
    promo = {"discount": 10, "code": "WEEK10"}
    with_name = [send(ctx, recipient_id=u, template_id="weekly_promo", channels=["push"],
                      data={**promo, "first_name": "Friend"}).notification_id for u in ("ann", "ben", "cyd")]  # fmt: skip
    own_name = [send(ctx, recipient_id=u, template_id="weekly_promo", channels=["push"],
                     data=promo).notification_id for u in ("ann", "ben", "cyd")]  # fmt: skip
    rt = Runtime(ctx)
    try:
        assert process(rt, with_name).sent == 3
        assert process(rt, own_name).sent == 3
    finally:
        rt.close()
    bodies = {r["notification_id"]: r["content"] for r in read_outbox(ctx.settings.outbox_dir, "push.ios")}
    title = "10% off this week"
    assert [bodies[n] for n in with_name] == [{"title": title, "body": "Hi Friend, use WEEK10 for 10% off."}] * 3
    assert [bodies[n]["body"] for n in own_name] == [
        "Hi Ann, use WEEK10 for 10% off.",
        "Hi Ben, use WEEK10 for 10% off.",
        "Hi there, use WEEK10 for 10% off.",
    ]
