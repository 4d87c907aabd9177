"""The SQLite writers' lock (``write_lock``): one writer at a time, woken at once, OTPs first.

Its own module, below ``notifyctl.db`` (which re-exports it), so that modules ``db`` calls while it
creates the schema (``dedup``, ``analytics``) can take it without an import cycle.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.engine import Engine

from notifyctl.home import open_private

_lock_files = threading.local()  # per thread: flock excludes open files, not threads sharing one


def _lock_pair(database: str) -> tuple[Any, Any]:
    files: dict[tuple[int, str], tuple[Any, Any]] | None = getattr(_lock_files, "files", None)
    if files is None:
        files = _lock_files.files = {}
    key = (os.getpid(), database)  # after fork, a child needs its own open files
    pair = files.get(key)
    if pair is None:
        pair = files[key] = (
            os.fdopen(open_private(database + ".writelock", os.O_WRONLY | os.O_APPEND), "a"),
            os.fdopen(open_private(database + ".writegate", os.O_WRONLY | os.O_APPEND), "a"),
        )
    return pair


@contextmanager
def write_lock(engine: Engine, urgent: bool = False) -> Iterator[None]:
    """Serialise SQLite writers with a kernel file lock around their write transactions.

    SQLite lets one writer in at a time and makes the others poll with growing sleeps (up to 100 ms
    each), so under load writers — an OTP's intake among them — idle while the database is free.
    A blocking ``flock`` wakes the next writer the moment the lock is released. Other databases
    lock rows themselves: this is a no-op there.

    ``urgent`` writers (high priority: an OTP's intake, the high worker's batch) go first: while
    one waits it holds a shared lock on a second file, the gate, which every other writer must
    pass (exclusively) before it queues for the database, and looks at again once it has the
    lock: one that finds an urgent writer waiting there gives the lock back and queues behind it.
    An OTP waits for the one write under way when it came, never for the others queued (a pool's
    bulk workers: a push batch's write each, ~40 ms under load) nor for a stream of batches.
    """
    if engine.dialect.name != "sqlite" or not engine.url.database or engine.url.database == ":memory:":
        yield
        return
    held: set[str] = _lock_files.__dict__.setdefault("held", set())
    if engine.url.database in held:  # nested in this thread's own write: the lock is already ours
        yield
        return
    lock, gate = _lock_pair(engine.url.database)
    if urgent:
        fcntl.flock(gate, fcntl.LOCK_SH)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
    else:
        while True:
            fcntl.flock(gate, fcntl.LOCK_EX)  # waits while an urgent writer is waiting
            fcntl.flock(gate, fcntl.LOCK_UN)
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:  # an urgent writer that came while this one queued goes first
                fcntl.flock(gate, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fcntl.flock(lock, fcntl.LOCK_UN)
                continue
            fcntl.flock(gate, fcntl.LOCK_UN)
            break
    held.add(engine.url.database)
    try:
        yield
    finally:
        held.discard(engine.url.database)
        fcntl.flock(lock, fcntl.LOCK_UN)


def close_lock_files() -> None:
    """Close this thread's lock files (reopened when next needed). For a process that opens many
    databases one after the other (a test session): each keeps two descriptors otherwise."""
    files: dict[tuple[int, str], tuple[Any, Any]] | None = getattr(_lock_files, "files", None)
    if files:
        for pair in files.values():
            for f in pair:
                f.close()
        files.clear()
