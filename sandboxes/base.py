"""Shared plumbing for the HTTP sandboxes: a threaded server on 127.0.0.1, a record of every
accepted message, and a fault plan.

Faults are consumed in order. A fault is a dict with any of:

- ``status`` (int) and ``body`` (str or JSON-able) and ``headers`` (dict): answer this instead
- ``delay`` (float seconds): sleep before answering (with or without a status)
- ``drop`` (bool): close the connection without answering
- ``count`` (int, default 1): how many requests it applies to; ``-1`` = until cleared
- ``match`` (str): only requests whose path or body contains this substring

Every sandbox also serves a small control API on its own port, so another process
(``notifyctl sandbox``, the chaos suite) can drive it:

- ``GET /_sandbox/messages`` → JSON list of accepted messages
- ``DELETE /_sandbox/messages`` → forget them
- ``POST /_sandbox/faults`` with a JSON fault (or list of faults) → queue them
- ``DELETE /_sandbox/faults`` → clear all faults

The control API reads what was sent (OTPs included) and injects faults, so it needs the sandbox's
token: ``Authorization: Bearer <token>``, else 401. Each sandbox makes its own at random
(``control_token``; ``control_headers`` is the header to send); ``notifyctl sandbox`` gives all of
its sandboxes one and writes it to its env file as ``NOTIFY_SANDBOX_TOKEN``. In-process users
(tests, the chaos suite, the bench) can also use ``faults`` and ``recorder`` directly.
"""

from __future__ import annotations

import hmac
import json
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


def new_control_token() -> str:
    return secrets.token_urlsafe(24)


def control_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class FaultPlan:
    def __init__(self) -> None:
        self._faults: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def add(self, fault: dict[str, Any] | list[dict[str, Any]]) -> None:
        faults = fault if isinstance(fault, list) else [fault]
        with self._lock:
            for f in faults:
                self._faults.append({"count": 1, **f})

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def pending(self) -> int:
        """Faults not yet (fully) consumed."""
        with self._lock:
            return len(self._faults)

    def take(self, text: str = "", where: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any] | None:
        """The next fault that applies to a request whose path+body is ``text`` (and that ``where``
        accepts, for sandboxes whose faults have more dimensions), consuming one use."""
        with self._lock:
            for i, f in enumerate(self._faults):
                if where is not None and not where(f):
                    continue
                if f.get("match") and f["match"] not in text:
                    continue
                if f["count"] > 0:
                    f["count"] -= 1
                    if f["count"] == 0:
                        del self._faults[i]
                return dict(f)
        return None


class Recorder:
    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def add(self, item: dict[str, Any]) -> None:
        with self._lock:
            self._items.append(item)

    def add_batch(self, n: int, build: Callable[[], Iterable[dict[str, Any]]]) -> None:
        """The ``n`` records of one request (a SendGrid request's recipients), made by ``build``
        only for a recorder that keeps them: one that only counts (a benchmark's) skips the work."""
        for item in build():
            self.add(item)

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class SandboxHandler(BaseHTTPRequestHandler):
    """Base handler: answers the control API; subclasses implement ``handle_api(method, path, body)``
    returning ``(status, headers, body_bytes)``."""

    protocol_version = "HTTP/1.1"
    sandbox: HttpSandbox  # set on the subclass by HttpSandbox

    def setup(self) -> None:
        super().setup()
        # Without this, each keep-alive answer waits ~40 ms for the client's delayed ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by default
        pass

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _dispatch(self, method: str) -> None:
        sb = self.sandbox
        with sb._active_lock:
            sb.active += 1
            sb.peak_active = max(sb.peak_active, sb.active)
        try:
            self._dispatch_counted(method)
        finally:
            with sb._active_lock:
                sb.active -= 1

    def _dispatch_counted(self, method: str) -> None:
        body = self._read_body()
        if self.path.startswith("/_sandbox/"):
            self._guarded_control(method, body)
            return
        fault = self.sandbox.faults.take(self.path + body.decode("utf-8", "replace"))
        if fault and self._answer_fault(fault):
            return
        status, headers, out = self.handle_api(method, self.path, body)
        self._reply(status, headers, out)

    def _answer_fault(self, fault: dict[str, Any]) -> bool:
        """Act on the fault taken for this request: wait its ``delay``, then drop the connection or
        answer with its ``status``. True when the request is dealt with (else the API answers it)."""
        if fault.get("delay"):
            time.sleep(float(fault["delay"]))
        if fault.get("drop"):
            self.close_connection = True
            self.connection.close()
            return True
        if fault.get("status"):
            fbody = fault.get("body", "")
            raw = fbody.encode() if isinstance(fbody, str) else json.dumps(fbody).encode()
            headers = {"Content-Type": "application/json", **fault.get("headers", {})}
            self._reply(int(fault["status"]), headers, raw)
            return True
        return False

    def control_authorized(self) -> bool:
        """Whether the request carries the sandbox's control token (``Authorization: Bearer``)."""
        got = (self.headers.get("Authorization") or "").encode("utf-8", "replace")
        return hmac.compare_digest(got, f"Bearer {self.sandbox.control_token}".encode())

    def _guarded_control(self, method: str, body: bytes) -> None:
        """Every control request comes through here: without the token, 401 and nothing done."""
        if not self.control_authorized():
            self._reply(
                401,
                {"Content-Type": "text/plain", "WWW-Authenticate": 'Bearer realm="sandbox control"'},
                b"sandbox control API: send Authorization: Bearer <the sandbox's token> (NOTIFY_SANDBOX_TOKEN)\n",
            )
            return
        self._control(method, body)

    def _control(self, method: str, body: bytes) -> None:
        """The control endpoints (the token was checked): subclasses add theirs, then call this."""
        sb = self.sandbox
        path = self.path.split("?")[0]
        if path == "/_sandbox/messages" and method == "GET":
            self._reply(200, {"Content-Type": "application/json"}, json.dumps(sb.recorder.all()).encode())
        elif path == "/_sandbox/messages" and method == "DELETE":
            sb.recorder.clear()
            self._reply(204, {}, b"")
        elif path == "/_sandbox/faults" and method == "POST":
            try:
                sb.faults.add(json.loads(body or b"null"))
            except (ValueError, TypeError, AttributeError) as exc:
                self._reply(400, {"Content-Type": "text/plain"}, f"bad fault: {exc}".encode())
                return
            self._reply(204, {}, b"")
        elif path == "/_sandbox/faults" and method == "DELETE":
            sb.faults.clear()
            self._reply(204, {}, b"")
        else:
            self._reply(404, {}, b"")

    def handle_api(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        return 404, {}, b""

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # load tests open many connections at once

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-request (a timeout, a dropped test, a load generator that
        # stops) is routine for a sandbox: no traceback on stderr. Anything else is still shown.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class HttpSandbox:
    """Run ``handler_cls`` on ``127.0.0.1:port`` (0 = any free port) in a background thread.

    Use as a context manager, or ``start()``/``stop()``. ``url`` is the base URL.
    """

    handler_cls: type[SandboxHandler] = SandboxHandler
    poll_interval = 0.5  # seconds between the server's looks for shutdown: how long stop() may take

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.faults = FaultPlan()
        self.recorder = Recorder()
        self.control_token = new_control_token()
        # requests being handled right now, and the most at once (how many a client had in flight)
        self.active = 0
        self.peak_active = 0
        self._active_lock = threading.Lock()
        handler = type(self.handler_cls.__name__, (self.handler_cls,), {"sandbox": self})
        self._server = _Server((host, port), handler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def control_headers(self) -> dict[str, str]:
        """The header a control API request needs."""
        return control_headers(self.control_token)

    def start(self) -> Self:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": self.poll_interval}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SeparateControl:
    """For a sandbox whose own protocol is not HTTP (APNs' HTTP/2, SMTP): its control API is an
    ``HttpSandbox`` of its own (``_control``), on a port of its own."""

    _control: HttpSandbox

    @property
    def control_url(self) -> str:
        return self._control.url

    @property
    def control_token(self) -> str:
        """The control API's token (see :mod:`sandboxes.base`)."""
        return self._control.control_token

    @control_token.setter
    def control_token(self, token: str) -> None:
        self._control.control_token = token

    @property
    def control_headers(self) -> dict[str, str]:
        return self._control.control_headers


class ApiHandler(SandboxHandler):
    """Hands each API request (not the control API's) to the sandbox's ``api(method, path, headers,
    body)``, counted by ``ApiSandbox``."""

    sandbox: ApiSandbox

    def _dispatch(self, method: str) -> None:
        if self.path.startswith("/_sandbox/"):
            super()._dispatch(method)
            return
        sb = self.sandbox
        sb._enter(self.client_address)
        try:
            super()._dispatch(method)
        finally:
            sb._leave()

    def handle_api(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        return self.sandbox.api(method, path, dict(self.headers.items()), body)


class ApiSandbox(HttpSandbox):
    """An ``HttpSandbox`` whose API is one method, ``api(method, path, headers, body)``, and which
    counts its API requests: ``api_requests`` (faulted ones too), ``connections`` (the client
    addresses seen), ``in_flight`` and ``max_in_flight`` (the most at once, as a client had them).
    Its server polls for shutdown every 50 ms, so that ``stop()`` returns quickly."""

    handler_cls: type[SandboxHandler] = ApiHandler
    poll_interval = 0.05

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        super().__init__(port, host)
        self.api_requests = 0
        self.connections: set[tuple[str, int]] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self._stats_lock = threading.Lock()

    def _enter(self, client: tuple[str, int]) -> None:
        with self._stats_lock:
            self.api_requests += 1
            self.connections.add(client)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._stats_lock:
            self.in_flight -= 1

    def api(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        """``(status, headers, body)`` for one API request."""
        raise NotImplementedError


def serve_until_interrupted(sb: Any, *lines: str) -> None:
    """For a sandbox run in the foreground: ``sb`` (started) says where it is (``lines``), serves
    until Ctrl-C, then stops."""
    try:
        for line in lines:
            print(line, flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        sb.stop()
