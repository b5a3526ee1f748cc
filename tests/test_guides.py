"""The code of the README and of the guides runs, as a reader would run it.

Every ```python block of ``README.md`` and ``docs/*.md`` is executed on the CPU: the
blocks of a guide in order, in one namespace (as a reader goes down the page), each
README block on its own (a quick start is copied alone). A block that cannot run here is
marked on purpose, with the reason, by an HTML comment on the line before its fence, which
neither GitHub nor the site shows::

    <!-- not run: needs a CUDA GPU -->

Blocks run in an empty folder whose ``data`` is the offline copy of PyG's datasets, so a
guide's ``load_dataset("Cora", "data")`` reads what PyG would download. The names
``treessm.…`` that the pages mention must exist, so that no page sends a reader to a module
that is gone; so must the modules, scripts and options of their shell blocks (installs,
launches and benchmarks, which are not run here). The README's figures must be values of
the results files it names, and CI must run its test command verbatim.
"""
import importlib
import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)
SKIP = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->\s*$")
DOTTED = re.compile(r"(?<![\w.])treessm(?:\.[A-Za-z_]\w*)+")  # not torch.ops.treessm.…


def blocks(page: Path):
    """``(line, code, reason_not_run)`` of each python block of ``page``."""
    text = page.read_text()
    for match in FENCE.finditer(text):
        if match.group(1) != "python":
            continue
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        line = text.count("\n", 0, match.start()) + 1
        yield line, match.group(2), skip.group(1) if skip else None


def _run(code: str, module: types.ModuleType, where: str) -> None:
    # compiled as the source of an imported module, as a reader's script is: code that
    # looks up its caller's module (PyG's Sequential does) finds it
    try:
        exec(compile(code, module.__file__, "exec"), module.__dict__)
    except Exception as exc:  # the page and line in the report
        raise AssertionError(f"{where} failed: {type(exc).__name__}: {exc}") from exc


PAGE_IDS = [p.relative_to(ROOT).as_posix() for p in PAGES]


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_page_code_runs(page, tmp_path, monkeypatch, request):
    runnable = [(line, code) for line, code, reason in blocks(page) if reason is None]
    if not runnable:
        pytest.skip("no block to run")
    monkeypatch.chdir(tmp_path)
    if any('"data"' in code for _, code in runnable):
        data = request.getfixturevalue("shared_data")
        (tmp_path / "data").symlink_to(data, target_is_directory=True)
    alone = page.name == "README.md"
    name = "guide_" + re.sub(r"\W", "_", page.stem.lower())
    module = None
    try:
        for line, code in runnable:
            if alone or module is None:
                torch.manual_seed(0)
                module = types.ModuleType(name)
                module.__file__ = str(tmp_path / f"{name}.py")
                sys.modules[name] = module
            _run(code, module, f"{page.relative_to(ROOT)}:{line}")
    finally:
        sys.modules.pop(name, None)


def test_not_run_blocks_say_why():
    # a marker without a reason, or a marker that is not followed by a block, is a mistake
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"<!--\s*not run:?(.*?)-->", text):
            assert match.group(1).strip(), f"{page.name}: a 'not run' marker needs a reason"
            after = text[match.end():].lstrip("\n")
            assert after.startswith("```"), f"{page.name}: 'not run' must precede a fence"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_named_modules_exist(page):
    text = page.read_text()
    missing = sorted({name.rstrip(".") for name in DOTTED.findall(text)
                      if not _resolves(name.rstrip("."))})
    assert not missing, f"{page.name} names what treessm does not have: {missing}"


NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")


def _numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield float(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


def test_readme_figures_are_in_their_results_files():
    # each row of the README's table of measured figures names its file; every number of
    # its two figure columns must be a value of that file, as rounded in the README (a
    # time in milliseconds may be quoted in seconds)
    import json

    text = (ROOT / "README.md").read_text()
    table = text.split("## Measured", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line
            and ".json" in line]
    assert len(rows) >= 8, "the README's table of measured figures was not found"
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        files = re.findall(r"`(\w+\.json)`", cells[2])
        assert files, f"no results file named in: {row}"
        values = [v * scale for f in files
                  for v in _numbers(json.loads((ROOT / "benchmarks" / "results" / f).read_text()))
                  for scale in (1.0, 1e-3)]
        for cell in cells[1:]:
            cell = re.sub(r"`[^`]*`", "", cell)                 # names, not figures
            cell = re.sub(r"\d+ × \d+|10[⁰-⁹]+|5·10[⁰-⁹]+|r = \d|depth \d, \d and \d|"
                          r"\d+ examples|\d+ epochs|H\d+", "", cell)   # sizes, not figures
            for token in NUMBER.findall(cell):
                figure = float(token.replace(",", ""))
                places = len(token.split(".")[1]) if "." in token else 0
                assert any(round(v, places) == figure or round(v) == figure and places == 0
                           for v in values), f"README's {token} is not in {files}: {row}"


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme.split("## Set up", 1)[1]
                          .split("\n## ", 1)[0], re.S)
    assert len(commands) == 2, "the README sets up with two commands: the demo and the tests"
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()


SHELL_FENCE = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)
LAUNCH = re.compile(r"(?:python|torchrun)\b[^\n#&]*?(?:-m\s+([\w.]+)|\s(benchmarks/[\w/]+\.py))"
                    r"([^\n#&]*)")


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_shell_commands_name_what_exists(page):
    # shell blocks install, launch and benchmark; they are not run here (the examples and
    # benchmarks they start have tests of their own), but every module, script and option
    # they name must exist
    for block in SHELL_FENCE.findall(page.read_text()):
        for module, script, rest in LAUNCH.findall(block.replace("\\\n", " ")):
            if module:
                spec = importlib.util.find_spec(module)
                assert spec is not None, f"{page.name}: no module {module}"
                source = Path(spec.origin).read_text() if module.startswith("treessm") else ""
            else:
                path = ROOT / script
                assert path.is_file(), f"{page.name}: no script {script}"
                source = path.read_text()
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
                if source and "torchrun" not in flag:
                    assert f'"{flag}"' in source, f"{page.name}: {module or script} has no {flag}"
