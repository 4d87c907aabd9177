"""Users, their preferences (opt-outs) and device tokens."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import phonenumbers
import pytz
from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from notifyctl.context import Context
from notifyctl.errors import InputError, NotFound
from notifyctl.models import DeviceToken, OptOut, User, utcnow
from notifyctl.prefs import invalidate
from notifyctl.settings import CATEGORIES, CHANNELS

REQUIRED_COLUMNS = ("user_id",)
KNOWN_COLUMNS = ("user_id", "email", "phone", "timezone", "locale", "sms_opt_in")
USER_UPDATE_COLS = ["email", "phone", "timezone", "locale", "sms_opt_in", "attributes", "updated_at"]
_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"", "0", "false", "no", "n", "off"}
PLATFORMS = ("ios", "android")


def normalize_phone(raw: str, region: str) -> str:
    """E.164, or InputError naming the problem."""
    try:
        num = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException as exc:
        raise InputError(f"phone {raw!r}: {exc}") from None
    if not phonenumbers.is_valid_number(num):
        raise InputError(f"phone {raw!r}: not a valid number")
    return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)


def check_timezone(tz: str) -> str:
    if tz not in pytz.all_timezones_set:
        raise InputError(f"timezone {tz!r}: not an IANA time zone (e.g. Europe/Paris)")
    return tz


def _email_ok(e: str) -> bool:
    if len(e) > 320 or e.count("@") != 1:
        return False
    local, domain = e.split("@")
    return bool(local) and "." in domain and not any(c.isspace() for c in e)


def build_user_row(raw: dict[str, str | None], region: str, default_tz: str) -> dict[str, Any]:
    uid = (raw.get("user_id") or "").strip()
    if not uid:
        raise InputError("user_id is empty")
    if len(uid) > 255:
        raise InputError("user_id longer than 255 characters")
    email = (raw.get("email") or "").strip() or None
    if email and not _email_ok(email):
        raise InputError(f"email {email!r}: not an email address")
    phone = (raw.get("phone") or "").strip() or None
    if phone:
        phone = normalize_phone(phone, region)
    tz = check_timezone((raw.get("timezone") or "").strip() or default_tz)
    locale = (raw.get("locale") or "").strip() or "en"
    if len(locale) > 16:
        raise InputError(f"locale {locale!r}: too long")
    opt_in_raw = (raw.get("sms_opt_in") or "").strip().lower()
    if opt_in_raw not in _TRUE | _FALSE:
        raise InputError(f"sms_opt_in {opt_in_raw!r}: use true or false")
    attrs = {k: v for k, v in raw.items() if k not in KNOWN_COLUMNS and k and v not in (None, "")}
    now = utcnow()
    return {
        "id": uid,
        "email": email,
        "phone": phone,
        "timezone": tz,
        "locale": locale,
        "sms_opt_in": opt_in_raw in _TRUE,
        "attributes": attrs,
        "created_at": now,
        "updated_at": now,
    }


def upsert(session: Session, model: Any, rows: list[dict[str, Any]], keys: list[str], update_cols: list[str]) -> None:
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    ins = (postgresql if dialect == "postgresql" else sqlite).insert(model)
    if update_cols:
        stmt = ins.on_conflict_do_update(index_elements=keys, set_={c: ins.excluded[c] for c in update_cols})
    else:
        stmt = ins.on_conflict_do_nothing(index_elements=keys)
    session.execute(stmt, rows)


@dataclass
class ImportReport:
    imported: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)


def decoded_lines(stream: Any, bad: dict[int, str]) -> Iterator[str]:
    """Lines as text, with the csv module's universal newlines. A binary stream is decoded as
    UTF-8 line by line: a line that is not UTF-8 is noted in ``bad`` (by line number) instead of
    ending the file, and a byte-order mark (Excel's UTF-8) is dropped."""
    if isinstance(stream, io.BufferedIOBase | io.RawIOBase):
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
        for n, line in enumerate(text, 1):
            try:
                line.encode("utf-8")  # fails only on the surrogates that stand for undecodable bytes
            except UnicodeEncodeError:
                bad[n] = "not UTF-8 text"
                line = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            yield line
        text.detach()
        return
    for n, line in enumerate(stream, 1):
        yield line.lstrip("\ufeff") if n == 1 else line


def iter_csv(stream: io.TextIOBase | Iterable[str]) -> Iterator[tuple[int, dict[str, str | None]]]:
    reader = csv.DictReader(stream)  # type: ignore[arg-type]
    if reader.fieldnames is None:
        raise InputError("CSV is empty: expected a header line with user_id")
    fields = [f.strip() if f else f for f in reader.fieldnames]
    reader.fieldnames = fields
    missing = [c for c in REQUIRED_COLUMNS if c not in fields]
    if missing:
        raise InputError(f"CSV header lacks column {', '.join(missing)} (has: {', '.join(f for f in fields if f)})")
    for row in reader:
        yield reader.line_num, row


def import_users(ctx: Context, stream: Any, batch: int = 1000) -> ImportReport:
    """Upsert users from CSV; bad rows are reported with their line number and skipped."""
    s = ctx.settings
    report = ImportReport()
    rows: dict[str, dict[str, Any]] = {}
    bad_lines: dict[int, str] = {}
    previous = 1
    with Session(ctx.engine) as session:
        try:
            for line, raw in iter_csv(decoded_lines(stream, bad_lines)):
                first, previous = previous + 1, line
                bad = next((bad_lines[n] for n in range(first, line + 1) if n in bad_lines), None)
                if bad:
                    report.errors.append((line, bad))
                    continue
                if None in raw:
                    report.errors.append((line, f"{len(raw[None]) if raw[None] else 0} more fields than the header"))  # type: ignore[index]
                    continue
                try:
                    row = build_user_row(raw, s.default_region, s.default_timezone)
                except InputError as exc:
                    report.errors.append((line, str(exc)))
                    continue
                rows[row["id"]] = row
                if len(rows) >= batch:
                    upsert(
                        session,
                        User,
                        list(rows.values()),
                        ["id"],
                        USER_UPDATE_COLS,
                    )
                    report.imported += len(rows)
                    rows.clear()
        except csv.Error as exc:
            report.errors.append((-1, f"malformed CSV: {exc}; rest of the file skipped"))
        upsert(
            session,
            User,
            list(rows.values()),
            ["id"],
            USER_UPDATE_COLS,
        )
        report.imported += len(rows)
        session.commit()
    return report


def get_user(session: Session, user_id: str) -> User:
    u = session.get(User, user_id)
    if u is None:
        raise NotFound(f"no user {user_id!r}")
    return u


def parse_pref(item: str) -> tuple[str, str]:
    """``email`` → (email, *); ``marketing`` → (*, marketing); ``sms:marketing``; ``all`` → (*, *)."""
    item = item.strip().lower()
    if item in ("all", "*"):
        return "*", "*"
    if ":" in item:
        ch, cat = item.split(":", 1)
    elif item in CHANNELS:
        ch, cat = item, "*"
    elif item in CATEGORIES:
        ch, cat = "*", item
    else:
        raise InputError(
            f"preference {item!r}: use a channel ({', '.join(CHANNELS)}), a category "
            f"({', '.join(CATEGORIES)}), CHANNEL:CATEGORY or all"
        )
    if ch not in (*CHANNELS, "*") or cat not in (*CATEGORIES, "*"):
        raise InputError(f"preference {item!r}: unknown channel or category")
    return ch, cat


def set_prefs(ctx: Context, user_id: str, off: list[str], on: list[str], reason: str = "user") -> list[tuple[str, str]]:
    offs = [parse_pref(i) for i in off]
    ons = [parse_pref(i) for i in on]
    with Session(ctx.engine) as session:
        get_user(session, user_id)
        for ch, cat in ons:
            session.execute(
                delete(OptOut).where(OptOut.user_id == user_id, OptOut.channel == ch, OptOut.category == cat)
            )
        upsert(
            session,
            OptOut,
            [
                {"user_id": user_id, "channel": ch, "category": cat, "reason": reason, "created_at": utcnow()}
                for ch, cat in offs
            ],
            ["user_id", "channel", "category"],
            [],
        )
        session.commit()
        invalidate(ctx.redis, [user_id])
        return [
            (o.channel, o.category)
            for o in session.execute(
                select(OptOut).where(OptOut.user_id == user_id).order_by(OptOut.channel, OptOut.category)
            ).scalars()
        ]


def show_user(ctx: Context, user_id: str) -> dict[str, Any]:
    with Session(ctx.engine) as session:
        u = get_user(session, user_id)
        opt = session.execute(select(OptOut).where(OptOut.user_id == user_id)).scalars().all()
        toks = session.execute(select(DeviceToken).where(DeviceToken.user_id == user_id)).scalars().all()
        return {
            "user": u.model_dump(),
            "opt_outs": [o.model_dump() for o in opt],
            "tokens": [t.model_dump() for t in toks],
        }


def register_token(ctx: Context, user_id: str, token: str, platform: str) -> DeviceToken:
    token = token.strip()
    if platform not in PLATFORMS:
        raise InputError(f"--platform: must be ios or android, got {platform!r}")
    if not token or len(token) > 512 or any(c.isspace() for c in token):
        raise InputError("token: must be 1-512 characters without spaces")
    if platform == "ios" and not all(c in "0123456789abcdefABCDEF" for c in token):
        raise InputError("token: an APNs device token is hexadecimal")
    with Session(ctx.engine, expire_on_commit=False) as session:
        get_user(session, user_id)
        t = session.get(DeviceToken, token)
        if t is None:
            t = DeviceToken(token=token, user_id=user_id, platform=platform)
            session.add(t)
        else:  # re-registration: the token moves to this user and is live again
            t.user_id, t.platform, t.removed_at, t.removed_reason = user_id, platform, None, None
        session.commit()
        return t


def list_tokens(ctx: Context, user_id: str | None = None, include_removed: bool = False) -> list[DeviceToken]:
    with Session(ctx.engine) as session:
        q = select(DeviceToken).order_by(DeviceToken.user_id, DeviceToken.created_at)
        if user_id:
            q = q.where(DeviceToken.user_id == user_id)
        if not include_removed:
            q = q.where(DeviceToken.removed_at.is_(None))  # type: ignore[union-attr]
        return list(session.execute(q).scalars())


def revoke_token(ctx: Context, token: str, reason: str = "revoked by operator") -> None:
    with Session(ctx.engine) as session:
        res = session.execute(
            update(DeviceToken)
            .where(DeviceToken.token == token, DeviceToken.removed_at.is_(None))  # type: ignore[union-attr]
            .values(removed_at=utcnow(), removed_reason=reason)
        )
        session.commit()
        if not res.rowcount:  # type: ignore[attr-defined]
            raise NotFound(f"no live token {token[:12]}…")
