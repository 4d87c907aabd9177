"""``notifyctl serve`` settings (``ApiConfig``), apart from the app so that the webhook modules
can read them without importing the app that imports them."""

from __future__ import annotations

from typing import Any

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from notifyctl.errors import ConfigError, validation_message
from notifyctl.settings import provider_config
from worker.providers.twilio import Config as TwilioConfig

__all__ = ["ApiConfig", "load_api_config"]


class ApiConfig(BaseSettings):
    """``notifyctl serve`` settings: environment ``NOTIFY_API_*`` or the config file's ``[provider_options.api]``."""

    model_config = SettingsConfigDict(env_prefix="NOTIFY_API_", extra="ignore")

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


def load_api_config(settings: Any) -> ApiConfig:
    try:
        cfg: ApiConfig = provider_config(ApiConfig, "api", settings)
    except ValidationError as exc:
        raise ConfigError(f"bad API setting: {validation_message(exc)}") from None
    if not cfg.public_url and getattr(settings, "public_url", None):
        cfg.public_url = settings.public_url
    if cfg.twilio_auth_token is None:
        try:
            cfg.twilio_auth_token = provider_config(TwilioConfig, "twilio", settings).auth_token
        except ValidationError:
            pass
    return cfg
