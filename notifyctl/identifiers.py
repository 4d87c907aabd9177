"""What identifies a recipient: user ids, email addresses, device ids and push tokens.

One validator per kind, used wherever one enters the system (``users import``, ``PUT
/v1/users/{id}``, ``send``'s ``recipient_id``, campaign segments, ``tokens register`` and ``POST
/v1/users/{id}/tokens``). Each returns the normalised value or raises ``InputError`` with one line
naming the field and the problem; the message never echoes an invisible or control character as
it is (a bidi override would scramble the very line that reports it).

Refused in every identifier: control characters (NUL, newlines, escapes: Unicode category Cc),
format characters (bidi overrides and isolates U+202A–U+202E and U+2066–U+2069, zero-width
characters, the byte-order mark: Cf), lone surrogates (Cs) and line/paragraph separators (Zl,
Zp). They make two ids that look the same differ, or make an id display as another.
"""

from __future__ import annotations

import re
import unicodedata

from notifyctl.errors import InputError

MAX_ID = 255  # users.id, device_tokens.device_id
MAX_EMAIL = 320
PLATFORMS = ("ios", "android")

_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

# APNs device tokens are hexadecimal: 32 bytes (64 characters) today, and Apple says the length
# may grow ("do not hard-code their size"). Accepted: an even number of hex digits, 32 to 100
# bytes; stored lower-case, so the same device registered twice in another case is one token.
APNS_MIN_BYTES, APNS_MAX_BYTES = 32, 100
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
# FCM registration tokens are opaque URL-safe strings, in practice ``<instance id>:APA91b...``,
# 140–163 characters (older GCM ids from 119); Google documents no format. Accepted: 100 to 512
# characters (the column) of ``[A-Za-z0-9_:-]``: this refuses typos, placeholders and other
# services' tokens without betting on today's exact length.
FCM_MIN, FCM_MAX = 100, 512
_FCM = re.compile(r"[A-Za-z0-9_:\-]+")


def refused_char(text: str) -> str | None:
    """The first control, format or separator character in ``text``, described (``U+202E
    RIGHT-TO-LEFT OVERRIDE``), or None. Cheap for ordinary text: only the characters that are
    not printable are looked at one by one."""
    if text.isprintable():
        return None
    for c in text:
        if not c.isprintable() and unicodedata.category(c) in _REFUSED_CATEGORIES:
            name = unicodedata.name(c, "")
            return f"U+{ord(c):04X}{' ' + name if name else ''}"
    return None


def check_text_id(value: str, field: str, max_len: int = MAX_ID) -> str:
    """A stripped, non-empty identifier of at most ``max_len`` characters without refused characters."""
    v = value.strip()
    if not v:
        raise InputError(f"{field}: empty")
    if len(v) > max_len:
        raise InputError(f"{field}: longer than {max_len} characters")
    bad = refused_char(v)
    if bad:
        raise InputError(f"{field}: contains {bad}, a control or invisible formatting character")
    return v


def check_user_id(value: str, field: str = "user_id") -> str:
    """A user id as stored in ``users.id``."""
    return check_text_id(value, field)


def check_email(value: str, field: str = "email") -> str:
    """An email address: one ``@``, a dotted domain, no spaces, no refused characters."""
    e = value.strip()
    bad = refused_char(e)
    if bad:
        raise InputError(f"{field}: contains {bad}, a control or invisible formatting character")
    if len(e) > MAX_EMAIL or e.count("@") != 1:
        raise InputError(f"{field} {e[:80]!r}: not an email address")
    local, domain = e.split("@")
    if not local or "." not in domain or domain.startswith(".") or domain.endswith("."):
        raise InputError(f"{field} {e[:80]!r}: not an email address")
    if any(c.isspace() for c in e):
        raise InputError(f"{field} {e[:80]!r}: not an email address (contains a space)")
    return e


def check_platform(platform: str) -> str:
    p = platform.strip().lower()
    if p not in PLATFORMS:
        raise InputError(f"platform: must be ios or android, got {platform[:40]!r}")
    return p


def check_token(token: str, platform: str, field: str = "token") -> str:
    """A push token for ``platform`` (``check_platform`` first), normalised (APNs: lower-case)."""
    t = token.strip()
    bad = refused_char(t)
    if bad:
        raise InputError(f"{field}: contains {bad}, a control or invisible formatting character")
    if not t:
        raise InputError(f"{field}: empty")
    if platform == "ios":
        if not _HEX.fullmatch(t):
            why = "an odd number of" if re.fullmatch(r"[0-9a-fA-F]+", t) else "not"
            raise InputError(f"{field}: an APNs device token is hexadecimal digits in pairs ({why} hex digits given)")
        n = len(t) // 2
        if not APNS_MIN_BYTES <= n <= APNS_MAX_BYTES:
            raise InputError(
                f"{field}: an APNs device token is {APNS_MIN_BYTES} to {APNS_MAX_BYTES} bytes "
                f"({2 * APNS_MIN_BYTES}+ hex digits; 64 today), got {n}"
            )
        return t.lower()
    if not _FCM.fullmatch(t):
        c = next(c for c in t if not _FCM.fullmatch(c))
        raise InputError(f"{field}: an FCM registration token has only letters, digits, '_', ':' and '-' (found {c!r})")
    if not FCM_MIN <= len(t) <= FCM_MAX:
        raise InputError(
            f"{field}: an FCM registration token is {FCM_MIN} to {FCM_MAX} characters (typically ~160), got {len(t)}"
        )
    return t
