"""The test harness's own promises: a ClosedPort refuses, ReservedPorts can be handed to a server and
to no one else, and a sandbox says nothing when a client hangs up on it."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from sandboxes.base import HttpSandbox
from tests.net import ClosedPort, ReservedPorts


def _request_threads() -> list[threading.Thread]:
    # alive only: a thread in the middle of start() is listed before it can be joined
    return [t for t in threading.enumerate() if "process_request_thread" in t.name and t.is_alive()]


def test_closed_port_refuses_and_cannot_be_taken() -> None:
    with ClosedPort() as closed:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", closed.port), timeout=10)
        other = socket.socket()
        with pytest.raises(OSError, match="in use"):
            other.bind(("127.0.0.1", closed.port))
        other.close()


def test_reserved_ports_go_to_the_server_they_are_handed_to() -> None:
    with ReservedPorts(3) as ports:
        intruder = socket.socket()
        with pytest.raises(OSError, match="in use"):
            intruder.bind(("127.0.0.1", ports.base + 1))
        intruder.close()
        with HttpSandbox(port=ports.base + 2) as sb:
            assert sb.port == ports.base + 2
            with socket.create_connection(("127.0.0.1", sb.port), timeout=10) as c:
                c.sendall(b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert c.recv(100).startswith(b"HTTP/1.1 404")


def test_sandbox_is_quiet_when_a_client_resets_the_connection(capfd: pytest.CaptureFixture[str]) -> None:
    with HttpSandbox() as sb:
        before = set(_request_threads())
        c = socket.create_connection(("127.0.0.1", sb.port), timeout=10)
        c.sendall(b"GET /half-a-request")  # the server waits for the rest of the line
        deadline = time.monotonic() + 30
        while not set(_request_threads()) - before:
            assert time.monotonic() < deadline, "the sandbox never took the connection"
            time.sleep(0.01)
        handler = (set(_request_threads()) - before).pop()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # RST: the server's read fails with ConnectionResetError
        handler.join(30)
        assert not handler.is_alive()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ConnectionResetError" not in err, err
