"""One module: the render limits and every check that enforces them, kept together so that a new filter
or method is bounded in the same place; ~400 lines.

The limits a template render is held to (a template author cannot take a worker or ``send``
down with them), and the checks that enforce them; ``notifyctl.template_env`` builds the
environment that calls them. Per render:

- ``MAX_TEXT`` characters for any string a template builds — with ``*``, ``+``, ``%``, ``~``,
  a filter (``center``, ``indent``, ``join``, ``replace``, ``format``, ``wordwrap``, ...), a
  method (``ljust``, ``zfill``, ``replace``, ``join``, ``format``, ...), ``lipsum`` — and the same
  number of items for any list, tuple or dict (counted as printed: nested and repeated ones
  count each time); checked *before* the allocation where one call could allocate gigabytes;
- ``MAX_TEXT`` characters per rendered part (checked by ``notifyctl.templates``);
- ``MAX_STEPS`` loop iterations plus calls, and ``RENDER_SECONDS`` of wall-clock time, checked at
  each of them; ``MAX_DEPTH`` nested macro calls;
- ``MAX_OUTPUT`` characters printed in all (macros and ``{% set %}`` blocks included), counted in
  templates that have loops or macros (elsewhere the output is as long as the template is);
- ``MAX_INT_BITS`` for integers made with ``*`` and ``**``.

A limit that is hit raises ``RenderLimit`` (one line); ``notifyctl.templates`` names the template,
channel and part.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable
from string import Formatter
from time import monotonic
from typing import Any

from jinja2.runtime import markup_join, str_join
from jinja2.utils import Cycler, Namespace, generate_lorem_ipsum

from notifyctl.template_null import NullValue

MAX_TEXT = 1_000_000  # characters in one built string or rendered part; items in one list
COUNTED_OVER = 20  # printed expressions beyond which a template counts its output
MAX_OUTPUT = COUNTED_OVER * MAX_TEXT  # characters printed in one render, where counted
MAX_STEPS = 100_000  # loop iterations + calls in one render
MAX_DEPTH = 50  # nested macro calls
RENDER_SECONDS = 1.0  # wall-clock time of one render
MAX_INT_BITS = 10_000  # integers made with * and ** (about 3,000 digits)
LIPSUM_WORDS = 10_000


class RenderLimit(Exception):
    """A template went over one of the limits above; ``str(e)`` says which, in one line."""


# ---------------------------------------------------------------------------------------------- the budget


def tick(ctx: Any) -> None:
    n = ctx.steps = ctx.steps + 1
    if n == 1:
        ctx.deadline = monotonic() + RENDER_SECONDS
    elif n > MAX_STEPS:
        raise RenderLimit(f"too much work: more than {MAX_STEPS:,} loop iterations and calls")
    elif monotonic() > ctx.deadline:
        raise RenderLimit(f"took longer than {RENDER_SECONDS:g} s")


def count_printed(ctx: Any, text: str) -> str:
    n = ctx.printed = ctx.printed + len(text)
    if n > MAX_OUTPUT:
        raise RenderLimit(f"prints more than {MAX_OUTPUT:,} characters in all")
    return text


# ------------------------------------------------------------------------------------------- size checks


def too_big(value: Any, limit: int = MAX_TEXT) -> bool:
    """Whether ``value`` printed (its ``str``; a container's repr, shared parts counted each time
    they appear) could exceed ``limit`` characters. Walks at most about ``limit`` nodes."""
    if isinstance(value, str):
        return len(value) > limit
    budget = limit
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (str, bytes)):
            budget -= len(v) + 2
        elif isinstance(v, (list, tuple, set, frozenset, dict)):
            budget -= 2 * len(v) + 2
            if budget < 0:
                return True
            if isinstance(v, dict):
                stack.extend(v.keys())
                stack.extend(v.values())
            else:
                stack.extend(v)
        elif isinstance(v, Namespace):
            stack.append(object.__getattribute__(v, "_Namespace__attrs"))
        elif isinstance(v, Cycler):
            stack.append(v.items)
        elif isinstance(v, int):
            budget -= v.bit_length() // 3 + 1
        else:
            budget -= 1
        if budget < 0:
            return True
    return False


def checked(value: Any, what: str) -> Any:
    """``value`` once it is known not to be too big (and null as ``NullValue``)."""
    if value is None or (type(value) is float and not math.isfinite(value)):
        return NullValue(hint=f"a value: {what} returned null")
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise RenderLimit(f"{what} makes a string longer than {MAX_TEXT:,} characters")
    elif isinstance(value, (list, tuple, set, frozenset, dict, Namespace)) and too_big(value):
        raise RenderLimit(f"{what} makes a value longer than {MAX_TEXT:,} characters or items")
    return value


def _over(size: int, what: str) -> None:
    if size > MAX_TEXT:
        raise RenderLimit(f"{what} would make a string longer than {MAX_TEXT:,} characters")


def _int_arg(value: Any, what: str) -> None:
    if isinstance(value, int) and value > MAX_TEXT:
        raise RenderLimit(f"{what} {value} is over the limit of {MAX_TEXT:,}")


def _check_args(args: Iterable[Any], what: str) -> None:
    for a in args:
        if not isinstance(a, (int, float)) and too_big(a):
            raise RenderLimit(f"{what}: an argument is longer than {MAX_TEXT:,} characters")


_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.)", re.S)


def check_printf(fmt: str, args: Any, what: str) -> None:
    """``fmt % args`` (also the ``format`` filter): no width or precision beyond ``MAX_TEXT``."""
    star = False
    for m in _PRINTF.finditer(fmt):
        for n in (m.group(1), m.group(2)):
            if n == "*":
                star = True
            elif n and (len(n) > 7 or int(n) > MAX_TEXT):
                raise RenderLimit(f"{what}: a width or precision of {n[:12]} is over the limit of {MAX_TEXT:,}")
    values = args.values() if isinstance(args, dict) else args if isinstance(args, tuple) else (args,)
    if star:
        for v in values:
            _int_arg(v, f"{what}: a width or precision of")
    _check_args(values, what)


def _check_digits(text: str, what: str) -> None:
    for n in re.findall(r"\d+", text):
        if len(n) > 7 or int(n) > MAX_TEXT:
            raise RenderLimit(f"{what}: a width or precision of {n[:12]} is over the limit of {MAX_TEXT:,}")


def check_format(fmt: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """``fmt.format(...)``: no width or precision in a field's spec beyond ``MAX_TEXT``."""
    nested = False
    try:
        fields = list(Formatter().parse(fmt))
    except ValueError:
        return  # malformed: str.format says so itself
    for _text, _name, spec, _conv in fields:
        if spec:
            nested = nested or "{" in spec
            _check_digits(spec, "format")
    values = [*args, *kwargs.values()]
    _check_args(values, "format")
    if nested:  # a spec made of arguments ('{:>{}}'): any of them may be the width, as text or a number
        for v in values:
            if isinstance(v, (str, int)) and not isinstance(v, bool):
                _check_digits(str(v), "format")


# ------------------------------------------------------------------------------- built-in methods (calls)

Args = tuple[Any, ...]


def _m_width(s: Any, name: str, args: Args, kwargs: dict[str, Any]) -> Args:
    _int_arg(args[0] if args else kwargs.get("width"), f"{name}(): a width of")
    return args


def _m_expandtabs(s: Any, name: str, args: Args, kwargs: dict[str, Any]) -> Args:
    size = args[0] if args else kwargs.get("tabsize", 8)
    if isinstance(size, int):
        _over(len(s) + s.count("\t" if isinstance(s, str) else b"\t") * size, f"{name}()")
    return args


def _replace_size(s: Any, old: Any, new: Any, count: Any) -> int:
    if not isinstance(old, (str, bytes)) or not isinstance(new, (str, bytes)):
        return 0
    occurrences = len(s) + 1 if not old else s.count(old)
    if isinstance(count, int) and count >= 0:
        occurrences = min(occurrences, count)
    return len(s) + occurrences * (len(new) - len(old))


def _m_replace(s: Any, name: str, args: Args, kwargs: dict[str, Any]) -> Args:
    if len(args) >= 2:
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        _over(_replace_size(s, args[0], args[1], count), f"{name}()")
    return args


def _m_join(sep: Any, name: str, args: Args, kwargs: dict[str, Any]) -> Args:
    if not args:
        return args
    items = args[0] if isinstance(args[0], (list, tuple)) else list(args[0])
    size = len(sep) * max(len(items) - 1, 0) + sum(len(x) if isinstance(x, (str, bytes)) else 0 for x in items)
    _over(size, f"{name}()")
    return (items, *args[1:])


def _m_translate(s: Any, name: str, args: Args, kwargs: dict[str, Any]) -> Args:
    table = args[0] if args else None
    if isinstance(table, dict):
        longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
        _over(len(s) * max(longest, 1), f"{name}()")
    return args


def check_to_bytes(n: Any, name: str, args: Args, kwargs: dict[str, Any]) -> Args:
    _int_arg(args[0] if args else kwargs.get("length"), f"{name}(): a length of")
    return args


STR_METHODS: dict[str, Callable[[Any, str, Args, dict[str, Any]], Args]] = {
    "center": _m_width,
    "ljust": _m_width,
    "rjust": _m_width,
    "zfill": _m_width,
    "expandtabs": _m_expandtabs,
    "replace": _m_replace,
    "join": _m_join,
    "translate": _m_translate,
}


# ------------------------------------------------------------------------------------------------ filters


def _text(value: Any, what: str) -> str:
    """``str(value)``, as a filter converts its arguments, once it is known not to be too long."""
    if isinstance(value, str):
        return value
    if too_big(value):
        raise RenderLimit(f"{what}: an argument is longer than {MAX_TEXT:,} characters printed")
    return str(value)


def _f_center(value: Any, width: Any = 80, *a: Any, **k: Any) -> None:
    _int_arg(width, "center: a width of")


def _f_indent(s: Any, width: Any = 4, *a: Any, **k: Any) -> None:
    per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    _int_arg(per_line, "indent: a width of")
    text = _text(s, "indent")
    _over(len(text) + (text.count("\n") + 1) * per_line, "indent")


def _f_format(value: Any, *args: Any, **kwargs: Any) -> None:
    check_printf(_text(value, "format"), kwargs or args, "format")


def _f_join(value: Any, d: Any = "", attribute: Any = None) -> Any:
    if isinstance(value, str):
        return None
    sep = _text(d, "join")
    items = value if isinstance(value, (list, tuple)) else list(value)  # a range or generator: read once
    size = len(sep) * max(len(items) - 1, 0)
    for x in items:
        if isinstance(x, str):
            size += len(x)
        elif too_big(x, MAX_TEXT - size):
            size = MAX_TEXT + 1
        if size > MAX_TEXT:
            break
    _over(size, "join")
    return items


def _f_replace(s: Any, old: Any = "", new: Any = "", count: Any = None) -> None:
    text = _text(s, "replace")
    _over(_replace_size(text, _text(old, "replace"), _text(new, "replace"), -1 if count is None else count), "replace")


def _f_wordwrap(s: Any, width: Any = 79, break_long_words: Any = True, wrapstring: Any = None, *a: Any) -> None:
    if isinstance(s, str) and isinstance(wrapstring, str) and len(wrapstring) > 1:
        _over(len(s) * len(wrapstring), "wordwrap")


def _f_batch(value: Any, linecount: Any = 1, fill_with: Any = None) -> None:
    _int_arg(linecount, "batch: a size of")


def _f_slice(value: Any, slices: Any = 1, fill_with: Any = None) -> None:
    if isinstance(slices, int) and slices > MAX_STEPS:  # one step of the filter's loop per slice
        raise RenderLimit(f"slice: a count of {slices} is over the limit of {MAX_STEPS:,}")


def _f_sum(iterable: Any, attribute: Any = None, start: Any = 0) -> None:
    if not isinstance(start, (int, float)) and isinstance(iterable, (list, tuple)):
        total = sum(len(x) if hasattr(x, "__len__") else 1 for x in iterable)
        _over(len(iterable) * total // 50, "sum")


def _f_tojson(value: Any, indent: Any = None) -> None:
    width = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    if width > 64:
        raise RenderLimit(f"tojson: an indent of {width} is over the limit of 64")
    if width and too_big(value, MAX_TEXT // (1 + width)):
        raise RenderLimit(f"tojson: the value is too long to indent within {MAX_TEXT:,} characters")


def _f_urlize(value: Any, trim_url_limit: Any = None, nofollow: Any = False, target: Any = None,
              rel: Any = None, extra_schemes: Any = None) -> None:  # fmt: skip
    text = _text(value, "urlize")
    per_link = 60 + len(_text(target or "", "urlize")) + len(_text(rel or "", "urlize"))
    _over(len(text) + (text.count(".") + text.count("@") + text.count(":")) * per_link, "urlize")


# the checks made before a filter runs, with the filter's own arguments (after any context);
# a check that returns something other than None replaces the filter's input (an iterator it read)
_FILTER_CHECKS: dict[str, Callable[..., None]] = {
    "center": _f_center,
    "indent": _f_indent,
    "format": _f_format,
    "join": _f_join,
    "replace": _f_replace,
    "wordwrap": _f_wordwrap,
    "batch": _f_batch,
    "slice": _f_slice,
    "sum": _f_sum,
    "tojson": _f_tojson,
    "urlize": _f_urlize,
}
# filters that never print their input (no check of its printed size needed)
_NOT_PRINTING = frozenset(
    "abs attr batch count dictsort first float groupby int items last length list map max min random reject "
    "rejectattr reverse round select selectattr slice sort sum unique".split()
)
# not guarded at all: on every template's hot path, and nothing to check
UNGUARDED = frozenset({"default", "d"})


def guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    at = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # context/environment first
    check = _FILTER_CHECKS.get(name)
    printing = name not in _NOT_PRINTING
    what = f"the {name} filter"

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if printing and len(args) > at and not isinstance(args[at], str) and too_big(args[at]):
            raise RenderLimit(f"{what}: its input is longer than {MAX_TEXT:,} characters printed")
        if check is not None:
            value = check(*args[at:], **kwargs)
            if value is not None:
                args = (*args[:at], value, *args[at + 1 :])
        return checked(func(*args, **kwargs), what)

    return guarded


def lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    if not all(isinstance(x, int) for x in (n, min, max)) or n * max > LIPSUM_WORDS:
        raise RenderLimit(f"lipsum: n * max is limited to {LIPSUM_WORDS:,} words")
    return generate_lorem_ipsum(n, html, min, max)


def bounded_concat(markup: bool) -> Callable[[Iterable[Any]], str]:
    join = markup_join if markup else str_join

    def concat(seq: Iterable[Any]) -> str:
        seq = list(seq)
        size = 0
        for x in seq:
            if isinstance(x, str):
                size += len(x)
            elif too_big(x, MAX_TEXT - size):
                size = MAX_TEXT + 1
            else:
                size += 1
            if size > MAX_TEXT:
                raise RenderLimit(f"~ would make a string longer than {MAX_TEXT:,} characters")
        return join(seq)

    return concat


def sized(value: Any) -> Any:
    if too_big(value):
        raise RenderLimit(f"a list or dict literal holds more than {MAX_TEXT:,} characters or items")
    return value
