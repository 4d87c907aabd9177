"""The import graph keeps its layers (README, Development → Layout), and has no cycles.

Layers, lowest first; a module may import its own layer and the ones below:

0. the foundation: ``notifyctl.*`` except ``notifyctl.cli``, ``notifyctl.api`` and ``notifyctl.console``;
1. ``worker`` (its ``sandbox`` excepted);
2. ``campaigns``;
3. ``notifyctl.api`` and the console it serves, ``notifyctl.console``;
4. the entry points: ``notifyctl.cli`` and the fake providers ``worker.sandbox`` (nothing that runs in
   production imports a sandbox).

Every import counts, a function-level one as much as one at the top (they hide the graph from
readers, not from this test). The allow-lists below may only shrink: a new violation fails, and so
does a listed one that has gone (strike it from the list).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("notifyctl", "worker", "campaigns")

# (importer, imported) — never added to.
UPWARD_ALLOWED: set[tuple[str, str]] = set()

# Sets of modules that import each other (strongly connected components of the graph); may only shrink.
CYCLES_ALLOWED: set[frozenset[str]] = set()


def layer(module: str) -> int:
    if module.startswith(("notifyctl.cli", "worker.sandbox")):
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


def import_graph() -> dict[str, set[str]]:
    """Each of the project's modules → the project's modules it imports (anywhere in its body)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        named: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                named.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*parts, base] if base else parts)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    named.add(full if full in mods else base)
        targets = set()
        for target in named:
            while target and target not in mods:  # `import notifyctl.x.y` where y is a name, or a foreign module
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


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


def test_the_checks_catch_what_they_should():
    graph = {"notifyctl.a": {"worker.b"}, "worker.b": {"worker.c"}, "worker.c": {"worker.b"}, "worker.d": set()}
    assert upward_imports(graph) == {("notifyctl.a", "worker.b")}
    assert cycles(graph) == {frozenset({"worker.b", "worker.c"})}
    graph["worker.c"] = set()
    assert cycles(graph) == set()


def redis_key_literals() -> list[str]:
    """Where a module other than ``notifyctl.keys`` spells a Redis key (``notif:…``, ``rq:…``)."""
    found = []
    for name, path in modules().items():
        if name == "notifyctl.keys" or name.startswith("worker.sandbox"):
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
