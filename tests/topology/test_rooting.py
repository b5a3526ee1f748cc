"""root_forest and the fast layout paths against Tree.from_parent and a rooting oracle."""
import numpy as np
import pytest
import torch

from treessm import Tree, minimum_spanning_tree
from treessm.topology import root_forest, tree_from_edges
from treessm.topology.mst import segments
from treessm.topology.layout import lattice_offsets
from treessm.topology.rooting import forest_tree_on_cpu, spanning_tree_on_cpu

FIELDS = ("parent", "order", "child_ptr", "tree_ptr", "depth")


def root_oracle(edges, n, roots=()):
    """Parent array by breadth-first search from each component's chosen root."""
    adj = [set() for _ in range(n)]
    for u, v in edges:
        adj[u].add(v)
        adj[v].add(u)
    comp = [-1] * n
    members = []
    for s in range(n):
        if comp[s] < 0:
            comp[s] = len(members)
            stack, seen = [s], [s]
            while stack:
                v = stack.pop()
                for c in adj[v]:
                    if comp[c] < 0:
                        comp[c] = comp[s]
                        stack.append(c)
                        seen.append(c)
            members.append(seen)
    parent = [-1] * n
    for seen in members:
        listed = [r for r in roots if r in seen]
        root = listed[0] if listed else min(seen)
        frontier, done = [root], {root}
        while frontier:
            nxt = []
            for v in frontier:
                for c in adj[v]:
                    if c not in done:
                        done.add(c)
                        parent[c] = v
                        nxt.append(c)
            frontier = nxt
    return parent


def random_forest(rng, n, keep=0.8):
    """Edges of a random forest on n vertices (a random tree with some edges removed)."""
    perm = rng.permutation(n)
    edges = []
    for i in range(1, n):
        if rng.random() < keep:
            edges.append((int(perm[i]), int(perm[rng.integers(0, i)])))
    return edges


def assert_same_tree(a, b):
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ---------------------------------------------------------------------------- root_forest
def test_hand_example():
    ei = torch.tensor([[0, 1, 3], [1, 2, 4]])
    assert root_forest(ei, 6).tolist() == [-1, 0, 1, -1, 3, -1]
    assert root_forest(ei, 6, roots=[2, 4]).tolist() == [1, 2, -1, 4, -1, -1]
    assert root_forest(ei, 6, roots=torch.tensor([5])).tolist() == [-1, 0, 1, -1, 3, -1]


def test_both_directions_and_repeats_count_once():
    ei = torch.tensor([[0, 1, 1, 2, 0], [1, 0, 2, 1, 1]])
    assert root_forest(ei, 3).tolist() == [-1, 0, 1]


def test_empty_and_isolated():
    assert root_forest(torch.zeros(2, 0, dtype=torch.long), 3).tolist() == [-1, -1, -1]
    assert root_forest(torch.zeros(2, 0, dtype=torch.long), 0).tolist() == []


@pytest.mark.parametrize("seed", range(10))
def test_random_forests_match_oracle(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    edges = random_forest(rng, n)
    ei = torch.tensor(edges, dtype=torch.long).reshape(-1, 2).T
    parent = root_forest(ei, n)
    assert parent.tolist() == root_oracle(edges, n)
    # one preferred root per component (from a random subset of components)
    comp_root = {}
    for v in rng.permutation(n).tolist():
        tree_root = v
        while parent[tree_root] >= 0:
            tree_root = int(parent[tree_root])
        comp_root.setdefault(tree_root, v)
    roots = [r for r in comp_root.values() if rng.random() < 0.6]
    assert root_forest(ei, n, roots=roots).tolist() == root_oracle(edges, n, roots)


def test_errors():
    with pytest.raises(ValueError, match="cycle"):
        root_forest(torch.tensor([[0, 1, 2], [1, 2, 0]]), 3)
    with pytest.raises(ValueError, match="cycle"):  # disconnected, n - 1 edges, one cycle
        root_forest(torch.tensor([[0, 1, 2], [1, 2, 0]]), 4)
    with pytest.raises(ValueError, match="self-loop"):
        root_forest(torch.tensor([[0, 1], [1, 1]]), 2)
    with pytest.raises(ValueError, match="two roots"):
        root_forest(torch.tensor([[0, 1], [1, 2]]), 3, roots=[0, 2])
    with pytest.raises(ValueError, match="roots"):
        root_forest(torch.tensor([[0], [1]]), 2, roots=[2])
    with pytest.raises(TypeError, match="roots"):
        root_forest(torch.tensor([[0], [1]]), 2, roots=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="edge_index"):
        root_forest(torch.tensor([[0], [3]]), 2)
    with pytest.raises(TypeError, match="edge_index"):
        root_forest([[0], [1]], 2)


def test_tree_from_edges_uses_it():
    tree = tree_from_edges(torch.tensor([[0, 1, 3], [1, 2, 4]]), 5, roots=[4])
    assert tree.parent.tolist() == [-1, 0, 1, 4, -1]
    assert tree.roots.tolist() == [0, 4]


# ---------------------------------------------------------------------------- fast layouts
@pytest.mark.parametrize("seed", range(6))
def test_layout_equals_tree_from_parent(seed):
    """Segments (examples) with several components each, preferred roots in some."""
    rng = np.random.default_rng(50 + seed)
    sizes = rng.integers(0, 40, int(rng.integers(1, 6))).tolist()
    src, dst, roots, offset = [], [], [], 0
    for s in sizes:
        for u, v in random_forest(rng, s, keep=0.9):
            src.append(u + offset)
            dst.append(v + offset)
        if s and rng.random() < 0.7:
            roots.append(offset + int(rng.integers(0, s)))
        offset += s
    n = offset
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))
    src = np.array(src, np.int64)
    dst = np.array(dst, np.int64)
    ei = torch.from_numpy(np.stack([src, dst]))
    try:
        expected_parent = root_forest(ei, n, roots)
    except ValueError:  # two roots in one component of an example
        return
    expected = Tree.from_parent(expected_parent, batch)
    mask = np.ones(src.shape[0], np.bool_)
    node_ptr, edge_ptr = segments(n, src, dst, batch.numpy())
    assert node_ptr.shape[0] == sum(s > 0 for s in sizes) + 1  # the examples were split
    tree = forest_tree_on_cpu(src, dst, mask, n, roots, batch, node_ptr, edge_ptr)
    assert_same_tree(tree, expected)
    assert torch.equal(tree.batch, batch)
    # unsplit: same result
    assert_same_tree(forest_tree_on_cpu(src, dst, mask, n, roots), expected)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_build_equals_mst_then_rooting(seed, dtype):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 30, 4).tolist()
    blocks, roots, offset = [], [], 0
    for s in sizes:
        blocks.append(rng.integers(0, s, (2, 2 * s)) + offset)
        roots.append(offset + int(rng.integers(0, s)))
        offset += s
    ei = torch.from_numpy(np.concatenate(blocks, 1))
    n = offset
    batch = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))
    cost = torch.from_numpy(rng.integers(0, 5, ei.shape[1]).astype(np.float64)).to(dtype)
    mask = minimum_spanning_tree(ei, cost, n)
    try:
        expected = Tree.from_parent(root_forest(ei[:, mask], n, roots), batch)
    except ValueError:
        roots = None
        expected = Tree.from_parent(root_forest(ei[:, mask], n), batch)
    src, dst = ei[0].numpy().copy(), ei[1].numpy().copy()
    assert_same_tree(spanning_tree_on_cpu(src, dst, cost, n, roots, batch), expected)


def test_layout_rejects_cycles():
    src = np.array([0, 1, 2], np.int64)
    dst = np.array([1, 2, 0], np.int64)
    with pytest.raises(ValueError, match="cycle"):
        forest_tree_on_cpu(src, dst, np.ones(3, np.bool_), 3)
    with pytest.raises(ValueError, match="cycle"):
        forest_tree_on_cpu(src, dst, np.ones(3, np.bool_), 4)


def test_lattice_layout_and_its_fallback():
    # a chain with one skip: ids differ by 1 or 2
    src = np.array([0, 1, 2, 4, 3], np.int64)
    dst = np.array([1, 2, 4, 5, 5], np.int64)
    mask = np.array([True, True, True, True, False])
    expected = Tree.from_parent(root_forest(torch.from_numpy(np.stack([src, dst]))[:, mask], 6,
                                            [3]))
    # vertex 3 only hangs on the unchosen edge: two trees, so the general layout runs
    assert_same_tree(forest_tree_on_cpu(src, dst, mask, 6, [3], offsets=lattice_offsets(src, dst)),
                     expected)
    mask[4] = True
    mask[3] = False
    expected = Tree.from_parent(root_forest(torch.from_numpy(np.stack([src, dst]))[:, mask], 6,
                                            [3]))
    offsets = lattice_offsets(src, dst)
    assert offsets.tolist() == [1, 2]
    assert_same_tree(forest_tree_on_cpu(src, dst, mask, 6, [3], offsets=offsets), expected)
    # offsets that miss an edge's difference: the general layout takes over
    assert_same_tree(forest_tree_on_cpu(src, dst, mask, 6, [3], offsets=np.array([1])), expected)
    assert lattice_offsets(np.arange(6), np.arange(6) + np.arange(6)).shape == (0,)
