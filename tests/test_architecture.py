"""The layout of ``engine/`` stays as ARCHITECTURE.md draws it: imports go down the layers only,
wings on one layer do not import each other, and no modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "engine"
GROUND = ("config", "errors", "features", "live", "metrics")  # modules at engine/'s root besides cli
LAYERS = {  # wing -> layer; a module may import its own wing and wings on lower layers
    "ground": 0,
    "store": 1,
    "rules": 2, "models": 2,
    "decision": 3,
    "events": 4, "authoring": 4, "analytics": 4, "api": 4,  # api: the code generated from proto/
    "sim": 5,
    "serving": 6,
    "commands": 7,  # the nba subcommands, one module per command group
    "cli": 8,
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ENGINE.rglob("*.py"):
        parts = ("engine",) + path.relative_to(ENGINE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The engine modules ``name`` imports anywhere in its body (function-level imports count)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def _wing(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1 or (len(parts) == 2 and parts[1] in GROUND):
        return "ground"
    return parts[1]


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_belongs_to_a_known_wing() -> None:
    unknown = sorted(n for n in _modules() if _wing(n) not in LAYERS)
    assert not unknown, f"modules outside the layers of ARCHITECTURE.md: {unknown}"


def test_imports_go_down_the_layers() -> None:
    upward = [f"{a} -> {b}" for a, deps in sorted(_graph().items()) for b in sorted(deps)
              if _wing(a) != _wing(b) and LAYERS[_wing(a)] <= LAYERS[_wing(b)]]
    assert not upward, "imports up a layer or across wings of one layer:\n" + "\n".join(upward)


def test_no_import_circles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"modules that import each other: {circles}"


def test_the_root_holds_the_entry_point_and_ground_modules_only() -> None:
    root = sorted(p.stem for p in ENGINE.glob("*.py") if p.name != "__init__.py")
    assert root == sorted((*GROUND, "cli")) and len(root) <= 6


def test_every_wing_says_what_it_owns_and_may_import() -> None:
    for wing in (w for w in LAYERS if w not in ("ground", "cli", "api")):
        doc = ast.get_docstring(ast.parse((ENGINE / wing / "__init__.py").read_text())) or ""
        assert "May import" in doc, f"engine/{wing}/__init__.py does not say what it may import"
