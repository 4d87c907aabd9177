"""The API key table now lives in :mod:`notifyctl.models` (the foundation, which ``notifyctl.db``
reads without importing upward); the name stays importable from here."""

from notifyctl.models import ApiKey

__all__ = ["ApiKey"]
