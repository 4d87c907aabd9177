"""The push benchmarks (issue 7, 2): blasts to iOS and Android devices through the strict APNs and
FCM sandboxes (one JWT for a pool, a second ``--burst``), per mix of platforms, with OTP SMS beside
them; the bare messages the push client comparison (bench/push_clients.py) sends."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import push_clients, sinks
from bench.common import Env, bulk_notifications, bulk_users, start_pool
from bench.harness import (
    PROMO,
    TWILIO_FROM,
    CpuMeter,
    Log,
    OtpProbe,
    bulk_ios_tokens,
    commandstats,
    count_sent,
    db_server,
    delta,
    dist,
    ios_token,
    noop,
    p256_key_pem,
    phone_users,
    sent_counter,
    settings_env,
    stop_pool,
    wait_sent,
    wait_workers,
)
from bench.sandboxes import SandboxProcess
from campaigns.launcher import LaunchSpec, launch
from sandboxes.fcm import make_service_account

KEY_ID, TEAM_ID, TOPIC = "BENCHKEY01", "BENCHTEAM1", "com.example.app"


def apns_setup(tmp: Path) -> tuple[SandboxProcess, dict[str, Any]]:
    pem = p256_key_pem()
    key_file = tmp / f"AuthKey_{KEY_ID}.p8"
    key_file.write_bytes(pem)
    sb = SandboxProcess("apns", "--key-file", str(key_file), "--key-id", KEY_ID, "--team-id", TEAM_ID, "--topic", TOPIC)
    opts = {"key": pem.decode(), "key_id": KEY_ID, "team_id": TEAM_ID, "topic": TOPIC,
            "base_url": sb.info["url"], "ca_file": sb.info["ca_file"]}  # fmt: skip
    return sb, opts


MIXES = {"ios": 0.0, "android": 1.0, "mix": 0.5}  # share of Android devices


def device_platforms(n: int, android_share: float) -> list[str]:
    every = round(1 / android_share) if android_share else 0
    return ["android" if every and i % every == 0 else "ios" for i in range(n)]


def _push_overrides(batch: int, apns: dict[str, Any], fcm: dict[str, Any], twilio: SandboxProcess) -> dict[str, Any]:
    return {"providers_push_ios": ["apns"], "providers_push_android": ["fcm"], "providers_sms": ["twilio"],
            "batch_size": batch, "provider_options": {
                "apns": apns, "fcm": fcm,
                "twilio": {"account_sid": twilio.info["account_sid"], "auth_token": twilio.info["auth_token"],
                           "from_number": TWILIO_FROM, "base_url": twilio.info["url"]}}}  # fmt: skip


def write_user_csv(path: Path, user_ids: list[str]) -> Path:
    """A segment of user ids only: every recipient gets the campaign's ``--data`` (``PROMO``), as the
    notifications written in bulk carry it."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id"])
        w.writerows([uid] for uid in user_ids)
    return path


def _push_run(n: int, pool: int, batch: int, android_share: float, apns: dict[str, Any], fcm: dict[str, Any],
              sink_pids: dict[str, int], log: Log, timeout: float, otps: int = 0,
              expect_rate: float = 10_000.0) -> dict[str, Any]:  # fmt: skip
    """One push blast through the whole pipeline: n devices (one token each, ``android_share`` of them
    Android), a pool of ``pool`` workers, timed from the launch to the last tracked ``sent`` row; CPU
    per part; OTPs during it when ``otps``.

    The path a user runs for a push campaign sent now, as the email blast's: ``campaigns.launcher.launch``
    (what ``campaign launch`` calls) over a segment of the user ids, the same data for everyone. Its
    rows due at once are written ``queued`` and enqueued by the launcher itself (``campaigns.produce``),
    each row written once before its worker's ``done``. (Rows written ``scheduled`` in bulk, as this
    blast wrote them before, are queued by the pool's reconciler instead — a second write a row and
    the supervisor's CPU: the path of a campaign's later waves, measured by ``strict_push_run`` here
    and by the email blast's user-field row.)"""
    tw = SandboxProcess("twilio")
    overrides = _push_overrides(batch, apns, fcm, tw)
    env = Env(**overrides)
    out: dict[str, Any] = {"pushes": n, "android_share": android_share}
    proc = None
    probe: OtpProbe | None = None
    tw_stats: dict[str, Any] = {}
    try:
        ids = bulk_users(env.ctx, n)
        bulk_ios_tokens(env, ids, platforms=device_platforms(n, android_share))
        otp_ids = phone_users(env, otps)
        csv_path = write_user_csv(env.dir / "segment.csv", ids)
        proc = start_pool(env, pool, settings_env(overrides))
        out["pool_start_s"] = round(wait_workers(env, pool), 2)
        stats0 = commandstats(env)
        meter = CpuMeter({"redis-server": int(env.ctx.redis.info("server")["process_id"]), **sink_pids,
                          "Twilio sandbox": tw.proc.pid, "bench (the launch, polling)": os.getpid()},
                         pool_pid=proc.pid, groups=db_server(env))  # fmt: skip
        meter.start()
        t0 = time.perf_counter()
        if otps:
            probe = OtpProbe(env, otp_ids, (n / expect_rate) / otps)
        # --rate above any throughput: everyone due now, the workers set the pace
        spec = LaunchSpec(template_id="weekly_promo", channels=["push"], rate=1_000_000.0,
                          segment_csv=str(csv_path), quiet_hours="off", data=dict(PROMO))  # fmt: skip
        summary = launch(env.ctx, spec)
        out["launch"] = {k: summary.get(k) for k in ("campaign_id", "written", "recipients", "state")}
        out["write_s"] = round(time.perf_counter() - t0, 2)
        error = wait_sent(env, "push", n, t0, timeout, "pushes")
        if error:
            out["error"] = error
        t_end = time.perf_counter()
        out["cpu"] = meter.stop()
        otp_cpu_s = probe.cpu_s if probe is not None else 0.0
        if probe is not None:
            probe.blast_over()
            probe.join(60)
        sent = count_sent(env, "push")
        out["sent"] = sent
        out["elapsed_s"] = round(t_end - t0, 2)
        out["push_per_s"] = round(sent / (t_end - t0), 1)
        out["cpu_us_per_push"] = {k: round(v / max(1, sent) * 1e6, 1) for k, v in out["cpu"]["cpu_s"].items()}
        out["cpu_us_per_push_total"] = round(out["cpu"]["cpu_total_s"] / max(1, sent) * 1e6, 1)
        if probe is not None:
            out["otp_cpu_us_per_push"] = _otp_share(out["cpu"]["cpu_s"], otp_cpu_s, sent)
            out["cpu_us_per_push_total_without_otps"] = round(
                out["cpu_us_per_push_total"] - sum(out["otp_cpu_us_per_push"].values()), 1
            )
        cmds = delta(stats0, commandstats(env))
        out["redis_commands_per_notification"] = round(sum(cmds.values()) / max(1, sent), 2)
        if probe is not None:
            deadline = time.perf_counter() + 60
            while count_sent(env, "sms") < len(probe.submitted) and time.perf_counter() < deadline:
                time.sleep(0.1)
    finally:
        if probe is not None:
            probe.blast_over()
            probe.join(60)
        if proc is not None:
            err = stop_pool(proc)
            if "Traceback" in err:
                out["pool_stderr_tail"] = err[-800:]
        tw_stats = tw.stop()
        env.close()
    if probe is not None:
        lat = probe.latencies_ms(tw_stats.get("stamps", {}))
        out["otp"] = {"submitted": len(probe.submitted), "accepted_by_sandbox": len(lat),
                      "during_blast_ms": dist(lat), "submit_call_ms": dist(probe.submit_ms),
                      "errors": probe.errors[:3]}  # fmt: skip
    log(f"  {out.get('push_per_s')}/s ({n} pushes, android share {android_share})")
    return out


# the parts of a blast's CPU that are the OTPs sent beside it, not the pushes (the pool's worker 1
# serves the high queue alone: bench.harness.start_pool, worker.pool.queue_sets)
_OTP_PARTS = ("Twilio sandbox", "pool worker 1")


def _otp_share(cpu_s: dict[str, float], probe_cpu_s: float, sent: int) -> dict[str, float]:
    """CPU µs per push that the OTPs beside the blast cost: their submits (the probe's thread in
    the bench), the high worker and the Twilio sandbox. Not all of it: a bulk worker that takes an
    OTP from the high queue when free, and redis-server's share, stay in the pushes' figure."""
    parts = {"bench: OTP submits": probe_cpu_s, **{k: cpu_s.get(k, 0.0) for k in _OTP_PARTS}}
    return {k: round(v / max(1, sent) * 1e6, 1) for k, v in parts.items()}


def strict_push_run(n: int, pool: int, batch: int, tmp: Path, log: Log = noop, timeout: float = 600) -> dict[str, Any]:
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
        bulk_ios_tokens(env, ids, platforms=device_platforms(n, 0.5))
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


def push_blast(n: int, pool: int = 4, batch: int = 1000, log: Log = noop, timeout: float = 1800,
               otps: int = 200, client_rounds: int = 3, mixes: tuple[str, ...] = tuple(MIXES),
               candidates: tuple[str, ...] | None = None, strict: bool = True) -> dict[str, Any]:  # fmt: skip
    """(2) Push against the hardware (issue 20), in one run: n devices through the whole pipeline to a
    C HTTP/2 sink (nginx) for iOS, Android and a 50/50 mix (OTPs during the mix); the bare provider
    loops and the other HTTP/2 clients side by side on the same sink (``bench.push_clients``);
    h2load on the same sink; then correctness against the strict sandboxes."""
    import tempfile

    out: dict[str, Any] = {"pushes": n, "pool": pool, "batch": batch, "rows": {}}
    hint = sinks.missing()
    if hint is None:
        sink = sinks.NginxSink()
        try:
            sa = json.dumps(sink_service_account(sink.url))
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


def sink_service_account(url: str) -> dict[str, Any]:
    return make_service_account(url + "/token", "bench")
