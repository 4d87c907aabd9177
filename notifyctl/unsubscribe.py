"""Signed, unforgeable per-user unsubscribe links (RFC 8058 one-click).

A token is ``<user id>.<scope>.<signature>`` in URL-safe base64, where the signature is an
HMAC-SHA256 over user and scope with the installation's secret (``secret_key``), which also
signs the open pixels. Never stored in the repository, never printed. Where it comes from:

- **a database of its own** (SQLite under the home): ``NOTIFY_SECRET_KEY``, or else a key generated
  once into ``$NOTIFY_HOME/secret.key`` (mode 0600);
- **a shared database** (PostgreSQL, any database URL that is not SQLite): every host must sign
  with one key, or a link mailed by one host is refused by another. The key lives in the database
  (table ``shared_secrets``), created once by the first host (race-safe: one INSERT wins, every
  host reads the winner; seeded from that host's ``secret.key`` when it had one, so links it
  already mailed keep working). With ``NOTIFY_SECRET_KEY`` set, that key is used and only its
  fingerprint is stored: a host whose key differs from the one the database holds (or names by
  fingerprint) refuses to start (``ConfigError``, exit 3).

The link is ``<public_url>/u/<token>``: ``GET`` shows a confirmation page, ``POST`` with
``List-Unsubscribe=One-Click`` unsubscribes at once (served by ``notifyctl serve``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from notifyctl.db import engine_for
from notifyctl.errors import ConfigError, InputError
from notifyctl.home import private_dir, write_private
from notifyctl.models import SharedSecret
from notifyctl.signing import b64url, signer

SIGNING_KEY = "signing_key"  # its row in shared_secrets
_shared: dict[tuple[str, bytes | None], bytes] = {}  # (database url, NOTIFY_SECRET_KEY) → the key: read once
_shared_lock = threading.Lock()

_SCOPES = ("marketing", "alerts", "transactional", "all")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def shared_database(settings: Any) -> bool:
    """Whether the database may be shared with other hosts: any database URL but SQLite's."""
    url = getattr(settings, "database_url", None)
    return bool(url) and not str(url).startswith("sqlite")


def secret_key(settings: Any) -> bytes:
    """The installation's signing key (see the module's docstring); ``ConfigError`` when this host's
    ``NOTIFY_SECRET_KEY`` disagrees with the key the shared database holds."""
    configured_key = getattr(settings, "secret_key", None)  # NOTIFY_SECRET_KEY, read by the settings root
    value = configured_key.get_secret_value() if configured_key is not None else ""
    configured = value.encode() if value else None
    if shared_database(settings):
        cache_key = (str(settings.database_url), configured)
        key = _shared.get(cache_key)
        if key is None:
            with _shared_lock:
                key = _shared.get(cache_key) or _shared_key(settings, configured)
                _shared[cache_key] = key
        return key
    if configured:
        return configured
    return _local_key(settings)


def check_at_start(settings: Any) -> None:
    """For ``serve`` and ``worker``: on a shared database, agree on the signing key now (creating it
    when this host is the first) — a host with a different key stops here, with one line, rather
    than mail links the others refuse."""
    if shared_database(settings):
        secret_key(settings)


def fingerprint(key: bytes) -> str:
    """Names a key without revealing it: compared between hosts, stored in the database."""
    return hmac.new(b"notifyctl signing key fingerprint", key, hashlib.sha256).hexdigest()


def _shared_key(settings: Any, configured: bytes | None) -> bytes:
    from sqlalchemy import insert, select
    from sqlalchemy.exc import IntegrityError

    engine = engine_for(settings)
    t = SharedSecret.__table__  # type: ignore[attr-defined]
    if configured is not None:
        proposal = {"name": SIGNING_KEY, "value": None, "fingerprint": fingerprint(configured)}
    else:
        local = Path(settings.home) / "secret.key"
        seed = local.read_bytes().strip() if local.is_file() else secrets.token_urlsafe(32).encode()
        proposal = {"name": SIGNING_KEY, "value": seed.decode(), "fingerprint": fingerprint(seed)}
    try:
        with engine.begin() as conn:  # the first host's INSERT wins; the others' fail and read it
            conn.execute(insert(t).values(**proposal))
    except IntegrityError:
        pass
    with engine.connect() as conn:
        row = conn.execute(select(t.c.value, t.c.fingerprint).where(t.c.name == SIGNING_KEY)).one()
    value, stored_fp = str(row[0] or ""), str(row[1])
    if configured is not None:
        if fingerprint(configured) != stored_fp:
            raise ConfigError(
                "NOTIFY_SECRET_KEY differs from the signing key of the hosts sharing this database "
                f"(fingerprint {stored_fp[:12]}): links signed on one host would be refused on the other; "
                + ("unset NOTIFY_SECRET_KEY to use the stored key" if value else "set the same key on every host")
            )
        return configured
    if not value:
        raise ConfigError(
            f"the hosts sharing this database sign links with NOTIFY_SECRET_KEY (fingerprint {stored_fp[:12]}): "
            "set the same NOTIFY_SECRET_KEY on this host"
        )
    return str(value).encode()


def _local_key(settings: Any) -> bytes:
    path = Path(settings.home) / "secret.key"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    private_dir(path.parent)
    key = secrets.token_urlsafe(32).encode()
    # written whole under a name of its own, then linked into place: a process that starts at the
    # same moment either links first (and this one reads its key) or finds the file complete
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    write_private(tmp, key)
    try:
        os.link(tmp, path)
    except FileExistsError:
        key = path.read_bytes().strip()
    finally:
        tmp.unlink()
    return key


def token_maker(key: bytes, scope: str = "marketing") -> Callable[[str], str]:
    """``make_token(key, user_id, scope)`` as a function of ``user_id``: the scope's check and text
    and the keyed HMAC worked out once — the one place the token's form is written."""
    if scope not in _SCOPES:
        raise ValueError(f"unknown unsubscribe scope {scope!r}")
    sign, mid, tail = signer(key), f".{scope}.", f"\x00{scope}".encode()

    def token(user_id: str) -> str:
        uid = user_id.encode()
        return b64url(uid) + mid + b64url(sign(b"unsubscribe\x00" + uid + tail)[:20])

    return token


def make_token(key: bytes, user_id: str, scope: str = "marketing") -> str:
    return token_maker(key, scope)(user_id)


def verify_token(key: bytes, token: str) -> tuple[str, str]:
    """``(user_id, scope)`` for a genuine token; InputError for anything else."""
    try:
        uid_b64, scope, sig = token.split(".")
        user_id = _unb64(uid_b64).decode()
    except (ValueError, UnicodeDecodeError):
        raise InputError("unsubscribe link: malformed") from None
    if scope not in _SCOPES or not sig.isascii():
        raise InputError("unsubscribe link: invalid signature")
    if not hmac.compare_digest(sig, make_token(key, user_id, scope).rpartition(".")[2]):
        raise InputError("unsubscribe link: invalid signature")
    return user_id, scope


def unsubscribe_url(settings: Any, key: bytes, user_id: str, scope: str = "marketing") -> str | None:
    """The one-click link for a user, or None when no public URL is configured."""
    url = link_maker(settings, key, scope)
    return url(user_id) if url else None


def link_maker(settings: Any, key: bytes, scope: str = "marketing") -> Callable[[str], str] | None:
    """``unsubscribe_url(settings, key, user_id, scope)`` as a function of ``user_id``, for a batch
    of recipients: the base URL and ``token_maker`` worked out once. None when no public URL is
    configured."""
    base = getattr(settings, "public_url", None)
    if not base:
        return None
    head, token = f"{base.rstrip('/')}/u/", token_maker(key, scope)

    def url(user_id: str) -> str:
        return head + token(user_id)

    return url
