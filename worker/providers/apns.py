"""One module: one vendor in one place: APNs' JWT, request building over shared HTTP/2 connections and
outcome mapping; ~460 lines.

APNs (iOS push) over the HTTP/2 provider API, with token (``.p8`` / ES256 JWT) auth.

``send()`` puts a whole batch on the wire at once: one request per push, as concurrent streams over
``connections`` long-lived HTTP/2 connections (Apple treats rapid connect/disconnect as abuse), up
to ``max_streams`` and the server's ``MAX_CONCURRENT_STREAMS`` each (``worker.providers.h2mux``,
libcurl underneath), and blocks until every push has an outcome. The header lines a batch shares
are built once per batch.

- One JWT per team id, key id and key, shared by every worker process and host through Redis
  (``worker.providers.shared_token``): minted once under a lock and reused for ``token_ttl``
  seconds (Apple: 20-60 min; more often is answered ``TooManyProviderTokenUpdates``). A
  ``403 ExpiredProviderToken`` replaces it (one refresh for everyone who saw it) and resends the
  push once; ``403 InvalidProviderToken`` replaces it the same way (the push is ``Permanent``).
  ``429 TooManyProviderTokenUpdates`` resends once with the shared token when ours was another,
  else is a throttle (``Retry(throttled=True)``): it uses no attempt and never opens the circuit.
- ``apns-id`` is a UUID derived from ``delivery_id``, so a retried delivery carries the same id;
  ``apns-collapse-id`` comes from ``dedup_key`` (SHA-256 hex when longer than 64 bytes).
- A connection that dies (reset, GOAWAY) is reopened and only the streams it never answered
  are sent again, once; still no answer means ``Retry``. A stream that timed out is *not*
  resent (APNs may have taken it).

Outcomes: 200 ``Sent(apns-id)``; 410 and 400 ``BadDeviceToken`` ``InvalidAddress``; other
400/403/404/405/413 ``Permanent``; 429 and 5xx ``Retry`` (with ``Retry-After`` when given;
``TooManyRequests`` and ``TooManyProviderTokenUpdates`` throttled).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from notifyctl import keys
from notifyctl.settings import provider_config
from worker.providers.base import (
    InvalidAddress,
    Message,
    Misconfigured,
    Outcome,
    Permanent,
    Retry,
    Sent,
    error_text,
)
from worker.providers.base import retry_after as parse_retry_after
from worker.providers.h2mux import Failure, Mux, Request, Result, Steps, drive
from worker.providers.shared_token import Minted, SharedToken

log = logging.getLogger(__name__)

PRODUCTION_URL = "https://api.push.apple.com"
SANDBOX_URL = "https://api.sandbox.push.apple.com"
MAX_PAYLOAD = 4096
_APNS_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/notifyctl/apns-id")
_APNS_ID_NS_BYTES = _APNS_ID_NAMESPACE.bytes
_TOKEN_RE = re.compile(r"^[0-9a-fA-F]{64,200}$")
_INVALID_ADDRESS = {"BadDeviceToken", "Unregistered", "ExpiredToken"}
JWT_MAX_AGE = 3600.0  # APNs refuses a provider token older than one hour
TOKEN_UPDATES_BACKOFF = 60.0  # seconds to wait after TooManyProviderTokenUpdates
# `providers check` pushes to this well-formed token, which no device has (APNs: BadDeviceToken)
CHECK_TOKEN = "0" * 64


class Config(BaseModel):
    """APNs settings (environment ``NOTIFY_APNS_*`` or ``[provider_options.apns]``)."""

    model_config = ConfigDict(extra="ignore")

    key_file: Path | None = Field(None, description="the .p8 signing key file (AuthKey_XXXXXXXXXX.p8)")
    key: SecretStr | None = Field(None, description="the .p8 PEM contents (instead of key_file)")
    key_id: str = Field("", description="10-character key id of the .p8 key (JWT kid)")
    team_id: str = Field("", description="10-character Apple developer team id (JWT iss)")
    topic: str = Field("", description="the app's bundle id (apns-topic)")
    base_url: str = Field(PRODUCTION_URL, description="APNs base URL")
    use_sandbox: bool = Field(False, description="use api.sandbox.push.apple.com (development builds)")
    ca_file: Path | None = Field(None, description="the CA to trust instead of the system's (a local sandbox)")
    timeout: float = Field(10.0, gt=0, description="seconds to wait for one answer")
    connect_timeout: float = Field(10.0, gt=0, description="seconds to open a connection")
    connections: int = Field(2, ge=1, le=64, description="HTTP/2 connections kept open")
    max_streams: int = Field(500, ge=1, description="concurrent streams per connection (and <= the server's)")
    token_ttl: float = Field(3000.0, gt=0, le=3600, description="reuse one JWT this long, seconds (20-60 min)")
    push_type: str = Field("alert", description="apns-push-type")
    ttl: int = Field(86400, ge=0, description="apns-expiration = now + ttl; 0 = deliver now or never")
    sound: str | None = Field("default", description="aps.sound for alerts (empty = silent)")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError("base_url must be https://host[:port]")
        return v.rstrip("/")


def jwt_minter(key: Any, key_id: str, team_id: str, ttl: float) -> Any:
    """``mint`` for a ``SharedToken``: a provider JWT, renewed after ``ttl`` s, valid for an hour."""
    import jwt

    def mint() -> Minted:
        token = jwt.encode({"iss": team_id, "iat": int(time.time())}, key, algorithm="ES256", headers={"kid": key_id})
        return Minted(token, ttl, JWT_MAX_AGE)

    return mint


def _key_fingerprint(key: Any) -> str:
    """Which key signs: part of the shared token's name, so that a process given another key (or a
    wrong key id for the same key) never takes, or overwrites, a token it did not sign."""
    from cryptography.hazmat.primitives import serialization

    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def apns_id_for(delivery_id: str) -> str:
    """The apns-id for a delivery: the same UUID on every attempt (``uuid5(namespace, delivery_id)``,
    upper-case; spelled out here because ``uuid.uuid5`` costs twice as much, once per push)."""
    h = bytearray(hashlib.sha1(_APNS_ID_NS_BYTES + delivery_id.encode()).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50  # version 5
    h[8] = (h[8] & 0x3F) | 0x80  # RFC 4122 variant
    x = h.hex().upper()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def collapse_id_for(dedup_key: str) -> str:
    """apns-collapse-id from a dedup key: as is when <= 64 bytes, else its SHA-256 hex (64 chars)."""
    if len(dedup_key.encode()) <= 64:
        return dedup_key
    return hashlib.sha256(dedup_key.encode()).hexdigest()


class _Item:
    """One message on its way: its request, and what has been tried."""

    __slots__ = ("index", "apns_id", "path", "body", "collapse", "priority", "jwt", "conn_resent", "token_resent")

    def __init__(self, index: int, apns_id: str, path: str, body: bytes, collapse: str | None, priority: str) -> None:
        self.index, self.apns_id, self.path, self.body = index, apns_id, path, body
        # the header line: bytes when not ASCII (APNs takes any UTF-8 of at most 64 bytes)
        line = f"apns-collapse-id: {collapse}" if collapse is not None else None
        self.collapse: str | bytes | None = line if line is None or line.isascii() else line.encode()
        self.priority = priority
        self.jwt = ""
        self.conn_resent = self.token_resent = False


class Provider:
    name: ClassVar[str] = "apns"
    routes: ClassVar[frozenset[str]] = frozenset({"push.ios"})

    def __init__(self, settings: Any, redis: Any | None = None) -> None:
        try:
            self.config: Config = provider_config(Config, "apns", settings)
        except ValidationError as exc:
            raise Misconfigured(f"apns: {exc.errors()[0].get('loc')}: {exc.errors()[0].get('msg')}") from None
        cfg = self.config
        missing = [n for n in ("key_id", "team_id", "topic") if not getattr(cfg, n)]
        if cfg.key is None and cfg.key_file is None:
            missing.append("key or key_file")
        if missing:
            raise Misconfigured("apns: missing " + ", ".join(missing))
        if cfg.token_ttl < 1200:
            log.warning("apns: token_ttl %ss < 20 min; APNs answers TooManyProviderTokenUpdates", cfg.token_ttl)
        self.base_url = cfg.base_url
        if cfg.use_sandbox and self.base_url == PRODUCTION_URL:
            self.base_url = SANDBOX_URL
        if cfg.ca_file is not None and not Path(cfg.ca_file).is_file():
            raise Misconfigured(f"apns: cannot load ca_file {cfg.ca_file}: no such file")
        self._key = self._load_key()
        ident = f"{cfg.team_id}:{cfg.key_id}:{_key_fingerprint(self._key)}"
        self._tokens = SharedToken(
            jwt_minter(self._key, cfg.key_id, cfg.team_id, cfg.token_ttl),
            redis,
            keys.provider_token("apns", ident),
            keys.provider_token_lock("apns", ident),
            name="apns",
        )
        self._mux = Mux(
            ca_file=str(cfg.ca_file) if cfg.ca_file else None,
            connections=cfg.connections,
            max_streams=cfg.max_streams,
            timeout=cfg.timeout,
            connect_timeout=cfg.connect_timeout,
            http2="required",
        )
        self._device_url = self.base_url + "/3/device/"
        self._fixed: tuple[str, list[str], list[str]] | None = None  # (jwt, headers for priority 5, for 10)
        self._aps: dict[tuple[Any, Any], bytes] = {}  # (title, body) → b'{"aps":{...}' (``_payload``)

    @property
    def connects(self) -> int:
        """Connections opened so far (tests, stats)."""
        return self._mux.connects

    def _load_key(self) -> Any:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        cfg = self.config
        try:
            pem = cfg.key.get_secret_value().encode() if cfg.key else Path(cfg.key_file or "").read_bytes()
        except OSError as exc:
            raise Misconfigured(f"apns: cannot read key_file {cfg.key_file}: {exc.strerror}") from None
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise Misconfigured("apns: the key is not a PEM private key (.p8)") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise Misconfigured("apns: the key must be a P-256 EC key (.p8 from Apple)")
        return key

    # -- public API ------------------------------------------------------------------------------

    def describe(self) -> dict[str, str]:
        cfg = self.config
        return {
            "base_url": self.base_url,
            "topic": cfg.topic,
            "key_id": cfg.key_id,
            "team_id": cfg.team_id,
            "key": "(set)" if cfg.key is not None else f"file {cfg.key_file}",
            "ca_file": str(cfg.ca_file) if cfg.ca_file else "(system)",
            "push_type": cfg.push_type,
            "connections": str(cfg.connections),
            "token_ttl": f"{cfg.token_ttl:g}s",
            "ttl": f"{cfg.ttl}s",
            "timeout": f"{cfg.timeout:g}s",
        }

    def check(self) -> str | None:
        """Do APNs take our provider token for this topic? One push to a well-formed device token
        that no device has (``CHECK_TOKEN``): APNs answers ``400 BadDeviceToken`` when the key id,
        team id, key and topic are right, ``403 InvalidProviderToken`` when the key id or team id
        (or the key) is wrong, ``400 TopicDisallowed`` for a topic the key may not push to.
        Nothing is delivered."""
        try:
            token = self._tokens.get()
        except Exception as exc:  # noqa: BLE001 - reported as one line
            return f"cannot sign a provider token: {exc.__class__.__name__}"
        probe = Message(
            delivery_id="notifyctl-check", notification_id="notifyctl-check", channel="push", route="push.ios",
            address=CHECK_TOKEN, content={"title": "notifyctl check", "body": "never delivered"},
            category="transactional", priority="low",
        )  # fmt: skip
        item = self._item(0, probe)
        assert not isinstance(item, InvalidAddress | Permanent)
        item.jwt = token
        [result] = self._mux.run([self._request(item, str(int(time.time()) + 60))])
        if isinstance(result, Failure):
            return f"cannot connect to {self.base_url}: {result.detail}"
        reason = _reason(result.body) or f"HTTP {result.status}"
        if result.status == 400 and reason == "BadDeviceToken":
            return None  # the token, key id, team id and topic were taken; only the device is unknown
        if result.status == 200:
            return None  # accepted (a server that knows no devices): the credentials work
        if result.status == 403:
            return (f"APNs refused the provider token ({reason}): check key_id {self.config.key_id!r}, "
                    f"team_id {self.config.team_id!r} and the key")  # fmt: skip
        return f"APNs refused a check push: {result.status} {reason}"

    def send(self, messages: Sequence[Message]) -> list[Outcome]:
        return drive(self.steps(messages))

    def steps(self, messages: Sequence[Message]) -> Steps[list[Outcome]]:
        """``send`` as steps (``worker.providers.h2mux.Steps``): each round's requests are yielded
        with this provider's Mux, so that a batch's other pushes can go at the same time."""
        if not messages:
            return []
        outcomes: list[Outcome | None] = [None] * len(messages)
        todo: list[_Item] = []
        for i, m in enumerate(messages):
            item = self._item(i, m)
            if isinstance(item, _Item):
                todo.append(item)
            else:
                outcomes[i] = item
        if todo:
            try:
                jwt_token = self._tokens.get()
            except Exception as exc:  # noqa: BLE001 - cannot sign: nothing can go
                log.warning("apns: cannot sign a provider token: %s", exc.__class__.__name__)
                reason = f"cannot sign a provider token: {exc.__class__.__name__}"
                for item in todo:
                    outcomes[item.index] = Retry(reason)
                todo = []
            for item in todo:
                item.jwt = jwt_token
        while todo:
            cfg = self.config
            expiration = str(int(time.time()) + cfg.ttl) if cfg.ttl else "0"
            fixed: dict[str, tuple[list[str], list[str]]] = {}
            results = yield self._mux, [self._request(item, expiration, fixed) for item in todo]
            todo = self._round(todo, results, outcomes)
        return outcomes  # type: ignore[return-value]

    def close(self) -> None:
        self._mux.close()

    # -- sending ---------------------------------------------------------------------------------

    def _item(self, index: int, m: Message) -> _Item | InvalidAddress | Permanent:
        token = m.address.strip()
        if not _TOKEN_RE.match(token):
            return InvalidAddress("BadDeviceToken", kind="dead_token")
        body = self._payload(m)
        if len(body) > MAX_PAYLOAD:
            return Permanent("PayloadTooLarge")
        priority = "5" if m.priority == "low" or self.config.push_type == "background" else "10"
        collapse = collapse_id_for(m.dedup_key) if m.dedup_key else None
        return _Item(index, apns_id_for(m.delivery_id), self._device_url + token, body, collapse, priority)

    def _payload(self, m: Message) -> bytes:
        """``{"aps": {...}, **data}`` as JSON: the ``aps`` part (the same for a campaign's batch) is
        serialised once per distinct alert, then each message's data is added after it."""
        content = m.content
        key = (content.get("title"), content.get("body"))
        head = self._aps.get(key)
        if head is None:
            aps: dict[str, Any]
            if self.config.push_type == "background":
                aps = {"content-available": 1}
            else:
                alert = {k: content[k] for k in ("title", "body") if content.get(k)}
                aps = {"alert": alert}
                if self.config.sound:
                    aps["sound"] = self.config.sound
            if len(self._aps) >= 256:  # a batch of personal alerts: keep the cache small
                self._aps.clear()
            head = self._aps[key] = b'{"aps":' + orjson.dumps(aps)
        data = m.data
        if data and "aps" in data:
            data = {k: v for k, v in data.items() if k != "aps"}
        if not data:
            return head + b"}"
        return head + b"," + orjson.dumps(data)[1:]

    def _fixed_headers(self, jwt_token: str, expiration: str) -> tuple[list[str], list[str]]:
        """The header lines every request of a batch shares (per priority): built once per batch."""
        cfg = self.config
        base = [
            f"authorization: bearer {jwt_token}",
            f"apns-topic: {cfg.topic}",
            f"apns-push-type: {cfg.push_type}",
            f"apns-expiration: {expiration}",
            "content-type: application/json",
            "accept:",  # libcurl's default "accept: */*": not sent
        ]
        return [*base, "apns-priority: 5"], [*base, "apns-priority: 10"]

    def _request(
        self, item: _Item, expiration: str, fixed: dict[str, tuple[list[str], list[str]]] | None = None
    ) -> Request:
        fixed = {} if fixed is None else fixed
        pair = fixed.get(item.jwt)
        if pair is None:
            pair = fixed[item.jwt] = self._fixed_headers(item.jwt, expiration)
        headers = [*(pair[0] if item.priority == "5" else pair[1]), "apns-id: " + item.apns_id]
        if item.collapse is not None:
            headers.append(item.collapse)  # type: ignore[arg-type]
        return Request(item.path, headers, item.body)

    def _round(self, todo: list[_Item], results: list[Result], outcomes: list[Outcome | None]) -> list[_Item]:
        """``todo`` was sent once, with these ``results``: settle what is final and answer what goes
        again (each once at most): streams a dead connection never answered, and pushes refused for
        a token that has been replaced since (``ExpiredProviderToken``;
        ``TooManyProviderTokenUpdates`` when the shared token is another than ours)."""
        again: list[_Item] = []
        expired: list[_Item] = []
        invalid: set[str] = set()
        too_many: list[_Item] = []
        for item, res in zip(todo, results, strict=True):
            if isinstance(res, Failure):
                if res.kind == "timeout":
                    outcomes[item.index] = Retry("timeout waiting for APNs")
                elif res.kind == "invalid":
                    outcomes[item.index] = Permanent(f"cannot be sent: {res.detail}")
                elif item.conn_resent:
                    outcomes[item.index] = Retry(f"connection: {res.detail}")
                else:
                    item.conn_resent = True
                    again.append(item)
                continue
            status = res.status
            if status == 200:
                outcomes[item.index] = Sent(res.header(b"apns-id") or item.apns_id)
                continue
            reason = _reason(res.body)
            if status == 403 and reason == "ExpiredProviderToken" and not item.token_resent:
                expired.append(item)
                continue
            if status == 403 and reason == "InvalidProviderToken":
                invalid.add(item.jwt)
            elif status == 429 and reason == "TooManyProviderTokenUpdates" and not item.token_resent:
                too_many.append(item)
                continue
            outcomes[item.index] = _outcome(status, reason, res.headers, item.apns_id)
        for stale in invalid | {i.jwt for i in expired}:
            # refused: one new token, shared by every process (the others find it and take it)
            try:
                fresh = self._tokens.refresh(stale)
            except Exception as exc:  # noqa: BLE001 - cannot sign
                fresh = ""
                log.warning("apns: cannot sign a provider token: %s", exc.__class__.__name__)
            for item in expired:
                if item.jwt == stale:
                    if fresh:
                        item.jwt, item.token_resent = fresh, True
                        again.append(item)
                    else:
                        outcomes[item.index] = Retry("ExpiredProviderToken")
        if too_many:
            # We changed tokens too often: the shared token, when it is another than ours, goes;
            # else wait without using an attempt or counting against the circuit.
            shared = self._tokens.shared()
            for item in too_many:
                if shared and shared != item.jwt:
                    item.jwt, item.token_resent = shared, True
                    again.append(item)
                else:
                    outcomes[item.index] = Retry("TooManyProviderTokenUpdates", TOKEN_UPDATES_BACKOFF, throttled=True)
        return again


def _reason(body: bytes) -> str:
    if not body:
        return ""
    try:
        return error_text(json.loads(body).get("reason") or "")
    except (ValueError, AttributeError):
        return ""


def _outcome(status: int, reason: str, headers: dict[str, str], apns_id: str) -> Outcome:
    if status == 200:
        return Sent(headers.get("apns-id") or apns_id)
    reason = reason or f"HTTP {status}"
    if status == 410 or reason in _INVALID_ADDRESS:
        return InvalidAddress(reason, kind="dead_token")
    if status == 403 and reason == "ExpiredProviderToken":
        return Retry(reason)
    if status == 429 and reason == "TooManyRequests":
        return Retry(reason, parse_retry_after(headers.get("retry-after")), throttled=True)
    if status == 429 and reason == "TooManyProviderTokenUpdates":
        # our token changes, not the message or APNs' health: no attempt used, no circuit failure
        return Retry(reason, parse_retry_after(headers.get("retry-after")) or TOKEN_UPDATES_BACKOFF, throttled=True)
    if status == 429 or status >= 500:
        return Retry(reason, parse_retry_after(headers.get("retry-after")))
    if 400 <= status < 500:
        return Permanent(reason)
    return Retry(reason)
