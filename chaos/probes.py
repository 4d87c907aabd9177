"""Probes that run beside a chaos scenario while its fault is on: a stream of OTPs submitted through
intake (``OtpStream``: their latencies, the ones accepted while Redis was down) and the trace of
one abandoned OTP after its worker was killed (``ResumeTrace``)."""

from __future__ import annotations

import threading
import time
from typing import Any, Self

from sqlalchemy import select
from sqlmodel import col

from chaos.common import World, expected_delivery_id
from notifyctl import keys
from notifyctl.intake import parse_request, submit
from notifyctl.models import Notification, User
from worker.claims import holder as lease_holder


class OtpStream:
    """Submits OTPs (priority high, SMS) through intake every ``every`` s until stopped."""

    def __init__(self, world: World, users: list[str], every: float) -> None:
        self.world, self.users, self.every = world, users, every
        self.sent: dict[str, tuple[str, float]] = {}  # delivery id -> (notification id, submitted at)
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        with world.ctx.engine.connect() as conn:
            rows = conn.execute(select(col(User.id), col(User.phone)).where(col(User.id).in_(users))).all()
            self.phones: dict[str, Any] = {uid: phone for uid, phone in rows}

    def one(self, uid: str, code: str) -> tuple[str, str]:
        req = parse_request({"recipient_id": uid, "template_id": "otp_code", "channels": ["sms"],
                             "data": {"code": code, "minutes": 5}})  # fmt: skip
        r = submit(self.world.ctx, req)
        did = expected_delivery_id(r.notification_id, "sms", self.phones[uid])
        self.sent[did] = (r.notification_id, time.time())
        return r.notification_id, did

    def _run(self) -> None:
        for i, uid in enumerate(self.users):
            if self._stop.wait(self.every):
                return
            try:
                self.one(uid, f"{i:06d}")
            except Exception:  # noqa: BLE001 - counted (e.g. Redis down: not accepted)
                self.errors += 1

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def latencies(self, world: World) -> list[float]:
        first: dict[str, float] = {}
        for m in world.tw.recorder.all():
            first.setdefault(m["delivery_id"], m["t"])
        return sorted(first[d] - t for d, (_n, t) in self.sent.items() if d in first)


class ResumeTrace:
    """What became of one abandoned OTP after its worker was killed, polled every 0.1 s: when the
    worker's liveness key went, when its lease ran out (and on whose clock), each requeue by the
    reconciler, each job state, the first send. Seconds after the kill, for RESULTS.md."""

    def __init__(self, world: World, worker: str, nid: str, did: str, killed_at: float) -> None:
        self.world, self.worker, self.nid, self.did, self.t0 = world, worker, nid, did, killed_at
        self.events: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _note(self, what: str) -> None:
        self.events.append((round(time.time() - self.t0, 1), what))

    def _run(self) -> None:
        r = self.world.ctx.redis
        seen: dict[str, Any] = {}
        deadline = time.time() + 180
        while not self._stop.wait(0.1) and time.time() < deadline:
            try:
                alive, lease = r.exists(keys.alive(self.worker)), r.get(keys.sent(self.did))
                with self.world.ctx.engine.connect() as conn:
                    row = conn.execute(
                        select(col(Notification.status), col(Notification.job_id)).where(
                            col(Notification.id) == self.nid
                        )
                    ).one()
                job = row.job_id
                js = r.hget(keys.rq_job(job), "status") if job else None
            except Exception:  # noqa: BLE001 - a trace, best effort
                continue
            record = lease.decode() if isinstance(lease, bytes) else lease or ""
            held = lease_holder(r, self.did) if record.startswith("lease:") else None
            if not alive and seen.get("alive", True):
                self._note("liveness key gone")
            seen["alive"] = bool(alive)
            holder = held[0] if held else record[:5]
            if holder != seen.get("holder"):
                if held:
                    exp = held[1] - self.t0
                    self._note(f"lease {'of the killed worker' if holder == self.worker else 'taken by ' + holder}"
                               f" (expires at +{exp:.1f})")  # fmt: skip
                else:
                    self._note(f"send record {record[:5] or 'gone'}")
                seen["holder"] = holder
            state = (row.status, job, js.decode() if isinstance(js, bytes) else js)
            if state != seen.get("state"):
                prev = seen.get("state")
                if prev and prev[1] != job:
                    self._note(f"requeued as {job}" if job else "job cleared: due again later")
                self._note(f"notification {row.status}, job {state[2]}")
                seen["state"] = state
            if any(m["delivery_id"] == self.did for m in self.world.tw.recorder.all()):
                self._note("sent")
                return

    def stop(self) -> list[tuple[float, str]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.events
