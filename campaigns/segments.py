"""Segments: who a campaign goes to, streamed row by row (memory stays flat whatever the size).

- ``CsvSegment``: a CSV file with a ``user_id`` column; every other column becomes template data
  for that recipient. Read line by line from the raw bytes, so a line that is not UTF-8 is one
  bad row, not the end of the file.
- ``SqlSegment``: ``SELECT user_id, ... FROM ...`` (or ``WITH ... SELECT ...``) against the
  tracking database or another URL, through a server-side cursor (``stream_results``), in a
  read-only transaction (PostgreSQL ``SET TRANSACTION READ ONLY``, SQLite ``PRAGMA query_only``)
  on a private engine. Anything but one read-only query is refused before it runs. The query may
  work at most ``timeout`` seconds for each row it produces (PostgreSQL ``statement_timeout``,
  which applies to each fetch of the cursor; SQLite a progress handler), and SQLite builds no
  value longer than ``max_value`` bytes (``SQLITE_LIMIT_LENGTH``).

Bad rows (malformed line, bad encoding, empty user_id, a value longer than ``max_value``; unknown
users and duplicates are found by the launcher) are recorded in ``BadRows`` with their line (CSV)
or row (SQL) number and skipped.
"""

from __future__ import annotations

import csv
import math
import re
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from itertools import islice
from pathlib import Path
from time import monotonic
from typing import Any

from notifyctl.db import make_engine
from notifyctl.errors import ConfigError, InputError
from notifyctl.identifiers import MAX_ID, check_user_id


@dataclass(slots=True)
class SegmentRow:
    line: int  # CSV line number (1 = header) or SQL row number (1 = first row)
    user_id: str
    extras: dict[str, Any]


@dataclass
class BadRows:
    keep: int = 100
    count: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    first: list[dict[str, Any]] = field(default_factory=list)

    def add(self, line: int, kind: str, message: str) -> None:
        self.count += 1
        self.by_kind[kind] += 1
        if len(self.first) < self.keep:
            self.first.append({"line": line, "kind": kind, "message": message})

    def merge(self, other: BadRows) -> None:
        """Add ``other``'s rows; the rows kept are the first ones by line."""
        self.count += other.count
        self.by_kind.update(other.by_kind)
        self.first = sorted(self.first + other.first, key=lambda b: b["line"])[: self.keep]

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "by_kind": dict(self.by_kind), "first": self.first}


class CsvSegment:
    kind = "csv"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_file():
            raise InputError(f"--segment-csv: no such file {str(path)!r}")
        with self.path.open("rb") as f:
            first = f.readline()
        try:
            header_line = first.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InputError(f"--segment-csv: the header line of {self.path.name} is not UTF-8") from None
        header = next(csv.reader([header_line]), [])
        self.header = [h.strip() for h in header]
        if "user_id" not in self.header:
            has = ", ".join(h for h in self.header if h) or "nothing"
            raise InputError(f"--segment-csv: header lacks a user_id column (has: {has})")
        for name, n in Counter(h for h in self.header if h).items():
            if n > 1:
                at = ", ".join(str(i) for i, h in enumerate(self.header, start=1) if h == name)
                raise InputError(f"--segment-csv: column {name!r} appears {n} times in the header (columns {at})")

    def describe(self) -> str:
        return str(self.path)

    def rows(self, bad: BadRows) -> Iterator[SegmentRow]:
        uid_at = self.header.index("user_id")
        width = len(self.header)
        keep = [(i, k) for i, k in enumerate(self.header) if k and k != "user_id"]  # the columns a row's data takes
        at = [0]  # the line the reader is on

        def lines(f: Iterable[bytes]) -> Iterator[str]:
            next(iter(f), None)  # the header, checked in __init__
            for i, raw in enumerate(f, start=2):
                at[0] = i
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    bad.add(i, "encoding", f"not UTF-8 ({exc.reason} at byte {exc.start})")

        with self.path.open("rb") as f:
            reader = csv.reader(lines(f))
            while True:
                try:
                    rec = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    bad.add(at[0], "malformed", f"malformed CSV: {exc}")
                    continue
                line = at[0]
                if len(rec) != width or not rec[uid_at].strip():  # (a row as it should be skips these checks)
                    if not rec or not any(v.strip() for v in rec):
                        continue  # blank line
                    if len(rec) != width:
                        bad.add(line, "malformed", f"{len(rec)} fields, the header has {width}")
                        continue
                uid = rec[uid_at]
                # an id check_user_id returns as it is, told without its calls: printable (so no
                # whitespace but spaces: strip() leaves it alone when none is at either end), not
                # empty, not too long; any other goes through it
                if not (uid and uid.isprintable() and len(uid) <= MAX_ID and uid[0] != " " and uid[-1] != " "):
                    try:
                        uid = check_user_id(uid)
                    except InputError as exc:
                        bad.add(line, "malformed", str(exc))
                        continue
                yield SegmentRow(line, uid, {k: rec[i] for i, k in keep})


_LITERALS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\$\$.*?\$\$", re.S)
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)


_WRITES = re.compile(r"(?i)\b(insert|update|delete|merge)\b")


def check_select(sql: str) -> str:
    """The query without a trailing ``;``, or InputError unless it is one read-only query: a
    SELECT, or a WITH whose every part is a SELECT (PostgreSQL lets a WITH hold an INSERT,
    UPDATE, DELETE or MERGE: refused). The read-only transaction it runs in is the real guard;
    this says what is wrong before it runs."""
    text = (sql or "").strip()
    if not text:
        raise InputError("--segment-sql: empty query")
    shape = _COMMENTS.sub(" ", _LITERALS.sub("''", text)).strip()
    if shape.endswith(";"):
        shape = shape.rstrip(";").rstrip()
        text = text.rstrip().rstrip(";").rstrip()
    if ";" in shape:
        raise InputError("--segment-sql: one statement only (found ';' inside the query)")
    if not re.match(r"(?i)^\(*\s*(select|with)\b", shape):
        raise InputError("--segment-sql: only a SELECT is allowed (e.g. SELECT user_id, first_name FROM ...)")
    if re.search(r"(?i)\bfor\s+(update|share|no\s+key\s+update|key\s+share)\b", shape):
        raise InputError("--segment-sql: row locks (FOR UPDATE/SHARE) are not allowed")
    found = _WRITES.search(shape)
    if found:
        raise InputError(f"--segment-sql: the query writes ({found.group(1).upper()}); only reading is allowed")
    if re.search(r"(?i)\binto\b", shape):
        raise InputError("--segment-sql: SELECT ... INTO writes a table; only a plain SELECT is allowed")
    return text


def _jsonable(v: Any) -> Any:
    if type(v) is float and not math.isfinite(v):
        return None  # NaN/Infinity: what the JSON columns would store anyway
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    return str(v)


def _mask(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for display
        return "<unparsable URL>"


class SqlSegment:
    kind = "sql"

    def __init__(
        self,
        sql: str,
        url: str,
        chunk: int = 1000,
        label: str | None = None,
        timeout: float = 60.0,
        max_value: int = 1_000_000,
    ) -> None:
        self.sql = check_select(sql)
        self.url = url
        self.chunk = chunk
        self.label = label or _mask(url)
        self.timeout = timeout
        self.max_value = max_value
        if url.startswith("sqlite"):
            from sqlalchemy.engine import make_url

            try:
                db = make_url(url).database
            except Exception:  # noqa: BLE001
                raise InputError("--segment-db: not a database URL") from None
            if db and db != ":memory:" and not Path(db).is_file():
                raise InputError(f"--segment-db: no SQLite database at {db!r}")

    def describe(self) -> str:
        return f"{self.label}: {self.sql}"

    def _problem(self, exc: Exception, clock: _Clock) -> str:
        """What went wrong, in the user's terms: the time or size bound, else the database's words."""
        orig = getattr(exc, "orig", None) or exc
        if clock.fired or getattr(orig, "pgcode", None) == "57014":  # our deadline; query_canceled
            return (
                f"the query worked longer than {self.timeout:g} s for one row "
                "(segment_timeout; a query that never ends, or one that needs an index)"
            )
        if isinstance(orig, sqlite3.DataError) or "too big" in str(orig):
            return f"the query makes a value longer than {self.max_value:,} bytes (segment_max_value)"
        return _first_line(exc)

    def rows(self, bad: BadRows) -> Iterator[SegmentRow]:
        from sqlalchemy import text
        from sqlalchemy.exc import ArgumentError, DBAPIError, StatementError

        try:
            engine = make_engine(self.url)
        except ConfigError as exc:
            raise InputError(f"--segment-db: {exc}") from None
        clock = _Clock(self.timeout)
        dialect = engine.dialect.name
        try:
            with engine.connect() as conn:
                try:
                    if dialect == "postgresql":
                        conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                        # per statement: each FETCH of the server-side cursor is one
                        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, int(self.timeout * 1000))}")
                    elif dialect == "sqlite":
                        conn.exec_driver_sql("PRAGMA query_only = ON")
                        raw = conn.connection.driver_connection
                        assert isinstance(raw, sqlite3.Connection)  # the sqlite dialect's DBAPI connection
                        raw.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self.max_value)
                        raw.set_progress_handler(clock.expired, 1000)
                    clock.start()
                    result = conn.execution_options(stream_results=True, yield_per=self.chunk).execute(text(self.sql))
                except (DBAPIError, StatementError, ArgumentError) as exc:
                    raise InputError(f"--segment-sql: {self._problem(exc, clock)}") from None
                names = [str(k) for k in result.keys()]
                if "user_id" not in names:
                    result.close()
                    raise InputError(f"--segment-sql: the query returns no user_id column (it has: {', '.join(names)})")
                uid_at = names.index("user_id")
                n = 0
                try:
                    for row in result:
                        n += 1
                        raw_uid = row[uid_at]
                        try:
                            uid = check_user_id("" if raw_uid is None else str(raw_uid))
                        except InputError as exc:
                            bad.add(n, "malformed", str(exc))
                            continue
                        extras = {names[i]: _jsonable(v) for i, v in enumerate(row) if i != uid_at}
                        long = _too_long(extras, self.max_value)
                        if long is not None:
                            bad.add(n, "too_long", f"{long} is longer than {self.max_value:,} characters")
                            continue
                        yield SegmentRow(n, uid, extras)
                        clock.start()  # the time the launcher spent on the row is not the query's
                except DBAPIError as exc:
                    raise InputError(f"--segment-sql: failed at row {n + 1}: {self._problem(exc, clock)}") from None
                finally:
                    if dialect == "postgresql":
                        conn.rollback()
        finally:
            engine.dispose()


def _too_long(extras: dict[str, Any], limit: int) -> str | None:
    for k, v in extras.items():
        if type(v) is str and len(v) > limit:
            return k
    return None


class _Clock:
    """A deadline for the database's work on the next row (SQLite's progress handler asks it)."""

    __slots__ = ("timeout", "deadline", "fired")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.deadline = 0.0
        self.fired = False

    def start(self) -> None:
        self.deadline = monotonic() + self.timeout

    def expired(self) -> bool:
        if monotonic() > self.deadline:
            self.fired = True
            return True  # non-zero: SQLite interrupts the statement
        return False


def _first_line(exc: Exception) -> str:
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def chunked(rows: Iterable[SegmentRow], size: int) -> Iterator[list[SegmentRow]]:
    """``rows`` in lists of ``size`` (the last one shorter), each made by ``islice`` in C, not an
    append and a length check a row."""
    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk
