"""Small helpers shared by the tests (no fixtures here)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import threading
import time
from typing import Any

from rq import Worker
from sqlalchemy import select
from sqlmodel import Session

from notifyctl.context import Context
from notifyctl.directory import import_users, register_token
from notifyctl.intake import SubmitResult, parse_request, submit
from notifyctl.models import Delivery, DeliveryEvent, Notification
from notifyctl.settings import Settings
from notifyctl.tracking import implied_events, implied_marks
from worker.pool import run_worker
from worker.reconciler import reconcile as reconcile_round

USERS = """user_id,email,phone,timezone,locale,sms_opt_in,first_name
alice,alice@example.com,+14155550101,America/Los_Angeles,en,true,Alice
bob,bob@example.com,+447911123456,Europe/London,en,,Bob
carol,carol@example.com,+33612345678,Europe/Paris,fr,no,Carol
dave,,+919876543210,Asia/Kolkata,en,false,Dave
"""

IOS_TOKEN = "ab" * 32


def fcm_token(name: str) -> str:
    """A made-up FCM registration token shaped like a real one (``<instance id>:APA91b...``, ~150
    characters of ``[A-Za-z0-9_:-]``), distinct per ``name``."""
    h = hashlib.sha256(name.encode()).hexdigest()
    return f"{name}:APA91b{h}{h[:70]}"


ANDROID_TOKEN = fcm_token("android-token-bob")


def pixel_token(key: bytes, delivery_id: str) -> str:
    """An open-pixel token as the format says, computed here and not by ``notifyctl.inbound``:
    ``base64url(delivery id) "." base64url(HMAC-SHA256(key, "open" NUL delivery id), first 16 bytes)``,
    base64url without padding."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    mac = hmac.new(key, b"open\x00" + delivery_id.encode(), hashlib.sha256).digest()[:16]
    return f"{b64(delivery_id.encode())}.{b64(mac)}"


def seed(ctx: Context) -> None:
    rep = import_users(ctx, io.StringIO(USERS))
    assert rep.errors == [] and rep.imported == 4
    register_token(ctx, "alice", IOS_TOKEN, "ios")
    register_token(ctx, "bob", ANDROID_TOKEN, "android")


def send(ctx: Context, **payload: Any) -> SubmitResult:
    payload.setdefault("recipient_id", "alice")
    payload.setdefault("template_id", "order_shipped_v2")
    if payload["template_id"] == "order_shipped_v2":
        payload.setdefault("data", {"order_id": "ORD-1", "tracking_url": "https://t.example/1"})
    return submit(ctx, parse_request(payload))


def deliveries(ctx: Context, notification_id: str | None = None) -> list[Delivery]:
    with Session(ctx.engine) as s:
        q = select(Delivery).order_by(Delivery.queued_at, Delivery.id)
        if notification_id:
            q = q.where(Delivery.notification_id == notification_id)
        return list(s.execute(q).scalars())


def notification(ctx: Context, nid: str) -> Notification:
    with Session(ctx.engine) as s:
        n = s.get(Notification, nid)
        assert n is not None
        return n


def events(ctx: Context, nid: str) -> list[tuple[str | None, str]]:
    """A notification's timeline as (delivery id, status): its stored events and the ``queued``
    events their deliveries imply (``notifyctl.tracking.implied_events``), as ``notifyctl events`` shows them."""
    with Session(ctx.engine) as s:
        rows = s.execute(
            select(DeliveryEvent).where(DeliveryEvent.notification_id == nid).order_by(DeliveryEvent.id)
        ).scalars()
        ds = s.execute(select(Delivery).where(Delivery.notification_id == nid)).scalars().all()
        marks = implied_marks(ds)
        return [(e["delivery_id"], e["status"]) for e in implied_events([e.model_dump() for e in rows], *marks)]


def count_notifications(ctx: Context) -> int:
    with Session(ctx.engine) as s:
        return len(list(s.execute(select(Notification.id)).all()))


def queue_depths(ctx: Context) -> dict[str, int]:
    return {p: ctx.redis.llen(ctx.queue(p).key) for p in ("high", "normal", "low")}


class ApiServer:
    """``create_app(ctx)`` served by a real uvicorn on 127.0.0.1:<ephemeral port>, in a thread."""

    def __init__(self, ctx: Context, **app_kwargs: Any) -> None:
        import uvicorn

        from notifyctl.api.app import create_app
        from notifyctl.api.limits import UVICORN_OPTIONS

        self.app = create_app(ctx, **app_kwargs)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=0, log_level="critical", lifespan="off", **UVICORN_OPTIONS
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.url = ""

    def __enter__(self) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def drain(target: Context | Settings, *, reconcile: bool = False, due_by: float | None = None) -> None:
    """Waits on the queues: one burst worker in this process takes every job on high, normal and low
    until all three are empty (with ``reconcile``, its reconciler runs too and may queue more).

    With ``due_by`` (a time, ``target`` a Context): everything due by then goes too — rounds of a
    forced reconcile at that time (retries, scheduled sends) and a burst worker, until a round
    queues nothing (ten at most)."""
    settings = target.settings if isinstance(target, Context) else target
    shards = range(len(settings.redis_shards) or 1)  # (with Redis shards: each one's queues in turn)
    if due_by is None:
        for shard in shards:
            run_worker(settings, ["high", "normal", "low"], burst=True, reconcile=reconcile, shard=shard)
        return
    assert isinstance(target, Context)
    for _ in range(10):
        res = reconcile_round(target, now=due_by, force=True, limit=100_000)
        for shard in shards:
            run_worker(settings, ["high", "normal", "low"], burst=True, reconcile=False, shard=shard)
        if not res.retries_queued and not res.recovered:
            return


def idle_workers(ctx: Context) -> int:
    """How many rq workers registered in ``ctx``'s Redis are idle (listening on their queues)."""
    return len([w for w in Worker.all(connection=ctx.redis) if w.state == "idle"])


def wait_for(pred, timeout: float, step: float = 0.05):  # type: ignore[no-untyped-def]
    """``pred()``'s first true value within ``timeout`` seconds, polled every ``step``; None if none."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return None
