"""The bulk writers' own value conversion (``notifyctl.bulk``: SQLite's parameters, PostgreSQL's COPY
text) gives what each column's bind processor gives, value for value; ``new_ids`` makes ids as
``new_id`` does. (The rows these make, written and read back, are compared with Core's own insert in
test_foundations.)"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite

from notifyctl import bulk, db
from notifyctl.ids import _B32, new_ids
from notifyctl.models import Delivery, Notification, NotificationStatus

_T = Notification.__table__  # type: ignore[attr-defined]
_ZONES = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8)), ZoneInfo("Europe/Paris")]
# every year for UTC (the text's year is always 4 digits); other zones away from the calendar's ends
_AWARE = st.one_of(
    st.datetimes(timezones=st.just(UTC)),
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.sampled_from(_ZONES)),
)


def _processors(dialect: Any, column: str) -> tuple[Any, Any]:
    col_type = _T.c[column].type
    return col_type, col_type._cached_bind_processor(dialect)


@settings(max_examples=400, deadline=None)
@given(_AWARE)
def test_sqlite_datetime_text_is_the_bind_processors(v: datetime) -> None:
    col_type, proc = _processors(sqlite.dialect(), "due_at")
    assert bulk._fast_bind(col_type, sqlite.dialect(), proc)(v) == proc(v)


@settings(max_examples=400, deadline=None)
@given(_AWARE)
def test_copy_datetime_text_is_the_bind_processors(v: datetime) -> None:
    dialect = postgresql.psycopg2.dialect()  # type: ignore[attr-defined]
    col_type, proc = _processors(dialect, "due_at")
    assert bulk._copy_text(col_type, proc)(v) == bulk._copy_value(proc(v))


def _one_converter_each(values: list[datetime]) -> None:
    """One converter over the column (a statement's): each value's text its own processor's."""
    for dialect in (sqlite.dialect(), postgresql.psycopg2.dialect()):  # type: ignore[attr-defined]
        col_type, proc = _processors(dialect, "due_at")
        if dialect.name == "sqlite":
            conv = bulk._fast_bind(col_type, dialect, proc)
            assert list(map(conv, values)) == list(map(proc, values))
        else:
            conv = bulk._copy_text(col_type, proc)
            assert list(map(conv, values)) == [bulk._copy_value(proc(v)) for v in values]


@settings(max_examples=200, deadline=None)
@given(st.lists(_AWARE, max_size=10), st.lists(st.integers(-2_000_000, 2_000_000), max_size=20))
def test_one_converter_over_many_datetimes_gives_each_its_processors_text(
    starts: list[datetime], steps: list[int]
) -> None:
    """A converter makes a datetime's text to the second once per second: values in one second with
    other microseconds (zero among them), in other seconds, before 1970, each its processor's text."""
    lo, hi = datetime.min.replace(tzinfo=UTC) + timedelta(days=2), datetime.max.replace(tzinfo=UTC) - timedelta(days=2)
    _one_converter_each([v for s in starts for d in steps if lo < (v := s + timedelta(microseconds=d)) < hi])


def test_one_converter_over_more_seconds_than_it_remembers() -> None:
    now = datetime(2026, 12, 6, 11, 0, tzinfo=UTC)
    _one_converter_each([now + timedelta(microseconds=k * 250_000) for k in range(20_000)])  # 5,000 s, 4 a second


def test_a_naive_datetime_is_refused_as_the_bind_processor_refuses_it() -> None:
    naive = datetime(2026, 3, 29, 1, 30)
    for dialect in (sqlite.dialect(), postgresql.psycopg2.dialect()):  # type: ignore[attr-defined]
        col_type, proc = _processors(dialect, "due_at")
        fast = bulk._fast_bind(col_type, dialect, proc) if dialect.name == "sqlite" else bulk._copy_text(col_type, proc)
        with pytest.raises(ValueError, match="timezone"):
            proc(naive)
        with pytest.raises(ValueError, match="timezone"):
            fast(naive)


_SHARED = {"k": [1, 2]}
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([1.0, 0.0]),
    st.sampled_from([datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 5, 30, tzinfo=_ZONES[1])]),
    st.just(_SHARED),  # one object in many rows (a campaign's data)
    st.dictionaries(st.sampled_from("ab"), st.integers(0, 2), max_size=2),  # equal dicts, distinct objects
    st.text(max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_VALUES, max_size=200), st.booleans())
def test_convert_gives_one_call_per_value_results(values: list[Any], one_kind: bool) -> None:
    """Memoised or not, each value gets what its own call would give: ``True`` is not ``1``, equal
    dicts in distinct objects each converted. (A memo by value takes equal values to convert alike,
    as the bind processors do: the same instant in two zones is one UTC text.)"""
    if one_kind:  # a column of one type, repeating (a batch's timestamps)
        values = [v for v in values if type(v) is bool] * 3
    calls: list[Any] = []

    def conv(v: Any) -> str:
        calls.append(v)
        return f"{type(v).__name__}:{v.astimezone(UTC).isoformat() if isinstance(v, datetime) else v!r}"

    got = bulk._convert(values, conv)
    assert got == [None if v is None else conv(v) for v in values]


def test_convert_memoises_a_repeating_column_and_not_a_distinct_one() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    seen: list[Any] = []

    def conv(v: Any) -> str:
        seen.append(v)
        return str(v)

    bulk._convert([now] * 1000, conv)
    assert len(seen) == 1
    seen.clear()
    bulk._convert([now + timedelta(microseconds=i) for i in range(1000)], conv)
    assert len(seen) == 1000


def test_copy_column_escapes_and_nulls() -> None:
    """A JSON column's text (a processor's), a text column with COPY's four special characters and
    NULLs, and a text that reads like COPY's NULL marker."""
    engine = db.make_engine("postgresql+psycopg2://nobody@127.0.0.1:1/none")  # (never connects)
    try:
        dt = Delivery.__table__  # type: ignore[attr-defined]
        reason = dt.c.reason.type
        texts = bulk._copy_column(["a\tb", None, "\\N", "x\\y", "n\nl", "c\rr"], reason, None)
        assert texts == ["a\\tb", "\\N", "\\\\N", "x\\\\y", "n\\nl", "c\\rr"]
        data = _T.c.data.type
        proc = data._cached_bind_processor(engine.dialect)
        texts = bulk._copy_column([{"a": "t\tb"}, _SHARED, _SHARED], data, proc)
        assert texts == ['{"a":"t\\\\tb"}', '{"k":[1,2]}', '{"k":[1,2]}']
    finally:
        engine.dispose()


def test_new_ids_are_new_id_s() -> None:
    """``new_ids``: the format of ``new_id`` (prefix, 10 characters of the millisecond clock, 10
    random), all distinct, their time part the clock's when they were made."""
    before = int(time.time() * 1000)
    ids = new_ids("n", 5000)
    after = int(time.time() * 1000)
    assert len(ids) == 5000 == len(set(ids)) == len({i[12:] for i in ids})
    assert all(re.fullmatch(r"n_[0-9a-hjkmnp-tv-z]{20}", i) for i in ids)
    ms = 0
    for ch in ids[0][2:12]:
        ms = ms * 32 + _B32.index(ch)
    assert before <= ms <= after and {i[:12] for i in ids} == {ids[0][:12]}
    assert new_ids("job_l", 1)[0].startswith("job_l_") and len(new_ids("job_l", 1)[0]) == 26
    assert new_ids("n", 0) == []


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)  # (a lone surrogate: refused either way)
_ONE_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    _TEXT,
    st.sampled_from(["it's", "'", "''", "\x00", "a\x00b", "é'ü", "?", "NULL", "123", "1e3", " 7 "]),
    st.sampled_from(list(NotificationStatus)),
)
_CONSTANT_COLUMNS = ("recipient_id", "type", "template_id", "category", "priority", "channels", "dedup_key", "wave", "status",
           "reason", "job_id", "due_at", "created_at", "updated_at")  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(_ONE_VALUE, _ONE_VALUE, st.integers(1, 4))
def test_shared_constants_store_what_bound_values_store(a: Any, b: Any, n: int) -> None:
    """``prepare_counted_insert(shared=...)`` on SQLite: columns given once, written in the
    statement as literals, store what binding the same values on every row stores — its value and
    its storage class (the JSON and DATETIME columns' numeric affinity turns a text like "123" into
    an integer, for a literal as for a bound text) — whatever the text (quotes, NUL, "?",
    non-ASCII); the rows' own columns stay bound (id, data, campaign_id)."""
    got: dict[bool, Any] = {}
    for as_shared in (False, True):
        rows = [{"id": f"n{i}", "recipient_id": a, "type": b, "template_id": "t", "category": "c",
                 "priority": "low", "channels": ["email"], "data": {"i": 1}, "dedup_key": a, "campaign_id": f"c{i}",
                 "wave": a, "status": b, "reason": None, "job_id": a, "due_at": datetime(2026, 1, 1, tzinfo=UTC),
                 "created_at": datetime(2026, 1, 1, tzinfo=UTC), "updated_at": datetime(2026, 1, 1, tzinfo=UTC)}
                for i in range(n)]  # fmt: skip
        shared = {c: rows[0][c] for c in _CONSTANT_COLUMNS} if as_shared else {}
        own = [{c: v for c, v in row.items() if c not in shared} for row in rows]
        engine = db.make_engine("sqlite://")
        try:
            _T.create(engine)
            seen: list[str] = []
            with engine.connect() as conn:
                event.listen(conn, "before_cursor_execute", lambda *args, seen=seen: seen.append(args[2]))
                try:
                    with conn.begin():
                        bulk.prepare_counted_insert(engine, _T, own, shared=shared)(conn)
                except Exception as exc:  # noqa: BLE001 - what a bound value refuses, a literal refuses alike
                    got[as_shared] = type(exc).__name__
                    continue
            if as_shared:  # written in: the shared constants; bound: id, data, campaign_id
                assert "VALUES (?, ?, ?, " in seen[-1] and "'t', 'c', 'low', '[\"email\"]'" in seen[-1], seen[-1]
            cols = [c.name for c in _T.c]
            with engine.connect() as conn:
                sql = f"SELECT {', '.join(f'{c}, typeof({c})' for c in cols)} FROM notifications"
                got[as_shared] = sorted(map(tuple, conn.exec_driver_sql(sql).all()))
        finally:
            engine.dispose()
    assert got[True] == got[False]


def test_a_literal_only_for_one_value_of_one_type() -> None:
    """Equal values of two types (``1 == True == 1.0``) are stored apart: they stay bound; so do
    booleans, floats, bytes and texts SQL cannot hold."""
    lit = bulk._sqlite_literal
    assert (lit([1, 1]), lit(["it's"] * 2), lit([None] * 3), lit([NotificationStatus.queued] * 2)) == (
        "1", "'it''s'", "NULL", "'queued'")  # fmt: skip
    bound = [[1, True], [1, 1.0], [True, True], [0.5, 0.5], [b"x", b"x"], ["a", "b"], ["\x00"], ["\ud800"], ["é"], []]
    for values in bound:
        assert lit(values) is None, values
