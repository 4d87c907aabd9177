"""A local Twilio REST API (2010-04-01): Messages, Calls and the Account resource.

- ``POST /2010-04-01/Accounts/{AccountSid}/Messages.json`` (form-encoded ``To``, ``From`` or
  ``MessagingServiceSid``, ``Body``, ``StatusCallback``) → ``201`` with the Message resource
  (``sid`` = ``SM`` + 32 hex, ``status`` ``queued``, or ``accepted`` with a Messaging Service).
- ``POST /2010-04-01/Accounts/{AccountSid}/Calls.json`` (``To``, ``From``, ``Twiml`` or ``Url``)
  → ``201`` with the Call resource (``sid`` = ``CA`` + 32 hex, ``status`` ``queued``).
- ``GET /2010-04-01/Accounts/{AccountSid}.json`` → the Account resource.

HTTP Basic auth is checked (``401`` ``{"code": 20003, "message": "Authenticate", ...}``). ``To``
must be E.164 (``400`` code 21211); numbers in ``stopped`` answer 21610 (replied STOP),
numbers in ``landlines`` 21614; Twilio's magic test numbers behave as documented
(+15005550001 → 21211, +15005550002 → 21612, +15005550003 → 21408, +15005550004 → 21610,
+15005550009 → 21614). Errors use Twilio's JSON shape ``{"code", "message", "more_info", "status"}``.

Every accepted message/call is recorded::

    {"resource": "Message"|"Call", "sid", "to", "from", "body"|"twiml", "messaging_service_sid",
     "status_callback", "account_sid"}

Start it with ``TwilioSandbox(port=0, account_sid=DEFAULT_ACCOUNT_SID, auth_token=DEFAULT_AUTH_TOKEN)``
or ``serve(port)``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qs

from sandboxes.base import ApiSandbox, serve_until_interrupted

DEFAULT_ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
DEFAULT_AUTH_TOKEN = "sandbox-auth-token-0123456789abcd"
API_VERSION = "2010-04-01"
_E164 = re.compile(r"^\+[1-9]\d{1,14}$")
_PATH = re.compile(r"^/2010-04-01/Accounts/(?P<sid>[^/]+?)(?:/(?P<resource>Messages|Calls))?\.json$")
MAGIC_NUMBERS = {
    "+15005550001": (21211, "The 'To' number {to} is not a valid phone number."),
    "+15005550002": (
        21612,
        "The 'To' phone number: {to}, is not currently reachable using the 'From' phone number",
    ),
    "+15005550003": (
        21408,
        "Permission to send an SMS has not been enabled for the region indicated by {to}",
    ),
    "+15005550004": (21610, "Attempt to send to unsubscribed recipient"),
    "+15005550009": (21614, "'To' number {to} is not a valid mobile number"),
}


def _error(status: int, code: int, message: str) -> tuple[int, dict[str, str], bytes]:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


def _now() -> str:
    return format_datetime(datetime.now(UTC).replace(microsecond=0))


class TwilioSandbox(ApiSandbox):
    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        account_sid: str = DEFAULT_ACCOUNT_SID,
        auth_token: str = DEFAULT_AUTH_TOKEN,
        stopped: set[str] | None = None,
        landlines: set[str] | None = None,
    ) -> None:
        super().__init__(port, host)
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.stopped: set[str] = set(stopped or ())
        self.landlines: set[str] = set(landlines or ())

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [r for r in self.recorder.all() if r["resource"] == "Message"]

    @property
    def calls(self) -> list[dict[str, Any]]:
        return [r for r in self.recorder.all() if r["resource"] == "Call"]

    # ----------------------------------------------------------------- API

    def _authenticated(self, headers: dict[str, str]) -> bool:
        value = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        scheme, _, encoded = value.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return secrets.compare_digest(user.encode(), self.account_sid.encode()) and secrets.compare_digest(
            password.encode(), self.auth_token.encode()
        )

    def api(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        route = path.split("?")[0]
        match = _PATH.match(route)
        if not self._authenticated(headers):
            status, hdrs, out = _error(401, 20003, "Authenticate")
            return status, {**hdrs, "WWW-Authenticate": 'Basic realm="Twilio API"'}, out
        if not match or match["sid"] != self.account_sid:
            return _error(404, 20404, f"The requested resource {route} was not found")
        resource = match["resource"]
        if resource is None and method == "GET":
            return self._account()
        if resource and method == "POST":
            params = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
            return self._create_message(params) if resource == "Messages" else self._create_call(params)
        return _error(405, 20004, "Method not allowed")

    def _account(self) -> tuple[int, dict[str, str], bytes]:
        sid = self.account_sid
        resource = {
            "sid": sid,
            "owner_account_sid": sid,
            "friendly_name": "notifyctl sandbox",
            "status": "active",
            "type": "Full",
            "auth_token": "[hidden]",
            "date_created": _now(),
            "date_updated": _now(),
            "uri": f"/{API_VERSION}/Accounts/{sid}.json",
            "subresource_uris": {
                "messages": f"/{API_VERSION}/Accounts/{sid}/Messages.json",
                "calls": f"/{API_VERSION}/Accounts/{sid}/Calls.json",
            },
        }
        return 200, {"Content-Type": "application/json"}, json.dumps(resource).encode()

    def _check_to(self, to: str) -> tuple[int, dict[str, str], bytes] | None:
        if not _E164.match(to):
            return _error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if to in MAGIC_NUMBERS:
            code, message = MAGIC_NUMBERS[to]
            return _error(400, code, message.format(to=to))
        if to in self.stopped:
            return _error(400, 21610, "Attempt to send to unsubscribed recipient")
        if to in self.landlines:
            return _error(400, 21614, f"'To' number {to} is not a valid mobile number")
        return None

    def _create_message(self, p: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        to, sender, service = p.get("To", ""), p.get("From", ""), p.get("MessagingServiceSid", "")
        body = p.get("Body", "")
        if not to:
            return _error(400, 21604, "A 'To' phone number is required.")
        if not sender and not service:
            return _error(400, 21603, "A 'From' phone number is required.")
        if service and not re.fullmatch(r"MG[0-9a-fA-F]{32}", service):
            return _error(400, 21701, f"The Messaging Service Sid {service} is invalid.")
        if not body and not p.get("MediaUrl"):
            return _error(400, 21602, "Message body is required.")
        if len(body) > 1600:
            return _error(400, 21617, "The concatenated message body exceeds the 1600 character limit.")
        problem = self._check_to(to)
        if problem:
            return problem
        sid = "SM" + secrets.token_hex(16)
        now = _now()
        gsm = all(ord(c) < 128 for c in body)
        per_segment = 160 if gsm else 70
        segments = 1 if len(body) <= per_segment else -(-len(body) // (153 if gsm else 67))
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{sid}.json"
        resource = {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": sender or None,
            "messaging_service_sid": service or None,
            "num_media": "0",
            "num_segments": str(segments),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "accepted" if service else "queued",
            "subresource_uris": {"media": uri.replace(".json", "/Media.json")},
            "to": to,
            "uri": uri,
        }
        self.recorder.add(
            {
                "resource": "Message",
                "sid": sid,
                "to": to,
                "from": sender or None,
                "body": body,
                "messaging_service_sid": service or None,
                "status_callback": p.get("StatusCallback"),
                "account_sid": self.account_sid,
            }
        )
        return 201, {"Content-Type": "application/json"}, json.dumps(resource).encode()

    def _create_call(self, p: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        to, sender = p.get("To", ""), p.get("From", "")
        twiml, url = p.get("Twiml", ""), p.get("Url", "")
        if not to:
            return _error(400, 21201, "No 'To' number is specified")
        if not sender:
            return _error(400, 21213, "No 'From' number is specified")
        if not twiml and not url and not p.get("ApplicationSid"):
            return _error(400, 21205, "Url parameter is required.")
        if twiml and len(twiml) > 4000:
            return _error(400, 13103, "Twiml parameter exceeds the 4000 character limit.")
        if not _E164.match(to):
            return _error(400, 21211, f"Invalid 'To' Phone Number: {to}")
        if to in MAGIC_NUMBERS:
            code, message = MAGIC_NUMBERS[to]
            return _error(400, code, message.format(to=to))
        sid = "CA" + secrets.token_hex(16)
        now = _now()
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{sid}.json"
        resource = {
            "account_sid": self.account_sid,
            "annotation": None,
            "answered_by": None,
            "api_version": API_VERSION,
            "caller_name": None,
            "date_created": now,
            "date_updated": now,
            "direction": "outbound-api",
            "duration": None,
            "end_time": None,
            "forwarded_from": None,
            "from": sender,
            "from_formatted": sender,
            "group_sid": None,
            "parent_call_sid": None,
            "phone_number_sid": None,
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "start_time": None,
            "status": "queued",
            "subresource_uris": {"notifications": uri.replace(".json", "/Notifications.json")},
            "to": to,
            "to_formatted": to,
            "trunk_sid": None,
            "uri": uri,
            "queue_time": "0",
        }
        self.recorder.add(
            {
                "resource": "Call",
                "sid": sid,
                "to": to,
                "from": sender,
                "twiml": twiml or None,
                "url": url or None,
                "status_callback": p.get("StatusCallback"),
                "account_sid": self.account_sid,
            }
        )
        return 201, {"Content-Type": "application/json"}, json.dumps(resource).encode()


def serve(
    port: int = 0,
    host: str = "127.0.0.1",
    account_sid: str = DEFAULT_ACCOUNT_SID,
    auth_token: str = DEFAULT_AUTH_TOKEN,
) -> None:
    """Run the sandbox in the foreground until interrupted."""
    sb = TwilioSandbox(port=port, host=host, account_sid=account_sid, auth_token=auth_token).start()
    serve_until_interrupted(
        sb,
        f"twilio sandbox on {sb.url} (NOTIFY_TWILIO_BASE_URL={sb.url}, "
        f"NOTIFY_TWILIO_ACCOUNT_SID={account_sid}, NOTIFY_TWILIO_AUTH_TOKEN={auth_token})",
    )


main = serve
