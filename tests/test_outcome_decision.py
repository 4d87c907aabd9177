"""``worker.pipeline.outcome.decide``: what each provider outcome means for a delivery, in one place
(the pipeline's record stage applies it; tests/test_retries.py and tests/test_failover.py follow
the same outcomes through the whole pipeline)."""

from __future__ import annotations

import pytest

from notifyctl.models import DeliveryStatus
from notifyctl.settings import Settings
from worker.pipeline import decide
from worker.providers import Held, InvalidAddress, Permanent, Retry, Sent


def test_sent_uses_the_attempt_and_names_the_provider(settings: Settings) -> None:
    assert decide(settings, Sent("pm-1"), 2, "push") == (DeliveryStatus.sent, 2, True, None, None, False, None, None)


def test_retry_follows_the_schedule_then_dead_letters(settings: Settings) -> None:
    status, attempts, called, reason, wait, dead, detail, remove = decide(settings, Retry("503", 120.0), 1, "email")
    assert (status, attempts, called, reason, wait, dead, remove) == (
        DeliveryStatus.retrying, 1, True, "503", 120.0, False, None,
    )  # fmt: skip
    assert detail == "attempt 1 failed: 503; next in 120s"
    last = settings.max_attempts
    assert decide(settings, Retry("503"), last, "email") == (
        DeliveryStatus.failed, last, True, "retries exhausted: 503", None, True, None, None,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("outcome", "floor", "spread", "called", "word"),
    [
        (Held("paced", retry_after=0.1), 0.5, 1.25, False, "held"),
        (Retry("429", 3.0, throttled=True), 3.0, 1.5, True, "throttled"),
    ],
)
def test_a_wait_we_or_the_provider_ask_for_uses_no_attempt(
    settings: Settings, outcome: Held | Retry, floor: float, spread: float, called: bool, word: str
) -> None:
    for _ in range(50):
        status, attempts, was_called, reason, wait, dead, detail, _r = decide(settings, outcome, 3, "sms")
        assert (status, attempts, was_called, reason, dead) == (
            DeliveryStatus.retrying,
            None,
            called,
            outcome.reason,
            False,
        )
        assert wait is not None and floor <= wait <= floor * spread
        assert detail == f"{word}: {outcome.reason}; next in {wait:.1f}s"


def test_a_dead_address_is_failed_not_dead_lettered_and_removed(settings: Settings) -> None:
    failed = (DeliveryStatus.failed, 1, True, "invalid_address: gone", None, False, None)
    assert decide(settings, InvalidAddress("gone", "dead_token"), 1, "push") == (*failed, "dead_token")
    assert decide(settings, InvalidAddress("gone", "stopped"), 1, "sms") == (*failed, "stopped")
    assert decide(settings, InvalidAddress("gone", "stopped"), 1, "email") == (*failed, None)  # opt-outs by STOP: SMS
    assert decide(settings, InvalidAddress("gone"), 1, "email") == (*failed, None)


def test_permanent_is_dead_lettered(settings: Settings) -> None:
    assert decide(settings, Permanent("rejected"), 1, "email") == (
        DeliveryStatus.failed, 1, True, "rejected", None, True, None, None,
    )  # fmt: skip
