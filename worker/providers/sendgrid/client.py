"""One module: one vendor's client: SendGrid's request grouping, error parsing and outcome mapping;
~410 lines.

SendGrid v3 Mail Send (route ``email``).

One ``POST /v3/mail/send`` carries up to 1000 personalizations. Our messages are rendered per
user, so each message is one personalization (its own ``to``, ``subject``, ``headers`` such as
``List-Unsubscribe``, and ``custom_args`` with our ``delivery_id``/``notification_id`` so the
Event Webhook can be matched back). Messages whose bodies are identical (same text, html and
category) share a request. What the pipeline adds per recipient (unsubscribe link, open pixel)
travels as ``substitutions`` of the personalization (``Message.shared``/``personal``), so a
marketing batch is still one request. Bodies that differ in more than that (segment columns,
per-recipient data, loops and conditionals over it) are still one request for the batch (a
skeleton, planned by :mod:`.plan`): the parts every body shares are sent once as the content, with
a key such as ``[%sg3%]`` where the bodies differ, and each recipient's own text for each key
travels in their personalization's ``substitutions``, which SendGrid puts back in their copy. SendGrid allows
10,000 bytes of substitutions per personalization: a recipient whose parts do not fit goes in a
smaller group (bodies with the same line structure, then identical bodies), counted in
``fallbacks`` and logged. Requests of one ``send()`` run concurrently over one pooled
``httpx.Client``.

Answers: 202 → ``Sent(X-Message-Id)`` (the same id for every personalization of a request: the
webhook events carry our custom_args, and their ``sg_message_id`` starts with it);
400 → ``Permanent`` with SendGrid's message (when the errors point at single personalizations,
those fail, as ``InvalidAddress`` for a bad recipient, and the rest are sent again);
401/403 → ``Permanent`` (configuration); 413 → split in halves and send again, ``Permanent`` for a
single message; 429 → ``Retry`` with ``retry_after`` from ``Retry-After`` or ``X-RateLimit-Reset``
(throttled: no attempt used), and the batch's requests not made yet are not made (``Held``);
5xx and network errors → ``Retry``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from notifyctl.masking import mask
from notifyctl.settings import provider_config
from worker.providers.base import (
    Fenced,
    Held,
    InvalidAddress,
    Message,
    Misconfigured,
    Outcome,
    Permanent,
    Retry,
    Sent,
    error_text,
    lease_open,
    retry_after,
)
from worker.providers.sendgrid.plan import Request, groups

_SPACE = re.compile(r"\s")  # the same characters as str.isspace
log = logging.getLogger(__name__)

MAX_PERSONALIZATIONS = 1000
#: The ``custom_args`` every personalization carries; the Event Webhook echoes them in each event
#: (:mod:`.webhook` matches events back by them).
DELIVERY_ARG, NOTIFICATION_ARG = "delivery_id", "notification_id"
_PERSONALIZATION_FIELD = re.compile(r"^personalizations\.(\d+)(?:\.(\w+))?")


class Config(BaseModel):
    """SendGrid: ``NOTIFY_SENDGRID_*``, or the config file's ``[sendgrid]`` (or ``[provider_options.sendgrid]``)."""

    model_config = ConfigDict(extra="ignore")

    api_key: SecretStr | None = Field(None, description="API key with the mail.send scope (SG....)")
    base_url: str = Field("https://api.sendgrid.com", description="API base URL (a sandbox URL in tests)")
    from_address: str | None = Field(None, description="sender address; unset = the main email_from")
    from_name: str | None = Field(None, description="sender display name")
    timeout: float = Field(10.0, gt=0, description="HTTP timeout per request, seconds")
    concurrency: int = Field(8, ge=1, le=256, description="parallel requests within one send()")
    max_personalizations: int = Field(
        MAX_PERSONALIZATIONS, ge=1, le=MAX_PERSONALIZATIONS, description="personalizations per request"
    )


def _retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or HTTP date) or ``X-RateLimit-Reset`` (epoch)."""
    seconds = retry_after(headers.get("Retry-After"))
    if seconds is not None:
        return seconds
    reset = headers.get("X-RateLimit-Reset")
    if reset:
        try:
            return max(0.0, float(reset) - time.time())
        except ValueError:
            pass
    return None


def _errors(response: Any) -> list[dict[str, Any]]:
    try:
        payload = response.json()
    except ValueError:
        return []
    errors = payload.get("errors") if isinstance(payload, dict) else None
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


def _describe_errors(response: Any) -> str:
    errors = _errors(response)
    if not errors:
        return error_text(response.text) or response.reason_phrase
    parts = []
    for e in errors[:5]:
        msg = str(e.get("message") or "error")
        parts.append(f"{e['field']}: {msg}" if e.get("field") else msg)
    return error_text("; ".join(parts), 300)


class Provider:
    name: ClassVar[str] = "sendgrid"
    routes: ClassVar[frozenset[str]] = frozenset({"email"})

    def __init__(self, settings: Any, redis: Any | None = None) -> None:  # no state shared between workers
        import httpx

        try:
            self.config: Config = provider_config(Config, "sendgrid", settings)
        except ValidationError as exc:
            raise Misconfigured(f"sendgrid: invalid settings: {exc.errors(include_input=False)}") from None
        cfg = self.config
        if cfg.api_key is None or not cfg.api_key.get_secret_value().strip():
            raise Misconfigured("sendgrid: api_key is not set (NOTIFY_SENDGRID_API_KEY)")
        if not cfg.base_url.startswith(("http://", "https://")):
            raise Misconfigured(f"sendgrid: base_url must be an http(s) URL, got {cfg.base_url!r}")
        self.from_address: str = cfg.from_address or settings.email_from
        if "@" not in self.from_address:
            raise Misconfigured(f"sendgrid: from address {self.from_address!r} is not an email address")
        self._httpx = httpx
        self._client = httpx.Client(
            base_url=cfg.base_url.rstrip("/"),
            headers={
                "Authorization": f"Bearer {cfg.api_key.get_secret_value().strip()}",
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": "notifyctl-sendgrid/1",
            },
            timeout=cfg.timeout,
            limits=httpx.Limits(
                max_connections=cfg.concurrency,
                max_keepalive_connections=cfg.concurrency,
                keepalive_expiry=60,
            ),
        )
        self._pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="sendgrid")
        #: recipients whose different body did not fit one request's substitutions (smaller groups)
        self.fallbacks = 0
        self._planned: dict[tuple[str, ...], tuple[Any, Any]] = {}  # the groups ``requests`` worked out

    # ------------------------------------------------------------------ display / checks

    def describe(self) -> dict[str, str]:
        cfg = self.config
        return {
            "api_key": mask(cfg.api_key),
            "base_url": cfg.base_url,
            "from_address": self.from_address,
            "from_name": cfg.from_name or "",
            "timeout": f"{cfg.timeout:g}s",
            "concurrency": str(cfg.concurrency),
            "max_personalizations": str(cfg.max_personalizations),
        }

    def check(self) -> str | None:
        """``GET /v3/scopes``: the key is valid and may send mail. Sends nothing."""
        try:
            resp = self._client.get("/v3/scopes")
        except self._httpx.HTTPError as exc:
            return f"sendgrid: cannot reach {self.config.base_url}: {type(exc).__name__}: {exc}"
        if resp.status_code in (401, 403):
            return f"sendgrid: API key rejected ({resp.status_code}): {_describe_errors(resp)}"
        if resp.status_code != 200:
            return f"sendgrid: GET /v3/scopes answered HTTP {resp.status_code}: {_describe_errors(resp)}"
        try:
            scopes = resp.json().get("scopes") or []
        except (ValueError, AttributeError):
            return "sendgrid: GET /v3/scopes answered something that is not JSON"
        if "mail.send" not in scopes:
            return "sendgrid: the API key lacks the mail.send scope"
        return None

    # ------------------------------------------------------------------ sending

    def requests(self, messages: Sequence[Message]) -> list[list[int]]:
        """How ``send`` groups ``messages`` into requests (indexes; a message that fails its
        checks is a request of its own that is never made): the unit of the pace
        (``notifyctl.pacing``). ``send`` of a run of whole groups makes exactly these requests: the
        groups worked out here (with their skeletons) are kept for it: not worked out twice."""
        plan = self._plan(messages)
        self._planned = {tuple(messages[i].delivery_id for i in group): (skel, subs) for group, skel, subs in plan}
        return [group for group, _s, _v in plan]

    def _plan(
        self, messages: Sequence[Message], known: dict[tuple[str, ...], tuple[Any, Any]] | None = None
    ) -> list[Request]:
        """(indexes, skeleton or None, substitutions or None) per request; ``known``: the groups
        ``requests`` planned, used as they are where all their messages are here."""
        plan: list[Request] = []
        taken: set[int] = set()
        if known:
            at = {m.delivery_id: i for i, m in enumerate(messages)}
            for ids, (skel, subs) in known.items():
                group = [at.get(d, -1) for d in ids]
                if -1 not in group:
                    plan.append((group, skel, subs))
                    taken.update(group)
        by_category: dict[str, list[int]] = {}
        for i, m in enumerate(messages):
            if i in taken:
                continue
            if self._precheck(m) is not None:
                plan.append(([i], None, None))
                continue
            by_category.setdefault(m.category, []).append(i)
        size = self.config.max_personalizations
        for idxs in by_category.values():
            found, fallbacks = groups(messages, idxs)
            self.fallbacks += fallbacks
            for group, skel, subs in found:
                for j in range(0, len(group), size):
                    plan.append((group[j : j + size], skel, subs[j : j + size] if subs is not None else None))
        return plan

    def send(self, messages: Sequence[Message]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(messages)
        chunks: list[Request] = []
        known, self._planned = self._planned, {}
        for group, skel, subs in self._plan(messages, known):
            problem = self._precheck(messages[group[0]]) if len(group) == 1 else None
            if problem is not None:
                outcomes[group[0]] = problem
            else:
                chunks.append((group, skel, subs))
        for (chunk, _s, _v), chunk_outcomes in zip(chunks, self.send_until_throttled(messages, chunks), strict=True):
            for i, outcome in zip(chunk, chunk_outcomes, strict=True):
                outcomes[i] = outcome
        return [o if o is not None else Retry("sendgrid: no outcome") for o in outcomes]

    def send_until_throttled(
        self,
        messages: Sequence[Message],
        chunks: list[Request],
    ) -> list[list[Outcome]]:
        """One request per chunk (indexes, skeleton, substitutions), ``concurrency`` at a time; once
        SendGrid answers 429, the requests not yet made are not made (``Held``: SendGrid has said
        how fast it goes, and hammering it only earns more 429s). One list of outcomes per chunk."""
        if len(chunks) == 1:
            return [self._send_safely(messages, *chunks[0])]
        stop = threading.Event()

        def one(chunk: Request) -> list[Outcome]:
            if stop.is_set():
                return [Held("sendgrid: not sent after a 429 in the same batch")] * len(chunk[0])
            out = self._send_safely(messages, *chunk)
            if any(isinstance(o, Retry) and o.throttled for o in out):
                stop.set()
            return out

        futures = [self._pool.submit(one, chunk) for chunk in chunks]
        return [f.result() for f in futures]

    def _precheck(self, m: Message) -> Outcome | None:
        if m.route != "email":
            return Permanent(f"sendgrid cannot send route {m.route!r}")
        addr = m.address.strip()
        if addr.count("@") != 1 or addr.startswith("@") or addr.endswith("@") or _SPACE.search(addr):
            return InvalidAddress(f"not an email address: {m.address!r}")
        if not m.part("subject").strip():
            return Permanent("email has no subject")
        if not (m.has("text") or m.has("html")):
            return Permanent("email has neither a text nor an html body")
        return None

    def _send_safely(
        self,
        messages: Sequence[Message],
        idxs: list[int],
        skel: dict[str, str] | None = None,
        subs: list[dict[str, str]] | None = None,
    ) -> list[Outcome]:
        try:
            return self._send_chunk(messages, idxs, skel, subs)
        except Exception as exc:  # one request's surprise must not lose the other requests' outcomes
            log.exception("sendgrid: unexpected error sending %d message(s)", len(idxs))
            return [Retry(f"sendgrid: unexpected {type(exc).__name__}")] * len(idxs)

    def _body(
        self, batch: list[Message], skel: dict[str, str] | None = None, subs: list[dict[str, str]] | None = None
    ) -> dict[str, Any]:
        first = batch[0]
        sender: dict[str, str] = {"email": self.from_address}
        if self.config.from_name:
            sender["name"] = self.config.from_name
        shared = skel or first.shared or first.content
        content = []
        if shared.get("text"):
            content.append({"type": "text/plain", "value": shared["text"]})
        if shared.get("html"):
            content.append({"type": "text/html", "value": shared["html"]})
        personalizations = []
        for k, m in enumerate(batch):  # hot: one dict per recipient, serialised as is (orjson)
            p: dict[str, Any] = {
                "to": [{"email": m.address.strip()}],
                "subject": m.part("subject"),  # (only this part: not the copy of a shared body)
                "custom_args": {DELIVERY_ARG: m.delivery_id, NOTIFICATION_ARG: m.notification_id},
            }
            if m.headers:
                p["headers"] = m.headers
            if subs is not None:
                if subs[k]:
                    p["substitutions"] = subs[k]
            elif m.shared is not None and m.personal:
                p["substitutions"] = m.personal
            personalizations.append(p)
        body: dict[str, Any] = {"personalizations": personalizations, "from": sender, "content": content}
        if first.category:
            body["categories"] = [first.category]
        return body

    def _send_chunk(
        self,
        messages: Sequence[Message],
        idxs: list[int],
        skel: dict[str, str] | None = None,
        subs: list[dict[str, str]] | None = None,
    ) -> list[Outcome]:
        """Send ``messages[idxs]`` as one request (with ``skel`` as the content and ``subs[k]`` as
        the k-th one's substitutions, when given); one outcome per index."""
        batch = [messages[i] for i in idxs]
        n = len(batch)
        if not lease_open(self, self.config.timeout):
            return [Fenced("sendgrid: lease running out (Redis unreachable?): not sent")] * n
        payload = orjson.dumps(self._body(batch, skel, subs))
        try:
            resp = self._client.post("/v3/mail/send", content=payload)
        except self._httpx.TimeoutException as exc:
            return [Retry(f"sendgrid: timeout ({type(exc).__name__})")] * n
        except self._httpx.TransportError as exc:
            return [Retry(f"sendgrid: network error: {type(exc).__name__}: {exc}")] * n

        status = resp.status_code
        if 200 <= status < 300:
            mid = resp.headers.get("X-Message-Id") or ""
            if mid:  # one id for the whole request, as SendGrid gives it (outcomes are immutable)
                return [Sent(mid)] * n
            return [Sent(f"sendgrid:{m.delivery_id}") for m in batch]
        if status == 400:
            return self._bad_request(messages, idxs, resp, skel, subs)
        if status in (401, 403):
            return [Permanent(f"sendgrid: API key rejected ({status}): {_describe_errors(resp)}")] * n
        if status == 413:
            if n == 1:
                return [Permanent("sendgrid: message too large (413)")]
            half = n // 2
            a, b = (subs[:half], subs[half:]) if subs is not None else (None, None)
            return self._send_chunk(messages, idxs[:half], skel, a) + self._send_chunk(messages, idxs[half:], skel, b)
        if status == 429:
            return [Retry("sendgrid: rate limited (429)", _retry_after(resp.headers), throttled=True)] * n
        if status >= 500:
            return [Retry(f"sendgrid: server error {status}", _retry_after(resp.headers))] * n
        return [Permanent(f"sendgrid: HTTP {status}: {_describe_errors(resp)}")] * n

    def _bad_request(
        self,
        messages: Sequence[Message],
        idxs: list[int],
        resp: Any,
        skel: dict[str, str] | None,
        subs: list[dict[str, str]] | None,
    ) -> list[Outcome]:
        """400: when every error names a personalization, fail only those and resend the others."""
        n = len(idxs)
        errors = _errors(resp)
        bad: dict[int, Outcome] = {}
        for e in errors:
            m = _PERSONALIZATION_FIELD.match(str(e.get("field") or ""))
            if not m or int(m.group(1)) >= n:
                bad = {}
                break
            pos = int(m.group(1))
            reason = f"sendgrid: {e.get('field')}: {e.get('message') or 'invalid'}"
            if m.group(2) == "to":
                bad[pos] = InvalidAddress(reason)
            elif pos not in bad:
                bad[pos] = Permanent(reason)
        if not bad:
            return [Permanent(f"sendgrid: bad request: {_describe_errors(resp)}")] * n
        outcomes: list[Outcome | None] = [bad.get(pos) for pos in range(n)]
        rest = [pos for pos in range(n) if pos not in bad]
        if rest:
            again = self._send_chunk(
                messages, [idxs[p] for p in rest], skel, [subs[p] for p in rest] if subs is not None else None
            )
            for pos, outcome in zip(rest, again, strict=True):
                outcomes[pos] = outcome
        return [o if o is not None else Permanent("sendgrid: bad request") for o in outcomes]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()
