"""Settings: one object, built once (CLI root callback or worker start) and passed down.

Sources, highest first: keyword overrides, environment (``NOTIFY_*``), the config file
(``NOTIFY_CONFIG``, else ``$NOTIFY_HOME/config.toml``), defaults. Nothing reads the
environment at import time.
"""

from __future__ import annotations

import os
import re
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from notifyctl.home import ensure_home
from notifyctl.vocabulary import CATEGORIES, CHANNELS, PRIORITIES

__all__ = ["CATEGORIES", "CHANNELS", "PRIORITIES"]  # re-exported: long imported from here

_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RULE_RE = re.compile(r"^(push|email|sms|\*):(transactional|marketing|alerts|\*):(\d+)/(\d*)([smhd])$")


class RateRule(BaseModel):
    """At most ``limit`` sends of ``channel`` (and ``category``, ``*`` = any) per user per ``window`` s."""

    channel: str
    category: str
    limit: int
    window: int

    @classmethod
    def parse(cls, text: str) -> RateRule:
        m = _RULE_RE.match(text.strip())
        if not m:
            raise ValueError(f"bad rate limit rule {text!r}: expected CHANNEL:CATEGORY:N/WINDOW such as push:*:3/1h")
        channel, category, limit, n, unit = m.groups()
        return cls(channel=channel, category=category, limit=int(limit), window=int(n or 1) * _WINDOW_UNITS[unit])

    def applies(self, channel: str, category: str) -> bool:
        return self.channel in ("*", channel) and self.category in ("*", category)

    @property
    def key(self) -> str:
        return f"{self.channel}:{self.category}:{self.window}"


def _config_file() -> Path:
    explicit = os.environ.get("NOTIFY_CONFIG")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("NOTIFY_HOME", default_home())) / "config.toml"


def default_home() -> str:
    return str(Path.home() / ".notifyctl")


class Settings(BaseSettings):
    """Everything notifyctl can be told. Environment names are ``NOTIFY_`` + the field name in capitals."""

    model_config = SettingsConfigDict(env_prefix="NOTIFY_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path(default_home()), description="data directory")
    redis_url: str | None = Field(None, description="external Redis (>= 6.2); unset = embedded server")
    database_url: str | None = Field(None, description="SQL database; unset = SQLite under home")
    redis_server_bin: str | None = Field(None, description="redis-server binary for the embedded server")
    templates_dir: Path | None = Field(None, description="extra template directory (overrides shipped ones)")

    dedup_ttl: int = Field(86400, description="dedup window for dedup_key, seconds")
    retention_days: int | None = Field(
        None, ge=1, description="`notifyctl purge` deletes notifications older than this (days) when not told"
    )
    rate_limits: list[str] = Field(
        default_factory=lambda: ["push:*:3/1h", "email:marketing:1/1d", "sms:*:5/1d"],
        description="per-user limits CHANNEL:CATEGORY:N/WINDOW",
    )
    rate_limit_bypass_high: bool = Field(
        True, description="priority high (OTPs, security alerts) is counted but never held back"
    )
    retry_delays: list[int] = Field(
        default_factory=lambda: [30, 300, 1800],
        description="seconds before attempts 2, 3, 4...; after the last, the delivery goes to the DLQ",
    )
    batch_size: int = Field(1000, description="notifications per RQ job for bulk traffic")
    job_timeout: int = Field(600, description="RQ job timeout, seconds")
    claim_ttl: float = Field(
        20.0,
        gt=0,
        description="lease on a delivery while a worker sends it, seconds (renewed while the worker lives, "
        "through the provider call; another worker takes it over only once expired). Keep it above the "
        "longest provider call",
    )
    sent_marker_ttl: int = Field(7 * 86400, description="how long Redis remembers a sent delivery, seconds")
    reconcile_limit: int = Field(20000, description="notifications the reconciler queues or checks per round (1/s)")
    recovery_grace: int = Field(5, description="seconds before an unfinished notification is checked")
    redis_socket_timeout: float = Field(
        10.0, gt=0, description="seconds a Redis command (or connecting) may take before it fails"
    )
    worker_dequeue_timeout: int = Field(
        60,
        ge=1,
        description="seconds an idle worker's blocking dequeue waits before it renews (its reads may take 10 s more)",
    )
    worker_heartbeat: float = Field(2.0, description="worker liveness refresh, seconds")
    worker_alive_ttl: int = Field(10, description="a worker silent this long is dead, seconds")
    host_name: str | None = Field(None, description="this host's name in `status` (default: the hostname)")
    log_format: str = Field("text", description="text or json (one JSON object per line)")
    log_level: str = Field("WARNING", description="DEBUG, INFO, WARNING or ERROR")
    default_timezone: str = "UTC"
    default_region: str = Field("US", description="region for phone numbers written without +country code")

    providers_push_ios: list[str] = Field(default_factory=lambda: ["outbox"])
    providers_push_android: list[str] = Field(default_factory=lambda: ["outbox"])
    providers_email: list[str] = Field(default_factory=lambda: ["outbox"])
    providers_sms: list[str] = Field(default_factory=lambda: ["outbox"])
    providers_voice: list[str] = Field(
        default_factory=list, description="voice-call fallback for OTPs when every SMS provider failed"
    )
    circuit_threshold: int = Field(5, description="failing batches in a row that open a provider's circuit")
    circuit_cooldown: float = Field(30.0, description="seconds a circuit stays open before a trial batch")
    pace_max_wait: float = Field(
        2.0, ge=0, description="seconds a job waits for a provider's pace before it holds the rest of its batch"
    )
    lag_alert_high: float = Field(1.0, gt=0, description="alert when the oldest high-priority job waits longer, s")
    lag_alert_normal: float = Field(60.0, gt=0, description="console threshold for the normal queue's lag, seconds")
    lag_alert_low: float = Field(600.0, gt=0, description="console threshold for the low queue's lag, seconds")

    provider_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-provider settings from the config file's [provider_options.NAME]"
    )

    public_url: str | None = Field(
        None, description="where `notifyctl serve` is reachable from outside (unsubscribe links, webhooks)"
    )
    postal_address: str | None = Field(None, description="sender's postal address, added to marketing email (CAN-SPAM)")

    email_from: str = "notifications@example.com"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
    smtp_timeout: float = 10.0

    @field_validator(
        "redis_url", "database_url", "redis_server_bin", "public_url", "postal_address", "host_name", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("rate_limits")
    @classmethod
    def _check_rules(cls, v: list[str]) -> list[str]:
        for text in v:
            RateRule.parse(text)
        return v

    @field_validator("retry_delays")
    @classmethod
    def _check_delays(cls, v: list[int]) -> list[int]:
        if any(d < 0 for d in v):
            raise ValueError("retry delays must be >= 0")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_config_file())
        return (init_settings, env_settings, toml)

    @cached_property
    def rules(self) -> list[RateRule]:
        return [RateRule.parse(t) for t in self.rate_limits]

    @property
    def max_attempts(self) -> int:
        return len(self.retry_delays) + 1

    def providers_for(self, route: str) -> list[str]:
        """Ordered provider names for a route: ``push.ios``, ``push.android``, ``email``, ``sms``."""
        return list(getattr(self, "providers_" + route.replace(".", "_")))

    @property
    def sqlite_path(self) -> Path:
        return self.home / "notify.db"

    @property
    def outbox_dir(self) -> Path:
        return self.home / "outbox"

    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.sqlite_path}"


def provider_config(config_cls: type[BaseSettings], name: str, settings: Settings) -> Any:
    """Build a provider's own settings class (env prefix ``NOTIFY_<NAME>_``): environment first,
    then the config file's ``[provider_options.<name>]`` table, then the class defaults."""
    from_env = config_cls().model_dump(exclude_unset=True)  # type: ignore[call-arg]
    return config_cls(**{**settings.provider_options.get(name, {}), **from_env})


def load_settings(**overrides: Any) -> Settings:
    """The settings, with the home created private (0700), or an existing one tightened
    (``notifyctl.home.ensure_home``)."""
    s = Settings(**overrides)
    ensure_home(s.home)
    return s
