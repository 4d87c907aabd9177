"""AWS plumbing shared by the AWS providers (SES email, SNS SMS): settings common to both, one
boto3 client per provider, and the mapping of AWS errors that mean the same across services.

Each AWS provider subclasses :class:`AwsConfig` with its own env prefix and maps its own error
codes first, then falls back to :func:`generic_outcome`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from notifyctl.masking import mask
from notifyctl.settings import provider_config
from worker.providers.base import Message, Misconfigured, Outcome, Permanent, Retry, error_text
from worker.providers.base import retry_after as parse_retry_after

log = logging.getLogger(__name__)

#: Error codes that mean "try again later", across AWS protocols (rest-json and query).
RETRY_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "Throttled",
        "TooManyRequestsException",
        "RequestThrottled",
        "RequestThrottledException",
        "LimitExceededException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InternalFailure",
        "InternalError",
        "InternalServerError",
        "InternalServerException",
        "RequestTimeout",
        "RequestTimeoutException",
        "KMSThrottling",
    }
)

#: Credentials / signing problems: the same request will never succeed.
AUTH_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "IncompleteSignatureException",
        "MissingAuthenticationToken",
        "MissingAuthenticationTokenException",
        "AccessDenied",
        "AccessDeniedException",
        "AuthorizationError",
        "InvalidSecurity",
        "ExpiredToken",
        "ExpiredTokenException",
    }
)


class AwsConfig(BaseModel):
    """Settings common to the AWS providers (each provider subclasses it with its own env prefix)."""

    model_config = ConfigDict(extra="ignore")

    region: str = Field("us-east-1", description="AWS region")
    endpoint_url: str | None = Field(
        None, description="API endpoint (a local sandbox); unset = AWS (or boto3's AWS_ENDPOINT_URL_*)"
    )
    access_key_id: str | None = Field(None, description="access key id; unset = boto3 default chain")
    secret_access_key: SecretStr | None = Field(None, description="secret access key")
    session_token: SecretStr | None = Field(None, description="session token for temporary credentials")
    concurrency: int = Field(16, ge=1, le=512, description="parallel API calls within one batch")
    max_pool_connections: int | None = Field(None, ge=1, description="HTTP connection pool size; unset = concurrency")
    timeout: float = Field(10.0, gt=0, description="connect and read timeout, seconds")
    max_attempts: int = Field(1, ge=1, le=10, description="botocore attempts per call (1 = pipeline retries)")


def build_config(config_cls: type[AwsConfig], name: str, settings: Any) -> Any:
    try:
        config = provider_config(config_cls, name, settings)
    except ValidationError as exc:
        raise Misconfigured(f"{name}: invalid settings: {_validation_summary(exc)}") from None
    if bool(config.access_key_id) != bool(config.secret_access_key):
        raise Misconfigured(f"{name}: set both access_key_id and secret_access_key, or neither")
    if config.endpoint_url and not re.match(r"^https?://[^/\s]+", config.endpoint_url):
        raise Misconfigured(f"{name}: endpoint_url must be an http(s) URL, got {config.endpoint_url!r}")
    return config


def _validation_summary(exc: ValidationError) -> str:
    # Never echo input values (they may be secrets): field names and messages only.
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def make_client(service: str, config: AwsConfig) -> Any:
    """One boto3 client (thread-safe) with low retries, timeouts and a pool sized for ``concurrency``."""
    boto_config = BotoConfig(
        region_name=config.region,
        connect_timeout=config.timeout,
        read_timeout=config.timeout,
        max_pool_connections=config.max_pool_connections or config.concurrency,
        retries={"total_max_attempts": config.max_attempts, "mode": "standard"},
    )
    kwargs: dict[str, Any] = {"config": boto_config, "region_name": config.region}
    if config.endpoint_url:
        kwargs["endpoint_url"] = config.endpoint_url
    if config.access_key_id and config.secret_access_key:
        kwargs["aws_access_key_id"] = config.access_key_id
        kwargs["aws_secret_access_key"] = config.secret_access_key.get_secret_value()
        if config.session_token:
            kwargs["aws_session_token"] = config.session_token.get_secret_value()
    session = boto3.session.Session()
    return session.client(service, **kwargs)


def describe_common(config: AwsConfig) -> dict[str, str]:
    return {
        "region": config.region,
        "endpoint_url": config.endpoint_url or "(AWS default)",
        "access_key_id": mask(config.access_key_id, reveal_from=9) if config.access_key_id else "(default chain)",
        "secret_access_key": "(set)" if config.secret_access_key else "(default chain)",
        "session_token": "(set)" if config.session_token else "(unset)",
        "concurrency": str(config.concurrency),
        "timeout": str(config.timeout),
        "max_attempts": str(config.max_attempts),
    }


def error_parts(exc: ClientError) -> tuple[str, str, int, float | None]:
    """(code, message, http status, Retry-After seconds or None) of a botocore ClientError."""
    resp = exc.response or {}
    err = resp.get("Error") or {}
    meta = resp.get("ResponseMetadata") or {}
    code = str(err.get("Code") or "")
    message = error_text(err.get("Message") or "")
    status = int(meta.get("HTTPStatusCode") or 0)
    return code, message, status, parse_retry_after((meta.get("HTTPHeaders") or {}).get("retry-after"))


def transport_outcome(exc: Exception) -> Outcome:
    """Outcome for a non-ClientError failure of one call (network, credentials, parameters)."""
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return Permanent(f"no usable AWS credentials: {type(exc).__name__}")
    if isinstance(exc, ParamValidationError):
        return Permanent(f"request rejected by botocore validation: {exc}")
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return Retry(f"network error: {type(exc).__name__}")
    if isinstance(exc, BotoCoreError):
        return Retry(f"AWS client error: {type(exc).__name__}")
    return Retry(f"unexpected error: {type(exc).__name__}: {exc}")


def generic_outcome(code: str, message: str, status: int, retry_after: float | None) -> Outcome:
    reason = f"{code or status}: {message}".strip()
    if status == 429 or "throttl" in code.lower() or code in ("TooManyRequestsException", "LimitExceededException"):
        return Retry(reason, retry_after, throttled=True)
    if code in RETRY_CODES or status >= 500:
        return Retry(reason, retry_after)
    if code in AUTH_CODES or status in (401, 403):
        return Permanent(f"AWS rejected the credentials: {reason}")
    return Permanent(reason)


def run_batch(pool: ThreadPoolExecutor, fn: Callable[[Message], Outcome], messages: Sequence[Message]) -> list[Outcome]:
    """Apply ``fn`` to each message, concurrently when there is more than one; never raises per message."""

    def guarded(m: Message) -> Outcome:
        try:
            return fn(m)
        except Exception as exc:  # noqa: BLE001 - one message's failure must not sink the batch
            log.warning("unexpected error sending %s: %s", m.delivery_id, type(exc).__name__)
            return Retry(f"unexpected error: {type(exc).__name__}")

    if not messages:
        return []
    if len(messages) == 1:
        return [guarded(messages[0])]
    return list(pool.map(guarded, messages))
