"""Every public name has a docstring with what a user needs, and its example runs.

The public names are those of the API reference (``docs/_ext/api_reference.py``: every
name in the ``__all__`` of every public module, each checked once, at the path where the
reference documents it). Functions and classes carry PyG's sections: ``Args:`` (when they
take arguments), ``Shapes:``, ``Returns:`` (a class that is applied to inputs: in its
docstring or that of its ``forward`` or ``__call__``), ``Raises:`` and an ``Example:`` of ``>>>`` lines, which runs here as a doctest. Constants
carry a ``#:`` comment that the reference shows; modules a docstring. The few sections a
name cannot have (no tensor anywhere, nothing raised) are listed in ``NOT_APPLICABLE``
with the reason.
"""
import doctest
import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

import treessm

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("api_reference",
                                               ROOT / "docs" / "_ext" / "api_reference.py")
api_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(api_reference)

NO_TENSORS = "takes and returns no tensor"
NOT_APPLICABLE = {
    "treessm.ops.available_backends": {"Shapes:": NO_TENSORS, "Raises:": "raises nothing"},
    "treessm.ops.release_workspace": {"Shapes:": NO_TENSORS, "Returns:": "returns nothing",
                                      "Raises:": "raises nothing"},
    "treessm.ops.workspace_bytes": {"Shapes:": NO_TENSORS, "Raises:": "raises nothing"},
    "treessm.datasets.load_dataset": {"Shapes:": "returns a dataset; its graphs' shapes "
                                                 "are PyG's"},
    "treessm.typing.require": {"Shapes:": NO_TENSORS, "Returns:": "returns nothing"},
    "treessm.typing.check_torch_version": {"Shapes:": NO_TENSORS, "Returns:": "returns nothing"},
    "treessm.typing.release": {"Shapes:": NO_TENSORS},
    "treessm.typing.load_cuda_extension": {"Shapes:": NO_TENSORS, "Returns:": "returns "
                                                                              "nothing"},
    "treessm.typing.cuda_extension_loaded": {"Shapes:": NO_TENSORS,
                                             "Raises:": "raises nothing"},
    "treessm.typing.cuda_extension_available": {"Shapes:": NO_TENSORS,
                                                "Raises:": "raises nothing"},
    "treessm.typing.cuda_extension_error": {"Shapes:": NO_TENSORS, "Raises:": "raises nothing"},
    "treessm.typing.cuda_source_dir": {"Shapes:": NO_TENSORS},
    "treessm.integrations.timm.register_timm_models": {"Shapes:": NO_TENSORS},
    "treessm.integrations.timm.is_registered": {"Shapes:": NO_TENSORS,
                                                "Raises:": "raises nothing"},
    "treessm.integrations.transformers.set_context_len": {"Shapes:": NO_TENSORS},
    "treessm.integrations.transformers.check_transformers_version": {"Shapes:": NO_TENSORS},
    "treessm.models.count_flops": {"Shapes:": "reads the input size as (H, W)"},
    "treessm.models.take_indices": {"Shapes:": NO_TENSORS},
    "treessm.models.FeatureInfo": {"Shapes:": NO_TENSORS},
}

HOMES = sorted({home: obj for _, _, obj, home in api_reference.public_names()}.items())


def _own_doc(obj) -> str:
    doc = obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj)
    return inspect.cleandoc(doc) if doc else ""


def _takes_arguments(obj) -> bool:
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in params)


def _applies(obj) -> bool:
    """Whether a class is applied to inputs (a module's ``forward``, a topology's
    ``__call__``), so that its docstrings say what it returns."""
    return any(name in vars(klass) for klass in obj.__mro__[:-1] for name in ("forward", "__call__")
               if klass.__module__.startswith("treessm"))


def _required(path: str, obj) -> list:
    sections = ["Args:"] if _takes_arguments(obj) else []
    sections += ["Shapes:"]
    sections += ["Returns:"] if not inspect.isclass(obj) or _applies(obj) else []
    sections += ["Raises:", "Example:"]
    exempt = NOT_APPLICABLE.get(path, {})
    return [s for s in sections if s not in exempt]


def _sections(obj) -> str:
    text = _own_doc(obj)
    if inspect.isclass(obj):  # a module's Returns may sit in forward's docstring
        for method in ("forward", "__call__"):
            doc = getattr(getattr(obj, method, None), "__doc__", None)
            if doc and method in dir(obj):
                text += "\n" + inspect.cleandoc(doc)
    return text


@pytest.mark.parametrize("path,obj", HOMES, ids=[h for h, _ in HOMES])
def test_public_name_documented(path, obj):
    kind = api_reference.kind(obj)
    if kind == "module":
        assert (obj.__doc__ or "").strip(), f"module {path} has no docstring"
        return
    if kind == "data":
        module, name = path.rsplit(".", 1)
        assert api_reference.data_doc(module, name, obj), \
            f"{path} needs a '#:' comment saying what it is where it is assigned"
        return
    text = _sections(obj)
    missing = [s for s in _required(path, obj) if s not in text]
    assert not missing, f"{path}: its docstring lacks {missing}"
    if "Example:" not in NOT_APPLICABLE.get(path, {}):
        example = text.split("Example:", 1)[1]
        assert ">>> " in example, f"{path}: the example must be >>> lines that run"


def test_not_applicable_names_exist():
    # an exemption of a name that is gone, or of a section the name has, is stale
    homes = dict(HOMES)
    for path, exempt in NOT_APPLICABLE.items():
        assert path in homes, f"NOT_APPLICABLE lists {path}, which is not a public name"
        text = _sections(homes[path])
        for section in exempt:
            assert section not in text, f"{path} has {section}: drop its exemption"


def _examples():
    finder = doctest.DocTestFinder(recurse=False, exclude_empty=True)
    for path, obj in HOMES:
        if api_reference.kind(obj) in ("module", "data"):
            continue
        # the names of the module that defines the object and of the one that exports it
        globs = dict(vars(importlib.import_module(obj.__module__)))
        globs.update(vars(importlib.import_module(path.rsplit(".", 1)[0])))
        globs.update(torch=torch, treessm=treessm)
        tests = finder.find(obj, path, module=False, globs=globs)
        for test in tests:
            if test.examples:
                yield pytest.param(test, id=path)


@pytest.mark.parametrize("test", list(_examples()))
def test_docstring_example_runs(test, tmp_path, monkeypatch, shared_data):
    # examples run in an empty folder, whose "data" is the offline copy of PyG's datasets
    monkeypatch.chdir(tmp_path)
    if '"data"' in test.docstring:
        (tmp_path / "data").symlink_to(shared_data, target_is_directory=True)
    torch.manual_seed(0)
    test.globs.setdefault("torch", torch)
    report = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=report.append)
    if runner.summarize(verbose=False).failed:
        pytest.fail("".join(report))


def test_sources_compile_without_warnings():
    # an invalid escape in a docstring (``\mathrm`` outside a raw string) is a SyntaxWarning
    # when the module is compiled, and a broken formula in the rendered docs
    import warnings
    root = Path(treessm.__file__).resolve().parent.parent
    files = [p for d in ("treessm", "benchmarks", "tests") for p in (root / d).rglob("*.py")]
    assert files
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in files:
            compile(path.read_text(), str(path), "exec")
