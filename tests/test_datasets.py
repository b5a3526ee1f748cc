"""Benchmark datasets: the shared raw files open with PyG's own classes, and
Tree-NeighborsMatch is what Alon & Yahav define (checked by hand at depth 2)."""
import pytest
import torch

from treessm.datasets import DATASETS, load_dataset, stratified_split, tree_neighbors_match


@pytest.mark.parametrize("name, nodes, features, classes", [
    ("Cora", 2708, 1433, 7), ("minesweeper", 10000, 7, 2), ("MUTAG", None, 7, 2)])
def test_loaders_read_the_raw_files(tmp_path, shared_data, name, nodes, features, classes):
    dataset = load_dataset(name, shared_data, copy_to=tmp_path)
    assert (tmp_path / DATASETS[name][0] / name / "processed").is_dir()  # written in the copy
    data = dataset[0]
    assert dataset.num_features == features and dataset.num_classes == classes
    if nodes is not None:
        assert data.num_nodes == nodes
    if name == "Cora":
        assert int(data.train_mask.sum()) == 140 and int(data.test_mask.sum()) == 1000
    if name == "minesweeper":
        assert data.train_mask.shape == (10000, 10)  # the 10 fixed splits
    if name == "MUTAG":
        assert len(dataset) == 188


def test_unknown_dataset_is_named():
    with pytest.raises(ValueError, match="name must be one of"):
        load_dataset("Citeseer", "/nowhere")


def test_tree_neighbors_match_depth_2_by_hand():
    data = tree_neighbors_match(2)
    assert len(data) == 24 * 4  # every permutation of 4 values, each with every key
    d = data[0]
    # vertices 0 (root), 1 2 (inner), 3 4 5 6 (leaves, left to right); child -> parent
    # edges, then a self-loop at every vertex
    assert d.edge_index.tolist() == [[1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6],
                                     [0, 0, 1, 1, 2, 2, 0, 1, 2, 3, 4, 5, 6]]
    assert d.root_mask.tolist() == [True] + [False] * 6
    seen = set()
    for d in data:
        key = int(d.x[0, 0])
        assert d.x[0, 1] == 0 and (d.x[1:3] == 0).all()  # root (k, 0), inner (0, 0)
        assert d.x[3:, 0].tolist() == [1, 2, 3, 4]  # leaf keys in depth-first order
        values = d.x[3:, 1].tolist()
        assert sorted(values) == [1, 2, 3, 4]
        assert int(d.y) == values[key - 1] - 1  # the value of the leaf holding the key
        seen.add((tuple(values), key))
    assert len(seen) == 96


def test_tree_neighbors_match_sizes_follow_the_paper():
    assert len(tree_neighbors_match(3, num_permutations=5)) == 40
    d = tree_neighbors_match(4, num_permutations=2)
    assert len(d) == 32 and d[0].num_nodes == 31 and d[0].edge_index.shape == (2, 30 + 31)
    assert tree_neighbors_match(3, num_permutations=1, seed=1)[0].x.tolist() != \
        tree_neighbors_match(3, num_permutations=1, seed=2)[0].x.tolist()


def test_stratified_split():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 5)
    train, test = stratified_split(labels, 0.8, seed=0)
    assert sorted(torch.cat([train, test]).tolist()) == list(range(35))
    assert torch.bincount(labels[train]).tolist() == [8, 16, 4]
