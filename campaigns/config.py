"""Campaign settings: environment ``NOTIFY_CAMPAIGN_*``, else the config file's
``[provider_options.campaign]`` table, else the defaults below."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CampaignConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NOTIFY_CAMPAIGN_", extra="ignore")

    sms_cost_per_segment: float = Field(0.0079, ge=0, description="price of one SMS segment, for dry-run estimates")
    currency: str = Field("USD", description="currency of sms_cost_per_segment")
    default_quiet_hours: str | None = Field(
        None, description="quiet hours applied to marketing campaigns without --quiet-hours, e.g. 21:00-08:00"
    )
    default_rate: float = Field(100.0, gt=0, description="notifications/s produced when --rate is not given")
    chunk_size: int = Field(1000, ge=1, le=10000, description="segment rows per SQL statement")
    max_reported_errors: int = Field(100, ge=0, description="bad rows listed (all are counted)")
    segment_timeout: float = Field(
        60.0, gt=0, description="seconds a --segment-sql query may work for one row (statement timeout)"
    )
    segment_max_value: int = Field(
        1_000_000, ge=1000, description="longest value (bytes/characters) a --segment-sql query may return"
    )


def campaign_config(settings: Any) -> CampaignConfig:
    from notifyctl.settings import provider_config

    return provider_config(CampaignConfig, "campaign", settings)
