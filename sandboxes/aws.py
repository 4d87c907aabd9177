"""One module: the fake AWS endpoint in front of moto: its SigV4 check, fault plan and recorder act on
the same proxied request; ~570 lines.

AWS sandbox: moto's server (SES v2 and SNS, real wire protocols) behind a small fault proxy.

::

    boto3 client ──► AwsSandbox proxy (127.0.0.1:port) ──► moto ThreadedMotoServer (127.0.0.1:any)
                     verifies SigV4 like AWS,
                     injects faults (FaultPlan),
                     records accepted sends (Recorder)

Point the providers at ``sandbox.url`` (``NOTIFY_SES_ENDPOINT_URL`` / ``NOTIFY_SNS_ENDPOINT_URL``)
with the sandbox's access key pair. moto requires a verified sender for SES:
``sandbox.verify_identity("notifications@example.com")`` (an address or a whole domain).

Faults (``sandbox.faults.add(...)`` or ``POST /_sandbox/faults``) take the keys of
:mod:`sandboxes.base` plus ``code`` and ``message``: with a ``code`` the proxy answers the
service's own error shape with ``status`` (default 400), i.e. for SES v2 (rest-json)
``x-amzn-ErrorType: <code>`` and ``{"__type": code, "message": ...}``, and for SNS (query) an
``<ErrorResponse><Error><Type>Sender|Receiver</Type><Code>..</Code><Message>..</Message></Error>``
XML document. Without a ``code`` the fault's raw ``body`` is sent as in the base sandbox.

SES v2 ``SendBulkEmail`` (``POST /v2/email/outbound-bulk-emails``), which moto does not implement, is
answered by the proxy itself in the real wire shape (``{"BulkEmailEntryResults": [{"Status",
"Error", "MessageId"}]}``): it accepts inline ``DefaultContent.Template.TemplateContent`` (or a
``TemplateName`` it cannot resolve: ``NotFoundException``), at most 50 ``BulkEmailEntries``, rejects
Handlebars block helpers like SES (``Template contains unsupported operations.``), renders the
simple ``{{var}}`` substitutions from ``TemplateData`` + ``ReplacementTemplateData``, merges
``Template.Headers`` with each entry's ``ReplacementHeaders`` and ``DefaultEmailTags`` with
``ReplacementTags``, then forwards each rendered entry to moto's own ``SendEmail`` so moto checks
the sender (an unverified sender fails the whole call with ``MessageRejected``) and the address
(a bad one becomes that entry's ``INVALID_PARAMETER``), keeps the message, and gives its id.
Per-entry faults: a fault with ``entry_status`` (a ``BulkEmailStatus`` such as ``ACCOUNT_THROTTLED``)
and optional ``error`` is applied to the bulk entries whose JSON contains its ``match``, instead of
to whole requests. Each ``SendBulkEmail`` call is logged in ``sandbox.bulk_calls`` (``status``,
``entries``: their number, ``request``: the JSON request as sent).

What was sent: ``sandbox.recorder`` / ``GET /_sandbox/messages`` hold every accepted send as the
client sent it (headers, tags, SMS attributes included, which moto does not keep; bulk entries rendered, with
``"bulk": True``), and
``sent_emails()`` / ``sent_sms()`` read moto's own record through ``/moto-api/data.json``.

moto's state lives in the process: two sandboxes in one process share it (and ``reset_moto()``
clears it for both).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, quote
from xml.sax.saxutils import escape

import urllib3

from sandboxes.base import FaultPlan, HttpSandbox, Recorder, SandboxHandler, serve_until_interrupted

SES_SEND_PATH = "/v2/email/outbound-emails"
SES_BULK_PATH = "/v2/email/outbound-bulk-emails"
#: SES v2 accepts at most 50 entries per SendBulkEmail call.
SES_BULK_MAX = 50
#: Handlebars beyond simple ``{{var}}`` substitution, which SES refuses for inline template content
#: (``{{{var}}`` and ``{{var}}}`` included: Handlebars reads ``{{{``/``}}}`` as the unescaped form).
_UNSUPPORTED_TEMPLATE_RE = re.compile(r"\{\{\s*(?:[#/^>!&{~]|else\b)|\{\{[^{}]*\}\}\}")
#: ``{{var}}``, or ``\{{var}}``: Handlebars' escaped mustache, which stays as it is (less the ``\``).
_TEMPLATE_VAR_RE = re.compile(r"(\\)?\{\{\s*([^{}\s]+)\s*\}\}")
#: moto's messages for a recipient it cannot parse (SES itself: "Illegal address" and the like).
_BAD_ADDRESS_RE = re.compile(r"illegal address|missing domain|missing final|invalid email|local address", re.I)
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "te"}
_UPSTREAM_HEADER = "X-Notifyctl-Sandbox-Upstream"


class _OnlyWithSecret:
    """moto's WSGI app, answering only requests with the header the proxy adds (its secret is
    never shown): moto itself is listening on 127.0.0.1 for any local user otherwise."""

    def __init__(self, app: Any, headers: dict[str, str]) -> None:
        self.app = app
        self.key = "HTTP_" + _UPSTREAM_HEADER.upper().replace("-", "_")
        self.secret = headers[_UPSTREAM_HEADER].encode()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if not hmac.compare_digest(environ.get(self.key, "").encode("utf-8", "replace"), self.secret):
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"moto behind the AWS sandbox: only the sandbox's proxy may call it\n"]
        return self.app(environ, start_response)


_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<cred>[^,\s]+),\s*SignedHeaders=(?P<signed>[^,\s]+),"
    r"\s*Signature=(?P<sig>[0-9a-f]+)$"
)
_SIGNATURE_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
)


def _is_rest_json(path: str) -> bool:
    return path.startswith("/v2/")


def aws_error(path: str, status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
    """The error response AWS would send for a request to ``path`` (SES v2 rest-json or SNS query)."""
    request_id = str(uuid.uuid4())
    if _is_rest_json(path):
        body = json.dumps({"__type": code, "message": message}).encode()
        return (
            status,
            {"Content-Type": "application/json", "x-amzn-ErrorType": code, "x-amzn-RequestId": request_id},
            body,
        )
    kind = "Receiver" if status >= 500 else "Sender"
    xml = (
        '<ErrorResponse xmlns="http://sns.amazonaws.com/doc/2010-03-31/">'
        f"<Error><Type>{kind}</Type><Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>"
        f"<RequestId>{request_id}</RequestId></ErrorResponse>"
    )
    return status, {"Content-Type": "text/xml", "x-amzn-RequestId": request_id}, xml.encode()


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sigv4_problem(
    method: str, raw_path: str, headers: Any, body: bytes, access_key_id: str, secret_access_key: str
) -> tuple[int, str, str] | None:
    """Verify an AWS Signature Version 4 header as AWS does: None if valid, else (status, code, message)."""
    rest_json = _is_rest_json(raw_path)
    auth = headers.get("Authorization")
    if not auth:
        code = "MissingAuthenticationTokenException" if rest_json else "MissingAuthenticationToken"
        return 403, code, "Missing Authentication Token"
    m = _AUTH_RE.match(auth.strip())
    if not m:
        code = "IncompleteSignatureException" if rest_json else "IncompleteSignature"
        return 400, code, "Authorization header requires Credential, SignedHeaders and Signature."
    cred = m["cred"].split("/")
    if len(cred) != 5 or cred[4] != "aws4_request":
        code = "IncompleteSignatureException" if rest_json else "IncompleteSignature"
        return 400, code, "Credential should be scoped to a valid region and service."
    if cred[0] != access_key_id:
        code = "UnrecognizedClientException" if rest_json else "InvalidClientTokenId"
        return 403, code, "The security token included in the request is invalid."
    amz_date = headers.get("X-Amz-Date", "")
    path, _, query = raw_path.partition("?")
    pairs = sorted(tuple(p.split("=", 1)) if "=" in p else (p, "") for p in query.split("&") if p)
    canonical_query = "&".join(f"{k}={v}" for k, v in pairs)
    signed = m["signed"].split(";")
    canonical_headers = "".join(f"{h}:{' '.join((headers.get(h) or '').split())}\n" for h in signed)
    payload_hash = headers.get("X-Amz-Content-SHA256") or hashlib.sha256(body).hexdigest()
    canonical = "\n".join(
        [method, quote(path, safe="/~"), canonical_query, canonical_headers, m["signed"], payload_hash]
    )
    scope = "/".join(cred[1:])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_access_key).encode()
    for part in cred[1:]:
        key = _hmac(key, part)
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, m["sig"]):
        return 403, "SignatureDoesNotMatch", _SIGNATURE_MISMATCH
    return None


class AwsFaultPlan(FaultPlan):
    """The base fault plan, plus per-entry faults for SendBulkEmail (those with ``entry_status``),
    which are never taken for a whole request."""

    def take(self, text: str = "", entry: bool = False) -> dict[str, Any] | None:  # type: ignore[override]
        return super().take(text, where=lambda f: bool(f.get("entry_status")) == entry)


def _render(template: str, data: dict[str, Any]) -> str:
    """SES's simple substitution: ``{{name}}`` -> the value as it is (missing -> empty; SES does not
    escape HTML), ``\\{{name}}`` -> ``{{name}}``."""

    def value(m: re.Match[str]) -> str:
        if m.group(1):
            return m.group(0)[1:]
        v = data.get(m.group(2), "")
        return v if isinstance(v, str) else json.dumps(v)

    return _TEMPLATE_VAR_RE.sub(value, template)


def _merge(base: list[dict[str, str]], override: list[dict[str, str]], fold: bool) -> dict[str, str]:
    """Name -> value of ``base`` overridden by ``override`` (header names compare case-insensitively)."""
    out: dict[str, str] = {}
    keys: dict[str, str] = {}
    for item in [*base, *override]:
        name = str(item.get("Name", ""))
        key = name.lower() if fold else name
        if key in keys:
            out.pop(keys[key])
        keys[key] = name
        out[name] = str(item.get("Value", ""))
    return out


class AwsProxyHandler(SandboxHandler):
    sandbox: AwsSandbox

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        if self.path.startswith("/_sandbox/"):
            super()._dispatch(method)
            return
        sb = self.sandbox
        sb._enter()
        try:
            super()._dispatch(method)
        finally:
            sb._leave()

    def _answer_fault(self, fault: dict[str, Any]) -> bool:
        """The base faults, plus ``code`` (and ``message``): an error in the AWS API's own shape."""
        if not fault.get("code") or fault.get("drop"):
            return super()._answer_fault(fault)
        if fault.get("delay"):
            time.sleep(float(fault["delay"]))
        status, headers, out = aws_error(
            self.path, int(fault.get("status") or 400), str(fault["code"]), fault.get("message", "")
        )
        self._reply(status, {**headers, **fault.get("headers", {})}, out)
        return True

    def handle_api(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        sb = self.sandbox
        if path.startswith("/moto-api/") and not self.control_authorized():
            # moto's own control API (what it keeps, reset): the sandbox's control token, as /_sandbox/
            return 401, {"Content-Type": "text/plain"}, b"moto-api: send Authorization: Bearer <the sandbox's token>\n"
        if sb.verify_auth and not path.startswith("/moto-api/"):
            problem = sigv4_problem(method, path, self.headers, body, sb.access_key_id, sb.secret_access_key)
            if problem:
                return aws_error(path, *problem)
        if method == "POST" and path.split("?")[0] == SES_BULK_PATH:
            return sb._send_bulk(self.headers, body)
        fwd = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        fwd.update(sb._upstream_headers)
        resp = sb._upstream.request(method, path, body=body or None, headers=fwd, redirect=False)
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_HEADERS}
        if 200 <= resp.status < 300:
            sb._record(method, path, body, resp.data)
        return resp.status, out_headers, resp.data


class AwsSandbox(HttpSandbox):
    """moto (SES v2 + SNS) behind a SigV4-checking, fault-injecting, recording proxy.

    ``AwsSandbox(port=0, access_key_id="testing", secret_access_key="testing", region="us-east-1")``;
    ``url`` is the endpoint for the providers. ``moto_url`` is moto itself (no faults, no auth check).
    """

    handler_cls = AwsProxyHandler

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        access_key_id: str = "testing",
        secret_access_key: str = "testing",
        region: str = "us-east-1",
        moto_port: int = 0,
        verify_auth: bool = True,
    ) -> None:
        super().__init__(port, host)
        self._server.socket.listen(128)  # the base server's backlog (5) is too small for bursts
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.region = region
        self.verify_auth = verify_auth
        self._moto_port = moto_port
        self._moto: Any = None
        self._moto_thread: threading.Thread | None = None
        self._upstream: Any = None
        self._upstream_headers = {_UPSTREAM_HEADER: secrets.token_urlsafe(24)}
        self._gauge = threading.Lock()
        self.in_flight = 0
        self.peak_in_flight = 0
        self.faults: AwsFaultPlan = AwsFaultPlan()
        self.bulk_calls = Recorder()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> AwsSandbox:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request access log
        # moto keeps every message sent (OTPs included) and has no authentication of its own: it
        # answers only requests carrying this sandbox's secret, which only the proxy sends.
        app = _OnlyWithSecret(DomainDispatcherApplication(create_backend_app), self._upstream_headers)
        self._moto = make_server("127.0.0.1", self._moto_port, app, threaded=True, request_handler=MotoRequestHandler)
        self._moto_thread = threading.Thread(target=self._moto.serve_forever, name="aws-sandbox-moto", daemon=True)
        self._moto_thread.start()
        moto_port = self._moto.server_address[1]
        self.moto_url = f"http://127.0.0.1:{moto_port}"
        self._upstream = urllib3.HTTPConnectionPool(
            "127.0.0.1", moto_port, maxsize=64, block=False, retries=False, timeout=30.0
        )
        super().start()
        return self

    def stop(self) -> None:
        super().stop()
        if self._upstream is not None:
            self._upstream.close()
        if self._moto is not None:
            self._moto.shutdown()
            self._moto.server_close()
            if self._moto_thread is not None:
                self._moto_thread.join(timeout=5)
            self._moto = None

    def __enter__(self) -> AwsSandbox:
        return self.start()

    # -- concurrency gauge -------------------------------------------------------------------

    def _enter(self) -> None:
        with self._gauge:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._gauge:
            self.in_flight -= 1

    def reset_peak(self) -> None:
        with self._gauge:
            self.peak_in_flight = self.in_flight

    # -- recording ---------------------------------------------------------------------------

    def _record(self, method: str, path: str, body: bytes, response: bytes) -> None:
        if method == "POST" and path.split("?")[0] == SES_SEND_PATH:
            req = json.loads(body or b"{}")
            simple = (req.get("Content") or {}).get("Simple") or {}
            dest = req.get("Destination") or {}
            self.recorder.add(
                {
                    "service": "ses",
                    "message_id": json.loads(response or b"{}").get("MessageId"),
                    "from": req.get("FromEmailAddress"),
                    "to": dest.get("ToAddresses", []),
                    "cc": dest.get("CcAddresses", []),
                    "bcc": dest.get("BccAddresses", []),
                    "subject": (simple.get("Subject") or {}).get("Data"),
                    "text": ((simple.get("Body") or {}).get("Text") or {}).get("Data"),
                    "html": ((simple.get("Body") or {}).get("Html") or {}).get("Data"),
                    "headers": {h["Name"]: h["Value"] for h in simple.get("Headers", [])},
                    "tags": {t["Name"]: t["Value"] for t in req.get("EmailTags", [])},
                    "configuration_set": req.get("ConfigurationSetName"),
                    "raw": "Raw" in (req.get("Content") or {}),
                    "bulk": False,
                }
            )
            return
        if method == "POST" and path.split("?")[0] == "/":
            form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
            if form.get("Action") != "Publish" or not form.get("PhoneNumber"):
                return
            attributes: dict[str, str] = {}
            n = 1
            while f"MessageAttributes.entry.{n}.Name" in form:
                prefix = f"MessageAttributes.entry.{n}.Value."
                attributes[form[f"MessageAttributes.entry.{n}.Name"]] = form.get(
                    prefix + "StringValue", form.get(prefix + "BinaryValue", "")
                )
                n += 1
            found = re.search(rb"<MessageId>([^<]+)</MessageId>", response)
            self.recorder.add(
                {
                    "service": "sns",
                    "message_id": found.group(1).decode() if found else None,
                    "phone": form["PhoneNumber"],
                    "text": form.get("Message"),
                    "attributes": attributes,
                }
            )

    # -- SendBulkEmail (not in moto) ---------------------------------------------------------

    def _send_bulk(self, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Answer SES v2 SendBulkEmail (logged in ``bulk_calls``)."""
        status, out_headers, out, entries = self._bulk_answer(headers, body)
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            request = None
        self.bulk_calls.add({"status": status, "entries": entries, "request": request})
        return status, out_headers, out

    def _bulk_answer(self, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes, int]:
        """SendBulkEmail's answer and its number of entries; each rendered entry goes through moto's SendEmail."""
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            return (*aws_error(SES_BULK_PATH, 400, "SerializationException", "Request body is not valid JSON"), 0)
        template = (req.get("DefaultContent") or {}).get("Template") or {}
        entries = req.get("BulkEmailEntries") or []

        def fail(status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes, int]:
            return (*aws_error(SES_BULK_PATH, status, code, message), len(entries))

        if not entries:
            return fail(400, "BadRequestException", "BulkEmailEntries must contain at least 1 entry.")
        if len(entries) > SES_BULK_MAX:
            return fail(400, "BadRequestException", f"Too many entries: {len(entries)} (max {SES_BULK_MAX}).")
        content = template.get("TemplateContent")
        if not content:
            name = template.get("TemplateName") or template.get("TemplateArn")
            if name:
                return fail(404, "NotFoundException", f"Template {name} does not exist.")
            return fail(400, "BadRequestException", "Template content or name must be provided.")
        parts = {k: str(content.get(k) or "") for k in ("Subject", "Text", "Html")}
        if any(_UNSUPPORTED_TEMPLATE_RE.search(v) for v in parts.values()):
            return fail(400, "BadRequestException", "Template contains unsupported operations.")
        try:
            default_data = json.loads(template.get("TemplateData") or "{}")
            entry_data = [
                json.loads(
                    ((e.get("ReplacementEmailContent") or {}).get("ReplacementTemplate") or {}).get(
                        "ReplacementTemplateData"
                    )
                    or "{}"
                )
                for e in entries
            ]
        except ValueError:
            return fail(400, "BadRequestException", "The template data is invalid.")
        forward = {
            "Content-Type": "application/json",
            "Authorization": headers.get("Authorization", ""),  # moto routes by the credential scope
            "X-Amz-Date": headers.get("X-Amz-Date", ""),
        }
        results: list[dict[str, str]] = []
        for entry, data in zip(entries, entry_data, strict=True):
            fault = self.faults.take(json.dumps(entry), entry=True)
            if fault:
                result = {"Status": str(fault["entry_status"])}
                if fault.get("error"):
                    result["Error"] = str(fault["error"])
                results.append(result)
                continue
            merged = {**default_data, **data}
            rendered = {k: _render(v, merged) for k, v in parts.items()}
            mail_headers = _merge(template.get("Headers") or [], entry.get("ReplacementHeaders") or [], fold=True)
            tags = _merge(req.get("DefaultEmailTags") or [], entry.get("ReplacementTags") or [], fold=False)
            simple: dict[str, Any] = {"Subject": {"Data": rendered["Subject"]}, "Body": {}}
            for part in ("Text", "Html"):
                if rendered[part]:
                    simple["Body"][part] = {"Data": rendered[part]}
            if mail_headers:
                simple["Headers"] = [{"Name": k, "Value": v} for k, v in mail_headers.items()]
            single = {
                "FromEmailAddress": req.get("FromEmailAddress"),
                "Destination": entry.get("Destination") or {},
                "Content": {"Simple": simple},
                "EmailTags": [{"Name": k, "Value": v} for k, v in tags.items()],
            }
            resp = self._upstream.request(
                "POST", SES_SEND_PATH, body=json.dumps(single).encode(), headers={**forward, **self._upstream_headers}
            )
            if resp.status == 200:
                message_id = json.loads(resp.data).get("MessageId")
                results.append({"Status": "SUCCESS", "MessageId": message_id})
                dest = entry.get("Destination") or {}
                self.recorder.add(
                    {
                        "service": "ses",
                        "message_id": message_id,
                        "from": req.get("FromEmailAddress"),
                        "to": dest.get("ToAddresses", []),
                        "cc": dest.get("CcAddresses", []),
                        "bcc": dest.get("BccAddresses", []),
                        "subject": rendered["Subject"],
                        "text": rendered["Text"] or None,
                        "html": rendered["Html"] or None,
                        "headers": mail_headers,
                        "tags": tags,
                        "configuration_set": req.get("ConfigurationSetName"),
                        "raw": False,
                        "bulk": True,
                    }
                )
                continue
            try:
                err = json.loads(resp.data)
            except ValueError:
                err = {}
            code = resp.headers.get("x-amzn-ErrorType") or err.get("__type") or ""
            message = str(err.get("Message") or err.get("message") or resp.status)
            if code == "MessageRejected":  # the sender: SES fails the whole call
                return fail(400, code, message)
            status = "INVALID_PARAMETER" if _BAD_ADDRESS_RE.search(message) else "FAILED"
            results.append({"Status": status, "Error": message})
        out = json.dumps({"BulkEmailEntryResults": results}).encode()
        return 200, {"Content-Type": "application/json", "x-amzn-RequestId": str(uuid.uuid4())}, out, len(entries)

    # -- helpers -----------------------------------------------------------------------------

    def client(self, service: str) -> Any:
        """A boto3 client talking to moto directly (setup only: no faults, no recording)."""
        import boto3

        client = boto3.session.Session().client(
            service,
            region_name=self.region,
            endpoint_url=self.moto_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )

        def add_secret(request: Any, **_kw: Any) -> None:
            request.headers.update(self._upstream_headers)

        client.meta.events.register("before-send", add_secret)
        return client

    def verify_identity(self, identity: str) -> None:
        """Make an address or a domain a verified SES sender (moto verifies it at once)."""
        ses = self.client("sesv2")
        try:
            ses.create_email_identity(EmailIdentity=identity)
        finally:
            ses.close()

    def _moto_data(self) -> dict[str, Any]:
        resp = self._upstream.request("GET", "/moto-api/data.json", headers=self._upstream_headers)
        data: dict[str, Any] = json.loads(resp.data)
        return data

    def sent_emails(self) -> list[dict[str, Any]]:
        """Emails moto accepted: ``id``, ``source``, ``subject``, ``destinations`` and ``body``
        (the html part, else the text)."""
        return list(self._moto_data().get("ses", {}).get("Message", []))

    def sent_sms(self) -> list[dict[str, Any]]:
        """SMS moto accepted: ``message_id``, ``phone_number``, ``message``."""
        return list(self._moto_data().get("sns", {}).get("SMS", []))

    def reset_moto(self) -> None:
        """Forget all moto state (identities included) in this process."""
        self._upstream.request("POST", "/moto-api/reset", headers=self._upstream_headers)


def main(port: int = 4566, identities: tuple[str, ...] = ("notifications@example.com",)) -> None:
    """Run the AWS sandbox in the foreground until interrupted (``notifyctl sandbox aws``)."""
    sandbox = AwsSandbox(port).start()
    for identity in identities:
        sandbox.verify_identity(identity)
    serve_until_interrupted(
        sandbox,
        f"AWS sandbox (SES v2 + SNS) on {sandbox.url}  access key: testing / testing  region: us-east-1",
        f"  control API token (Authorization: Bearer ...): {sandbox.control_token}",
    )
