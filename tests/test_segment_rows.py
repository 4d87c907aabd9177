"""A CSV segment's user ids (``campaigns.segments.CsvSegment.rows``): each row's id is what
``check_user_id`` makes of its cell, or the row is reported with that check's own message, whether
the id went through the check or was told plain without it; and the rows come in chunks of the
launch's size (``chunked``), none lost, none empty."""

from __future__ import annotations

import csv
from pathlib import Path

from campaigns.segments import BadRows, CsvSegment, chunked
from notifyctl.errors import InputError
from notifyctl.identifiers import MAX_ID, check_user_id

# plain ids and every edge of the plain case: spaces at either end or inside, Unicode spaces (not
# printable, stripped by str.strip), invisible formatting, control characters, the length limit
IDS = [
    "u1", "alice@example.com", "ünïcødé", "名前", "a b", " lead", "trail ", "  both  ", "\u00a0nbsp",
    "nbsp\u00a0", "\u3000ideo", "zero\u200bwidth", "rtl\u202eoverride", "tab\tin", "\x7fdel", "x" * MAX_ID,
    "y" * (MAX_ID + 1), " " + "z" * MAX_ID, "é" * MAX_ID, "-", "0",
]  # fmt: skip


def test_each_id_is_what_check_user_id_makes_of_it(tmp_path: Path) -> None:
    path = tmp_path / "seg.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "code"])
        w.writerows([uid, f"c{i}"] for i, uid in enumerate(IDS))
    bad = BadRows()
    rows = list(CsvSegment(path).rows(bad))
    want_rows, want_bad = [], []
    for i, uid in enumerate(IDS):
        line = i + 2
        try:
            want_rows.append((line, check_user_id(uid), {"code": f"c{i}"}))
        except InputError as exc:
            want_bad.append({"line": line, "kind": "malformed", "message": str(exc)})
    assert [(r.line, r.user_id, r.extras) for r in rows] == want_rows
    assert bad.first == want_bad and bad.count == len(want_bad)
    assert len(want_rows) > 10 and len(want_bad) > 3  # (both kinds are exercised)


def test_chunks_hold_every_row_in_order() -> None:
    for n in (0, 1, 999, 1000, 1001, 2500):
        chunks = list(chunked(iter(range(n)), 1000))  # type: ignore[arg-type]
        assert [len(c) for c in chunks] == [1000] * (n // 1000) + ([n % 1000] if n % 1000 else [])
        assert [x for c in chunks for x in c] == list(range(n))
