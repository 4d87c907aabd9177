"""Secret template data: the fields a template marks ``secret = ["code"]`` (an OTP's code).

They are needed for one thing, rendering the notification's messages, so:

- **never shown**: wherever a notification's data is shown (``GET /v1/notifications/{id}``,
  ``notifyctl events``, through ``notifyctl.tracking.timeline``) they read ``"***"`` (``redact``);
- **erased once done**: when every delivery of the notification is final (sent, failed, suppressed),
  the worker erases them from ``notifications.data`` in the same write that settles the notification
  (``worker.pipeline``); a notification suppressed at intake is stored erased. Until then a retry
  still has them. Erased data keeps its other fields plus ``ERASED_KEY``, the names erased;
- **a replay cannot bring them back**: a delivery replayed from the DLQ after the erase fails at
  once, reason ``secret_erased: ...``, without a send and without going back to the DLQ (the code
  would be stale anyway: send a new notification).

Redis never holds template data: RQ jobs carry notification ids only, and the database engine hides
statement parameters from exceptions and logs (``notifyctl.db.make_engine``). The outbox provider
keeps what it "delivered", codes included: it stands for the recipients' devices (see
``worker.providers.outbox``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

REDACTED = "***"
ERASED_KEY = "notifyctl:erased"  # not a valid template variable name: no template can print it
SECRET_ERASED = "secret_erased"


def erased_fields(data: Mapping[str, Any]) -> list[str]:
    """The secret fields erased from this data (empty when nothing was)."""
    names = data.get(ERASED_KEY)
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def redact(data: Mapping[str, Any], secret: Collection[str]) -> dict[str, Any]:
    """``data`` as it may be shown: secret fields (present or erased) as ``"***"``, no marker."""
    hidden = set(secret) | set(erased_fields(data))
    if not hidden and ERASED_KEY not in data:
        return dict(data)
    out = {k: (REDACTED if k in hidden else v) for k, v in data.items() if k != ERASED_KEY}
    for name in erased_fields(data):
        out.setdefault(name, REDACTED)
    return out


def erase(data: Mapping[str, Any], secret: Collection[str]) -> dict[str, Any] | None:
    """``data`` without its secret fields, ``ERASED_KEY`` naming them; None when it holds none."""
    present = [k for k in secret if k in data]
    if not present:
        return None
    out = {k: v for k, v in data.items() if k not in secret}
    out[ERASED_KEY] = sorted({*present, *erased_fields(data)})
    return out


def erased_reason(template_id: str, fields: Collection[str]) -> str:
    """Why a delivery whose secret data was erased cannot be sent (its reason, one line)."""
    return (
        f"{SECRET_ERASED}: template {template_id!r}'s secret data ({', '.join(sorted(fields))}) was erased when "
        "the notification settled; it cannot be sent again: send a new notification"
    )
