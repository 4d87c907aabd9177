"""Twilio Programmable Messaging (route ``sms``) and Voice (route ``voice``, an OTP fallback).

Uses the official ``twilio`` SDK so its real request building and error parsing run. The SDK
hardcodes ``https://api.twilio.com``; ``RoutedHttpClient`` (a ``twilio.http.HttpClient``) rewrites
that origin to ``base_url`` (the sandbox in tests) and keeps one ``urllib3`` pool, so connections
are reused across messages. Twilio has no batch send: a batch is sent concurrently
on a thread pool (``concurrency``, default 16).

SMS: ``messages.create(to, from_ | messaging_service_sid, body, status_callback)`` → ``Sent(SM...)``.
Voice: ``calls.create(to, from_, twiml="<Response><Say>…</Say></Response>")`` → ``Sent(CA...)``;
digits in the text are spoken one by one (an OTP "482913" is read "4 8 2 9 1 3").

Errors (``TwilioRestException.code``): 21211/21614 (invalid / not a mobile number) and 21610
(recipient replied STOP: unsubscribed) → ``InvalidAddress``; 20429 or HTTP 429 and 5xx → ``Retry``
honouring ``Retry-After``; 30003/30005/30006 → ``Permanent``; other 4xx → ``Permanent``;
network errors → ``Retry``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from xml.sax.saxutils import escape

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from notifyctl.masking import mask
from notifyctl.settings import provider_config
from worker.providers.base import (
    Fenced,
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

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.twilio.com"
_TWILIO_API_ORIGIN = re.compile(r"^https://api(?:\.[a-z0-9-]+)*\.twilio\.com(?=/|$)", re.IGNORECASE)
_ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")
#: The recipient replied STOP (the send's error and the status callback's ``ErrorCode``).
STOP_CODE = 21610
#: The query parameter of the status callback URL naming our delivery (:mod:`.webhook` reads it).
CALLBACK_PARAM = "delivery_id"
_INVALID_ADDRESS_CODES = {
    21211: "invalid 'To' phone number",
    21614: "'To' number is not a valid mobile number",
}
_UNDELIVERABLE_CODES = {
    30003: "unreachable handset",
    30005: "unknown destination",
    30006: "landline or unreachable",
}


class Config(BaseModel):
    """Twilio settings: ``NOTIFY_TWILIO_*``, or the config file's ``[twilio]`` (``[provider_options.twilio]``)."""

    model_config = ConfigDict(extra="ignore")

    account_sid: str | None = Field(None, description="Account SID (AC...)")
    auth_token: SecretStr | None = Field(None, description="Auth token")
    from_number: str | None = Field(None, description="sender number, E.164 (needed for voice)")
    messaging_service_sid: str | None = Field(None, description="Messaging Service SID (MG...), preferred for SMS")
    status_callback_url: str | None = Field(None, description="status callback URL (delivery_id is appended)")
    base_url: str = Field(DEFAULT_BASE_URL, description="API origin (a sandbox URL in tests)")
    timeout: float = Field(10.0, gt=0, description="HTTP timeout per request, seconds")
    concurrency: int = Field(16, ge=1, le=256, description="parallel requests within one send()")


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def voice_twiml(text: str) -> str:
    """TwiML that reads ``text`` aloud; digit runs are spaced so codes are read digit by digit."""
    spoken = re.sub(r"(?<=\d)(?=\d)", " ", text)
    return f"<Response><Say>{escape(spoken)}</Say></Response>"


def _form(data: Any) -> list[tuple[str, str]]:
    """A form body's fields as ``requests`` encodes a dict: a list value repeats its key, None drops."""
    out: list[tuple[str, str]] = []
    for k, v in (data or {}).items():
        for item in v if isinstance(v, (list, tuple)) else (v,):
            if item is not None:
                out.append((k, item))
    return out


_URL_METHODS = frozenset({"DELETE", "GET", "HEAD", "OPTIONS"})  # (urllib3's ``_encode_url_methods``)


def _make_http_client(base_url: str, timeout: float, pool_size: int) -> Any:
    import base64
    import json
    import os
    import urllib.request

    import certifi
    import urllib3
    from twilio.http import HttpClient
    from twilio.http.response import Response

    class RoutedHttpClient(HttpClient):  # type: ignore[misc]  # twilio ships no types: HttpClient is Any
        """A ``twilio.http.HttpClient`` on one ``urllib3`` pool (connections reused across messages),
        Twilio's API origin rewritten to ``base_url``, and the last response's headers kept per
        thread (for ``Retry-After``).

        Not ``requests``: its session re-read the proxy and CA settings from the environment and
        prepared each request through hooks, cookies and adapters — ~350 µs of CPU a message, more
        than the request itself (urllib3: ~230 µs, measured against the Twilio sandbox). What it
        gave is kept, read once here: the environment's proxy for ``base_url`` (``HTTPS_PROXY``,
        ``NO_PROXY``...), ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` else certifi's CA bundle,
        form bodies encoded as ``requests`` encodes a dict, gzip accepted, no redirects followed."""

        def __init__(self) -> None:
            super().__init__(logging.getLogger("worker.providers.twilio.http"), False, timeout)
            self.base_url = base_url.rstrip("/")
            target = DEFAULT_BASE_URL if self.base_url == DEFAULT_BASE_URL else self.base_url
            ca = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certifi.where()
            kw: dict[str, Any] = {"num_pools": 2, "maxsize": pool_size, "block": False, "retries": False}
            if target.startswith("https://"):
                kw["ca_certs"] = ca
            proxies = urllib.request.getproxies()
            host = urlsplit(target).netloc
            scheme = urlsplit(target).scheme
            proxy = proxies.get(scheme) or proxies.get("all")
            if proxy and not urllib.request.proxy_bypass(host):
                self.pool: Any = urllib3.ProxyManager(proxy, **kw)
            else:
                self.pool = urllib3.PoolManager(**kw)
            # without a proxy, a request goes straight to its origin's connection pool (``_target``)
            self._direct = not isinstance(self.pool, urllib3.ProxyManager)
            self._targets: dict[str, tuple[Any, str]] = {}
            self._auth: dict[tuple[str, str], str] = {}
            self._local = threading.local()

        def _target(self, url: str) -> tuple[Any, str]:
            """The connection pool of ``url``'s origin and its request target, as ``PoolManager``
            finds them for each request (``parse_url``, then the pool by scheme, host and port):
            here once per URL (a message's is the same for every message)."""
            got = self._targets.get(url)
            if got is None:
                if len(self._targets) >= 64:  # (URLs with a query: a check's, a fetch's)
                    self._targets.clear()
                u = urllib3.util.parse_url(url)
                got = self._targets[url] = (self.pool.connection_from_host(u.host, u.port, u.scheme), u.request_uri)
            return got

        def route(self, url: str) -> str:
            if self.base_url == DEFAULT_BASE_URL:
                return url
            return _TWILIO_API_ORIGIN.sub(self.base_url, url, count=1)

        def _basic(self, auth: tuple[str, str]) -> str:
            header = self._auth.get(auth)
            if header is None:
                token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode("latin1")).decode()
                header = self._auth[auth] = "Basic " + token
            return header

        def request(
            self,
            method: str,
            uri: str,
            params: dict[str, Any] | None = None,
            data: dict[str, object] | None = None,
            headers: dict[str, str] | None = None,
            auth: tuple[str, str] | None = None,
            timeout: float | None = None,
            allow_redirects: bool = False,
        ) -> Response:
            self._local.headers = None
            hdrs = {"Accept-Encoding": "gzip, deflate", **(headers or {})}
            if auth is not None:
                hdrs["Authorization"] = self._basic(auth)
            url = self.route(uri)
            if params:
                url += ("&" if "?" in url else "?") + urlencode(_form(params))
            body: str | None = None
            if data:  # as requests: an empty form sends no body
                if hdrs.get("Content-Type") in ("application/json", "application/scim+json"):
                    body = json.dumps(data)
                else:
                    body = urlencode(_form(data))
                    hdrs.setdefault("Content-Type", "application/x-www-form-urlencoded")
            method = method.upper()
            timeout = timeout if timeout is not None else self.timeout
            if self._direct and not allow_redirects:
                # what ``PoolManager.request`` does, less its per-request URL parse and pool lookup
                # (~50 µs of a message's CPU, measured against the Twilio sandbox): the headers as
                # its ``request_encode_body`` (a body's methods) or ``request_encode_url`` pass them
                pool, target = self._target(url)
                resp = pool.urlopen(
                    method,
                    target,
                    body=body,
                    headers=hdrs if method in _URL_METHODS else urllib3.HTTPHeaderDict(hdrs),
                    timeout=timeout,
                    redirect=False,
                    retries=False,
                    assert_same_host=False,
                )
            else:
                resp = self.pool.request(
                    method, url, body=body, headers=hdrs, timeout=timeout, redirect=allow_redirects, retries=False
                )
            self._local.headers = resp.headers
            return Response(int(resp.status), resp.data.decode("utf-8", "replace"), resp.headers)

        def last_headers(self) -> Any:
            """Headers of the last response received by the calling thread."""
            return getattr(self._local, "headers", None)

        def close(self) -> None:
            self._targets.clear()
            self.pool.clear()

    return RoutedHttpClient()


class Provider:
    name: ClassVar[str] = "twilio"
    routes: ClassVar[frozenset[str]] = frozenset({"sms", "voice"})

    def __init__(self, settings: Any, redis: Any | None = None) -> None:  # no state shared between workers
        import http.client

        import urllib3
        from twilio.base.exceptions import TwilioRestException, TwilioServiceException
        from twilio.rest import Client

        try:
            self.config: Config = provider_config(Config, "twilio", settings)
        except ValidationError as exc:
            raise Misconfigured(f"twilio: invalid settings: {exc.errors(include_input=False)}") from None
        cfg = self.config
        if not cfg.account_sid or not _ACCOUNT_SID.match(cfg.account_sid):
            raise Misconfigured("twilio: account_sid must be an Account SID, AC + 32 hex (NOTIFY_TWILIO_ACCOUNT_SID)")
        if cfg.auth_token is None or not cfg.auth_token.get_secret_value():
            raise Misconfigured("twilio: auth_token is not set (NOTIFY_TWILIO_AUTH_TOKEN)")
        if not cfg.from_number and not cfg.messaging_service_sid:
            raise Misconfigured("twilio: set from_number or messaging_service_sid (NOTIFY_TWILIO_FROM_NUMBER)")
        if not cfg.base_url.startswith(("http://", "https://")):
            raise Misconfigured(f"twilio: base_url must be an http(s) URL, got {cfg.base_url!r}")
        self._rest_errors = (TwilioRestException, TwilioServiceException)
        # urllib3 raises its own errors (a refused connection, a timeout, a dropped one) unwrapped
        # (``retries=False``); the others are what a socket or http.client can still raise
        self._network_errors: tuple[type[BaseException], ...] = (
            urllib3.exceptions.HTTPError,
            http.client.HTTPException,
            OSError,
        )
        self._http = _make_http_client(cfg.base_url, cfg.timeout, cfg.concurrency)
        self._client = Client(
            username=cfg.account_sid,
            password=cfg.auth_token.get_secret_value(),
            account_sid=cfg.account_sid,
            http_client=self._http,
        )
        self._pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="twilio")

    def warm(self) -> None:
        """The SDK's lazily imported parts that a send uses, imported now (nothing is sent)."""
        _ = self._client.messages, self._client.calls

    # ------------------------------------------------------------------ display / checks

    def describe(self) -> dict[str, str]:
        cfg = self.config
        return {
            "account_sid": cfg.account_sid or "",
            "auth_token": mask(cfg.auth_token),
            "from_number": cfg.from_number or "",
            "messaging_service_sid": cfg.messaging_service_sid or "",
            "status_callback_url": cfg.status_callback_url or "",
            "base_url": cfg.base_url,
            "timeout": f"{cfg.timeout:g}s",
            "concurrency": str(cfg.concurrency),
        }

    def check(self) -> str | None:
        """Fetch the account (``GET /2010-04-01/Accounts/{sid}.json``): credentials valid, account active."""
        try:
            account = self._client.api.v2010.accounts(self.config.account_sid).fetch()
        except self._rest_errors as exc:
            if exc.status in (401, 403):
                return f"twilio: credentials rejected ({exc.status}, code {exc.code})"
            return f"twilio: account check failed: HTTP {exc.status}, code {exc.code}"
        except self._network_errors as exc:
            return f"twilio: cannot reach {self.config.base_url}: {type(exc).__name__}"
        if account.status != "active":
            return f"twilio: account is {account.status}"
        return None

    # ------------------------------------------------------------------ sending

    def send(self, messages: Sequence[Message]) -> list[Outcome]:
        if len(messages) <= 1:
            return [self._send_one(m) for m in messages]
        return list(self._pool.map(self._send_one, messages))

    def _send_one(self, m: Message) -> Outcome:
        if not lease_open(self, self.config.timeout):
            return Fenced("twilio: lease running out (Redis unreachable?): not sent")
        try:
            return self._create(m)
        except self._rest_errors as exc:
            return self._map_error(exc)
        except self._network_errors as exc:
            return Retry(f"twilio: network error: {type(exc).__name__}")
        except Exception as exc:  # one message's surprise must not lose the batch's other outcomes
            log.exception("twilio: unexpected error sending delivery %s", m.delivery_id)
            return Retry(f"twilio: unexpected {type(exc).__name__}")

    def _create(self, m: Message) -> Outcome:
        cfg = self.config
        text = (m.content.get("text") or "").strip()
        if not text:
            return Permanent("twilio: message has no text")
        callback = (
            _with_query(cfg.status_callback_url, **{CALLBACK_PARAM: m.delivery_id}) if cfg.status_callback_url else None
        )
        if m.route == "sms":
            kwargs: dict[str, Any] = {"to": m.address, "body": text}
            if cfg.messaging_service_sid:
                kwargs["messaging_service_sid"] = cfg.messaging_service_sid
            else:
                kwargs["from_"] = cfg.from_number
            if callback:
                kwargs["status_callback"] = callback
            return Sent(self._client.messages.create(**kwargs).sid)
        if m.route == "voice":
            if not cfg.from_number:
                return Permanent("twilio: voice calls need from_number (NOTIFY_TWILIO_FROM_NUMBER)")
            kwargs = {"to": m.address, "from_": cfg.from_number, "twiml": voice_twiml(text)}
            if callback:
                kwargs["status_callback"] = callback
            return Sent(self._client.calls.create(**kwargs).sid)
        return Permanent(f"twilio cannot send route {m.route!r}")

    def _retry_after(self) -> float | None:
        headers = self._http.last_headers()
        return retry_after(headers.get("Retry-After")) if headers else None

    def _map_error(self, exc: Any) -> Outcome:
        status = int(getattr(exc, "status", 0) or 0)
        code = getattr(exc, "code", None)
        try:
            code = int(code) if code is not None else None
        except (TypeError, ValueError):
            code = None
        detail = error_text(getattr(exc, "msg", None) or getattr(exc, "detail", None) or getattr(exc, "title", ""))
        if code == STOP_CODE:
            return InvalidAddress(f"twilio 21610: recipient unsubscribed (replied STOP): {detail}", kind="stopped")
        if code in _INVALID_ADDRESS_CODES:
            return InvalidAddress(f"twilio {code}: {_INVALID_ADDRESS_CODES[code]}: {detail}")
        if code == 20429 or status == 429:
            return Retry(f"twilio {code}: too many requests", self._retry_after(), throttled=True)
        if status >= 500:
            return Retry(f"twilio: server error {status} (code {code})", self._retry_after())
        if code in _UNDELIVERABLE_CODES:
            return Permanent(f"twilio {code}: {_UNDELIVERABLE_CODES[code]}: {detail}")
        if status in (401, 403):
            return Permanent(f"twilio {code}: credentials rejected (HTTP {status})")
        return Permanent(f"twilio {code} (HTTP {status}): {detail}")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()
