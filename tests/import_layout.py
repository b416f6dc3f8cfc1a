"""The import drawing of MoLink's packages, and the rules it must keep (run by ``make lint``).

Contract: :func:`import_graph` reads every module of ``app``, ``master_core`` and ``worker_core``
with :mod:`ast` (no import is executed) and returns, per module, the modules of ours it imports:
top-level, lazy (inside functions) and ``TYPE_CHECKING`` imports alike.  ``from P import x`` is an
arrow to ``P.x`` when that is a module, else to ``P``; the parent packages Python loads on the
way are not arrows (their ``__init__`` files import nothing of ours but ``app.cli``'s parser).
:func:`problems` checks a graph against :data:`ROOMS` and returns one line per problem:

* a module in no room;
* an arrow to a room its room may not import (up the order, or sideways), see docs/layout.md;
* a circle of modules (every strongly connected component of more than one module, and a
  module importing itself).

``python tests/import_layout.py`` prints the problems and exits 1 if there are any (0: none).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "master_core", "worker_core")

# room -> the rooms its modules may import (besides their own room).  A module's room is the longest
# room name that is the module's name or a package above it.  Listed from the top down.
ROOMS: dict[str, tuple[str, ...]] = {
    "app.cli": (
        "app.desktop",
        "app.tools",
        "app.tools.bench",
        "app.tools.chaos",
        "app.tools.netlab",
        "app.group",
        "app.proc",
        "app.runtime",
        "master_core",
        "worker_core",
    ),
    "app.desktop": ("app.desktop.system", "app.group", "app.proc", "app.runtime", "master_core", "worker_core"),
    "app.desktop.system": ("worker_core",),
    "app.tools": (
        "app.tools.bench",
        "app.tools.chaos",
        "app.tools.netlab",
        "app.proc",
        "app.runtime",
        "master_core",
        "worker_core",
    ),
    "app.tools.bench": ("app.tools.netlab", "app.proc", "app.runtime", "master_core", "worker_core"),
    "app.tools.chaos": ("app.tools.netlab", "master_core", "worker_core"),
    "app.tools.netlab": (),
    "app.group": ("master_core", "worker_core"),
    "app.proc": ("app.runtime",),
    "app.runtime": ("worker_core",),
    "app": (),  # the package itself (empty)
    "master_core": ("worker_core",),
    "worker_core": (),
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name ``from <node.module>`` refers to, inside ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, is_package: bool, source: str, known: set[str]) -> set[str]:
    """The modules in ``known`` that ``source`` (the text of ``module``) imports, anywhere in it."""
    found: set[str] = set()

    def ours(name: str) -> str | None:  # the longest known module that is ``name`` or a package above it
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            candidate = ".".join(parts[:n])
            if candidate in known:
                return candidate
        return None

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            hit = ours(target)
            if hit is not None:
                found.add(hit)
    return found


def import_graph(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    files = {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    known = set(files)
    return {m: imports_of(m, p.name == "__init__.py", p.read_text(encoding="utf-8"), known) for m, p in files.items()}


def room_of(module: str, rooms: Iterable[str]) -> str | None:
    best = None
    for room in rooms:
        if (module == room or module.startswith(room + ".")) and (best is None or len(room) > len(best)):
            best = room
    return best


def circles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Every circle as the sorted modules of one strongly connected component (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    found.append(sorted(component))
    return found


def problems(graph: Mapping[str, Iterable[str]], rooms: Mapping[str, tuple[str, ...]] = ROOMS) -> list[str]:
    out: list[str] = []
    for unknown in sorted({r for allowed in rooms.values() for r in allowed} - set(rooms)):
        out.append(f"room table: {unknown} is not a room")
    out += [f"room table: the rooms {' -> '.join(c)} may import each other" for c in circles(rooms)]
    for module in sorted(graph):
        room = room_of(module, rooms)
        if room is None:
            out.append(f"{module}: in no room (add it to ROOMS in tests/import_layout.py and docs/layout.md)")
            continue
        for target in sorted(graph[module]):
            to = room_of(target, rooms)
            if to is not None and to != room and to not in rooms[room]:
                out.append(f"{module} -> {target}: {room} may not import {to} (see docs/layout.md)")
    out += [f"circle: {' <-> '.join(c)}" for c in circles(graph)]
    return out


def main() -> int:
    found = problems(import_graph())
    for line in found:
        print(f"import layout: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
