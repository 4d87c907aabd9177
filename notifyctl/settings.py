"""One module: the one settings root and its sections are read from the same sources in one pass, and
this is the only module that reads the environment; ~490 lines.

Settings: one root object, built once (the CLI root callback, a standalone sub-app, ``serve`` or
worker start) and passed down. This module is the only place that reads the environment: every
component takes what it needs from the root it was given, so an environment variable changed
later does not change a running component.

Sources, highest first: keyword overrides, environment (``NOTIFY_*``), the config file
(``NOTIFY_CONFIG``, else ``<home>/config.toml``), defaults. The root holds:

- the main settings (``NOTIFY_<FIELD>``, top-level keys of the file);
- the sections ``api`` (``notifyctl serve``), ``dlq`` (alerts) and ``campaign``: typed, from
  ``NOTIFY_<SECTION>_<FIELD>`` and the file's ``[<section>]`` table (the older
  ``[provider_options.api]`` / ``[provider_options.campaign]`` are still read, below it);
- each provider's section: ``NOTIFY_<NAME>_<FIELD>`` over the file's ``[<name>]`` or
  ``[provider_options.<name>]`` table, kept as given in ``provider_options`` and validated by the
  provider's own ``Config`` class when it loads (:meth:`Settings.provider_settings`), so that a
  provider that is not used cannot stop every command.
"""

from __future__ import annotations

import json
import os
import re
import types
import typing
from collections.abc import Mapping
from contextvars import ContextVar
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)
from pydantic_settings.sources.utils import parse_env_vars

from notifyctl.errors import ConfigError
from notifyctl.home import ensure_home
from notifyctl.vocabulary import CATEGORIES, CHANNELS, PRIORITIES, PROVIDERS, ROUTES

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


#: Every provider's name (``worker.providers.REGISTRY``'s keys): ``NOTIFY_<NAME>_*`` are its settings.
PROVIDER_NAMES = PROVIDERS
#: The typed sections of the root, each from ``NOTIFY_<SECTION>_*`` and the file's ``[<section>]``.
SECTIONS = ("api", "dlq", "campaign")
#: The main settings' old SMTP fields, now the ``smtp`` provider's defaults (``smtp_host`` → ``host``).
_SMTP_FIELDS = ("host", "port", "username", "password", "starttls", "timeout")

M = TypeVar("M", bound=BaseModel)


class ApiConfig(BaseModel):
    """``notifyctl serve`` settings: ``NOTIFY_API_*`` or the config file's ``[api]`` table."""

    model_config = ConfigDict(extra="ignore")

    public_url: str | None = Field(
        None, description="external base URL (Twilio signs it); unset = the main public_url, else the request URL"
    )
    sendgrid_public_key: str | None = Field(
        None, description="SendGrid Signed Event Webhook verification key (base64 DER, from the SendGrid console)"
    )
    sendgrid_max_age: int = Field(600, ge=1, description="accepted SendGrid timestamp skew, seconds (replay window)")
    twilio_auth_token: SecretStr | None = Field(
        None, description="Twilio auth token for X-Twilio-Signature; unset = the twilio provider's auth_token"
    )
    sns_topic_arns: list[str] = Field(default_factory=list, description="SNS topics whose messages are accepted")
    sns_cert_map: dict[str, str] = Field(
        default_factory=dict,
        description="SigningCertURL → PEM text or PEM file path (pinned certificates; tests use it to avoid network)",
    )
    sns_max_age: int = Field(3600, ge=1, description="oldest accepted SNS message Timestamp, seconds")
    sns_auto_confirm: bool = Field(False, description="fetch the SubscribeURL of a verified SubscriptionConfirmation")
    brand: str = Field("notifyctl", description="brand name in SMS HELP replies")
    help_text: str = Field(
        "Reply STOP to unsubscribe, START to resubscribe. Msg&data rates may apply.",
        description="SMS HELP reply (add a contact: support URL or phone)",
    )
    max_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="largest accepted request body, webhooks but SendGrid's included (413 above)"
    )
    max_webhook_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="largest accepted SendGrid event batch, bytes (verified before parsing)"
    )


class DlqConfig(BaseModel):
    """DLQ alert thresholds: ``NOTIFY_DLQ_*`` or the config file's ``[dlq]``. A threshold left unset is not checked."""

    model_config = ConfigDict(extra="ignore")

    alert_depth: int | None = Field(1000, description="alert when the DLQ holds at least this many entries")
    alert_growth_per_min: float | None = Field(
        50.0, description="alert when this many entries per minute entered over the window"
    )
    alert_window_min: float = Field(5.0, gt=0, description="window for the growth rate, minutes")
    alert_webhook_url: SecretStr | None = Field(None, description="POST a JSON alert here (Slack, PagerDuty, ...)")
    alert_repeat_s: int = Field(900, ge=0, description="while still firing, alert again after this many seconds")
    alert_timeout_s: float = Field(5.0, gt=0, description="webhook request timeout, seconds")
    check_s: float = Field(
        10.0,
        gt=0,
        description="the pool checks the DLQ (alert, replay after an outage, probe of open circuits) this often, "
        "seconds; the first check half of it after start",
    )


class CampaignConfig(BaseModel):
    """Campaign settings: ``NOTIFY_CAMPAIGN_*`` or the config file's ``[campaign]`` table."""

    model_config = ConfigDict(extra="ignore")

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


def default_home() -> str:
    return str(Path.home() / ".notifyctl")


# The environment the root being built reads: ``os.environ`` unless ``Settings.from_environ`` gave one.
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("notifyctl_settings_environ", default=None)


def _environ() -> Mapping[str, str]:
    env = _ENVIRON.get()
    return os.environ if env is None else env


def _config_file(environ: Mapping[str, str], home: object = None) -> Path:
    """``NOTIFY_CONFIG``, else ``config.toml`` in the home (given, else ``NOTIFY_HOME``, else the default)."""
    explicit = environ.get("NOTIFY_CONFIG")
    if explicit:
        return Path(explicit)
    return Path(str(home or environ.get("NOTIFY_HOME") or default_home())) / "config.toml"


def _is_complex(annotation: Any) -> bool:
    """Whether an environment value for this annotation is JSON (lists, dicts, models)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_complex(a) for a in typing.get_args(annotation) if a is not type(None))
    if origin in (list, dict, set, tuple, frozenset) or annotation in (list, dict, set, tuple, frozenset):
        return True
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


class _Environment(EnvSettingsSource):
    """The main settings (pydantic-settings' own rules: ``NOTIFY_<FIELD>``, JSON for lists), from the
    environment the root is built from, plus every section's ``NOTIFY_<SECTION>_<FIELD>``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)

    def __call__(self) -> dict[str, Any]:
        try:
            data = super().__call__()
        except SettingsError as exc:  # a list or table that is not JSON
            m = re.search(r'field "(\w+)"', str(exc))
            name = m.group(1).upper() if m else "?"
            raise ConfigError(f"bad setting: NOTIFY_{name} is not JSON") from None
        env = self.env_vars  # lower-case names
        for section in SECTIONS:
            model = self.settings_cls.model_fields[section].annotation
            assert isinstance(model, type) and issubclass(model, BaseModel)
            values: dict[str, Any] = {}
            for name, field in model.model_fields.items():
                raw = env.get(f"notify_{section}_{name}")
                if raw is None:
                    continue
                if _is_complex(field.annotation):
                    try:
                        values[name] = json.loads(raw)
                    except ValueError:
                        var = f"NOTIFY_{section}_{name}".upper()
                        raise ConfigError(f"bad setting: {var} is not JSON") from None
                else:
                    values[name] = raw
            if values:
                data[section] = {**(data.get(section) or {}), **values}
        providers: dict[str, dict[str, str]] = {}
        for provider in PROVIDER_NAMES:
            prefix = f"notify_{provider}_"
            found = {k[len(prefix) :]: v for k, v in env.items() if k.startswith(prefix) and v is not None}
            if found:
                providers[provider] = found
        if providers:
            data["provider_env"] = providers
        return data


class Settings(BaseSettings):
    """Everything notifyctl can be told. Environment names are ``NOTIFY_`` + the field name in capitals."""

    model_config = SettingsConfigDict(env_prefix="NOTIFY_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path(default_home()), description="data directory")
    redis_url: str | None = Field(None, description="external Redis (>= 6.2); unset = embedded server")
    redis_shards: list[str] = Field(
        default_factory=list,
        description="several Redis servers, users sharded over them (notifyctl.shards); the first is shard 0 "
        "(redis_url, unset or the same); empty = one Redis, redis_url",
    )
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
    redis_replica_acks: int | None = Field(
        None,
        ge=0,
        description="Redis replicas that must hold a batch's lease before it is sent (WAIT, once per batch); "
        "unset = 1 for a redis+sentinel:// URL, else 0. A failover discards what the replicas had not "
        "received: without this a batch leased on the old primary could be sent again, in no doubt. The "
        "price: with fewer replicas connected, sends pause (and are retried) rather than risk a duplicate",
    )
    redis_replica_ack_timeout: float = Field(
        0.5, gt=0, description="seconds a batch waits for its replicas' acknowledgement before it is put back"
    )
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
        default_factory=dict,
        description="each provider's section as given: NOTIFY_<NAME>_* over the file's [NAME] or "
        "[provider_options.NAME]; validated by the provider (provider_settings)",
    )
    api: ApiConfig = Field(
        default_factory=lambda: ApiConfig.model_validate({}), description="notifyctl serve: NOTIFY_API_*, [api]"
    )
    dlq: DlqConfig = Field(
        default_factory=lambda: DlqConfig.model_validate({}), description="DLQ alerts: NOTIFY_DLQ_*, [dlq]"
    )
    campaign: CampaignConfig = Field(
        default_factory=lambda: CampaignConfig.model_validate({}), description="campaigns: NOTIFY_CAMPAIGN_*"
    )
    secret_key: SecretStr | None = Field(
        None, description="signs unsubscribe links and open pixels; unset = the shared database's, else home/secret.key"
    )

    public_url: str | None = Field(
        None, description="where `notifyctl serve` is reachable from outside (unsubscribe links, webhooks)"
    )
    postal_address: str | None = Field(None, description="sender's postal address, added to marketing email (CAN-SPAM)")

    email_from: str = "notifications@example.com"

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, data: Any) -> Any:
        """Fold the older spellings into the sections, below the newer ones: ``[provider_options.api]``
        (``.dlq``, ``.campaign``) under ``[api]``; a provider's ``[NAME]`` table over its
        ``[provider_options.NAME]``, and its ``NOTIFY_NAME_*`` variables over both; the main
        ``smtp_*`` settings under the ``smtp`` provider's own."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        options = {k: dict(v) for k, v in (data.get("provider_options") or {}).items() if isinstance(v, Mapping)}
        for section in SECTIONS:
            old = options.pop(section, None)
            if old:
                current = data.get(section)
                if isinstance(current, BaseModel):
                    current = current.model_dump(exclude_unset=True)
                data[section] = {**old, **(current or {})}
        smtp_defaults = {f: data.pop(f"smtp_{f}") for f in _SMTP_FIELDS if f"smtp_{f}" in data}
        if smtp_defaults:
            options["smtp"] = {**smtp_defaults, **options.get("smtp", {})}
        for name in PROVIDER_NAMES:
            table = data.pop(name, None)
            if isinstance(table, Mapping):
                options[name] = {**options.get(name, {}), **table}
        for name, values in (data.pop("provider_env", None) or {}).items():
            options[name] = {**options.get(name, {}), **values}
        data["provider_options"] = options
        return data

    @field_validator(
        "redis_url", "database_url", "redis_server_bin", "public_url", "postal_address", "host_name", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("redis_shards")
    @classmethod
    def _check_shards(cls, v: list[str]) -> list[str]:
        v = [u.strip() for u in v]
        if any(not u for u in v):
            raise ValueError("an empty URL in the list")
        if len(set(v)) != len(v):
            raise ValueError("a Redis URL given twice")
        return v

    @model_validator(mode="after")
    def _shard_zero(self) -> Settings:
        if self.redis_shards and self.redis_url and self.redis_url.strip() != self.redis_shards[0]:
            raise ValueError(
                "redis_url must be unset or the first of redis_shards (shard 0, which also holds the "
                "keys every host shares: circuits, pacing, provider tokens, metrics)"
            )
        return self

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
        environ = _environ()
        home = init_settings.init_kwargs.get("home") if isinstance(init_settings, InitSettingsSource) else None
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_config_file(environ, home))
        return (init_settings, _Environment(settings_cls, environ), toml)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """The root built from ``environ`` instead of the process's environment (``NOTIFY_CONFIG`` and
        ``NOTIFY_HOME`` in it find the config file too): ``from_environ({}, home=...)`` reads none."""
        token = _ENVIRON.set(environ)
        try:
            return cls(**overrides)
        finally:
            _ENVIRON.reset(token)

    def provider_settings(self, name: str, config_cls: type[M]) -> M:
        """Provider ``name``'s section, validated by its own ``Config`` class (a ``ValidationError``
        when a value is bad: the provider reports it as ``Misconfigured``). Environment values are
        text; a list or table is JSON."""
        values = dict(self.provider_options.get(name) or {})
        for key, value in values.items():
            field = config_cls.model_fields.get(key)
            if field is not None and isinstance(value, str) and _is_complex(field.annotation):
                try:
                    values[key] = json.loads(value)
                except ValueError:
                    pass  # validation names the field
        return config_cls.model_validate(values)

    @cached_property
    def rules(self) -> list[RateRule]:
        return [RateRule.parse(t) for t in self.rate_limits]

    @property
    def max_attempts(self) -> int:
        return len(self.retry_delays) + 1

    def providers_for(self, route: str) -> list[str]:
        """Ordered provider names for a route: ``push.ios``, ``push.android``, ``email``, ``sms``."""
        return list(getattr(self, "providers_" + route.replace(".", "_")))

    def provider_names(self, voice: bool = True) -> list[str]:
        """Every provider a route is configured with (and voice's, unless ``voice`` is false), sorted."""
        names = {n for route in ROUTES for n in self.providers_for(route)}
        return sorted(names | set(self.providers_voice) if voice else names)

    @property
    def sqlite_path(self) -> Path:
        return self.home / "notify.db"

    @property
    def outbox_dir(self) -> Path:
        return self.home / "outbox"

    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.sqlite_path}"


def provider_config(config_cls: type[M], name: str, settings: Settings) -> M:
    """Provider ``name``'s settings from the root (:meth:`Settings.provider_settings`)."""
    return settings.provider_settings(name, config_cls)


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """The settings root (from ``environ``, else the process's environment), with the home created
    private (0700), or an existing one tightened (``notifyctl.home.ensure_home``)."""
    s = Settings(**overrides) if environ is None else Settings.from_environ(environ, **overrides)
    ensure_home(s.home)
    return s
