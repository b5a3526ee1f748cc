"""benchmarks/keep_less.py counts the keep-less rule's answers inside a row and puts the rule
back afterwards, also when the row fails."""
import importlib.util
from pathlib import Path

import pytest
import torch

from treessm.ops import recompute

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("keep_less", ROOT / "benchmarks" / "keep_less.py")
keep_less = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(keep_less)


def test_a_row_counts_the_rules_answers_and_restores_it(monkeypatch):
    monkeypatch.setattr(recompute, "KEEP_LESS_MIN_ELEMENTS", 4)
    rule = recompute.keeps_less
    big = torch.zeros(8, requires_grad=True, device="meta")
    small = torch.zeros(2, requires_grad=True, device="meta")
    row = {}
    with keep_less._counted(row):
        assert recompute.keeps_less is not rule
        answers = [recompute.keeps_less(t) for t in (big, small, big, big.detach())]
    assert answers == [True, False, True, False]
    assert row["keeps_less_calls"] == 4 and row["keeps_less_true"] == 2
    assert row["start_memory_gib"] == 0.0  # nothing on a GPU here
    assert recompute.keeps_less is rule
    with pytest.raises(RuntimeError), keep_less._counted({}):
        raise RuntimeError("a row that fails")
    assert recompute.keeps_less is rule
