"""SES's answers → outcomes: errors of a whole call (``SendEmail``, ``SendBulkEmail``) and the
per-entry ``BulkEmailEntryResults`` of a bulk call.

``SUCCESS`` → Sent(MessageId); ``ACCOUNT_THROTTLED`` → throttled Retry; ``ACCOUNT_DAILY_QUOTA_EXCEEDED``
→ Retry in an hour; ``TRANSIENT_FAILURE``, ``FAILED`` and unknown statuses → Retry;
``INVALID_PARAMETER`` naming a bad recipient address → InvalidAddress; the other statuses (rejected,
unverified sender, paused or suspended sending, missing configuration set...) → Permanent. A call
error naming a bad address (not our From address) → InvalidAddress; SES's permanent codes →
Permanent; the rest as any AWS error (:func:`worker.providers.aws.generic_outcome`).
"""

from __future__ import annotations

import re
from typing import Any

from worker.providers.aws import AUTH_CODES, generic_outcome
from worker.providers.base import InvalidAddress, Outcome, Permanent, Retry, Sent

#: SES says an address (a recipient, in practice) cannot be parsed.
BAD_ADDRESS_RE = re.compile(
    r"illegal address|invalid email address|missing final '@domain'|missing domain|"
    r"domain contains|local address contains|domain ends with|domain starts with|"
    r"address contains|local part",
    re.IGNORECASE,
)
PERMANENT_CODES = frozenset(
    {
        "MessageRejected",
        "MailFromDomainNotVerifiedException",
        "MailFromDomainNotVerified",
        "BadRequestException",
        "InvalidParameterValue",
        "AccountSuspendedException",
        "SendingPausedException",
        "NotFoundException",
        "ConfigurationSetDoesNotExist",
        "ConfigurationSetSendingPausedException",
        "AccountSendingPausedException",
    }
)
#: BulkEmailStatus values (botocore's sesv2 model) other than SUCCESS, by outcome.
BULK_RETRY_STATUSES = frozenset({"TRANSIENT_FAILURE", "FAILED"})
BULK_PERMANENT_STATUSES = frozenset(
    {
        "MESSAGE_REJECTED",
        "MAIL_FROM_DOMAIN_NOT_VERIFIED",
        "CONFIGURATION_SET_NOT_FOUND",
        "TEMPLATE_NOT_FOUND",
        "ACCOUNT_SUSPENDED",
        "INVALID_SENDING_POOL_NAME",
        "ACCOUNT_SENDING_PAUSED",
        "CONFIGURATION_SET_SENDING_PAUSED",
    }
)
#: Answers meaning the endpoint or the credentials do not offer SendBulkEmail at all (an IAM policy
#: without ses:SendBulkEmail, an SES-compatible endpoint such as moto without the operation).
_UNKNOWN_OPERATION_CODES = frozenset({"UnknownOperationException", "InvalidAction", "NotImplemented", "404", "501"})


def _bad_recipient(text: str, from_address: str) -> bool:
    return bool(BAD_ADDRESS_RE.search(text)) and from_address.lower() not in text.lower()


def classify(
    code: str, message: str, status: int, retry_after: float | None, from_address: str, configuration_set: str | None
) -> Outcome:
    """Map an SES error for a whole call to an outcome."""
    reason = f"{code or status}: {message}".strip()
    if code in ("BadRequestException", "InvalidParameterValue") and _bad_recipient(message, from_address):
        return InvalidAddress(reason)
    if "daily message quota exceeded" in message.lower():
        return Retry(reason, retry_after if retry_after is not None else 3600.0)
    if code == "NotFoundException":
        return Permanent(f"{reason} (configuration set {configuration_set!r}?)")
    if code in PERMANENT_CODES:
        return Permanent(reason)
    return generic_outcome(code, message, status, retry_after)


def entry_outcome(result: dict[str, Any], from_address: str) -> Outcome:
    """Map one ``BulkEmailEntryResult`` {Status, Error, MessageId} to an outcome."""
    status = str(result.get("Status") or "")
    error = str(result.get("Error") or "")
    reason = f"{status}: {error}".strip().rstrip(":")
    if status == "SUCCESS":
        if result.get("MessageId"):
            return Sent(str(result["MessageId"]))
        return Retry("SUCCESS without a MessageId")
    if status == "ACCOUNT_THROTTLED":
        return Retry(reason, None, throttled=True)
    if status == "ACCOUNT_DAILY_QUOTA_EXCEEDED":
        return Retry(reason, 3600.0)
    if status in ("INVALID_PARAMETER", "FAILED") and _bad_recipient(error, from_address):
        return InvalidAddress(reason)
    if status in BULK_PERMANENT_STATUSES or status == "INVALID_PARAMETER":
        return Permanent(reason)
    return Retry(reason or "SES bulk entry without a status")  # TRANSIENT_FAILURE, FAILED, unknown


def bulk_refused(code: str, message: str, status: int) -> bool:
    """Whether a SendBulkEmail error says the operation itself is refused (not this call's content)."""
    if code in _UNKNOWN_OPERATION_CODES or status in (405, 501):
        return True
    if status == 404 and code != "NotFoundException":  # NotFoundException: a configuration set or template
        return True
    return code in AUTH_CODES and "sendbulkemail" in message.lower()
