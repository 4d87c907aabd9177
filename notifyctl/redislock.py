"""An owned Redis lock: held under a random token, renewed by a thread while its holder works,
released by compare-and-delete — a holder never deletes or extends a lock that has become someone
else's (after it expired: the holder paused, or cut off from Redis for longer than ``ttl_ms``).

``lost`` says that the lock is no longer ours (a renewal found another token, or could not reach
Redis until the lock ran out): the holder stops before its next write (``check``).
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

# compare-and-extend, compare-and-delete: 1 when the lock was ours
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class LockLost(Exception):
    """The lock expired and may be someone else's: stop before writing anything more."""


class OwnedLock:
    def __init__(self, r: Any, key: str, ttl_ms: int = 10_000) -> None:
        self.r = r
        self.key = key
        self.ttl_ms = ttl_ms
        self.token = secrets.token_hex(16)
        self.held = False
        self.lost = False
        self._until = 0.0  # monotonic time by which the lock has run out unless renewed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, wait: float = 0.0) -> bool:
        """Take the lock (SET NX PX), trying for ``wait`` seconds; renewed from then on until
        ``release``."""
        deadline = time.monotonic() + wait
        while True:
            start = time.monotonic()
            if self.r.set(self.key, self.token, nx=True, px=self.ttl_ms):
                break
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        self.held, self.lost = True, False
        self._until = start + self.ttl_ms / 1000
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lock {self.key}", daemon=True)
        self._thread.start()
        return True

    def _renew_loop(self) -> None:
        every = self.ttl_ms / 4000
        while not self._stop.wait(every):
            start = time.monotonic()
            try:
                ours = self.r.eval(_RENEW, 1, self.key, self.token, self.ttl_ms)
            except Exception:  # noqa: BLE001 - Redis unreachable: lost only once the lock has run out
                if time.monotonic() >= self._until:
                    self.lost = True
                    return
                continue
            if not ours:
                self.lost = True
                return
            self._until = start + self.ttl_ms / 1000

    def check(self) -> None:
        """LockLost unless the lock is still ours: by its renewals, its time, and Redis (one GET)."""
        if not self.lost and self.held and time.monotonic() < self._until:
            value = self.r.get(self.key)
            if (value.decode() if isinstance(value, bytes) else value) == self.token:
                return
        self.lost = True
        raise LockLost(f"lost the lock {self.key}")

    def release(self) -> bool:
        """Stop renewing; delete the lock if it is still ours. True when it was."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if not self.held:
            return False
        self.held = False
        try:
            return bool(self.r.eval(_RELEASE, 1, self.key, self.token))
        except Exception:  # noqa: BLE001 - unreachable: the lock runs out by itself
            return False

    def __enter__(self) -> OwnedLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
