"""One module: one template format: parsing, the variables a template needs, and rendering; ~460 lines.

Templates: one TOML file per template id, holding its category, default priority, sample data
and one table per channel::

    id = "order_shipped_v2"
    category = "transactional"          # transactional | marketing | alerts
    priority = "normal"                 # high | normal | low
    secret = []                         # data fields never shown, erased once sent: ["code"] for an OTP
    [sample]                            # data used by `templates validate` and previews
    order_id = "ORD-456"
    [sample.user]                       # optional: the recipient's fields for previews
    first_name = "Ada"
    [push]                              # title, body
    [email]                             # subject, html, text
    [sms]                               # text

Rendering uses the sandboxed, bounded Jinja2 environment of ``notifyctl.template_env``: a missing
or null variable is an error, never an empty string or "None"; rendering is bounded in time and
size. Email HTML is autoescaped.

This module is one template: ``parse_template`` / ``parse_text`` read one (each top-level key by
its own small check, so a new key is a new check) and ``Template`` renders it and says what data
it reads. Where templates are found (the database, this host's files, the shipped ones) and how
they are pushed to the database and pulled back is ``notifyctl.template_store``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Template as JinjaTemplate
from jinja2 import TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2.exceptions import SecurityError

from notifyctl.errors import TemplateError, one_line
from notifyctl.settings import CATEGORIES, PRIORITIES
from notifyctl.template_env import BoundedEnvironment
from notifyctl.template_limits import MAX_TEXT, RenderLimit

_SEP = "\x1e\x1d"  # between the parts of a channel in the combined template
PARTS = {"push": ("title", "body"), "email": ("subject", "html", "text"), "sms": ("text",)}

_text_env = BoundedEnvironment(autoescape=False, keep_trailing_newline=False)
_html_env = BoundedEnvironment(autoescape=True)


_DEFAULT_FILTERS = ("default", "d")
# the recipient `templates render` and `validate` use when the sample names none ([sample.user])
SAMPLE_USER = {"id": "sample-user", "email": "sample@example.com", "locale": "en", "timezone": "UTC"}


def _run(tmpl: JinjaTemplate, data: dict[str, Any]) -> str:
    # Template.render without its copy of the data and traceback rewriting (we report messages)
    return "".join(tmpl.root_render_func(tmpl.new_context(data)))


def _parse(src: str) -> nodes.Template | None:
    """A part's syntax tree, or None when it does not parse (rendering reports why)."""
    try:
        return _text_env.parse(src)
    except (TemplateSyntaxError, RecursionError):
        return None


@dataclass(frozen=True)
class Need:
    """A variable a template reads from its data (not ``user``): ``required`` unless every use
    of it has a fallback (``x | default(...)``, ``x is defined``)."""

    name: str
    required: bool
    channels: tuple[str, ...]


@dataclass
class Template:
    id: str
    category: str
    priority: str
    description: str = ""
    sample: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, dict[str, str]] = field(default_factory=dict)
    source: Path | None = None
    secret: frozenset[str] = frozenset()  # data fields never shown, erased once sent (notifyctl.secretdata)
    origin: str = "file"  # file | shipped | database (pushed: every host sharing the database has it)
    version: int | None = None  # the database's version of a pushed template
    _compiled: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)
    _combined: dict[str, Any] = field(default_factory=dict, repr=False)
    _names: dict[str, frozenset[str] | None] = field(default_factory=dict, repr=False)
    _direct: dict[str, frozenset[str] | None] = field(default_factory=dict, repr=False)
    _direct_data: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)

    @property
    def channels(self) -> list[str]:
        return [c for c in PARTS if c in self.parts]

    @property
    def where(self) -> str:
        """Where it was read from: its file, or the database and version."""
        if self.origin == "database":
            return f"database v{self.version}"
        return str(self.source)

    def check_syntax(self) -> None:
        """TemplateError naming the first part that does not compile."""
        for channel, parts in self.parts.items():
            for part, src in parts.items():
                env = _html_env if (channel, part) == ("email", "html") else _text_env
                try:
                    env.from_string(src)
                except TemplateSyntaxError as exc:
                    msg = one_line(exc.message or "")
                    raise TemplateError(f"template {self.id!r} {channel}.{part}: syntax error: {msg}") from None
                except RecursionError:
                    raise TemplateError(f"template {self.id!r} {channel}.{part}: nested too deeply") from None

    def render(self, channel: str, data: dict[str, Any]) -> dict[str, str]:
        """Render every part of one channel; raises TemplateError naming the part and the problem.

        Hot path: the parts of a channel are compiled into one template (the HTML part inside an
        autoescape block) and rendered in one pass; anything unusual — an error, a separator in
        the data — falls back to rendering part by part, which also names the failing part.
        """
        if channel not in self.parts:
            raise TemplateError(f"template {self.id!r} has no {channel} part (it has: {', '.join(self.channels)})")
        combined = self._combined.get(channel)
        if combined is None:
            combined = self._combined[channel] = self._compile_combined(channel)
        if combined is not False:
            try:
                text = _run(combined, data)
            except Exception:  # noqa: BLE001 - the part-by-part path reports it properly
                return self._render_parts(channel, data)
            pieces = text.split(_SEP)
            names = PARTS[channel]
            # (a part over the size limit: the part-by-part path names it)
            if len(pieces) == len(names) and (len(text) <= MAX_TEXT or max(map(len, pieces)) <= MAX_TEXT):
                return {name: piece.strip() for name, piece in zip(names, pieces, strict=True)}
        return self._render_parts(channel, data)

    def variables(self, channel: str) -> frozenset[str] | None:
        """The top-level names a channel's parts read (``user``, ``order_id``...), or None when
        that cannot be told (a syntax error). A channel that does not read ``user`` renders the
        same for every recipient of the same data, so a batch renders it once."""
        if channel not in self._names:
            names: set[str] | None = set()
            for src in self.parts.get(channel, {}).values():
                tree = _parse(src)
                if tree is None:
                    names = None
                    break
                names |= meta.find_undeclared_variables(tree)  # type: ignore[operator]
            self._names[channel] = frozenset(names) if names is not None else None
        return self._names[channel]

    def direct_user_fields(self, channel: str) -> frozenset[str] | None:
        """The ``user`` fields a channel prints, when printing them is all it does with ``user``
        (``{{ user.first_name }}``, ``{{ user["plan"] }}``, also with fallbacks:
        ``{{ user.first_name | default("there") }}``, ``{{ name | default(user.first_name) }}``;
        no other filter, test, condition or loop on them), else None. Such a channel renders,
        for a recipient who has every such field (not null), as its rendering with a token per
        field with the recipient's values put in."""
        if channel not in self._direct:
            found: set[str] | None = set()
            for src in self.parts.get(channel, {}).values():
                tree = _parse(src)
                if tree is None:
                    found = None
                    break
                used: set[int] = set()  # the `user` names consumed by a direct print
                for out in tree.find_all(nodes.Output):
                    for node in out.nodes:
                        fields = _printed_user_fields(node, used)
                        if fields is not None:
                            found |= fields  # type: ignore[operator]
                if any(n.name == "user" and id(n) not in used for n in tree.find_all(nodes.Name)):
                    found = None
                    break
            self._direct[channel] = frozenset(found) if found is not None else None
        return self._direct[channel]

    def direct_data_names(self, channel: str) -> frozenset[str]:
        """The data names (``user`` aside) a channel only prints: every use of the name, in every
        part, is ``{{ name }}`` or a fallback chain around it (``{{ name | default(...) }}``, also
        as another's fallback), outside any block that captures or transforms what it prints
        (macros, call/filter/set blocks, ``{% autoescape %}``). For such a name, a rendering with a
        token as its value and the recipient's value put in place of the token (``str``, escaped in
        the HTML part) is the recipient's rendering: what a batch of per-recipient data renders
        once (``worker.pipeline.render``). Empty when the channel has none, or does not parse."""
        found = self._direct_data.get(channel)
        if found is None:
            names: set[str] = set()
            loose: set[str] = set()  # names used some other way
            for src in self.parts.get(channel, {}).values():
                tree = _parse(src)
                if tree is None or any(True for _ in tree.find_all(_CAPTURING)):
                    names, loose = set(), set()
                    break
                used: set[int] = set()
                for out in tree.find_all(nodes.Output):
                    for node in out.nodes:
                        _printed_names(node, used)
                for n in tree.find_all(nodes.Name):
                    if n.ctx == "load" and n.name != "user":
                        (names if id(n) in used else loose).add(n.name)
            found = self._direct_data[channel] = frozenset(names - loose)
        return found

    def needs(self) -> list[Need]:
        """The data the template reads (every channel, ``user`` aside), required ones first."""
        uses: dict[str, list[bool]] = {}  # name -> per use: has a fallback
        where: dict[str, list[str]] = {}
        for channel in self.channels:
            for src in self.parts[channel].values():
                tree = _parse(src)
                if tree is None:
                    continue
                undeclared = meta.find_undeclared_variables(tree) - {"user"} - set(_text_env.globals)
                guarded = _guarded_names(tree)
                for n in tree.find_all(nodes.Name):
                    if n.ctx == "load" and n.name in undeclared:
                        uses.setdefault(n.name, []).append(id(n) in guarded)
                        if channel not in where.setdefault(n.name, []):
                            where[n.name].append(channel)
        out = [Need(name, not all(u), tuple(where[name])) for name, u in uses.items()]
        return sorted(out, key=lambda x: (not x.required, x.name))

    def user_fields(self) -> list[str]:
        """The recipient's fields the template reads (``user.first_name`` → ``first_name``)."""
        fields: set[str] = set()
        for parts in self.parts.values():
            for src in parts.values():
                tree = _parse(src)
                for node in tree.find_all((nodes.Getattr, nodes.Getitem)) if tree is not None else ():
                    if not isinstance(node, (nodes.Getattr, nodes.Getitem)):
                        continue  # never: what find_all was asked for (it is typed as any Node)
                    if isinstance(node.node, nodes.Name) and node.node.name == "user":
                        name = _field_name(node)
                        if name is not None:
                            fields.add(name)
        return sorted(fields)

    def preview_data(self, data: dict[str, Any] | None = None) -> dict[str, Any]:
        """The data ``templates render``/``validate`` use: ``data`` or the sample, with the sample's
        recipient (``[sample.user]``) or a stand-in as ``user``."""
        values = dict(self.sample if data is None else data)
        given = values.get("user")
        values["user"] = {**SAMPLE_USER, **self.sample.get("user", {}), **(given if isinstance(given, dict) else {})}
        return values

    def _compile_combined(self, channel: str) -> Any:
        sources = []
        for part in PARTS[channel]:
            src = self.parts[channel][part]
            if _SEP in src:
                return False
            sources.append(
                "{% autoescape true %}" + src + "{% endautoescape %}" if (channel, part) == ("email", "html") else src
            )
        try:
            return _text_env.from_string(_SEP.join(sources))
        except (TemplateSyntaxError, RecursionError):
            return False

    def _render_parts(self, channel: str, data: dict[str, Any]) -> dict[str, str]:
        out: dict[str, str] = {}
        for part in PARTS[channel]:
            key = (channel, part)
            tmpl = self._compiled.get(key)
            if tmpl is None:
                env = _html_env if key == ("email", "html") else _text_env
                try:
                    tmpl = env.from_string(self.parts[channel][part])
                except TemplateSyntaxError as exc:
                    msg = one_line(exc.message or "")
                    raise TemplateError(f"template {self.id!r} {channel}.{part}: syntax error: {msg}") from None
                except RecursionError:
                    raise TemplateError(f"template {self.id!r} {channel}.{part}: nested too deeply") from None
                self._compiled[key] = tmpl
            where = f"template {self.id!r} {channel}.{part}"
            try:
                text = _run(tmpl, data)
            except UndefinedError as exc:
                raise TemplateError(f"{where}: data is missing {one_line(_missing(exc))}") from None
            except SecurityError as exc:
                raise TemplateError(f"{where}: unsafe template: {one_line(exc)}") from None
            except RenderLimit as exc:
                raise TemplateError(f"{where}: {exc}") from None
            except RecursionError:
                raise TemplateError(f"{where}: nested too deeply") from None
            except MemoryError:
                raise TemplateError(f"{where}: out of memory") from None
            except Exception as exc:  # noqa: BLE001 - whatever a template raises is the template's error
                raise TemplateError(f"{where}: cannot render: {one_line(exc) or type(exc).__name__}") from None
            if len(text) > MAX_TEXT:
                raise TemplateError(f"{where}: renders {len(text):,} characters, over the limit of {MAX_TEXT:,}")
            out[part] = text.strip()
        return out


_NO_KEY = "'dict object' has no attribute "


def _missing(exc: UndefinedError) -> str:
    msg = str(exc.message or exc)
    # jinja2: "'order_id' is undefined" / "'dict object' has no attribute 'x'"
    if msg.endswith(" is undefined"):
        return f"variable {msg[: -len(' is undefined')]}"
    if msg.startswith(_NO_KEY):
        return f"field {msg[len(_NO_KEY) :]}"
    return msg


def _field_name(node: nodes.Getattr | nodes.Getitem) -> str | None:
    if isinstance(node, nodes.Getattr):
        return node.attr
    if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
        return node.arg.value
    return None


def _is_fallback(node: nodes.Node) -> bool:
    """``x | default(...)`` with at most the default value (not ``boolean=true``: a token, or any
    other stand-in, must be used exactly when the real value would be)."""
    return (
        isinstance(node, nodes.Filter)
        and node.name in _DEFAULT_FILTERS
        and node.node is not None
        and len(node.args) <= 1
        and not node.kwargs
        and node.dyn_args is None
        and node.dyn_kwargs is None
    )


def _printed_user_fields(node: nodes.Node, used: set[int]) -> set[str] | None:
    """The user fields an output expression prints directly (see ``direct_user_fields``), adding
    the ``user`` names it consumes to ``used``; None when it does something else with ``user``."""
    if isinstance(node, (nodes.Getattr, nodes.Getitem)) and isinstance(node.node, nodes.Name):
        if node.node.name == "user":
            name = _field_name(node)
            if name is None:
                return None
            used.add(id(node.node))
            return {name}
    if _is_fallback(node):
        assert isinstance(node, nodes.Filter) and node.node is not None
        fields: set[str] = set()
        for sub in (node.node, *node.args):
            found = _printed_user_fields(sub, used)
            if found is not None:
                fields |= found
        return fields
    if not any(n.name == "user" for n in node.find_all(nodes.Name)) and not (
        isinstance(node, nodes.Name) and node.name == "user"
    ):
        return set()
    return None


# blocks whose output is captured or transformed (or escaped otherwise) before it is printed
_CAPTURING = (
    nodes.Macro,
    nodes.CallBlock,
    nodes.FilterBlock,
    nodes.AssignBlock,
    nodes.EvalContextModifier,  # (and ScopedEvalContextModifier, its subclass: {% autoescape %})
)


def _printed_names(node: nodes.Node, used: set[int]) -> None:
    """Adds to ``used`` the ids of the ``Name`` nodes an output expression prints as they are:
    the expression itself, or the value and fallback of a ``default`` chain (see
    ``direct_data_names``)."""
    if isinstance(node, nodes.Name) and node.ctx == "load":
        used.add(id(node))
    elif _is_fallback(node):
        assert isinstance(node, nodes.Filter) and node.node is not None
        for sub in (node.node, *node.args):
            _printed_names(sub, used)


def _guarded_names(tree: nodes.Template) -> set[int]:
    """The ids of the ``Name`` nodes used with a fallback: ``x | default(...)``, ``x is defined``."""
    guarded: set[int] = set()
    for f in tree.find_all(nodes.Filter):
        if f.name in _DEFAULT_FILTERS and isinstance(f.node, nodes.Name):
            guarded.add(id(f.node))
    for t in tree.find_all(nodes.Test):
        if t.name in ("defined", "undefined", "none") and isinstance(t.node, nodes.Name):
            guarded.add(id(t.node))
    return guarded


def parse_template(path: Path) -> Template:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TemplateError(f"{path}: not valid TOML: {exc}") from None
    return parse_text(text, path, path.stem)


def parse_text(text: str, where: Path | str, stem: str) -> Template:
    """A template from its TOML text; ``where`` names it in errors (its file, or the database),
    ``stem`` is its id when the text names none."""
    path = where
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TemplateError(f"{path}: not valid TOML: {exc}") from None
    tid = raw.get("id") or stem
    category = raw.get("category")
    if category not in CATEGORIES:
        raise TemplateError(f"{path}: category must be one of {', '.join(CATEGORIES)}, got {category!r}")
    priority = raw.get("priority", "normal")
    if priority not in PRIORITIES:
        raise TemplateError(f"{path}: priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    parts: dict[str, dict[str, str]] = {}
    for channel, names in PARTS.items():
        table = raw.get(channel)
        if table is None:
            continue
        if not isinstance(table, dict):
            raise TemplateError(f"{path}: {channel} must be a table ([{channel}]), not a value")
        missing = [n for n in names if not isinstance(table.get(n), str)]
        if missing:
            raise TemplateError(f"{path}: [{channel}] needs {', '.join(missing)}")
        parts[channel] = {n: table[n] for n in names}
    if not parts:
        raise TemplateError(f"{path}: no channel part ([push], [email] or [sms])")
    secret = raw.get("secret", [])
    if not isinstance(secret, list) or not all(isinstance(s, str) and s.isidentifier() for s in secret):
        raise TemplateError(f'{path}: secret must be a list of data field names, such as secret = ["code"]')
    if "user" in secret:
        raise TemplateError(f"{path}: secret: 'user' is the recipient, not template data")
    return Template(
        id=tid,
        category=category,
        priority=priority,
        description=raw.get("description", ""),
        sample=_sample(path, raw),
        parts=parts,
        source=path if isinstance(path, Path) else None,
        secret=frozenset(secret),
    )


def _sample(path: Path | str, raw: dict[str, Any]) -> dict[str, Any]:
    sample = raw.get("sample", {})
    if not isinstance(sample, dict):
        raise TemplateError(f"{path}: sample must be a table ([sample]), not a value")
    if "user" in sample and not isinstance(sample["user"], dict):
        raise TemplateError(f"{path}: sample.user must be a table ([sample.user]), not a value")
    return sample
