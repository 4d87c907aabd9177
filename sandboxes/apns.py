"""One module: one fake APNs: the HTTP/2 server, its JWT check and its control endpoint share the
sandbox's state; ~410 lines.

A local APNs: the HTTP/2 provider API over TLS on 127.0.0.1, speaking Apple's wire protocol.

``POST /3/device/<hex token>`` with ``authorization: bearer <ES256 JWT>``, ``apns-topic``,
``apns-push-type``, ``apns-priority``, ``apns-expiration``, ``apns-collapse-id``, ``apns-id``.
Success is ``200`` with an empty body and the ``apns-id`` header; failures are
``{"reason": ...}`` (plus ``timestamp`` in ms on 410), exactly like api.push.apple.com.

The JWT is verified with the public key of the ``.p8`` for its ``kid`` (``keys``), its ``iss``
must be the team id (when given), and a token whose ``iat`` is older than one hour is answered
``403 ExpiredProviderToken``. A certificate for 127.0.0.1/localhost is made at startup by a
throwaway CA whose PEM is written to ``.ca_file`` (give it to the provider as ``ca_file``).

Faults (``FaultPlan`` from :mod:`sandboxes.base`, matched against path + body, so a device
token works as ``match``):

- ``{"status": 410, "reason": "Unregistered"}``: answer this status with that reason
  (``headers`` such as ``{"retry-after": "3"}`` are added, ``body`` replaces the JSON)
- ``{"delay": 0.5}``: answer that much later (other streams keep flowing)
- ``"jwt": token`` beside any fault: it applies only to requests presenting that provider token
  (an expired or revoked token is refused whoever presents it, and a new one is not)
- ``{"drop": true}``: the server vanishes: answers already written still arrive, then the
  connection ends (FIN, no GOAWAY, no TLS close_notify); this and later streams get no answer.
  ``{"drop": "reset"}``: a TCP reset instead (answers in flight may be lost, as on a real network)
- ``{"goaway": "Shutdown"}``: GOAWAY (last stream = the last one answered, the reason as JSON
  debug data, like Apple), then close

``unregistered`` tokens are always answered ``410 Unregistered``; a device token no device has
(``NO_DEVICE``, all zeros, or any token outside ``devices`` when given) ``400 BadDeviceToken`` —
after the provider token was checked, as APNs does, so ``providers check`` can tell a wrong key
id or team id (403 ``InvalidProviderToken``) from a good one without delivering anything. With
``token_update_interval`` (Apple's is 1200 s), a new provider token of a team and key that comes
sooner than that after the previous one is answered ``429 TooManyProviderTokenUpdates``
(``tokens_seen`` lists every well-signed token presented). Accepted pushes are recorded
in ``recorder``. The control API of :class:`~sandboxes.base.HttpSandbox` runs on a plain
HTTP side port (``control_url``), with one more endpoint: ``POST /_sandbox/unregistered``
(JSON list of tokens) / ``DELETE /_sandbox/unregistered``.

Run it: ``ApnsSandbox(keys={key_id: p8_pem}, topic="com.example.app").start()`` or
``python -m sandboxes.apns --key-file AuthKey_ABC123DEFG.p8 --key-id ABC123DEFG``.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sandboxes.apns_conn import ApnsConnection
from sandboxes.base import FaultPlan, HttpSandbox, Recorder, SandboxHandler, SeparateControl, serve_until_interrupted
from sandboxes.tls import make_certificates

_TOKEN_RE = re.compile(r"^[0-9a-fA-F]{64,200}$")
_PUSH_TYPES = {"alert", "background", "location", "voip", "complication", "fileprovider", "mdm", "liveactivity"}
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
TOKEN_MAX_AGE = 3600  # Apple: a provider token older than one hour is rejected
NO_DEVICE = "0" * 64  # a well-formed device token that no device has


def _public_key(key: Any) -> Any:
    """A verifying key from a PEM (private .p8 or public), bytes or str, or a key object."""
    if isinstance(key, str):
        key = key.encode()
    if isinstance(key, bytes):
        if b"PRIVATE KEY" in key:
            key = serialization.load_pem_private_key(key, password=None)
        else:
            key = serialization.load_pem_public_key(key)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        key = key.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("APNs keys are P-256 EC keys")
    return key


class _ControlHandler(SandboxHandler):
    """The control API (base endpoints + ``/_sandbox/unregistered``); the push API is HTTP/2 only."""

    def _control(self, method: str, body: bytes) -> None:
        path = self.path.split("?")[0]
        apns: ApnsSandbox = self.sandbox.apns  # type: ignore[attr-defined]
        if path == "/_sandbox/unregistered":
            if method == "POST":
                try:
                    tokens = json.loads(body or b"[]")
                    apns.unregistered.update(str(t).lower() for t in tokens)
                except (ValueError, TypeError) as exc:
                    self._reply(400, {"Content-Type": "text/plain"}, f"bad token list: {exc}".encode())
                    return
                self._reply(204, {}, b"")
            elif method == "DELETE":
                apns.unregistered.clear()
                self._reply(204, {}, b"")
            else:
                body = json.dumps(sorted(apns.unregistered)).encode()
                self._reply(200, {"Content-Type": "application/json"}, body)
            return
        super()._control(method, body)

    def handle_api(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        return 404, {"Content-Type": "application/json"}, b'{"reason":"BadPath"}'


class _ControlSandbox(HttpSandbox):
    handler_cls = _ControlHandler
    poll_interval = 0.05  # stop() returns quickly

    def __init__(self, apns: ApnsSandbox, port: int = 0) -> None:
        super().__init__(port)
        self.apns = apns


class ApnsSandbox(SeparateControl):
    """The local APNs. ``keys``: key id -> P-256 key (the .p8 PEM, a public PEM or a key object).

    ``url`` is the base URL for the provider's ``base_url``; ``ca_file`` the CA to trust;
    ``control_url`` the plain-HTTP control API.
    """

    def __init__(
        self,
        keys: dict[str, Any] | None = None,
        *,
        topic: str | None = "com.example.app",
        team_id: str | None = None,
        port: int = 0,
        control_port: int = 0,
        max_payload: int = 4096,
        max_streams: int = 1000,
        devices: set[str] | None = None,
        token_update_interval: float = 0.0,
    ) -> None:
        self.keys = {kid: _public_key(k) for kid, k in (keys or {}).items()}
        # Device tokens that exist (None: every well-formed one but NO_DEVICE); others are answered
        # 400 BadDeviceToken, as APNs answers a token no device of this app and environment has.
        self.devices = {d.lower() for d in devices} if devices is not None else None
        # > 0: a strict APNs — a new provider token for a team and key within this many seconds of
        # the previous new one is refused 429 TooManyProviderTokenUpdates (Apple: 20 min = 1200).
        self.token_update_interval = token_update_interval
        self.token_updates_refused = 0
        self._last_update: dict[tuple[str, str], tuple[float, str]] = {}
        self.topics = {topic} if topic else set()
        self.team_id = team_id
        self.max_payload = max_payload
        self.max_streams = max_streams
        self.unregistered: set[str] = set()
        self._control = _ControlSandbox(self, control_port)
        self.faults: FaultPlan = self._control.faults
        self.recorder: Recorder = self._control.recorder
        self.requests: list[str] = []  # path of every push request received (answered or not)
        self.request_auth: list[str] = []  # and its authorization header
        # requests a "delay" fault holds right now, and the most it held at once: how many the
        # client had in flight together (the loop's thread alone touches these)
        self.held = 0
        self.peak_held = 0
        self.tokens_seen: list[str] = []  # distinct well-signed provider tokens, in the order first seen
        self._verified: dict[str, dict[str, Any]] = {}
        self._tokens_lock = threading.Lock()
        self._tmp = tempfile.TemporaryDirectory(prefix="apns-sandbox-")
        self.ca_file, cert_file, key_file = make_certificates(Path(self._tmp.name))
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ssl.load_cert_chain(cert_file, key_file)
        self._ssl.set_alpn_protocols(["h2"])
        self._port = port
        self._conns: set[ApnsConnection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> ApnsSandbox:
        started = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(lambda: ApnsConnection(self), "127.0.0.1", self._port, ssl=self._ssl)
                )
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                errors.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="apns-sandbox", daemon=True)
        self._thread.start()
        started.wait()
        if errors:
            raise errors[0]
        self._control.start()
        return self

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is not None and server is not None and not loop.is_closed():

            async def shutdown() -> None:
                server.close()
                conns = list(self._conns)
                for c in conns:
                    c.abort()
                if conns:
                    await asyncio.wait([c.lost for c in conns], timeout=2)
                await server.wait_closed()
                loop.stop()

            asyncio.run_coroutine_threadsafe(shutdown(), loop)
            if self._thread:
                self._thread.join(timeout=5)
        self._control.stop()
        self._tmp.cleanup()

    def __enter__(self) -> ApnsSandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def drop_connections(self) -> None:
        """Cut every open client connection (as a network failure would)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def cut_all() -> None:
            conns = list(self._conns)
            for c in conns:
                c.abort()
            if conns:
                await asyncio.wait([c.lost for c in conns], timeout=2)

        asyncio.run_coroutine_threadsafe(cut_all(), loop).result(timeout=5)

    @property
    def connections(self) -> int:
        return len(self._conns)

    # -- the API -------------------------------------------------------------------------------

    def _check(self, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        """Validate one request like APNs does: (status, reason); 200 means accept."""
        if headers.get(":method") != "POST":
            return 405, "MethodNotAllowed"
        path = headers.get(":path", "")
        if not path.startswith("/3/device/"):
            return 404, "BadPath"
        auth = self._check_auth(headers.get("authorization"))
        if auth:
            return (429 if auth == "TooManyProviderTokenUpdates" else 403), auth
        topic = headers.get("apns-topic")
        if not topic:
            return 400, "MissingTopic"
        if self.topics and topic not in self.topics:
            return 400, "TopicDisallowed"
        token = path[len("/3/device/") :]
        if not _TOKEN_RE.match(token) or not self._has_device(token):
            return 400, "BadDeviceToken"
        push_type = headers.get("apns-push-type", "alert")
        if push_type not in _PUSH_TYPES:
            return 400, "InvalidPushType"
        if headers.get("apns-priority", "10") not in ("1", "5", "10"):
            return 400, "BadPriority"
        if not headers.get("apns-expiration", "0").isdigit():
            return 400, "BadExpirationDate"
        if len(headers.get("apns-collapse-id", "").encode()) > 64:
            return 400, "BadCollapseId"
        if "apns-id" in headers and not _UUID_RE.match(headers["apns-id"]):
            return 400, "BadMessageId"
        if not body:
            return 400, "PayloadEmpty"
        if len(body) > (5120 if push_type == "voip" else self.max_payload):
            return 413, "PayloadTooLarge"
        if token.lower() in self.unregistered:
            return 410, "Unregistered"
        return 200, ""

    def _has_device(self, token: str) -> bool:
        if self.devices is not None:
            return token.lower() in self.devices
        return token.strip("0") != ""  # NO_DEVICE: all zeros, never a real device's

    def _check_auth(self, header: str | None) -> str | None:
        if not header:
            return "MissingProviderToken"
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "MissingProviderToken"
        claims = self._verified.get(token)
        if claims is None:
            claims_or_reason = self._verify(token)
            if isinstance(claims_or_reason, str):
                return claims_or_reason
            claims = claims_or_reason
            with self._tokens_lock:
                if token not in self.tokens_seen:
                    self.tokens_seen.append(token)
                if self._too_soon(token, claims):
                    self.token_updates_refused += 1
                    return "TooManyProviderTokenUpdates"
                if len(self._verified) > 1000:
                    self._verified.clear()
                self._verified[token] = claims
        iat = claims["iat"]
        if time.time() - iat > TOKEN_MAX_AGE:
            return "ExpiredProviderToken"
        return None

    def _too_soon(self, token: str, claims: dict[str, Any]) -> bool:
        """A strict APNs: is ``token`` an update too soon after the last new token of its team and key?"""
        if self.token_update_interval <= 0:
            return False
        who = (str(claims.get("iss")), str(claims.get("_kid")))
        now = time.time()
        last = self._last_update.get(who)
        if last is not None and last[1] != token and now - last[0] < self.token_update_interval:
            return True
        if last is None or last[1] != token:
            self._last_update[who] = (now, token)
        return False

    def _verify(self, token: str) -> dict[str, Any] | str:
        """The claims of a well-signed provider token, else the 403 reason."""
        try:
            head = jwt.get_unverified_header(token)
            key = self.keys.get(head.get("kid", ""))
            if key is None or head.get("alg") != "ES256":
                return "InvalidProviderToken"
            claims = jwt.decode(
                token, key, algorithms=["ES256"], options={"require": ["iat", "iss"], "verify_iat": False}
            )
        except jwt.PyJWTError:
            return "InvalidProviderToken"
        if self.team_id and claims.get("iss") != self.team_id:
            return "InvalidProviderToken"
        iat = claims.get("iat")
        if not isinstance(iat, int | float) or iat > time.time() + 60:
            return "InvalidProviderToken"
        claims["_kid"] = head.get("kid", "")
        return claims

    def _record(self, headers: dict[str, str], body: bytes, apns_id: str) -> None:
        try:
            payload: Any = json.loads(body)
        except ValueError:
            payload = body.decode("utf-8", "replace")
        self.recorder.add(
            {
                "token": headers.get(":path", "")[len("/3/device/") :],
                "apns_id": apns_id,
                "topic": headers.get("apns-topic"),
                "push_type": headers.get("apns-push-type"),
                "priority": headers.get("apns-priority"),
                "expiration": headers.get("apns-expiration"),
                "collapse_id": headers.get("apns-collapse-id"),
                "payload": payload,
                "at": time.time(),
            }
        )


def main(port: int = 2197, control_port: int = 0, argv: list[str] | None = None) -> None:
    """Run the sandbox in the foreground until Ctrl-C."""
    import argparse

    ap = argparse.ArgumentParser(description="local APNs sandbox (HTTP/2 + TLS)")
    ap.add_argument("--port", type=int, default=port)
    ap.add_argument("--control-port", type=int, default=control_port)
    ap.add_argument("--key-file", type=Path, help=".p8 key (or public key PEM) to verify JWTs with")
    ap.add_argument("--key-id", help="the key id (kid) of --key-file")
    ap.add_argument("--team-id")
    ap.add_argument("--topic", default="com.example.app")
    args = ap.parse_args(argv)
    keys = {args.key_id: args.key_file.read_bytes()} if args.key_file and args.key_id else {}
    sb = ApnsSandbox(keys, topic=args.topic, team_id=args.team_id, port=args.port, control_port=args.control_port)
    sb.start()
    serve_until_interrupted(
        sb,
        f"APNs sandbox on {sb.url} (CA: {sb.ca_file}); control API on {sb.control_url}",
        f"  control API token (Authorization: Bearer ...): {sb.control_token}",
    )


if __name__ == "__main__":
    main()
