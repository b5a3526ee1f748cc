"""tree_partition: parts of nearly equal size along a spanning forest's depth-first order,
reproducible from their generator, the same on a GPU, and keeping far more of a graph's
edges inside parts than random parts do."""
import pytest
import torch

from treessm.examples.large_graph import planted_partition
from treessm.topology import tree_partition

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: torch.cuda.is_available() is False")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n,parts", [(1, 1), (7, 7), (100, 1), (100, 3), (1000, 17),
                                     (1000, 1000)])
def test_parts_are_nonempty_and_within_one_vertex_of_each_other(n, parts):
    ei = torch.randint(0, n, (2, 3 * n), generator=_gen(n))  # loops, repeats, components
    part = tree_partition(ei, n, parts, generator=_gen())
    assert part.dtype == torch.long and part.shape == (n,)
    sizes = torch.bincount(part, minlength=parts)
    assert sizes.numel() == parts and int(sizes.min()) >= 1
    assert int(sizes.max()) - int(sizes.min()) <= 1


def test_a_path_is_cut_into_consecutive_segments():
    # the path visits the vertices in this order, from vertex 0 (the root: the lowest id)
    n = 50
    order = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(n - 1,
                                                                            generator=_gen(3))])
    ei = torch.stack([order[1:], order[:-1]])
    part = tree_partition(ei, n, 4, generator=_gen())
    assert part[order].tolist() == [0] * 13 + [1] * 12 + [2] * 13 + [3] * 12


def test_a_part_of_a_tree_is_whole_subtrees_and_one_root_path():
    # the graph is a tree (its own spanning forest, rooted at vertex 0): in every part, the
    # vertices whose subtree leaves the part lie on one root path
    n = 400
    g = _gen(8)
    parent = torch.cat([torch.tensor([-1]), (torch.rand(n - 1, generator=g)
                                            * torch.arange(1, n)).long()])
    ei = torch.stack([torch.arange(1, n), parent[1:]])
    part = tree_partition(ei, n, 9, generator=_gen())
    ancestors = [set()]
    for v in range(1, n):
        ancestors.append(ancestors[int(parent[v])] | {int(parent[v])})
    for k in range(9):
        inside = set(torch.nonzero(part == k).view(-1).tolist())
        outside = [v for v in range(n) if v not in inside]
        cut = {a for v in outside for a in ancestors[v] if a in inside}
        chain = sorted(cut, key=lambda v: len(ancestors[v]))
        assert all(chain[i] in ancestors[chain[i + 1]] for i in range(len(chain) - 1))


def test_graphs_without_edges_and_without_vertices():
    assert tree_partition(torch.zeros(2, 0, dtype=torch.long), 5, 5).tolist() == [0, 1, 2, 3, 4]
    assert tree_partition(torch.zeros(2, 0, dtype=torch.long), 0, 1).numel() == 0


def test_reproducible_from_the_generator():
    data = planted_partition(3000, seed=4)
    a = tree_partition(data.edge_index, data.num_nodes, 10, generator=_gen(1))
    b = tree_partition(data.edge_index, data.num_nodes, 10, generator=_gen(1))
    c = tree_partition(data.edge_index, data.num_nodes, 10, generator=_gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_parts_keep_many_more_edges_than_random_parts():
    # random parts keep about 1/20 of the edges; ranges of a depth-first order keep the
    # forest's edges (one per vertex of ten) and the others that fall inside
    data = planted_partition(20_000, seed=5)
    part = tree_partition(data.edge_index, data.num_nodes, 20, generator=_gen())
    src, dst = data.edge_index
    kept = float((part[src] == part[dst]).float().mean())
    assert kept > 0.2
    shuffled = part[torch.randperm(data.num_nodes, generator=_gen(6))]
    assert float((shuffled[src] == shuffled[dst]).float().mean()) < 0.07


@pytest.mark.parametrize("args,error,message", [
    ((0,), ValueError, "num_parts must be a positive int"),
    ((11,), ValueError, "num_parts must be at most the number of vertices (10)"),
    ((2.0,), TypeError, "num_parts must be a positive int"),
    ((True,), TypeError, "num_parts must be a positive int"),
])
def test_bad_num_parts(args, error, message):
    ei = torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        tree_partition(ei, 10, *args)


def test_bad_edge_index():
    with pytest.raises(ValueError, match="edge_index"):
        tree_partition(torch.tensor([[0, 1], [1, 12]]), 10, 2)
    with pytest.raises(TypeError, match="edge_index"):
        tree_partition(torch.tensor([[0.0, 1.0], [1.0, 2.0]]), 10, 2)


@needs_cuda
def test_cuda_gives_the_cpus_parts():
    data = planted_partition(5000, seed=7)
    cpu = tree_partition(data.edge_index, data.num_nodes, 9, generator=_gen(3))
    gpu = tree_partition(data.edge_index.cuda(), data.num_nodes, 9, generator=_gen(3))
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
