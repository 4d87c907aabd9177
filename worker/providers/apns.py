"""APNs (iOS push) over the HTTP/2 provider API, with token (``.p8`` / ES256 JWT) auth.

A provider keeps ``connections`` long-lived HTTP/2 connections (Apple treats rapid
connect/disconnect as abuse) on an asyncio loop in a background thread; ``send()`` spreads a
batch over them as concurrent streams (up to the server's ``MAX_CONCURRENT_STREAMS`` each) and
blocks until every message has an outcome.

- The JWT is minted once and reused for ``token_ttl`` seconds (Apple: 20-60 min); a
  ``403 ExpiredProviderToken`` mints a new one and resends the message once.
- ``apns-id`` is a UUID derived from ``delivery_id``, so a retried delivery carries the same id;
  ``apns-collapse-id`` comes from ``dedup_key`` (SHA-256 hex when longer than 64 bytes).
- A connection that dies (reset, GOAWAY) is reopened and only the streams it never answered
  are sent again, once; still no answer means ``Retry``. A stream that timed out is *not*
  resent (APNs may have taken it).

Outcomes: 200 ``Sent(apns-id)``; 410 and 400 ``BadDeviceToken`` ``InvalidAddress``; other
400/403/404/405/413 ``Permanent``; 429 and 5xx ``Retry`` (with ``Retry-After`` when given).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import re
import ssl
import threading
import time
import uuid
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from notifyctl.settings import provider_config
from worker.providers.base import (
    InvalidAddress,
    Message,
    Misconfigured,
    Outcome,
    Permanent,
    Retry,
    Sent,
)

log = logging.getLogger(__name__)

PRODUCTION_URL = "https://api.push.apple.com"
SANDBOX_URL = "https://api.sandbox.push.apple.com"
MAX_PAYLOAD = 4096
_APNS_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/notifyctl/apns-id")
_TOKEN_RE = re.compile(r"^[0-9a-fA-F]{64,200}$")
_INVALID_ADDRESS = {"BadDeviceToken", "Unregistered", "ExpiredToken"}


class Config(BaseSettings):
    """APNs settings (environment ``NOTIFY_APNS_*`` or ``[provider_options.apns]``)."""

    model_config = SettingsConfigDict(env_prefix="NOTIFY_APNS_", extra="ignore")

    key_file: Path | None = Field(None, description="the .p8 signing key file (AuthKey_XXXXXXXXXX.p8)")
    key: SecretStr | None = Field(None, description="the .p8 PEM contents (instead of key_file)")
    key_id: str = Field("", description="10-character key id of the .p8 key (JWT kid)")
    team_id: str = Field("", description="10-character Apple developer team id (JWT iss)")
    topic: str = Field("", description="the app's bundle id (apns-topic)")
    base_url: str = Field(PRODUCTION_URL, description="APNs base URL")
    use_sandbox: bool = Field(False, description="use api.sandbox.push.apple.com (development builds)")
    ca_file: Path | None = Field(None, description="extra CA certificate to trust (local sandbox)")
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


class _ConnectionLost(Exception):
    """The connection ended before this stream was answered (safe to resend)."""


class _Conn(asyncio.Protocol):
    """One HTTP/2 client connection: h2 state machine + a future per open stream."""

    def __init__(self, authority: str, max_streams: int) -> None:
        import h2.config
        import h2.connection

        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.authority = authority
        self.max_streams = max_streams
        self._flush_pending = False
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, tuple[asyncio.Future[tuple[int, dict[str, str], bytes]], list[Any]]] = {}
        self.changed = asyncio.Event()  # set on window updates, closed streams, settings
        self.ready = asyncio.get_running_loop().create_future()
        self.gone = asyncio.get_running_loop().create_future()  # done when the transport is closed
        self.dead = False
        self.goaway_reason: str | None = None

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        self._flush()

    def data_received(self, data: bytes) -> None:
        import h2.events
        import h2.exceptions

        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._die(f"protocol error: {exc}")
            return
        for ev in events:
            if isinstance(ev, h2.events.RemoteSettingsChanged):
                if not self.ready.done():
                    self.ready.set_result(None)
                self.changed.set()
            elif isinstance(ev, h2.events.ResponseReceived):
                entry = self.pending.get(ev.stream_id)
                if entry:
                    entry[1].append(dict(ev.headers or []))
            elif isinstance(ev, h2.events.DataReceived):
                entry = self.pending.get(ev.stream_id)
                if entry:
                    entry[1].append(ev.data or b"")
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                entry = self.pending.pop(ev.stream_id, None)
                if entry and not entry[0].done():
                    parts = entry[1]
                    headers = parts[0] if parts and isinstance(parts[0], dict) else {}
                    body = b"".join(p for p in parts[1:] if isinstance(p, bytes))
                    entry[0].set_result((int(headers.get(":status", 0)), headers, body))
                self.changed.set()
            elif isinstance(ev, h2.events.StreamReset):
                entry = self.pending.pop(ev.stream_id, None)
                if entry and not entry[0].done():
                    entry[0].set_exception(_ConnectionLost(f"stream reset ({ev.error_code!r})"))
                self.changed.set()
            elif isinstance(ev, h2.events.WindowUpdated):
                self.changed.set()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                reason = None
                if ev.additional_data:
                    try:
                        reason = json.loads(ev.additional_data).get("reason")
                    except (ValueError, AttributeError):
                        reason = None
                self.goaway_reason = reason or f"GOAWAY {ev.error_code!r}"
                self.dead = True
                last = ev.last_stream_id or 0
                # streams above last_stream_id were never processed; the rest may still be answered
                for sid in [s for s in self.pending if s > last]:
                    fut, _ = self.pending.pop(sid)
                    if not fut.done():
                        fut.set_exception(_ConnectionLost(self.goaway_reason))
                if not self.pending:
                    self._close()
                self.changed.set()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.gone.done():
            self.gone.set_result(None)
        self._die(self.goaway_reason or f"connection lost: {exc or 'closed by peer'}")

    def eof_received(self) -> bool | None:
        return None  # close the transport

    # -- helpers --

    def _die(self, why: str) -> None:
        self.dead = True
        if not self.ready.done():
            self.ready.set_exception(_ConnectionLost(why))
            self.ready.exception()  # mark retrieved
        for fut, _ in self.pending.values():
            if not fut.done():
                fut.set_exception(_ConnectionLost(why))
        self.pending.clear()
        self.changed.set()
        self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            data = self.h2.data_to_send()
            if data:
                self.transport.write(data)

    def _flush_soon(self) -> None:
        """Coalesce the frames of all streams started in this loop iteration into one write."""
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush_later)

    def _flush_later(self) -> None:
        self._flush_pending = False
        self._flush()

    def close(self) -> None:
        if not self.dead:
            self.dead = True
            try:
                self.h2.close_connection()
                self._flush()
            except Exception:  # noqa: BLE001 - best effort
                pass
        self._die("closed")

    async def request(
        self, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one POST and wait for its answer. Raises _ConnectionLost if it never came."""
        import h2.exceptions

        # wait for a free stream slot (the server may allow only 1 until the first success)
        while True:
            if self.dead:
                raise _ConnectionLost(self.goaway_reason or "connection closed")
            # len(pending) = our open streams (h2's open_outbound_streams is O(streams))
            if len(self.pending) < min(self.max_streams, self.h2.remote_settings.max_concurrent_streams):
                break
            self.changed.clear()
            await self.changed.wait()
        sid = self.h2.get_next_available_stream_id()
        fut: asyncio.Future[tuple[int, dict[str, str], bytes]] = asyncio.get_running_loop().create_future()
        self.pending[sid] = (fut, [])
        try:
            self.h2.send_headers(
                sid,
                [(":method", "POST"), (":scheme", "https"), (":authority", self.authority), (":path", path)] + headers,
                end_stream=False,
            )
            view = memoryview(body)
            while view:
                window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
                if window <= 0:
                    self._flush()
                    self.changed.clear()
                    await self.changed.wait()
                    if self.dead or fut.done():
                        break
                    continue
                self.h2.send_data(sid, bytes(view[:window]))
                view = view[window:]
            if not self.dead:
                if not fut.done():
                    self.h2.end_stream(sid)
                elif self.h2.streams.get(sid) is not None and not self.h2.streams[sid].closed:
                    self.h2.reset_stream(sid)  # answered before we finished: close our side too
        except h2.exceptions.ProtocolError as exc:
            self.pending.pop(sid, None)
            raise _ConnectionLost(f"protocol error: {exc}") from exc
        self._flush_soon()
        try:
            return await fut
        except asyncio.CancelledError:  # timeout: free the stream, keep the connection
            self.pending.pop(sid, None)
            if not self.dead:
                try:
                    self.h2.reset_stream(sid)
                    self._flush()
                except h2.exceptions.ProtocolError:
                    pass
            raise


class _Tokens:
    """The provider JWT: minted once, reused for ``ttl`` seconds."""

    def __init__(self, key: Any, key_id: str, team_id: str, ttl: float) -> None:
        self._key, self._key_id, self._team_id, self._ttl = key, key_id, team_id, ttl
        self._lock = threading.Lock()
        self._token: str | None = None
        self._minted = 0.0
        self.minted_count = 0

    def current(self) -> str:
        with self._lock:
            if self._token is None or time.monotonic() - self._minted >= self._ttl:
                self._mint()
            assert self._token is not None
            return self._token

    def refresh(self, stale: str) -> str:
        """A new token, unless another stream already replaced ``stale``."""
        with self._lock:
            if self._token == stale or self._token is None:
                self._mint()
            assert self._token is not None
            return self._token

    def _mint(self) -> None:
        import jwt

        self._token = jwt.encode(
            {"iss": self._team_id, "iat": int(time.time())},
            self._key,
            algorithm="ES256",
            headers={"kid": self._key_id},
        )
        self._minted = time.monotonic()
        self.minted_count += 1


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


def apns_id_for(delivery_id: str) -> str:
    """The apns-id for a delivery: the same UUID on every attempt."""
    return str(uuid.uuid5(_APNS_ID_NAMESPACE, delivery_id)).upper()


def collapse_id_for(dedup_key: str) -> str:
    """apns-collapse-id from a dedup key: as is when <= 64 bytes, else its SHA-256 hex (64 chars)."""
    if len(dedup_key.encode()) <= 64:
        return dedup_key
    return hashlib.sha256(dedup_key.encode()).hexdigest()


def _mask(value: str) -> str:
    return "****" + value[-4:] if len(value) > 8 else "(set)"


class Provider:
    name: ClassVar[str] = "apns"
    routes: ClassVar[frozenset[str]] = frozenset({"push.ios"})

    def __init__(self, settings: Any) -> None:
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
        parts = urlsplit(self.base_url)
        self._host = parts.hostname or ""
        self._port = parts.port or 443
        self._authority = parts.netloc
        self._key = self._load_key()
        self._tokens = _Tokens(self._key, cfg.key_id, cfg.team_id, cfg.token_ttl)
        try:
            self._ssl = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise Misconfigured(f"apns: cannot load ca_file: {exc.__class__.__name__}") from None
        self._ssl.set_alpn_protocols(["h2"])
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._conns: list[_Conn | None] = [None] * cfg.connections
        self._connecting: list[asyncio.Future[_Conn] | None] = [None] * cfg.connections
        self._rr = itertools.count()
        self.connects = 0  # connections opened so far (for tests / stats)

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
        """Key loads and signs, and an HTTP/2 connection to APNs opens. Sends nothing."""
        try:
            self._tokens.current()
        except Exception as exc:  # noqa: BLE001 - reported as one line
            return f"cannot sign a provider token: {exc.__class__.__name__}"
        try:
            self._run(self._get_conn(0), timeout=self.config.connect_timeout + 1)
        except Exception as exc:  # noqa: BLE001
            return f"cannot connect to {self.base_url}: {exc or exc.__class__.__name__}"
        return None

    def send(self, messages: Sequence[Message]) -> list[Outcome]:
        if not messages:
            return []
        # generous overall bound; each stream has its own timeout
        budget = (self.config.timeout + self.config.connect_timeout) * 3 + 5
        return self._run(self._send_all(list(messages)), timeout=budget)

    def close(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def shutdown() -> None:
            conns = [c for c in self._conns if c is not None]
            for c in conns:
                c.close()
            if conns:
                await asyncio.wait([c.gone for c in conns], timeout=2)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=5)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread:
                self._thread.join(timeout=5)
            self._loop = None

    # -- loop plumbing ---------------------------------------------------------------------------

    def _run(self, coro: Any, timeout: float) -> Any:
        with self._start_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    try:
                        loop.run_forever()
                    finally:
                        loop.close()

                self._thread = threading.Thread(target=run, name="apns-provider", daemon=True)
                self._thread.start()
                self._loop = loop
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout=timeout)
        except BaseException:
            fut.cancel()  # don't leave it running behind our back
            raise

    async def _get_conn(self, slot: int) -> _Conn:
        conn = self._conns[slot]
        if conn is not None and not conn.dead:
            return conn
        pending = self._connecting[slot]
        if pending is None:
            pending = asyncio.ensure_future(self._connect())
            self._connecting[slot] = pending
        try:
            conn = await asyncio.shield(pending)
        finally:
            if self._connecting[slot] is pending and pending.done():
                self._connecting[slot] = None
        self._conns[slot] = conn
        return conn

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                transport, conn = await loop.create_connection(
                    lambda: _Conn(self._authority, self.config.max_streams),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host,
                )
                ssl_obj = transport.get_extra_info("ssl_object")
                if ssl_obj is None or ssl_obj.selected_alpn_protocol() != "h2":
                    transport.close()
                    raise _ConnectionLost("server does not speak HTTP/2 (ALPN)")
                await conn.ready  # the server's SETTINGS
        except TimeoutError:
            raise _ConnectionLost("connect timeout") from None
        except (OSError, ssl.SSLError) as exc:
            raise _ConnectionLost(f"connect failed: {exc.__class__.__name__}: {exc}") from None
        self.connects += 1
        return conn

    # -- sending ---------------------------------------------------------------------------------

    def _payload(self, m: Message) -> bytes:
        aps: dict[str, Any]
        if self.config.push_type == "background":
            aps = {"content-available": 1}
        else:
            alert = {k: m.content[k] for k in ("title", "body") if m.content.get(k)}
            aps = {"alert": alert}
            if self.config.sound:
                aps["sound"] = self.config.sound
        data = {k: v for k, v in m.data.items() if k != "aps"}
        return json.dumps({"aps": aps, **data}, separators=(",", ":"), ensure_ascii=False).encode()

    def _headers(self, m: Message, apns_id: str) -> list[tuple[str, str]]:
        cfg = self.config
        priority = "5" if m.priority == "low" or cfg.push_type == "background" else "10"
        expiration = str(int(time.time()) + cfg.ttl) if cfg.ttl else "0"
        headers = [
            ("apns-topic", cfg.topic),
            ("apns-push-type", cfg.push_type),
            ("apns-priority", priority),
            ("apns-expiration", expiration),
            ("apns-id", apns_id),
            ("content-type", "application/json"),
        ]
        if m.dedup_key:
            headers.append(("apns-collapse-id", collapse_id_for(m.dedup_key)))
        return headers

    async def _send_all(self, messages: list[Message]) -> list[Outcome]:
        results = await asyncio.gather(*(self._send_one(m) for m in messages), return_exceptions=True)
        outcomes: list[Outcome] = []
        for r in results:
            if isinstance(r, BaseException):
                log.warning("apns: unexpected %s while sending", r.__class__.__name__)
                outcomes.append(Retry(f"unexpected error: {r.__class__.__name__}"))
            else:
                outcomes.append(r)
        return outcomes

    async def _send_one(self, m: Message) -> Outcome:
        token = m.address.strip()
        if not _TOKEN_RE.match(token):
            return InvalidAddress("BadDeviceToken")
        body = self._payload(m)
        if len(body) > MAX_PAYLOAD:
            return Permanent("PayloadTooLarge")
        apns_id = apns_id_for(m.delivery_id)
        headers = self._headers(m, apns_id)
        path = f"/3/device/{token}"
        resent_for_conn = resent_for_token = False
        jwt_token = self._tokens.current()
        slot = next(self._rr) % len(self._conns)
        while True:
            # a resend stays on its slot: that connection is known dead, so it gets a fresh one
            # (another slot may be just as stale without knowing it yet)
            try:
                conn = await self._get_conn(slot)
                async with asyncio.timeout(self.config.timeout):
                    status, rheaders, rbody = await conn.request(
                        path, [("authorization", f"bearer {jwt_token}"), *headers], body
                    )
            except _ConnectionLost as exc:
                if resent_for_conn:
                    return Retry(f"connection: {exc}")
                resent_for_conn = True
                continue
            except TimeoutError:
                return Retry("timeout waiting for APNs")
            reason = _reason(rbody)
            if status == 403 and reason == "ExpiredProviderToken" and not resent_for_token:
                resent_for_token = True
                jwt_token = self._tokens.refresh(jwt_token)
                continue
            return _outcome(status, reason, rheaders, apns_id)


def _reason(body: bytes) -> str:
    if not body:
        return ""
    try:
        return str(json.loads(body).get("reason") or "")
    except (ValueError, AttributeError):
        return ""


def _outcome(status: int, reason: str, headers: dict[str, str], apns_id: str) -> Outcome:
    if status == 200:
        return Sent(headers.get("apns-id") or apns_id)
    reason = reason or f"HTTP {status}"
    if status == 410 or reason in _INVALID_ADDRESS:
        return InvalidAddress(reason)
    if status == 403 and reason == "ExpiredProviderToken":
        return Retry(reason)
    if status == 429 and reason == "TooManyRequests":
        return Retry(reason, _retry_after(headers.get("retry-after")), throttled=True)
    if status == 429 or status >= 500:
        return Retry(reason, _retry_after(headers.get("retry-after")))
    if 400 <= status < 500:
        return Permanent(reason)
    return Retry(reason)
