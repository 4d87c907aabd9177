"""The benches at a tiny size (bench.smoke), so `make bench` does not rot: every scenario runs end to
end against the real parts (redis-server, SQLite, sandboxes in their own processes, a worker pool
subprocess) and reports the figures bench/RESULTS.md is built from. No figure is judged here."""

from __future__ import annotations

from bench.smoke import smoke


def test_every_bench_scenario_runs_at_tiny_size():
    res = smoke(n=300, pool=2)

    email = res["email"]
    assert "error" not in email, email.get("error")
    assert email["sent"] == 300 and email["sandbox_accepted_emails"] == 300
    assert email["notifications_per_s"] > 0
    otp = email["otp"]
    assert otp["accepted_by_sandbox"] == otp["submitted"] == 5
    assert otp["all_ms"]["p99"] > 0 and otp["idle_ms"]["n"] == 5
    assert email["redis_commands"] and email["redis_commands_per_notification"] > 0

    push = res["push"]
    assert "error" not in push, push.get("error")
    assert push["sent"] == 300 and push["bare_sent"] == 300
    assert push["sandbox_accepted"] >= 600  # pipeline + bare loop (+1 connect probe)
    assert push["ratio"] > 0

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
    assert app["notifyctl_sent"] == 30
    if "error" not in app:  # apprise is the optional `bench` extra
        assert app["apprise_sent"] == 30 and app["sink_accepted"] == 60

    figures = {row[0] for row in res["summary_rows"]}
    assert figures == {"1", "2", "3", "4", "5", "6"}
