"""The provider contract.

A provider takes a batch of rendered messages for one route (``push.ios``, ``push.android``,
``email``, ``sms``) and answers one typed outcome per message, in the same order::

    Outcome
    ├── Sent(provider_message_id)          accepted by the provider
    ├── Retry(reason, retry_after=None,    transient: try again later (5xx, timeouts);
    │         throttled=False)             throttled=True for 429s: waits without using an attempt
    ├── Held(reason, retry_after)          not sent, and no attempt made: our own wait (the pace
    │                                      said wait, every circuit of the route is open, a batch
    │                                      stopped at its first 429); uses no attempt
    ├── Permanent(reason)                  will never succeed as is: failed, dead-lettered
    └── InvalidAddress(reason, kind)       the token/number/address is dead: failed, and cleaned up:
                                           kind "dead_token" (push: the token is removed),
                                           "stopped" (the recipient opted out, e.g. replied STOP:
                                           an SMS opt-out is recorded) or "invalid" (malformed,
                                           unknown, bounced)

The worker maps each outcome to a delivery status, a retry, or the DLQ in one place
(``worker.pipeline.outcome.decide``). Providers never raise for a per-message problem; an exception
out of ``send`` is treated as ``Retry`` for the whole batch. ``Misconfigured`` is raised at construction
when settings are missing or invalid.
"""

from __future__ import annotations

import html
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Literal, Protocol

_HTML = re.compile(r"<(?:!doctype|html|head|body|title|h1|p|div|pre)\b", re.IGNORECASE)
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


def error_text(text: Any, limit: int = 200) -> str:
    """A provider's error answer as one short line, for a stored reason: an HTML page (a proxy's
    or a gateway's 404/502) becomes its title (else its text without tags), whitespace and line
    breaks collapse, and anything past ``limit`` characters is cut with "…"."""
    s = text.decode("utf-8", "replace") if isinstance(text, bytes | bytearray) else str(text or "")
    if "<" in s and _HTML.search(s):
        title = _TITLE.search(s)
        s = html.unescape(title.group(1) if title and title.group(1).strip() else _TAG.sub(" ", s))
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 1].rstrip() + "…"


@dataclass(slots=True)
class Message:
    """One delivery, rendered. ``content`` keys by channel:

    - push:  ``title``, ``body`` (and ``data``: str → str payload for the app)
    - email: ``subject``, ``html``, ``text``
    - sms:   ``text``

    ``content`` is always what this recipient receives. A message may also carry ``shared``: the
    same content with ``personal``'s tokens in place of the parts that differ per recipient (the
    unsubscribe link, the open pixel), so that a provider with per-recipient substitutions
    (SendGrid) sends one body for a whole batch: replacing each token of ``shared`` by its value
    gives ``content`` exactly. Such a provider reads the rest through ``part`` and ``has``: the
    pipeline's email message (``worker.pipeline.render._EmailMessage``) makes its ``content``
    only when it is first read, and a part on its own without it.
    """

    delivery_id: str
    notification_id: str
    channel: str
    route: str
    address: str
    content: dict[str, str]
    category: str
    priority: str
    dedup_key: str | None = None
    data: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    user_id: str | None = None
    shared: dict[str, str] | None = None
    personal: dict[str, str] = field(default_factory=dict)

    def part(self, name: str) -> str:
        """``content``'s part ``name``, "" when it has none."""
        return self.content.get(name) or ""

    def has(self, name: str) -> bool:
        """Whether ``content`` has a part ``name`` that is not empty."""
        return bool(self.content.get(name))


@dataclass(slots=True, frozen=True)
class Sent:
    provider_message_id: str


@dataclass(slots=True, frozen=True)
class Retry:
    """Transient. ``throttled``: the provider is rate-limiting us (HTTP 429 and the like) — the
    message is fine and the provider healthy, so the wait does not use up one of its attempts."""

    reason: str
    retry_after: float | None = None
    throttled: bool = False


@dataclass(slots=True, frozen=True)
class Held:
    """Not sent, and never offered to the provider: the message waits ``retry_after`` seconds
    (the pace of the provider, an open circuit) without using one of its attempts."""

    reason: str
    retry_after: float = 1.0


@dataclass(slots=True, frozen=True)
class Permanent:
    reason: str


AddressKind = Literal["dead_token", "stopped", "invalid"]


@dataclass(slots=True, frozen=True)
class InvalidAddress:
    """``kind`` says what to do about the address (see the module docstring); it follows from the
    reason, so two outcomes with the same reason are equal whatever their kind."""

    reason: str
    kind: AddressKind = field(default="invalid", compare=False)


@dataclass(frozen=True, slots=True)
class Fenced:
    """Not sent, because this worker's lease on the delivery (``worker.claims``) is lost or about to
    run out (it could not renew it: cut off from Redis): another worker sends it once the lease has
    expired. The pipeline records nothing for it."""

    reason: str = "lease lost"


Outcome = Sent | Retry | Held | Permanent | InvalidAddress | Fenced


def lease_open(provider: Any, timeout: float) -> bool:
    """For a provider that makes several requests per ``send``: whether one more request, which may
    take up to ``timeout`` seconds, still ends within this worker's lease on the batch. The
    pipeline gives the provider ``may_start`` (``Claims.may_start``) before each call; a provider
    used without it (tests, tools) is never held back."""
    gate = getattr(provider, "may_start", None)
    return gate is None or bool(gate(timeout))


def retry_after(value: str | None) -> float | None:
    """An HTTP ``Retry-After`` value as seconds to wait: delta-seconds or an HTTP date (seconds from
    now, 0 when past). None when absent, unreadable or not finite."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


class Misconfigured(Exception):
    """The provider cannot work with the settings given (missing key, bad URL...)."""


class Provider(Protocol):
    """What every provider module exports as ``Provider``.

    One constructor shape: ``Provider(settings, redis=None)``. ``redis`` is the client for state
    every worker shares (the APNs JWT, the FCM access token: ``worker.providers.shared_token``);
    None keeps that state in this process, and providers without such state ignore it."""

    name: ClassVar[str]
    routes: ClassVar[frozenset[str]]

    def __init__(self, settings: Any, redis: Any | None = None) -> None: ...

    def send(self, messages: Sequence[Message]) -> list[Outcome]:
        """Send a batch; return exactly one outcome per message, in order."""
        ...

    def check(self) -> str | None:
        """Whether the provider works, sending nothing to anyone: None, or a one-line problem
        (``notifyctl providers check``, and the probe that closes a half-open circuit)."""
        ...

    def describe(self) -> dict[str, str]:
        """The settings in use, secrets masked (``notifyctl.masking``), for ``notifyctl providers``."""
        ...

    def close(self) -> None:
        """Release connections and threads; the provider is not used again."""
        ...
