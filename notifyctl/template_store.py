"""Where templates live: ``TemplateStore`` finds them by id, first found wins — the database
(``notifyctl templates push``, shared by every host), ``NOTIFY_TEMPLATES_DIR``,
``$NOTIFY_HOME/templates``, then the templates shipped with notifyctl — caches them, and lists them
with the files that are broken; ``push`` and ``pull`` copy this host's files to the database and
back. One template (its parsing and rendering) is ``notifyctl.templates``.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from notifyctl.errors import TemplateError
from notifyctl.home import private_dir, write_private
from notifyctl.models import SharedTemplate, utcnow
from notifyctl.sqllock import write_lock
from notifyctl.templates import Template, parse_template, parse_text

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

# Lazy imports: notifyctl.unsubscribe is imported when a store is built from settings, not when
# `notifyctl --help` loads this module.

SHIPPED = Path(__file__).parent / "templates"
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
