"""What many rendered bodies share, and what differs per recipient: the cut that lets a provider with
per-recipient substitutions (SendGrid's ``substitutions``, SES's ``ReplacementTemplateData``) send
one body for a whole batch while each recipient gets exactly what was rendered for them.

Vendor-neutral: each vendor spells its keys (``key_format``) and checks its own size limits.
"""

from __future__ import annotations


def _common_prefix(values: list[str]) -> int:
    lo, hi = min(values), max(values)  # every value's common prefix is that of these two
    n = min(len(lo), len(hi))
    if lo[:n] == hi[:n]:
        return n
    a, b = 0, n  # binary search on slices: C-speed comparisons, O(log n) of them
    while a < b:
        mid = (a + b + 1) // 2
        if lo[:mid] == hi[:mid]:
            a = mid
        else:
            b = mid - 1
    return a


def _common_suffix(values: list[str]) -> int:
    return _common_prefix([v[::-1] for v in values])


def skeleton(
    bodies: list[str], first_key: int = 0, key_format: str = "[%sg{}%]"
) -> tuple[str, list[str], list[list[str]]]:
    """What ``bodies`` share, with a key where they differ: (skeleton, keys, each body's value per
    key), such that replacing each key of the skeleton by a body's values gives that body back.

    Linear in the total size: the bodies are compared line by line — the lines they share at the
    start and the end, then, when their middles have as many lines, each line position (a run
    of differing lines is one key) — and each key's values are trimmed of what they all start
    and end with. Middles of different lengths (a loop over per-recipient items) are compared by
    line position from their start and from their end, split where that shares the most lines,
    and what lies between (each body's own number of lines) is one key with its neighbours.
    ``key_format``: how the n-th key is spelled (SendGrid's ``[%sg0%]``, SES's ``{{s0}}``)."""
    if not bodies:
        return "", [], []
    lines = [b.splitlines(keepends=True) for b in bodies]  # joined back with "": exactly the body
    shortest = min(len(ls) for ls in lines)
    head = 0
    for column in zip(*lines, strict=False):
        if column.count(column[0]) != len(column):
            break
        head += 1
    tail = 0
    for column in zip(*[ls[::-1] for ls in lines], strict=False):
        if tail >= shortest - head or column.count(column[0]) != len(column):
            break
        tail += 1
    middles = [ls[head : len(ls) - tail] for ls in lines]
    # the skeleton as pieces: shared text (str), or a run of differing lines (list: its columns,
    # each a tuple of one line per body)
    pieces: list[str | list[tuple[str, ...]]] = ["".join(lines[0][:head])]
    run: list[tuple[str, ...]] | None = None
    for column in _columns(middles):
        if column.count(column[0]) == len(column):
            run = None
            pieces.append(column[0])
        elif run is None:
            run = [column]
            pieces.append(run)
        else:
            run.append(column)
    pieces.append("".join(lines[0][len(lines[0]) - tail :]) if tail else "")
    out: list[str] = []
    keys: list[str] = []
    values: list[list[str]] = [[] for _ in bodies]
    for piece in pieces:
        if isinstance(piece, str):
            out.append(piece)
            continue
        joined = list(piece[0]) if len(piece) == 1 else ["".join(lines) for lines in zip(*piece, strict=True)]
        pre = _common_prefix(joined)
        rest = [v[pre:] for v in joined]
        post = _common_suffix(rest)
        key = key_format.format(first_key + len(keys))
        keys.append(key)
        out.append(joined[0][:pre] + key + rest[0][len(rest[0]) - post :])
        for own, v in zip(values, rest, strict=True):
            own.append(v[: len(v) - post])
    return "".join(out), keys, values


def _columns(middles: list[list[str]]) -> list[tuple[str, ...]]:
    """The middles as columns, one line per body each. Of middles with as many lines, every line
    position; otherwise the first ``f`` and the last ``t`` positions of every middle (``f + t`` the
    shortest middle's length, split where most of those columns are shared), with one column
    between them holding each body's remaining lines joined."""
    short = min(len(m) for m in middles)
    if all(len(m) == short for m in middles):
        return list(zip(*middles, strict=True))
    front = [c.count(c[0]) == len(c) for c in zip(*[m[:short] for m in middles], strict=True)]
    back = [c.count(c[0]) == len(c) for c in zip(*[m[::-1][:short] for m in middles], strict=True)]
    best, f = -1, 0
    shared_front = 0
    shared_back = sum(back)
    for cut in range(short + 1):  # cut lines from the front, short - cut from the back
        if cut:
            shared_front += front[cut - 1]
            shared_back -= back[short - cut]
        if shared_front + shared_back > best:
            best, f = shared_front + shared_back, cut
    t = short - f
    columns = list(zip(*[m[:f] for m in middles], strict=True))
    columns.append(tuple("".join(m[f : len(m) - t]) for m in middles))
    columns += list(zip(*[m[len(m) - t :] for m in middles], strict=True))
    return columns
