"""Tree.from_parent: breadth-first plan on hand-written forests, and validation."""
import pytest
import torch

from treessm import Tree
from treessm.ops.plan import level_plan
from oracle import all_roots, ancestors, chain, random_forest, star


def children_of(tree, i):
    """Children of position i by the documented rule (range clipped to i's tree)."""
    tp = tree.tree_ptr.tolist()
    end = next(tp[t + 1] for t in range(len(tp) - 1) if tp[t] <= i < tp[t + 1])
    cp = tree.child_ptr
    return tree.order[int(cp[i]):min(int(cp[i + 1]), end)].tolist()


def check_plan(tree, parent):
    """Every invariant of the breadth-first plan, checked from the parent array alone."""
    parent = [int(p) for p in parent]
    n = len(parent)
    order = tree.order.tolist()
    assert tree.num_nodes == n
    assert sorted(order) == list(range(n)), "order is a permutation"
    pos = {v: i for i, v in enumerate(order)}
    roots = [v for v in range(n) if parent[v] < 0]
    assert tree.num_trees == len(roots)
    assert tree.roots.tolist() == roots, "trees in ascending root id"
    # tree_ptr: tree t occupies positions [tree_ptr[t], tree_ptr[t+1]) and starts at its root
    tp = tree.tree_ptr.tolist()
    assert tp[0] == 0 and tp[-1] == n and len(tp) == len(roots) + 1
    root_of = [a[-1] for a in ancestors(parent)]
    for t, r in enumerate(roots):
        assert order[tp[t]] == r
        assert all(root_of[v] == r for v in order[tp[t]:tp[t + 1]])
    # depth
    depth = [len(a) - 1 for a in ancestors(parent)]
    assert tree.depth.tolist() == depth
    for t in range(len(roots)):
        d = [depth[v] for v in order[tp[t]:tp[t + 1]]]
        assert d == sorted(d), "depth non-decreasing inside a tree"
    for v in range(n):
        if parent[v] >= 0:
            assert pos[parent[v]] < pos[v], "parents before children"
    # child_ptr: the children of each vertex, contiguous and ascending by id
    for i, v in enumerate(order):
        assert children_of(tree, i) == [u for u in range(n) if parent[u] == v]
    assert tree.child_ptr.shape == (n + 1,)
    assert torch.equal(tree.parent, torch.as_tensor(parent, dtype=torch.long))


def test_hand_written_forest():
    #   tree of 0:  0 -> {2, 5}, 2 -> {1, 4};  tree of 3: 3 -> {6};  7 alone
    parent = torch.tensor([-1, 2, 0, -1, 2, 0, 3, -1])
    tree = Tree.from_parent(parent)
    assert tree.order.tolist() == [0, 2, 5, 1, 4, 3, 6, 7]
    assert tree.tree_ptr.tolist() == [0, 5, 7, 8]
    assert tree.depth.tolist() == [0, 2, 1, 0, 2, 1, 1, 0]
    assert [children_of(tree, i) for i in range(8)] == [[2, 5], [1, 4], [], [], [], [6], [], []]
    assert tree.num_trees == 3 and tree.max_depth == 2
    check_plan(tree, parent)


@pytest.mark.parametrize("parent", [
    chain(7), chain(9, torch.Generator().manual_seed(0)), star(6, center=3), all_roots(5),
    torch.tensor([-1]), random_forest(40, 4, torch.Generator().manual_seed(1)),
    random_forest(60, 1, torch.Generator().manual_seed(2), locality=3),
], ids=["chain", "chain_shuffled", "star", "all_roots", "single", "random", "random_deep"])
def test_plan_invariants(parent):
    check_plan(Tree.from_parent(parent), parent)


def test_accepts_lists_and_int32():
    assert Tree.from_parent([-1, 0, 0]).order.tolist() == [0, 1, 2]
    tree = Tree.from_parent(torch.tensor([1, -1], dtype=torch.int32))
    assert tree.parent.dtype == torch.long and tree.order.tolist() == [1, 0]


def test_batch_is_kept():
    batch = torch.tensor([0, 0, 1, 1])
    tree = Tree.from_parent(torch.tensor([-1, 0, 3, -1]), batch)
    assert torch.equal(tree.batch, batch)
    check_plan(tree, [-1, 0, 3, -1])


def test_empty_tree():
    tree = Tree.from_parent(torch.zeros(0, dtype=torch.long))
    assert tree.num_nodes == 0 and tree.num_trees == 0 and tree.max_depth == 0
    assert tree.order.shape == (0,) and tree.tree_ptr.tolist() == [0]
    assert tree.child_ptr.shape == (1,)


def test_to_cpu():
    tree = Tree.from_parent(torch.tensor([-1, 0, 1]))
    assert tree.to("cpu") is tree
    assert tree.cpu() is tree
    assert tree.device == torch.device("cpu")
    assert "num_nodes=3" in repr(tree)


@pytest.mark.parametrize("parent, match", [
    (torch.tensor([-1, 3]), r"parent\[1\] = 3"),          # index out of range
    (torch.tensor([-1, -2]), r"parent\[1\] = -2"),        # below -1
    (torch.tensor([-1, 2, 1]), "cycle"),                  # 1 <-> 2
    (torch.tensor([0, -1]), "cycle"),                     # self loop at 0
    (torch.tensor([1, 0]), "cycle"),                      # no root at all
])
def test_invalid_parent(parent, match):
    with pytest.raises(ValueError, match=match):
        Tree.from_parent(parent)


@pytest.mark.parametrize("parent", [[-1, 7, 0], [-1, -5], [3], [-1, 0, 2 ** 40]])
def test_out_of_range_parent_raises_without_validation(parent):
    # the layout kernel indexes by the parent ids: unchecked, they crashed the interpreter
    with pytest.raises(ValueError, match="parent must hold vertex ids"):
        Tree.from_parent(torch.tensor(parent), validate=False)


@pytest.mark.parametrize("empty", [[], (), torch.zeros(0, dtype=torch.long),
                                   torch.zeros(0, dtype=torch.int32)])
def test_empty_parent_gives_the_empty_forest(empty):
    tree = Tree.from_parent(empty, batch=[] if isinstance(empty, list) else None)
    assert tree.num_nodes == tree.num_trees == 0
    assert tree.roots.shape == (0,) and tree.order.dtype == torch.long


def test_parent_in_other_batch_element():
    with pytest.raises(ValueError, match="may not span examples"):
        Tree.from_parent(torch.tensor([-1, 0, 1]), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="batch must have one entry per vertex"):
        Tree.from_parent(torch.tensor([-1, 0]), torch.tensor([0, 0, 0]))


def test_bad_types():
    with pytest.raises(TypeError, match="parent must be an integer tensor"):
        Tree.from_parent(torch.tensor([-1.0, 0.0]))
    with pytest.raises(TypeError, match="parent must be an integer tensor"):
        Tree.from_parent(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="parent must be 1-D"):
        Tree.from_parent(torch.tensor([[-1, 0]]))
    with pytest.raises(TypeError, match="batch must be an integer tensor"):
        Tree.from_parent(torch.tensor([-1, 0]), torch.tensor([0.0, 0.0]))


def test_num_levels_counts_breadth_first_levels_of_all_trees():
    g = torch.Generator().manual_seed(11)
    for parent in (chain(30), star(12, 3), all_roots(4), random_forest(200, 5, g),
                   random_forest(300, 2, g, locality=3), torch.tensor([-1, -1, 1, -1, 3, 4, -1]),
                   torch.zeros(0, dtype=torch.long)):
        tree = Tree.from_parent(parent)
        assert tree.num_levels == int(level_plan(tree).tree_level_ptr[-1])
        assert tree.to("meta").num_levels == tree.num_levels
        sizes = torch.diff(tree.tree_ptr)
        assert tree.max_tree_size == (int(sizes.max()) if sizes.numel() else 0)
