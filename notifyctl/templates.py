"""Templates: one TOML file per template id, holding its category, default priority, sample data
and one table per channel::

    id = "order_shipped_v2"
    category = "transactional"          # transactional | marketing | alerts
    priority = "normal"                 # high | normal | low
    secret = []                         # data fields never shown, erased once sent: ["code"] for an OTP
    [sample]                            # data used by `templates validate` and previews
    order_id = "ORD-456"
    [push]                              # title, body
    [email]                             # subject, html, text
    [sms]                               # text

Rendering uses a sandboxed Jinja2 environment with ``StrictUndefined``: a missing variable is an
error, never an empty string. Email HTML is autoescaped. Search order: ``NOTIFY_TEMPLATES_DIR``,
``$NOTIFY_HOME/templates``, then the templates shipped with notifyctl.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2.sandbox import SandboxedEnvironment, SecurityError

from notifyctl.errors import TemplateError
from notifyctl.settings import CATEGORIES, PRIORITIES

SHIPPED = Path(__file__).parent / "templates"
_SEP = "\x1e\x1d"  # between the parts of a channel in the combined template
PARTS = {"push": ("title", "body"), "email": ("subject", "html", "text"), "sms": ("text",)}

_text_env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)
_html_env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=True)


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
    _compiled: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)
    _combined: dict[str, Any] = field(default_factory=dict, repr=False)
    _names: dict[str, frozenset[str] | None] = field(default_factory=dict, repr=False)
    _direct: dict[str, frozenset[str] | None] = field(default_factory=dict, repr=False)

    @property
    def channels(self) -> list[str]:
        return [c for c in PARTS if c in self.parts]

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
                pieces = combined.render(data).split(_SEP)
            except Exception:  # noqa: BLE001 - the part-by-part path reports it properly
                pieces = []
            names = PARTS[channel]
            if len(pieces) == len(names):
                return {name: piece.strip() for name, piece in zip(names, pieces, strict=True)}
        return self._render_parts(channel, data)

    def variables(self, channel: str) -> frozenset[str] | None:
        """The top-level names a channel's parts read (``user``, ``order_id``...), or None when
        that cannot be told (a syntax error). A channel that does not read ``user`` renders the
        same for every recipient of the same data, so a batch renders it once."""
        if channel not in self._names:
            names: set[str] = set()
            try:
                for src in self.parts.get(channel, {}).values():
                    names |= meta.find_undeclared_variables(_text_env.parse(src))
                self._names[channel] = frozenset(names)
            except TemplateSyntaxError:
                self._names[channel] = None
        return self._names[channel]

    def direct_user_fields(self, channel: str) -> frozenset[str] | None:
        """The ``user`` fields a channel prints, when printing them is all it does with ``user``
        (``{{ user.first_name }}``, ``{{ user["plan"] }}``: no filter, test, condition or loop on
        them), else None. Such a channel renders, for any recipient, as its rendering with a token
        per field with the recipient's values put in."""
        if channel not in self._direct:
            found: set[str] | None = set()
            try:
                for src in self.parts.get(channel, {}).values():
                    tree = _text_env.parse(src)
                    direct: set[int] = set()
                    for out in tree.find_all(nodes.Output):
                        for node in out.nodes:
                            if not (isinstance(node, nodes.Getattr | nodes.Getitem)
                                    and isinstance(node.node, nodes.Name) and node.node.name == "user"):  # fmt: skip
                                continue
                            if isinstance(node, nodes.Getattr):
                                name: Any = node.attr
                            elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
                                name = node.arg.value
                            else:
                                continue
                            direct.add(id(node.node))
                            assert found is not None
                            found.add(name)
                    if any(n.name == "user" and id(n) not in direct for n in tree.find_all(nodes.Name)):
                        found = None
                        break
            except TemplateSyntaxError:
                found = None
            self._direct[channel] = frozenset(found) if found is not None else None
        return self._direct[channel]

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
        except TemplateSyntaxError:
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
                    raise TemplateError(f"template {self.id!r} {channel}.{part}: syntax error: {exc.message}") from None
                self._compiled[key] = tmpl
            try:
                out[part] = tmpl.render(data).strip()
            except UndefinedError as exc:
                raise TemplateError(f"template {self.id!r} {channel}.{part}: data is missing {_missing(exc)}") from None
            except SecurityError as exc:
                raise TemplateError(f"template {self.id!r} {channel}.{part}: unsafe template: {exc}") from None
            except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
                raise TemplateError(f"template {self.id!r} {channel}.{part}: cannot render: {exc}") from None
        return out


def _missing(exc: UndefinedError) -> str:
    msg = str(exc.message or exc)
    # jinja2: "'order_id' is undefined" / "'dict object' has no attribute 'x'"
    if msg.endswith(" is undefined"):
        return f"variable {msg[: -len(' is undefined')]}"
    return msg


def parse_template(path: Path) -> Template:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TemplateError(f"{path}: not valid TOML: {exc}") from None
    tid = raw.get("id") or path.stem
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
        sample=raw.get("sample", {}),
        parts=parts,
        source=path,
        secret=frozenset(secret),
    )


class TemplateStore:
    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = dirs
        self._cache: dict[str, Template] = {}

    @classmethod
    def from_settings(cls, settings: Any) -> TemplateStore:
        dirs = [d for d in (settings.templates_dir, settings.home / "templates") if d]
        return cls([*dirs, SHIPPED])

    def _path(self, template_id: str) -> Path | None:
        if not template_id or "/" in template_id or "\\" in template_id or template_id.startswith("."):
            return None
        for d in self.dirs:
            p = d / f"{template_id}.toml"
            if p.is_file():
                return p
        return None

    def get(self, template_id: str) -> Template:
        t = self._cache.get(template_id)
        if t is None:
            path = self._path(template_id)
            if path is None:
                raise TemplateError(f"template_id: unknown template {template_id!r}")
            t = parse_template(path)
            self._cache[template_id] = t
        return t

    def ids(self) -> list[str]:
        seen: dict[str, None] = {}
        for d in self.dirs:
            if d.is_dir():
                for p in sorted(d.glob("*.toml")):
                    seen.setdefault(p.stem, None)
        return sorted(seen)

    def all(self) -> list[Template]:
        return [self.get(i) for i in self.ids()]
