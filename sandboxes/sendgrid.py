"""A local SendGrid v3 Mail Send: ``POST /v3/mail/send`` and ``GET /v3/scopes``.

Checks ``Authorization: Bearer <key>`` like SendGrid (401 for a missing or unknown key, 403 when the
key lacks the ``mail.send`` scope), validates the body the way the real API does (1..1000
personalizations, recipients, ``from``, ``subject``, ``content`` or ``template_id``, string-only
``custom_args``, ``headers`` and ``substitutions``, payload size) and answers errors in SendGrid's shape
``{"errors": [{"message", "field", "help"}]}``. An accepted request gets ``202`` with an
``X-Message-Id`` header and an empty body, and each personalization is recorded as one message,
with its ``substitutions`` applied to the subject and content::

    {"message_id", "to", "subject", "from", "custom_args", "headers", "categories", "content"}

Start it with ``SendgridSandbox(port=0, api_key=DEFAULT_API_KEY).start()`` or ``serve(port)``.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from typing import Any

import orjson

from sandboxes.base import ApiSandbox, serve_until_interrupted

DEFAULT_API_KEY = "SG.sandbox.notifyctl-local-key"
MAX_BODY_BYTES = 30 * 1024 * 1024
_HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html#message."
_EMAIL = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")


def _err(message: str, field: str | None = None, help_anchor: str | None = None) -> dict[str, Any]:
    return {"message": message, "field": field, "help": (_HELP + help_anchor) if help_anchor else None}


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", list: "array", dict: "object"}.get(type(v), "string")


class SendgridSandbox(ApiSandbox):
    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        api_key: str = DEFAULT_API_KEY,
        scopes: tuple[str, ...] = ("mail.send", "scopes.read"),
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        super().__init__(port, host)
        self.api_key = api_key
        self.scopes = tuple(scopes)
        self.max_body_bytes = max_body_bytes
        self.accepted_requests: list[int] = []  # personalizations per accepted request

    # ----------------------------------------------------------------- API

    @staticmethod
    def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode()

    def _auth(self, headers: dict[str, str], scope: str | None) -> tuple[int, dict[str, str], bytes] | None:
        value = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        if not value:
            return self._json(401, {"errors": [_err("authorization required")]})
        scheme, _, key = value.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self.api_key.encode()):
            return self._json(
                401, {"errors": [_err("The provided authorization grant is invalid, expired, or revoked")]}
            )
        if scope and scope not in self.scopes:
            return self._json(403, {"errors": [_err("access forbidden")]})
        return None

    def api(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        route = path.split("?")[0].rstrip("/")
        if route == "/v3/mail/send" and method == "POST":
            return self._auth(headers, "mail.send") or self._mail_send(headers, body)
        if route == "/v3/scopes" and method == "GET":
            return self._auth(headers, None) or self._json(200, {"scopes": list(self.scopes)})
        if route in ("/v3/mail/send", "/v3/scopes"):
            return self._json(405, {"errors": [_err("method not allowed")]})
        return self._json(404, {"errors": [_err("resource not found")]})

    def _mail_send(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        if len(body) > self.max_body_bytes:
            return self._json(413, {"errors": [_err("The JSON payload exceeds the maximum size allowed.")]})
        ctype = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
        if not ctype.lower().startswith("application/json"):
            return self._json(400, {"errors": [_err("Content-Type should be application/json.")]})
        try:
            mail = orjson.loads(body)
        except ValueError:
            return self._json(400, {"errors": [_err("Bad Request")]})
        if not isinstance(mail, dict):
            return self._json(400, {"errors": [_err("Invalid type. Expected: object, given: " + _type_name(mail))]})
        errors = validate_mail(mail)
        if errors:
            return self._json(400, {"errors": errors})
        message_id = secrets.token_urlsafe(16)[:22]
        self._record(mail, message_id)
        return 202, {"X-Message-Id": message_id}, b""

    def _record(self, mail: dict[str, Any], message_id: str) -> None:
        content = {c["type"]: c["value"] for c in mail.get("content") or []}
        top_args = mail.get("custom_args") or {}
        top_headers = mail.get("headers") or {}
        personalizations = mail["personalizations"]

        def records() -> Iterator[dict[str, Any]]:  # one per recipient, as they receive it
            for p in personalizations:
                # substitutions apply to the content and the subject, per personalization, as SendGrid does
                subs = p.get("substitutions") or {}
                yield {
                    "message_id": message_id,
                    "to": p["to"][0]["email"],
                    "subject": _substitute(p.get("subject") or mail.get("subject"), subs),
                    "from": mail["from"]["email"],
                    "custom_args": {**top_args, **(p.get("custom_args") or {})},
                    "headers": {**top_headers, **(p.get("headers") or {})},
                    "categories": list(mail.get("categories") or []),
                    "content": {k: _substitute(v, subs) for k, v in content.items()} if subs else content,
                    "template_id": mail.get("template_id"),
                }

        self.recorder.add_batch(len(personalizations), records)
        with self._stats_lock:
            self.accepted_requests.append(len(personalizations))


def _substitute(text: Any, subs: dict[str, str]) -> Any:
    if not isinstance(text, str):
        return text
    for key, value in subs.items():
        text = text.replace(key, value)
    return text


def _too_big(subs: dict[str, Any], limit: int = 10000) -> bool:
    """More than ``limit`` bytes as JSON? Serialised only when a cheap bound (every character
    escaped as ``\\uXXXX``, twice for one beyond the BMP) passes the limit; a blast's
    substitutions are far below it."""
    bound = 2 + sum(12 * (len(str(k)) + len(str(v))) + 8 for k, v in subs.items())
    return bound > limit and len(json.dumps(subs).encode()) > limit


def _string_map(value: Any, field: str, anchor: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        return [_err(f"Invalid type. Expected: object, given: {_type_name(value)}.", field, anchor)]
    return [
        _err(f"Invalid type. Expected: string, given: {_type_name(v)}.", f"{field}.{k}", anchor)
        for k, v in value.items()
        if not isinstance(v, str)
    ]


def validate_mail(mail: dict[str, Any]) -> list[dict[str, Any]]:
    """SendGrid's Mail Send validation, as far as we use it; [] when the body is acceptable."""
    errors: list[dict[str, Any]] = []
    ps = mail.get("personalizations")
    if not isinstance(ps, list) or not ps:
        errors.append(
            _err(
                "The personalizations field is required and must have at least one personalization.",
                "personalizations",
                "personalizations",
            )
        )
        ps = []
    elif len(ps) > 1000:
        errors.append(
            _err(
                "You may not have more than 1000 personalizations per request.",
                "personalizations",
                "personalizations",
            )
        )
    recipients = 0
    every_has_subject = bool(ps)
    for i, p in enumerate(ps[:1001]):
        if not isinstance(p, dict):
            errors.append(_err(f"Invalid type. Expected: object, given: {_type_name(p)}.", f"personalizations.{i}"))
            every_has_subject = False
            continue
        to = p.get("to")
        if not isinstance(to, list) or not to:
            errors.append(
                _err(
                    "The to array is required for all personalization objects, and must have at least one "
                    "email object with a valid email address.",
                    f"personalizations.{i}.to",
                    "personalizations.to",
                )
            )
        else:
            for j, rcpt in enumerate(to):
                email = rcpt.get("email") if isinstance(rcpt, dict) else None
                if not isinstance(email, str) or not email:
                    errors.append(
                        _err(
                            "The to email parameter is required.",
                            f"personalizations.{i}.to.{j}.email",
                            "personalizations.to",
                        )
                    )
                elif not _EMAIL.match(email):
                    errors.append(
                        _err(
                            "Does not contain a valid address.",
                            f"personalizations.{i}.to.{j}.email",
                            "personalizations.to",
                        )
                    )
            recipients += len(to)
        for kind in ("cc", "bcc"):
            if isinstance(p.get(kind), list):
                recipients += len(p[kind])
        if not (isinstance(p.get("subject"), str) and p["subject"]):
            every_has_subject = False
        errors += _string_map(p.get("custom_args"), f"personalizations.{i}.custom_args", "personalizations.custom_args")
        errors += _string_map(p.get("headers"), f"personalizations.{i}.headers", "personalizations.headers")
        subs = p.get("substitutions")
        errors += _string_map(subs, f"personalizations.{i}.substitutions", "personalizations.substitutions")
        if isinstance(subs, dict) and _too_big(subs):
            errors.append(
                _err(
                    "The maximum size of substitutions for a personalization is 10000 bytes.",
                    f"personalizations.{i}.substitutions",
                    "personalizations.substitutions",
                )
            )
    if recipients > 1000:
        errors.append(
            _err(
                "The total number of recipients must be no more than 1000.",
                "personalizations",
                "personalizations",
            )
        )

    sender = mail.get("from")
    if not isinstance(sender, dict) or not sender.get("email"):
        errors.append(
            _err(
                "The from object must be provided for every email send. It is an object that requires the "
                "email parameter, but may also contain a name parameter.",
                "from",
                "from",
            )
        )
    elif not _EMAIL.match(str(sender["email"])):
        errors.append(_err("The from email does not contain a valid address.", "from.email", "from"))

    template_id = mail.get("template_id")
    has_subject = isinstance(mail.get("subject"), str) and bool(mail["subject"])
    if not template_id and not has_subject and not every_has_subject:
        errors.append(
            _err(
                "The subject is required. You can get around this requirement if you use a template with a "
                "subject defined or if every personalization has a subject defined.",
                "subject",
                "subject",
            )
        )
    content = mail.get("content")
    if not template_id and (not isinstance(content, list) or not content):
        errors.append(
            _err(
                "Unless a valid template_id is provided, the content parameter is required. There must be at "
                "least one defined content block. We typically suggest both text/plain and text/html blocks "
                "are included, but only one block is required.",
                "content",
                "content",
            )
        )
    elif isinstance(content, list):
        types = []
        for k, c in enumerate(content):
            if not isinstance(c, dict) or not isinstance(c.get("type"), str) or not c["type"]:
                errors.append(_err("The content type is required.", f"content.{k}.type", "content"))
                continue
            types.append(c["type"])
            if not isinstance(c.get("value"), str) or not c["value"]:
                errors.append(
                    _err(
                        "The content value must be a string at least one character in length.",
                        f"content.{k}.value",
                        "content",
                    )
                )
        if "text/plain" in types and types.index("text/plain") != 0:
            errors.append(
                _err(
                    "If present, text/plain and text/html may only be provided in the order of text/plain, "
                    "then text/html.",
                    "content",
                    "content",
                )
            )
    categories = mail.get("categories")
    if categories is not None and (
        not isinstance(categories, list) or len(categories) > 10 or not all(isinstance(c, str) for c in categories)
    ):
        errors.append(_err("Categories must be a list of at most 10 strings.", "categories", "categories"))
    errors += _string_map(mail.get("custom_args"), "custom_args", "custom_args")
    errors += _string_map(mail.get("headers"), "headers", "headers")
    return errors


def serve(port: int = 0, host: str = "127.0.0.1", api_key: str = DEFAULT_API_KEY) -> None:
    """Run the sandbox in the foreground until interrupted."""
    sb = SendgridSandbox(port=port, host=host, api_key=api_key).start()
    serve_until_interrupted(
        sb, f"sendgrid sandbox on {sb.url} (NOTIFY_SENDGRID_BASE_URL={sb.url}, NOTIFY_SENDGRID_API_KEY={api_key})"
    )


main = serve
