"""One module: one fake SMTP server: its protocol handler, fault plan, message parsing and control
endpoint share the sandbox's recorder and faults; ~420 lines.

A local SMTP server for the ``smtp`` provider: real SMTP (ESMTP, STARTTLS, implicit TLS, AUTH)
over TCP on 127.0.0.1, built on aiosmtpd and run in a background thread.

Every accepted message is parsed and recorded (envelope, From/To/Subject, text and html parts,
all headers, ``X-Notify-Delivery-Id``). Faults come from a :class:`SmtpFaultPlan` (a
:class:`~sandboxes.base.FaultPlan`); a fault is a dict with any of:

- ``stage``: ``"connect"`` (greeting), ``"mail"``, ``"rcpt"`` (default) or ``"data"`` (after the
  message body, before the final reply)
- ``smtp_code`` (int) and ``smtp_message`` (str, e.g. ``"5.1.1 user unknown"``): answer this
  instead of the normal reply (a 421 also closes the connection, as real servers do)
- ``delay`` (float seconds): wait before answering
- ``drop`` (bool): close the connection without answering
- ``match`` (str): only when the recipient address (sender for ``mail``, peer for ``connect``)
  contains this substring
- ``count`` (int, default 1; ``-1`` = until cleared)

The same control API as the HTTP sandboxes (``/_sandbox/messages``, ``/_sandbox/faults``, plus
``GET /_sandbox/stats``) is served on a side port, so another process can drive it::

    with SmtpSandbox() as sb:          # sb.host, sb.port: SMTP; sb.control_url: HTTP control API
        ...
        sb.recorder.all(); sb.faults.add({"smtp_code": 451, "smtp_message": "4.3.0 try later"})

``SmtpSandbox(auth=("user", "secret"))`` demands AUTH before MAIL (``530 5.7.0``) and answers bad
credentials with ``535 5.7.8`` like real submission servers; ``tls_context=`` offers STARTTLS
(then AUTH is only offered after STARTTLS), ``implicit_tls=True`` wraps the port in TLS (port 465
style).
"""

from __future__ import annotations

import asyncio
import email
import hmac
import itertools
import json
import re
import socket
import ssl
import threading
import time
from email.header import decode_header, make_header
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword
from aiosmtpd.smtp import Session as SmtpSession

from sandboxes.base import FaultPlan, HttpSandbox, Recorder, SandboxHandler, SeparateControl, serve_until_interrupted

STAGES = ("connect", "mail", "rcpt", "data")


class SmtpFaultPlan(FaultPlan):
    """A FaultPlan whose faults also name the SMTP stage they apply to (default ``rcpt``)."""

    def add(self, fault: dict[str, Any] | list[dict[str, Any]]) -> None:
        faults = fault if isinstance(fault, list) else [fault]
        for f in faults:
            if not isinstance(f, dict):
                raise TypeError("a fault must be a JSON object")
            if f.get("stage", "rcpt") not in STAGES:
                raise ValueError(f"stage must be one of {', '.join(STAGES)}")
            if "smtp_code" in f and not 200 <= int(f["smtp_code"]) <= 599:
                raise ValueError("smtp_code must be a 3-digit SMTP reply code")
        super().add(faults)

    def take(self, text: str = "", stage: str = "rcpt") -> dict[str, Any] | None:  # type: ignore[override]
        return super().take(text, where=lambda f: f.get("stage", "rcpt") == stage)


def _reply_text(fault: dict[str, Any]) -> str:
    code = int(fault["smtp_code"])
    text = str(fault.get("smtp_message") or "fault injected").replace("\r", " ").replace("\n", " ")
    return f"{code} {text}"


def _decode_header(value: Any) -> str:
    if value is None:
        return ""
    unfolded = re.sub(r"\r?\n(?=[ \t])", "", str(value))  # RFC 5322 §2.2.3
    return str(make_header(decode_header(unfolded)))


def _part_text(part: Any) -> str:
    payload = part.get_payload(decode=True) or b""
    text = payload.decode(part.get_content_charset() or "us-ascii", "replace")
    return text.replace("\r\n", "\n")


def parse_message(raw: bytes) -> dict[str, Any]:
    """The recorded view of one message: headers (RFC 2047-decoded), subject, text and html parts."""
    msg = email.message_from_bytes(raw)  # compat32: ~10x faster than policy.default
    headers: dict[str, str] = {}
    for name, value in msg.items():
        headers.setdefault(name, _decode_header(value))
    text = html = None
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "text/plain" and text is None and not part.get_filename():
            text = _part_text(part)
        elif ctype == "text/html" and html is None and not part.get_filename():
            html = _part_text(part)
    return {
        "from": headers.get("From", ""),
        "to": headers.get("To", ""),
        "subject": headers.get("Subject", ""),
        "date": headers.get("Date", ""),
        "message_id": headers.get("Message-ID", ""),
        "delivery_id": headers.get("X-Notify-Delivery-Id", ""),
        "content_type": msg.get_content_type(),
        "text": text,
        "html": html,
        "headers": headers,
        "size": len(raw),
    }


class _Handler:
    """aiosmtpd hooks: fault injection per stage, AUTH enforcement, recording."""

    def __init__(self, sandbox: SmtpSandbox) -> None:
        self.sb = sandbox

    async def _fault(self, server: SMTP, stage: str, text: str) -> str | None:
        """Apply a fault: ``None`` = proceed normally, else the reply to send."""
        fault = self.sb.faults.take(text, stage=stage)
        if not fault:
            return None
        if fault.get("delay"):
            await asyncio.sleep(float(fault["delay"]))
        if fault.get("drop"):
            assert server.transport is not None
            server.transport.close()
            await asyncio.Event().wait()  # cancelled by connection_lost
        if fault.get("smtp_code"):
            reply = _reply_text(fault)
            if reply.startswith("421"):
                await server.push(reply)
                assert server.transport is not None
                server.transport.close()
                await asyncio.Event().wait()
            return reply
        return None

    async def handle_MAIL(  # noqa: N802
        self, server: SMTP, session: SmtpSession, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.sb.auth and not session.authenticated:
            return "530 5.7.0 Authentication required"
        reply = await self._fault(server, "mail", address)
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(  # noqa: N802
        self, server: SMTP, session: SmtpSession, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        reply = await self._fault(server, "rcpt", address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: SmtpSession, envelope: Envelope) -> str:  # noqa: N802
        reply = await self._fault(server, "data", " ".join(envelope.rcpt_tos))
        if reply:
            return reply
        raw = envelope.original_content or b""
        item = parse_message(raw)
        qid = next(self.sb._ids)
        item.update(
            {
                "id": qid,
                "connection": getattr(server, "connection_no", 0),
                "mail_from": envelope.mail_from,
                "rcpt_tos": list(envelope.rcpt_tos),
                "mail_options": list(envelope.mail_options),
                "tls": session.ssl is not None or self.sb._implicit_tls,
                "authenticated": bool(session.authenticated),
            }
        )
        self.sb.recorder.add(item)
        return f"250 2.0.0 OK queued as {qid:08X}"


class _SMTP(SMTP):
    sandbox: SmtpSandbox
    connection_no = 0

    async def _handle_client(self) -> None:
        sb = self.sandbox
        self.connection_no = sb._connection_opened(self)
        peer = self.session.peer if self.session else None
        fault = sb.faults.take(f"{peer}", stage="connect")
        if fault:
            if fault.get("delay"):
                await asyncio.sleep(float(fault["delay"]))
            if fault.get("drop"):
                assert self.transport is not None
                self.transport.close()
                return
            if fault.get("smtp_code"):
                await self.push(_reply_text(fault))
                assert self.transport is not None
                self.transport.close()
                return
        await super()._handle_client()

    def connection_lost(self, error: Exception | None) -> None:
        self.sandbox._connection_closed(self)
        super().connection_lost(error)


class _ControlHandler(SandboxHandler):
    """Only the control API (the SMTP side is the real protocol); adds ``GET /_sandbox/stats``."""

    sandbox: _ControlServer

    def _dispatch(self, method: str) -> None:
        body = self._read_body()
        if self.path.startswith("/_sandbox/"):
            self._guarded_control(method, body)
        else:
            self._reply(404, {"Content-Type": "text/plain"}, b"SMTP sandbox: control API only\n")

    def _control(self, method: str, body: bytes) -> None:
        if self.path.split("?")[0] == "/_sandbox/stats" and method == "GET":
            out = json.dumps(self.sandbox.smtp.stats()).encode()
            self._reply(200, {"Content-Type": "application/json"}, out)
        else:
            super()._control(method, body)


class _ControlServer(HttpSandbox):
    handler_cls = _ControlHandler
    poll_interval = 0.01  # stop() (shutdown) returns in ~10 ms, not 0.5 s

    def __init__(self, smtp: SmtpSandbox, port: int, host: str) -> None:
        super().__init__(port=port, host=host)
        self.smtp = smtp
        self.faults = smtp.faults
        self.recorder = smtp.recorder


class SmtpSandbox(SeparateControl):
    """An SMTP server on ``host:port`` (0 = a free port) plus its HTTP control API on ``control_port``."""

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        control_port: int = 0,
        *,
        auth: tuple[str, str] | None = None,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        hostname: str = "sandbox.smtp.localhost",
        data_size_limit: int = 32 * 1024 * 1024,
    ) -> None:
        if implicit_tls and tls_context is None:
            raise ValueError("implicit_tls needs a tls_context")
        self.faults = SmtpFaultPlan()
        self.recorder = Recorder()
        self.auth = auth
        self.hostname = hostname
        self._tls_context = tls_context
        self._implicit_tls = implicit_tls
        self._data_size_limit = data_size_limit
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._total_connections = 0
        self._open: set[_SMTP] = set()
        self._sock = socket.create_server((host, port))
        self._control = _ControlServer(self, control_port, host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    # -- addresses and counters ------------------------------------------------------------
    @property
    def host(self) -> str:
        return str(self._sock.getsockname()[0])

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def connections(self) -> int:
        """TCP connections accepted since start (not only open ones)."""
        with self._lock:
            return self._total_connections

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "connections": self._total_connections,
                "open_connections": len(self._open),
                "messages": len(self.recorder),
            }

    def _connection_opened(self, proto: _SMTP) -> int:
        with self._lock:
            self._total_connections += 1
            self._open.add(proto)
            return self._total_connections

    def _connection_closed(self, proto: _SMTP) -> None:
        with self._lock:
            self._open.discard(proto)

    # -- aiosmtpd glue ---------------------------------------------------------------------
    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        if self.auth and isinstance(data, LoginPassword):
            user_ok = hmac.compare_digest(data.login, self.auth[0].encode())
            pass_ok = hmac.compare_digest(data.password, self.auth[1].encode())
            if user_ok and pass_ok:
                return AuthResult(success=True, auth_data=data.login.decode("utf-8", "replace"))
        return AuthResult(success=False, handled=False)

    def _factory(self) -> _SMTP:
        proto_cls: type[_SMTP] = type("_SandboxSMTP", (_SMTP,), {"sandbox": self})
        return proto_cls(
            _Handler(self),
            hostname=self.hostname,
            enable_SMTPUTF8=True,
            data_size_limit=self._data_size_limit,
            tls_context=None if self._implicit_tls else self._tls_context,
            # like real servers: AUTH only over TLS when TLS is available
            auth_require_tls=self._tls_context is not None and not self._implicit_tls,
            authenticator=self._authenticate,
            loop=self._loop,
        )

    def _run(self, started: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        started.set()
        self._loop.run_forever()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> SmtpSandbox:
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="smtp-sandbox", daemon=True)
        self._thread.start()
        started.wait()
        ssl_ctx = self._tls_context if self._implicit_tls else None
        fut = asyncio.run_coroutine_threadsafe(
            self._loop.create_server(self._factory, sock=self._sock, ssl=ssl_ctx), self._loop
        )
        self._server = fut.result(timeout=10)
        self._control.start()
        return self

    async def _close_all(self) -> None:
        with self._lock:
            protos = list(self._open)
        for p in protos:
            # abort, not close: a TLS close would wait for the peer's close_notify
            for t in (p.transport, getattr(p, "_original_transport", None)):
                if isinstance(t, asyncio.Transport):
                    t.abort()
        deadline = time.monotonic() + 2
        while self.open_connections and time.monotonic() < deadline:
            await asyncio.sleep(0.001)

    def disconnect_all(self) -> None:
        """Close every open client connection now (like a server restart or idle timeout)."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._close_all(), self._loop).result(timeout=10)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._close_all()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        self._control.stop()
        loop = self._loop
        if loop is not None and self._thread is not None:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=5)
            loop.close()
            self._loop = None
        self._sock.close()

    def __enter__(self) -> SmtpSandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(port: int = 2525, control_port: int = 8025, host: str = "127.0.0.1") -> None:
    """Run the SMTP sandbox in the foreground until interrupted."""
    sb = SmtpSandbox(port=port, host=host, control_port=control_port).start()
    serve_until_interrupted(
        sb,
        f"SMTP sandbox on {sb.host}:{sb.port}, control API at {sb.control_url}/_sandbox/",
        f"  control API token (Authorization: Bearer ...): {sb.control_token}",
    )


if __name__ == "__main__":
    main()
