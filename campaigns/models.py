"""The campaign table now lives in :mod:`notifyctl.models` (the foundation, which ``notifyctl.db``
and the worker read without importing upward); these names stay importable from here."""

from notifyctl.models import Campaign, CampaignStatus

__all__ = ["Campaign", "CampaignStatus"]
