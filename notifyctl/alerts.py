"""The pool's operational alerts, besides the DLQ's (``notifyctl.dlq.check_dlq_alert``): the
high-priority queue's lag above ``NOTIFY_LAG_ALERT_HIGH`` (1 s by default: an OTP waiting), and a
provider's circuit opening. Each is one warning log line and, when ``NOTIFY_DLQ_ALERT_WEBHOOK_URL``
is set, a JSON POST there (the same webhook as the DLQ's), once when it starts — again every
``NOTIFY_DLQ_ALERT_REPEAT_S`` while it lasts — and once when it is over. A Redis key per alert
keeps several pools (hosts) from repeating each other. The pool calls ``check_alerts`` every
second; a webhook failure is logged, never raised.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from notifyctl import keys
from notifyctl.dlq import _post
from notifyctl.metrics import queue_stats
from notifyctl.tracking import provider_circuits

log = logging.getLogger("notifyctl.alerts")


@dataclass
class AlertEvent:
    event: str  # lag_alert | lag_alert_resolved | circuit_open | circuit_closed
    subject: str  # "high" or the provider
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
    """Look at the high queue's lag and every configured provider's circuit; notify what started
    or ended. Returns what was notified."""
    cfg = config or ctx.settings.dlq
    s = ctx.settings
    r = ctx.redis
    events: list[AlertEvent] = []

    high = next(q for q in queue_stats(ctx) if q["priority"] == "high")
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
            _status, err = _post(url, body, cfg.alert_timeout_s)
            if err:
                host = urllib.parse.urlsplit(url).hostname or "?"  # never the full URL: it often holds a token
                log.warning("alert webhook to %s failed: %s", host, err)
    return events
