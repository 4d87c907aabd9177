"""Signed, unforgeable per-user unsubscribe links (RFC 8058 one-click).

A token is ``<user id>.<scope>.<signature>`` in URL-safe base64, where the signature is an
HMAC-SHA256 over user and scope with the installation's secret. The secret comes from
``NOTIFY_SECRET_KEY`` or, when unset, is generated once into ``$NOTIFY_HOME/secret.key``
(mode 0600) — never stored in the repository, never printed.

The link is ``<public_url>/u/<token>``: ``GET`` shows a confirmation page, ``POST`` with
``List-Unsubscribe=One-Click`` unsubscribes at once (served by ``notifyctl serve``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

from notifyctl.errors import InputError
from notifyctl.home import private_dir, write_private

_SCOPES = ("marketing", "alerts", "transactional", "all")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def secret_key(settings: Any) -> bytes:
    env = os.environ.get("NOTIFY_SECRET_KEY")
    if env:
        return env.encode()
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


def _sign(key: bytes, user_id: str, scope: str) -> str:
    mac = hmac.new(key, f"unsubscribe\x00{user_id}\x00{scope}".encode(), hashlib.sha256).digest()
    return _b64(mac[:20])


def make_token(key: bytes, user_id: str, scope: str = "marketing") -> str:
    if scope not in _SCOPES:
        raise ValueError(f"unknown unsubscribe scope {scope!r}")
    return f"{_b64(user_id.encode())}.{scope}.{_sign(key, user_id, scope)}"


def verify_token(key: bytes, token: str) -> tuple[str, str]:
    """``(user_id, scope)`` for a genuine token; InputError for anything else."""
    try:
        uid_b64, scope, sig = token.split(".")
        user_id = _unb64(uid_b64).decode()
    except (ValueError, UnicodeDecodeError):
        raise InputError("unsubscribe link: malformed") from None
    if scope not in _SCOPES or not sig.isascii() or not hmac.compare_digest(sig, _sign(key, user_id, scope)):
        raise InputError("unsubscribe link: invalid signature")
    return user_id, scope


def unsubscribe_url(settings: Any, key: bytes, user_id: str, scope: str = "marketing") -> str | None:
    """The one-click link for a user, or None when no public URL is configured."""
    base = getattr(settings, "public_url", None)
    if not base:
        return None
    return f"{base.rstrip('/')}/u/{make_token(key, user_id, scope)}"
