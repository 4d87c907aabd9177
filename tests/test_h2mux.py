"""``worker.providers.h2mux``: a response's own headers, also when an interim (1xx) response came
first on the same request (the header lines are collected by a builtin callback and split when
read); requests written to corked sockets go out with each round, and a connection the server
closed between runs is not used again; a handle's upload buffer is libcurl's smallest, and a
body larger than it still goes whole."""

from __future__ import annotations

import resource
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from worker.providers.h2mux import Answer, Mux, Request, Steps, drive, drive_together, run_together

INTERIM_THEN_429 = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"
    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Type: application/json\r\n"
    b"Content-Length: 14\r\n\r\n"
    b'{"error":"no"}'
)


def _read_head(conn: socket.socket) -> bytes | None:
    """What ``conn`` sent up to the end of a request's head (and what came with it), or None when it
    closed before."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    return data


@pytest.fixture
def server() -> Iterator[str]:
    """One HTTP/1.1 server on 127.0.0.1 answering each request with ``INTERIM_THEN_429``."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                data = _read_head(conn)
                if data is None:  # closed before its head ended
                    continue
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(INTERIM_THEN_429)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    srv.shutdown(socket.SHUT_RDWR)  # wakes the accept() the thread waits in (close() alone does not)
    srv.close()
    t.join(5)
    assert not t.is_alive()


def test_an_answer_after_interim_responses_has_only_its_own_headers(server: str) -> None:
    mux = Mux(http2="never", connections=1, timeout=5)
    try:
        [res] = mux.run([Request(server + "/x", ["content-type: application/json", "expect:"], b"{}")])
    finally:
        mux.close()
    assert isinstance(res, Answer)
    assert res.status == 429 and res.body == b'{"error":"no"}'
    assert res.headers == {"retry-after": "7", "content-type": "application/json", "content-length": "14"}
    assert res.header(b"retry-after") == "7" and res.header(b"link") is None


def test_corked_requests_go_out_after_each_round(server: str) -> None:
    """Each request is written to a corked socket (a new connection each time: the server answers
    and closes) and uncorked after libcurl's round. Left corked, each would wait for the kernel's
    200 ms cork timer: 20 runs 4 s at least (measured 4.09 s without the uncork). An HTTP/2
    connection closed by the server between runs: tests/test_provider_apns.py (idle cut)."""
    mux = Mux(http2="never", connections=1, timeout=5)
    try:
        assert mux.cork
        t0 = time.monotonic()
        for _ in range(20):
            [res] = mux.run([Request(server + "/x", ["expect:"], b"{}")])
            assert isinstance(res, Answer) and res.status == 429
        elapsed = time.monotonic() - t0
        assert mux.connects == 20
    finally:
        mux.close()
    assert elapsed < 3.0, f"20 requests took {elapsed:.2f}s"  # ~0.1 s here, loaded


def test_handles_take_the_smallest_upload_buffer(server: str) -> None:
    """Each handle's first body makes libcurl allocate its upload buffer: 64 KiB by default (16 pages
    touched), 16 KiB as set. 100 handles' first requests, measured here: 11.5-13.4 page faults a
    request with the default, 4.2-5.9 with 16 KiB."""
    mux = Mux(http2="never", connections=100, timeout=30, connect_timeout=30)
    try:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        results = mux.run([Request(server + "/x", ["expect:"], b"{}") for _ in range(100)])
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    finally:
        mux.close()
    assert all(isinstance(r, Answer) and r.status == 429 for r in results), [
        r for r in results if not isinstance(r, Answer)
    ]
    assert faults / 100 < 8.5, f"{faults / 100:.1f} page faults a request"


def test_a_body_larger_than_the_upload_buffer_goes_whole(server: str) -> None:
    """The server answers once it has read Content-Length bytes: a body cut short would time out."""
    mux = Mux(http2="never", connections=1, timeout=10)
    try:
        [res] = mux.run([Request(server + "/x", ["expect:"], b"x" * 200_000)])
    finally:
        mux.close()
    assert isinstance(res, Answer) and res.status == 429


def _gated_server(mine: threading.Event, other: threading.Event) -> tuple[socket.socket, threading.Thread]:
    """An HTTP/1.1 server that answers a request only once the other server has one too (at most
    5 s): ``together`` when it had, ``alone`` when it had not."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        with conn:
            if _read_head(conn) is None:
                return
            mine.set()
            body = b"together" if other.wait(5) else b"alone"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


def test_two_muxes_run_together_from_one_thread() -> None:
    """``run_together``: each Mux's requests under way at the same time, driven by this thread
    alone (each server answers only once the other has its request), results per Mux, in order."""
    a_got, b_got = threading.Event(), threading.Event()
    (sa, ta), (sb, tb) = _gated_server(a_got, b_got), _gated_server(b_got, a_got)
    a, b = Mux(http2="never", connections=1, timeout=10), Mux(http2="never", connections=1, timeout=10)
    threads = threading.active_count()
    try:
        [ra], [rb] = run_together(
            [
                (a, [Request(f"http://127.0.0.1:{sa.getsockname()[1]}/a", ["expect:"], b"{}")]),
                (b, [Request(f"http://127.0.0.1:{sb.getsockname()[1]}/b", ["expect:"], b"{}")]),
            ]
        )
        assert threading.active_count() <= threads  # no Python thread started (the servers' end once served)
        with pytest.raises(ValueError, match="twice"):
            run_together([(a, []), (a, [])])
    finally:
        a.close()
        b.close()
        for s, t in ((sa, ta), (sb, tb)):
            s.close()
            t.join(5)
    assert isinstance(ra, Answer) and isinstance(rb, Answer)
    assert (ra.status, ra.body, rb.status, rb.body) == (200, b"together", 200, b"together")


def test_drive_together_finishes_every_steps_before_raising_one_error(server: str) -> None:
    """One provider's steps failing does not stop the others: each runs to its end, then the first
    error is raised. Two steps on one Mux take turns (a Mux is driven once at a time)."""
    mux, other = Mux(http2="never", connections=1, timeout=5), Mux(http2="never", connections=1, timeout=5)
    seen: dict[str, list[int]] = {"good": [], "same mux": []}

    def steps(name: str, m: Mux, rounds: int, fail: bool = False) -> Steps[str]:
        for _ in range(rounds):
            results = yield m, [Request(server + "/x", ["expect:"], b"{}")]
            seen.setdefault(name, []).extend(r.status for r in results if isinstance(r, Answer))
            if fail:
                raise RuntimeError("provider bug")
        return name

    try:
        assert drive_together([steps("good", mux, 3), steps("same mux", mux, 2)]) == ["good", "same mux"]
        assert seen == {"good": [429] * 3, "same mux": [429] * 2}
        with pytest.raises(RuntimeError, match="provider bug"):
            drive_together([steps("bad", other, 2, fail=True), steps("after", mux, 3)])
        assert seen["bad"] == [429] and seen["after"] == [429] * 3
        assert drive(steps("alone", mux, 2)) == "alone" and seen["alone"] == [429] * 2
    finally:
        mux.close()
        other.close()


def test_a_steps_next_round_waits_for_no_other_steps_round(server: str) -> None:
    """``drive_together`` gives each steps its results as soon as its own round has ended: A's second
    round goes while B's first is still under way (B's server answers only once A's second request
    has come: with one round for all at a time, it would have waited for nothing, 5 s, then
    answered ``alone``)."""
    a_second, done, b_got = threading.Event(), threading.Event(), threading.Event()
    done.set()
    (s2, t2), (sb, tb) = _gated_server(a_second, done), _gated_server(b_got, a_second)
    a, b = Mux(http2="never", connections=1, timeout=10), Mux(http2="never", connections=1, timeout=10)

    def steps_a() -> Steps[list[bytes]]:
        [first] = yield a, [Request(server + "/x", ["expect:"], b"{}")]
        [second] = yield a, [Request(f"http://127.0.0.1:{s2.getsockname()[1]}/a2", ["expect:"], b"{}")]
        return [r.body if isinstance(r, Answer) else b"" for r in (first, second)]

    def steps_b() -> Steps[list[bytes]]:
        [only] = yield b, [Request(f"http://127.0.0.1:{sb.getsockname()[1]}/b", ["expect:"], b"{}")]
        return [only.body if isinstance(only, Answer) else b""]

    try:
        got_a, got_b = drive_together([steps_a(), steps_b()])
    finally:
        a.close()
        b.close()
        for s, t in ((s2, t2), (sb, tb)):
            s.close()
            t.join(5)
    assert got_a == [b'{"error":"no"}', b"together"] and got_b == [b"together"]
