"""benchmarks/keep_less.py counts the keep-less rule's answers inside a row and puts the rule
back afterwards, also when the row fails, and runs every turn under its own floor."""
import importlib.util
import json
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


def test_every_keep_less_turn_runs_under_the_librarys_floor(monkeypatch, tmp_path):
    # main() without a GPU: the timed steps record the floor they ran under. A keep_all turn
    # sets the floor out of reach; every later keep_less turn must set it back
    floors = []

    def bench_one(scan, precision, mode, args, device):
        floors.append(recompute.KEEP_LESS_MIN_ELEMENTS)
        return dict(images_per_s=1.0, peak_memory_gib=0.0)

    def time_layer(layer, vertices, device, repeats):
        floors.append(recompute.KEEP_LESS_MIN_ELEMENTS)
        return dict(forward_backward_ms=1.0, forward_backward_peak_mb=0.0)

    monkeypatch.setattr(keep_less.grootv_bench, "bench_one", bench_one)
    monkeypatch.setattr(keep_less.graph_bench, "time_layer", time_layer)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake")
    default = recompute.KEEP_LESS_MIN_ELEMENTS
    out = tmp_path / "keep_less.json"
    assert keep_less.main(["--rounds", "3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(floors) == 3 * 2 * 2 + 2
    for row, floor in zip(rows, floors):
        assert floor == (default if row["variant"] == "keep_less" else keep_less.KEEP_ALL)
    assert recompute.KEEP_LESS_MIN_ELEMENTS == default
