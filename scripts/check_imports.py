"""Check the import graph of peftcli: no circles, and each layer imports only from the layers below it.

    python scripts/check_imports.py          # prints the violations, exits 1 if there are any

The layers follow the flow of a run: recipe -> models -> tuners -> data -> train -> export, with the
command line (cli, launch, examples) on top. Every `import` counts, also those inside functions (a lazy
import is still a dependency). Standard library only, so it runs before anything is installed.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "peftcli"
# A package may import from its own layer and those before it in this list.
# The recipe layer includes the torch-free declarations it validates against: each method's spec.py (kept in
# the method's own folder, so adding a method touches one folder), the registry that collects them, and the
# launch presets.
DECLARATIONS = {
    "peftcli.tuners.registry",
    "peftcli.tuners.common",
    "peftcli.tuners.targets",
    "peftcli.tuners.lora.patterns",
    "peftcli.launch.presets",
}
LAYERS = [
    {"peftcli", "peftcli.errors"},
    {"peftcli.recipe", "peftcli.objectives", *DECLARATIONS},
    {"peftcli.models"},
    {"peftcli.tuners"},
    {"peftcli.data"},
    {"peftcli.train"},
    {"peftcli.export", "peftcli.serve"},
    {"peftcli.launch", "peftcli.cli", "peftcli.examples", "peftcli.__main__"},
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The peftcli modules `path` imports (a `from x import y` counts as x.y when that is a module)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")} - {name}


def layer_of(module: str) -> int:
    if module.startswith("peftcli.tuners.") and module.endswith(".spec"):
        return 1  # a method's declaration: part of the recipe layer
    for depth in range(module.count(".") + 1, 0, -1):
        prefix = ".".join(module.split(".")[:depth])
        for index, layer in enumerate(LAYERS):
            if prefix in layer:
                return index
    raise ValueError(f"{module} is in no layer of scripts/check_imports.py")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def violations(root: Path) -> list[str]:
    files = {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}
    graph = {name: imports_of(path, name, set(files)) for name, path in files.items()}
    problems = []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            if target in files and layer_of(target) > layer_of(name):
                problems.append(f"{name} imports {target}, a later layer")
    # A package's __init__ re-exporting its modules is not a circle of its own.
    modules_only = {n: {t for t in ts if files.get(t, Path()).name != "__init__.py"} for n, ts in graph.items()}
    problems += [f"import circle: {' -> '.join(group)}" for group in cycles(modules_only)]
    return problems


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    problems = violations(root)
    for problem in problems:
        print(problem)
    print(f"{len(problems)} import problem(s)" if problems else "imports: no circles, every layer imports downwards")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
