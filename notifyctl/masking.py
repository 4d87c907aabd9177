"""The one secret masker: what `notifyctl providers` and each provider's ``describe()`` show of a secret.

``mask(secret)`` is ``(not set)`` when there is none, ``****`` and the last four characters when the
secret is long enough that four characters give nothing useful away (``reveal_from``, 16 by default:
an API key, an auth token), else ``(set)``. Identifiers that are only half secret (a key id, an access
key id) pass ``reveal_from=9``.
"""

from __future__ import annotations

from pydantic import SecretStr

NOT_SET = "(not set)"
SET = "(set)"


def mask(secret: str | SecretStr | None, *, reveal_from: int = 16) -> str:
    value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    if not value:
        return NOT_SET
    return "****" + value[-4:] if len(value) >= reveal_from else SET
