"""The email benchmarks (issue 7, 1 + 3): a campaign blast to ``n`` recipients through the worker
pool into the SendGrid sandbox, with OTP SMS submitted alongside (their latency while the blast
runs); the segment variant, each recipient with a first name and code of their own. Runs in a fresh
``Env`` (private redis-server, SQLite or ``bench_pg``), sandboxes in their own processes."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any

from bench.common import Env, bulk_notifications, bulk_users, start_pool
from bench.harness import (
    PROMO,
    TWILIO_FROM,
    CpuMeter,
    Log,
    OtpProbe,
    commandstats,
    count_sent,
    db_server,
    delta,
    dist,
    noop,
    phone_users,
    settings_env,
    stop_pool,
    wait_sent,
    wait_workers,
)
from bench.sandboxes import SandboxProcess
from campaigns.launcher import LaunchSpec, launch
from notifyctl.intake import parse_request, submit

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


# as a compliant campaign goes out: each email with its own unsubscribe link (RFC 8058 headers +
# footer), the sender's postal address, and an open-tracking pixel
COMPLIANT = {"public_url": "https://notify.example.com", "postal_address": "1 Main St, Springfield"}
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
                log: Log = noop, timeout: float = 1800, segment: bool = True,
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
    sg = SandboxProcess("sendgrid")
    tw = SandboxProcess("twilio")
    overrides: dict[str, Any] = {
        "providers_email": ["sendgrid"],
        "providers_sms": ["twilio"],
        "batch_size": batch,
        **COMPLIANT,
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
    probe: OtpProbe | None = None
    idle_codes: dict[str, float] = {}
    t0_wall = time.time()
    try:
        t = time.perf_counter()
        ids = bulk_users(env.ctx, n)
        otp_ids = phone_users(env, otps)
        csv_path = write_segment_csv(env.dir / "segment.csv", ids) if segment else None
        log(f"  {n} users written in {time.perf_counter() - t:.1f}s ({out['mode']}, {out['database']})")
        proc = start_pool(env, pool, settings_env(overrides))
        out["pool_start_s"] = round(wait_workers(env, pool), 2)
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
                         groups=db_server(env))  # fmt: skip
        meter.start()
        t0 = time.perf_counter()
        t0_wall = time.time()
        # the OTPs start with the blast, its produce phase included (while the campaign's rows are
        # written), at an even pace
        probe = OtpProbe(env, otp_ids, (n / expect_rate) / max(1, otps), start=t0, stop_with_blast=False)
        if csv_path is not None:
            # --rate above any throughput: the schedule puts everyone due now, the workers set the pace
            spec = LaunchSpec(template_id=SEGMENT_PROMO_ID, channels=["email"], rate=1_000_000.0,
                              segment_csv=str(csv_path), quiet_hours="off", data=dict(SEGMENT_DATA))  # fmt: skip
            summary = launch(env.ctx, spec)
            out["launch"] = {k: summary.get(k) for k in ("campaign_id", "written", "recipients", "state")}
        else:
            bulk_notifications(env.ctx, ids, PERSONAL_PROMO_ID, ["email"], PROMO)
        out["write_s"] = round(time.perf_counter() - t0, 2)
        error = wait_sent(env, "email", n, t0, timeout, "emails")  # cheap; confirmed by a SQL count below
        if error:
            out["error"] = error
        t_end = time.perf_counter()
        probe.blast_over()
        out["cpu"] = meter.stop()
        stats1 = commandstats(env)
        sent = count_sent(env, "email")  # the tracked rows in SQL
        out["sent"] = sent
        out["elapsed_s"] = round(t_end - t0, 2)
        out["notifications_per_s"] = round(sent / (t_end - t0), 1)
        probe.join(120)
        deadline = time.perf_counter() + 60
        while count_sent(env, "sms") < len(probe.submitted) + len(idle_codes) and time.perf_counter() < deadline:
            time.sleep(0.1)
        cmds = delta(stats0, stats1)
        out["redis_commands"] = cmds
        out["redis_commands_per_notification"] = round(sum(cmds.values()) / max(1, sent), 2)
        if probe.errors:
            out["otp_errors"] = probe.errors[:5]
            out["otp_error_count"] = len(probe.errors)
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
    assert probe is not None
    stamps = tw_stats.get("stamps", {})
    lat_all = probe.latencies_ms(stamps)
    out["otp"] = {
        "submitted": len(probe.submitted),
        "submitted_during_blast": sum(1 for _ts, d in probe.submitted.values() if d),
        "accepted_by_sandbox": len(lat_all),
        "during_blast_ms": dist(probe.latencies_ms(stamps, during_only=True)),
        "all_ms": dist(lat_all),
        "intake_submit_call_ms": dist(probe.submit_ms),
        "idle_ms": dist([(stamps[c] - ts) * 1000 for c, ts in idle_codes.items() if c in stamps]),
        # the slowest during the blast, as (seconds into the blast, ms): when the tail happens
        "slowest_during_blast": sorted(
            (
                (round(ts - t0_wall, 1), round((stamps[c] - ts) * 1000, 1))
                for c, (ts, d) in probe.submitted.items()
                if d and c in stamps
            ),
            key=lambda x: -x[1],
        )[:5],  # fmt: skip
    }
    return out
