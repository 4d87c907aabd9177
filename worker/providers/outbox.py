"""The outbox provider: every route, no network. Each message becomes one JSON line in
``$NOTIFY_HOME/outbox/<route>.jsonl`` — the default when no real provider is configured,
and a way to see exactly what would have been sent.

A batch is written with one ``write()`` on a file opened with ``O_APPEND``, so lines from
concurrent worker processes never interleave.

The outbox stands for the recipients' devices: it keeps what it delivered, secret template data
(OTP codes) included, and nothing erases it — the erasure of ``notifyctl.secretdata`` is about
notifyctl's own record. Its directory is 0700 and its files 0600 (``notifyctl.home``); it is a
development and test provider, not one for production traffic.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar

from notifyctl.home import open_private, private_dir, write_private
from notifyctl.vocabulary import ROUTES
from worker.providers.base import Message, Outcome, Sent


class Provider:
    name: ClassVar[str] = "outbox"
    routes: ClassVar[frozenset[str]] = frozenset(ROUTES)

    def __init__(self, settings: Any, redis: Any | None = None) -> None:  # no state shared between workers
        self.dir = private_dir(settings.outbox_dir)
        self._fds: dict[str, int] = {}

    def _fd(self, route: str) -> int:
        fd = self._fds.get(route)
        if fd is None:
            path = self.dir / f"{route}.jsonl"
            fd = open_private(path, os.O_WRONLY | os.O_APPEND)
            self._fds[route] = fd
        return fd

    def send(self, messages: Sequence[Message]) -> list[Outcome]:
        now = time.time()
        by_route: dict[str, list[str]] = {}
        outcomes: list[Outcome] = []
        for m in messages:
            mid = "outbox-" + uuid.uuid4().hex
            record = {
                "provider_message_id": mid,
                "delivery_id": m.delivery_id,
                "notification_id": m.notification_id,
                "route": m.route,
                "to": m.address,
                "category": m.category,
                "priority": m.priority,
                "content": m.content,
                "data": m.data,
                "headers": m.headers,
                "collapse_id": m.dedup_key,
                "at": now,
            }
            by_route.setdefault(m.route, []).append(json.dumps(record, separators=(",", ":")))
            outcomes.append(Sent(mid))
        for route, lines in by_route.items():
            data = ("\n".join(lines) + "\n").encode()
            fd = self._fd(route)
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        return outcomes

    def describe(self) -> dict[str, str]:
        return {"directory": str(self.dir)}

    def check(self) -> str | None:
        """The directory must be writable; nothing is sent."""
        probe = self.dir / ".check"
        try:
            write_private(probe, b"ok")
            probe.unlink()
        except OSError as exc:
            return f"cannot write to {self.dir}: {exc.strerror}"
        return None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def read_outbox(outbox_dir: Any, route: str | None = None) -> list[dict[str, Any]]:
    """All records in the outbox (optionally one route), oldest first."""
    records: list[dict[str, Any]] = []
    paths = sorted(outbox_dir.glob("*.jsonl")) if route is None else [outbox_dir / f"{route}.jsonl"]
    for path in paths:
        if path.exists():
            with open(path, encoding="utf-8") as fh:
                records.extend(json.loads(line) for line in fh if line.strip())
    return records
