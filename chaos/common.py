"""One module: the world a fault runs in and the tally of what it sent are read together by every
scenario (its processes, sandboxes and counts), with ``Result`` and ``run_each``; ~430 lines.

Chaos plumbing: a world per scenario (private redis-server with AOF, SQLite in a temp home, the
SendGrid and Twilio sandboxes on real sockets, a worker pool subprocess), and the sandbox-side
tally: what the providers accepted, counted by our delivery id.

Email goes to the SendGrid sandbox (each accepted personalization records our
``custom_args.delivery_id``); SMS goes to the Twilio sandbox with a status callback URL, to which
the provider appends ``delivery_id`` (recorded as ``status_callback``). So every accepted message
names the delivery it belongs to, and duplicates are counted exactly.

``Result`` is what a fault came to; ``run_each`` is the loop every entry point (``chaos.run``,
``chaos.multihost``, ``chaos.sentinel``) runs its faults in.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlparse

import psutil
from sqlalchemy import func, insert, select
from sqlmodel import col

from bench.common import wait_until
from notifyctl import keys
from notifyctl.context import Context
from notifyctl.db import dispose_all
from notifyctl.models import Delivery, Notification, User, new_id, utcnow
from notifyctl.redisconn import ensure_server, stop_server
from notifyctl.settings import load_settings
from sandboxes.base import FaultPlan, Recorder
from sandboxes.sendgrid import SendgridSandbox
from sandboxes.twilio import TwilioSandbox

ROOT = Path(__file__).resolve().parent.parent
PROMO = {"discount": 10, "code": "WEEK10", "first_name": "F"}
TWILIO_FROM = "+15005550006"
CALLBACK = "http://127.0.0.1:9/twilio-status"  # never called: the sandbox only records it


_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def expected_delivery_id(notification_id: str, channel: str, address: str) -> str:
    """The id a delivery must get, computed here from the format (``models.derived_id``), not by the
    pipeline's own function: ``d_``, the notification id's 20 time-ordered characters, then the 40-bit
    BLAKE2b digest of ``channel NUL address`` as 8 Crockford base32 characters."""
    import hashlib

    assert len(notification_id) == 22 and notification_id.startswith("n_"), notification_id
    h = int.from_bytes(hashlib.blake2b(f"{channel}\x00{address}".encode(), digest_size=5).digest(), "big")
    tail = "".join(_CROCKFORD[(h >> shift) & 31] for shift in range(35, -1, -5))
    return f"d_{notification_id[2:]}{tail}"


class StampedRecorder(Recorder):
    """A Recorder that keeps only what the tally needs: our delivery id and when it was accepted."""

    def add(self, item: dict[str, Any]) -> None:
        did = (item.get("custom_args") or {}).get("delivery_id")
        if not did and item.get("status_callback"):
            did = parse_qs(urlparse(item["status_callback"]).query).get("delivery_id", [None])[0]
        super().add({"delivery_id": did, "to": item.get("to"), "t": time.time()})


class RateLimitPlan(FaultPlan):
    """A provider that allows ``rate`` requests/s (token bucket, burst ``burst``) and answers 429 with
    ``Retry-After`` beyond. Counts what it allowed and refused, when it refused (``refused_at``,
    epoch s) and the allowance nobody used: what the full bucket could not hold (``unused``: epoch s
    of the request that found it so, requests' worth)."""

    def __init__(self, rate: float, burst: int, retry_after: int) -> None:
        super().__init__()
        self.rate, self.burst, self.retry_after = rate, burst, retry_after
        self.tokens = float(burst)
        self.last = time.monotonic()
        self.allowed = 0
        self.refused = 0
        self.refused_at: list[float] = []
        self.unused: list[tuple[float, float]] = []
        self.active = True

    def unused_between(self, t0: float, t1: float) -> float:
        """Seconds of the allowance nobody used from ``t0`` to ``t1`` (epoch s): the requests the
        provider would have taken while none came (its bucket full), over its rate."""
        return sum(n for t, n in self.unused if t0 < t <= t1) / self.rate

    def take(self, text: str = "", where: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any] | None:
        with self._lock:
            if not self.active or text.startswith("/_sandbox"):
                return None
            now = time.monotonic()
            refilled = self.tokens + (now - self.last) * self.rate
            if refilled > self.burst:
                self.unused.append((time.time(), refilled - self.burst))
            self.tokens = min(self.burst, refilled)
            self.last = now
            if self.tokens >= 1:
                self.tokens -= 1
                self.allowed += 1
                return None
            self.refused += 1
            self.refused_at.append(time.time())
            return {
                "status": 429,
                "headers": {"Retry-After": str(self.retry_after)},
                "body": {"errors": [{"message": "too many requests", "field": None, "help": None}]},
            }


@dataclass
class Tally:
    expected: int
    sent: int
    lost: int
    duplicated: int
    unexpected: int
    lost_ids: list[str] = field(default_factory=list)
    dup_ids: list[str] = field(default_factory=list)


def tally(expected: set[str], accepted: list[str | None]) -> Tally:
    """lost = expected deliveries never accepted; duplicated = extra acceptances of one delivery."""
    counts = Counter(a for a in accepted if a)
    got = expected & set(counts)
    lost = sorted(expected - got)
    dups = {k: v for k, v in counts.items() if v > 1}
    return Tally(
        expected=len(expected),
        sent=len(got),
        lost=len(lost),
        duplicated=sum(v - 1 for v in dups.values()),
        unexpected=sum(v for k, v in counts.items() if k not in expected),
        lost_ids=lost[:5],
        dup_ids=sorted(dups)[:5],
    )


class World:
    """One scenario's private universe. ``overrides`` are Settings fields (also passed to the pool as
    ``NOTIFY_*``); ``extra_env`` are further variables for subprocesses (provider configs)."""

    def __init__(
        self,
        name: str,
        overrides: dict[str, Any] | None = None,
        extra_env: dict[str, str] | None = None,
        redis_url: str | None = None,
    ):
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"notify-chaos-{name}-"))
        self.redis_dir = self.dir / "redis"
        # an external Redis (a Sentinel URL: chaos/sentinel.py), else a private redis-server with AOF
        self.own_redis = redis_url is None
        self.redis_url = redis_url or ensure_server(self.redis_dir)
        self.sg = SendgridSandbox()
        self.sg.recorder = StampedRecorder()
        self.sg.start()
        self.tw = TwilioSandbox()
        self.tw.recorder = StampedRecorder()
        self.tw.start()
        self.overrides: dict[str, Any] = {
            "providers_email": ["sendgrid"],
            "providers_sms": ["twilio"],
            "batch_size": 100,
            "worker_alive_ttl": 3,
            "claim_ttl": 5,  # the lease: above the longest provider call here (2 s timeouts)
            "worker_heartbeat": 1,
            "recovery_grace": 2,
            "provider_options": {
                "sendgrid": {"api_key": self.sg.api_key, "base_url": self.sg.url,
                             **(overrides or {}).pop("sendgrid_options", {})},
                "twilio": {"account_sid": self.tw.account_sid, "auth_token": self.tw.auth_token,
                           "from_number": TWILIO_FROM, "base_url": self.tw.url, "status_callback_url": CALLBACK},
            },
        }  # fmt: skip
        self.overrides.update(overrides or {})
        self.extra_env = dict(extra_env or {})
        self.settings = load_settings(  # the harness's own environment only, not the machine's NOTIFY_*
            self.extra_env, home=self.dir / "home", redis_url=self.redis_url, **self.overrides
        )
        self.ctx = Context(self.settings)
        self.pool: subprocess.Popen[bytes] | None = None
        self.pool_log = self.dir / "pool.log"

    # ------------------------------------------------------------------ processes

    def env(self, **extra: str) -> dict[str, str]:
        e = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
        e["NOTIFY_HOME"] = str(self.settings.home)
        e["NOTIFY_REDIS_URL"] = self.redis_url
        for k, v in self.overrides.items():
            e[f"NOTIFY_{k.upper()}"] = v if isinstance(v, str) else json.dumps(v)
        e.update(self.extra_env)
        e.update(extra)
        return e

    def start_pool(self, size: int) -> subprocess.Popen[bytes]:
        log = open(self.pool_log, "ab")  # noqa: SIM115 - the child owns it
        self.pool = subprocess.Popen(
            [sys.executable, "-m", "notifyctl.cli.main", "worker", "--pool", str(size)],
            env=self.env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        log.close()
        if not wait_until(lambda: len(self.worker_pids()) >= size and self.alive_workers() >= size, 120, 0.1):
            raise RuntimeError(f"worker pool did not start; see {self.pool_log}:\n{self.pool_tail()}")
        return self.pool

    def worker_pids(self) -> list[int]:
        if self.pool is None or self.pool.poll() is not None:
            return []
        try:
            return [c.pid for c in psutil.Process(self.pool.pid).children() if c.status() != psutil.STATUS_ZOMBIE]
        except psutil.Error:
            return []

    def alive_workers(self) -> int:
        return sum(1 for _ in self.ctx.redis.scan_iter(keys.alive("*")))

    def pool_alive(self) -> bool:
        return self.pool is not None and self.pool.poll() is None

    def pool_tail(self, n: int = 3000) -> str:
        try:
            return self.pool_log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop_pool(self) -> int | None:
        if self.pool is None:
            return None
        if self.pool.poll() is None:
            self.pool.send_signal(signal.SIGTERM)
            try:
                self.pool.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.pool.kill()
                self.pool.wait()
        return self.pool.returncode

    def redis_pid(self) -> int:
        return int((self.redis_dir / "redis.pid").read_text().strip())

    def close(self) -> None:
        self.stop_pool()
        for sb in (self.sg, self.tw):
            try:
                sb.stop()
            except Exception:  # noqa: BLE001,S110 - best effort at teardown
                pass
        try:
            self.ctx.close()
        except Exception:  # noqa: BLE001,S110
            pass
        dispose_all()
        try:
            if self.own_redis:
                stop_server(self.redis_dir)
        except Exception:  # noqa: BLE001,S110
            pass
        if not os.environ.get("NOTIFY_CHAOS_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ data

    def users(self, n: int, prefix: str = "u", phones: bool = False, phone_prefix: str = "+1415") -> list[str]:
        ids = [f"{prefix}{i:07d}" for i in range(n)]
        now = utcnow()
        with self.ctx.engine.begin() as conn:
            for i in range(0, n, 5000):
                conn.execute(
                    insert(User),
                    [
                        {"id": uid, "email": None if phones else f"{uid}@example.com",
                         "phone": f"{phone_prefix}{i + j:07d}" if phones else None, "timezone": "UTC", "locale": "en",
                         "sms_opt_in": False, "attributes": {"first_name": uid}, "created_at": now, "updated_at": now}
                        for j, uid in enumerate(ids[i : i + 5000])
                    ],
                )  # fmt: skip
        return ids

    def campaign_rows(
        self, user_ids: list[str], rate: float, start_in: float = 0.0, personal: bool = False
    ) -> dict[str, str]:
        """Write a campaign as the launcher does (status scheduled), due at ``rate``/s from now + ``start_in``.
        ``personal``: a first name per recipient, so that no two bodies are alike (SendGrid still sends
        a batch of them as one request, unless the world's ``max_personalizations`` is 1).
        Returns delivery id -> notification id."""
        t0 = utcnow() + timedelta(seconds=start_in)
        cid = new_id("c")
        expected: dict[str, str] = {}
        with self.ctx.engine.begin() as conn:
            for i in range(0, len(user_ids), 5000):
                rows = []
                for j, uid in enumerate(user_ids[i : i + 5000]):
                    nid = new_id("n")
                    due = t0 + timedelta(seconds=(i + j) / rate)
                    expected[expected_delivery_id(nid, "email", f"{uid}@example.com")] = nid
                    rows.append({"id": nid, "recipient_id": uid, "type": "weekly_promo", "template_id": "weekly_promo",
                                 "category": "marketing", "priority": "low", "channels": ["email"],
                                 "data": {**PROMO, "first_name": uid} if personal else PROMO,
                                 "dedup_key": f"campaign:{cid}:{uid}", "campaign_id": cid, "status": "scheduled",
                                 "due_at": due, "created_at": t0, "updated_at": t0})  # fmt: skip
                conn.execute(insert(Notification), rows)
        return expected

    def expected_for(self, nids: list[str], channel: str = "email") -> set[str]:
        """Expected delivery ids of notifications, from the users' addresses (not from Delivery rows)."""
        with self.ctx.engine.connect() as conn:
            rows = conn.execute(
                select(col(Notification.id), col(User.email), col(User.phone))
                .join(User, col(User.id) == col(Notification.recipient_id))
                .where(col(Notification.id).in_(nids))
            ).all()  # fmt: skip
        return {
            expected_delivery_id(nid, channel, (email if channel == "email" else phone) or "")
            for nid, email, phone in rows
        }

    def accepted(self) -> list[dict[str, Any]]:
        return self.sg.recorder.all() + self.tw.recorder.all()

    def accepted_ids(self) -> list[str | None]:
        return [m["delivery_id"] for m in self.accepted()]

    def dead_lettered(self) -> int:
        with self.ctx.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(Delivery).where(col(Delivery.dead_lettered).is_(True))
                ).scalar_one()
            )

    def queues_empty(self) -> bool:
        return all(len(self.ctx.queue(p)) == 0 for p in ("high", "normal", "low"))


def drain(world: World, expected: set[str], timeout: float, settle: float = 2.0) -> bool:
    """Wait until every expected delivery was accepted by a sandbox (then ``settle`` s more, so late
    duplicates are seen too)."""
    ok = wait_until(lambda: expected <= set(world.accepted_ids()), timeout, 0.25)
    time.sleep(settle)
    return ok


class Ticker:
    """Run ``fn`` every ``every`` seconds in a thread until stopped."""

    def __init__(self, every: float, fn: Any) -> None:
        self.every, self.fn = every, fn
        self.stop_event = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop_event.wait(self.every):
            try:
                self.fn()
            except Exception as exc:  # noqa: BLE001 - reported in the notes
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def start(self) -> Ticker:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)


@dataclass
class Result:
    """What one fault came to: the providers' tally by delivery id (sent, lost, duplicated), notes,
    problems (anything that must not happen) and figures."""

    fault: str
    sent: int = 0
    lost: int = 0
    duplicated: int = 0
    expected: int = 0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # findings: anything that must not happen
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        """One line: how the fault ended."""
        line = (
            f"{self.fault}: {'ok' if self.ok else 'FAILED'} in {self.seconds}s: sent {self.sent}/{self.expected}, "
            f"lost {self.lost}, duplicated {self.duplicated}"
        )
        if "resent_in_doubt" in self.figures:
            line += f", resent in doubt {self.figures['resent_in_doubt']}"
        return line


R = TypeVar("R", bound=Result)


def run_each(label: str, names: Iterable[str], run: Callable[[str], R], crashed: Callable[[str], R]) -> list[R]:
    """Run the scenarios ``names`` one after the other, each by ``run(name)``, saying on stderr what
    runs and how it ended (``label: name ...``, then sent, lost, duplicated). A scenario that raises
    is a result, not a stop: ``crashed(name)`` with the exception as its problem and the traceback
    in its figures. Each result gets its ``seconds``."""
    results = []
    for name in names:
        print(f"{label}: {name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            r = run(name)
        except Exception as exc:  # noqa: BLE001 - a crashed scenario is a result, not a stop
            r = crashed(name)
            r.problems.append(f"scenario crashed: {type(exc).__name__}: {exc}")
            r.figures["traceback"] = traceback.format_exc()[-2000:]
        r.seconds = round(time.monotonic() - t0, 1)
        print("  " + r.summary(), file=sys.stderr, flush=True)
        results.append(r)
    return results
