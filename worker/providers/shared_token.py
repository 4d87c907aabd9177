"""A provider credential shared by every worker process and every host through Redis.

APNs counts each new provider JWT of a key as a token update and answers
``429 TooManyProviderTokenUpdates`` when they come more often than every 20 minutes; a pool of
workers that each mint their own breaks that on every start. FCM access tokens are not limited so,
but one per service account saves a token request per process. So the token lives in Redis
(``notifyctl.keys.provider_token``):

- ``get()`` answers the process's copy until it is due for renewal (no Redis round trip), then
  the shared one; when there is none, or it is due, one process mints a new one under a lock
  (``keys.provider_token_lock``) while the others wait for it and take it.
- ``refresh(stale)``, after the provider refused ``stale`` (``ExpiredProviderToken``,
  ``InvalidProviderToken``, a 401): one new token for everyone — whoever comes after the first
  refresh finds a token other than ``stale`` and takes it, so N processes that saw the same
  refusal cause exactly one refresh.
- ``shared()`` reads the shared token as it is now (APNs: was ours the odd one out?).

Without Redis (``redis=None``: a provider built outside a worker), or when Redis fails, the token
is minted and kept by this process alone, as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class Minted(NamedTuple):
    """What ``mint`` answers: the token, seconds until it is due for renewal, seconds it is valid."""

    token: str
    renew_after: float
    valid_for: float


class _Held(NamedTuple):
    token: str
    renew_at: float  # epoch seconds: shared between hosts, so wall-clock time
    expires_at: float


class SharedToken:
    """See the module docstring. ``key``/``lock_key``: Redis keys (from ``notifyctl.keys``)."""

    def __init__(
        self,
        mint: Callable[[], Minted],
        redis: Any | None = None,
        key: str = "",
        lock_key: str = "",
        *,
        lock_timeout: float = 30.0,
        name: str = "provider",
    ) -> None:
        self._mint_fn = mint
        self._redis = redis if key else None
        self._key, self._lock_key = key, lock_key
        self._lock_timeout = lock_timeout
        self._name = name
        self._held: _Held | None = None
        self._lock = threading.Lock()
        self.minted = 0  # tokens this process minted (shared or not)

    # -- reading -------------------------------------------------------------------------------

    def get(self) -> str:
        held = self._held
        if held is not None and time.time() < held.renew_at:
            return held.token
        with self._lock:
            held = self._held
            if held is not None and time.time() < held.renew_at:
                return held.token
            return self._renew(None)

    def refresh(self, stale: str) -> str:
        """A token other than ``stale`` (refused by the provider): another process's, or one new one."""
        with self._lock:
            held = self._held
            if held is not None and held.token != stale and time.time() < held.renew_at:
                return held.token
            return self._renew(stale)

    def shared(self) -> str | None:
        """The token in Redis now (None without Redis, or when there is none)."""
        if self._redis is None:
            return None
        try:
            held = self._read()
        except (RedisError, ValueError) as exc:
            log.warning("%s: shared token unreadable: %s", self._name, type(exc).__name__)
            return None
        return held.token if held is not None else None

    def fresh(self) -> str:
        """A token minted now for the caller alone, neither cached nor shared (key checks)."""
        return self._mint_fn().token

    def forget(self) -> None:
        """Drop this process's copy (the next ``get`` reads Redis again)."""
        with self._lock:
            self._held = None

    # -- renewing ------------------------------------------------------------------------------

    def _usable(self, held: _Held | None, stale: str | None) -> bool:
        return held is not None and held.token != stale and time.time() < held.renew_at

    def _renew(self, stale: str | None) -> str:
        if self._redis is not None:
            try:
                return self._renew_shared(stale)
            except (RedisError, TimeoutError, ValueError) as exc:  # Redis down, lock not had: send anyway
                log.warning("%s: shared token unavailable (%s); minting one for this process",
                            self._name, type(exc).__name__)  # fmt: skip
        return self._adopt(self._mint())

    def _renew_shared(self, stale: str | None) -> str:
        held = self._read()
        if self._usable(held, stale):
            return self._adopt(held)  # type: ignore[arg-type]
        lock = self._redis.lock(  # type: ignore[union-attr]
            self._lock_key, timeout=self._lock_timeout, blocking_timeout=self._lock_timeout, sleep=0.02
        )
        if not lock.acquire():
            raise TimeoutError("token lock not acquired")
        try:
            held = self._read()  # minted by whoever held the lock before us?
            if self._usable(held, stale):
                return self._adopt(held)  # type: ignore[arg-type]
            held = self._mint()
            ttl_ms = max(1, int((held.expires_at - time.time()) * 1000))
            self._redis.set(self._key, f"{held.renew_at!r}|{held.expires_at!r}|{held.token}", px=ttl_ms)  # type: ignore[union-attr]
            return self._adopt(held)
        finally:
            try:
                lock.release()
            except RedisError:  # expired meanwhile: nothing to release
                pass

    def _read(self) -> _Held | None:
        raw = self._redis.get(self._key)  # type: ignore[union-attr]
        if not raw:
            return None
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        renew_at, expires_at, token = text.split("|", 2)
        return _Held(token, float(renew_at), float(expires_at))

    def _mint(self) -> _Held:
        m = self._mint_fn()
        self.minted += 1
        now = time.time()
        return _Held(m.token, now + m.renew_after, now + m.valid_for)

    def _adopt(self, held: _Held) -> str:
        self._held = held
        return held.token
