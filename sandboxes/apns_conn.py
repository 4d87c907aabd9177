"""One client connection to the APNs sandbox (``sandboxes.apns``): an h2 server state machine fed
from the socket. It reads each stream's request, applies the sandbox's faults (delay, drop,
GOAWAY, a status), asks the sandbox to check and record the push, and answers as APNs does."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings


class ApnsConnection(asyncio.Protocol):
    """One client connection: an h2 server state machine fed from the socket."""

    def __init__(self, sandbox: Any) -> None:  # the ApnsSandbox (typed loosely: it imports this module)
        self.sb = sandbox
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        self.closed = False
        self.last_answered = 0
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.sb._conns.add(self)
        self.h2.initiate_connection()
        self.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.sb.max_streams})
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.sb._conns.discard(self)
        if not self.lost.done():
            self.lost.set_result(None)

    def _flush(self) -> None:
        if not self.closed and self.transport is not None:
            data = self.h2.data_to_send()
            if data:
                self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            self.abort()
            return
        for ev in events:
            if self.closed:
                return
            if isinstance(ev, h2.events.RequestReceived):
                self.streams[ev.stream_id] = (dict(ev.headers or []), bytearray())  # type: ignore[arg-type]
            elif isinstance(ev, h2.events.DataReceived):
                entry = self.streams.get(ev.stream_id)
                if entry is not None:
                    entry[1].extend(ev.data or b"")
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                entry = self.streams.pop(ev.stream_id, None)
                if entry is not None:
                    self._request(ev.stream_id, entry[0], bytes(entry[1]))
            elif isinstance(ev, h2.events.StreamReset):
                self.streams.pop(ev.stream_id, None)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.closed = True
                if self.transport:
                    self.transport.close()
                return
        self._flush()

    def abort(self) -> None:
        """TCP reset: answers still in flight may be lost, as on a real network."""
        self._flush()
        self.closed = True
        if self.transport:
            self.transport.abort()

    def cut(self) -> None:
        """The server goes away: what it already wrote still arrives, then FIN (no GOAWAY, no
        TLS close_notify) and nothing more is read or answered."""
        self._flush()
        self.closed = True
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.transport.abort()
            return
        asyncio.get_running_loop().call_later(2.0, self.transport.abort)  # if the peer never closes

    def goaway(self, reason: str) -> None:
        self.h2.close_connection(
            last_stream_id=self.last_answered, additional_data=json.dumps({"reason": reason}).encode()
        )
        self.cut()

    def _request(self, stream_id: int, headers: dict[str, str], body: bytes) -> None:
        self.sb.requests.append(headers.get(":path", ""))
        self.sb.request_auth.append(headers.get("authorization", ""))
        auth = headers.get("authorization", "")
        fault = self.sb.faults.take(
            headers.get(":path", "") + body.decode("utf-8", "replace"),
            lambda f: "jwt" not in f or auth == f"bearer {f['jwt']}",
        )
        if fault and fault.get("delay"):
            self.sb.held += 1
            self.sb.peak_held = max(self.sb.peak_held, self.sb.held)
            asyncio.get_running_loop().call_later(
                float(fault["delay"]), self._answer_later, stream_id, headers, body, fault
            )
            return
        self._answer(stream_id, headers, body, fault)

    def _answer_later(self, stream_id: int, headers: dict[str, str], body: bytes, fault: Any) -> None:
        self.sb.held -= 1
        if not self.closed:
            self._answer(stream_id, headers, body, fault)
            self._flush()

    def _answer(self, stream_id: int, headers: dict[str, str], body: bytes, fault: dict[str, Any] | None) -> None:
        if fault and fault.get("drop"):
            if fault["drop"] == "reset":
                self.abort()
            else:
                self.cut()
            return
        if fault and fault.get("goaway"):
            reason = fault["goaway"] if isinstance(fault["goaway"], str) else "Shutdown"
            self.goaway(reason)
            return
        extra: dict[str, str] = {}
        if fault and fault.get("status"):
            status, reason = int(fault["status"]), str(fault.get("reason") or "InternalServerError")
            extra = {str(k).lower(): str(v) for k, v in (fault.get("headers") or {}).items()}
            fbody = fault.get("body")
            if fbody is not None:
                raw = fbody.encode() if isinstance(fbody, str) else json.dumps(fbody).encode()
                self._respond(stream_id, status, headers, raw, extra)
                return
        else:
            status, reason = self.sb._check(headers, body)
        if status == 200:
            apns_id = headers.get("apns-id") or str(uuid.uuid4()).upper()
            self.sb._record(headers, body, apns_id)
            self._respond(stream_id, 200, headers, b"", {"apns-id": apns_id, **extra})
            return
        err: dict[str, Any] = {"reason": reason}
        if status == 410:
            err["timestamp"] = int(time.time() * 1000)
        self._respond(stream_id, status, headers, json.dumps(err).encode(), extra)

    def _respond(self, stream_id: int, status: int, req: dict[str, str], body: bytes, extra: dict[str, str]) -> None:
        out = [(":status", str(status))]
        if "apns-id" not in extra:
            out.append(("apns-id", req.get("apns-id") or str(uuid.uuid4()).upper()))
        out += list(extra.items())
        if body:
            out += [("content-type", "application/json; charset=utf-8"), ("content-length", str(len(body)))]
        try:
            self.h2.send_headers(stream_id, out, end_stream=not body)
            if body:
                self.h2.send_data(stream_id, body, end_stream=True)
        except h2.exceptions.ProtocolError:
            return  # the client reset that stream meanwhile
        self.last_answered = max(self.last_answered, stream_id)
