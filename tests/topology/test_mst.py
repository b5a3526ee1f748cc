"""minimum_spanning_tree against scipy and the plain Kruskal of tests/oracle.py."""
import multiprocessing

import numba
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.csgraph
import torch

import treessm
from oracle import kruskal_mask
from treessm import GraphTopology, minimum_spanning_tree


def random_simple_graph(rng, n, m):
    """``m`` distinct unordered pairs (no self-loops) of ``n`` vertices, random direction."""
    pairs = set()
    while len(pairs) < m:
        u, v = rng.integers(0, n, 2)
        if u != v:
            pairs.add((min(u, v), max(u, v)))
    pairs = sorted(pairs)
    rng.shuffle(pairs)
    ei = np.array(pairs, dtype=np.int64).reshape(-1, 2).T
    flip = rng.random(ei.shape[1]) < 0.5
    ei[:, flip] = ei[::-1, flip]
    return torch.from_numpy(np.ascontiguousarray(ei))


def scipy_msf(edge_index, weight, n):
    ei = edge_index.numpy()
    mat = scipy.sparse.coo_matrix((weight.double().numpy(), (ei[0], ei[1])), shape=(n, n))
    tree = scipy.sparse.csgraph.minimum_spanning_tree(mat.tocsr()).tocoo()
    return {(min(a, b), max(a, b)) for a, b in zip(tree.row.tolist(), tree.col.tolist())}, \
        float(tree.sum())


def edge_set(edge_index, mask):
    ei = edge_index[:, mask].tolist()
    return {(min(a, b), max(a, b)) for a, b in zip(ei[0], ei[1])}


# ---------------------------------------------------------------------------- hand-checked
def test_triangle_and_tail():
    # 0-1 (1), 1-2 (2), 0-2 (3): the heaviest edge of the triangle is dropped
    ei = torch.tensor([[0, 1, 0, 2], [1, 2, 2, 3]])
    w = torch.tensor([1.0, 2.0, 3.0, 0.5])
    assert minimum_spanning_tree(ei, w, 4).tolist() == [True, True, False, True]


def test_ties_go_to_lower_index():
    # a 4-cycle of equal weights: the last edge closes the cycle
    ei = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]])
    assert minimum_spanning_tree(ei, torch.ones(4), 4).tolist() == [True, True, True, False]
    # same cycle listed in another order: still the last listed edge is dropped
    ei = torch.tensor([[3, 1, 0, 2], [0, 2, 1, 3]])
    assert minimum_spanning_tree(ei, torch.ones(4), 4).tolist() == [True, True, True, False]


def test_signed_zero_is_a_tie():
    # -0.0 == +0.0, so the lower index wins although -0.0 has the "smaller" bit pattern
    ei = torch.tensor([[0, 0], [1, 1]])
    assert minimum_spanning_tree(ei, torch.tensor([0.0, -0.0]), 2).tolist() == [True, False]


def test_self_loops_and_duplicates():
    ei = torch.tensor([[0, 0, 1, 1, 2], [0, 1, 0, 2, 2]])
    w = torch.tensor([-5.0, 2.0, 1.0, 3.0, -9.0])
    # self-loops never chosen; of the two copies of {0, 1}, the cheaper (index 2) wins
    assert minimum_spanning_tree(ei, w, 3).tolist() == [False, False, True, True, False]
    w = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0])  # equal copies: the earlier one wins
    assert minimum_spanning_tree(ei, w, 3).tolist() == [False, True, False, True, False]


def test_negative_weights():
    ei = torch.tensor([[0, 1, 0], [1, 2, 2]])
    w = torch.tensor([-1.0, -3.0, -2.0])
    assert minimum_spanning_tree(ei, w, 3).tolist() == [False, True, True]


@pytest.mark.parametrize("n", [0, 1, 5])
def test_empty_graph(n):
    mask = minimum_spanning_tree(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), n)
    assert mask.dtype == torch.bool and mask.shape == (0,)


def test_single_vertex_with_self_loop():
    assert minimum_spanning_tree(torch.tensor([[0], [0]]), torch.tensor([1.0]), 1).tolist() == \
        [False]


def test_top_level_export():
    assert treessm.minimum_spanning_tree is minimum_spanning_tree


# ---------------------------------------------------------------------------- random vs oracles
@pytest.mark.parametrize("seed", range(6))
def test_distinct_weights_match_scipy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    m = int(rng.integers(0, min(n * (n - 1) // 2, 200) + 1))
    ei = random_simple_graph(rng, n, m)
    w = torch.from_numpy(rng.permutation(m) + 1.0 + rng.random(m) * 0.5)  # distinct, positive
    mask = minimum_spanning_tree(ei, w, n)
    expected, total = scipy_msf(ei, w, n)
    assert edge_set(ei, mask) == expected
    assert float(w[mask].sum()) == pytest.approx(total, rel=1e-12)
    ncomp = scipy.sparse.csgraph.connected_components(
        scipy.sparse.coo_matrix((np.ones(m), (ei[0].numpy(), ei[1].numpy())), shape=(n, n)),
        directed=False)[0]
    assert int(mask.sum()) == n - ncomp  # a spanning forest: one tree per component


@pytest.mark.parametrize("seed", range(8))
def test_ties_duplicates_and_loops_match_plain_kruskal(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 40))
    m = int(rng.integers(0, 150))
    ei = torch.from_numpy(rng.integers(0, n, (2, m)))  # loops and repeats allowed
    w = torch.from_numpy(rng.integers(-2, 3, m).astype(np.float32))  # many ties
    assert torch.equal(minimum_spanning_tree(ei, w, n), kruskal_mask(ei, w, n))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16, torch.float32,
                                          torch.float64])
def test_dtypes(index_dtype, weight_dtype):
    rng = np.random.default_rng(7)
    n, m = 30, 90
    ei = torch.from_numpy(rng.integers(0, n, (2, m))).to(index_dtype)
    w = torch.from_numpy(rng.normal(size=m)).to(weight_dtype)
    assert torch.equal(minimum_spanning_tree(ei, w, n), kruskal_mask(ei.long(), w, n))


def test_disconnected_batch_hint_gives_same_forest():
    rng = np.random.default_rng(3)
    sizes = [5, 1, 9, 0, 7]
    blocks, offset = [], 0
    for s in sizes:
        if s > 1:
            blocks.append(torch.from_numpy(rng.integers(0, s, (2, 3 * s))) + offset)
        offset += s
    ei = torch.cat(blocks, 1)
    n = offset
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    w = torch.from_numpy(rng.integers(0, 4, ei.shape[1]).astype(np.float64))
    expected = kruskal_mask(ei, w, n)
    assert torch.equal(minimum_spanning_tree(ei, w, n, batch=batch), expected)
    # a batch that does not split the edges is only a hint: same answer
    perm = torch.from_numpy(rng.permutation(ei.shape[1]))
    assert torch.equal(minimum_spanning_tree(ei[:, perm], w[perm], n, batch=batch),
                       kruskal_mask(ei[:, perm], w[perm], n))


@pytest.mark.parametrize("gap", [10 ** 8, 10 ** 12, 2 ** 62])
def test_huge_example_ids_cost_nothing(gap):
    # the examples are numbered by rank: ids with huge gaps once allocated per id value
    # (a MemoryError, or 44 s for 4 vertices at 10^8)
    ei = torch.tensor([[0, 2, 3], [1, 3, 4]])
    w = torch.tensor([1.0, 2.0, 0.5])
    batch = torch.tensor([0, 0, gap, gap, gap])
    assert minimum_spanning_tree(ei, w, 5, batch=batch).tolist() == [True, True, True]
    tree = GraphTopology()(torch.randn(5, 3), ei, batch=batch)
    assert tree.num_trees == 2 and torch.equal(tree.batch, batch)


def test_examples_beyond_32_bit_ids_are_refused():
    # the CPU builders number an example's vertices with 32 bits: a clear error, not a
    # wrap-around (nothing of that size is allocated before the check)
    with pytest.raises(ValueError, match=r"at most 2\^31 - 1 of each per example"):
        minimum_spanning_tree(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), 2 ** 31)
    assert minimum_spanning_tree(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0),
                                 2 ** 31 - 1).shape == (0,)


def test_large_grid_against_scipy():
    h = w = 40
    idx = torch.arange(h * w).view(h, w)
    ei = torch.cat([torch.stack([idx[:, :-1].reshape(-1), idx[:, 1:].reshape(-1)]),
                    torch.stack([idx[:-1].reshape(-1), idx[1:].reshape(-1)])], 1)
    cost = torch.rand(ei.shape[1], generator=torch.Generator().manual_seed(0)) + 0.1
    mask = minimum_spanning_tree(ei, cost, h * w)
    expected, total = scipy_msf(ei, cost, h * w)
    assert edge_set(ei, mask) == expected
    assert int(mask.sum()) == h * w - 1


# ---------------------------------------------------------------------------- errors
def test_errors():
    ei = torch.tensor([[0, 1], [1, 2]])
    w = torch.tensor([1.0, 2.0])
    with pytest.raises(TypeError, match="edge_index"):
        minimum_spanning_tree(ei.tolist(), w, 3)
    with pytest.raises(TypeError, match="edge_index"):
        minimum_spanning_tree(ei.float(), w, 3)
    with pytest.raises(TypeError, match="edge_weight"):
        minimum_spanning_tree(ei, w.tolist(), 3)
    with pytest.raises(TypeError, match="edge_weight"):
        minimum_spanning_tree(ei, torch.tensor([1, 2]), 3)
    with pytest.raises(TypeError, match="num_nodes"):
        minimum_spanning_tree(ei, w, 3.0)
    with pytest.raises(ValueError, match="edge_index"):
        minimum_spanning_tree(ei.view(1, 4), w, 3)
    with pytest.raises(ValueError, match="edge_index"):
        minimum_spanning_tree(torch.tensor([[0, 1, 2], [1, 2, 0], [0, 0, 0]]), w, 3)
    with pytest.raises(ValueError, match=r"edge_index must hold vertex ids in \[0, 2\)"):
        minimum_spanning_tree(ei, w, 2)
    with pytest.raises(ValueError, match="edge_index"):
        minimum_spanning_tree(torch.tensor([[0, -1], [1, 2]]), w, 3)
    with pytest.raises(ValueError, match="edge_weight"):
        minimum_spanning_tree(ei, torch.tensor([1.0]), 3)
    with pytest.raises(ValueError, match="edge_weight"):
        minimum_spanning_tree(ei, w.view(2, 1), 3)
    with pytest.raises(ValueError, match="num_nodes"):
        minimum_spanning_tree(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), -1)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="finite"):
            minimum_spanning_tree(ei, torch.tensor([1.0, bad]), 3)
    with pytest.raises(ValueError, match="finite"):
        minimum_spanning_tree(ei, torch.tensor([1.0, float("nan")], dtype=torch.float64), 3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_come_back_on_cuda():
    ei = torch.tensor([[0, 1, 0], [1, 2, 2]], device="cuda")
    mask = minimum_spanning_tree(ei, torch.tensor([1.0, 2.0, 3.0], device="cuda"), 3)
    assert mask.device.type == "cuda" and mask.tolist() == [True, True, False]


# ---------------------------------------------------------------------------- work sharing
def _child_mst(seed):
    rng = np.random.default_rng(seed)
    ei = torch.from_numpy(np.concatenate([rng.integers(0, 10, (2, 30)) + 10 * b
                                          for b in range(8)], 1))
    w = torch.from_numpy(rng.random(ei.shape[1]))
    batch = torch.repeat_interleave(torch.arange(8), 10)  # eight segments: helpers are used
    return minimum_spanning_tree(ei, w, 80, batch=batch).tolist() == kruskal_mask(ei, w, 80).tolist()


@pytest.mark.parametrize("threads", [1, 2])
def test_run_chunks_covers_every_item_once(threads):
    from numba import njit

    from treessm.ops.chunks import run_chunks

    @njit(nogil=True)
    def mark(start, stop, out):
        for i in range(start, stop):
            out[i] += 1

    previous = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        for n in (0, 1, 7, 100):
            out = np.zeros(n, np.int64)
            run_chunks(mark, n, out)
            assert (out == 1).all()
    finally:
        numba.set_num_threads(previous)


def test_run_chunks_reraises_and_does_not_hang():
    from treessm.ops.chunks import run_chunks

    def kernel(start, stop, out):
        for i in range(start, stop):
            if i == 40:
                raise RuntimeError("item 40")
            out[i] = 1

    previous = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        out = np.zeros(64)
        with pytest.raises(RuntimeError, match="item 40"):
            run_chunks(kernel, 64, out)
    finally:
        numba.set_num_threads(previous)


def test_work_sharing_survives_fork():
    # the helper threads of the parent do not exist in a forked child: it must not hang
    batch = torch.repeat_interleave(torch.arange(8), 10)
    ei = torch.cat([torch.randint(0, 10, (2, 30)) + 10 * b for b in range(8)], 1)
    minimum_spanning_tree(ei, torch.rand(ei.shape[1]), 80, batch=batch)  # pool exists now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        assert pool.apply_async(_child_mst, (0,)).get(timeout=120)
