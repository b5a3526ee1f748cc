"""The large-graph example trains through PyG's loaders (small here), places predictions by
n_id, and says what is missing when a batch has no n_id or NeighborLoader has no sampler."""
import json

import pytest
import torch
import torch_geometric.typing as pyg_typing
from torch_geometric.loader import RandomNodeLoader

from treessm.examples import large_graph
from treessm.examples.distributed import World
from treessm.models import node_classifier


def _test_vertices(n):
    return int((~large_graph.planted_partition(n).train_mask).sum())


def test_quick_run_with_random_node_loader(capsys):
    summary = large_graph.main(["--num-nodes", "1500", "--epochs", "2", "--parts", "3",
                                "--device", "cpu", "--hidden", "16", "--loader", "random",
                                "--eval", "batches"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-2]) == json.loads(json.dumps(summary))
    assert summary["steps_per_process"] == 6 and summary["num_edges"] == 15000
    assert summary["test_vertices_predicted"] == _test_vertices(1500)
    assert summary["test_accuracy"] > 0.2  # 8 communities: chance is 0.125


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("evaluation", ["full", "batches"])
def test_quick_run_with_tree_parts(evaluation, device):
    # the default loader: parts of a spanning forest's depth-first order, through PyG's
    # DataLoader; every test vertex predicted, from the whole graph or part by part (on a
    # GPU the whole graph's prediction once moved the caller's graph there, and the test
    # mask met predictions on the CPU)
    summary = large_graph.main(["--num-nodes", "1500", "--epochs", "4", "--parts", "3",
                                "--device", device, "--hidden", "16", "--eval", evaluation])
    assert summary["loader"] == "tree" and summary["eval"] == evaluation
    assert summary["steps_per_process"] == 12
    assert summary["test_vertices_predicted"] == _test_vertices(1500)
    assert summary["test_accuracy"] > 0.2


def test_tree_loader_parts_cover_the_graph_once():
    data = large_graph.planted_partition(600, seed=3)
    loader, sampler = large_graph.make_loader(data, "tree", 4, World())
    seen = torch.cat([batch.n_id for batch in loader])
    assert sampler is None and len(loader) == 4
    assert torch.equal(torch.sort(seen).values, torch.arange(600))
    for batch in loader:  # a batch of parts owns all of its rows (its batch_size counts graphs)
        assert large_graph._seed_rows(batch) == slice(None)


def test_planted_partition_is_what_it_says():
    data = large_graph.planted_partition(2000, num_classes=4, degree=6, inside=0.9, seed=1)
    assert data.num_edges == 2 * (6 * 2000 // 2)
    src, dst = data.edge_index
    assert float((data.y[src] == data.y[dst]).float().mean()) > 0.85
    assert data.n_id.tolist() == list(range(2000))


def test_predict_needs_n_id():
    data = large_graph.planted_partition(300, seed=2)
    del data.n_id
    model = node_classifier(16, 8, hidden_channels=8, d_state=1)
    with pytest.raises(ValueError, match="carry no n_id"):
        large_graph.predict(model, RandomNodeLoader(data, num_parts=2), 300, "cpu")


@pytest.mark.skipif(pyg_typing.WITH_PYG_LIB or pyg_typing.WITH_TORCH_SPARSE,
                    reason="a neighbour sampler is installed")
def test_neighbor_loader_says_how_to_get_a_sampler():
    with pytest.raises(ImportError, match="pyg-lib or torch-sparse"):
        large_graph.make_loader(large_graph.planted_partition(100), "neighbor", 2, World())


@pytest.mark.skipif(not (pyg_typing.WITH_PYG_LIB or pyg_typing.WITH_TORCH_SPARSE),
                    reason="NeighborLoader needs pyg-lib or torch-sparse")
def test_quick_run_with_neighbor_loader():
    summary = large_graph.main(["--num-nodes", "1500", "--epochs", "1", "--loader",
                                "neighbor", "--device", "cpu", "--hidden", "16"])
    assert summary["test_vertices_predicted"] > 0
    torch.testing.assert_close(torch.tensor(summary["test_accuracy"]).clamp(0, 1),
                               torch.tensor(summary["test_accuracy"]))


def test_neighbor_loader_seeds_are_the_split(monkeypatch):
    # training seeds are the training vertices (shuffled); evaluation seeds the test
    # vertices, so that every test vertex is predicted (runs without a sampler installed)
    import torch_geometric.loader

    made = []

    class Recorder:
        def __init__(self, data, num_neighbors, input_nodes, batch_size, shuffle):
            made.append((input_nodes, shuffle))

    monkeypatch.setattr(pyg_typing, "WITH_TORCH_SPARSE", True)
    monkeypatch.setattr(torch_geometric.loader, "NeighborLoader", Recorder)
    data = large_graph.planted_partition(200, seed=3)
    large_graph.make_loader(data, "neighbor", 2, World())
    large_graph.make_loader(data, "neighbor", 2, World(), split="test")
    (train, shuffled), (test, ordered) = made
    assert train.tolist() == data.train_mask.nonzero().view(-1).tolist() and shuffled
    assert test.tolist() == data.test_mask.nonzero().view(-1).tolist() and not ordered
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        large_graph.make_loader(data, "neighbor", 2, World(), split="val")
