"""Provider registry: name → module under ``worker.providers`` exporting ``Provider``.

Modules are imported lazily so that ``notifyctl --help`` never pays for SDK imports.
"""

from __future__ import annotations

import importlib
from typing import Any

from worker.providers.base import (
    Held,
    InvalidAddress,
    Message,
    Misconfigured,
    Outcome,
    Permanent,
    Provider,
    Retry,
    Sent,
)

__all__ = [
    "REGISTRY",
    "Held",
    "InvalidAddress",
    "Message",
    "Misconfigured",
    "Outcome",
    "Permanent",
    "Provider",
    "Retry",
    "Sent",
    "load_provider",
]

REGISTRY: dict[str, str] = {
    "outbox": "worker.providers.outbox",
    "apns": "worker.providers.apns",
    "fcm": "worker.providers.fcm",
    "sendgrid": "worker.providers.sendgrid",
    "ses": "worker.providers.ses",
    "smtp": "worker.providers.smtp",
    "twilio": "worker.providers.twilio",
    "sns": "worker.providers.sns",
}


def load_provider(name: str, settings: Any, redis: Any | None = None) -> Provider:
    """An instance of provider ``name``. ``redis``: the client for state the provider shares with
    every other worker (the APNs JWT, the FCM access token); None keeps that state in this process."""
    try:
        module_name = REGISTRY[name]
    except KeyError:
        raise Misconfigured(f"unknown provider {name!r} (known: {', '.join(sorted(REGISTRY))})") from None
    module = importlib.import_module(module_name)
    provider: Provider = module.Provider(settings, redis=redis)
    return provider
