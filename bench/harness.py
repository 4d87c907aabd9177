"""Bench helpers on top of bench.common: settings for worker subprocesses, bulk device tokens and
phone users, waiting for workers, counting tracked rows, Redis command statistics, SQL statement
counts, the pipeline run in this process over batches."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections import Counter
from cProfile import Profile
from typing import Any

from sqlalchemy import event, func, insert, select, update
from sqlmodel import col

from bench.common import Env
from notifyctl import keys
from notifyctl.intake import parse_request, submit
from notifyctl.metrics import DELIVERIES
from notifyctl.models import Delivery, DeviceToken, Notification, User, utcnow
from worker.pipeline import process


def settings_env(overrides: dict[str, Any]) -> dict[str, str]:
    """The same overrides as ``NOTIFY_*`` variables, for a worker pool subprocess."""
    return {f"NOTIFY_{k.upper()}": v if isinstance(v, str) else json.dumps(v) for k, v in overrides.items()}


def phone_users(env: Env, n: int, prefix: str = "otp") -> list[str]:
    ids = [f"{prefix}{i:07d}" for i in range(n)]
    now = utcnow()
    if ids:
        with env.ctx.engine.begin() as conn:
            conn.execute(
                insert(User),
                [
                    {"id": uid, "email": None, "phone": f"+1415{i:07d}", "timezone": "UTC", "locale": "en",
                     "sms_opt_in": False, "attributes": {"first_name": uid}, "created_at": now, "updated_at": now}
                    for i, uid in enumerate(ids)
                ],
            )  # fmt: skip
    return ids


def ios_token(i: int) -> str:
    return f"{i + 1:064x}"  # never all zeros: the APNs sandbox's token that no device has


def android_token(i: int) -> str:
    """Shaped like an FCM registration token (``<instance id>:APA91b...``)."""
    return f"i{i:010d}:APA91b{i:0140x}"


def bulk_ios_tokens(env: Env, user_ids: list[str], chunk: int = 5000, platforms: list[str] | None = None) -> list[str]:
    """One device token per user: iOS, or per ``platforms[i]`` (``ios`` / ``android``)."""
    plats = platforms or ["ios"] * len(user_ids)
    tokens = [ios_token(i) if p == "ios" else android_token(i) for i, p in enumerate(plats)]
    now = utcnow()
    with env.ctx.engine.begin() as conn:
        for i in range(0, len(user_ids), chunk):
            conn.execute(
                insert(DeviceToken),
                [
                    {"token": t, "user_id": u, "platform": p, "created_at": now}
                    for t, u, p in zip(
                        tokens[i : i + chunk], user_ids[i : i + chunk], plats[i : i + chunk], strict=True
                    )
                ],
            )
    return tokens


def count_sent(env: Env, channel: str | None = None) -> int:
    q = select(func.count()).select_from(Delivery).where(col(Delivery.status) == "sent")
    if channel:
        q = q.where(col(Delivery.channel) == channel)
    with env.ctx.engine.connect() as conn:
        return int(conn.execute(q).scalar_one())


def sent_counter(env: Env, channel: str) -> int:
    """Deliveries the workers have counted as sent on ``channel`` (the Prometheus counter in Redis).
    A worker adds to it after its SQL commit, so when it reads n, n rows are tracked in SQL: a cheap
    progress probe for a run, confirmed by one SQL count at the end."""
    prefix = f"sent|{channel}|".encode()
    counts: dict[Any, Any] = env.ctx.redis.hgetall(DELIVERIES)
    return sum(int(v) for k, v in counts.items() if k.startswith(prefix))


def wait_sent(env: Env, channel: str, n: int, t0: float, timeout: float, what: str) -> str | None:
    """Poll :func:`sent_counter` until ``n`` are sent on ``channel``: None, or the one-line error of a
    run that stalled (no progress for 60 s) or ran past ``timeout`` seconds after ``t0``."""
    last, last_t = -1, time.perf_counter()
    while True:
        sent = sent_counter(env, channel)
        now = time.perf_counter()
        if sent >= n:
            return None
        if sent != last:
            last, last_t = sent, now
        elif now - last_t > 60:
            return f"stalled at {sent}/{n} sent {what}"
        if now - t0 > timeout:
            return f"timeout at {sent}/{n} sent {what}"
        time.sleep(0.05)


def wait_workers(env: Env, n: int, timeout: float = 60) -> float:
    """Seconds until ``n`` workers have announced themselves alive."""
    t0 = time.perf_counter()
    deadline = t0 + timeout
    pattern = keys.alive("*")
    while time.perf_counter() < deadline:
        if len(list(env.ctx.redis.scan_iter(pattern))) >= n:
            return time.perf_counter() - t0
        time.sleep(0.05)
    raise RuntimeError(f"{n} workers did not start within {timeout:g}s")


def commandstats(env: Env) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in env.ctx.redis.info("commandstats").items()}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    out = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > 0}


def stop_pool(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
    return (err or "")[-2000:]


def process_cpu(pid: int) -> float:
    """Seconds of CPU (user + system) process ``pid`` has spent; 0 once it is gone."""
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def p256_key_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class CpuMeter:
    """CPU seconds (user + system) spent by each part of a scenario between ``start()`` and
    ``stop()``: the pool's supervisor and workers, redis-server, each sandbox, the bench itself.
    Shows where a 2-core machine's CPU goes during a run."""

    def __init__(
        self, parts: dict[str, int], pool_pid: int | None = None, groups: dict[str, str] | None = None
    ) -> None:
        """``groups``: label → process name, for a server of many processes (PostgreSQL's backends):
        every process of that name counts, those started during the run from zero."""
        import psutil

        self._psutil = psutil
        self.parts = dict(parts)
        self.pool_pid = pool_pid
        self.groups = dict(groups or {})
        self._t0: dict[int, float] = {}
        self._g0: dict[str, dict[int, float]] = {}
        self._wall0 = 0.0

    def _group(self, name: str) -> dict[int, float]:
        out: dict[int, float] = {}
        for p in self._psutil.process_iter(["name"]):
            if p.info["name"] == name:
                out[p.pid] = self._cpu(p.pid)
        return out

    def _pids(self) -> dict[str, int]:
        pids = dict(self.parts)
        if self.pool_pid is not None:
            try:
                sup = self._psutil.Process(self.pool_pid)
                pids["pool supervisor (+ reconciler)"] = sup.pid
                for i, child in enumerate(sorted(sup.children(recursive=True), key=lambda p: p.pid)):
                    pids[f"pool worker {i + 1}"] = child.pid
            except self._psutil.NoSuchProcess:
                pass
        return pids

    def _cpu(self, pid: int) -> float:
        return process_cpu(pid)

    def start(self) -> None:
        self._labels = self._pids()
        self._t0 = {pid: self._cpu(pid) for pid in self._labels.values()}
        self._g0 = {label: self._group(name) for label, name in self.groups.items()}
        self._wall0 = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._wall0
        used = {label: round(self._cpu(pid) - self._t0.get(pid, 0.0), 2) for label, pid in self._labels.items()}
        for label, name in self.groups.items():
            before = self._g0.get(label, {})
            used[label] = round(sum(cpu - before.get(pid, 0.0) for pid, cpu in self._group(name).items()), 2)
        total = sum(used.values())
        return {"wall_s": round(wall, 2), "cpu_s": used, "cpu_total_s": round(total, 2),
                "cores_busy": round(total / wall, 2) if wall else None}  # fmt: skip


# --- shared by the scenarios (bench/email_blast.py, push_blast.py, launcher_memory.py, cost.py,
# apprise_compare.py) ------------------------------------------------------------------------------

PROMO = {"discount": 10, "code": "WEEK10", "first_name": "F"}
TWILIO_FROM = "+15005550006"

Log = Any  # callable(str) -> None


def noop(_msg: str) -> None:
    pass


def db_server(env: Env) -> dict[str, str]:
    """A PostgreSQL server on this machine shares its cores: its backends' CPU counts too."""
    url = env.settings.database_url or ""
    local = "@127.0.0.1" in url or "@localhost" in url or "@/" in url
    return {"PostgreSQL server (all its processes)": "postgres"} if url.startswith("postgresql") and local else {}


def dist(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": round(percentile(values, 50), 1), "p99": round(percentile(values, 99), 1),
            "max": round(max(values), 1)}  # fmt: skip


class SqlCounter:
    """SQL statements by verb and table (``statements``), their parameter sets (``rows``: each
    executemany's sets, 1 for a plain execute; ``many_rows``: the executemany's alone), counted by a
    ``before_cursor_execute`` listener inside ``with``."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.statements: Counter[str] = Counter()
        self.rows = 0
        self.many_rows = 0

    def on_exec(self, _c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, many: bool) -> None:
        words = statement.split(None, 3)
        verb = words[0].upper() if words else "?"
        table = ""
        if verb == "SELECT":
            low = statement.lower()
            j = low.find(" from ")
            table = low[j + 6 :].split(None, 1)[0] if j >= 0 else ""
        elif verb in ("INSERT", "DELETE") and len(words) >= 3:
            table = words[2]
        elif verb in ("UPDATE", "COPY") and len(words) >= 2:
            table = words[1]
        self.statements[f"{verb} {table}".strip()] += 1
        self.rows += len(params) if many else 1
        self.many_rows += len(params) if many else 0

    def __enter__(self) -> SqlCounter:
        event.listen(self.engine, "before_cursor_execute", self.on_exec)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self.on_exec)


def clear_rate_windows(env: Env) -> None:
    """Forget every user's rate-limit window, so that a run does not suppress what the last one sent."""
    env.ctx.redis.delete(*list(env.ctx.redis.scan_iter(keys.RATE_PATTERN)) or ["-"])


def mark_queued(env: Env, nids: list[str]) -> None:
    """The notifications ``nids`` queued again (to run them through ``process`` once more)."""
    with env.ctx.engine.begin() as conn:
        for i in range(0, len(nids), 5000):
            conn.execute(
                update(Notification).where(col(Notification.id).in_(nids[i : i + 5000])).values(status="queued")
            )


def process_batches(rt: Any, nids: list[str], batch: int, prof: Profile | None = None) -> int:
    """``worker.pipeline.process`` in this process over ``nids`` in batches of ``batch`` (profiled
    by ``prof`` when given, and only the batches): how many were sent."""
    sent = 0
    if prof:
        prof.enable()
    for i in range(0, len(nids), batch):
        sent += process(rt, nids[i : i + batch]).sent
    if prof:
        prof.disable()
    return sent


class OtpProbe:
    """OTP SMS (codes 000000, 000001, ...) submitted through intake at an even pace, on a thread of
    their own, while a blast runs: one to each of ``users``, ``interval`` seconds apart from
    ``start`` (a ``perf_counter`` time; now by default). ``submitted``: code → (when, whether the
    blast still ran); ``submit_ms``: how long each intake call took; ``errors``. ``blast_over()``
    marks the blast done; with ``stop_with_blast`` the rest are then not sent. ``cpu_s``: the CPU
    the submits took in this process (the probe's own thread), for a blast's CPU per part."""

    def __init__(
        self, env: Env, users: list[str], interval: float, start: float | None = None, stop_with_blast: bool = True
    ) -> None:
        self.submitted: dict[str, tuple[float, bool]] = {}
        self.submit_ms: list[float] = []
        self.errors: list[str] = []
        self.cpu_s = 0.0  # this thread's CPU (the submits), up to its last submit
        self.blast = threading.Event()
        self.blast.set()
        t0 = time.perf_counter() if start is None else start

        def loop() -> None:
            cpu0 = time.thread_time()
            for i, uid in enumerate(users):
                if stop_with_blast and not self.blast.is_set():
                    break
                wait = t0 + i * interval - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                code = f"{i:06d}"
                req = parse_request({"recipient_id": uid, "template_id": "otp_code", "channels": ["sms"],
                                     "data": {"code": code, "minutes": 10}})  # fmt: skip
                during = self.blast.is_set()
                ts = time.time()
                try:
                    submit(env.ctx, req)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                self.submit_ms.append((time.time() - ts) * 1000)
                self.submitted[code] = (ts, during)
                self.cpu_s = time.thread_time() - cpu0

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()

    def blast_over(self) -> None:
        self.blast.clear()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout=timeout)

    def latencies_ms(self, stamps: dict[str, float], during_only: bool = False) -> list[float]:
        """Submit to the Twilio sandbox's acceptance (``stamps``: code → time), per OTP it accepted."""
        return [
            (stamps[c] - ts) * 1000 for c, (ts, d) in self.submitted.items() if c in stamps and (d or not during_only)
        ]
