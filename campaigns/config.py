"""Campaign settings: the root's ``campaign`` section (``NOTIFY_CAMPAIGN_*``, else the config file's
``[campaign]`` table, else the defaults of ``notifyctl.settings.CampaignConfig``)."""

from __future__ import annotations

from notifyctl.settings import CampaignConfig, Settings

__all__ = ["CampaignConfig", "campaign_config"]


def campaign_config(settings: Settings) -> CampaignConfig:
    return settings.campaign
