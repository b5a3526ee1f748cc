"""The API reference, generated from the public modules' ``__all__``.

One page per public module lists every name in its ``__all__`` with the docstring of the
object (autodoc). A name exported by several modules (``treessm.GridTopology`` is
``treessm.topology.GridTopology``) is documented once, on the first page that lists it, and
the later pages link there. The pages are written into ``docs/api/`` when the build
starts, so a new public name appears without editing any page, and
``tests/test_docstrings.py`` checks the same names for their docstrings.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Dict, List, Tuple

#: the public modules, in the order of the reference (and the order of "first home")
PUBLIC_MODULES = (
    "treessm",
    "treessm.nn",
    "treessm.models",
    "treessm.topology",
    "treessm.ops",
    "treessm.datasets",
    "treessm.transforms",
    "treessm.integrations.timm",
    "treessm.integrations.transformers",
    "treessm.typing",
)

TITLES = {
    "treessm": "treessm: trees, the scan, topologies",
    "treessm.nn": "treessm.nn: layers",
    "treessm.models": "treessm.models: backbones and graph models",
    "treessm.topology": "treessm.topology: tree construction",
    "treessm.ops": "treessm.ops: scan operators and backends",
    "treessm.datasets": "treessm.datasets: graph benchmarks",
    "treessm.transforms": "treessm.transforms: PyG transforms",
    "treessm.integrations.timm": "treessm.integrations.timm",
    "treessm.integrations.transformers": "treessm.integrations.transformers",
    "treessm.typing": "treessm.typing: optional dependencies",
}


def kind(obj) -> str:
    """``"module"``, ``"class"``, ``"function"`` or ``"data"``."""
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return "data"


def data_doc(module_name: str, name: str, obj) -> str:
    """The ``#:`` comment of a constant, from the module that assigns it ("" if none)."""
    from sphinx.pycode import ModuleAnalyzer

    candidates = [module_name] + sorted(
        m for m, mod in list(sys.modules.items())
        if m.startswith("treessm") and mod is not None and getattr(mod, name, None) is obj)
    for candidate in candidates:
        try:
            docs = ModuleAnalyzer.for_module(candidate).find_attr_docs()
        except Exception:  # noqa: BLE001 - no source to read
            continue
        lines = docs.get(("", name))
        if lines:
            return "\n".join(lines).strip()
    return ""


def public_names() -> List[Tuple[str, str, object, str]]:
    """Every public name: ``(module, name, object, home)`` where ``home`` is the dotted
    path under which the object is documented (its first appearance)."""
    homes: Dict[int, str] = {}
    rows = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            path = f"{module_name}.{name}"
            key = id(obj) if kind(obj) != "data" else path  # constants: one home each
            home = homes.setdefault(key, path)
            rows.append((module_name, name, obj, home))
    return rows


def _page(module_name: str, rows) -> str:
    title = TITLES[module_name]
    lines = [title, "=" * len(title), "", f".. automodule:: {module_name}", "   :no-members:", ""]
    directive = {"class": "autoclass", "function": "autofunction"}
    for mod, name, obj, home in rows:
        if mod != module_name:
            continue
        path = f"{module_name}.{name}"
        k = kind(obj)
        if home != path:
            role = {"class": "class", "function": "func", "module": "mod",
                    "data": "data"}[k]
            lines += [f".. rubric:: {name}", "", f"Also exported as :{role}:`{home}`.", ""]
        elif k == "module":
            lines += [f".. automodule:: {obj.__name__}", "   :members:", ""]
        elif k == "class":
            lines += [f".. autoclass:: {path}", "   :members:", "   :show-inheritance:", ""]
        elif k == "data":
            doc = data_doc(module_name, name, obj)
            lines += [f".. py:data:: {path}", f"   :value: {obj!r}", ""]
            lines += ["   " + line if line else "" for line in doc.splitlines()] + [""]
        else:
            lines += [f".. {directive[k]}:: {path}", ""]
    return "\n".join(lines) + "\n"


def write_pages(out: Path) -> List[str]:
    """Write one ``.rst`` page per public module into ``out``; return the page names."""
    out.mkdir(parents=True, exist_ok=True)
    rows = public_names()
    pages = []
    for module_name in PUBLIC_MODULES:
        text = _page(module_name, rows)
        path = out / f"{module_name}.rst"
        if not path.exists() or path.read_text() != text:  # keep timestamps for incremental builds
            path.write_text(text)
        pages.append(module_name)
    index = ["API reference", "=============", "",
             "Every public name of every public module, from its docstring.", "",
             ".. toctree::", "   :maxdepth: 1", ""] + [f"   {p}" for p in pages]
    text = "\n".join(index) + "\n"
    if not (out / "index.rst").exists() or (out / "index.rst").read_text() != text:
        (out / "index.rst").write_text(text)
    return pages


def setup(app):
    write_pages(Path(app.srcdir) / "api")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
