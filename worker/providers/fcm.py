"""One module: one vendor in one place: FCM's message building, OAuth2 token source and outcome
mapping; ~470 lines.

Firebase Cloud Messaging, HTTP v1 API (route ``push.android``).

One ``POST {base_url}/v1/projects/{project_id}/messages:send`` per message (the v1 API has no
batch endpoint); a whole batch goes at once as concurrent HTTP/2 streams over a few connections
(``worker.providers.h2mux``, libcurl underneath; HTTP/1.1 with up to ``concurrency`` connections
when the server offers no HTTP/2). No thread per request.

Auth is OAuth2 with a service account: an RS256 JWT grant signed with the account's private key
is exchanged at ``token_uri`` for an access token, kept until shortly before it expires, and
shared by every worker process and host through Redis (``worker.providers.shared_token``: one
per service account). A 401 from a send refreshes it once (one refresh for everyone who saw the
401) and resends.

Outcomes, from ``error.details[].errorCode`` (``google.firebase.fcm.v1.FcmError``), else
``error.status``, else the HTTP status:

- ``UNREGISTERED`` → InvalidAddress
- ``INVALID_ARGUMENT``, ``SENDER_ID_MISMATCH``, ``THIRD_PARTY_AUTH_ERROR`` → Permanent
- ``QUOTA_EXCEEDED`` → Retry after max(60 s, Retry-After)
- ``UNAVAILABLE``, ``INTERNAL`` → Retry (Retry-After honoured)
- our own auth failing (token endpoint down/refusing, 401 after a refresh, 403 PERMISSION_DENIED,
  404 without an FCM code) → Retry: the message is fine, the configuration is not
- network errors and timeouts → Retry
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import orjson
from pydantic import BaseModel, ConfigDict, SecretStr

from notifyctl import keys
from notifyctl.masking import mask
from notifyctl.settings import provider_config
from worker.providers.base import InvalidAddress, Message, Misconfigured, Outcome, Permanent, Retry, Sent, error_text
from worker.providers.base import retry_after as parse_retry_after
from worker.providers.h2mux import Answer, Failure, Mux, Request, Steps, drive
from worker.providers.shared_token import Minted, SharedToken

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
ANDROID_TTL = "86400s"
QUOTA_BACKOFF = 60.0
# Refresh an access token this long before it expires (tokens last ~1 h).
TOKEN_REFRESH_MARGIN = 60.0
USER_AGENT = "notifyctl-fcm/0.1"
RESERVED_DATA_KEYS = frozenset({"from", "message_type"})
RESERVED_DATA_PREFIXES = ("google.", "gcm.")
_COLLAPSE_OK = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


class Config(BaseModel):
    model_config = ConfigDict(extra="ignore")

    service_account_file: Path | None = None
    service_account_json: SecretStr | None = None
    project_id: str | None = None
    base_url: str = "https://fcm.googleapis.com"
    token_url: str | None = None
    timeout: float = 10.0
    concurrency: int = 32  # connections at most (HTTP/1.1 needs one per request in flight)
    max_streams: int = 1000  # concurrent HTTP/2 streams per connection (and <= the server's)
    ca_file: Path | None = None
    http2: bool = True


class _AuthError(Exception):
    """Could not obtain an access token; every message of the batch is retried."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def collapse_key_for(dedup_key: str) -> str:
    """A collapse key derived from the dedup key: the key itself when short and plain, else a hash."""
    if _COLLAPSE_OK.match(dedup_key):
        return dedup_key
    return "k" + hashlib.sha256(dedup_key.encode()).hexdigest()[:40]


def _as_data_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def _data(m: Message) -> dict[str, str]:
    """The ``data`` of one delivery's message. Raises ValueError for data FCM would refuse."""
    data: dict[str, str] = {}
    for key, value in (m.data or {}).items():
        k = key if type(key) is str else str(key)
        if k in RESERVED_DATA_KEYS or k.startswith(RESERVED_DATA_PREFIXES):
            raise ValueError(f"data key {k!r} is reserved by FCM")
        if value is None:
            continue
        data[k] = value if type(value) is str else _as_data_value(value)
    data["delivery_id"] = m.delivery_id
    return data


def _notification(m: Message) -> dict[str, str]:
    return {k: str(m.content[k]) for k in ("title", "body", "image") if m.content.get(k)}


_TTL = b',"ttl":' + orjson.dumps(ANDROID_TTL)


class _Bodies:
    """Request bodies, exactly ``orjson.dumps({"message": build_message(m)})``, with the part a
    batch's messages share (the notification) serialised once per distinct content."""

    __slots__ = ("notifications",)

    def __init__(self) -> None:
        self.notifications: dict[tuple[Any, Any, Any], bytes] = {}

    def __call__(self, m: Message) -> bytes:
        data = orjson.dumps(_data(m))
        c = m.content
        key = (c.get("title"), c.get("body"), c.get("image"))
        notification = self.notifications.get(key)
        if notification is None:
            if len(self.notifications) >= 256:  # personal alerts: keep it small
                self.notifications.clear()
            n = _notification(m)
            notification = self.notifications[key] = b',"notification":' + orjson.dumps(n) if n else b""
        android = b'"high"' if m.priority == "high" else b'"normal"'
        tail = _TTL
        if m.dedup_key:
            tail += b',"collapse_key":' + orjson.dumps(collapse_key_for(m.dedup_key))
        return (b'{"message":{"token":' + orjson.dumps(m.address) + notification + b',"data":' + data
                + b',"android":{"priority":' + android + tail + b"}}}")  # fmt: skip


def build_message(m: Message) -> dict[str, Any]:
    """The ``message`` object for one delivery. Raises ValueError for data FCM would refuse."""
    data = _data(m)
    message: dict[str, Any] = {"token": m.address}
    notification = _notification(m)
    if notification:
        message["notification"] = notification
    message["data"] = data
    android: dict[str, Any] = {"priority": "high" if m.priority == "high" else "normal", "ttl": ANDROID_TTL}
    if m.dedup_key:
        android["collapse_key"] = collapse_key_for(m.dedup_key)
    message["android"] = android
    return message


def _error_info(resp: Answer) -> tuple[str | None, str]:
    """(FCM error code or RPC status, message) from an error response."""
    try:
        err = orjson.loads(resp.body).get("error")
    except (ValueError, AttributeError):
        err = None
    if not isinstance(err, dict):
        return None, f"HTTP {resp.status}"
    message = error_text(err.get("message") or f"HTTP {resp.status}")
    for detail in err.get("details") or []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.firebase.fcm.v1.FcmError"):
            if detail.get("errorCode"):
                return str(detail["errorCode"]), message
    status = err.get("status")
    return (str(status) if status else None), message


def classify(status_code: int, code: str | None, message: str, retry_after: float | None) -> Outcome:
    """Map an FCM error to an outcome (see the module docstring)."""
    what = f"{code or 'HTTP ' + str(status_code)}: {message}"
    if code == "UNREGISTERED":
        return InvalidAddress(what, kind="dead_token")
    if code in ("INVALID_ARGUMENT", "SENDER_ID_MISMATCH", "THIRD_PARTY_AUTH_ERROR", "FAILED_PRECONDITION"):
        return Permanent(what)
    if code in ("QUOTA_EXCEEDED", "RESOURCE_EXHAUSTED") or (code is None and status_code == 429):
        return Retry(what, max(QUOTA_BACKOFF, retry_after or 0.0), throttled=True)
    if code in ("UNAVAILABLE", "INTERNAL", "UNSPECIFIED_ERROR", "DEADLINE_EXCEEDED", "ABORTED", "UNKNOWN"):
        return Retry(what, retry_after)
    if status_code >= 500 or status_code in (401, 403, 404, 408):
        # 401/403/404 without an FCM code: credentials, permissions or project_id are wrong.
        return Retry(what, retry_after)
    return Permanent(what)


class _ServiceAccount:
    """What we need from the service account JSON. The private key is held as a key object only."""

    def __init__(self, info: dict[str, Any]) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        if not isinstance(info, dict):
            raise Misconfigured("fcm: the service account JSON must be an object")
        if info.get("type", "service_account") != "service_account":
            raise Misconfigured(f"fcm: credentials of type {info.get('type')!r}, expected 'service_account'")
        missing = [k for k in ("client_email", "private_key") if not info.get(k)]
        if missing:
            raise Misconfigured(f"fcm: the service account JSON lacks {', '.join(missing)}")
        self.client_email = str(info["client_email"])
        self.private_key_id = str(info.get("private_key_id") or "")
        self.project_id = str(info.get("project_id") or "") or None
        self.token_uri = str(info.get("token_uri") or GOOGLE_TOKEN_URI)
        try:
            key = load_pem_private_key(str(info["private_key"]).encode(), password=None)
        except (ValueError, TypeError):
            raise Misconfigured("fcm: the service account private_key is not a readable PEM key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise Misconfigured("fcm: the service account private_key is not an RSA key")
        self.key = key

    def assertion(self, now: float) -> str:
        import jwt

        iat = int(now)
        claims = {
            "iss": self.client_email,
            "scope": FCM_SCOPE,
            "aud": self.token_uri,
            "iat": iat,
            "exp": iat + 3600,
        }
        headers = {"kid": self.private_key_id} if self.private_key_id else None
        return jwt.encode(claims, self.key, algorithm="RS256", headers=headers)


class _TokenSource:
    """The OAuth2 access token of one service account, shared through Redis (``SharedToken``)."""

    def __init__(self, account: _ServiceAccount, token_url: str, client: Any, redis: Any | None = None) -> None:
        self.account = account
        self.token_url = token_url
        self.client = client
        self.fetches = 0
        ident = hashlib.sha256(f"{account.client_email}|{account.private_key_id}|{token_url}".encode()).hexdigest()
        self._shared = SharedToken(
            self._fetch,
            redis,
            keys.provider_token("fcm", ident[:32]),
            keys.provider_token_lock("fcm", ident[:32]),
            name="fcm",
        )

    def get(self) -> str:
        return self._shared.get()

    def refresh(self, stale: str) -> str:
        """A new token after ``stale`` was refused; every process that saw the refusal shares one refresh."""
        return self._shared.refresh(stale)

    def fresh(self) -> str:
        """A token fetched now for the caller alone (``check``: are the credentials good today?)."""
        return self._shared.fresh()

    def invalidate(self) -> None:
        self._shared.forget()

    def _fetch(self) -> Minted:
        import httpx

        try:
            resp = self.client.post(
                self.token_url,
                data={"grant_type": JWT_GRANT_TYPE, "assertion": self.account.assertion(time.time())},
                headers={"Accept": "application/json"},
            )
        except httpx.TransportError as exc:
            raise _AuthError(f"oauth token endpoint unreachable: {type(exc).__name__}") from None
        self.fetches += 1
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if resp.status_code != 200 or not isinstance(body, dict) or not body.get("access_token"):
            err = body.get("error", "") if isinstance(body, dict) else ""
            desc = body.get("error_description", "") if isinstance(body, dict) else ""
            detail = f"{err}: {desc}" if err else f"HTTP {resp.status_code}"
            raise _AuthError(
                f"oauth token refused ({error_text(detail)})", parse_retry_after(resp.headers.get("Retry-After"))
            )
        try:
            expires_in = float(body.get("expires_in", 3600))
        except (TypeError, ValueError):
            expires_in = 3600.0
        return Minted(str(body["access_token"]), expires_in - TOKEN_REFRESH_MARGIN, expires_in)


def _load_account_info(cfg: Config) -> dict[str, Any]:
    if cfg.service_account_json is not None and cfg.service_account_json.get_secret_value().strip():
        raw = cfg.service_account_json.get_secret_value()
        source = "service_account_json"
    elif cfg.service_account_file is not None:
        try:
            raw = Path(cfg.service_account_file).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise Misconfigured(
                f"fcm: cannot read service account file {cfg.service_account_file}: {exc.strerror}"
            ) from None
        source = str(cfg.service_account_file)
    else:
        raise Misconfigured("fcm: set NOTIFY_FCM_SERVICE_ACCOUNT_FILE or NOTIFY_FCM_SERVICE_ACCOUNT_JSON")
    try:
        info: dict[str, Any] = json.loads(raw)
    except ValueError:
        raise Misconfigured(f"fcm: {source} is not valid JSON") from None
    return info


class Provider:
    name: ClassVar[str] = "fcm"
    routes: ClassVar[frozenset[str]] = frozenset({"push.android"})

    def __init__(self, settings: Any, redis: Any | None = None) -> None:
        import httpx

        self.config: Config = provider_config(Config, "fcm", settings)
        cfg = self.config
        self.account = _ServiceAccount(_load_account_info(cfg))
        self.project_id = cfg.project_id or self.account.project_id
        if not self.project_id:
            raise Misconfigured("fcm: no project_id in the service account JSON; set NOTIFY_FCM_PROJECT_ID")
        if not cfg.base_url.startswith(("http://", "https://")):
            raise Misconfigured(f"fcm: base_url {cfg.base_url!r} is not an http(s) URL")
        if cfg.concurrency < 1 or cfg.timeout <= 0 or cfg.max_streams < 1:
            raise Misconfigured("fcm: concurrency and max_streams must be >= 1 and timeout > 0")
        self.token_url = cfg.token_url or self.account.token_uri
        self.send_url = f"{cfg.base_url.rstrip('/')}/v1/projects/{self.project_id}/messages:send"

        verify: Any = True
        if cfg.ca_file is not None:
            import ssl

            try:
                verify = ssl.create_default_context(cafile=str(cfg.ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise Misconfigured(f"fcm: cannot load ca_file {cfg.ca_file}: {exc}") from None
        # the token endpoint: one request an hour, over plain httpx
        self._client = httpx.Client(timeout=cfg.timeout, verify=verify, headers={"User-Agent": USER_AGENT})
        self.tokens = _TokenSource(self.account, self.token_url, self._client, redis)
        self._mux = Mux(
            ca_file=str(cfg.ca_file) if cfg.ca_file else None,
            connections=cfg.concurrency,
            max_streams=cfg.max_streams,
            timeout=cfg.timeout,
            connect_timeout=cfg.timeout,
            http2="preferred" if cfg.http2 else "never",
            user_agent=USER_AGENT,
        )

    # -- sending -----------------------------------------------------------------------------

    def _headers(self, token: str) -> list[str]:
        return [f"authorization: Bearer {token}", "content-type: application/json; UTF-8", "accept:", "expect:"]

    def send(self, messages: Sequence[Message]) -> list[Outcome]:
        return drive(self.steps(messages))

    def steps(self, messages: Sequence[Message]) -> Steps[list[Outcome]]:
        """``send`` as steps (``worker.providers.h2mux.Steps``): each round's requests are yielded
        with this provider's Mux, so that a batch's other pushes can go at the same time."""
        if not messages:
            return []
        try:
            token = self.tokens.get()
        except _AuthError as exc:
            return [Retry(exc.reason, exc.retry_after) for _ in messages]
        outcomes: list[Outcome | None] = [None] * len(messages)
        todo: list[tuple[int, bytes]] = []
        bodies = _Bodies()
        for i, m in enumerate(messages):
            try:
                todo.append((i, bodies(m)))
            except ValueError as exc:
                outcomes[i] = Permanent(f"INVALID_ARGUMENT (local): {exc}")
        for attempt in (0, 1):
            if not todo:
                break
            headers = self._headers(token)
            results = yield self._mux, [Request(self.send_url, headers, body) for _, body in todo]
            again: list[tuple[int, bytes]] = []
            for (i, body), res in zip(todo, results, strict=True):
                if isinstance(res, Failure) and res.kind == "invalid":
                    outcomes[i] = Permanent(f"cannot be sent: {res.detail}")
                    continue
                if isinstance(res, Failure):
                    outcomes[i] = Retry(
                        f"timeout: {res.detail}" if res.kind == "timeout" else f"network error: {res.detail}"
                    )
                    continue
                if res.status == 200:
                    try:
                        name = orjson.loads(res.body).get("name")
                    except (ValueError, AttributeError):
                        name = None
                    outcomes[i] = Sent(str(name) if name else "fcm:unnamed")
                    continue
                code, text = _error_info(res)
                if res.status == 401 and code != "THIRD_PARTY_AUTH_ERROR" and attempt == 0:
                    again.append((i, body))
                    continue
                outcomes[i] = classify(res.status, code, text, parse_retry_after(res.headers.get("retry-after")))
            todo = again
            if todo:
                try:
                    token = self.tokens.refresh(token)  # one refresh, shared by all that saw the 401
                except _AuthError as exc:
                    for i, _ in todo:
                        outcomes[i] = Retry(exc.reason, exc.retry_after)
                    todo = []
        return outcomes  # type: ignore[return-value]

    # -- admin -------------------------------------------------------------------------------

    def describe(self) -> dict[str, str]:
        cfg = self.config
        return {
            "service_account": (
                "(set, inline JSON)"
                if cfg.service_account_json is not None and cfg.service_account_json.get_secret_value().strip()
                else str(cfg.service_account_file)
            ),
            "client_email": self.account.client_email,
            "private_key_id": (
                mask(self.account.private_key_id, reveal_from=9) if self.account.private_key_id else "(none)"
            ),
            "project_id": str(self.project_id),
            "base_url": cfg.base_url,
            "token_url": self.token_url,
            "timeout": str(cfg.timeout),
            "concurrency": str(cfg.concurrency),
            "ca_file": str(cfg.ca_file) if cfg.ca_file else "(system)",
            "http2": str(cfg.http2),
        }

    def check(self) -> str | None:
        """Fetch a fresh token, then ask FCM to *validate* (not send) a message to a dummy token:
        a 200 or a 400 about the token means the credentials may send to this project."""
        try:
            token = self.tokens.fresh()
        except _AuthError as exc:
            return exc.reason
        body = {
            "validate_only": True,
            "message": {
                "token": "notifyctl-check",
                "data": {"check": "1"},
                "android": {"priority": "normal"},
            },
        }
        [resp] = self._mux.run([Request(self.send_url, self._headers(token), orjson.dumps(body))])
        if isinstance(resp, Failure):
            return f"FCM unreachable at {self.config.base_url}: {resp.detail}"
        if resp.status == 200:
            return None
        code, text = _error_info(resp)
        if resp.status == 400 or code in ("INVALID_ARGUMENT", "UNREGISTERED"):
            return None
        return f"FCM refused a validate_only request: {code or 'HTTP ' + str(resp.status)}: {text}"

    def close(self) -> None:
        self._mux.close()
        self._client.close()
