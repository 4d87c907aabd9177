"""What a provider's outcome means for a delivery: ``decide`` — sent, retry at, dead-letter, remove
the address — in one place (the provider contract, ``worker.providers.base``, lists the outcomes).

It lives here, not in ``notifyctl/policy.py`` beside who may receive what, because it reads the
providers' outcome types (``worker.providers``, one layer above the foundation: README, Development
→ Layout).
"""

from __future__ import annotations

import random
from typing import Any

from worker.pipeline.batch import _FAILED, _RETRYING, _SENT
from worker.providers import Held, InvalidAddress, Outcome, Permanent, Retry, Sent

# (status, attempts after this one or None when it used none, provider recorded, reason, seconds until
# the next attempt or None, dead-lettered, event detail or None, what to do about the address or None)
Decision = tuple[str, int | None, bool, str | None, float | None, bool, str | None, str | None]


def retry_delay(settings: Any, attempts: int, retry_after: float | None) -> float | None:
    """Seconds until the next attempt after ``attempts`` tries, or None when retries are exhausted.

    The schedule (default 30 s, 5 min, 30 min) is a floor; a provider's Retry-After can only lengthen it.
    """
    if attempts >= settings.max_attempts:
        return None
    base = float(settings.retry_delays[attempts - 1])
    return max(base, float(retry_after or 0))


def decide(settings: Any, outcome: Outcome, attempts: int, channel: str) -> Decision:
    """The delivery's next state after ``outcome`` (``Fenced`` excepted: nothing is recorded for it),
    ``attempts`` counting this one:

    - ``Sent``: sent;
    - ``Held`` (never offered to a provider: our pace, open circuits): retrying, no attempt used,
      spread a little so that a held batch does not come back as one burst;
    - ``Retry`` throttled (the provider asks us to slow down): retrying as told, no attempt used;
    - ``Retry``: retrying after ``retry_delay``, or failed and dead-lettered once retries are exhausted;
    - ``InvalidAddress``: failed, not dead-lettered; the address is removed: ``dead_token`` (the push
      token is retired) or ``stopped`` (an SMS opt-out is recorded);
    - ``Permanent``: failed and dead-lettered.
    """
    if isinstance(outcome, Sent):
        return _SENT, attempts, True, None, None, False, None, None
    if isinstance(outcome, Held):
        wait = max(0.5, outcome.retry_after) * (1 + random.random() / 4)
        detail = f"held: {outcome.reason}; next in {wait:.1f}s"
        return _RETRYING, None, False, outcome.reason, wait, False, detail, None
    if isinstance(outcome, Retry) and outcome.throttled:
        wait = max(1.0, outcome.retry_after or 1.0) * (1 + random.random() / 2)
        detail = f"throttled: {outcome.reason}; next in {wait:.1f}s"
        return _RETRYING, None, True, outcome.reason, wait, False, detail, None
    if isinstance(outcome, Retry):
        delay = retry_delay(settings, attempts, outcome.retry_after)
        if delay is None:
            reason = f"retries exhausted: {outcome.reason}"
            return _FAILED, attempts, True, reason, None, True, None, None
        detail = f"attempt {attempts} failed: {outcome.reason}; next in {delay:g}s"
        return _RETRYING, attempts, True, outcome.reason, delay, False, detail, None
    if isinstance(outcome, InvalidAddress):
        kind = outcome.kind
        remove = kind if kind == "dead_token" or (kind == "stopped" and channel == "sms") else None
        return _FAILED, attempts, True, f"invalid_address: {outcome.reason}", None, False, None, remove
    assert isinstance(outcome, Permanent)
    return _FAILED, attempts, True, outcome.reason, None, True, None, None
