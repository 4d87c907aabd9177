"""Verifying an SNS message (the envelope SES events arrive in) without letting strangers make us fetch.

Anyone can POST to ``/webhooks/ses``, and checking a signature needs the certificate named in the
message (``SigningCertURL``). So :func:`verify_sns` checks everything that needs no network first —
the message's shape and ``Type``, an allowed ``TopicArn``, ``SignatureVersion``, a ``Timestamp``
within ``sns_max_age``, a signature of an RSA key's length, and a ``SigningCertURL`` that is an
``https`` ``.pem`` URL on ``sns.<the topic's region>.amazonaws.com`` — and only then asks
:class:`SnsCertificates`, which:

- serves certificates pinned in ``sns_cert_map`` and those fetched before (by URL, at most
  ``max_entries``, each for ``ttl`` seconds, never past the certificate's own expiry);
- fetches a URL at most once at a time (concurrent requests for it wait for that fetch);
- starts at most ``new_urls_per_minute`` fetches of URLs it does not hold (429 above that);
- remembers a failed fetch for a while (403 for a URL that serves no certificate, 401 when AWS
  cannot be reached), so repeating a message does not repeat the fetch.

Every refusal is a 4xx: a request that could not be authenticated never gets a 5xx. SNS does not
retry a 4xx, so a genuine event that arrives while AWS cannot be reached *and* its certificate is
not yet cached is refused (logged as a warning); pin the certificate in ``sns_cert_map`` to depend
on no fetch at all.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import httpx

from notifyctl.errors import ApiError

if TYPE_CHECKING:
    from cryptography.x509 import Certificate

log = logging.getLogger("notifyctl.webhooks")

FUTURE_SKEW = 300  # seconds a signed timestamp may be ahead of our clock
SIGNED_FIELDS = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
    "UnsubscribeConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
}
_SNS_HOST = re.compile(r"^sns\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?$")
_SIGNATURE_BYTES = (128, 512)  # RSA keys of 1,024 to 4,096 bits (SNS signs with 2,048)


class SnsSettings(Protocol):
    """What verification reads from the API's settings (``notifyctl.api.config.ApiConfig`` has them)."""

    sns_topic_arns: list[str]
    sns_cert_map: dict[str, str]
    sns_max_age: int


def _err(status: int, message: str, headers: dict[str, str] | None = None) -> Exception:
    return ApiError(status, message, headers)


def sns_url_ok(url: str, region: str | None = None) -> bool:
    """An ``https`` URL on ``sns.<region>.amazonaws.com`` (any region when ``region`` is None),
    port 443, with no user info."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    host = _SNS_HOST.match(parts.hostname or "")
    return (
        parts.scheme == "https"
        and host is not None
        and (region is None or host.group(1) == region)
        and port in (None, 443)
        and "@" not in parts.netloc
    )


def cert_url_ok(url: str, region: str) -> bool:
    parts = urlsplit(url)
    return sns_url_ok(url, region) and parts.path.endswith(".pem") and not parts.query and not parts.fragment


def topic_region(arn: str) -> str | None:
    """``arn:aws:sns:<region>:<account>:<topic>`` → region."""
    parts = arn.split(":")
    return parts[3] if len(parts) == 6 and parts[0] == "arn" and parts[2] == "sns" and parts[3] else None


def parse_time(text: str) -> float | None:
    """An ISO 8601 / RFC 3339 time (SNS writes ``2026-12-01T18:47:00.123Z``) as a Unix time, or None."""
    try:
        dt = datetime.fromisoformat(text.strip().upper().replace("Z", "+00:00"))
    except (ValueError, TypeError, AttributeError):
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def verify_sns(cfg: SnsSettings, certs: SnsCertificates, msg: dict[str, Any], now: float | None = None) -> None:
    """Raise a 4xx ApiError unless ``msg`` is a fresh, genuinely signed SNS message for an allowed
    topic. Everything that needs no network is checked before ``certs`` is asked."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    kind = msg.get("Type")
    if not isinstance(kind, str) or kind not in SIGNED_FIELDS:
        raise _err(400, f"unknown SNS message Type {str(kind)[:40]!r}")
    for name in ("MessageId", "TopicArn", "Timestamp", "Signature", "SignatureVersion", "SigningCertURL"):
        if not isinstance(msg.get(name), str) or not msg.get(name):
            raise _err(400, f"SNS message lacks {name}")
    lines = []
    for name in SIGNED_FIELDS[kind]:
        value = msg.get(name)
        if value is None and name == "Subject":
            continue
        if value is None:
            raise _err(400, f"SNS message lacks {name}")
        if not isinstance(value, str):
            raise _err(400, f"SNS message field {name} is not a string")
        lines.append(f"{name}\n{value}\n")
    if msg["TopicArn"] not in cfg.sns_topic_arns:
        raise _err(403, "SNS topic not allowed (add it to NOTIFY_API_SNS_TOPIC_ARNS)")
    version = msg["SignatureVersion"]
    if version not in ("1", "2"):
        raise _err(400, f"unsupported SNS SignatureVersion {version[:8]!r}")
    now = time.time() if now is None else now
    ts = parse_time(msg["Timestamp"])
    if ts is None:  # a message we cannot date is one we cannot call fresh
        raise _err(401, "malformed SNS Timestamp")
    if ts < now - cfg.sns_max_age or ts > now + FUTURE_SKEW:
        raise _err(401, "stale or future SNS Timestamp (replayed message?)")
    try:
        signature = base64.b64decode(msg["Signature"], validate=True)
    except (binascii.Error, ValueError):
        raise _err(401, "malformed SNS Signature") from None
    if not _SIGNATURE_BYTES[0] <= len(signature) <= _SIGNATURE_BYTES[1]:
        raise _err(401, f"malformed SNS Signature ({len(signature)} bytes, not an RSA signature)")
    region = topic_region(msg["TopicArn"]) or ""
    url = msg["SigningCertURL"]
    if not cert_url_ok(url, region):
        raise _err(403, f"SigningCertURL is not an https .pem URL on sns.{region or '<region>'}.amazonaws.com")

    cert = certs.get(cfg, url, now)
    if not (cert.not_valid_before_utc.timestamp() <= now <= cert.not_valid_after_utc.timestamp()):
        raise _err(403, "SNS signing certificate expired or not yet valid")
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise _err(403, "SNS signing certificate does not hold an RSA key")
    try:
        key.verify(
            signature,
            "".join(lines).encode(),
            padding.PKCS1v15(),
            hashes.SHA1() if version == "1" else hashes.SHA256(),
        )
    except InvalidSignature:
        raise _err(403, "SNS signature does not match") from None


@dataclass(slots=True)
class _Held:
    cert: Certificate
    until: float


@dataclass(slots=True)
class _Refusal:
    status: int
    message: str
    until: float


class SnsCertificates:
    """SNS signing certificates by URL, with bounded fetching (see the module docstring).

    ``client`` is the HTTP client certificates are fetched with (``httpx.Client``; the default
    follows no redirect and gives up after ``timeout`` seconds). Thread-safe: :func:`verify_sns`
    runs in the server's thread pool."""

    def __init__(
        self,
        client: httpx.Client | None = None,
        *,
        max_entries: int = 32,
        ttl: float = 86400.0,
        new_urls_per_minute: int = 5,
        timeout: float = 5.0,
        refused_for: float = 600.0,
        unreachable_for: float = 30.0,
    ) -> None:
        self.client = client or httpx.Client(timeout=timeout, follow_redirects=False)
        self.max_entries = max_entries
        self.ttl = ttl
        self.new_urls_per_minute = new_urls_per_minute
        self.timeout = timeout
        self.refused_for = refused_for
        self.unreachable_for = unreachable_for
        self.fetches = 0  # fetches started, for operators and tests
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._refused: OrderedDict[str, _Refusal] = OrderedDict()
        self._inflight: dict[str, threading.Event] = {}
        self._started: deque[float] = deque()
        self._lock = threading.Lock()

    def close(self) -> None:
        self.client.close()

    def get(self, cfg: SnsSettings, url: str, now: float | None = None) -> Certificate:
        """The certificate at ``url`` (pinned, cached or fetched), or a 4xx ApiError."""
        pinned = cfg.sns_cert_map.get(url)
        if pinned is not None:
            return self._pinned(url, pinned)
        for _ in range(2):  # a second look after waiting for another request's fetch
            now = time.time() if now is None else now
            with self._lock:
                found = self._lookup(url, now)
                if found is not None:
                    return found
                waiting = self._inflight.get(url)
                if waiting is None:
                    self._admit(now)
                    event = self._inflight[url] = threading.Event()
            if waiting is not None:
                waiting.wait(self.timeout + 1.0)
                now = None
                continue
            try:
                held = self._fetch(url)
            except _FetchRefused as exc:
                with self._lock:
                    self._remember_refusal(url, exc.refusal)
                raise _err(exc.refusal.status, exc.refusal.message) from None
            finally:
                with self._lock:
                    self._inflight.pop(url, None)
                event.set()
            return held
        raise _err(429, "SNS signing certificate still being fetched; try again", {"Retry-After": "5"})

    # ---------------------------------------------------------------------------------- inside

    def _lookup(self, url: str, now: float) -> Certificate | None:
        held = self._held.get(url)
        if held is not None:
            if held.until > now:
                self._held.move_to_end(url)
                return held.cert
            del self._held[url]
        refused = self._refused.get(url)
        if refused is not None:
            if refused.until > now:
                raise _err(refused.status, refused.message)
            del self._refused[url]
        return None

    def _admit(self, now: float) -> None:
        while self._started and self._started[0] <= now - 60:
            self._started.popleft()
        if len(self._started) >= self.new_urls_per_minute:
            wait = max(1, int(self._started[0] + 60 - now) + 1)
            raise _err(
                429,
                f"too many new SNS certificate URLs in the last minute (at most {self.new_urls_per_minute}); "
                "try again later",
                {"Retry-After": str(wait)},
            )
        self._started.append(now)
        self.fetches += 1

    def _fetch(self, url: str) -> Certificate:
        from cryptography import x509

        started = time.time()
        try:
            resp = self.client.get(url, timeout=self.timeout)
        except httpx.HTTPError as exc:
            log.warning("cannot fetch SNS signing certificate %s: %s", url, type(exc).__name__)
            raise _FetchRefused(
                401,
                f"cannot fetch the SNS signing certificate ({type(exc).__name__}); message not verified",
                started + self.unreachable_for,
            ) from None
        if resp.status_code >= 500:
            log.warning("cannot fetch SNS signing certificate %s: HTTP %d", url, resp.status_code)
            raise _FetchRefused(
                401,
                f"cannot fetch the SNS signing certificate (HTTP {resp.status_code}); message not verified",
                started + self.unreachable_for,
            )
        if resp.status_code != 200:
            raise _FetchRefused(
                403, f"SigningCertURL answered HTTP {resp.status_code}, not a certificate", started + self.refused_for
            )
        try:
            cert = x509.load_pem_x509_certificate(resp.content)
        except ValueError:
            raise _FetchRefused(
                403, "SigningCertURL does not serve a PEM certificate", started + self.refused_for
            ) from None
        self._keep(url, cert, started)
        return cert

    def _pinned(self, url: str, pinned: str) -> Certificate:
        from cryptography import x509

        with self._lock:
            held = self._held.get(url)
            if held is not None:
                return held.cert
        pem = pinned.encode() if "-----BEGIN" in pinned else _read_pem(pinned)
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise _err(403, "pinned SNS certificate is not a PEM certificate") from None
        with self._lock:
            self._held[url] = _Held(cert, float("inf"))
        return cert

    def _keep(self, url: str, cert: Certificate, now: float) -> None:
        until = min(now + self.ttl, cert.not_valid_after_utc.timestamp())
        with self._lock:
            self._held[url] = _Held(cert, until)
            self._held.move_to_end(url)
            while len(self._held) > self.max_entries:
                self._held.popitem(last=False)

    def _remember_refusal(self, url: str, refusal: _Refusal) -> None:
        self._refused[url] = refusal
        self._refused.move_to_end(url)
        while len(self._refused) > 4 * self.max_entries:
            self._refused.popitem(last=False)


class _FetchRefused(Exception):
    def __init__(self, status: int, message: str, until: float) -> None:
        super().__init__(message)
        self.refusal = _Refusal(status, message, until)


def _read_pem(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        log.error("sns_cert_map: cannot read %s", path)
        raise _err(403, "pinned SNS certificate unreadable") from None
