"""The pool's operational alerts: the DLQ's depth and growth (``check_dlq_alert``, over
``notifyctl.dlq.stats``), the high-priority queue's lag above ``NOTIFY_LAG_ALERT_HIGH`` (1 s by
default: an OTP waiting), a provider's circuit opening, and a Redis shard unreachable
(``check_alerts``). Each is one warning log line and, when ``NOTIFY_DLQ_ALERT_WEBHOOK_URL`` is
set, a JSON POST there (``post_webhook``),
once when it starts — again every ``NOTIFY_DLQ_ALERT_REPEAT_S`` while it lasts — and once when it
is over. A Redis key per alert keeps several pools (hosts) from repeating each other. The pool
calls ``check_alerts`` every second and ``check_dlq_alert`` about once a minute; a webhook failure
is logged, never raised.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from notifyctl import keys
from notifyctl.context import Context
from notifyctl.dlq import stats
from notifyctl.metrics import queue_stats
from notifyctl.settings import DlqConfig
from notifyctl.tracking import provider_circuits

log = logging.getLogger("notifyctl.alerts")
dlq_log = logging.getLogger("notifyctl.dlq")  # the DLQ alert's lines, under the DLQ's name as before


@dataclass
class AlertResult:
    firing: bool
    reasons: list[str]
    stats: dict[str, Any]
    notified: bool = False  # a log line + webhook went out this time (not suppressed as a repeat)
    resolved: bool = False  # it was firing and no longer is
    webhook_status: int | None = None
    webhook_error: str | None = None


def post_webhook(url: str, body: dict[str, Any], timeout: float) -> tuple[int | None, str | None]:
    """POST ``body`` as JSON to the alert webhook: (HTTP status, error), never raising."""
    data = json.dumps(body, default=lambda o: o.isoformat() if isinstance(o, datetime) else str(o)).encode()
    req = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json", "User-Agent": "notifyctl-dlq"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - an operator-configured URL
            return resp.status, None
    except urllib.error.HTTPError as exc:
        return exc.code, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return None, f"{type(exc).__name__}: {reason}"


def check_dlq_alert(ctx: Context, config: DlqConfig | None = None, now: datetime | None = None) -> AlertResult:
    """Compare DLQ depth and growth with the thresholds; on crossing, one warning log line and,
    when ``alert_webhook_url`` is set, a JSON POST. Call it about once a minute (any process;
    a Redis key keeps every caller from repeating an alert within ``alert_repeat_s``).
    A webhook failure is logged, never raised."""
    cfg = config or ctx.settings.dlq
    st = stats(ctx, cfg.alert_window_min, now)
    reasons: list[str] = []
    if cfg.alert_depth is not None and st["depth"] >= cfg.alert_depth:
        reasons.append(f"depth {st['depth']} >= {cfg.alert_depth}")
    if cfg.alert_growth_per_min is not None and st["growth_per_min"] >= cfg.alert_growth_per_min:
        reasons.append(f"growth {st['growth_per_min']:g}/min >= {cfg.alert_growth_per_min:g}/min")
    res = AlertResult(firing=bool(reasons), reasons=reasons, stats=st)
    r = ctx.redis
    if reasons:
        last = r.get(keys.DLQ_ALERT)
        if last is None or time.time() - float(last) >= cfg.alert_repeat_s:
            r.set(keys.DLQ_ALERT, str(time.time()), ex=cfg.alert_repeat_s + 86400)
            res.notified = True
        if res.notified:
            dlq_log.warning(
                "DLQ alert: %s (depth %d, growth %g/min over %g min)",
                "; ".join(reasons),
                st["depth"],
                st["growth_per_min"],
                cfg.alert_window_min,
            )
    elif r.delete(keys.DLQ_ALERT):
        res.resolved = res.notified = True
        dlq_log.warning("DLQ alert resolved: depth %d, growth %g/min", st["depth"], st["growth_per_min"])
    if res.notified and cfg.alert_webhook_url is not None:
        url = cfg.alert_webhook_url.get_secret_value()
        body = {
            "event": "dlq_alert" if reasons else "dlq_alert_resolved",
            "firing": bool(reasons),
            "reasons": reasons,
            "depth": st["depth"],
            "growth_per_min": st["growth_per_min"],
            "window_min": cfg.alert_window_min,
            "thresholds": {"depth": cfg.alert_depth, "growth_per_min": cfg.alert_growth_per_min},
            "by_channel": st["by_channel"],
            "by_provider": st["by_provider"],
            "at": st["at"],
        }
        res.webhook_status, res.webhook_error = post_webhook(url, body, cfg.alert_timeout_s)
        if res.webhook_error:
            host = urllib.parse.urlsplit(url).hostname or "?"  # never the full URL: it often holds a token
            dlq_log.warning("DLQ alert webhook to %s failed: %s", host, res.webhook_error)
    return res


@dataclass
class AlertEvent:
    # lag_alert | lag_alert_resolved | circuit_open | circuit_closed | redis_shard_down | redis_shard_down_resolved
    event: str
    subject: str  # "high", the provider, or the shard's number
    message: str
    details: dict[str, Any] = field(default_factory=dict)


def _transition(r: Any, key: str, firing: bool, repeat_s: int) -> str | None:
    """``"fire"`` when an alert starts (or is due again), ``"resolve"`` when it ends, else None."""
    if firing:
        last = r.get(key)
        if last is None:  # it starts: SET NX, so of two pools seeing it at once one notifies
            return "fire" if r.set(key, str(time.time()), ex=repeat_s + 86400, nx=True) else None
        if time.time() - float(last) >= repeat_s:  # still on: remind
            r.set(key, str(time.time()), ex=repeat_s + 86400)
            return "fire"
        return None
    return "resolve" if r.delete(key) else None


def check_alerts(ctx: Any, config: Any = None) -> list[AlertEvent]:
    """Look at the high queue's lag, every configured provider's circuit and (with Redis shards)
    every shard; notify what started or ended. Returns what was notified."""
    cfg = config or ctx.settings.dlq
    s = ctx.settings
    r = ctx.redis
    events: list[AlertEvent] = []

    # with Redis shards, one shard down hides nothing of the others' lag (notifyctl.shards.each), and
    # is an alert of its own; shard 0 down (it holds the alert stamps) raises: the pool logs it as
    # a Redis outage
    down: dict[int, Any] = {}
    queues = queue_stats(ctx, down) if ctx.shard_count > 1 else queue_stats(ctx)
    for i in range(ctx.shard_count if ctx.shard_count > 1 else 0):
        what = _transition(r, keys.alert(f"shard:{i}"), i in down, cfg.alert_repeat_s)
        if what == "fire":
            url = down[i].url  # without its password
            err = down[i].error.removeprefix(f"cannot reach Redis at {url}: ")
            events.append(AlertEvent("redis_shard_down", str(i), f"Redis shard {i} {url} unreachable: {err}",
                                     {"shard": i, "url": url, "error": err}))  # fmt: skip
        elif what == "resolve":
            events.append(AlertEvent("redis_shard_down_resolved", str(i), f"Redis shard {i} answers again",
                                     {"shard": i}))  # fmt: skip

    high = next(q for q in queues if q["priority"] == "high")
    lag = high["oldest_age_s"] or 0.0
    threshold = float(s.lag_alert_high)
    what = _transition(r, keys.alert("lag:high"), lag > threshold, cfg.alert_repeat_s)
    if what == "fire":
        events.append(
            AlertEvent(
                "lag_alert",
                "high",
                f"high-priority lag {lag:.1f}s > {threshold:g}s ({high['depth']} waiting)",
                {"lag_s": lag, "threshold_s": threshold, "depth": high["depth"]},
            )  # fmt: skip
        )
    elif what == "resolve":
        events.append(
            AlertEvent(
                "lag_alert_resolved",
                "high",
                f"high-priority lag back to {lag:.1f}s (<= {threshold:g}s)",
                {"lag_s": lag, "threshold_s": threshold, "depth": high["depth"]},
            )  # fmt: skip
        )

    for name, st in provider_circuits(ctx).items():
        state = str(st.get("state"))
        opened = state not in ("closed", "throttled")  # open, or half-open waiting for its trial batch
        what = _transition(r, keys.alert(f"circuit:{name}"), opened, cfg.alert_repeat_s)
        details = {"provider": name, "state": state, "failing_batches": st.get("failing_batches")}
        if what == "fire":
            events.append(AlertEvent("circuit_open", name, f"provider {name}'s circuit is {state}", details))
        elif what == "resolve":
            events.append(AlertEvent("circuit_closed", name, f"provider {name}'s circuit closed again", details))

    for e in events:
        log.warning("alert %s: %s", e.event, e.message)
        if cfg.alert_webhook_url is not None:
            url = cfg.alert_webhook_url.get_secret_value()
            body = {"event": e.event, "firing": not e.event.endswith(("_resolved", "_closed")),
                    "subject": e.subject, "message": e.message, **e.details, "at": time.time()}  # fmt: skip
            _status, err = post_webhook(url, body, cfg.alert_timeout_s)
            if err:
                host = urllib.parse.urlsplit(url).hostname or "?"  # never the full URL: it often holds a token
                log.warning("alert webhook to %s failed: %s", host, err)
    return events
