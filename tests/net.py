"""Ports and servers for tests that need a real socket, without races on a busy machine.

- ``ClosedPort``: a port this test holds bound but not listening. A connection to it is refused at
  once, and nothing else can listen there while the test holds it (unlike 127.0.0.1:1 or :9, which
  some machine may serve, or a port bound, released and hoped to stay free).
- ``ReservedPorts``: ``n`` consecutive ports held bound with ``SO_REUSEADDR`` and not listening, to
  hand to a server that must be told its port in advance (``sandbox --base-port``). A server that
  binds with ``SO_REUSEADDR`` (ours, uvicorn, asyncio) can listen on them; no one else is given
  them while they are held.
- ``listening(port)``: whether something accepts connections on 127.0.0.1:``port``.
- ``ServeProcess``: ``notifyctl serve --port 0`` as a real subprocess; its port is the one uvicorn
  reports it is listening on, so no port is ever guessed.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"Uvicorn running on http://[^:]+:(\d+)")


def listening(port: int) -> bool:
    """Whether a server accepts connections on 127.0.0.1:``port`` now."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def interrupt(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """Ctrl-C's SIGINT to ``proc``, then its output once it has exited. A process still running
    ``timeout`` seconds later fails the test, killed and reaped first: never left running after it."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"still running {timeout:g} s after SIGINT (killed):\n{out[-2000:]}\n{err[-2000:]}"
        ) from None


class ClosedPort:
    """A 127.0.0.1 port held bound, never listening: connecting is refused, and it stays that way
    until ``close()`` (use as a context manager)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ClosedPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReservedPorts:
    """``n`` consecutive 127.0.0.1 ports, ``base`` to ``base + n - 1``, held (bound with
    ``SO_REUSEADDR``, not listening) until ``close()``. Only a server that binds them with
    ``SO_REUSEADDR`` too can listen on them meanwhile."""

    def __init__(self, n: int, attempts: int = 50) -> None:
        for _ in range(attempts):
            held: list[socket.socket] = []
            try:
                first = self._hold(0)
                held.append(first)
                base = first.getsockname()[1]
                if base + n - 1 > 65535:
                    raise OSError("range past 65535")
                for i in range(1, n):
                    held.append(self._hold(base + i))
            except OSError:
                for s in held:
                    s.close()
                continue
            self.base: int = base
            self._held = held
            return
        raise RuntimeError(f"could not hold {n} consecutive ports in {attempts} attempts")

    @staticmethod
    def _hold(port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            raise
        return s

    def close(self) -> None:
        for s in self._held:
            s.close()

    def __enter__(self) -> ReservedPorts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ServeProcess:
    """``notifyctl serve --port 0`` in a subprocess with ``env``; ``url`` once ``/healthz`` answers.

    stderr is collected in ``stderr_text()`` (a thread drains it, so the server never blocks on a
    full pipe). ``wait_for_stderr(text)`` waits for a line, for log assertions."""

    def __init__(self, env: Mapping[str, str], *args: str, start_timeout: float = 60, health: int = 200) -> None:
        self.env = dict(env)
        self.health = health  # what /healthz answers once serving (503 with a Redis shard down)
        self.args = args
        self.start_timeout = start_timeout
        self.url = ""
        self.port = 0
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self.proc: subprocess.Popen[str] | None = None

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def stderr_text(self) -> str:
        with self._cond:
            return "".join(self._lines)

    def wait_for_stderr(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """The first match of ``pattern`` in stderr, waiting up to ``timeout`` s for it to appear."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search("".join(self._lines))
                if m:
                    return m
                left = deadline - time.monotonic()
                exited = self.proc is not None and self.proc.poll() is not None
                if left <= 0 or exited:
                    raise AssertionError(f"no {pattern!r} in serve's stderr:\n" + "".join(self._lines)[-3000:])
                self._cond.wait(min(left, 0.5))

    def __enter__(self) -> ServeProcess:
        env = {k: v for k, v in self.env.items()}
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "notifyctl.cli.main", "serve", "--port", "0", *self.args],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._drain, name="serve-stderr", daemon=True).start()
        try:
            self.port = int(self.wait_for_stderr(_LISTENING.pattern, self.start_timeout).group(1))
            self.url = f"http://127.0.0.1:{self.port}"
            # listening is not serving yet only in theory; one request proves it
            assert httpx.get(f"{self.url}/healthz", timeout=30).status_code == self.health
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
