"""Templates: one TOML file per template id, holding its category, default priority, sample data
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
size. Email HTML is autoescaped. Search order: the database (``notifyctl templates push``, shared
by every host), ``NOTIFY_TEMPLATES_DIR``, ``$NOTIFY_HOME/templates``, then the templates shipped
with notifyctl (``TemplateStore``).

``parse_template`` reads one file (each top-level key by its own small check, so a new key is a
new check); ``TemplateStore`` finds and caches them, and lists them with the files that are broken;
``push`` and ``pull`` copy files to the database and back.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Template as JinjaTemplate
from jinja2 import TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2.exceptions import SecurityError
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from notifyctl.errors import TemplateError, one_line
from notifyctl.home import private_dir, write_private
from notifyctl.models import SharedTemplate, utcnow
from notifyctl.settings import CATEGORIES, PRIORITIES
from notifyctl.sqllock import write_lock
from notifyctl.template_env import MAX_TEXT, BoundedEnvironment, RenderLimit

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

# Lazy imports: notifyctl.unsubscribe is imported when a store is built from settings, not when
# `notifyctl --help` loads this module.

SHIPPED = Path(__file__).parent / "templates"
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


REFRESH = 1.0  # seconds: how stale a process's list of pushed templates (name → version) may be


def _valid_id(template_id: str) -> bool:
    return (
        bool(template_id)
        and len(template_id) <= 128
        and "/" not in template_id
        and "\\" not in template_id
        and "\x00" not in template_id
        and not template_id.startswith(".")
    )


class TemplateStore:
    """Finds templates by id, first found wins:

    1. the database (``notifyctl templates push``): every host sharing the database reads the same
       template, at the same version — when the store has a database (``from_settings``);
    2. this host's files: ``NOTIFY_TEMPLATES_DIR``, then ``$NOTIFY_HOME/templates``;
    3. the templates shipped with notifyctl.

    Pushed templates are cached per process and invalidated by version: the store reads the
    table's (name, version) list at most once every ``refresh`` seconds, and reads one row at once
    for an id found nowhere else (pushed a moment ago on another host). Files are read once.
    """

    def __init__(
        self,
        dirs: list[Path],
        engine: Callable[[], Engine] | None = None,
        shared: bool = False,
        refresh: float = REFRESH,
    ) -> None:
        self.dirs = dirs
        self.shared = shared  # the database is shared with other hosts: intake refuses file-only templates
        self.refresh = refresh
        self._engine = engine
        self._cache: dict[str, Template] = {}  # from files
        self._index: dict[str, int] = {}  # pushed: name → version, as last read
        self._pushed: dict[str, Template] = {}
        self._checked = float("-inf")
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any, engine: Callable[[], Engine] | None = None) -> TemplateStore:
        from notifyctl.unsubscribe import shared_database

        dirs = [d for d in (settings.templates_dir, settings.home / "templates") if d]
        return cls([*dirs, SHIPPED], engine, shared=shared_database(settings))

    # --- the database -------------------------------------------------------------------------

    def _sync(self) -> None:
        """Re-read the pushed templates' versions when the last read is older than ``refresh``."""
        if self._engine is None or time.monotonic() - self._checked < self.refresh:
            return
        with self._lock:
            if time.monotonic() - self._checked < self.refresh:
                return
            t = SharedTemplate.__table__  # type: ignore[attr-defined]
            with self._engine().connect() as conn:
                rows = conn.execute(select(t.c.name, t.c.version)).all()
            self._index = {str(r[0]): int(r[1]) for r in rows}
            self._checked = time.monotonic()

    def _load_pushed(self, template_id: str) -> Template | None:
        """The pushed template's current version, read from the database (None: not pushed)."""
        if self._engine is None or not _valid_id(template_id):
            return None
        t = SharedTemplate.__table__  # type: ignore[attr-defined]
        with self._engine().connect() as conn:
            row = conn.execute(select(t.c.source, t.c.version).where(t.c.name == template_id)).first()
        if row is None:
            self._index.pop(template_id, None)
            self._pushed.pop(template_id, None)
            return None
        version = int(row[1])
        tpl = parse_text(str(row[0]), f"template {template_id!r} (database v{version})", template_id)
        tpl.origin, tpl.version = "database", version
        self._pushed[template_id] = tpl
        self._index[template_id] = max(version, self._index.get(template_id, 0))
        return tpl

    def _pushed_template(self, template_id: str) -> Template | None:
        self._sync()
        version = self._index.get(template_id)
        if version is None:
            return None
        tpl = self._pushed.get(template_id)
        if tpl is not None and (tpl.version or 0) >= version:
            return tpl
        return self._load_pushed(template_id)

    # --- lookups ------------------------------------------------------------------------------

    def _path(self, template_id: str) -> Path | None:
        if not _valid_id(template_id):
            return None
        for d in self.dirs:
            p = d / f"{template_id}.toml"
            if p.is_file():
                return p
        return None

    def get(self, template_id: str) -> Template:
        t = self._pushed_template(template_id)
        if t is not None:
            return t
        t = self._cache.get(template_id)
        if t is None:
            path = self._path(template_id)
            if path is None:
                t = self._load_pushed(template_id)  # pushed since the list was read?
                if t is None:
                    raise TemplateError(f"template_id: unknown template {template_id!r}")
                return t
            t = parse_template(path)
            t.origin = "shipped" if path.parent == SHIPPED else "file"
            self._cache[template_id] = t
        return t

    def get_shared(self, template_id: str) -> Template:
        """``get`` for intake (``send``, ``POST /v1/notify``, campaign launch): on a database shared
        with other hosts, a template read from this host's files alone is refused (TemplateError,
        one line), since the workers of the other hosts could not load it."""
        t = self.get(template_id)
        if self.shared and t.origin == "file":
            raise TemplateError(
                f"template_id: template {template_id!r} is only in this host's files ({t.source}); the workers "
                f"of the other hosts sharing this database cannot load it: run `notifyctl templates push {template_id}`"
            )
        return t

    def origin(self, template_id: str) -> str | None:
        """Where ``get`` would read the template from (database, file, shipped), or None."""
        if self._pushed_template(template_id) is not None:
            return "database"
        path = self._path(template_id)
        if path is not None:
            return "shipped" if path.parent == SHIPPED else "file"
        return "database" if self._load_pushed(template_id) is not None else None

    def ids(self) -> list[str]:
        self._sync()
        seen: dict[str, None] = dict.fromkeys(self._index)
        for d in self.dirs:
            if d.is_dir():
                for p in sorted(d.glob("*.toml")):
                    seen.setdefault(p.stem, None)
        return sorted(seen)

    def all(self) -> list[Template]:
        return [self.get(i) for i in self.ids()]

    def has(self, template_id: str) -> bool:
        return self.origin(template_id) is not None

    def load_all(self) -> list[Loaded]:
        """Every template id with its template, or the problem with its file (one bad file does
        not hide the others)."""
        out = []
        for tid in self.ids():
            path = None if tid in self._index else self._path(tid)
            try:
                out.append(Loaded(tid, path, self.get(tid), None))
            except TemplateError as exc:
                out.append(Loaded(tid, path, None, str(exc)))
        return out

    def local_files(self) -> dict[str, Path]:
        """This host's template files (not the shipped ones), by id; the first directory wins."""
        found: dict[str, Path] = {}
        for d in self.dirs:
            if d != SHIPPED and d.is_dir():
                for p in sorted(d.glob("*.toml")):
                    found.setdefault(p.stem, p)
        return found


@dataclass(frozen=True)
class Loaded:
    id: str
    path: Path | None
    template: Template | None
    error: str | None  # one line, naming the file


# --- push and pull ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pushed:
    id: str
    version: int
    status: str  # pushed | unchanged (push); created | updated | unchanged (pull)
    file: str


def push(engine: Engine, store: TemplateStore, ids: list[str], host: str) -> list[Pushed]:
    """Store this host's template files (all of them, or ``ids``) in the database, where every host
    sharing it reads them. Every file is checked first (TOML, its parts compile, its id is its
    file's name); one bad file and nothing is pushed (TemplateError naming it). A file pushed as it
    is already is left at its version; a changed one gets the next version."""
    files = store.local_files()
    if ids:
        unknown = [i for i in dict.fromkeys(ids) if i not in files]
        if unknown:
            where = ", ".join(str(d) for d in store.dirs if d != SHIPPED)
            raise TemplateError(f"templates push: no template file {unknown[0]!r}.toml in {where}")
        files = {i: files[i] for i in dict.fromkeys(ids)}
    if not files:
        where = ", ".join(str(d) for d in store.dirs if d != SHIPPED)
        raise TemplateError(f"templates push: no template files in {where}")
    checked: list[tuple[str, Path, str, Template]] = []
    for tid, path in files.items():
        t = parse_template(path)
        if t.id != tid:
            raise TemplateError(f"{path}: its id {t.id!r} differs from its file name ({tid}.toml)")
        t.check_syntax()
        checked.append((tid, path, path.read_text(encoding="utf-8"), t))
    table = SharedTemplate.__table__  # type: ignore[attr-defined]
    for attempt in range(5):
        out: list[Pushed] = []
        try:
            with write_lock(engine), engine.begin() as conn:
                for tid, path, text, t in checked:
                    digest = hashlib.sha256(text.encode()).hexdigest()
                    row = conn.execute(select(table.c.version, table.c.hash).where(table.c.name == tid)).first()
                    values = {
                        "source": text,
                        "parts": t.parts,
                        "hash": digest,
                        "pushed_by": host,
                        "updated_at": utcnow(),
                    }
                    if row is None:
                        conn.execute(insert(table).values(name=tid, version=1, **values))
                        out.append(Pushed(tid, 1, "pushed", str(path)))
                    elif row[1] == digest:
                        out.append(Pushed(tid, int(row[0]), "unchanged", str(path)))
                    else:
                        conn.execute(
                            update(table).where(table.c.name == tid).values(version=table.c.version + 1, **values)
                        )
                        new: int = conn.execute(select(table.c.version).where(table.c.name == tid)).scalar_one()
                        out.append(Pushed(tid, int(new), "pushed", str(path)))
            return out
        except IntegrityError:  # another host pushed a new one of these at the same moment
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def pull(engine: Engine, dest: Path, ids: list[str]) -> list[Pushed]:
    """Write the database's templates (all, or ``ids``) to ``dest`` (``$NOTIFY_HOME/templates``) as
    the files that were pushed; TemplateError for an id the database does not hold."""
    table = SharedTemplate.__table__  # type: ignore[attr-defined]
    query = select(table.c.name, table.c.source, table.c.version).order_by(table.c.name)
    if ids:
        query = query.where(table.c.name.in_(list(dict.fromkeys(ids))))
    with engine.connect() as conn:
        rows = [(str(r[0]), str(r[1]), int(r[2])) for r in conn.execute(query)]
    if ids:
        missing = [i for i in dict.fromkeys(ids) if i not in {r[0] for r in rows}]
        if missing:
            raise TemplateError(f"templates pull: the database holds no template {missing[0]!r}")
    private_dir(dest)
    out = []
    for name, text, version in rows:
        if not _valid_id(name):
            raise TemplateError(f"templates pull: the database holds a template named {name!r}, not a file name")
        path = dest / f"{name}.toml"
        old = path.read_bytes() if path.is_file() else None
        data = text.encode()
        if old == data:
            out.append(Pushed(name, version, "unchanged", str(path)))
            continue
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write_private(tmp, data)
        os.replace(tmp, path)
        out.append(Pushed(name, version, "created" if old is None else "updated", str(path)))
    return out
