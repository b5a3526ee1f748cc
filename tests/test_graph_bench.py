"""The graph benchmark's training loop ends where its score can no longer change, and its
command line names the tasks it knows."""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from torch_geometric.data import Data

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("graph_bench", ROOT / "benchmarks" / "graph.py")
graph_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(graph_bench)


class ReadsTheLabel(nn.Module):
    """Logits from the one feature, which is the label (``scale=0``: all zero, class 0)."""

    def __init__(self, scale):
        super().__init__()
        self.scale, self.bias = scale, nn.Parameter(torch.zeros(2))

    def forward(self, x, edge_index, edge_attr=None, batch=None):
        return self.scale * nn.functional.one_hot(x[:, 0], 2).float() + 0 * self.bias


def _graphs():  # one vertex each; labels 0, 1, 1, 1: predicting 0 is 25% right
    return [Data(x=torch.tensor([[c]]), edge_index=torch.zeros(2, 0, dtype=torch.long),
                 y=torch.tensor([c])) for c in (0, 1, 1, 1)]


def _train(model, patience):
    return graph_bench.train_graph_split(model, _graphs(), None, None, 10, 1e-3, 0.0,
                                         "accuracy", batch_size=2, patience=patience)


def test_a_perfect_train_accuracy_ends_training():
    r = _train(ReadsTheLabel(10.0), patience=None)
    assert (r["train"], r["best_epoch"], r["epochs_run"]) == (1.0, 0, 1)


def test_patience_ends_training_after_that_many_epochs_without_a_better_score():
    r = _train(ReadsTheLabel(0.0), patience=3)
    assert (r["train"], r["best_epoch"], r["epochs_run"]) == (0.25, 0, 4)
    assert _train(ReadsTheLabel(0.0), patience=None)["epochs_run"] == 10


def test_unknown_task_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        graph_bench.main(["--real", "--tasks", "MUTAG,cora"])
    assert "unknown ['cora']" in capsys.readouterr().err
