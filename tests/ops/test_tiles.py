"""The tiled layout of tree scans (treessm.ops.tiles): the plan against a loop-written
reference, and the three-phase scan run from the plan alone against the dense oracle."""
import bisect
import functools
import time

import numpy as np
import pytest
import torch

from oracle import all_roots, chain, dense_tree_scan, empty, random_forest, single_vertex, star
from treessm import GraphTopology, GridTopology, Tree, tree_scan
from treessm.ops import tiles
from treessm.ops.tiles import (BOUNDARY, ENTRY, HEAD, ROOT, TilePlan, max_light_levels,
                               max_tiles, tile_plan)

TILES = (1, 2, 7, 64, 10 ** 6)
DIRECTIONS = ("down", "up", "both")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _grid_forest():
    return GridTopology()(torch.randn(3, 9, 8, 5, generator=_gen(3))).parent


def _graph_forest():
    # a sparse random graph: a large component, small ones and isolated vertices
    edge_index = torch.randint(0, 260, (2, 200), generator=_gen(4))
    return GraphTopology()(torch.randn(260, 6, generator=_gen(5)), edge_index).parent


# forests small enough for the dense oracle
FORESTS = {
    "random": lambda: random_forest(120, 1, _gen(0)),
    "random_many_roots": lambda: random_forest(200, 23, _gen(1)),
    "deep": lambda: random_forest(150, 2, _gen(2), locality=3),
    "single_vertex": single_vertex,
    "empty": empty,
    "isolated": lambda: all_roots(9),
    "chain": lambda: chain(90, _gen(6)),
    "star": lambda: star(80, center=17),
    "binary": lambda: torch.cat([torch.tensor([-1]), (torch.arange(1, 127) - 1) // 2]),
    "grid_trees": _grid_forest,
    "graph_forest": _graph_forest,
}
# larger forests, checked against the compiled scan (itself tested against the oracle)
LARGE = {
    "long_chain": lambda: chain(10 ** 4),
    "wide_star": lambda: star(3000, center=5),
    "random_2k": lambda: random_forest(2000, 40, _gen(7)),
}


@functools.lru_cache(maxsize=None)
def _tree(name):
    return Tree.from_parent(FORESTS.get(name, LARGE.get(name))())


# ---------------------------------------------------------------------- loop reference
def reference_layout(tree, tile):
    """The layout written as loops over Python lists."""
    parent = tree.parent.tolist()
    order, tree_ptr = tree.order.tolist(), tree.tree_ptr.tolist()
    n = len(parent)
    children = [[] for _ in range(n)]
    for v in order:  # breadth-first order
        if parent[v] >= 0:
            children[parent[v]].append(v)
    size = [1] * n
    for v in reversed(order):
        if parent[v] >= 0:
            size[parent[v]] += size[v]
    heavy = [None] * n
    for v in range(n):
        for c in children[v]:  # the first of the largest
            if heavy[v] is None or size[c] > size[heavy[v]]:
                heavy[v] = c
    vertex = []
    for t in range(len(tree_ptr) - 1):
        stack = [order[tree_ptr[t]]]
        while stack:  # explicit-stack preorder: heavy child first, then the light ones
            v = stack.pop()
            vertex.append(v)
            light = [c for c in children[v] if c != heavy[v]]
            stack.extend(reversed(light))
            if heavy[v] is not None:
                stack.append(heavy[v])
        assert len(vertex) == tree_ptr[t + 1]
    pos = [0] * n
    for p, v in enumerate(vertex):
        pos[v] = p
    ppos = [pos[parent[v]] if parent[v] >= 0 else -1 for v in vertex]
    ld = [0] * n
    for p, v in enumerate(vertex):
        if ppos[p] >= 0:
            ld[p] = ld[ppos[p]] + (heavy[parent[v]] != v)
    head = [ppos[p] < 0 or heavy[vertex[ppos[p]]] != vertex[p] for p in range(n)]

    # tiles: first fit over small trees and runs of `tile` positions of large ones
    items = []
    for t in range(len(tree_ptr) - 1):
        a, b = tree_ptr[t], tree_ptr[t + 1]
        items += [(s, min(s + tile, b)) for s in range(a, b, tile)]
    tile_ptr = [0]
    for s, e in items:
        if e - tile_ptr[-1] > tile:
            tile_ptr.append(s)
    if n:
        tile_ptr.append(n)
    tile_of = [bisect.bisect_right(tile_ptr, p) - 1 for p in range(n)]
    scan, levels = [], []
    for k in range(len(tile_ptr) - 1):
        ps = range(tile_ptr[k], tile_ptr[k + 1])
        scan += sorted(ps, key=lambda p: (ld[p], p))
        lo = min(ld[p] for p in ps)
        hi = max(ld[p] for p in ps)
        levels.append([sum(1 for p in ps if ld[p] - lo == j) for j in range(hi - lo + 1)])
    entry = [ppos[p] >= 0 and tile_of[ppos[p]] < tile_of[p] for p in range(n)]
    top, crossed = [0] * n, [0] * n  # parents come first in preorder
    for p in range(n):
        top[p] = p if ppos[p] < 0 or entry[p] else top[ppos[p]]
        crossed[p] = entry[p] + (crossed[ppos[p]] if ppos[p] >= 0 else 0)
    is_boundary = [False] * n
    for p in range(n):
        if entry[p]:
            is_boundary[ppos[p]] = True
    bpos = sorted((p for p in range(n) if is_boundary[p]), key=lambda p: (crossed[p], p))
    number = {p: i for i, p in enumerate(bpos)}
    feeder = [number[ppos[top[b]]] if ppos[top[b]] >= 0 else -1 for b in bpos]
    entries = sorted((p for p in range(n) if entry[p]), key=lambda p: (number[ppos[p]], p))
    paths = []  # per tile: the deepest boundary vertex's root path, from its top down to it
    for k in range(len(tile_ptr) - 1):
        mine = [b for b in bpos if tile_ptr[k] <= b < tile_ptr[k + 1]]
        path = []
        if mine:
            p = max(mine)
            while True:
                path.append(p)
                if p == top[p]:
                    break
                p = ppos[p]
        paths.append(path[::-1])
    return dict(vertex=vertex, parent=ppos, size=[size[v] for v in vertex], light_depth=ld,
                head=head, tile_ptr=tile_ptr, scan=scan, levels=levels, entry=entry, top=top,
                boundary_pos=bpos, feeder=feeder, depth=[crossed[b] for b in bpos],
                entries=entries, entry_parent_number=[number[ppos[e]] for e in entries],
                paths=paths)


def _padded(t, count):
    values = t.tolist()
    assert values[count:] == [-1] * (len(values) - count)
    return values[:count]


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("name", list(FORESTS) + list(LARGE))
def test_layout_matches_the_loop_reference(name, tile):
    tree = _tree(name)
    n = tree.num_nodes
    plan = tile_plan(tree, tile)
    ref = reference_layout(tree, tile)
    assert all(t.dtype == torch.int32 for t in plan if isinstance(t, torch.Tensor))
    assert plan.vertex.tolist() == ref["vertex"]
    assert plan.parent.tolist() == ref["parent"]
    assert plan.size.tolist() == ref["size"]
    assert plan.light_depth.tolist() == ref["light_depth"]
    assert plan.tree_ptr.tolist() == tree.tree_ptr.tolist()
    flags = plan.flags.tolist()
    assert [bool(f & ROOT) for f in flags] == [p < 0 for p in ref["parent"]]
    assert [bool(f & HEAD) for f in flags] == ref["head"]
    assert [bool(f & ENTRY) for f in flags] == ref["entry"]
    number = {p: i for i, p in enumerate(ref["boundary_pos"])}
    assert [bool(f & BOUNDARY) for f in flags] == [p in number for p in range(n)]
    assert plan.top.tolist() == ref["top"]

    # tiles: the bound holds, the tiles after the real ones are empty
    m = len(ref["tile_ptr"]) - 1
    assert plan.num_tiles == max_tiles(n, tree.num_trees, tile, tree.max_tree_size) >= m
    tile_ptr = plan.tile_ptr.tolist()
    assert tile_ptr[:m + 1] == ref["tile_ptr"] and tile_ptr[m + 1:] == [n] * (plan.num_tiles - m)
    assert all(0 < b - a <= tile for a, b in zip(tile_ptr, tile_ptr[1:m + 1]))
    for a, b in zip(tree.tree_ptr.tolist(), tree.tree_ptr.tolist()[1:]):
        if b - a <= tile:  # a small tree lies in one tile
            assert bisect.bisect_right(tile_ptr, a) == bisect.bisect_right(tile_ptr, b - 1)

    # scan order and the light levels of each tile
    assert plan.scan.tolist() == ref["scan"]
    assert plan.num_levels == max_light_levels(n, tree.max_tree_size)
    assert plan.level_ptr.shape == (plan.num_tiles, plan.num_levels + 1)
    for k in range(plan.num_tiles):
        row = plan.level_ptr[k].tolist()
        counts = [b - a for a, b in zip(row, row[1:])]
        want = ref["levels"][k] if k < m else []
        assert plan.tile_levels[k] == len(want)
        assert counts == want + [0] * (plan.num_levels - len(want))
        assert row[0] == tile_ptr[k] and row[-1] == tile_ptr[k + 1]

    # boundary vertices, the boundary tree and the entries hanging from them
    nb = len(ref["boundary_pos"])
    assert plan.boundary_level_ptr[-1] == nb
    assert _padded(plan.boundary_pos, nb) == ref["boundary_pos"]
    assert _padded(plan.feeder, nb) == ref["feeder"]
    assert plan.boundary.tolist() == [number.get(p, -1) for p in range(n)]
    level_ptr = plan.boundary_level_ptr.tolist()
    assert [bisect.bisect_right(level_ptr, i) - 1 for i in range(nb)] == ref["depth"]
    assert all(f < i for i, f in enumerate(ref["feeder"]))
    entries = _padded(plan.entries, len(ref["entries"]))
    assert entries == ref["entries"]
    entry_ptr = plan.entry_ptr.tolist()
    assert len(entry_ptr) == n + 1
    for i in range(nb):
        group = ref["entry_parent_number"][entry_ptr[i]:entry_ptr[i + 1]]
        assert group == [i] * len(group)
    assert entry_ptr[nb] == len(entries)
    tile_boundary = plan.tile_boundary.tolist()
    of_tile = [[] for _ in range(plan.num_tiles)]
    for i, b in enumerate(ref["boundary_pos"]):
        of_tile[bisect.bisect_right(tile_ptr, b) - 1].append(i)
    for k, mine in enumerate(of_tile):
        lo, hi = tile_boundary[k]
        assert (lo, hi) == ((mine[0], mine[-1] + 1) if mine else (0, 0))
        assert len({ref["top"][ref["boundary_pos"][i]] for i in mine}) <= 1

    # boundary paths, tile by tile
    paths = ref["paths"] + [[]] * (plan.num_tiles - m)
    path_ptr = plan.path_ptr.tolist()
    assert path_ptr == [0] + list(np.cumsum([len(p) for p in paths]))
    assert _padded(plan.path, path_ptr[-1]) == [p for path in paths for p in path]


@pytest.mark.parametrize("tile", [1, 2, 7, 64])
@pytest.mark.parametrize("name", ["random_many_roots", "deep", "star", "grid_trees", "long_chain"])
def test_tile_structure(name, tile):
    """What the kernels rely on, checked on the plan itself: runs contiguous in path order
    inside a level, a head's in-tile parent one level lower, tops heading in-tile paths,
    boundary vertices of a tile on one root path."""
    plan = tile_plan(_tree(name), tile)
    parent, flags, ld = plan.parent.tolist(), plan.flags.tolist(), plan.light_depth.tolist()
    scan, tile_ptr, top = plan.scan.tolist(), plan.tile_ptr.tolist(), plan.top.tolist()
    for k in range(plan.num_tiles):
        s, e = tile_ptr[k], tile_ptr[k + 1]
        levels = plan.level_ptr[k].tolist()
        for j in range(plan.tile_levels[k]):
            for slot in range(levels[j], levels[j + 1]):
                p, q = scan[slot], parent[scan[slot]]
                if flags[p] & (ROOT | ENTRY):
                    assert top[p] == p and (q < s)
                elif flags[p] & HEAD:  # a light child: parent in the tile, one level lower
                    assert s <= q < p < e and ld[q] == ld[p] - 1 and top[p] == top[q]
                else:  # along its run: the previous slot
                    assert q == p - 1 == scan[slot - 1] and slot > levels[j] and top[p] == top[q]
        lo, hi = plan.tile_boundary[k].tolist()
        chain_ = plan.boundary_pos[lo:hi].tolist()
        for a, b in zip(chain_, chain_[1:]):  # each the ancestor of the next
            assert a < b < a + plan.size[a]
        # the boundary path: from the top, each the parent of the next, ending at the
        # deepest boundary vertex and holding them all
        path = plan.path[plan.path_ptr[k]:plan.path_ptr[k + 1]].tolist()
        assert bool(path) == (hi > lo)
        if path:
            assert top[path[0]] == path[0] and path[-1] == chain_[-1]
            assert all(parent[b] == a for a, b in zip(path, path[1:]))
            assert set(chain_) <= set(path) and all(s <= p < e for p in path)


# ---------------------------------------------------------------------- three phases
class _Plan:
    """The plan as Python lists (what a kernel would read)."""

    def __init__(self, plan: TilePlan):
        for k, v in plan._asdict().items():
            setattr(self, k, v.tolist() if isinstance(v, torch.Tensor) else v)
        self.n = len(self.vertex)
        self.nb = self.boundary_level_ptr[-1]

    def slots(self, k, reverse=False):
        """Tile k's slots level by level, the lowest level first (or everything reversed)."""
        levels = self.level_ptr[k]
        out = [s for j in range(self.tile_levels[k]) for s in range(levels[j], levels[j + 1])]
        return out[::-1] if reverse else out

    def tile_of(self, p):
        return bisect.bisect_right(self.tile_ptr, p) - 1


def _root_first(P, X, W, incoming):
    """Each tile once, roots first: ``h = X + W h(parent)``; at an entry the parent value
    is ``incoming(parent position)``. Returns h by position."""
    h = np.zeros_like(X)
    for k in range(P.num_tiles):
        for slot in P.slots(k):
            p = P.scan[slot]
            q = P.parent[p]
            if P.flags[p] & ROOT:
                h[p] = X[p]
            elif P.flags[p] & ENTRY:
                h[p] = X[p] + W[p] * incoming(q)
            else:
                assert P.tile_ptr[k] <= q < p
                h[p] = X[p] + W[p] * h[q]
    return h


def _leaf_first(P, X, W):
    """Each tile once, leaves first: ``h = X + sum over the in-tile children of W h``."""
    h = X.copy()
    for k in range(P.num_tiles):
        for slot in P.slots(k, reverse=True):
            p = P.scan[slot]
            if not P.flags[p] & (ROOT | ENTRY):
                h[P.parent[p]] += W[p] * h[p]
    return h


def three_phase_down(P, X, W):
    # phase 1: h = A * (value entering at the top) + B, symbolic per tile
    zero = np.zeros_like(X)
    A = _root_first(P, zero, W, lambda q: 1.0)  # 0 below a root
    B = _root_first(P, X, W, lambda q: 0.0)
    # phase 2: the boundary tree, feeders first
    H = np.zeros((P.nb,) + X.shape[1:])
    for i in range(P.nb):
        b, f = P.boundary_pos[i], P.feeder[i]
        assert f < i
        H[i] = B[b] + A[b] * (H[f] if f >= 0 else 0.0)
    # phase 3: each tile again with the true values entering it
    return _root_first(P, X, W, lambda q: H[P.boundary[q]])


def three_phase_up(P, X, W):
    # phase 1: up values inside each tile with nothing from later tiles (B), and each
    # boundary vertex's product of weights up to its top (A)
    B = _leaf_first(P, X, W)
    at_top = np.zeros_like(X)
    at_top[[p for p in range(P.n) if P.flags[p] & (ROOT | ENTRY)]] = 1.0
    A = _root_first(P, at_top, W, lambda q: 0.0)
    # phase 2: s[i], what the children in later tiles give boundary vertex i, deepest first
    s = np.zeros((P.nb,) + X.shape[1:])
    for i in reversed(range(P.nb)):
        for e in P.entries[P.entry_ptr[i]:P.entry_ptr[i + 1]]:
            value = B[e]
            lo, hi = P.tile_boundary[P.tile_of(e)]
            if lo < hi and P.top[P.boundary_pos[lo]] == e:  # the tile's boundary hangs below e
                for j in range(lo, hi):
                    assert j > i
                    value = value + A[P.boundary_pos[j]] * s[j]
            s[i] = s[i] + W[e] * value
    # phase 3: each tile again with those inputs added
    X3 = X.copy()
    for i in range(P.nb):
        X3[P.boundary_pos[i]] += s[i]
    return _leaf_first(P, X3, W)


def three_phase_both(P, X, W):
    up = three_phase_up(P, X, W)
    # bracket inputs: the parent's input and its other children's shares, by prefix and
    # suffix sums over its children (positions p + 1, then each previous child + its size)
    share = W * up
    inner = np.zeros_like(X)
    for q in range(P.n):
        kids, c = [], q + 1
        while c < q + P.size[q]:
            kids.append(c)
            c += P.size[c]
        before = np.zeros_like(X[0])
        for c in kids:
            inner[c] = before
            before = before + share[c]
        after = np.zeros_like(X[0])
        for c in reversed(kids):
            inner[c] = X[q] + (inner[c] + after)
            after = after + share[c]
    return up + three_phase_down(P, W * inner, W)


THREE_PHASES = dict(down=three_phase_down, up=three_phase_up, both=three_phase_both)


def _inputs(n, seed, scale=1.2):
    g = _gen(seed)
    x = torch.randn(n, 2, dtype=torch.float64, generator=g)
    w = (torch.rand(n, 2, dtype=torch.float64, generator=g) * 2 - 1) * scale
    w[torch.rand(n, 2, generator=g) < 0.1] = 0.0  # exact zeros: nothing may divide
    return x, w


def _run_three_phases(tree, tile, direction, x, w):
    P = _Plan(tile_plan(tree, tile))
    vertex = np.asarray(P.vertex, dtype=np.int64)
    X, W = x.numpy()[vertex], w.numpy()[vertex]
    h = THREE_PHASES[direction](P, X, W)
    out = np.zeros_like(h)
    out[vertex] = h
    return torch.from_numpy(out)


@functools.lru_cache(maxsize=None)
def _dense(name, direction):
    tree = _tree(name)
    x, w = _inputs(tree.num_nodes, 10)
    return dense_tree_scan(x, w, tree.parent, direction)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", list(FORESTS))
def test_three_phases_from_the_plan_match_the_dense_oracle(name, direction, tile):
    tree = _tree(name)
    x, w = _inputs(tree.num_nodes, 10)
    got = _run_three_phases(tree, tile, direction, x, w)
    torch.testing.assert_close(got, _dense(name, direction), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tile", [1, 7, 256])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", list(LARGE))
def test_three_phases_on_large_forests_match_the_scan(name, direction, tile):
    tree = _tree(name)
    x, w = _inputs(tree.num_nodes, 11, scale=1.0)
    got = _run_three_phases(tree, tile, direction, x, w)
    torch.testing.assert_close(got, tree_scan(x, w, tree, direction), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------- pointer jumping
@pytest.mark.parametrize("name", list(FORESTS) + list(LARGE))
def test_sums_by_pointer_jumping_match_the_tree_scans(name, monkeypatch):
    # the sums the layouts are built from, as computed off the CPU, against the CPU's scans
    from treessm.ops import heavy

    tree = _tree(name)
    values = torch.randint(-3, 9, (tree.num_nodes,), generator=_gen(14))
    bfs = torch.empty_like(tree.order).scatter_(0, tree.order, torch.arange(tree.num_nodes))
    sizes, paths = heavy.subtree_sizes(tree, bfs), heavy.root_path_sums(values, tree)
    assert torch.equal(sizes, _subtree_sizes_by_definition(tree))
    unbounded = Tree(tree.parent, tree.order, tree.child_ptr, tree.tree_ptr, tree.depth)
    monkeypatch.setattr(heavy, "_by_cpu_scan", lambda tree: False)
    for t in (tree, unbounded):  # the largest tree's size known, or only N
        assert torch.equal(heavy.subtree_sizes(t, bfs), sizes)
        assert torch.equal(heavy.root_path_sums(values, t), paths)


def _subtree_sizes_by_definition(tree):
    size = [1] * tree.num_nodes
    for v in reversed(tree.order.tolist()):  # children before their parents
        p = int(tree.parent[v])
        if p >= 0:
            size[p] += size[v]
    return torch.tensor(size, dtype=torch.long)


def test_plan_compiles_into_one_graph():
    # torch.compile(fullgraph=True) traces the layout (pointer doubling in place of the
    # CPU's scans) and builds what the eager call builds
    tree = Tree.from_parent(random_forest(400, 5, _gen(15), locality=7))

    def build(t):
        t.plan_cache.clear()
        return tuple(tile_plan(t, 16))

    compiled = torch.compile(build, fullgraph=True)(tree)
    eager = build(tree)
    for got, want in zip(compiled, eager):
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and torch.equal(got, want)
        else:
            assert got == want


# ---------------------------------------------------------------------- host synchronisation
def test_plan_is_built_without_reading_the_device(monkeypatch):
    # every way a tensor's value reaches the host raises while the plan is built
    tree = Tree.from_parent(random_forest(300, 7, _gen(12), locality=5))

    def refuse(*args, **kwargs):
        raise AssertionError("the tile plan read a tensor's value on the host")

    get_item = torch.Tensor.__getitem__

    def no_mask(self, index):
        indices = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            refuse()
        return get_item(self, index)

    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch.Tensor, "__getitem__", no_mask)
    monkeypatch.setattr(torch, "nonzero", refuse)
    monkeypatch.setattr(torch, "masked_select", refuse)
    plan = tile_plan(tree, 16)
    monkeypatch.undo()
    assert plan.vertex.shape == (300,)
    with pytest.raises(AssertionError, match="host"), monkeypatch.context() as m:
        m.setattr(torch.Tensor, "tolist", refuse)  # the guard can fail
        torch.arange(3).tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["random_many_roots", "grid_trees", "long_chain"])
def test_cuda_plan_is_built_without_host_synchronisation(name):
    tree = _tree(name).to("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = tile_plan(tree, 64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = tile_plan(_tree(name), 64)
    for got, want in zip(plan, cpu):
        if isinstance(want, torch.Tensor):
            assert torch.equal(got.cpu(), want)
        else:
            assert got == want


# ---------------------------------------------------------------------- recorded builds
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _device_tree(seed, n=3000, roots=1):
    # sizes only as a tree built on the device has them: no level count
    t = Tree.from_parent(random_forest(n, roots, _gen(seed)))
    return Tree(*(a.cuda() for a in (t.parent, t.order, t.child_ptr, t.tree_ptr, t.depth)),
                max_tree_size=int(t.tree_ptr.diff().max()))


def _equal_plans(got, want):
    return all(torch.equal(a.cpu(), b.cpu()) if isinstance(b, torch.Tensor) else a == b
               for a, b in zip(got, want))


def test_nothing_is_recorded_on_the_cpu():
    tiles._RECORDINGS.clear()
    tile_plan(Tree.from_parent(random_forest(300, 3, _gen(30))), 16)
    assert len(tiles._RECORDINGS) == 0


@needs_cuda
def test_recorded_plans_equal_eager_builds_and_stay_unchanged():
    tiles._RECORDINGS.clear()
    handed = []
    for seed in range(3):  # trees of one set of sizes: one recording, replayed
        tree = _device_tree(40 + seed)
        plan = tile_plan(tree, 64)
        eager = tiles._build(tree, 64)
        cpu = tile_plan(Tree.from_parent(tree.parent.cpu()), 64)
        assert _equal_plans(plan, eager) and _equal_plans(plan, cpu)
        handed.append((plan, eager))
    assert len(tiles._RECORDINGS) == 1
    assert all(_equal_plans(plan, eager) for plan, eager in handed)  # copies, not the graph's
    other = _device_tree(50, roots=4)  # other sizes: recorded anew
    assert _equal_plans(tile_plan(other, 64), tiles._build(other, 64))
    assert len(tiles._RECORDINGS) == 2
    for seed in range(tiles.RECORDED_PLANS + 1):  # at most RECORDED_PLANS kept
        tile_plan(_device_tree(60 + seed, n=100 + seed), 64)
    assert len(tiles._RECORDINGS) == tiles.RECORDED_PLANS


@needs_cuda
def test_recorded_plans_under_capture_sync_debugging_and_inference_mode():
    tiles._RECORDINGS.clear()
    tree = _device_tree(70)
    with torch.cuda.graph(torch.cuda.CUDAGraph()):  # a caller's capture: built eagerly there
        tile_plan(tree, 64)
    assert len(tiles._RECORDINGS) == 0
    tree = _device_tree(71)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # no recording (it waits once), eager builds
    try:
        plan = tile_plan(tree, 64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(tiles._RECORDINGS) == 0
    with torch.inference_mode():  # recorded here, replayed outside
        tile_plan(_device_tree(72), 64)
    assert len(tiles._RECORDINGS) == 1
    tree = _device_tree(73)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a replay waits for nothing
    try:
        plan = tile_plan(tree, 64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert _equal_plans(plan, tiles._build(tree, 64))


# ---------------------------------------------------------------------- cache and arguments
def test_plan_is_cached_per_tile_size():
    tree = Tree.from_parent(random_forest(50, 3, _gen(13)))
    assert tile_plan(tree, 8) is tile_plan(tree, 8)
    assert tile_plan(tree, 16) is not tile_plan(tree, 8)
    assert tile_plan(tree, 16).tile == 16


def test_op_tensors_carry_the_tile_size():
    # the CUDA operators take the layout and its tile size in one list, so that no caller
    # can pass a tile size other than the one the layout was cut for; the scan plan of the
    # "tiles" schedule is that list
    from treessm.ops.plan import scan_plan
    from treessm.ops.tiles import TILE

    tree = Tree.from_parent(random_forest(50, 3, _gen(14)))
    plan = tile_plan(tree, 16)
    tensors = plan.op_tensors()
    assert len(tensors) == 21 and all(a is b for a, b in zip(tensors, plan[3:]))
    assert tensors[-1].device.type == "cpu" and tensors[-1].dtype == torch.int64
    assert tensors[-1].tolist() == [16]
    scan = scan_plan(tree, 64, torch.float32, "tiles")
    assert scan.tensors[-1].tolist() == [TILE]
    assert all(a is b for a, b in zip(scan.tensors, tile_plan(tree, TILE)[3:]))


def test_bad_arguments_raise():
    tree = Tree.from_parent([-1, 0])
    with pytest.raises(TypeError, match="tree"):
        tile_plan(tree.parent, 8)
    with pytest.raises(TypeError, match="tile"):
        tile_plan(tree, 8.0)
    with pytest.raises(TypeError, match="tile"):
        tile_plan(tree, True)
    with pytest.raises(ValueError, match="tile"):
        tile_plan(tree, 0)


# ---------------------------------------------------------------------- the measured shape
@pytest.fixture(scope="module")
def graph_tree():
    n, e = 10 ** 6, 5 * 10 ** 6
    g = _gen(0)
    edge_index = torch.randint(0, n, (2, e), generator=g)
    return GraphTopology()(torch.randn(n, 16, generator=g), edge_index)


@pytest.mark.slow
def test_shape_of_a_million_vertex_spanning_tree(graph_tree):
    tree = graph_tree
    t0 = time.perf_counter()
    plan = tile_plan(tree, 2048)
    build_s = time.perf_counter() - t0
    flags = plan.flags
    nb = int(plan.boundary_level_ptr[-1])
    crossing = int(((flags & ENTRY) > 0).sum()) / (tree.num_nodes - tree.num_trees)
    depth = int((plan.boundary_level_ptr.diff() > 0).sum())  # levels of the boundary tree
    levels = plan.tile_levels[plan.tile_levels > 0].float()
    tiles = int((plan.tile_ptr.diff() > 0).sum())
    print(f"\n10^6-vertex spanning tree, tile 2048: {tiles} tiles (bound {plan.num_tiles}), "
          f"{crossing:.2%} of edges cross tiles, {nb} boundary vertices, boundary tree "
          f"depth {depth}, light levels per tile mean {levels.mean():.1f} max "
          f"{int(levels.max())} (global {int(plan.light_depth.max()) + 1}); built in "
          f"{build_s:.2f} s")
    assert crossing < 0.04
    assert depth <= 12
    assert levels.max() <= 16
