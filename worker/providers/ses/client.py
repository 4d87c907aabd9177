"""Amazon SES v2 (email) through boto3's ``sesv2`` client.

Two paths, chosen per message within each batch:

- ``SendBulkEmail`` for messages of the batch that share the same rendered subject, text and html
  (at least two of them; ``bulk_size``, at most 50, entries per call). The content goes inline as
  ``DefaultContent.Template.TemplateContent`` (no stored template) with empty ``TemplateData``;
  headers that every message of the group has with the same value go in ``Template.Headers``,
  the others (a per-user ``List-Unsubscribe`` URL, say) in each entry's ``ReplacementHeaders``,
  which SES applies per recipient. Each entry's ``ReplacementTags`` carry the delivery id.
  ``BulkEmailEntryResults[i]`` maps to message i: ``SUCCESS`` -> Sent(MessageId);
  ``ACCOUNT_THROTTLED`` -> throttled Retry; ``ACCOUNT_DAILY_QUOTA_EXCEEDED`` -> Retry in an hour;
  ``TRANSIENT_FAILURE``, ``FAILED`` and unknown statuses -> Retry; ``INVALID_PARAMETER`` naming a bad
  address -> InvalidAddress; the other statuses (rejected, unverified sender, paused or suspended
  sending, missing configuration set...) -> Permanent. An error for the whole call applies to all
  its messages, except one that names a bad address, which sends that chunk again one by one, and
  one that refuses the operation itself (an IAM policy without ``ses:SendBulkEmail``, an endpoint
  such as moto without it: ``bulk_refused``): the chunk goes through ``SendEmail``, one warning is
  logged per process, and bulk is not tried again for ``bulk_reprobe`` seconds (900).
- ``SendEmail``, one call per message (``Content.Simple``: subject, text/html body, headers), for
  everything else: content no other message of the batch shares; content or a header value that
  contains ``{{`` (SES would read it as a template placeholder; bulk content is never escaped);
  more than 15 headers; ``bulk`` off; or a botocore too old to know inline ``TemplateContent``
  (bulk off) or ``Template.Headers``/``ReplacementHeaders`` (then messages with headers use
  ``SendEmail``). Marketing mail whose footer carries a per-user unsubscribe URL therefore has
  unique content and goes this way.

Calls (bulk chunks and single sends alike) run concurrently from a thread pool over one shared,
thread-safe boto3 client (its connection pool is sized to the concurrency). ``EmailTags`` /
``ReplacementTags`` carry our ``delivery_id`` so SES event records (through a configuration set)
can be joined back to the delivery.

botocore's own retries are kept low (``max_attempts`` 1 by default): the pipeline owns retries.

Settings (env ``NOTIFY_SES_*`` or ``[provider_options.ses]``): see :class:`Config`. The AWS
plumbing shared with the SNS provider is :mod:`worker.providers.aws`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from email.charset import BASE64, Charset
from email.header import Header
from typing import Any, ClassVar

from botocore.exceptions import ClientError
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from worker.providers.aws import (
    AUTH_CODES,
    AwsConfig,
    build_config,
    describe_common,
    error_parts,
    generic_outcome,
    make_client,
    run_batch,
    transport_outcome,
)
from worker.providers.base import InvalidAddress, Message, Misconfigured, Outcome, Permanent, Retry, Sent

log = logging.getLogger(__name__)


class Config(AwsConfig):
    model_config = SettingsConfigDict(env_prefix="NOTIFY_SES_", extra="ignore")

    from_address: str | None = Field(None, description="From address; unset = main settings email_from")
    configuration_set: str | None = Field(None, description="SES configuration set (event publishing)")
    bulk: bool = Field(True, description="send messages of a batch with identical content through SendBulkEmail")
    bulk_size: int = Field(50, ge=1, le=50, description="entries per SendBulkEmail call (SES allows 50)")
    bulk_reprobe: float = Field(
        900.0, gt=0, description="seconds before SendBulkEmail is tried again after the endpoint refused it"
    )


#: SES says an address (a recipient, in practice) cannot be parsed.
_BAD_ADDRESS_RE = re.compile(
    r"illegal address|invalid email address|missing final '@domain'|missing domain|"
    r"domain contains|local address contains|domain ends with|domain starts with|"
    r"address contains|local part",
    re.IGNORECASE,
)
_TAG_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_HEADER_NAME_RE = re.compile(r"^[!-9;-~]{1,126}$")
_PERMANENT_CODES = frozenset(
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
#: SES allows at most 15 headers on a message.
MAX_HEADERS = 15
#: Answers meaning the endpoint or the credentials do not offer SendBulkEmail at all (an IAM policy
#: without ses:SendBulkEmail, an SES-compatible endpoint such as moto without the operation).
_UNKNOWN_OPERATION_CODES = frozenset({"UnknownOperationException", "InvalidAction", "NotImplemented", "404", "501"})
_warned_bulk_refused = False  # one warning per process


def bulk_refused(code: str, message: str, status: int) -> bool:
    """Whether a SendBulkEmail error says the operation itself is refused (not this call's content)."""
    if code in _UNKNOWN_OPERATION_CODES or status in (405, 501):
        return True
    if status == 404 and code != "NotFoundException":  # NotFoundException: a configuration set or template
        return True
    return code in AUTH_CODES and "sendbulkemail" in message.lower()


class _BulkRefused(Retry):
    """Internal: the chunk's SendBulkEmail call was refused; its messages go through SendEmail."""


def tag_value(value: str) -> str:
    """SES tag values allow only ASCII letters, digits, ``_`` and ``-`` (1..256 chars)."""
    return (_TAG_BAD_CHARS.sub("_", value) or "_")[:256]


def header_value(value: str) -> str:
    """SES header values must be printable ASCII: strip line breaks, RFC 2047-encode anything else."""
    value = " ".join(str(value).split())
    if value.isascii() and value.isprintable():
        return value
    # An explicit charset: other libraries (apprise, Django) change the global utf-8 registration.
    charset = Charset("utf-8")
    charset.header_encoding = BASE64
    return Header(value, charset, maxlinelen=0).encode()


class Provider:
    name: ClassVar[str] = "ses"
    routes: ClassVar[frozenset[str]] = frozenset({"email"})

    def __init__(self, settings: Any, redis: Any | None = None) -> None:  # no state shared between workers
        self.config: Config = build_config(Config, "ses", settings)
        self.from_address = self.config.from_address or settings.email_from
        if not self.from_address or "@" not in self.from_address:
            raise Misconfigured(f"ses: from_address {self.from_address!r} is not an email address")
        self.client = make_client("sesv2", self.config)
        self._pool = ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="ses")
        model = self.client.meta.service_model
        template = model.shape_for("Template").members
        entry = model.shape_for("BulkEmailEntry").members
        #: this botocore knows inline template content (SES, Nov 2024) and per-entry headers (2024)
        self.bulk_inline = "TemplateContent" in template
        self.bulk_headers = "Headers" in template and "ReplacementHeaders" in entry
        #: monotonic time until which SendBulkEmail is not tried (the endpoint refused it)
        self.bulk_refused_until = 0.0

    # -- sending -----------------------------------------------------------------------------

    def send(self, messages: Sequence[Message]) -> list[Outcome]:
        bulk = self.config.bulk and self.bulk_inline and time.monotonic() >= self.bulk_refused_until
        if not bulk or len(messages) < 2:
            return run_batch(self._pool, self._send_one, messages)
        outcomes: list[Outcome | None] = [None] * len(messages)
        singles: list[int] = []
        groups: dict[tuple[str, str, str], list[int]] = {}
        headers: dict[int, list[dict[str, str]]] = {}
        for i, m in enumerate(messages):
            prepared = self._headers(m)
            if not isinstance(prepared, list):
                outcomes[i] = prepared
                continue
            key = self._bulk_key(m, prepared)
            if key is None:
                singles.append(i)
            else:
                headers[i] = prepared
                groups.setdefault(key, []).append(i)
        tasks: list[tuple[list[int], Callable[[], list[Outcome]]]] = []
        size = self.config.bulk_size
        for idxs in groups.values():
            if len(idxs) < 2:
                singles.extend(idxs)
                continue
            for start in range(0, len(idxs), size):
                chunk = idxs[start : start + size]
                tasks.append((chunk, self._bulk_task([messages[i] for i in chunk], [headers[i] for i in chunk])))
        for i in singles:
            tasks.append(([i], self._single_task(messages[i])))

        def guarded(task: tuple[list[int], Callable[[], list[Outcome]]]) -> list[Outcome]:
            idxs, fn = task
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - one call's failure must not sink the batch
                log.warning("unexpected error sending %d SES message(s): %s", len(idxs), type(exc).__name__)
                return [Retry(f"unexpected error: {type(exc).__name__}") for _ in idxs]
            if len(result) != len(idxs):
                return [Retry("SES answered the wrong number of results") for _ in idxs]
            return result

        answers = [guarded(tasks[0])] if len(tasks) == 1 else list(self._pool.map(guarded, tasks))
        refused: list[int] = []
        for (idxs, _), result in zip(tasks, answers, strict=True):
            for i, outcome in zip(idxs, result, strict=True):
                outcomes[i] = outcome
                if isinstance(outcome, _BulkRefused):
                    refused.append(i)
        if refused:  # SendBulkEmail refused: these go one by one, nothing dead-lettered for it
            singly = run_batch(self._pool, self._send_one, [messages[i] for i in refused])
            for i, outcome in zip(refused, singly, strict=True):
                outcomes[i] = outcome
        return [o if o is not None else Retry("not sent") for o in outcomes]

    def _single_task(self, m: Message) -> Callable[[], list[Outcome]]:
        return lambda: [self._send_one(m)]

    def _bulk_task(self, chunk: list[Message], headers: list[list[dict[str, str]]]) -> Callable[[], list[Outcome]]:
        return lambda: self._send_bulk(chunk, headers)

    def _headers(self, m: Message) -> list[dict[str, str]] | Outcome:
        """SES ``MessageHeader`` list of a message, or why it cannot be sent (no call made)."""
        if not m.content.get("text") and not m.content.get("html"):
            return Permanent("email has neither a text nor an html body")
        headers = []
        for name, value in m.headers.items():
            if not _HEADER_NAME_RE.match(name):
                return Permanent(f"header name {name!r} is not allowed by SES")
            encoded = header_value(value)
            if len(encoded) > 995:
                return Permanent(f"header {name} is longer than SES allows (995)")
            headers.append({"Name": name, "Value": encoded})
        return headers

    def _bulk_key(self, m: Message, headers: list[dict[str, str]]) -> tuple[str, str, str] | None:
        """The content that identical messages share, or None when the message must use SendEmail."""
        subject, text, html = m.content.get("subject", ""), m.content.get("text", ""), m.content.get("html", "")
        if "{{" in subject or "{{" in text or "{{" in html:
            return None  # SES templates would read it as a placeholder
        if headers and (not self.bulk_headers or len(headers) > MAX_HEADERS):
            return None
        if any("{{" in h["Value"] for h in headers):
            return None
        return subject, text, html

    def _bulk_request(self, chunk: list[Message], headers: list[list[dict[str, str]]]) -> dict[str, Any]:
        first = chunk[0].content
        content = {"Subject": first.get("subject", "")}
        if first.get("text"):
            content["Text"] = first["text"]
        if first.get("html"):
            content["Html"] = first["html"]
        # Headers every message has with the same value go once in the template; the rest per entry.
        shared = [h for h in headers[0] if all(h in hs for hs in headers[1:])]
        template: dict[str, Any] = {"TemplateContent": content, "TemplateData": "{}"}
        if shared:
            template["Headers"] = shared
        entries = []
        for m, hs in zip(chunk, headers, strict=True):
            entry: dict[str, Any] = {
                "Destination": {"ToAddresses": [m.address]},
                "ReplacementTags": self._tags(m),
                "ReplacementEmailContent": {"ReplacementTemplate": {"ReplacementTemplateData": "{}"}},
            }
            own = [h for h in hs if h not in shared]
            if own:
                entry["ReplacementHeaders"] = own
            entries.append(entry)
        request: dict[str, Any] = {
            "FromEmailAddress": self.from_address,
            "DefaultContent": {"Template": template},
            "BulkEmailEntries": entries,
        }
        if self.config.configuration_set:
            request["ConfigurationSetName"] = self.config.configuration_set
        return request

    def _send_bulk(self, chunk: list[Message], headers: list[list[dict[str, str]]]) -> list[Outcome]:
        try:
            resp = self.client.send_bulk_email(**self._bulk_request(chunk, headers))
        except ClientError as exc:
            parts = error_parts(exc)
            if bulk_refused(*parts[:3]):
                self._bulk_refused(*parts[:3])
                return [_BulkRefused("SendBulkEmail refused") for _ in chunk]
            outcome = self.classify(*parts)
            if isinstance(outcome, InvalidAddress):
                # SES refused the whole call over one address: find out which, one message at a time
                return [self._send_one(m) for m in chunk]
            return [outcome for _ in chunk]
        except Exception as exc:  # noqa: BLE001
            outcome = transport_outcome(exc)
            return [outcome for _ in chunk]
        results = list(resp.get("BulkEmailEntryResults") or [])
        outcomes = [self.bulk_outcome(r) for r in results[: len(chunk)]]
        missing = len(chunk) - len(outcomes)
        return outcomes + [Retry("SES returned no result for this entry") for _ in range(missing)]

    def _bulk_refused(self, code: str, message: str, status: int) -> None:
        global _warned_bulk_refused
        self.bulk_refused_until = time.monotonic() + self.config.bulk_reprobe
        if not _warned_bulk_refused:
            _warned_bulk_refused = True
            log.warning(
                "SES refused SendBulkEmail (%s: %s): sending through SendEmail, one call per message; "
                "bulk is tried again every %gs (set [provider_options.ses] bulk = false to stop trying)",
                code or status,
                message,
                self.config.bulk_reprobe,
            )

    def bulk_outcome(self, result: dict[str, Any]) -> Outcome:
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
        if status in ("INVALID_PARAMETER", "FAILED") and _BAD_ADDRESS_RE.search(error):
            if self.from_address.lower() not in error.lower():
                return InvalidAddress(reason)
        if status in BULK_PERMANENT_STATUSES or status == "INVALID_PARAMETER":
            return Permanent(reason)
        return Retry(reason or "SES bulk entry without a status")  # TRANSIENT_FAILURE, FAILED, unknown

    def _tags(self, m: Message) -> list[dict[str, str]]:
        return [
            {"Name": "delivery_id", "Value": tag_value(m.delivery_id)},
            {"Name": "notification_id", "Value": tag_value(m.notification_id)},
            {"Name": "category", "Value": tag_value(m.category)},
        ]

    def _request(self, m: Message) -> dict[str, Any] | Outcome:
        headers = self._headers(m)
        if not isinstance(headers, list):
            return headers
        body: dict[str, Any] = {}
        if m.content.get("text"):
            body["Text"] = {"Data": m.content["text"], "Charset": "UTF-8"}
        if m.content.get("html"):
            body["Html"] = {"Data": m.content["html"], "Charset": "UTF-8"}
        simple: dict[str, Any] = {
            "Subject": {"Data": m.content.get("subject", ""), "Charset": "UTF-8"},
            "Body": body,
        }
        if headers:
            simple["Headers"] = headers
        request: dict[str, Any] = {
            "FromEmailAddress": self.from_address,
            "Destination": {"ToAddresses": [m.address]},
            "Content": {"Simple": simple},
            "EmailTags": self._tags(m),
        }
        if self.config.configuration_set:
            request["ConfigurationSetName"] = self.config.configuration_set
        return request

    def _send_one(self, m: Message) -> Outcome:
        request = self._request(m)
        if not isinstance(request, dict):
            return request
        try:
            resp = self.client.send_email(**request)
        except ClientError as exc:
            return self.classify(*error_parts(exc))
        except Exception as exc:  # noqa: BLE001
            return transport_outcome(exc)
        return Sent(str(resp["MessageId"]))

    def classify(self, code: str, message: str, status: int, retry_after: float | None) -> Outcome:
        """Map an SES error to an outcome."""
        reason = f"{code or status}: {message}".strip()
        if code in ("BadRequestException", "InvalidParameterValue") and _BAD_ADDRESS_RE.search(message):
            if self.from_address.lower() not in message.lower():
                return InvalidAddress(reason)
        if "daily message quota exceeded" in message.lower():
            return Retry(reason, retry_after if retry_after is not None else 3600.0)
        if code == "NotFoundException":
            return Permanent(f"{reason} (configuration set {self.config.configuration_set!r}?)")
        if code in _PERMANENT_CODES:
            return Permanent(reason)
        return generic_outcome(code, message, status, retry_after)

    # -- operations --------------------------------------------------------------------------

    def describe(self) -> dict[str, str]:
        return {
            "provider": self.name,
            **describe_common(self.config),
            "from_address": self.from_address,
            "configuration_set": self.config.configuration_set or "(none)",
            "bulk": self._bulk_mode(),
        }

    def _bulk_mode(self) -> str:
        if not self.config.bulk:
            return "off"
        if not self.bulk_inline:
            return "off (this botocore lacks inline TemplateContent)"
        if not self.bulk_headers:
            return f"on, {self.config.bulk_size}/call (messages with headers use SendEmail: botocore too old)"
        return f"on, {self.config.bulk_size}/call"

    def check(self) -> str | None:
        """Credentials work and the From address (or its domain) is a verified identity; sends nothing."""
        address = self.from_address.rsplit("<", 1)[-1].rstrip(">").strip()
        domain = address.rsplit("@", 1)[-1]
        for identity in (address, domain):
            try:
                resp = self.client.get_email_identity(EmailIdentity=identity)
            except ClientError as exc:
                code, message, status, _ = error_parts(exc)
                if code == "NotFoundException":
                    continue
                return f"SES refused GetEmailIdentity: {code or status}: {message}"
            except Exception as exc:  # noqa: BLE001
                where = self.config.endpoint_url or self.config.region
                return f"cannot reach SES ({where}): {type(exc).__name__}"
            if resp.get("VerifiedForSendingStatus") or resp.get("VerificationStatus") == "SUCCESS":
                return None
            return f"SES identity {identity} is not verified (status {resp.get('VerificationStatus')})"
        return f"from address {address} is not an SES identity (neither the address nor {domain})"

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()
