"""Amazon SES v2 (email) through boto3's ``sesv2`` client.

Two paths, chosen per message within each batch:

- ``SendBulkEmail`` for the messages of a category that have the same parts (text, html): up to
  ``bulk_size`` (at most 50) entries per call, whether their bodies are identical or differ per
  recipient (segment columns, per-recipient data, the unsubscribe link, loops and conditionals over
  their own values). What the bodies share goes inline as ``DefaultContent.Template.TemplateContent``
  (no stored template) with a ``{{s0}}`` key where they differ; each entry's
  ``ReplacementTemplateData`` holds that recipient's own rendered text for each key, which SES puts
  back verbatim (:mod:`.bulk` plans the calls and says why this is exact). Headers that every
  message of the call has with the same value go in ``Template.Headers``, the others (a per-user
  ``List-Unsubscribe`` URL, say) in each entry's ``ReplacementHeaders``. Each entry's
  ``ReplacementTags`` carry the delivery id. ``BulkEmailEntryResults[i]`` maps to message i
  (:mod:`.outcomes`). An error for the whole call applies to all its messages, except one that names
  a bad address, which sends that chunk again one by one, and one that refuses the operation itself
  (an IAM policy without ``ses:SendBulkEmail``, an endpoint such as moto without it:
  ``bulk_refused``): the chunk goes through ``SendEmail``, one warning is logged per process, and
  bulk is not tried again for ``bulk_reprobe`` seconds (900).
- ``SendEmail``, one call per message (``Content.Simple``: subject, text/html body, headers), for
  everything else: a message alone in its category; content or a header value that contains ``{{``
  (SES would read it as a template placeholder); more than 15 headers; a message whose own data
  does not fit an entry (counted in ``fallbacks``); ``bulk`` off; or a botocore too old to know
  inline ``TemplateContent`` (bulk off) or ``Template.Headers``/``ReplacementHeaders`` (then
  messages with headers use ``SendEmail``).

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
from pydantic import ConfigDict, Field

from worker.providers.aws import (
    AwsConfig,
    build_config,
    describe_common,
    error_parts,
    make_client,
    run_batch,
    transport_outcome,
)
from worker.providers.base import InvalidAddress, Message, Misconfigured, Outcome, Permanent, Retry, Sent
from worker.providers.ses import bulk
from worker.providers.ses.outcomes import bulk_refused, classify, entry_outcome

log = logging.getLogger(__name__)


class Config(AwsConfig):
    model_config = ConfigDict(extra="ignore")

    from_address: str | None = Field(None, description="From address; unset = main settings email_from")
    configuration_set: str | None = Field(None, description="SES configuration set (event publishing)")
    bulk: bool = Field(True, description="send the messages of a batch through SendBulkEmail (per-recipient data)")
    bulk_size: int = Field(50, ge=1, le=50, description="entries per SendBulkEmail call (SES allows 50)")
    bulk_reprobe: float = Field(
        900.0, gt=0, description="seconds before SendBulkEmail is tried again after the endpoint refused it"
    )


_TAG_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_HEADER_NAME_RE = re.compile(r"^[!-9;-~]{1,126}$")
#: SES allows at most 15 headers on a message.
MAX_HEADERS = 15
#: The tag every message carries (``EmailTags``/``ReplacementTags``); SES event records echo it in
#: ``mail.tags`` (:mod:`.webhook` matches records back by it).
DELIVERY_TAG = "delivery_id"
_warned_bulk_refused = False  # one warning per process


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
        #: messages that could have gone in a SendBulkEmail call but did not fit one (sent one by one)
        self.fallbacks = 0

    # -- sending -----------------------------------------------------------------------------

    def send(self, messages: Sequence[Message]) -> list[Outcome]:
        use_bulk = self.config.bulk and self.bulk_inline and time.monotonic() >= self.bulk_refused_until
        if not use_bulk or len(messages) < 2:
            return run_batch(self._pool, self._send_one, messages)
        outcomes: list[Outcome | None] = [None] * len(messages)
        singles: list[int] = []
        eligible: list[int] = []
        headers: dict[int, list[dict[str, str]]] = {}
        for i, m in enumerate(messages):
            prepared = self._headers(m)
            if not isinstance(prepared, list):
                outcomes[i] = prepared
            elif self._bulk_ok(m, prepared):
                headers[i] = prepared
                eligible.append(i)
            else:
                singles.append(i)
        chunks, alone, fallbacks = bulk.plan(messages, eligible, self.config.bulk_size)
        singles += alone
        if fallbacks:
            self.fallbacks += fallbacks
            log.info(
                "ses: %d of %d messages did not fit a SendBulkEmail call: sent one by one", fallbacks, len(eligible)
            )
        tasks: list[tuple[list[int], Callable[[], list[Outcome]]]] = []
        for chunk in chunks:
            tasks.append((chunk.idxs, self._bulk_task(messages, chunk, [headers[i] for i in chunk.idxs])))
        for i in sorted(singles):
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

    def _bulk_task(
        self, messages: Sequence[Message], chunk: bulk.Chunk, headers: list[list[dict[str, str]]]
    ) -> Callable[[], list[Outcome]]:
        return lambda: self._send_bulk([messages[i] for i in chunk.idxs], chunk, headers)

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

    def _bulk_ok(self, m: Message, headers: list[dict[str, str]]) -> bool:
        """Whether the message may go in a SendBulkEmail call (else SendEmail)."""
        c = m.content
        if "{{" in c.get("subject", "") or "{{" in c.get("text", "") or "{{" in c.get("html", ""):
            return False  # SES templates would read it as a placeholder
        if headers and (not self.bulk_headers or len(headers) > MAX_HEADERS):
            return False
        return not any("{{" in h["Value"] for h in headers)

    def _bulk_request(
        self, batch: list[Message], chunk: bulk.Chunk, headers: list[list[dict[str, str]]]
    ) -> dict[str, Any]:
        # Headers every message has with the same value go once in the template; the rest per entry.
        shared = [h for h in headers[0] if all(h in hs for hs in headers[1:])]
        template: dict[str, Any] = {"TemplateContent": chunk.content, "TemplateData": "{}"}
        if shared:
            template["Headers"] = shared
        entries = []
        for m, hs, data in zip(batch, headers, chunk.data, strict=True):
            entry: dict[str, Any] = {
                "Destination": {"ToAddresses": [m.address]},
                "ReplacementTags": self._tags(m),
                "ReplacementEmailContent": {"ReplacementTemplate": {"ReplacementTemplateData": data}},
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

    def _send_bulk(self, chunk: list[Message], plan: bulk.Chunk, headers: list[list[dict[str, str]]]) -> list[Outcome]:
        try:
            resp = self.client.send_bulk_email(**self._bulk_request(chunk, plan, headers))
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
        outcomes = [entry_outcome(r, self.from_address) for r in results[: len(chunk)]]
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

    def _tags(self, m: Message) -> list[dict[str, str]]:
        return [
            {"Name": DELIVERY_TAG, "Value": tag_value(m.delivery_id)},
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
        return classify(code, message, status, retry_after, self.from_address, self.config.configuration_set)

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
