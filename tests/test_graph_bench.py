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


class Memorises(nn.Module):
    """Logits of each vertex from a parameter of its own, so full-batch training changes
    the score from epoch to epoch."""

    def __init__(self, n):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n, 2))

    def forward(self, x, edge_index):
        return self.logits


def test_node_training_scores_validation_and_test_rows_of_the_best_epoch():
    torch.manual_seed(0)
    n = 12
    y = torch.tensor([0, 1] * 6)
    data = Data(x=torch.zeros(n, 1), edge_index=torch.zeros(2, 0, dtype=torch.long), y=y)
    train = torch.arange(n) < 6
    val = (torch.arange(n) >= 6) & (torch.arange(n) < 9)
    test = torch.arange(n) >= 9
    r = graph_bench.train_node_split(Memorises(n), data, train, val, test, 3, 0.1, 0.0,
                                     "accuracy")
    # only the training rows learn: validation and test keep the zero logits (class 0)
    assert r["best_epoch"] == 0
    assert r["val"] == float((y[val] == 0).float().mean())
    assert r["test"] == float((y[test] == 0).float().mean())


def test_a_split_in_a_process_of_its_own_gives_the_scores_of_this_one(shared_data, tmp_path):
    # what --jobs runs: the same seed and threads, the same training, bitwise
    spec = dict(graph_bench.SPECS["minesweeper"], runs=2, epochs=1)
    root, copy_to = str(shared_data), str(tmp_path)
    run, _ = graph_bench._real_runner("minesweeper", spec, "tree", root, copy_to,
                                      torch.device("cpu"))
    cfg = graph_bench.SEARCH[0]
    here = run(1, cfg)
    there = graph_bench._split_in_process("minesweeper", "tree", spec, root, copy_to, "cpu",
                                          1, cfg)
    assert (here["val"], here["test"]) == (there["val"], there["test"])


def test_fresh_graphs_have_the_shapes_they_are_named_for():
    graphs = list(graph_bench._fresh_graphs(100))
    rows = graph_bench.fresh_rows(torch.device("cpu"), 100)
    assert [r["graph"] for r in rows] == [name for name, _, _ in graphs]
    assert [r["vertices"] for r in rows] == [n for _, _, n in graphs]
    assert all(r["build_ms"] > 0 and "equal_to_cpu" not in r for r in rows)
    power, blocks, lattice, sparse = rows
    assert lattice["trees"] == 1
    assert power["trees"] < power["vertices"] // 10  # hubs join most vertices
    assert blocks["trees"] >= 2  # no edge joins two of the random graphs
    assert sparse["trees"] > 1 and sparse["edges"] <= sparse["vertices"]


def test_a_size_out_of_device_memory_ends_the_timing_rows_and_keeps_the_others(capsys):
    # a card that fits 10^4 and 10^5 vertices but not 10^6: the first two rows are kept (the
    # table is still saved), the third says what ran out, 10^7 is not tried
    tried = []

    def measure(n):
        tried.append(n)
        if n >= 10 ** 6:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"vertices": n}

    sizes = [10 ** 4, 10 ** 5, 10 ** 6, 10 ** 7]
    rows, fitted = graph_bench._rows_until_out_of_memory(sizes, measure, torch.device("cpu"))
    assert tried == sizes[:3] and fitted == sizes[:2]
    assert rows[:2] == [{"vertices": 10 ** 4}, {"vertices": 10 ** 5}]
    assert rows[2] == {"vertices": 10 ** 6, "edges": 5 * 10 ** 6, "out_of_memory": True}
    assert "out of memory on cpu" in capsys.readouterr().out
    with pytest.raises(ValueError):  # other errors are not taken for a full card
        graph_bench._rows_until_out_of_memory([1], lambda n: int("x"), torch.device("cpu"))


def test_small_graph_rows_time_both_layers_and_their_ratio():
    rows = graph_bench.small_graph_table(torch.device("cpu"), sizes=(12, 30), rounds=2,
                                         steps=1)
    assert [r["vertices"] for r in rows] == [12, 30]
    for r in rows:
        assert r["tree_ssm_conv_step_ms"] > 0 and r["gcn_conv_step_ms"] > 0
        assert r["ratio"] == pytest.approx(r["tree_ssm_conv_step_ms"] / r["gcn_conv_step_ms"])
