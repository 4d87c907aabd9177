"""One module: the push providers' HTTP/2 transport, one job: many requests at once over a few
multiplexed connections, and several providers' batches driven together by one thread; ~550 lines.

Many HTTP requests at once over a few multiplexed HTTP/2 connections, for the push providers.

APNs and FCM v1 take one HTTP/2 request per message. ``Mux.run`` sends a whole batch of them
concurrently as streams over at most ``connections`` long-lived connections (up to
``max_streams`` streams each, and never more than the server's ``MAX_CONCURRENT_STREAMS``) and
blocks until every request has an answer or has failed. No thread per request, no event loop:
the work is done by libcurl (through ``pycurl``), which frames, HPACK-encodes, encrypts and
multiplexes in C, with nghttp2. Chosen by measurement against a C HTTP/2 sink (nginx), side by
side with h2, jh2, uvloop, pyreqwest and aioapns: see ``bench/RESULTS.md``.

What the providers build on:

- an ``Answer`` (status, response headers with lower-case names, body) for every request the
  server answered, whatever the status;
- a ``Failure`` otherwise, with ``kind``:
  ``"invalid"`` — the request could not be framed (a header that is not text): never sent;
  ``"connection"`` — the connection could not be opened, or ended (reset, FIN, GOAWAY) before
  this stream was answered: the server never answered it, so it is safe to send again;
  ``"timeout"`` — no answer within ``timeout`` (the stream is reset, the connection kept): the
  server may have taken it, so it is not safe to send again.
- ``connects``: connections opened so far (a connection cut while idle is reopened on the next
  request; libcurl checks a connection is alive before reusing it).

Writes are coalesced (Linux): libcurl frames and ``send``s each request on its own (one TLS
record, and uncorked one TCP segment and one wake-up of the server per request); the
connections' sockets are corked (``TCP_CORK``) and uncorked after each round of libcurl's work, so
a round's requests leave as full segments, none later than the end of its round. 20,000 APNs
requests to nginx: the server's ``epoll_wait`` calls 7,282 → 170, ``read`` 16,607 → 1,460; nginx
CPU per request 21.5 → 13.0 µs (best of 5, load ~6). A connection the server closed between runs
is shut down before the next (``Mux._shut_closed``), so that libcurl opens another.

One ``Mux`` is used by one thread at a time (``run`` holds a lock); the providers own theirs.
``run_together`` drives several Muxes' requests at once from one thread (a batch's iOS and Android
pushes), and a provider's ``steps`` (``Steps``: each round of requests yielded with its Mux) lets
the pipeline put several providers' rounds under way together (``drive_together``).
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pycurl

# libcurl's errors for a connection that could not be opened or died under the stream
_CONNECT_ERRORS = frozenset(
    {
        pycurl.E_COULDNT_CONNECT,
        pycurl.E_COULDNT_RESOLVE_HOST,
        pycurl.E_SSL_CONNECT_ERROR,
        pycurl.E_PEER_FAILED_VERIFICATION,
        pycurl.E_SSL_CACERT_BADFILE,
    }
)
_TIMEOUT = pycurl.E_OPERATION_TIMEDOUT
_SOCKOPT_OK: int = pycurl.SOCKOPT_OK
T = TypeVar("T")
_IDLE_REUSE_S = 3600  # keep idle connections (libcurl's default drops them after 118 s idle)
_TCP_CORK: int = getattr(socket, "TCP_CORK", 0)  # Linux (with select.POLLRDHUP); 0: none
# libcurl gives every handle a 64 KiB upload buffer (its default) once it first sends a body: for
# a batch's 1,000 handles 64 MB, touched page by page, for bodies of at most a few KiB. Its minimum,
# 16 KiB, takes a body of any size all the same (in more pieces). First batch of 1,000 APNs
# requests to nginx: page faults 16,033 -> 6,032, peak RSS 161 -> 122 MB, CPU 68 -> 51 ms, per Mux
# (a pool worker of the mix has two); later batches unchanged (bare loop A/B).
_UPLOAD_BUFFER = 16 * 1024


def system_ca() -> tuple[str | None, str | None]:
    """(CA bundle file, CA directory) of this system, as Python's ``ssl`` finds them: the trust
    store for a real APNs or FCM. The libcurl in pycurl's wheels looks for a bundle where Red Hat
    keeps it (``/etc/pki/tls/certs/ca-bundle.crt``), which Debian has not: it is told where."""
    paths = ssl.get_default_verify_paths()
    cafile: str | None = os.environ.get(paths.openssl_cafile_env) or paths.cafile
    capath: str | None = os.environ.get(paths.openssl_capath_env) or paths.capath
    cafile = cafile if cafile and os.path.isfile(cafile) else None
    capath = capath if capath and os.path.isdir(capath) else None
    if cafile is None and capath is None:
        import certifi  # installed with httpx, which requires it

        cafile = certifi.where()
    return cafile, capath


@contextmanager
def _fd_socket(fd: int) -> Iterator[socket.socket]:
    """A socket object over libcurl's descriptor, for a ``setsockopt``; never closes it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    try:
        yield sock
    finally:
        sock.detach()


@dataclass(slots=True)
class Request:
    """One POST. ``headers``: ``"name: value"`` lines (lower-case names for HTTP/2)."""

    url: str
    headers: list[str]
    body: bytes


class Answer:
    """The server's answer. ``headers`` (lower-case names) are parsed on first use: a push that
    went through needs none of them but its ``apns-id``."""

    __slots__ = ("status", "body", "http_version", "_raw", "_headers")

    def __init__(self, status: int, raw: list[bytes] | dict[str, str], body: bytes, http_version: int = 2) -> None:
        self.status, self.body, self.http_version = status, body, http_version
        self._raw = raw if isinstance(raw, list) else []
        self._headers = raw if isinstance(raw, dict) else None

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            headers: dict[str, str] = {}
            for line in self._raw[1:]:  # after the status line
                name, sep, value = line.partition(b":")
                if sep:
                    headers[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
            self._headers = headers
        return self._headers

    def header(self, name: bytes) -> str | None:
        """One header (``name`` lower-case, as bytes) without parsing the others."""
        if self._headers is not None:
            return self._headers.get(name.decode())
        n = len(name)
        for line in self._raw:
            if line[n : n + 1] == b":" and line[:n].lower() == name:
                return line[n + 1 :].decode("latin-1").strip()
        return None

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.headers!r}, {self.body!r})"


@dataclass(slots=True)
class Failure:
    kind: str  # "connection" | "timeout"
    detail: str


Result = Answer | Failure


class _Slot:
    """A reusable easy handle and what its current transfer has received."""

    __slots__ = ("curl", "index", "head", "body")

    def __init__(self, curl: Any) -> None:
        self.curl = curl
        self.index = 0
        self.head: list[bytes] = []
        self.body: list[bytes] = []

    def response_head(self) -> list[bytes]:
        """The header lines of the last response received (after a 1xx, the final one's)."""
        head = self.head
        if not head or head[0][head[0].find(b" ") + 1 :][:1] != b"1":
            return head[:]  # no interim response (nearly always): the lines are the answer's own
        for i in range(len(head) - 1, 0, -1):
            if head[i][:5] == b"HTTP/":
                return head[i:]
        return head[:]


class _Run:
    """One Mux's requests under way in ``run_together``: a result per request, in order."""

    __slots__ = ("mux", "results", "by_curl", "left")

    def __init__(self, mux: Mux, n: int) -> None:
        self.mux = mux
        self.results: list[Result | None] = [None] * n
        self.by_curl: dict[int, _Slot] = {}
        self.left = 0


def run_together(jobs: Sequence[tuple[Mux, Sequence[Request]]]) -> list[list[Result]]:
    """Each Mux's requests (one Mux once at most), all under way at the same time and driven by
    this thread alone: one libcurl round per Mux in turn, then one wait on all their sockets.
    A batch's iOS and Android pushes go together this way, with no second thread contending for
    the GIL in libcurl's callbacks (the send alone, 500 APNs + 500 FCM requests a batch to nginx,
    alternating rounds on a shared machine at load 5-18: two threads took +2.7, +2.2 and -1.7 µs
    of CPU per push against one, within the noise, and sent each batch slower). One result list
    per job, in order."""
    muxes = [mux for mux, _ in jobs]
    if len({id(m) for m in muxes}) != len(muxes):
        raise ValueError("run_together: one Mux appears twice")
    locks = sorted(muxes, key=id)  # a fixed order: two callers of the same Muxes never deadlock
    taken: list[Mux] = []
    runs: list[_Run] = []
    try:
        for mux in locks:
            mux._lock.acquire()
            taken.append(mux)
            if mux._closed:
                raise RuntimeError("closed")
        runs = [mux._start(requests) for mux, requests in jobs]
        active = [r for r in runs if r.left]
        while active:
            running = [r for r in active if r.mux._step(r) and r.left]
            active = [r for r in active if r.left]
            if not running:
                continue
            if len(running) == 1:
                running[0].mux._multi.select(1.0)
            else:
                _wait(running)
    finally:
        for run in runs:
            if run.left:
                run.mux._abandon(run)
        for mux in taken:
            mux._lock.release()
    return [run.results for run in runs]  # type: ignore[misc]


def _wait(runs: list[_Run]) -> None:
    """Until a socket of any of these Muxes is ready, or the soonest of their libcurl timers (at
    most 1 s, as ``CurlMulti.select``)."""
    rd: list[int] = []
    wr: list[int] = []
    ex: list[int] = []
    timeout = 1.0
    for run in runs:
        multi = run.mux._multi
        r, w, x = multi.fdset()
        rd += r
        wr += w
        ex += x
        ms = multi.timeout()
        if 0 <= ms < timeout * 1000:
            timeout = ms / 1000
    if timeout <= 0:
        return
    if rd or wr or ex:
        select.select(rd, wr, ex, timeout)
    else:
        time.sleep(min(timeout, 0.01))  # nothing to wait on yet (resolving): a short nap


class Mux:
    """See the module docstring. ``http2``: ``"required"`` (APNs: HTTP/2 over TLS only; an HTTP/1.1
    answer is a connection failure), ``"preferred"`` (FCM: HTTP/2 when the server offers it,
    else HTTP/1.1 with up to ``connections`` connections), ``"never"`` (HTTP/1.1)."""

    def __init__(
        self,
        *,
        ca_file: str | None = None,
        connections: int = 2,
        max_streams: int = 1000,
        timeout: float = 10.0,
        connect_timeout: float = 10.0,
        http2: str = "required",
        user_agent: str | None = None,
        cork: bool = True,
    ) -> None:
        # ``ca_file``: the only CA trusted (a local sandbox's); else the system's trust store
        self.ca_file, self.ca_path = (ca_file, None) if ca_file else system_ca()
        self.timeout_ms = max(1, int(timeout * 1000))
        self.connect_timeout_ms = max(1, int(connect_timeout * 1000))
        self.http2_required = http2 == "required"
        self.http_version = pycurl.CURL_HTTP_VERSION_1_1 if http2 == "never" else pycurl.CURL_HTTP_VERSION_2TLS
        # "preferred": wait to learn whether the first connection multiplexes before opening more
        # (HTTP/2: streams on few connections; HTTP/1.1: then up to ``connections``). "required"
        # opens its ``connections`` at once, and spreads the streams over them.
        self.pipewait = http2 == "preferred"
        self.user_agent = user_agent
        self.connects = 0
        self._lock = threading.Lock()
        self._multi = pycurl.CurlMulti()
        self._multi.setopt(pycurl.M_PIPELINING, pycurl.PIPE_MULTIPLEX)
        self._multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, connections)
        self._multi.setopt(pycurl.M_MAX_CONCURRENT_STREAMS, max_streams)
        self._free: list[_Slot] = []
        self._all: list[_Slot] = []
        self._closed = False
        # the connections' sockets, corked (``_flush``): descriptor → inode, while libcurl has them
        self.cork = cork and _TCP_CORK != 0 and hasattr(select, "POLLRDHUP")
        self._socks: dict[int, int] = {}

    def _slot(self) -> _Slot:
        if self._free:
            return self._free.pop()
        c = pycurl.Curl()
        slot = _Slot(c)
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.HTTP_VERSION, self.http_version)
        if self.pipewait:
            c.setopt(pycurl.PIPEWAIT, 1)
        if self.ca_file:
            c.setopt(pycurl.CAINFO, self.ca_file)
        if self.ca_path:
            c.setopt(pycurl.CAPATH, self.ca_path)
        c.setopt(pycurl.TIMEOUT_MS, self.timeout_ms)
        c.setopt(pycurl.CONNECTTIMEOUT_MS, self.connect_timeout_ms)
        c.setopt(pycurl.MAXAGE_CONN, _IDLE_REUSE_S)
        c.setopt(pycurl.TCP_NODELAY, 1)
        c.setopt(pycurl.UPLOAD_BUFFERSIZE, _UPLOAD_BUFFER)
        if self.user_agent:
            c.setopt(pycurl.USERAGENT, self.user_agent)
        # a builtin as the callbacks (no Python frame per header line or body chunk): a response's
        # lines are only split from an earlier 1xx's when it is read (``_Slot.response_head``)
        c.setopt(pycurl.HEADERFUNCTION, slot.head.append)
        c.setopt(pycurl.WRITEFUNCTION, slot.body.append)
        if self.cork:
            c.setopt(pycurl.SOCKOPTFUNCTION, self._opened)
        self._all.append(slot)
        return slot

    def run(self, requests: Sequence[Request]) -> list[Result]:
        """Send every request concurrently; one result per request, in order."""
        return run_together([(self, requests)])[0]

    def _start(self, requests: Sequence[Request]) -> _Run:
        """Put ``requests`` on this Mux's multi handle (none is sent yet: ``_drive``)."""
        run = _Run(self, len(requests))
        results, by_curl, free = run.results, run.by_curl, self._free
        multi = self._multi
        if self._socks:
            self._shut_closed()
        for i, r in enumerate(requests):
            slot = free.pop() if free else self._slot()
            slot.index = i
            slot.head.clear()
            slot.body.clear()
            c = slot.curl
            try:
                c.setopt(pycurl.URL, r.url)
                c.setopt(pycurl.HTTPHEADER, r.headers)
                c.setopt(pycurl.POSTFIELDS, r.body)
            except (pycurl.error, TypeError, ValueError) as exc:  # one request we cannot frame
                results[i] = Failure("invalid", f"{type(exc).__name__}: {exc}")
                free.append(slot)
                continue
            multi.add_handle(c)
            by_curl[id(c)] = slot
            run.left += 1
        return run

    def _step(self, run: _Run) -> bool:
        """One round of libcurl's work on this Mux's transfers, and what it finished; whether
        some transfer is still running."""
        multi = self._multi
        _ret, running = multi.perform()
        if self._socks:
            self._flush()  # what this round framed goes out now, together
        results, by_curl = run.results, run.by_curl
        while True:
            queued, done, failed = multi.info_read()
            for c in done:
                slot = by_curl[id(c)]
                results[slot.index] = self._answer(slot)
                run.left -= 1
                self._release(slot)
            for c, errno, message in failed:
                slot = by_curl[id(c)]
                results[slot.index] = self._failure(slot, errno, message)
                run.left -= 1
                self._release(slot)
            if not queued:
                break
        return bool(running)

    def _abandon(self, run: _Run) -> None:
        """Interrupted (KeyboardInterrupt...): leave no transfer behind."""
        for slot in list(run.by_curl.values()):
            if run.results[slot.index] is None:
                run.results[slot.index] = Failure("connection", "interrupted")
                self._release(slot)
        run.left = 0

    def _opened(self, fd: int, purpose: int) -> int:
        """libcurl's socket-option callback: a connection's socket is corked (``_flush``)."""
        if purpose == pycurl.SOCKTYPE_IPCXN:
            with _fd_socket(fd) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 1)
            self._socks[fd] = os.fstat(fd).st_ino
        return _SOCKOPT_OK

    def _flush(self) -> None:
        """Send what libcurl has written to the corked sockets, as full segments: libcurl writes
        each request as it frames it (one TLS record, one ``send``), and uncorked each would go as
        a segment of its own, with a wake-up of the server for each (nginx: epoll_wait 7,282 →
        170, read 16,607 → 1,460, for 20,000 requests). A socket libcurl has closed since (its
        descriptor gone, or another socket's now: another inode) is forgotten, never touched."""
        for fd, ino in list(self._socks.items()):
            try:
                if os.fstat(fd).st_ino != ino:
                    raise FileNotFoundError
                with _fd_socket(fd) as sock:
                    sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 0)  # uncorking sends what waits
                    sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 1)
            except OSError:
                del self._socks[fd]

    def _shut_closed(self) -> None:
        """Shut down the connections the server has closed since the last ``run`` (an idle
        connection cut with a FIN, no GOAWAY), so that libcurl's check before reuse finds them
        dead and opens others. libcurl sees only a readable socket and would frame a whole round
        of streams onto it, corked, none of them answered; uncorked, the first ``send`` had the
        server's reset back before the next."""
        for fd, ino in list(self._socks.items()):
            try:
                if os.fstat(fd).st_ino != ino:
                    raise FileNotFoundError
                poll = select.poll()
                poll.register(fd, select.POLLRDHUP)
                if poll.poll(0):
                    with _fd_socket(fd) as sock:
                        sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                del self._socks[fd]

    def _release(self, slot: _Slot) -> None:
        c = slot.curl
        try:
            self.connects += c.getinfo(pycurl.NUM_CONNECTS)
        except pycurl.error:
            pass
        self._multi.remove_handle(c)
        self._free.append(slot)

    def _answer(self, slot: _Slot) -> Result:
        c = slot.curl
        version = c.getinfo(pycurl.INFO_HTTP_VERSION)
        if self.http2_required and version != pycurl.CURL_HTTP_VERSION_2_0:
            return Failure("connection", "server does not speak HTTP/2 (ALPN)")
        return Answer(
            c.getinfo(pycurl.RESPONSE_CODE),
            slot.response_head(),
            b"".join(slot.body),
            2 if version == pycurl.CURL_HTTP_VERSION_2_0 else 1,
        )

    @staticmethod
    def _failure(slot: _Slot, errno: int, message: str) -> Failure:
        if errno == _TIMEOUT and not message.startswith(("Connection timed out", "Resolving timed out")):
            return Failure("timeout", message)
        if errno in _CONNECT_ERRORS or errno == _TIMEOUT:
            return Failure("connection", f"connect failed: {message}")
        return Failure("connection", message or f"libcurl error {errno}")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for slot in self._all:
                slot.curl.close()
            self._all.clear()
            self._free.clear()
            self._multi.close()


# A provider's send as steps (``Provider.steps``): it yields each round of requests with the Mux to
# send them on, is given their results, and returns its outcomes. ``drive`` runs one; ``drive_together``
# several at once in this thread, each round's requests of all of them under way together.
Steps = Generator[tuple[Mux, Sequence[Request]], list[Result], T]


def drive(steps: Steps[T]) -> T:
    """Run one provider's steps to their end, each round on its Mux."""
    try:
        mux, requests = next(steps)
        while True:
            mux, requests = steps.send(mux.run(requests))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def drive_together(all_steps: Sequence[Steps[T]]) -> list[T]:
    """Run several providers' steps at once (each on Muxes of its own), driven by this thread
    alone: each one's round of requests is put under way as soon as it is yielded, beside the
    others' (as ``run_together``), and its results are given back as soon as that round has
    ended, so that its next round (a resend after a GOAWAY or a refused token) waits for no
    other provider's. Their values, in order. A Mux yielded by two steps serves them one after
    the other. An error in one is raised once the others have ended (nothing left under way)."""
    values: list[Any] = [None] * len(all_steps)
    error: BaseException | None = None
    waiting: dict[int, tuple[Mux, Sequence[Request]]] = {}  # yielded, not under way yet
    active: dict[int, _Run] = {}  # under way, its Mux's lock held

    def advance(i: int, results: list[Result] | None) -> None:
        nonlocal error
        try:
            waiting[i] = next(all_steps[i]) if results is None else all_steps[i].send(results)
        except StopIteration as stop:
            values[i] = stop.value
        except BaseException as exc:  # noqa: BLE001 - the first one is raised once all have ended
            error = error or exc

    for i in range(len(all_steps)):
        advance(i, None)
    try:
        while waiting or active:
            busy = {id(run.mux) for run in active.values()}
            for i, (mux, requests) in list(waiting.items()):
                # a Mux under way, or in another thread's hands while ours go on: its turn comes later
                if id(mux) in busy or not mux._lock.acquire(blocking=not active):
                    continue
                del waiting[i]
                try:
                    if mux._closed:
                        raise RuntimeError("closed")
                    active[i] = mux._start(requests)
                except BaseException:
                    mux._lock.release()
                    raise
                busy.add(id(mux))
            running: list[_Run] = []
            ended = False
            for i, run in list(active.items()):
                still = run.mux._step(run) if run.left else False
                if run.left:
                    if still:
                        running.append(run)
                    continue
                del active[i]
                run.mux._lock.release()
                advance(i, run.results)  # type: ignore[arg-type]  # (every one set) next round: at once
                ended = True
            if ended or len(running) < len(active):
                continue  # something to start, or libcurl has more to do at once
            if len(running) == 1:
                running[0].mux._multi.select(1.0)
            elif running:
                _wait(running)
    except BaseException:
        for run in active.values():  # interrupted: leave no transfer behind, every step told
            run.mux._abandon(run)
            run.mux._lock.release()
        for i in [*active, *waiting]:
            all_steps[i].close()
        raise
    if error is not None:
        raise error
    return values
