"""The package's import graph: no circle, and no module importing a layer above its own.

Layers, bottom to top: ``_checks``, ``tree`` and ``typing``; ``ops``; ``topology``; ``nn`` and
``transforms``; ``models``; ``integrations``; ``examples``. Imports inside functions count like
any other.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "treessm"
LAYERS = {"_checks": 0, "tree": 0, "typing": 0, "ops": 1, "topology": 2, "nn": 3, "transforms": 3,
          "datasets": 3,
          "models": 4, "integrations": 5, "examples": 6}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str):
    """Names of the treessm modules that ``path`` imports."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("treessm"):
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = base[:len(base) - node.level + 1]
                mod = ".".join(root + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("treessm"):
                mod = node.module
            else:
                continue
            yield mod
            for alias in node.names:  # "from . import cuda" imports a submodule
                yield f"{mod}.{alias.name}"


def _graph():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = sorted({m for m in _imports(path, name) if m in modules and m != name})
    return graph


def _layer(name: str):
    parts = name.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_no_module_imports_a_layer_above_its_own():
    bad = []
    for name, deps in _graph().items():
        own = _layer(name)
        if own is None:  # the package facade imports everything
            continue
        bad += [f"{name} -> {d}" for d in deps if _layer(d) is not None and _layer(d) > own]
    assert not bad, bad


def test_import_graph_has_no_cycle():
    graph = _graph()
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in graph[node]:
            # a package's __init__ re-exports its submodules: those edges are not circles
            if dep == node.rsplit(".", 1)[0] or node.startswith(dep + "."):
                continue
            if state.get(dep) == "open":
                raise AssertionError(" -> ".join(stack + [node, dep]))
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_checks_see_real_edges():
    graph = _graph()
    assert "treessm.ops.plan" in graph["treessm.topology.cuda_grid"]
    assert "treessm.tree" in graph["treessm.ops.plan"]
    assert not any(d.startswith("treessm.topology") for d in graph["treessm.tree"])


def test_the_extension_compiles_every_cuda_source():
    # a .cu file left out of the build list would leave its ops unregistered
    from treessm.typing import _SOURCES

    folder = Path(__file__).resolve().parents[1] / "extensions" / "treessm_cuda"
    assert sorted(_SOURCES) == sorted(p.name for p in folder.glob("*.cu"))
