"""benchmarks/host_waits.py counts each wait at the treessm lines that caused it, innermost
first, and leaves the warning machinery as it found it."""
import importlib.util
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("host_waits", ROOT / "benchmarks" / "host_waits.py")
host_waits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_waits)

# two functions "in treessm": the inner one warns as torch's sync debug mode does
_SOURCE = """
import warnings

def inner():
    warnings.warn("called a synchronizing CUDA operation")

def outer(times):
    for _ in range(times):
        inner()
"""


def test_waits_are_counted_at_the_treessm_lines_that_caused_them(monkeypatch):
    space = {}
    exec(compile(_SOURCE, "/site/treessm/fake.py", "exec"), space)
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    before = warnings.showwarning
    waits = host_waits._waits(lambda: space["outer"](3))
    assert waits == {"fake.py:5 < fake.py:9": 3}
    assert modes == ["warn", 0] and warnings.showwarning is before
    assert host_waits._waits(lambda: None) == {}


_OPS_SOURCE = """
import torch

def glue(x):
    y = x.view(-1)            # a view: launches nothing
    z = torch.empty(3)        # a bare allocation: launches nothing
    return (y * 2 + 1).sum()  # three operators
"""


def test_operators_are_counted_at_the_treessm_lines_that_dispatched_them():
    space = {}
    exec(compile(_OPS_SOURCE, "/site/treessm/fake.py", "exec"), space)
    x = torch.ones(2, 2, requires_grad=True)

    def step():
        space["glue"](x).backward()

    total, sites = host_waits._operator_sites(step)
    assert sites["fake.py:7"] == 3
    assert not any(k.startswith(("fake.py:5", "fake.py:6")) for k in sites)
    # autograd's backward formulas run outside any treessm line
    assert total == 3 + sum(v for k, v in sites.items() if k.startswith("outside"))
    assert total > 3
