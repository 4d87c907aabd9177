"""The Jinja2 environment templates render in: sandboxed, immutable, null-is-missing, and bounded
in time and memory (the limits and their checks: ``notifyctl.template_limits``).

**Null is missing** (``notifyctl.template_null``): a null variable, field, item or call result
fails like a missing one, except in a test.

**Bounded.** Ordinary templates pay nothing for the limits: the checks live in the operators,
filters, calls and literals that can grow, and in loops, where the code generator below puts
them; a template that only prints variables and fields (``{{ code }}``,
``{{ user.first_name | default('there') }}``) compiles to the code Jinja makes, and its field
lookups are faster (no AttributeError raised and caught per lookup).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from types import BuiltinMethodType, MethodType
from typing import Any

from jinja2 import StrictUndefined, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Context, LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment

from notifyctl.template_limits import (
    COUNTED_OVER,
    MAX_DEPTH,
    MAX_INT_BITS,
    MAX_OUTPUT,
    MAX_TEXT,
    STR_METHODS,
    UNGUARDED,
    RenderLimit,
    bounded_concat,
    check_format,
    check_printf,
    check_to_bytes,
    checked,
    count_printed,
    guard_filter,
    lipsum,
    sized,
    tick,
    too_big,
)
from notifyctl.template_null import NullValue, is_null, none_test, not_null

# ---------------------------------------------------------------------------------------------- the context


class _RenderContext(Context):
    """A render's context: resolves null variables as ``NullValue`` and holds the render's budget."""

    steps = 0
    deadline = 0.0
    printed = 0
    depth = 0

    def resolve_or_missing(self, key: str) -> Any:
        # as Context.resolve_or_missing, plus the null check (once per name and render)
        if key in self.vars:
            v = self.vars[key]
        elif key in self.parent:
            v = self.parent[key]
        else:
            return super().resolve_or_missing(key)  # the `missing` sentinel
        if v is None or (type(v) is float and not math.isfinite(v)):
            return NullValue(name=key)
        return v


# ---------------------------------------------------------------------------------------- code generator


class _CodeGenerator(CodeGenerator):
    """Compiles templates with the hooks the limits need, only where a template needs them.

    Every ``{% for %}`` iterates through ``counted_loop`` (a step per item). A template with
    loops, macros or more than ``COUNTED_OVER`` printed expressions counts what it prints (and
    its loops' literal text, per iteration), and checks for null what it prints; one without is
    compiled exactly as Jinja does (what it prints is at most ``COUNTED_OVER * MAX_TEXT``).
    ``~`` and non-constant list, tuple and dict literals check their size."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        printed = sum(
            1 for out in node.find_all(nodes.Output) for child in out.nodes if not isinstance(child, nodes.TemplateData)
        )
        self.count_output = printed > COUNTED_OVER or node.find(nodes.Macro) is not None
        for loop in node.find_all(nodes.For):
            self.count_output = True
            static = sum(len(d.data) for d in loop.find_all(nodes.TemplateData))
            loop.iter = nodes.Call(
                nodes.EnvironmentAttribute("counted_loop"),
                [nodes.ContextReference(), loop.iter, nodes.Const(static)],
                [], None, None,
            )  # fmt: skip
        super().visit_Template(node, frame)

    def _output_child_to_const(self, node: nodes.Expr, frame: Frame, finalize: Any) -> str:
        if self.count_output and not isinstance(node, nodes.TemplateData):
            raise nodes.Impossible()  # printed at run time, so that it is counted
        return super()._output_child_to_const(node, frame, finalize)

    def _output_child_pre(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        if self.count_output:
            self.write("environment.printed(context, ")
        super()._output_child_pre(node, frame, finalize)
        if self.count_output:
            self.write("environment.not_null(")

    def _output_child_post(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        if self.count_output:
            self.write(")")
        super()._output_child_post(node, frame, finalize)
        if self.count_output:
            self.write(")")

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            func = "(environment.concat_markup if context.eval_ctx.volatile else environment.concat_str)"
        else:
            func = "environment.concat_markup" if frame.eval_ctx.autoescape else "environment.concat_str"
        self.write(f"{func}((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _sized_literal(self, visit: Callable[[Any, Frame], None], node: nodes.Expr, frame: Frame) -> None:
        if all(
            isinstance(n, (nodes.Const, nodes.Pair, nodes.Tuple, nodes.List, nodes.Dict))
            for n in node.find_all(nodes.Expr)
        ):
            visit(node, frame)  # constants only: as long as the source
            return
        self.write("environment.sized(")
        visit(node, frame)
        self.write(")")

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx == "store":
            super().visit_Tuple(node, frame)
        else:
            self._sized_literal(super().visit_Tuple, node, frame)

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self._sized_literal(super().visit_List, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self._sized_literal(super().visit_Dict, node, frame)


# ---------------------------------------------------------------------------------------------- environment


_DICT_ATTRIBUTES = frozenset(dir(dict))


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """``ImmutableSandboxedEnvironment`` (no attribute that starts with ``_``, no mutation of
    lists and dicts) with ``StrictUndefined``, null as missing and the limits above."""

    code_generator_class = _CodeGenerator
    context_class = _RenderContext
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(undefined=StrictUndefined, **options)
        self.globals["lipsum"] = lipsum
        self.tests["none"] = none_test
        self.filters = {n: f if n in UNGUARDED else guard_filter(n, f) for n, f in self.filters.items()}
        self.printed = count_printed
        self.not_null = not_null
        self.concat_str = bounded_concat(False)
        self.concat_markup = bounded_concat(True)
        self.sized = sized

    @staticmethod
    def counted_loop(ctx: Any, iterable: Any, static: int = 0) -> Iterator[Any]:
        """What a ``{% for %}`` iterates over: a step per item, its literal text (``static``
        characters) counted as printed, null items as ``NullValue``."""
        for item in iterable:
            tick(ctx)
            if static:
                n = ctx.printed = ctx.printed + static
                if n > MAX_OUTPUT:
                    raise RenderLimit(f"prints more than {MAX_OUTPUT:,} characters in all")
            yield NullValue(hint="a value: a loop item is null") if is_null(item) else item

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            # what the sandbox would do (no dict attribute of that name: the key), without first
            # raising and catching AttributeError: data and `user` are dicts, this is the hot path
            try:
                v = obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
            if v is None or (type(v) is float and not math.isfinite(v)):
                return NullValue(obj=obj, name=attribute)
            return v
        v = super().getattr(obj, attribute)
        if v is None or (type(v) is float and not math.isfinite(v)):
            return NullValue(obj=obj, name=attribute)
        return v

    def getitem(self, obj: Any, argument: Any) -> Any:
        v = super().getitem(obj, argument)
        if v is None or (type(v) is float and not math.isfinite(v)):
            return NullValue(obj=obj, name=argument)
        return v

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                    if len(seq) * n > MAX_TEXT or (
                        n > 1 and not isinstance(seq, (str, bytes)) and too_big(seq, MAX_TEXT // n)
                    ):
                        raise RenderLimit(f"* would make a value longer than {MAX_TEXT:,} characters or items")
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and left.bit_length() + right.bit_length() > MAX_INT_BITS
            ):
                raise RenderLimit(f"* would make an integer longer than {MAX_INT_BITS:,} bits")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                if right * left.bit_length() > MAX_INT_BITS:
                    raise RenderLimit(f"** would make an integer longer than {MAX_INT_BITS:,} bits")
        elif operator == "+":
            if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
                if len(left) + len(right) > MAX_TEXT:
                    raise RenderLimit(f"+ would make a value longer than {MAX_TEXT:,} characters or items")
                if not isinstance(left, (str, bytes)):
                    return checked(self.binop_table[operator](left, right), "+")
        elif operator == "%" and isinstance(left, str):
            check_printf(left, right, "%")
        return self.binop_table[operator](left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        fmt = super().wrap_str_format(value)
        if fmt is None:
            return None
        template: str = value.__self__
        is_map = value.__name__ == "format_map"

        @functools.wraps(fmt)
        def bounded(*args: Any, **kwargs: Any) -> str:
            if is_map and len(args) == 1 and isinstance(args[0], dict):
                check_format(template, (), args[0])
            else:
                check_format(template, args, kwargs)
            return checked(fmt(*args, **kwargs), "format")  # type: ignore[no-any-return]

        return bounded

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        tick(__context)
        kind = type(__obj)
        if kind is BuiltinMethodType or kind is MethodType:  # str.center, or Markup's wrapper of it
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, (str, bytes)):
                check = STR_METHODS.get(__obj.__name__)
                if check is not None:
                    args = check(owner, __obj.__name__, args, kwargs)
            elif isinstance(owner, int) and __obj.__name__ == "to_bytes":
                check_to_bytes(owner, "to_bytes", args, kwargs)
        elif kind is LoopContext and args:  # a recursive loop's loop(children)
            args = (__self.counted_loop(__context, args[0]), *args[1:])
        elif kind is Macro:
            ctx: Any = __context
            if ctx.depth >= MAX_DEPTH:
                raise RenderLimit(f"macros nested more than {MAX_DEPTH} deep")
            ctx.depth += 1
            try:
                rv = super().call(__context, __obj, *args, **kwargs)
            finally:
                ctx.depth -= 1
            return checked(rv, f"macro {__obj.name}()")
        rv = super().call(__context, __obj, *args, **kwargs)
        return checked(rv, f"{getattr(__obj, '__name__', 'a call')}()")
