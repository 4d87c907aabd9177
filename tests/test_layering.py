"""The import graph keeps its layers (README, Development → Layout), and has no cycles.

Layers, lowest first; a module may import its own layer and the ones below:

0. the foundation: ``notifyctl.*`` except ``notifyctl.cli``, ``notifyctl.api`` and ``notifyctl.console``;
1. ``worker``;
2. ``campaigns``;
3. ``notifyctl.api`` and the console it serves, ``notifyctl.console``;
4. the entry points: ``notifyctl.cli`` and the fake providers ``sandboxes`` (a top-level package of
   the checkout, not of the wheel: nothing that runs in production imports a sandbox; the
   ``notifyctl sandbox`` noun loads them when it runs);
5. the checkout's harnesses, ``bench`` and ``chaos``: they drive the product from outside (and
   start the sandboxes); nothing below imports them.

Every import counts, a function-level one as much as one at the top (they hide the graph from
readers, not from this test). Imports go at the top of modules; a module that imports the project's
modules inside functions says why in a comment ``# Lazy imports: <why>`` (start-up time of
``notifyctl --help``, a heavy optional SDK), and the imports that run when a module is imported have
no cycle either. The allow-lists below may only shrink: a new violation fails, and so
does a listed one that has gone (strike it from the list).
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("notifyctl", "worker", "campaigns", "sandboxes", "bench", "chaos")

# (importer, imported) — never added to.
UPWARD_ALLOWED: set[tuple[str, str]] = set()

# Sets of modules that import each other (strongly connected components of the graph); may only shrink.
CYCLES_ALLOWED: set[frozenset[str]] = set()


def layer(module: str) -> int:
    if module.startswith(("bench", "chaos")):
        return 5
    if module.startswith(("notifyctl.cli", "sandboxes")):
        return 4
    if module.startswith(("notifyctl.api", "notifyctl.console")):
        return 3
    if module.startswith("campaigns"):
        return 2
    if module.startswith("worker"):
        return 1
    return 0


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def imports_in(source: str, name: str, package: str, mods: Iterable[str]) -> list[tuple[str, str, int]]:
    """The project's modules that ``source`` (module ``name`` of ``package``) imports, each as
    (module, where, line): where is ``top`` (runs when the module is imported), ``typing`` (under
    ``if TYPE_CHECKING:``) or ``lazy`` (inside a function: runs when the function is called)."""
    mods = set(mods)
    found: list[tuple[str, str, int]] = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, "lazy")
            elif _is_type_checking(child) and where == "top":
                visit(child, "typing")
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                named: set[str] = set()
                if isinstance(child, ast.Import):
                    named.update(alias.name for alias in child.names)
                else:
                    base = child.module or ""
                    if child.level:
                        parts = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                        base = ".".join([*parts, base] if base else parts)
                    for alias in child.names:
                        full = f"{base}.{alias.name}"
                        named.add(full if full in mods else base)
                for target in named:
                    while (
                        target and target not in mods
                    ):  # `import notifyctl.x.y` where y is a name, or a foreign module
                        target = target.rpartition(".")[0]
                    if target and target != name:
                        found.append((target, where, child.lineno))
            else:
                visit(child, where)

    visit(ast.parse(source), "top")
    return found


def all_imports() -> dict[str, list[tuple[str, str, int]]]:
    mods = modules()
    return {
        name: imports_in(path.read_text(), name, name if path.name == "__init__.py" else name.rpartition(".")[0], mods)
        for name, path in mods.items()
    }


def import_graph(where: Iterable[str] = ("top", "typing", "lazy")) -> dict[str, set[str]]:
    """Each of the project's modules → the project's modules it imports (anywhere in its body, or only
    ``where`` given)."""
    return {name: {t for t, w, _ in found if w in where} for name, found in all_imports().items()}


def upward_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, targets in graph.items() for b in targets if layer(b) > layer(a)}


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.add(frozenset(component))
    return found


def test_the_graph_is_read():
    graph = import_graph()
    assert "notifyctl.intake" in graph["notifyctl.cli.send"] or "notifyctl.intake" in graph["notifyctl.api.app"]
    assert "worker.pipeline" in graph["worker.jobs"]
    assert "notifyctl.models" in graph["worker.pipeline"]


def test_no_module_imports_a_layer_above_it():
    found = upward_imports(import_graph())
    new = found - UPWARD_ALLOWED
    gone = UPWARD_ALLOWED - found
    assert not new, "imports from a layer above (README, Development → Layout): " + ", ".join(
        f"{a} → {b}" for a, b in sorted(new)
    )
    assert not gone, "fixed, strike from UPWARD_ALLOWED: " + ", ".join(f"{a} → {b}" for a, b in sorted(gone))


def test_no_import_cycles():
    found = cycles(import_graph())
    new = found - CYCLES_ALLOWED
    gone = CYCLES_ALLOWED - found
    assert not new, "import cycles: " + "; ".join(" ↔ ".join(sorted(c)) for c in new)
    assert not gone, "cycle gone or changed, update CYCLES_ALLOWED: " + "; ".join(" ↔ ".join(sorted(c)) for c in gone)


def test_no_import_cycles_among_top_level_imports():
    """What runs when a module is imported: a cycle here is a partly initialised module at start."""
    found = cycles(import_graph(where=("top",)))
    assert not found, "import cycles at module level: " + "; ".join(" ↔ ".join(sorted(c)) for c in found)


LAZY_REASON = re.compile(r"^# Lazy imports: \S", re.MULTILINE)


def unexplained_lazy_imports() -> list[str]:
    """Imports of the project's modules inside functions, in modules that do not say why (a comment
    ``# Lazy imports: <why>``: start-up time of ``notifyctl --help``, a true cycle, a heavy optional
    SDK); and reasons left in modules that no longer import lazily."""
    found = []
    paths = modules()
    for name, imported in all_imports().items():
        lazy = [(target, line) for target, where, line in imported if where == "lazy"]
        explained = LAZY_REASON.search(paths[name].read_text()) is not None
        if lazy and not explained:
            found += [f"{name}:{line}: imports {target} inside a function" for target, line in lazy]
        elif explained and not lazy:
            found.append(f"{name}: says why it imports lazily, and does not (strike the comment)")
    return found


def test_function_level_imports_say_why():
    assert unexplained_lazy_imports() == [], "import at the top of the module, or say why not (# Lazy imports: …)"


def test_the_checks_catch_what_they_should():
    graph = {"notifyctl.a": {"worker.b"}, "worker.b": {"worker.c"}, "worker.c": {"worker.b"}, "worker.d": set()}
    assert upward_imports(graph) == {("notifyctl.a", "worker.b")}
    assert cycles(graph) == {frozenset({"worker.b", "worker.c"})}
    graph["worker.c"] = set()
    assert cycles(graph) == set()
    source = (
        "from typing import TYPE_CHECKING\n"
        "from worker import b\n"
        "if TYPE_CHECKING:\n    from worker.c import C\n"
        "def f():\n    from notifyctl import a\n    import os\n"
    )
    assert sorted(imports_in(source, "worker.d", "worker", ["notifyctl.a", "worker.b", "worker.c", "worker.d"])) == [
        ("notifyctl.a", "lazy", 6),
        ("worker.b", "top", 2),
        ("worker.c", "typing", 4),
    ]


def test_the_fake_providers_stay_out_of_the_wheel():
    """``sandboxes`` is a package of the checkout (its deps the ``[sandbox]`` extra), not of the wheel."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = [m for m in modules() if any(fnmatch(m, pattern) for pattern in include)]
    assert "notifyctl.cli.sandbox" in shipped and "worker.pipeline" in shipped
    assert [m for m in shipped if m.startswith("sandboxes")] == []
    assert "sandbox" in pyproject["project"]["optional-dependencies"]


def redis_key_literals() -> list[str]:
    """Where a module other than ``notifyctl.keys`` spells a Redis key (``notif:…``, ``rq:…``)."""
    found = []
    for name, path in modules().items():
        if name == "notifyctl.keys" or name.startswith("sandboxes"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value.startswith(("notif:", "rq:")) and " " not in node.value:
                    found.append(f"{name}:{node.lineno}: {node.value!r}")
            elif isinstance(node, ast.Attribute) and node.attr == "PREFIX":
                if isinstance(node.value, ast.Name) and node.value.id == "keys":
                    found.append(f"{name}:{node.lineno}: keys.PREFIX")
            elif isinstance(node, ast.ImportFrom) and node.module == "notifyctl.keys":
                if any(alias.name == "PREFIX" for alias in node.names):
                    found.append(f"{name}:{node.lineno}: imports PREFIX")
    return found


def test_redis_key_names_live_in_keys_py():
    assert redis_key_literals() == [], "name Redis keys in notifyctl/keys.py"


# A module over this many lines says at the top of its docstring why it is one module, in a line
# starting with ONE_MODULE (issue 16: "no module is over ~400 lines without a reason written at its top").
LONG_MODULE = 400
ONE_MODULE = "One module:"
# Being reworked by others when this check came in (some under the limit today): each says why, or
# stays short, and is struck from the list; the list is to be emptied, never added to.
LONG_WITHOUT_REASON_ALLOWED: set[str] = set()


def test_a_long_module_says_why_it_is_one_module() -> None:
    offenders, says_why = [], set()
    for name, path in sorted(modules().items()):
        source = path.read_text()
        lines = source.count("\n")
        doc = ast.get_docstring(ast.parse(source)) or ""
        if any(line.startswith(ONE_MODULE) for line in doc.splitlines()):
            says_why.add(name)
        elif lines > LONG_MODULE and name not in LONG_WITHOUT_REASON_ALLOWED:
            offenders.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    missing = ", ".join(offenders)
    assert not offenders, f"over {LONG_MODULE} lines with no '{ONE_MODULE} <why>' line in the docstring: {missing}"
    gone = sorted(m for m in LONG_WITHOUT_REASON_ALLOWED if m not in modules() or m in says_why)
    assert not gone, f"strike from LONG_WITHOUT_REASON_ALLOWED (gone, or says why now): {gone}"


def paths_the_readme_draws() -> list[str]:
    """The paths (with a ``/``) the README's Development section names in backticks, ``<vendor>``
    standing for any one package."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Development") :]
    section = section[: section.find("\n## ", 1)]
    drawn = set(re.findall(r"`((?:[\w.-]+|<vendor>)/[\w./<>-]*)`", section))
    block = section[section.index("```\nnotifyctl/") : section.index("\n```", section.index("```\nnotifyctl/") + 3)]
    for line in block.splitlines()[1:]:  # the layout drawing: its first column names the folders
        first = re.match(r"(\S.*?)(?:\s{2,}|$)", line)
        if first:
            drawn.update(p.strip() for p in first.group(1).split(","))
    return sorted(drawn)


def test_the_readme_draws_files_that_exist() -> None:
    """The layout and the path of one notification name files and folders that are there (a
    renamed module fails here until the drawing follows it); ``formerly …`` names are history."""
    drawn = paths_the_readme_draws()
    assert "worker/pipeline/__init__.py" in drawn and "worker/providers/<vendor>/webhook.py" in drawn
    missing = [p for p in drawn if not list(ROOT.glob(p.replace("<vendor>", "*").rstrip("/")))]
    text = (ROOT / "README.md").read_text()
    path = text[text.index("### The path of one notification") :]
    path = path[: path.find("\n#", 5) % (len(path) + 1)]  # to the next heading, or the end
    bare = set(re.findall(r"`(\w+\.py)`", path))  # the stages, named within worker/pipeline/
    assert {"batch.py", "record.py"} <= bare
    missing += [p for p in sorted(bare) if not (ROOT / "worker" / "pipeline" / p).exists()]
    assert missing == ["worker/sandbox/"], f"the README's Development section names what is not there: {missing}"
