"""AWS SNS SMS through boto3's ``sns`` client: one ``Publish(PhoneNumber=...)`` per message, sent
concurrently from a thread pool over one shared boto3 client.

``AWS.SNS.SMS.SMSType`` is ``Transactional`` for the transactional and alerts categories (OTPs,
security alerts: routed for reliability) and ``Promotional`` otherwise (routed for cost).

Settings (env ``NOTIFY_SNS_*`` or ``[provider_options.sns]``): see :class:`Config`.

Note: real SNS *accepts* a publish to a number that replied STOP and drops it later (the opt-out
shows only in delivery status logs). An ``OptedOut`` error code, or an error message saying
"opted out", is still mapped to ``InvalidAddress`` for gateways and sandboxes that report it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from botocore.exceptions import ClientError
from pydantic import ConfigDict, Field, field_validator

from worker.providers.aws import (
    AwsConfig,
    build_config,
    describe_common,
    error_parts,
    generic_outcome,
    make_client,
    run_batch,
    transport_outcome,
)
from worker.providers.base import InvalidAddress, Message, Outcome, Permanent, Sent

E164_RE = re.compile(r"^\+[1-9]\d{1,14}$")
TRANSACTIONAL_CATEGORIES = frozenset({"transactional", "alerts"})
_SENDER_ID_RE = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9]{1,11}$")
_BAD_PARAMETER_CODES = frozenset({"InvalidParameter", "ParameterValueInvalid", "ValidationException"})


class Config(AwsConfig):
    model_config = ConfigDict(extra="ignore")

    sender_id: str | None = Field(None, description="alphanumeric sender id (1-11 chars, countries that allow it)")
    origination_number: str | None = Field(None, description="E.164 long code / toll-free number to send from")
    max_price: str | None = Field(None, description="max USD price per message (AWS.SNS.SMS.MaxPrice)")

    @field_validator("sender_id")
    @classmethod
    def _check_sender_id(cls, v: str | None) -> str | None:
        if v and not _SENDER_ID_RE.match(v):
            raise ValueError("sender_id must be 1-11 letters/digits with at least one letter")
        return v

    @field_validator("origination_number")
    @classmethod
    def _check_origination(cls, v: str | None) -> str | None:
        if v and not E164_RE.match(v):
            raise ValueError("origination_number must be E.164 (+15551234567)")
        return v


def sms_type(category: str) -> str:
    return "Transactional" if category in TRANSACTIONAL_CATEGORIES else "Promotional"


def _attr(value: str, data_type: str = "String") -> dict[str, str]:
    return {"DataType": data_type, "StringValue": value}


class Provider:
    name: ClassVar[str] = "sns"
    routes: ClassVar[frozenset[str]] = frozenset({"sms"})

    def __init__(self, settings: Any, redis: Any | None = None) -> None:  # no state shared between workers
        self.config: Config = build_config(Config, "sns", settings)
        self.client = make_client("sns", self.config)
        self._pool = ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="sns")

    def send(self, messages: Sequence[Message]) -> list[Outcome]:
        return run_batch(self._pool, self._send_one, messages)

    def _attributes(self, m: Message) -> dict[str, dict[str, str]]:
        attrs = {"AWS.SNS.SMS.SMSType": _attr(sms_type(m.category))}
        if self.config.sender_id:
            attrs["AWS.SNS.SMS.SenderID"] = _attr(self.config.sender_id)
        if self.config.origination_number:
            attrs["AWS.MM.SMS.OriginationNumber"] = _attr(self.config.origination_number)
        if self.config.max_price:
            attrs["AWS.SNS.SMS.MaxPrice"] = _attr(self.config.max_price, "Number")
        return attrs

    def _send_one(self, m: Message) -> Outcome:
        if not E164_RE.match(m.address):
            return InvalidAddress(f"{m.address!r} is not an E.164 phone number")
        text = m.content.get("text", "")
        if not text:
            return Permanent("sms has no text")
        try:
            resp = self.client.publish(PhoneNumber=m.address, Message=text, MessageAttributes=self._attributes(m))
        except ClientError as exc:
            return classify(*error_parts(exc))
        except Exception as exc:  # noqa: BLE001
            return transport_outcome(exc)
        return Sent(str(resp["MessageId"]))

    def describe(self) -> dict[str, str]:
        return {
            "provider": self.name,
            **describe_common(self.config),
            "sender_id": self.config.sender_id or "(none)",
            "origination_number": self.config.origination_number or "(none)",
            "max_price": self.config.max_price or "(account default)",
        }

    def check(self) -> str | None:
        """Credentials work and SNS answers (GetSMSAttributes); sends nothing."""
        try:
            self.client.get_sms_attributes(attributes=["DefaultSMSType"])
        except ClientError as exc:
            code, message, status, _ = error_parts(exc)
            return f"SNS refused GetSMSAttributes: {code or status}: {message}"
        except Exception as exc:  # noqa: BLE001
            return f"cannot reach SNS ({self.config.endpoint_url or self.config.region}): {type(exc).__name__}"
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()


def classify(code: str, message: str, status: int, retry_after: float | None) -> Outcome:
    """Map an SNS Publish error to an outcome."""
    reason = f"{code or status}: {message}".strip()
    lowered = message.lower()
    if code == "OptedOut" or "opted out" in lowered or "opted-out" in lowered:
        return InvalidAddress(f"phone number opted out ({reason})", kind="stopped")
    if code in _BAD_PARAMETER_CODES:
        if "phone" in lowered:
            return InvalidAddress(reason)
        return Permanent(reason)
    return generic_outcome(code, message, status, retry_after)
