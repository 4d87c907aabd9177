"""One module: one fake FCM: the token endpoint mints the access tokens messages:send checks, and both
answer in Google's error shapes; ~490 lines.

A local FCM HTTP v1 sandbox: Google's OAuth2 token endpoint and ``messages:send``.

- ``POST /token``: the service-account JWT grant. The RS256 assertion is verified with the public
  key of a known service account (iss, aud, iat/exp at most 1 h apart, scope); answers an opaque
  access token with ``expires_in``, or Google's ``{"error": "invalid_grant", ...}`` shapes.
- ``POST /v1/projects/{project}/messages:send``: checks ``Authorization: Bearer`` (401
  UNAUTHENTICATED for a missing, unknown, expired or revoked token; 403 PERMISSION_DENIED for
  another project), validates the message like FCM (a token target, string data values, reserved
  data keys, enum/duration fields, the 4096-byte payload limit) answering 400 INVALID_ARGUMENT in
  the real error shape, 404 UNREGISTERED for tokens in ``unregistered``, else records the message
  and answers ``{"name": "projects/<p>/messages/<id>"}``. ``validate_only`` requests are checked
  but not recorded.

Faults come from the shared ``FaultPlan``; ``fcm_fault()`` builds one with FCM's error body.
Extra control endpoints: ``POST /_sandbox/unregistered`` (JSON list of tokens),
``POST /_sandbox/revoke-tokens`` (every issued access token becomes invalid).

Throwaway credentials: ``make_service_account(token_uri, project_id)`` returns a service-account
JSON dict with a freshly generated RSA key; ``FcmSandbox`` makes one by default
(``sandbox.service_account``, ``sandbox.write_service_account(path)``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from notifyctl.home import write_private
from sandboxes.base import HttpSandbox, SandboxHandler, serve_until_interrupted

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
JWT_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_SCOPES = frozenset(
    {"https://www.googleapis.com/auth/firebase.messaging", "https://www.googleapis.com/auth/cloud-platform"}
)
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
MAX_PAYLOAD = 4096
MAX_TTL = 28 * 86400

_SEND_PATH = re.compile(r"^/v1/projects/([^/]+)/messages:send$")
_DURATION = re.compile(r"^\d+(\.\d{1,9})?s$")
_MESSAGE_FIELDS = frozenset(
    {"name", "data", "notification", "android", "webpush", "apns", "fcm_options", "fcmOptions"}
    | {"token", "topic", "condition"}
)
_ANDROID_FIELDS = frozenset(
    {"collapse_key", "collapseKey", "priority", "ttl", "restricted_package_name", "restrictedPackageName"}
    | {"data", "notification", "fcm_options", "fcmOptions", "direct_boot_ok", "directBootOk"}
)
_NOTIFICATION_FIELDS = frozenset({"title", "body", "image"})
_UNAUTHENTICATED_MSG = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or "
    "other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
)
_MISSING_AUTH_MSG = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or "
    "other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
)
_BAD_JWT_TIME = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
    "Check your iat and exp values in the JWT claim."
)

# FcmError code -> (HTTP status, google.rpc status, message), as FCM answers them.
FCM_ERRORS: dict[str, tuple[int, str, str]] = {
    "UNREGISTERED": (404, "NOT_FOUND", "Requested entity was not found."),
    "INVALID_ARGUMENT": (
        400,
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
    ),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED", "SenderId mismatch"),
    "QUOTA_EXCEEDED": (429, "RESOURCE_EXHAUSTED", "Quota exceeded for quota metric 'Send requests'."),
    "UNAVAILABLE": (503, "UNAVAILABLE", "The service is currently unavailable."),
    "INTERNAL": (500, "INTERNAL", "Internal error encountered."),
    "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service"),
    "UNSPECIFIED_ERROR": (500, "UNKNOWN", "Unknown error."),
}


def error_body(
    http_status: int,
    status: str,
    message: str,
    fcm_code: str | None = None,
    field: str | None = None,
) -> dict[str, Any]:
    """Google's JSON error envelope, with an FcmError detail and/or a BadRequest field violation."""
    details: list[dict[str, Any]] = []
    if fcm_code:
        details.append({"@type": FCM_ERROR_TYPE, "errorCode": fcm_code})
    if field:
        details.append({"@type": BAD_REQUEST_TYPE, "fieldViolations": [{"field": field, "description": message}]})
    err: dict[str, Any] = {"code": http_status, "message": message, "status": status}
    if details:
        err["details"] = details
    return {"error": err}


def fcm_fault(
    code: str,
    *,
    retry_after: str | int | None = None,
    count: int = 1,
    with_detail: bool = True,
    match: str = "messages:send",
) -> dict[str, Any]:
    """A FaultPlan entry answering an FCM error on sends. ``with_detail=False`` leaves out the
    FcmError detail (only ``error.status`` remains), as some gateway errors do."""
    http_status, status, message = FCM_ERRORS[code]
    body = error_body(http_status, status, message, code if with_detail else None)
    fault: dict[str, Any] = {"status": http_status, "body": body, "count": count, "match": match}
    if retry_after is not None:
        fault["headers"] = {"Retry-After": str(retry_after)}
    return fault


def make_service_account(
    token_uri: str,
    project_id: str = "notifyctl-sandbox",
    client_email: str | None = None,
    key_size: int = 2048,
) -> dict[str, Any]:
    """A throwaway service-account JSON (as a dict) with an RSA key generated now."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    email = client_email or f"firebase-adminsdk-sandbox@{project_id}.iam.gserviceaccount.com"
    return {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": email,
        "client_id": str(secrets.randbelow(10**20)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "universe_domain": "googleapis.com",
    }


class _Invalid(Exception):
    def __init__(self, message: str, field: str | None = None, fcm_code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.fcm_code = fcm_code


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return (
        status,
        {"Content-Type": "application/json; charset=UTF-8", **(headers or {})},
        json.dumps(obj).encode(),
    )


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _unknown(name: str, where: str) -> _Invalid:
    return _Invalid(f"Invalid JSON payload received. Unknown name \"{name}\" at '{where}': Cannot find field.")


def validate_message(msg: Any) -> None:
    """Raise ``_Invalid`` where FCM would answer 400 INVALID_ARGUMENT."""
    if not isinstance(msg, dict):
        raise _Invalid("Invalid JSON payload received. 'message' must be an object.", "message")
    for name in msg:
        if name not in _MESSAGE_FIELDS:
            raise _unknown(name, "message")
    targets = [t for t in ("token", "topic", "condition") if t in msg]
    if not targets:
        raise _Invalid("Recipient of the message is not set.", None, "INVALID_ARGUMENT")
    if len(targets) > 1:
        raise _Invalid(f"Invalid JSON payload received. Oneof field 'target' is already set. Cannot set '{targets[1]}'")
    if "token" in msg and (not isinstance(msg["token"], str) or not msg["token"].strip()):
        raise _Invalid(FCM_ERRORS["INVALID_ARGUMENT"][2], "message.token", "INVALID_ARGUMENT")

    data = msg.get("data", {})
    if not isinstance(data, dict):
        raise _Invalid("Invalid value at 'message.data' (type.googleapis.com/google.protobuf.Map)", "message.data")
    for i, (key, value) in enumerate(data.items()):
        if not isinstance(value, str):
            text = f"Invalid value at 'message.data[{i}].value' (TYPE_STRING), {_short(value)}"
            raise _Invalid(text, f"message.data[{i}].value")
        if key in ("from", "message_type") or key.startswith(("google.", "gcm.")):
            raise _Invalid(f"Invalid data payload key: {key}", f"message.data[{i}].key", "INVALID_ARGUMENT")

    notification = msg.get("notification", {})
    if not isinstance(notification, dict):
        raise _Invalid("Invalid value at 'message.notification'", "message.notification")
    for name, value in notification.items():
        if name not in _NOTIFICATION_FIELDS:
            raise _unknown(name, "message.notification")
        if not isinstance(value, str):
            raise _Invalid(
                f"Invalid value at 'message.notification.{name}' (TYPE_STRING), {_short(value)}",
                f"message.notification.{name}",
            )

    android = msg.get("android", {})
    if not isinstance(android, dict):
        raise _Invalid("Invalid value at 'message.android'", "message.android")
    for name in android:
        if name not in _ANDROID_FIELDS:
            raise _unknown(name, "message.android")
    priority = android.get("priority")
    if priority is not None and priority not in ("normal", "high", "NORMAL", "HIGH"):
        raise _Invalid(
            "Invalid value at 'message.android.priority' "
            f"(type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority), {_short(priority)}",
            "message.android.priority",
        )
    ttl = android.get("ttl")
    if ttl is not None:
        if not isinstance(ttl, str) or not _DURATION.match(ttl):
            raise _Invalid(
                f"Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration), {_short(ttl)}",
                "message.android.ttl",
            )
        if float(ttl[:-1]) > MAX_TTL:
            raise _Invalid("TTL must be at most 4 weeks.", "message.android.ttl", "INVALID_ARGUMENT")
    collapse = android.get("collapse_key", android.get("collapseKey"))
    if collapse is not None and not isinstance(collapse, str):
        raise _Invalid(
            f"Invalid value at 'message.android.collapse_key' (TYPE_STRING), {_short(collapse)}",
            "message.android.collapse_key",
        )

    size = len(json.dumps(data, separators=(",", ":")).encode()) + len(
        json.dumps(notification, separators=(",", ":")).encode()
    )
    if size > MAX_PAYLOAD:
        raise _Invalid("Android message is too big", "message", "INVALID_ARGUMENT")


class FcmHandler(SandboxHandler):
    sandbox: FcmSandbox

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle + delayed ACK adds ~40 ms
        # to every keep-alive request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sandbox._count_connection()

    def _control(self, method: str, body: bytes) -> None:
        sb = self.sandbox
        path = self.path.split("?")[0]
        if path == "/_sandbox/unregistered" and method == "POST":
            try:
                tokens = json.loads(body or b"[]")
                sb.unregistered.update(str(t) for t in tokens)
            except (ValueError, TypeError):
                self._reply(400, {"Content-Type": "text/plain"}, b"expected a JSON list of tokens")
                return
            self._reply(204, {}, b"")
        elif path == "/_sandbox/revoke-tokens" and method == "POST":
            sb.revoke_tokens()
            self._reply(204, {}, b"")
        else:
            super()._control(method, body)

    def handle_api(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        route = path.split("?")[0]
        if route == "/token":
            if method != "POST":
                return _json(405, {"error": "invalid_request", "error_description": "Method not allowed"})
            return self.sandbox._token_endpoint(body)
        m = _SEND_PATH.match(route)
        if m and method == "POST":
            return self.sandbox._send(m.group(1), self.headers.get("Authorization"), body)
        return (
            404,
            {"Content-Type": "text/html; charset=UTF-8"},
            b"<!DOCTYPE html><title>Error 404 (Not Found)!!1</title><p>The requested URL was not found on this server.",
        )


class FcmSandbox(HttpSandbox):
    """FCM HTTP v1 + OAuth2 token endpoint on 127.0.0.1.

    ``FcmSandbox(port=0, project_id="notifyctl-sandbox", service_account=None, token_expires_in=3600)``:
    with no ``service_account`` one is generated whose ``token_uri`` is this sandbox's ``/token``.
    Counters: ``token_requests`` (grants issued), ``send_requests``, ``connections``.
    """

    handler_cls = FcmHandler

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        project_id: str = "notifyctl-sandbox",
        service_account: dict[str, Any] | None = None,
        token_expires_in: int = 3600,
    ) -> None:
        super().__init__(port, host)
        # Bursts of concurrent connects must not overflow the default backlog of 5.
        self._server.socket.listen(256)
        self.project_id = project_id
        self.token_expires_in = self._initial_expires_in = token_expires_in
        self.unregistered: set[str] = set()
        self.token_requests = 0
        self.send_requests = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[float, frozenset[str]]] = {}
        self._accounts: dict[str, Any] = {}
        self.service_account = service_account or make_service_account(self.token_url, project_id)
        self.trust(self.service_account)

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    def trust(self, service_account: dict[str, Any]) -> None:
        """Accept JWT grants signed by this service account's key."""
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        key = load_pem_private_key(service_account["private_key"].encode(), password=None)
        with self._lock:
            self._accounts[service_account["client_email"]] = key.public_key()

    def write_service_account(self, path: str | os.PathLike[str]) -> Path:
        """Write the service account JSON (mode 0600) for a provider in another process."""
        return write_private(path, json.dumps(self.service_account, indent=2).encode())

    def reset(self) -> None:
        """Forget messages, faults, unregistered tokens, issued tokens and counters."""
        self.faults.clear()
        self.recorder.clear()
        self.unregistered.clear()
        self.token_expires_in = self._initial_expires_in
        with self._lock:
            self._tokens.clear()
            self.token_requests = self.send_requests = self.connections = 0

    def revoke_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()

    def _count_connection(self) -> None:
        with self._lock:
            self.connections += 1

    # -- OAuth2 -------------------------------------------------------------------------------

    def _token_endpoint(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        import jwt

        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        grant = form.get("grant_type", "")
        if grant != JWT_GRANT_TYPE:
            return _json(400, {"error": "unsupported_grant_type", "error_description": f"Invalid grant_type: {grant}"})
        assertion = form.get("assertion")
        if not assertion:
            return _json(
                400,
                {"error": "invalid_request", "error_description": "Missing required parameter: assertion"},
            )

        def invalid(desc: str) -> tuple[int, dict[str, str], bytes]:
            return _json(400, {"error": "invalid_grant", "error_description": desc})

        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            return invalid("Invalid JWT: could not be decoded.")
        if header.get("alg") != "RS256":
            return invalid("Invalid JWT Signature.")
        with self._lock:
            public_key = self._accounts.get(str(unverified.get("iss")))
        if public_key is None:
            return invalid("Invalid grant: account not found")
        try:
            claims = jwt.decode(
                assertion,
                public_key,
                algorithms=["RS256"],
                audience=[self.token_url, GOOGLE_TOKEN_URI],
                options={"require": ["iss", "aud", "iat", "exp"]},
                leeway=60,
            )
        except jwt.InvalidSignatureError:
            return invalid("Invalid JWT Signature.")
        except jwt.InvalidAudienceError:
            return invalid("Invalid JWT: Failed audience check.")
        except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError, jwt.InvalidIssuedAtError):
            return invalid(_BAD_JWT_TIME)
        except jwt.PyJWTError as exc:
            return invalid(f"Invalid JWT: {exc}")
        if int(claims["exp"]) - int(claims["iat"]) > 3600:
            return invalid(_BAD_JWT_TIME)
        scopes = frozenset(str(claims.get("scope", "")).split())
        if not scopes:
            return _json(
                400,
                {
                    "error": "invalid_scope",
                    "error_description": "Invalid OAuth scope or ID token audience provided.",
                },
            )
        token = "ya29.sandbox-" + secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = (time.time() + self.token_expires_in, scopes)
            self.token_requests += 1
        return _json(200, {"access_token": token, "expires_in": self.token_expires_in, "token_type": "Bearer"})

    # -- messages:send ------------------------------------------------------------------------

    def _send(self, project: str, authorization: str | None, body: bytes) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.send_requests += 1
        challenge = {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", error="invalid_token"'}
        if not authorization or not authorization.startswith("Bearer "):
            return _json(401, error_body(401, "UNAUTHENTICATED", _MISSING_AUTH_MSG), challenge)
        with self._lock:
            entry = self._tokens.get(authorization[len("Bearer ") :].strip())
        if entry is None or entry[0] <= time.time():
            return _json(401, error_body(401, "UNAUTHENTICATED", _UNAUTHENTICATED_MSG), challenge)
        if not entry[1] & FCM_SCOPES:
            return _json(403, error_body(403, "PERMISSION_DENIED", "Request had insufficient authentication scopes."))
        if project != self.project_id:
            text = (
                "Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not exist)."
            )
            return _json(403, error_body(403, "PERMISSION_DENIED", text))
        try:
            req = json.loads(body)
        except ValueError:
            text = "Invalid JSON payload received. Unexpected token."
            return _json(400, error_body(400, "INVALID_ARGUMENT", text, field=""))
        try:
            if not isinstance(req, dict):
                raise _Invalid("Invalid JSON payload received. Expected an object.")
            for name in req:
                if name not in ("message", "validate_only", "validateOnly"):
                    raise _Invalid(f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.')
            if "message" not in req:
                raise _Invalid("Message is not set.", "message", "INVALID_ARGUMENT")
            validate_message(req["message"])
        except _Invalid as exc:
            return _json(400, error_body(400, "INVALID_ARGUMENT", exc.message, exc.fcm_code, exc.field))
        msg = req["message"]
        if msg.get("token") in self.unregistered:
            return _json(404, error_body(404, *FCM_ERRORS["UNREGISTERED"][1:], "UNREGISTERED"))
        if req.get("validate_only") or req.get("validateOnly"):
            return _json(200, {"name": f"projects/{project}/messages/fake_message_id"})
        name = f"projects/{project}/messages/0:{time.time_ns() // 1000}%{secrets.token_hex(8)}"
        self.recorder.add({"name": name, "project": project, "message": msg})
        return _json(200, {"name": name})


def main(port: int = 8792, service_account_file: str | None = None, project_id: str = "notifyctl-sandbox") -> None:
    """Run the sandbox in the foreground; writes the service account JSON for the worker to use."""
    sandbox = FcmSandbox(port, project_id=project_id)
    path = sandbox.write_service_account(service_account_file or f"fcm-sandbox-{project_id}.json")
    sandbox.start()
    serve_until_interrupted(
        sandbox,
        f"FCM sandbox on {sandbox.url} (project {project_id})",
        f"  NOTIFY_FCM_SERVICE_ACCOUNT_FILE={path.resolve()}",
        f"  NOTIFY_FCM_BASE_URL={sandbox.url}",
        f"  control API token (Authorization: Bearer ...): {sandbox.control_token}",
    )


if __name__ == "__main__":  # pragma: no cover
    import sys

    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8792)
