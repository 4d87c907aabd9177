"""One module: the OpenAPI document is one artefact: its schemas and the tightening that applies them
to every operation; ~450 lines.

The OpenAPI document (``/openapi.json``, ``/docs``): as strict as the validation, with every answer.

FastAPI drafts it from the routes and the pydantic models; :func:`install` makes ``app.openapi``
return that draft with, for every operation:

- each status it can answer, errors with their body ``{"error": "<one line>"}`` (``Error``), so a
  client generated from the document handles them;
- request schemas that say what the validators check, built from the validators' own constants
  (``identifiers``, ``settings``, the template store): control and invisible characters refused in
  identifiers, APNs and FCM token shapes per platform, preference names, time zones, the templates
  that exist. A schema-valid request is accepted, or answered 401/403/404/409; the few rules no
  schema can state (the recipient must exist, the data must fill the chosen template, a phone number
  must be dialable) are in the descriptions, and those operations may answer 422;
- the webhook bodies and signature headers, and the media type of every non-JSON answer.

``tests/test_openapi.py`` holds the server to the document with schemathesis.
"""

from __future__ import annotations

import copy
import re
import unicodedata
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import pytz

from notifyctl.api.limits import MAX_HEADER_BYTES
from notifyctl.identifiers import APNS_MAX_BYTES, APNS_MIN_BYTES, FCM_MAX, FCM_MIN, MAX_EMAIL, MAX_ID
from notifyctl.settings import CATEGORIES, CHANNELS, PRIORITIES

if TYPE_CHECKING:
    from fastapi import FastAPI

ERROR_REF = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA = {
    "type": "object",
    "title": "Error",
    "description": "Every error: one line naming the field or header and the problem.",
    "properties": {"error": {"type": "string"}},
    "required": ["error"],
    "additionalProperties": False,
}

_AUTH = "no API key, or an invalid or revoked one (`Authorization: Bearer <key>` or `X-API-Key`)"
_BODY = "the body is larger than the limit (`max_body_bytes`, 1 MiB by default)"
_JSON = "the body is not JSON we accept (syntax, nesting deeper than 32, numbers over 100 characters, NaN...)"
_HEADERS = f"a request header is longer than {MAX_HEADER_BYTES} bytes, or all of them together too long"
_DOWN = "the database or Redis cannot be reached"
_SCOPE = "the key's scope does not allow this: GET needs `read`, other methods `send` (`apikeys create --scope`)"
_V1 = {401: _AUTH, 403: _SCOPE, 431: _HEADERS, 503: _DOWN}
_PUBLIC = {431: _HEADERS, 503: _DOWN}

# Every error each operation can answer, beyond those its router adds (_V1 or _PUBLIC).
ERRORS: dict[str, dict[int, str]] = {
    "POST /v1/notify": {
        400: f"{_JSON}; or an empty or over-long `Idempotency-Key`",
        413: _BODY,
        422: "a field is invalid, the recipient does not exist, the template lacks a requested channel, "
        "or the data does not fill the template",
    },
    "PUT /v1/users/{user_id}": {
        400: _JSON,
        404: "the path names no user route (an id holding `/`)",
        413: _BODY,
        422: "a field is invalid, or the phone number is not dialable (libphonenumber)",
    },
    "GET /v1/users/{user_id}": {404: "no such user"},
    "POST /v1/users/{user_id}/tokens": {
        400: _JSON,
        404: "no such user",
        413: _BODY,
        422: "a field is invalid, or `replaces` names the token itself or another user's token",
    },
    "DELETE /v1/users/{user_id}/tokens/{token}": {404: "the user has no such live token"},
    "GET /v1/users/{user_id}/preferences": {404: "no such user"},
    "POST /v1/users/{user_id}/preferences": {
        400: _JSON,
        404: "no such user",
        413: _BODY,
        422: "a field is invalid",
    },
    "GET /v1/notifications/{ref}": {404: "no notification with that id or dedup key"},
    "POST /v1/deliveries/{delivery_id}/opened": {
        404: "no such delivery",
        409: "not a push delivery (email opens come from the tracking pixel)",
    },
    "GET /metrics": {},
    "GET /healthz": {},
    "GET /o/{token}.gif": {},
    "GET /u/{token}": {403: "not a link this installation made (malformed, or a wrong signature)"},
    "POST /u/{token}": {
        400: "the form body is not `List-Unsubscribe=One-Click`",
        403: "not a link this installation made (malformed, or a wrong signature)",
        413: _BODY,
    },
    "POST /webhooks/sendgrid": {
        400: f"signed, but {_JSON}, or not an array of event objects",
        401: "no signature headers, a malformed one, or a timestamp outside the replay window",
        403: "the signature does not match, or the webhook is not configured",
        413: "the body is larger than `max_webhook_body_bytes`",
    },
    "POST /webhooks/ses": {
        400: f"{_JSON}; not an SNS message; or (signed) not a JSON SES record",
        401: "a malformed or stale Timestamp or Signature, or the signing certificate cannot be fetched",
        403: "topic not allowed, certificate URL not on sns.<the topic's region>.amazonaws.com, "
        "or the signature does not match",
        413: _BODY,
        429: "too many new signing-certificate URLs this minute (see `Retry-After`)",
    },
    "POST /webhooks/twilio/status": {
        400: "signed, but a malformed form or no MessageSid/MessageStatus",
        401: "no X-Twilio-Signature",
        403: "the signature does not match, or the webhook is not configured",
        413: _BODY,
    },
    "POST /webhooks/twilio/inbound": {
        400: "signed, but a malformed form or no From/Body/MessageSid",
        401: "no X-Twilio-Signature",
        403: "the signature does not match, or the webhook is not configured",
        413: _BODY,
    },
}

_MEDIA = {
    "GET /metrics": ("text/plain", {"type": "string"}, "Prometheus text format 0.0.4"),
    "GET /o/{token}.gif": ("image/gif", {"type": "string", "format": "binary"}, "a 1×1 GIF, whatever the token"),
    "POST /webhooks/twilio/inbound": ("application/xml", {"type": "string"}, "TwiML (a HELP reply, or nothing)"),
}

# identifiers.refused_char's categories but Cs: a lone surrogate never reaches a validator (the JSON
# loader refuses it, a URL is UTF-8), and regex engines refuse a surrogate range in a class
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


@lru_cache(maxsize=1)
def refused_class() -> str:
    """The characters ``identifiers.refused_char`` refuses, as the inside of a regex character class
    (from this Python's own Unicode database, as the validator sees them)."""
    ranges: list[tuple[int, int]] = []
    for cp in range(0x110000):
        if unicodedata.category(chr(cp)) in REFUSED_CATEGORIES:
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1] = (ranges[-1][0], cp)
            else:
                ranges.append((cp, cp))

    def one(cp: int) -> str:
        # BMP as \uXXXX (JSON cannot carry a lone surrogate); astral as the character itself
        return f"\\u{cp:04X}" if cp <= 0xFFFF else chr(cp)

    return "".join(one(a) if a == b else f"{one(a)}-{one(b)}" for a, b in ranges)


def text_id(max_len: int) -> str:
    """``identifiers.check_text_id``: after stripping, 1..max_len characters, none refused."""
    r = refused_class()
    return rf"^\s*[^\s{r}](?:[^{r}]{{0,{max_len - 2}}}[^\s{r}])?\s*$"


def stripped(max_len: int, min_len: int = 0) -> str:
    """A string whose stripped form has min_len..max_len characters (pydantic's str_strip_whitespace)."""
    core = rf"\S(?:[\s\S]{{0,{max_len - 2}}}\S)?" if max_len > 1 else r"\S"
    return rf"^\s*{core}\s*$" if min_len else rf"^\s*(?:{core})?\s*$"


def any_case(words: list[str] | tuple[str, ...]) -> str:
    """Alternatives matching each word in any ASCII case (validators lower-case first)."""
    return "|".join("".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in w) for w in words)


def email_pattern() -> str:
    """``identifiers.check_email`` (an empty one means none: ``build_user_row``)."""
    r = refused_class()
    c = rf"[^\s@{r}]"
    d = rf"[^\s@.{r}]"
    return rf"^\s*(?:{c}+@{d}{c}*\.{c}*{d})?\s*$"


def preference_pattern() -> str:
    """``directory.parse_pref``: a channel, a category, CHANNEL:CATEGORY (``*`` for any) or all."""
    ch, cat = any_case(CHANNELS), any_case(CATEGORIES)
    return rf"^\s*(?:{any_case(['all'])}|\*|{ch}|{cat}|(?:{ch}|\*):(?:{cat}|\*))\s*$"


def timezone_pattern() -> str:
    """``directory.check_timezone`` (an empty one means the default zone)."""
    return rf"^\s*(?:{'|'.join(re.escape(z) for z in sorted(pytz.all_timezones))})?\s*$"


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _int64_or_number() -> list[dict[str, Any]]:
    # intake.json_problem: integers are stored in 64 bits; other numbers as they are
    return [
        {"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1},
        {"type": "number", "not": {"type": "integer"}},
    ]


def user_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "title": "UserIn",
        "additionalProperties": False,
        "properties": {
            "email": _nullable({"type": "string", "maxLength": MAX_EMAIL, "pattern": email_pattern()}),
            "phone": _nullable(
                {
                    "type": "string",
                    "pattern": stripped(32),
                    "description": "a dialable number, E.164 or national in `default_region` (libphonenumber)",
                }
            ),
            "timezone": _nullable({"type": "string", "pattern": timezone_pattern()}),
            "locale": _nullable({"type": "string", "pattern": stripped(16)}),
            "attributes": {
                "type": "object",
                "additionalProperties": {"anyOf": [{"type": "string"}, {"type": "boolean"}, *_int64_or_number()]},
            },
        },
    }


def token_schema() -> dict[str, Any]:
    common = {
        "replaces": _nullable(
            {"type": "string", "pattern": text_id(512), "description": "the token this device had before"}
        ),
        "device_id": _nullable({"type": "string", "pattern": text_id(MAX_ID), "description": "the app's device id"}),
    }
    apns = rf"^\s*(?:[0-9a-fA-F]{{2}}){{{APNS_MIN_BYTES},{APNS_MAX_BYTES}}}\s*$"
    fcm = rf"^\s*[A-Za-z0-9_:\-]{{{FCM_MIN},{FCM_MAX}}}\s*$"

    def variant(platform: str, token: str, what: str) -> dict[str, Any]:
        return {
            "type": "object",
            "additionalProperties": False,
            "required": ["token", "platform"],
            "properties": {
                "platform": {"type": "string", "pattern": rf"^\s*(?:{any_case([platform])})\s*$"},
                "token": {"type": "string", "pattern": token, "description": what},
                **common,
            },
        }

    return {
        "title": "TokenIn",
        "oneOf": [
            variant("ios", apns, f"APNs: {APNS_MIN_BYTES}-{APNS_MAX_BYTES} bytes in hexadecimal"),
            variant("android", fcm, f"FCM: {FCM_MIN}-{FCM_MAX} of A-Z a-z 0-9 _ : -"),
        ],
    }


def prefs_schema() -> dict[str, Any]:
    item = {"type": "string", "pattern": preference_pattern()}
    return {
        "type": "object",
        "title": "PrefsIn",
        "additionalProperties": False,
        "properties": {
            "off": {"type": "array", "items": item, "description": "opt out of: email, marketing, sms:marketing, all"},
            "on": {"type": "array", "items": item, "description": "remove these opt-outs"},
        },
    }


def notify_schema(template_ids: list[str]) -> dict[str, Any]:
    templates = "|".join(re.escape(t) for t in template_ids) or "(?!)"
    return {
        "type": "object",
        "title": "NotifyRequest",
        "description": "The recipient must exist (else 422), and `data` must hold what the template's parts "
        "for the chosen channels print (`notifyctl templates show`).",
        "additionalProperties": False,
        "required": ["recipient_id", "template_id"],
        "properties": {
            "recipient_id": {"type": "string", "pattern": text_id(MAX_ID)},
            "template_id": {"type": "string", "pattern": rf"^\s*(?:{templates})\s*$"},
            "type": _nullable({"type": "string", "pattern": stripped(128)}),
            "priority": _nullable({"type": "string", "enum": list(PRIORITIES)}),
            "channels": {
                "anyOf": [
                    {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": r"^\s*all\s*$"}},
                    {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "string", "pattern": rf"^\s*(?:{'|'.join(CHANNELS)})\s*$"},
                    },
                ],
                "description": 'default ["all"]: every channel the template has',
            },
            "data": {"type": "object", "description": "template data (null is missing)"},
            "dedup_key": _nullable({"type": "string", "pattern": stripped(255, 1)}),
            "ordering_key": _nullable(
                {
                    "type": "string",
                    "pattern": stripped(128, 1),
                    "description": "sent after every earlier notification of this recipient, priority and key",
                }
            ),
        },
    }


_SNS_COMMON = {
    "MessageId": {"type": "string", "minLength": 1},
    "TopicArn": {"type": "string", "minLength": 1},
    "Message": {"type": "string"},
    "Timestamp": {"type": "string", "format": "date-time"},
    "SignatureVersion": {"type": "string", "enum": ["1", "2"]},
    "Signature": {"type": "string", "minLength": 1, "description": "base64"},
    "SigningCertURL": {"type": "string", "minLength": 1, "format": "uri"},
}
_SNS_REQUIRED = ["Type", *_SNS_COMMON]


def sns_schema() -> dict[str, Any]:
    notification = {
        "type": "object",
        "required": _SNS_REQUIRED,
        "properties": {"Type": {"const": "Notification"}, **_SNS_COMMON, "Subject": {"type": "string"}},
    }

    def confirmation(kind: str) -> dict[str, Any]:
        return {
            "type": "object",
            "required": [*_SNS_REQUIRED, "SubscribeURL", "Token"],
            "properties": {
                "Type": {"const": kind},
                **_SNS_COMMON,
                "SubscribeURL": {"type": "string"},
                "Token": {"type": "string"},
            },
        }

    return {
        "title": "SnsMessage",
        "description": "An SNS message (SES events are its Message, a JSON string)",
        "oneOf": [notification, confirmation("SubscriptionConfirmation"), confirmation("UnsubscribeConfirmation")],
    }


def _form(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": required}
    return {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": schema}}}


def _header(name: str, description: str, required: bool = True, **schema: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": required,
        "description": description,
        "schema": {"type": "string", **schema},
    }


_STR = {"type": "string"}


def request_bodies(template_ids: list[str]) -> dict[str, dict[str, Any]]:
    return {
        "POST /v1/notify": {"required": True, "content": {"application/json": {"schema": notify_schema(template_ids)}}},
        "POST /webhooks/sendgrid": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"type": "array", "items": {"type": "object", "required": ["event"]}},
                }
            },
        },
        "POST /webhooks/ses": {
            "required": True,
            "content": {"text/plain": {"schema": sns_schema()}, "application/json": {"schema": sns_schema()}},
        },
        "POST /webhooks/twilio/status": _form(
            {k: _STR for k in ("MessageSid", "MessageStatus", "To", "From", "ErrorCode", "AccountSid")},
            ["MessageSid", "MessageStatus"],
        ),
        "POST /webhooks/twilio/inbound": _form(
            {k: _STR for k in ("MessageSid", "From", "To", "Body", "AccountSid")}, ["MessageSid", "From", "Body"]
        ),
        "POST /u/{token}": _form({"List-Unsubscribe": {"const": "One-Click"}}, ["List-Unsubscribe"]),
    }


_HEADERS_DOC: dict[str, list[dict[str, Any]]] = {
    "POST /v1/notify": [
        _header(
            "Idempotency-Key",
            "the dedup key when the body has none (1-255 characters)",
            required=False,
            pattern=stripped(255, 1),
        )
    ],
    "POST /webhooks/sendgrid": [
        _header("X-Twilio-Email-Event-Webhook-Signature", "base64 ECDSA signature of timestamp + body"),
        _header("X-Twilio-Email-Event-Webhook-Timestamp", "Unix time the signature was made"),
    ],
    "POST /webhooks/twilio/status": [_header("X-Twilio-Signature", "base64 HMAC-SHA1 of the URL and the form")],
    "POST /webhooks/twilio/inbound": [_header("X-Twilio-Signature", "base64 HMAC-SHA1 of the URL and the form")],
}
_PATH_PATTERNS = {"user_id": lambda: text_id(MAX_ID)}


def tighten(doc: dict[str, Any], template_ids: list[str]) -> dict[str, Any]:
    """The draft FastAPI made, with what the module docstring lists (in place; returns ``doc``)."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Error"] = ERROR_SCHEMA
    schemas["UserIn"] = user_schema()
    schemas["TokenIn"] = token_schema()
    schemas["PrefsIn"] = prefs_schema()
    bodies = request_bodies(template_ids)
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            key = f"{method.upper()} {path}"
            errors = {**(_V1 if path.startswith(("/v1/", "/metrics")) else _PUBLIC), **ERRORS.get(key, {})}
            responses = {code: r for code, r in op.get("responses", {}).items() if not code.startswith("4")}
            for status, why in sorted(errors.items()):
                responses[str(status)] = {"description": why, "content": {"application/json": {"schema": ERROR_REF}}}
            if key in _MEDIA:
                media, schema, why = _MEDIA[key]
                responses["200"] = {"description": why, "content": {media: {"schema": schema}}}
            op["responses"] = dict(sorted(responses.items()))
            if key in bodies:
                op["requestBody"] = bodies[key]
            params = [p for p in op.get("parameters", []) if p.get("in") != "header"] + _HEADERS_DOC.get(key, [])
            for p in params:
                pattern = _PATH_PATTERNS.get(p["name"]) if p.get("in") == "path" else None
                if pattern is not None:
                    p["schema"] = {"type": "string", "pattern": pattern()}
            if params:
                op["parameters"] = params
    return doc


def install(app: FastAPI, template_ids: Any) -> None:
    """Serve the tightened document; ``template_ids()`` is asked each time (templates come and go)."""
    draft = app.openapi  # FastAPI's own, cached by it

    def openapi() -> dict[str, Any]:
        return tighten(copy.deepcopy(draft()), list(template_ids()))

    app.openapi = openapi  # type: ignore[method-assign]
