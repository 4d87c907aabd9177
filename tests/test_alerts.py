"""Alerts where operators look: the pool's log line + webhook when high-priority lag passes its
threshold and when a provider's circuit opens (a real local HTTP server receives them); /metrics
made by prometheus_client; the Prometheus rules (promtool) and the Grafana dashboard reference only
series /metrics exposes."""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from notifyctl import metrics
from notifyctl.alerts import check_alerts
from notifyctl.circuit import CLOSED, OPEN, Circuits
from notifyctl.context import Context
from notifyctl.db import dispose_all
from notifyctl.metrics import queue_stats
from notifyctl.redisconn import ensure_server, stop_server
from notifyctl.settings import DlqConfig
from tests.conftest import ROOT, cli_env, make_settings, start_pool
from tests.net import ClosedPort
from tests.test_dlq import Hook
from tests.util import seed, send, wait_for
from worker.pool import run_worker

DEPLOY = ROOT / "deploy"
OTP = {"template_id": "otp_code", "channels": ["sms"], "recipient_id": "dave", "data": {"code": "1", "minutes": 5}}


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


@pytest.fixture
def actx(home: Path, redis_url: str, rclient: redis.Redis) -> Iterator[Context]:
    ctx = Context(make_settings(home, redis_url, lag_alert_high=0.3, providers_email=["smtp"], circuit_threshold=2))
    seed(ctx)
    yield ctx
    ctx.close()


def high_lag(ctx: Context) -> float:
    return next(q for q in queue_stats(ctx) if q["priority"] == "high")["oldest_age_s"] or 0.0


def test_high_priority_lag_alerts_once_then_resolves(
    actx: Context, hook: Hook, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = DlqConfig(alert_webhook_url=hook.url, alert_repeat_s=3600)
    send(actx, **OTP)  # no worker: it waits in the high queue
    assert check_alerts(actx, cfg) == []  # not yet past 0.3 s
    assert wait_for(lambda: high_lag(actx) > 0.3, 10)
    with caplog.at_level(logging.WARNING, logger="notifyctl.alerts"):
        (e,) = check_alerts(actx, cfg)
    assert e.event == "lag_alert" and "high-priority lag" in caplog.text and "> 0.3s" in caplog.text
    assert check_alerts(actx, cfg) == []  # still lagging: no repeat within alert_repeat_s
    run_worker(actx.settings, ["high"], burst=True, reconcile=False)
    (done,) = check_alerts(actx, cfg)
    assert done.event == "lag_alert_resolved"
    assert [(b["event"], b["subject"], b["firing"]) for b in hook.bodies] == [
        ("lag_alert", "high", True),
        ("lag_alert_resolved", "high", False),
    ]
    assert hook.bodies[0]["lag_s"] > 0.3 and hook.bodies[0]["threshold_s"] == 0.3 and hook.bodies[0]["depth"] == 1


def test_circuit_opening_alerts_once_then_closing(actx: Context, hook: Hook) -> None:
    cfg = DlqConfig(alert_webhook_url=hook.url, alert_repeat_s=3600)
    circuits = Circuits(actx.redis, 2, 30)
    assert circuits.record("smtp", ok=False, was=CLOSED) == CLOSED
    assert check_alerts(actx, cfg) == []
    assert circuits.record("smtp", ok=False, was=CLOSED) == OPEN
    (e,) = check_alerts(actx, cfg)
    assert (e.event, e.subject) == ("circuit_open", "smtp")
    assert check_alerts(actx, cfg) == []
    circuits.record("smtp", ok=True, was=OPEN)
    (c,) = check_alerts(actx, cfg)
    assert c.event == "circuit_closed"
    assert [(b["event"], b["provider"]) for b in hook.bodies] == [("circuit_open", "smtp"), ("circuit_closed", "smtp")]


def test_a_redis_shard_down_alerts_and_hides_no_lag(home: Path, redis_url: str, rclient: redis.Redis, hook: Hook,
                                                    tmp_path: Path) -> None:  # fmt: skip
    """Two shards, the second a redis-server of this test's, stopped: one redis_shard_down alert
    naming it (log + webhook), and the high-priority lag of shard 0 still alerts; started again:
    resolved once."""
    d1 = tmp_path / "redis-shard1"
    url1 = ensure_server(d1)
    ctx = Context(make_settings(home, redis_url, redis_shards=[redis_url, url1], redis_socket_timeout=1,
                                lag_alert_high=0.3, providers_email=["smtp"]))  # fmt: skip
    cfg = DlqConfig(alert_webhook_url=hook.url, alert_repeat_s=3600)
    try:
        seed(ctx)
        assert ctx.shard_of("dave") == 0
        assert check_alerts(ctx, cfg) == []
        assert stop_server(d1)
        (down,) = check_alerts(ctx, cfg)
        assert (down.event, down.subject) == ("redis_shard_down", "1") and url1 in down.message
        assert check_alerts(ctx, cfg) == []  # still down: no repeat within alert_repeat_s
        send(ctx, **OTP)  # no worker: it waits in shard 0's high queue
        assert wait_for(lambda: (next(q for q in queue_stats(ctx, {}) if q["priority"] == "high")["oldest_age_s"]
                                 or 0.0) > 0.3, 10)  # fmt: skip
        (lag,) = check_alerts(ctx, cfg)  # shard 0's lag, shard 1 still down (not again)
        assert lag.event == "lag_alert" and lag.details["depth"] == 1
        ensure_server(d1)
        (up,) = check_alerts(ctx, cfg)
        assert (up.event, up.subject) == ("redis_shard_down_resolved", "1")
        assert [(b["event"], b["subject"], b["firing"]) for b in hook.bodies] == [
            ("redis_shard_down", "1", True),
            ("lag_alert", "high", True),
            ("redis_shard_down_resolved", "1", False),
        ]
        assert hook.bodies[0]["shard"] == 1 and hook.bodies[0]["url"] == url1 and hook.bodies[0]["error"]
    finally:
        stop_server(d1)
        ctx.close()
        dispose_all()


def test_the_pool_alerts_by_itself(actx: Context, hook: Hook) -> None:
    """A pool serving only normal and low: an OTP waits; the pool's own rounds send the alert."""
    env = cli_env(actx.settings, NOTIFY_LAG_ALERT_HIGH="0.3", NOTIFY_DLQ_ALERT_WEBHOOK_URL=hook.url)
    pool = start_pool(env, "1", "--queues", "normal,low", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        send(actx, **OTP)
        assert wait_for(lambda: hook.bodies, 30, 0.1), "the pool sent no alert"
    finally:
        pool.send_signal(signal.SIGTERM)
        _, err = pool.communicate(timeout=30)
    assert hook.bodies[0]["event"] == "lag_alert"
    assert "alert lag_alert: high-priority lag" in err


def test_the_pool_alerts_on_a_circuit_opening(actx: Context, hook: Hook, closed_port: ClosedPort) -> None:
    """The pool's workers meet an SMTP server that refuses connections: two failing batches open the
    circuit (threshold 2), and the pool's own rounds send circuit_open to the webhook, once."""
    env = cli_env(actx.settings, NOTIFY_PROVIDERS_EMAIL='["smtp"]', NOTIFY_SMTP_HOST="127.0.0.1",
                  NOTIFY_SMTP_PORT=str(closed_port.port), NOTIFY_SMTP_TIMEOUT="2", NOTIFY_CIRCUIT_THRESHOLD="2",
                  NOTIFY_DLQ_ALERT_WEBHOOK_URL=hook.url)  # fmt: skip
    pool = start_pool(env, "1", "--queues", "high,normal,low", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for user in ("alice", "bob"):  # two jobs: two batches, each failing
            send(actx, recipient_id=user, channels=["email"])
        assert wait_for(lambda: any(b["event"] == "circuit_open" for b in hook.bodies), 60, 0.1), hook.bodies
        time.sleep(2)  # two more of the pool's rounds: no repeat while it stays open
    finally:
        pool.send_signal(signal.SIGTERM)
        _, err = pool.communicate(timeout=30)
    opened = [b for b in hook.bodies if b["event"] == "circuit_open"]
    assert [(b["provider"], b["firing"]) for b in opened] == [("smtp", True)], hook.bodies
    assert "alert circuit_open: provider smtp's circuit is open" in err, err


def _exprs() -> list[str]:
    rules = (DEPLOY / "prometheus" / "notifyctl.rules.yml").read_text()
    dash = json.loads((DEPLOY / "grafana" / "notifyctl-dashboard.json").read_text())
    out = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(out) >= 9
    return out + re.findall(r"expr: \|?\s*(.+?)\n\s+for:", rules, re.S)


def test_metrics_come_from_prometheus_client_and_cover_rules_and_dashboard(actx: Context) -> None:
    send(actx, channels=["email"])
    run_worker(actx.settings, ["high", "normal", "low"], burst=True, reconcile=False)
    body = metrics.render(actx).decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exposed = {f.name + x for f in families.values() for x in suffixes[f.type]}  # with samples or not yet
    assert families["notify_deliveries"].type == "counter" and families["notify_queue_lag_seconds"].type == "gauge"
    assert families["notify_provider_latency_seconds"].type == "histogram"
    used = {m for e in _exprs() for m in re.findall(r"\bnotify_[a-z_]+", e)}
    assert used and used <= exposed, used - exposed


def test_rules_pass_promtool() -> None:
    """The rules are valid, and fire as their unit tests say (notifyctl.rules.test.yml: a Redis shard
    down past its 30 s, high-priority lag over its threshold, a circuit opening; each resolves)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus): the rules are not checked")
    r = subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus" / "notifyctl.rules.yml")],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 7 rules found" in r.stdout
    r = subprocess.run([promtool, "test", "rules", "notifyctl.rules.test.yml"], cwd=DEPLOY / "prometheus",
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_a_redis_shard_down_has_a_rule_and_a_panel() -> None:
    rules = (DEPLOY / "prometheus" / "notifyctl.rules.yml").read_text()
    (rule,) = re.findall(r"- alert: NotifyRedisShardDown\n(?:\s+#.*\n)*\s+expr: (.+)\n\s+for: (\d+)s", rules)
    assert rule[0] == "notify_redis_shard_up == 0" and int(rule[1]) <= 60, rule
    dash = json.loads((DEPLOY / "grafana" / "notifyctl-dashboard.json").read_text())
    assert [p["title"] for p in dash["panels"] if any(t["expr"] == "notify_redis_shard_up" for t in p["targets"])]
