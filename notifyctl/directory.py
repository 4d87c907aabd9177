"""One module: the recipient directory, every write of who a user is and how to reach them (users and
their CSV import, opt-outs, device tokens), under one set of checks; ~470 lines.

Users, their preferences (opt-outs) and device tokens."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

import phonenumbers
import pytz
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col

from notifyctl.context import Context
from notifyctl.db import write_lock
from notifyctl.errors import InputError, NotFound
from notifyctl.identifiers import check_email, check_platform, check_text_id, check_token, check_user_id
from notifyctl.models import DeviceToken, OptOut, User, utcnow
from notifyctl.settings import CATEGORIES, CHANNELS

REQUIRED_COLUMNS = ("user_id",)
KNOWN_COLUMNS = ("user_id", "email", "phone", "timezone", "locale", "sms_opt_in")
USER_UPDATE_COLS = ["email", "phone", "timezone", "locale", "sms_opt_in", "attributes", "updated_at"]
_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"", "0", "false", "no", "n", "off"}


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


def build_user_row(raw: dict[str, str | None], region: str, default_tz: str) -> dict[str, Any]:
    uid = check_user_id(raw.get("user_id") or "")
    email = (raw.get("email") or "").strip() or None
    if email:
        email = check_email(email)
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
        text = io.TextIOWrapper(cast(BinaryIO, stream), encoding="utf-8-sig", errors="surrogateescape", newline="")
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


def iter_csv(
    stream: io.TextIOBase | Iterable[str],
) -> Iterator[tuple[int, dict[str, str | None], list[str] | None]]:
    """(line number, row, the fields beyond the header or None) for each row after the header."""
    reader = csv.DictReader(stream)
    if reader.fieldnames is None:
        raise InputError("CSV is empty: expected a header line with user_id")
    fields = [f.strip() if f else f for f in reader.fieldnames]
    reader.fieldnames = fields
    for name, n in Counter(f for f in fields if f).items():
        if n > 1:
            at = ", ".join(str(i) for i, f in enumerate(fields, start=1) if f == name)
            raise InputError(f"CSV header: column {name!r} appears {n} times (columns {at})")
    missing = [c for c in REQUIRED_COLUMNS if c not in fields]
    if missing:
        raise InputError(f"CSV header lacks column {', '.join(missing)} (has: {', '.join(f for f in fields if f)})")
    for row in reader:
        extra = cast("list[str] | None", row.pop(None, None))  # DictReader's restkey holds a list
        yield reader.line_num, row, extra


def import_users(
    ctx: Context, stream: Any, batch: int = 1000, progress: Callable[[int], None] | None = None
) -> ImportReport:
    """Upsert users from CSV; bad rows are reported with their line number and skipped. A user's
    second row in the same file is such a bad row: the first one is kept (a file that names a
    user twice is a mistake a careful user wants to hear about, not a silent last-wins).
    ``progress(rows read so far)`` is called after each batch is written."""
    s = ctx.settings
    report = ImportReport()
    rows: dict[str, dict[str, Any]] = {}
    first_line: dict[str, int] = {}  # user id → the line that gave it
    bad_lines: dict[int, str] = {}
    previous = 1
    with Session(ctx.engine) as session:

        def write() -> None:
            upsert(session, User, list(rows.values()), ["id"], USER_UPDATE_COLS)
            report.imported += len(rows)
            rows.clear()

        try:
            for line, raw, extra in iter_csv(decoded_lines(stream, bad_lines)):
                first, previous = previous + 1, line
                bad = next((bad_lines[n] for n in range(first, line + 1) if n in bad_lines), None)
                if bad:
                    report.errors.append((line, bad))
                    continue
                if extra is not None:
                    report.errors.append((line, f"{len(extra) if extra else 0} more fields than the header"))
                    continue
                try:
                    row = build_user_row(raw, s.default_region, s.default_timezone)
                except InputError as exc:
                    report.errors.append((line, str(exc)))
                    continue
                seen = first_line.setdefault(row["id"], line)
                if seen != line:
                    report.errors.append((line, f"user {row['id']!r} is also on line {seen}; that first row is kept"))
                    continue
                rows[row["id"]] = row
                if len(rows) >= batch:
                    write()
                    if progress is not None:
                        progress(report.imported + len(report.errors))
        except csv.Error as exc:
            report.errors.append((-1, f"malformed CSV: {exc}; rest of the file skipped"))
        write()
        session.commit()
    if progress is not None:
        progress(report.imported + len(report.errors))
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
                delete(OptOut).where(
                    col(OptOut.user_id) == user_id, col(OptOut.channel) == ch, col(OptOut.category) == cat
                )
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
        return [
            (o.channel, o.category)
            for o in session.scalars(
                select(OptOut).where(col(OptOut.user_id) == user_id).order_by(col(OptOut.channel), col(OptOut.category))
            )
        ]


def show_user(ctx: Context, user_id: str) -> dict[str, Any]:
    with Session(ctx.engine) as session:
        u = get_user(session, user_id)
        opt = session.scalars(select(OptOut).where(col(OptOut.user_id) == user_id)).all()
        toks = session.scalars(select(DeviceToken).where(col(DeviceToken.user_id) == user_id)).all()
        return {
            "user": u.model_dump(),
            "opt_outs": [o.model_dump() for o in opt],
            "tokens": [t.model_dump() for t in toks],
        }


MAX_LIST = 10000


def list_users(
    ctx: Context,
    *,
    after: str | None = None,
    limit: int = 50,
    search: str | None = None,
    timezone: str | None = None,
    locale: str | None = None,
    push: bool | None = None,
    opted_out: str | None = None,
) -> list[dict[str, Any]]:
    """Users in id order, a page at a time (``after``: the last id of the previous page), each with
    its number of live push tokens and its opt-outs (``channel:category``).

    Filters: ``search`` (part of the id or email, any case), ``timezone``, ``locale``, ``push``
    (True: with a live push token, False: without), ``opted_out`` (a preference as ``prefs set``
    takes it: ``marketing``, ``sms``, ``email:marketing``)."""
    if not 1 <= limit <= MAX_LIST:
        raise InputError(f"--limit: must be between 1 and {MAX_LIST}, got {limit}")
    q = select(User).order_by(col(User.id)).limit(limit)
    if after is not None:
        q = q.where(col(User.id) > after)
    if search:
        pattern = "%" + search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        q = q.where(
            or_(
                func.lower(col(User.id)).like(pattern, escape="\\"),
                func.lower(func.coalesce(col(User.email), "")).like(pattern, escape="\\"),
            )
        )
    if timezone:
        q = q.where(col(User.timezone) == check_timezone(timezone))
    if locale:
        q = q.where(col(User.locale) == locale)
    live_token = select(col(DeviceToken.user_id)).where(col(DeviceToken.removed_at).is_(None))
    if push is True:
        q = q.where(col(User.id).in_(live_token))
    elif push is False:
        q = q.where(col(User.id).not_in(live_token))
    if opted_out:
        ch, cat = parse_pref(opted_out)
        q = q.where(
            col(User.id).in_(select(col(OptOut.user_id)).where(col(OptOut.channel) == ch, col(OptOut.category) == cat))
        )
    with Session(ctx.engine) as session:
        users = list(session.scalars(q))
        ids = [u.id for u in users]
        tokens: dict[str, int] = {}
        opts: dict[str, list[str]] = {}
        if ids:
            tokens = dict(
                session.execute(
                    select(col(DeviceToken.user_id), func.count())
                    .where(col(DeviceToken.user_id).in_(ids), col(DeviceToken.removed_at).is_(None))
                    .group_by(col(DeviceToken.user_id))
                ).all()
            )
            for o in session.execute(
                select(col(OptOut.user_id), col(OptOut.channel), col(OptOut.category))
                .where(col(OptOut.user_id).in_(ids))
                .order_by(col(OptOut.user_id), col(OptOut.channel), col(OptOut.category))
            ):
                opts.setdefault(o.user_id, []).append(f"{o.channel}:{o.category}")
        return [{**u.model_dump(), "push_tokens": tokens.get(u.id, 0), "opt_outs": opts.get(u.id, [])} for u in users]


@dataclass
class Registration:
    """What ``register_device`` did: the live token, the tokens it retired as ``replaced``, and
    whether ``replaces`` named a token never registered (then nothing was retired for it)."""

    token: DeviceToken
    replaced: list[str] = field(default_factory=list)
    replaces_unknown: bool = False


MAX_CHAIN = 16  # replaced_by hops followed: a device re-registering in a loop must not loop us


def register_device(
    ctx: Context,
    user_id: str,
    token: str,
    platform: str,
    *,
    replaces: str | None = None,
    device_id: str | None = None,
) -> Registration:
    """Register (or re-activate) a push token for a user, retiring what it replaces in the same
    transaction, so a send loads either the old token or the new one, never both.

    ``replaces``: the token this device had before (a reinstall, a restore, a rotation): it, and
    whatever already replaced it, are retired with the reason ``replaced``. ``device_id``: the
    app's own id for the device; every other live token of this user on that device is retired
    the same way (a token that names what it replaces inherits that one's device id). Retired
    tokens point at the new one (``replaced_by``): deliveries already fanned out to them go to it.

    Checks, in order: the platform, the user (NotFound), the token's shape for its platform
    (``identifiers.check_token``), ``replaces`` and ``device_id``; nothing is written unless all pass.
    """
    platform = check_platform(platform)
    # Two registrations racing for one device must not each miss the other's new token: one per
    # user at a time (PostgreSQL: the user's row locked; SQLite: the writer lock, reads included).
    with write_lock(ctx.engine), Session(ctx.engine, expire_on_commit=False) as session:
        if session.execute(select(col(User.id)).where(col(User.id) == user_id).with_for_update()).first() is None:
            raise NotFound(f"no user {user_id!r}")
        token = check_token(token, platform)
        dev = check_text_id(device_id, "device_id") if device_id is not None else None
        retire: set[str] = set()
        replaces_unknown = False
        if platform == "ios":  # the same APNs token stored in another case (as given, before): same device
            for variant in session.scalars(
                select(DeviceToken).where(
                    col(DeviceToken.user_id) == user_id,
                    func.lower(col(DeviceToken.token)) == token,
                    col(DeviceToken.token) != token,
                )
            ):
                retire.add(variant.token)
                dev = dev or variant.device_id
        if replaces is not None:
            old_key = check_text_id(replaces, "replaces", max_len=512)
            old = session.get(DeviceToken, old_key) or session.get(DeviceToken, old_key.lower())
            if old is None:
                replaces_unknown = True
            else:
                if old.token == token:
                    raise InputError("replaces: names the token being registered")
                if old.user_id != user_id:
                    raise InputError(f"replaces: token {old.token[:12]}… is not one of {user_id!r}'s")
                dev = dev or old.device_id
                # the device may have changed tokens more than once: the live end of the chain goes too
                for _ in range(MAX_CHAIN):
                    if old.user_id == user_id and old.token != token:
                        retire.add(old.token)
                    nxt = session.get(DeviceToken, old.replaced_by) if old.replaced_by else None
                    if nxt is None:
                        break
                    old = nxt
        t = session.get(DeviceToken, token)
        if t is None:
            t = DeviceToken(token=token, user_id=user_id, platform=platform, device_id=dev)
            session.add(t)
        else:  # re-registration: the token moves to this user and is live again
            t.user_id, t.platform, t.removed_at, t.removed_reason, t.replaced_by = user_id, platform, None, None, None
            t.device_id = dev or t.device_id
        session.flush()
        live = col(DeviceToken.removed_at).is_(None)
        now = utcnow()
        retired: list[str] = []
        if retire:
            retired += session.scalars(
                update(DeviceToken)
                .where(col(DeviceToken.token).in_(sorted(retire)), live)
                .values(removed_at=now, removed_reason="replaced", replaced_by=token)
                .returning(col(DeviceToken.token))
            )
        if t.device_id:
            retired += session.scalars(
                update(DeviceToken)
                .where(
                    col(DeviceToken.user_id) == user_id,
                    col(DeviceToken.device_id) == t.device_id,
                    col(DeviceToken.token) != token,
                    live,
                )
                .values(removed_at=now, removed_reason="replaced", replaced_by=token)
                .returning(col(DeviceToken.token))
            )
        session.commit()
        return Registration(t, sorted(set(retired)), replaces_unknown)


def register_token(ctx: Context, user_id: str, token: str, platform: str) -> DeviceToken:
    """``register_device`` without a replacement: the registered token."""
    return register_device(ctx, user_id, token, platform).token


def list_tokens(ctx: Context, user_id: str | None = None, include_removed: bool = False) -> list[DeviceToken]:
    with Session(ctx.engine) as session:
        q = select(DeviceToken).order_by(col(DeviceToken.user_id), col(DeviceToken.created_at))
        if user_id:
            q = q.where(col(DeviceToken.user_id) == user_id)
        if not include_removed:
            q = q.where(col(DeviceToken.removed_at).is_(None))
        return list(session.scalars(q))


def revoke_token(ctx: Context, token: str, reason: str = "revoked by operator") -> None:
    token = token.strip()
    with Session(ctx.engine) as session:
        res = session.execute(
            update(DeviceToken)
            .where(
                col(DeviceToken.token).in_({token, token.lower()}),  # APNs tokens are kept lower-case
                col(DeviceToken.removed_at).is_(None),
            )
            .values(removed_at=utcnow(), removed_reason=reason)
        )
        session.commit()
        if not res.rowcount:  # type: ignore[attr-defined]
            raise NotFound(f"no live token {token[:12]}…")
