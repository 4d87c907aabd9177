"""Null is missing, in the templates' Jinja2 environment (``notifyctl.template_env``).

A variable whose value is null (JSON ``null``; also NaN and ±Infinity, which the JSON columns
store as null) is undefined: printing it, or anything but testing it, fails exactly like a missing
variable ("data is missing variable 'code'"). ``{% if code %}`` is false, ``{{ code | default('…') }}``
falls back, ``code is none`` and ``code is not defined`` are true. The same holds for null fields
(``user.first_name``), items, and what a method call returns: the environment turns each into a
``NullValue``.
"""

from __future__ import annotations

import math
from typing import Any

from jinja2 import StrictUndefined


class NullValue(StrictUndefined):
    """A value that is null: undefined for every use but a test, where it is false (and ``none``).

    ``StrictUndefined`` types these four as failing (``-> Never``); answering them is the point."""

    __slots__ = ()

    def __bool__(self) -> bool:  # type: ignore[override]
        return False

    def __eq__(self, other: object) -> bool:  # type: ignore[override]
        return other is None or isinstance(other, NullValue)

    def __ne__(self, other: object) -> bool:  # type: ignore[override]
        return not self.__eq__(other)

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(None)


def is_null(v: Any) -> bool:
    return v is None or (type(v) is float and not math.isfinite(v))


def none_test(value: Any) -> bool:
    return value is None or isinstance(value, NullValue)


def not_null(value: Any) -> Any:
    """A value about to be printed, in templates that count their output (a loop item unpacked
    from a pair, a macro argument: nulls that were not looked up by name)."""
    if value is None or (type(value) is float and not math.isfinite(value)):
        return NullValue(hint="a value: a printed value is null")
    return value
