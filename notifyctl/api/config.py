"""``notifyctl serve`` settings: the root's ``api`` section (``notifyctl.settings.ApiConfig``), with
what it falls back on filled in; apart from the app so that the webhook modules can read them
without importing the app that imports them."""

from __future__ import annotations

from pydantic import SecretStr

from notifyctl.settings import ApiConfig, Settings

__all__ = ["ApiConfig", "load_api_config"]


def load_api_config(settings: Settings) -> ApiConfig:
    """``settings.api``, its ``public_url`` defaulting to the main one and its ``twilio_auth_token``
    to the twilio provider's ``auth_token``."""
    update: dict[str, object] = {}
    cfg = settings.api
    if not cfg.public_url and settings.public_url:
        update["public_url"] = settings.public_url
    if cfg.twilio_auth_token is None:
        token = (settings.provider_options.get("twilio") or {}).get("auth_token")
        if isinstance(token, SecretStr | str) and token:
            update["twilio_auth_token"] = token if isinstance(token, SecretStr) else SecretStr(token)
    return cfg.model_copy(update=update) if update else cfg
