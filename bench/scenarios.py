"""The benchmark scenarios of issue 7. Each runs in its own fresh ``Env`` (private redis-server,
SQLite in a temp home), with the provider sandboxes in separate processes and the worker pool
as a subprocess (``notifyctl worker --pool N``). Each returns a dict of measured figures."""

from __future__ import annotations

import cProfile
import csv
import json
import os
import pstats
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import event, update

from bench.common import Env, bulk_notifications, bulk_users, start_pool
from bench.harness import (
    CpuMeter,
    android_token,
    bulk_ios_tokens,
    commandstats,
    count_sent,
    delta,
    ios_token,
    p256_key_pem,
    percentile,
    phone_users,
    sent_counter,
    settings_env,
    stop_pool,
    wait_workers,
)
from bench.sandboxes import SandboxProcess

PROMO = {"discount": 10, "code": "WEEK10", "first_name": "F"}
# The email blast's campaign greets each recipient by name, as a real one does (the shipped
# weekly_promo takes first_name from the campaign data, the same for everyone).
PERSONAL_PROMO_ID = "weekly_promo_personal"
PERSONAL_PROMO = '''id = "weekly_promo_personal"
category = "marketing"
priority = "low"

[email]
subject = "{{ user.first_name }}, {{ discount }}% off everything this week"
html = """
<h1>This week: {{ discount }}% off</h1>
<p>Hi {{ user.first_name }}, use the code <strong>{{ code }}</strong> at checkout.</p>
"""
text = """
This week: {{ discount }}% off.
Hi {{ user.first_name }}, use the code {{ code }} at checkout.
"""
'''
KEY_ID, TEAM_ID, TOPIC = "BENCHKEY01", "BENCHTEAM1", "com.example.app"
TWILIO_FROM = "+15005550006"

Log = Any  # callable(str) -> None


def _noop(_msg: str) -> None:
    pass


# ------------------------------------------------------------------------------------------------ 1 + 3


SEGMENT_PROMO_ID = "weekly_promo"  # the shipped template: first_name and code from the segment's columns
SEGMENT_DATA = {"discount": 20}  # the campaign's --data, the same for everyone


def write_segment_csv(path: Path, user_ids: list[str]) -> Path:
    """A segment as a marketer exports it: each recipient with a first name and a discount code of
    their own (both unique), so every email's body differs from every other's."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "first_name", "code"])
        w.writerows([uid, f"Name{i}", f"C{i:07d}Z"] for i, uid in enumerate(user_ids))
    return path


def email_blast(n: int, pool: int = 3, otps: int = 1000, batch: int = 1000, expect_rate: float = 2500.0,
                log: Log = _noop, timeout: float = 1800, segment: bool = True,
                bench_pg: str | None = None) -> dict[str, Any]:  # fmt: skip
    """(1) n marketing emails through the pool to the SendGrid sandbox; (3) during it, ``otps`` OTP
    SMS submitted through intake at priority high, timed from submit to acceptance by the Twilio
    sandbox. Rate limits: the defaults (email:marketing:1/1d etc.), so the limiter runs.

    ``segment`` (the headline): the path a user runs, ``campaigns.launcher.launch`` (what ``campaign
    launch`` calls) over a segment CSV giving each recipient a unique first name and code, timed
    from the launch (both its passes over the CSV included) to the last tracked ``sent``. Else the
    user-field-only case: the campaign's rows written in bulk as the launcher writes them, bodies
    varying only by ``{{ user.first_name }}``. ``bench_pg``: a PostgreSQL server URL (a fresh schema),
    "" for SQLite whatever ``NOTIFY_BENCH_DATABASE_URL`` says, None to follow it."""
    from campaigns.launcher import LaunchSpec, launch
    from notifyctl.intake import parse_request, submit

    sg = SandboxProcess("sendgrid")
    tw = SandboxProcess("twilio")
    overrides: dict[str, Any] = {
        "providers_email": ["sendgrid"],
        "providers_sms": ["twilio"],
        "batch_size": batch,
        # as a compliant campaign goes out: each email with its own unsubscribe link (RFC 8058
        # headers + footer), the sender's postal address, and an open-tracking pixel
        "public_url": "https://notify.example.com",
        "postal_address": "1 Main St, Springfield",
        "provider_options": {
            "sendgrid": {"api_key": sg.info["api_key"], "base_url": sg.info["url"]},
            "twilio": {"account_sid": tw.info["account_sid"], "auth_token": tw.info["auth_token"],
                       "from_number": TWILIO_FROM, "base_url": tw.info["url"]},
        },
    }  # fmt: skip
    env = Env(**overrides, **({} if bench_pg is None else {"bench_pg": bench_pg}))
    tdir = env.settings.home / "templates"
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / f"{PERSONAL_PROMO_ID}.toml").write_text(PERSONAL_PROMO)
    out: dict[str, Any] = {"notifications": n, "pool": pool, "batch": batch, "otps": otps,
                           "rate_limits": list(env.settings.rate_limits),
                           "mode": "segment" if segment else "user_fields",
                           "database": env.ctx.engine.dialect.name,
                           "template": SEGMENT_PROMO_ID if segment else PERSONAL_PROMO_ID}  # fmt: skip
    proc = None
    sg_stats: dict[str, Any] = {}
    tw_stats: dict[str, Any] = {}
    submitted: dict[str, tuple[float, bool]] = {}  # code -> (submit time, during the blast)
    idle_codes: dict[str, float] = {}
    submit_s: list[float] = []
    t0_wall = time.time()
    try:
        t = time.perf_counter()
        ids = bulk_users(env.ctx, n)
        otp_ids = phone_users(env, otps)
        csv_path = write_segment_csv(env.dir / "segment.csv", ids) if segment else None
        log(f"  {n} users written in {time.perf_counter() - t:.1f}s ({out['mode']}, {out['database']})")
        proc = start_pool(env, pool, settings_env(overrides))
        out["pool_start_s"] = round(wait_workers(env, pool), 2)
        blast_running = threading.Event()
        blast_running.set()
        otp_errors: list[str] = []

        def otp_loop(t_start: float, interval: float) -> None:
            for i, uid in enumerate(otp_ids):
                wait = t_start + i * interval - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                code = f"{i:06d}"
                req = parse_request({"recipient_id": uid, "template_id": "otp_code", "channels": ["sms"],
                                     "data": {"code": code, "minutes": 10}})  # fmt: skip
                during = blast_running.is_set()
                ts = time.time()
                try:
                    submit(env.ctx, req)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    otp_errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                submit_s.append((time.time() - ts) * 1000)
                submitted[code] = (ts, during)

        # idle baseline: a few OTPs with nothing else running
        for i in range(min(20, otps)):
            code = f"9{i:05d}"
            req = parse_request({"recipient_id": otp_ids[i], "template_id": "otp_code", "channels": ["sms"],
                                 "data": {"code": code, "minutes": 10}})  # fmt: skip
            idle_codes[code] = time.time()
            submit(env.ctx, req)
            time.sleep(0.05)
        deadline = time.perf_counter() + 30
        while count_sent(env, "sms") < len(idle_codes) and time.perf_counter() < deadline:
            time.sleep(0.05)
        stats0 = commandstats(env)
        meter = CpuMeter({"redis-server": int(env.ctx.redis.info("server")["process_id"]),
                          "SendGrid sandbox": sg.proc.pid, "Twilio sandbox": tw.proc.pid,
                          "bench (the launch or bulk write, OTP intake, polling)": os.getpid()}, pool_pid=proc.pid,
                         groups=_db_server(env))  # fmt: skip
        meter.start()
        t0 = time.perf_counter()
        t0_wall = time.time()
        # the OTPs start with the blast, its produce phase included (while the campaign's rows are
        # written), at an even pace
        otp_thread = threading.Thread(target=otp_loop, args=(t0, (n / expect_rate) / max(1, otps)), daemon=True)
        otp_thread.start()
        if csv_path is not None:
            # --rate above any throughput: the schedule puts everyone due now, the workers set the pace
            spec = LaunchSpec(template_id=SEGMENT_PROMO_ID, channels=["email"], rate=1_000_000.0,
                              segment_csv=str(csv_path), quiet_hours="off", data=dict(SEGMENT_DATA))  # fmt: skip
            summary = launch(env.ctx, spec)
            out["launch"] = {k: summary.get(k) for k in ("campaign_id", "written", "recipients", "state")}
        else:
            bulk_notifications(env.ctx, ids, PERSONAL_PROMO_ID, ["email"], PROMO)
        out["write_s"] = round(time.perf_counter() - t0, 2)
        last, last_t = -1, time.perf_counter()
        while True:
            sent = sent_counter(env, "email")  # cheap; confirmed by a SQL count below
            now = time.perf_counter()
            if sent >= n:
                break
            if sent != last:
                last, last_t = sent, now
            elif now - last_t > 60:
                out["error"] = f"stalled at {sent}/{n} sent emails"
                break
            if now - t0 > timeout:
                out["error"] = f"timeout at {sent}/{n} sent emails"
                break
            time.sleep(0.05)
        t_end = time.perf_counter()
        blast_running.clear()
        out["cpu"] = meter.stop()
        stats1 = commandstats(env)
        sent = count_sent(env, "email")  # the tracked rows in SQL
        out["sent"] = sent
        out["elapsed_s"] = round(t_end - t0, 2)
        out["notifications_per_s"] = round(sent / (t_end - t0), 1)
        otp_thread.join(timeout=120)
        deadline = time.perf_counter() + 60
        while count_sent(env, "sms") < len(submitted) + len(idle_codes) and time.perf_counter() < deadline:
            time.sleep(0.1)
        cmds = delta(stats0, stats1)
        out["redis_commands"] = cmds
        out["redis_commands_per_notification"] = round(sum(cmds.values()) / max(1, sent), 2)
        if otp_errors:
            out["otp_errors"] = otp_errors[:5]
            out["otp_error_count"] = len(otp_errors)
    finally:
        if proc is not None:
            err = stop_pool(proc)
            if "Traceback" in err:
                out["pool_stderr_tail"] = err[-800:]
        sg_stats = sg.stop()
        tw_stats = tw.stop()
        env.close()
    out["sandbox_accepted_emails"] = sg_stats.get("count")
    out["sandbox_requests"] = sg_stats.get("requests")
    stamps = tw_stats.get("stamps", {})
    lat_all = [(stamps[c] - ts) * 1000 for c, (ts, _d) in submitted.items() if c in stamps]
    lat = [(stamps[c] - ts) * 1000 for c, (ts, d) in submitted.items() if d and c in stamps]
    out["otp"] = {
        "submitted": len(submitted),
        "submitted_during_blast": sum(1 for _ts, d in submitted.values() if d),
        "accepted_by_sandbox": len(lat_all),
        "during_blast_ms": _dist(lat),
        "all_ms": _dist(lat_all),
        "intake_submit_call_ms": _dist(submit_s),
        "idle_ms": _dist([(stamps[c] - ts) * 1000 for c, ts in idle_codes.items() if c in stamps]),
        # the slowest during the blast, as (seconds into the blast, ms): when the tail happens
        "slowest_during_blast": sorted(
            (
                (round(ts - t0_wall, 1), round((stamps[c] - ts) * 1000, 1))
                for c, (ts, d) in submitted.items()
                if d and c in stamps
            ),
            key=lambda x: -x[1],
        )[:5],  # fmt: skip
    }
    return out


def _db_server(env: Env) -> dict[str, str]:
    """A PostgreSQL server on this machine shares its cores: its backends' CPU counts too."""
    url = env.settings.database_url or ""
    local = "@127.0.0.1" in url or "@localhost" in url or "@/" in url
    return {"PostgreSQL server (all its processes)": "postgres"} if url.startswith("postgresql") and local else {}


def _dist(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": round(percentile(values, 50), 1), "p99": round(percentile(values, 99), 1),
            "max": round(max(values), 1)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- 2


def _apns_setup(tmp: Path) -> tuple[SandboxProcess, dict[str, Any]]:
    pem = p256_key_pem()
    key_file = tmp / f"AuthKey_{KEY_ID}.p8"
    key_file.write_bytes(pem)
    sb = SandboxProcess("apns", "--key-file", str(key_file), "--key-id", KEY_ID, "--team-id", TEAM_ID, "--topic", TOPIC)
    opts = {"key": pem.decode(), "key_id": KEY_ID, "team_id": TEAM_ID, "topic": TOPIC,
            "base_url": sb.info["url"], "ca_file": sb.info["ca_file"]}  # fmt: skip
    return sb, opts


def bare_apns_messages(n: int, tag: str = "bare") -> list[Any]:
    from worker.providers import Message

    t = {"title": "10% off this week", "body": "Hi F, use WEEK10 for 10% off."}
    return [
        Message(delivery_id=f"d_{tag}{i:07d}", notification_id=f"n_{tag}{i:07d}", channel="push", route="push.ios",
                address=ios_token(i), content=dict(t), category="marketing", priority="low",
                dedup_key=f"campaign:c_{tag}:u{i:07d}", data={"notification_id": f"n_{tag}{i:07d}", "type": "weekly_promo"},  # noqa: E501
                user_id=f"u{i:07d}")
        for i in range(n)
    ]  # fmt: skip


def bare_fcm_messages(n: int, tag: str = "bare") -> list[Any]:
    from worker.providers import Message

    t = {"title": "10% off this week", "body": "Hi F, use WEEK10 for 10% off."}
    return [
        Message(delivery_id=f"d_{tag}{i:07d}", notification_id=f"n_{tag}{i:07d}", channel="push",
                route="push.android", address=android_token(i), content=dict(t), category="marketing",
                priority="low", dedup_key=f"campaign:c_{tag}:u{i:07d}",
                data={"notification_id": f"n_{tag}{i:07d}", "type": "weekly_promo"}, user_id=f"u{i:07d}")
        for i in range(n)
    ]  # fmt: skip


MIXES = {"ios": 0.0, "android": 1.0, "mix": 0.5}  # share of Android devices


def _platforms(n: int, android_share: float) -> list[str]:
    every = round(1 / android_share) if android_share else 0
    return ["android" if every and i % every == 0 else "ios" for i in range(n)]


def _push_overrides(batch: int, apns: dict[str, Any], fcm: dict[str, Any], twilio: SandboxProcess) -> dict[str, Any]:
    return {"providers_push_ios": ["apns"], "providers_push_android": ["fcm"], "providers_sms": ["twilio"],
            "batch_size": batch, "provider_options": {
                "apns": apns, "fcm": fcm,
                "twilio": {"account_sid": twilio.info["account_sid"], "auth_token": twilio.info["auth_token"],
                           "from_number": TWILIO_FROM, "base_url": twilio.info["url"]}}}  # fmt: skip


class _OtpProbe:
    """OTP SMS submitted through intake at an even pace while a blast runs; their latency, submit to
    acceptance by the Twilio sandbox, from the sandbox's time stamps (``finish`` with its stats)."""

    def __init__(self, env: Env, users: list[str], interval: float) -> None:
        from notifyctl.intake import parse_request, submit

        self.submitted: dict[str, float] = {}
        self.errors: list[str] = []
        self.running = threading.Event()
        self.running.set()

        def loop() -> None:
            t0 = time.perf_counter()
            for i, uid in enumerate(users):
                if not self.running.is_set():
                    break
                wait = t0 + i * interval - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                code = f"{i:06d}"
                req = parse_request({"recipient_id": uid, "template_id": "otp_code", "channels": ["sms"],
                                     "data": {"code": code, "minutes": 10}})  # fmt: skip
                ts = time.time()
                try:
                    submit(env.ctx, req)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                self.submitted[code] = ts

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.running.clear()
        self.thread.join(timeout=60)

    def finish(self, twilio_stats: dict[str, Any]) -> dict[str, Any]:
        stamps = twilio_stats.get("stamps", {})
        lat = [(stamps[c] - ts) * 1000 for c, ts in self.submitted.items() if c in stamps]
        return {"submitted": len(self.submitted), "accepted_by_sandbox": len(lat), "during_blast_ms": _dist(lat),
                "errors": self.errors[:3]}  # fmt: skip


def _push_run(n: int, pool: int, batch: int, android_share: float, apns: dict[str, Any], fcm: dict[str, Any],
              sink_pids: dict[str, int], log: Log, timeout: float, otps: int = 0,
              expect_rate: float = 10_000.0) -> dict[str, Any]:  # fmt: skip
    """One push blast through the whole pipeline: n devices (one token each, ``android_share`` of them
    Android), a pool of ``pool`` workers, timed from the first bulk write to the last tracked ``sent``
    row; CPU per part; OTPs during it when ``otps``."""
    tw = SandboxProcess("twilio")
    overrides = _push_overrides(batch, apns, fcm, tw)
    env = Env(**overrides)
    out: dict[str, Any] = {"pushes": n, "android_share": android_share}
    proc = None
    probe: _OtpProbe | None = None
    tw_stats: dict[str, Any] = {}
    try:
        ids = bulk_users(env.ctx, n)
        bulk_ios_tokens(env, ids, platforms=_platforms(n, android_share))
        otp_ids = phone_users(env, otps)
        proc = start_pool(env, pool, settings_env(overrides))
        out["pool_start_s"] = round(wait_workers(env, pool), 2)
        stats0 = commandstats(env)
        meter = CpuMeter({"redis-server": int(env.ctx.redis.info("server")["process_id"]), **sink_pids,
                          "Twilio sandbox": tw.proc.pid, "bench (bulk write, polling)": os.getpid()},
                         pool_pid=proc.pid, groups=_db_server(env))  # fmt: skip
        meter.start()
        t0 = time.perf_counter()
        if otps:
            probe = _OtpProbe(env, otp_ids, (n / expect_rate) / otps)
        bulk_notifications(env.ctx, ids, "weekly_promo", ["push"], PROMO)
        out["write_s"] = round(time.perf_counter() - t0, 2)
        last, last_t = -1, t0
        while True:
            sent = sent_counter(env, "push")
            now = time.perf_counter()
            if sent >= n:
                break
            if sent != last:
                last, last_t = sent, now
            elif now - last_t > 60 or now - t0 > timeout:
                out["error"] = f"stalled at {sent}/{n} sent pushes"
                break
            time.sleep(0.05)
        t_end = time.perf_counter()
        out["cpu"] = meter.stop()
        if probe is not None:
            probe.stop()
        sent = count_sent(env, "push")
        out["sent"] = sent
        out["elapsed_s"] = round(t_end - t0, 2)
        out["push_per_s"] = round(sent / (t_end - t0), 1)
        out["cpu_us_per_push"] = {k: round(v / max(1, sent) * 1e6, 1) for k, v in out["cpu"]["cpu_s"].items()}
        out["cpu_us_per_push_total"] = round(out["cpu"]["cpu_total_s"] / max(1, sent) * 1e6, 1)
        cmds = delta(stats0, commandstats(env))
        out["redis_commands_per_notification"] = round(sum(cmds.values()) / max(1, sent), 2)
        if probe is not None:
            deadline = time.perf_counter() + 60
            while count_sent(env, "sms") < len(probe.submitted) and time.perf_counter() < deadline:
                time.sleep(0.1)
    finally:
        if probe is not None:
            probe.stop()
        if proc is not None:
            err = stop_pool(proc)
            if "Traceback" in err:
                out["pool_stderr_tail"] = err[-800:]
        tw_stats = tw.stop()
        env.close()
    if probe is not None:
        out["otp"] = probe.finish(tw_stats)
    log(f"  {out.get('push_per_s')}/s ({n} pushes, android share {android_share})")
    return out


def strict_push_run(n: int, pool: int, batch: int, tmp: Path, log: Log = _noop, timeout: float = 600) -> dict[str, Any]:
    """Correctness against the strict sandboxes (APNs: every JWT verified against the key, every header
    checked, a second provider token of the key within 20 minutes refused; FCM: the OAuth grant
    verified, every message validated): the mix through a pool of ``pool``, then a second
    ``worker --burst`` and a ``worker --pool 4`` start, each with more pushes, minutes apart at most."""
    pem = p256_key_pem()
    key_file = tmp / f"AuthKey_{KEY_ID}.p8"
    key_file.write_bytes(pem)
    sb = SandboxProcess("apns", "--key-file", str(key_file), "--key-id", KEY_ID, "--team-id", TEAM_ID,
                        "--topic", TOPIC, "--token-update-interval", "1200")  # fmt: skip
    fc = SandboxProcess("fcm")
    apns = {"key": pem.decode(), "key_id": KEY_ID, "team_id": TEAM_ID, "topic": TOPIC,
            "base_url": sb.info["url"], "ca_file": sb.info["ca_file"]}  # fmt: skip
    fcm = {"service_account_json": json.dumps(fc.info["service_account"]), "base_url": fc.info["url"]}
    tw = SandboxProcess("twilio")
    overrides = _push_overrides(batch, apns, fcm, tw)
    env = Env(**overrides)
    out: dict[str, Any] = {"pushes": n}
    try:
        parts = [n - 2 * (n // 10), n // 10, n // 10]  # the pool, a second --burst, a --pool 4 start
        ids = bulk_users(env.ctx, n)
        bulk_ios_tokens(env, ids, platforms=_platforms(n, 0.5))
        first = 0
        burst = [sys.executable, "-m", "notifyctl.cli.main", "worker", "--burst"]
        for label, size in zip(("pool", "burst", "pool4"), parts, strict=True):
            t0 = time.perf_counter()
            proc = None
            if label != "burst":
                proc = start_pool(env, pool if label == "pool" else 4, settings_env(overrides))
                wait_workers(env, pool if label == "pool" else 4)
            bulk_notifications(env.ctx, ids[first : first + size], "weekly_promo", ["push"], PROMO)
            first += size
            while sent_counter(env, "push") < first and time.perf_counter() - t0 < timeout:
                if label == "burst" and (proc is None or proc.poll() is not None):
                    proc = subprocess.Popen(burst, env=env.env(**settings_env(overrides)), stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, text=True)  # fmt: skip
                time.sleep(0.1)
            out[f"{label}_s"] = round(time.perf_counter() - t0, 2)
            if proc is not None:
                stop_pool(proc)
        out["sent"] = count_sent(env, "push")
    finally:
        apns_stats, fcm_stats = sb.stop(), fc.stop()
        tw.stop()
        env.close()
    out["apns_accepted"] = apns_stats.get("count")
    out["fcm_accepted"] = fcm_stats.get("count")
    out["apns_jwts_seen"] = apns_stats.get("tokens_seen")
    out["apns_token_updates_refused"] = apns_stats.get("token_updates_refused")
    out["fcm_token_requests"] = fcm_stats.get("token_requests")
    log(f"  strict sandboxes: {out}")
    return out


def push_blast(n: int, pool: int = 4, batch: int = 1000, log: Log = _noop, timeout: float = 1800,
               otps: int = 200, client_rounds: int = 3, mixes: tuple[str, ...] = tuple(MIXES),
               candidates: tuple[str, ...] | None = None, strict: bool = True) -> dict[str, Any]:  # fmt: skip
    """(2) Push against the hardware (issue 20), in one run: n devices through the whole pipeline to a
    C HTTP/2 sink (nginx) for iOS, Android and a 50/50 mix (OTPs during the mix); the bare provider
    loops and the other HTTP/2 clients side by side on the same sink (``bench.push_clients``);
    h2load on the same sink; then correctness against the strict sandboxes."""
    import tempfile

    from bench import push_clients, sinks

    out: dict[str, Any] = {"pushes": n, "pool": pool, "batch": batch, "rows": {}}
    hint = sinks.missing()
    if hint is None:
        sink = sinks.NginxSink()
        try:
            sa = json.dumps(_sink_service_account(sink.url))
            apns = {"key": p256_key_pem().decode(), "key_id": KEY_ID, "team_id": TEAM_ID, "topic": TOPIC,
                    "base_url": sink.url, "ca_file": sink.ca_file}  # fmt: skip
            fcm = {"service_account_json": sa, "base_url": sink.url, "ca_file": sink.ca_file,
                   "token_url": sink.url + "/token"}  # fmt: skip
            for label in mixes:
                share = MIXES[label]
                log(f"  pipeline → nginx, {label}...")
                out["rows"][label] = _push_run(n, pool, batch, share, apns, fcm, sink.pids, log, timeout,
                                               otps=otps if label == "mix" else 0)  # fmt: skip
            log("  HTTP/2 clients side by side on the same sink...")
            out["clients"] = push_clients.compare(sink.url, sink.ca_file, n=min(n, 20_000), batch=batch,
                                                  rounds=client_rounds, log=log,
                                                  candidates=candidates or push_clients.CANDIDATES)  # fmt: skip
            out["h2load"] = sinks.h2load(f"{sink.url}/3/device/{ios_token(1)}", n=max(20_000, min(n, 100_000)),
                                         body=push_clients.BODY)  # fmt: skip
        finally:
            sink.stop()
    else:
        out["sink_skipped"] = hint
        log(f"  C sink rows skipped: {hint}")
    if strict:
        log("  strict sandboxes...")
        out["strict"] = strict_push_run(max(300, n // 10), pool, batch, Path(tempfile.mkdtemp(prefix="bench-push-")),
                                        log, timeout)  # fmt: skip
    return out


def _sink_service_account(url: str) -> dict[str, Any]:
    from sandboxes.fcm import make_service_account

    return make_service_account(url + "/token", "bench")


# ---------------------------------------------------------------------------------------------------- 4


def launcher_available() -> bool:
    try:
        from campaigns.launcher import LaunchSpec, launch  # noqa: F401
    except Exception:  # noqa: BLE001 - anything means "not ready"
        return False
    return True


def _run_launcher(env: Env, csv_path: Path, rate: float, dry_run: bool) -> dict[str, Any]:
    """The launcher in a subprocess; peak RSS = the child's own VmHWM at its end."""
    args = [sys.executable, "-m", "bench.launcher_child", str(csv_path), str(rate)] + (["--dry-run"] if dry_run else [])
    t0 = time.perf_counter()
    p = subprocess.Popen(args, env=env.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_text, err_text = p.communicate()
    elapsed = time.perf_counter() - t0
    res: dict[str, Any] = {"elapsed_s": round(elapsed, 2)}
    if p.returncode != 0:
        res["error"] = (err_text.strip().splitlines() or ["exit " + str(p.returncode)])[-1][:300]
        return res
    res["summary"] = json.loads(out_text.strip().splitlines()[-1])
    res["peak_rss_mb"] = round(res["summary"].pop("vm_hwm_kb") / 1024, 1)
    return res


def _baseline_rss(env: Env) -> float:
    """Peak RSS of a child that only imports the launcher (the interpreter + libraries floor)."""
    code = "import bench.launcher_child as c; print(c.vm_hwm_kb())"
    out = subprocess.run([sys.executable, "-c", code], env=env.env(), capture_output=True, text=True, check=True)
    return round(int(out.stdout.strip()) / 1024, 1)


def launcher_memory(rows: int, log: Log = _noop, small_fraction: float = 0.1, rounds: int = 6,
                    flat: bool = True) -> dict[str, Any]:  # fmt: skip
    """(4) peak RSS of the launcher over a CSV segment of ``rows`` users (dry run and real), the same at
    a tenth of the size (flatness), and the produce rate against --rate: scheduled (due_at span of the
    written rows) and realized (notifications the reconciler queued per second after the launch)."""
    if not launcher_available():
        return {"error": "not measured: launcher not available"}
    from worker.reconciler import reconcile

    env = Env()
    out: dict[str, Any] = {"rows": rows}
    try:
        t = time.perf_counter()
        ids = bulk_users(env.ctx, rows)
        log(f"  {rows} users written in {time.perf_counter() - t:.1f}s")
        small = max(1, int(rows * small_fraction))
        paths = {}
        for label, k in (("small", small), ("full", rows)):
            path = env.dir / f"segment_{label}.csv"
            with path.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["user_id"])
                w.writerows([u] for u in ids[:k])
            paths[label] = path
        rate = float(min(10_000, max(100, rows // 25)))  # at most the seed's peak, 10,000/s
        out["rate"] = rate
        out["baseline_rss_mb"] = _baseline_rss(env)
        if flat:
            out["dry_run_small"] = _run_launcher(env, paths["small"], rate, True)
        out["dry_run"] = _run_launcher(env, paths["full"], rate, True)
        log(f"  dry run: {out['dry_run'].get('peak_rss_mb')} MB; real launch...")
        if flat:
            out["real_small"] = _run_launcher(env, paths["small"], rate, False)
        # the small campaign is due first: let its rows go before the measured one is queued
        env.ctx.engine.dispose()
        with env.ctx.engine.begin() as conn:
            from notifyctl.models import Notification

            conn.execute(update(Notification).where(Notification.status == "scheduled").values(status="canceled"))
        out["real"] = _run_launcher(env, paths["full"], rate, False)
        s = out["real"].get("summary") or {}
        if s.get("first_due") and s.get("last_due") and s.get("written", 0) > 1:
            from datetime import datetime

            span = (datetime.fromisoformat(s["last_due"]) - datetime.fromisoformat(s["first_due"])).total_seconds()
            sched = (s["written"] - 1) / span if span > 0 else float("inf")
            out["scheduled_rate"] = round(sched, 1)
            out["scheduled_rate_error_pct"] = round(abs(sched - rate) / rate * 100, 2)
        # realized: reconcile once a second, paced, as the pool does, and count what it queues
        queued: list[int] = []
        for _ in range(rounds):
            t_round = time.perf_counter()
            queued.append(reconcile(env.ctx, paced=True).retries_queued)  # as the pool runs it
            time.sleep(max(0.0, 1.0 - (time.perf_counter() - t_round)))
        out["reconciler_rounds"] = queued
        steady = queued[1:]
        if steady:
            realized = sum(steady) / len(steady)
            out["realized_rate"] = round(realized, 1)
            out["realized_rate_error_pct"] = round(abs(realized - rate) / rate * 100, 2)
    finally:
        env.close()
    return out


# ---------------------------------------------------------------------------------------------------- 5


_STAGES = [
    ("load batch (SQL)", "worker.pipeline.batch", "_Batch.__init__"),
    ("render (jinja)", "notifyctl.templates", "Template.render"),
    ("email per recipient: signed links, pixel, own copy", "worker.pipeline.render", "_EmailPlan.apply"),
    ("rate limit (Redis)", "worker.ratelimit", "RateLimiter.check_many"),
    ("claim (Redis)", "worker.claims", "Claims.take"),
    ("settle send records (Redis)", "worker.claims", "Claims.settle"),
    ("provider send", "worker.pipeline.send", "_send_route"),
    ("delivery ids", "worker.pipeline.fanout", "delivery_id"),
    ("record outcomes (Python)", "worker.pipeline.record", "_mark"),
    ("bulk UPDATEs (SQL)", "worker.pipeline.record", "_bulk_update"),
    ("SQL: Session.execute (all)", "sqlalchemy.orm.session", "Session.execute"),
    ("SQL: commit", "sqlalchemy.orm.session", "Session.commit"),
]


def _code_key(module: str, qual: str) -> tuple[str, int, str] | None:
    import importlib

    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    code = getattr(obj, "__code__", None)
    if code is None:
        return None
    return (code.co_filename, code.co_firstlineno, code.co_name)


def _stage_table(prof: cProfile.Profile, total_key: tuple[str, int, str] | None) -> list[dict[str, Any]]:
    st = pstats.Stats(prof)
    raw = st.stats  # type: ignore[attr-defined]
    total = raw[total_key][3] if total_key and total_key in raw else None
    rows = []
    for label, module, qual in _STAGES:
        key = _code_key(module, qual)
        if key is None or key not in raw:
            continue
        cum = raw[key][3]
        rows.append(
            {"stage": label, "cum_s": round(cum, 3), "share_pct": round(cum / total * 100, 1) if total else None}
        )
    return rows


def _top_functions(prof: cProfile.Profile, k: int = 12) -> list[dict[str, Any]]:
    st = pstats.Stats(prof)
    raw = st.stats  # type: ignore[attr-defined]
    items = sorted(raw.items(), key=lambda kv: -kv[1][2])[:k]
    out = []
    for (fn, line, name), (_cc, nc, tt, ct, _callers) in items:
        short = "/".join(Path(fn).parts[-2:]) if fn != "~" else "builtin"
        out.append(
            {"function": f"{short}:{line}({name})", "calls": nc, "tottime_s": round(tt, 3), "cumtime_s": round(ct, 3)}
        )
    return out


def _process_in_process(env: Env, nids: list[str], batch: int, profile: bool) -> dict[str, Any]:
    from worker.pipeline import Runtime, process

    with env.ctx.engine.begin() as conn:
        from notifyctl.models import Notification

        for i in range(0, len(nids), 5000):
            conn.execute(update(Notification).where(Notification.id.in_(nids[i : i + 5000])).values(status="queued"))
    statements: Counter[str] = Counter()
    rows_affected = {"executemany_rows": 0}

    def on_exec(_conn: Any, _cursor: Any, statement: str, params: Any, _context: Any, executemany: bool) -> None:
        words = statement.split(None, 3)
        verb = words[0].upper() if words else "?"
        table = ""
        if verb in ("SELECT",):
            low = statement.lower()
            j = low.find(" from ")
            table = low[j + 6 :].split(None, 1)[0] if j >= 0 else ""
        elif verb in ("INSERT", "UPDATE", "DELETE") and len(words) >= 3:
            table = words[2] if verb != "UPDATE" else words[1]
        statements[f"{verb} {table}".strip()] += 1
        if executemany:
            rows_affected["executemany_rows"] += len(params)

    rt = Runtime(env.ctx, worker_name="bench-inproc")
    stats0 = commandstats(env)
    event.listen(env.ctx.engine, "before_cursor_execute", on_exec)
    prof = cProfile.Profile() if profile else None
    sent = 0
    try:
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        for i in range(0, len(nids), batch):
            sent += process(rt, nids[i : i + batch]).sent
        if prof:
            prof.disable()
        elapsed = time.perf_counter() - t0
    finally:
        event.remove(env.ctx.engine, "before_cursor_execute", on_exec)
        rt.close()
    cmds = delta(stats0, commandstats(env))
    n = max(1, sent)
    res: dict[str, Any] = {
        "notifications": len(nids),
        "sent": sent,
        "batches": -(-len(nids) // batch),
        "elapsed_s": round(elapsed, 3),
        "per_s_one_process": round(sent / elapsed, 1),
        "sql_statements": dict(statements.most_common()),
        "sql_statements_per_notification": round(sum(statements.values()) / n, 4),
        "sql_statements_per_batch": round(sum(statements.values()) / max(1, -(-len(nids) // batch)), 1),
        "sql_executemany_rows_per_notification": round(rows_affected["executemany_rows"] / n, 2),
        "redis_commands": cmds,
        "redis_commands_per_notification": round(sum(cmds.values()) / n, 2),
    }
    if prof:
        res["stages"] = _stage_table(prof, _code_key("worker.pipeline", "process"))
        res["top_functions"] = _top_functions(prof)
    return res


def cost(n: int, batch: int = 1000, log: Log = _noop) -> dict[str, Any]:
    """(5) worker.pipeline.process in this process over batches: SQL statements (a
    before_cursor_execute listener), Redis commands (INFO commandstats), and a cProfile summary,
    for email (SendGrid sandbox) and push (APNs sandbox)."""
    import tempfile

    sg = SandboxProcess("sendgrid")
    sb, opts = _apns_setup(Path(tempfile.mkdtemp(prefix="bench-apns-")))
    overrides = {
        "providers_email": ["sendgrid"],
        "providers_push_ios": ["apns"],
        "batch_size": batch,
        "provider_options": {"sendgrid": {"api_key": sg.info["api_key"], "base_url": sg.info["url"]}, "apns": opts},
    }
    env = Env(**overrides)
    out: dict[str, Any] = {"notifications": n, "batch": batch}
    try:
        ids = bulk_users(env.ctx, n)
        bulk_ios_tokens(env, ids)
        for label, channel in (("email", "email"), ("push", "push")):
            plain = bulk_notifications(env.ctx, ids, "weekly_promo", [channel], PROMO)
            env.ctx.redis.delete(*[k for k in env.ctx.redis.scan_iter("notif:rate:*")] or ["-"])
            out[label] = _process_in_process(env, plain, batch, profile=False)
            log(f"  {label}: {out[label]['per_s_one_process']}/s in one process (no profiler); profiling...")
            profiled = bulk_notifications(env.ctx, ids, "weekly_promo", [channel], PROMO)
            env.ctx.redis.delete(*[k for k in env.ctx.redis.scan_iter("notif:rate:*")] or ["-"])
            prof = _process_in_process(env, profiled, batch, profile=True)
            out[label]["profiled_elapsed_s"] = prof["elapsed_s"]
            out[label]["stages"] = prof.get("stages")
            out[label]["top_functions"] = prof.get("top_functions")
    finally:
        sg.stop()
        sb.stop()
        env.close()
    return out


# ---------------------------------------------------------------------------------------------------- 6


def apprise_available() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import apprise  # noqa: F401
    except ImportError:
        return False
    return True


def apprise_vs_notifyctl(n: int, pool: int = 3, batch: int = 500, log: Log = _noop) -> dict[str, Any]:
    """(6) the same n emails to the same SMTP sink (aiosmtpd, separate process): Apprise (one
    notify per recipient, as its API goes) vs notifyctl's pool with providers_email=["smtp"]."""
    from notifyctl.models import User

    smtp = SandboxProcess("smtp")
    overrides = {
        "providers_email": ["smtp"],
        "batch_size": batch,
        "rate_limits": [],
        "provider_options": {"smtp": {"host": smtp.info["host"], "port": smtp.info["port"]}},
    }
    env = Env(**overrides)
    out: dict[str, Any] = {"emails": n, "pool": pool}
    proc = None
    try:
        ids = bulk_users(env.ctx, n)
        # notifyctl: the whole pipeline, first write to last tracked row
        proc = start_pool(env, pool, settings_env(overrides))
        wait_workers(env, pool)
        t0 = time.perf_counter()
        bulk_notifications(env.ctx, ids, "weekly_promo", ["email"], PROMO)
        while count_sent(env, "email") < n and time.perf_counter() - t0 < 600:
            time.sleep(0.1)
        el = time.perf_counter() - t0
        sent = count_sent(env, "email")
        out["notifyctl_sent"] = sent
        out["notifyctl_s"] = round(el, 2)
        out["notifyctl_per_s"] = round(sent / el, 1)
        stop_pool(proc)
        proc = None
        if not apprise_available():
            out["error"] = "apprise not installed: `pip install apprise` (the bench extra)"
            return out
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import apprise

        from notifyctl.intake import user_vars

        tpl = env.ctx.templates.get("weekly_promo")
        mails = []
        for uid in ids:
            user = User(id=uid, email=f"{uid}@example.com", timezone="UTC", locale="en", attributes={"first_name": uid})
            c = tpl.render("email", {**PROMO, "user": user_vars(user)})
            mails.append((user.email, c["subject"], c["text"]))
        log(f"  notifyctl: {out['notifyctl_per_s']}/s; apprise...")
        host, port = smtp.info["host"], smtp.info["port"]
        ok = 0
        with warnings.catch_warnings():
            # apprise 2.x imports the deprecated imghdr on Python 3.11 (a DeprecationWarning under -W error)
            warnings.simplefilter("ignore", DeprecationWarning)
            apprise.Apprise().add(f"mailto://{host}:{port}?from=notifications@example.com&to=warm@example.com")
            t1 = time.perf_counter()
            for to, subject, body in mails:
                a = apprise.Apprise()
                a.add(f"mailto://{host}:{port}?from=notifications@example.com&to={to}&secure=no")
                ok += bool(a.notify(title=subject, body=body))
            el2 = time.perf_counter() - t1
        out["apprise_sent"] = ok
        out["apprise_s"] = round(el2, 2)
        out["apprise_per_s"] = round(ok / el2, 1)
        out["apprise_version"] = apprise.__version__
        out["ratio_notifyctl_over_apprise"] = round(out["notifyctl_per_s"] / out["apprise_per_s"], 2) if ok else None
    finally:
        if proc is not None:
            stop_pool(proc)
        stats = smtp.stop()
        env.close()
    out["sink_accepted"] = stats.get("count")
    return out
