"""The benches at a tiny size (bench.smoke), so `make bench` does not rot: every scenario runs end to
end against the real parts (redis-server, SQLite, sandboxes in their own processes, a worker pool
subprocess) and reports the figures bench/RESULTS.md is built from. No figure is judged here."""

from __future__ import annotations

from bench.smoke import smoke
from tests import smoke_runs


def test_every_bench_scenario_runs_at_tiny_size():
    if smoke_runs.wanted:  # the chaos smoke runs beside this one (tests/smoke_runs.py)
        smoke_runs.start_chaos()
    res = smoke(n=300, pool=2, apprise_n=10)

    email = res["email"]
    assert "error" not in email, email.get("error")
    assert email["sent"] == 300 and email["sandbox_accepted_emails"] == 300
    # the path a user runs: `campaign launch` over a segment with per-recipient columns, one request a batch
    assert email["mode"] == "segment" and email["launch"]["written"] == 300 and email["sandbox_requests"] == 1
    assert email["notifications_per_s"] > 0
    otp = email["otp"]
    assert otp["accepted_by_sandbox"] == otp["submitted"] == 5
    assert otp["all_ms"]["p99"] > 0 and otp["idle_ms"]["n"] == 5
    assert email["redis_commands"] and email["redis_commands_per_notification"] > 0

    push = res["push"]
    if not push.get("sink_skipped"):  # nginx and h2load installed (bench.sinks.INSTALL_HINT)
        mix = push["rows"]["mix"]
        assert "error" not in mix, mix.get("error")
        assert mix["sent"] == 300 and mix["push_per_s"] > 0 and mix["cpu_us_per_push_total"] > 0
        assert mix["otp"]["accepted_by_sandbox"] == mix["otp"]["submitted"] > 0
        # the OTPs' share of the CPU per push is told apart (their submits measured on the probe's thread)
        share = mix["otp_cpu_us_per_push"]
        assert share["bench: OTP submits"] > 0 and set(share) == {
            "bench: OTP submits",
            "Twilio sandbox",
            "pool worker 1",
        }
        assert 0 < mix["cpu_us_per_push_total_without_otps"] < mix["cpu_us_per_push_total"]
        clients = push["clients"]["candidates"]
        assert clients["apns"]["per_s"] > 0 and clients["fcm"]["per_s"] > 0
        assert push["h2load"]["succeeded"] == 20_000

    launcher = res["launcher"]
    assert "error" not in launcher, launcher.get("error")
    assert launcher["real"]["summary"]["written"] == 600
    assert 20 < launcher["dry_run"]["peak_rss_mb"] < 1000 and 20 < launcher["real"]["peak_rss_mb"] < 1000
    assert launcher["scheduled_rate"] > 0

    for ch in ("email", "push"):
        c = res["cost"][ch]
        assert c["sent"] == 300
        assert 0 < c["sql_statements_per_notification"] < 1  # batched: a fixed number of statements per batch
        assert c["redis_commands_per_notification"] > 0
        assert {s["stage"] for s in c["stages"]} >= {"load batch (SQL)", "provider send"}

    app = res["apprise"]
    assert app["notifyctl_sent"] == 10
    if "error" not in app:  # apprise is the optional `bench` extra
        assert app["apprise_sent"] == 10 and app["sink_accepted"] == 20

    for k in ("1", "2"):  # the blast on one and two Redis shards (issue 18)
        run = res["shards"]["runs"][k]
        assert "error" not in run, run.get("error")
        assert run["sent"] == 300 and len(run["per_shard"]) == int(k)
        assert sum(p["recipients"] for p in run["per_shard"]) == 300
        assert all(p["redis_commands"] > 0 and p["redis_main_thread_cpu_s"] >= 0 for p in run["per_shard"])
    assert res["shards"]["paper"].get("shards_needed") or res["shards"]["paper"].get("error")

    figures = {row[0] for row in res["summary_rows"]}
    assert figures >= {"1", "3", "4", "5", "6", "18"}
