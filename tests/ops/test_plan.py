"""Scan plans (treessm.ops.plan): the heavy-path plan against a direct construction with
Python loops, the schedule choice and the launch defaults."""
import math

import pytest
import torch

import treessm
from oracle import all_roots, chain, empty, random_forest, single_vertex, star
from treessm.ops.plan import MAX_PHASES, level_plan, path_plan


def _plan(parent):
    tree = treessm.Tree.from_parent(parent)
    return tree, [t.long() for t in path_plan(tree)]


def _expected_paths(parent):
    """(head, path vertices, phase) of every heavy path, from the definition."""
    n = len(parent)
    children = [[] for _ in range(n)]
    tree = treessm.Tree.from_parent(torch.tensor(parent, dtype=torch.long))
    pos = {int(v): i for i, v in enumerate(tree.order.tolist())}
    for v in tree.order.tolist():  # children in breadth-first order
        if parent[v] >= 0:
            children[parent[v]].append(v)
    size = [1] * n
    for v in reversed(tree.order.tolist()):
        if parent[v] >= 0:
            size[parent[v]] += size[v]
    heavy = [max(c, key=lambda u: (size[u], -pos[u])) if c else -1 for c in children]
    paths = []

    def walk(h, phase):
        path = [h]
        while heavy[path[-1]] >= 0:
            path.append(heavy[path[-1]])
        paths.append((h, path, phase))
        for v in path:
            for c in children[v]:
                if c != heavy[v]:
                    walk(c, phase + 1)

    for r in range(n):
        if parent[r] < 0:
            walk(r, 0)
    return paths, size


FORESTS = {
    "empty": empty(),
    "single": single_vertex(),
    "chain": chain(50),
    "star": star(20, 3),
    "all_roots": all_roots(7),
    "random": random_forest(200, 1, torch.Generator().manual_seed(1)),
    "many_roots": random_forest(300, 9, torch.Generator().manual_seed(2)),
    "deep": random_forest(300, 2, torch.Generator().manual_seed(3), locality=2),
    "one_vertex_trees_between": torch.tensor([-1, -1, 1, -1, 3, 4, -1]),
}


@pytest.mark.parametrize("name", list(FORESTS))
def test_path_plan_matches_definition(name):
    parent = FORESTS[name]
    n = parent.numel()
    tree, (rec, light, slot, path_ptr, phase_path) = _plan(parent)
    assert rec.shape == (n + 1, 4) and light.shape == (n,) and path_ptr.shape == (n + 1,)
    assert slot.shape == (n,)
    assert phase_path.shape == (tree.num_trees, MAX_PHASES + 1)
    if n == 0:
        return
    vert, ppar, light_start, light_end = rec[:n, 0], rec[:n, 1], rec[:n, 2], rec[:n, 3]
    assert sorted(vert.tolist()) == list(range(n))
    assert rec[n].tolist() == [-1, -1, n, n] and path_ptr[n].item() == n
    kidx = {int(v): k for k, v in enumerate(vert.tolist())}
    p = parent.tolist()
    paths, size = _expected_paths(p)
    tp = tree.tree_ptr.tolist()
    tree_of = {}
    for t in range(tree.num_trees):
        for v in tree.order[tp[t]:tp[t + 1]].tolist():
            tree_of[v] = t
    got = {}
    for t in range(tree.num_trees):
        ts, te = tp[t], tp[t + 1]
        row = phase_path[t].tolist()
        assert row == sorted(row) and row[0] == ts
        npaths = row[-1] - ts
        assert int(math.log2(te - ts)) + 2 > max(ph for ph in range(MAX_PHASES)
                                                  if row[ph] < row[ph + 1])  # log2 bound
        assert path_ptr[ts + npaths:te].tolist() == [te] * (te - ts - npaths)
        assert light[ts + npaths - 1:te].tolist() == [-1] * (te - ts - npaths + 1)
        for ph in range(MAX_PHASES):
            for j in range(row[ph], row[ph + 1]):
                k0, k1 = path_ptr[j].item(), path_ptr[j + 1].item()
                assert ts <= k0 < k1 <= te
                got[int(vert[k0])] = (ph, [int(v) for v in vert[k0:k1]])
        # within a phase, paths by head position
        heads = [tree.order.tolist().index(int(vert[path_ptr[j]])) for j in range(row[0], row[-1])]
        for ph in range(MAX_PHASES):
            seg = heads[row[ph] - ts:row[ph + 1] - ts]
            assert seg == sorted(seg)
    assert len(got) == len(paths)
    for head, path, phase in paths:
        assert got[head] == (phase, path)
    order = tree.order.tolist()
    for k in range(n):
        v = int(vert[k])
        assert ppar[k].item() == (kidx[p[v]] if p[v] >= 0 else -1)
        lights = [kidx[c] for c in order if p[c] == v and c in got]  # breadth-first order
        s0 = light_start[k].item()
        assert light[s0:s0 + len(lights)].tolist() == lights
        assert light_end[k].item() == s0 + len(lights)
        if k + 1 < n and tree_of[int(vert[k + 1])] == tree_of[v]:
            assert light_start[k + 1].item() == s0 + len(lights)
        else:
            assert not lights  # the last index of a tree is a leaf
        for j, c in enumerate(lights):
            assert slot[c].item() == s0 + j
    heads_or_heavy = slot >= 0
    assert int(heads_or_heavy.sum()) == sum(1 for _, _, ph in paths if ph > 0)


def test_path_plan_is_cached_and_follows_the_tree():
    parent = random_forest(50, 2, torch.Generator().manual_seed(4))
    tree = treessm.Tree.from_parent(parent)
    a = path_plan(tree)
    assert path_plan(tree) is a
    assert all(t.dtype == torch.int32 for t in a)


def test_level_plan_by_hand():
    #   tree of 0:  0 -> {2, 5}, 2 -> {1, 4};  tree of 3: 3 -> {6};  7 alone
    tree = treessm.Tree.from_parent(torch.tensor([-1, 2, 0, -1, 2, 0, 3, -1]))
    lp = level_plan(tree)  # order [0, 2, 5, 1, 4, 3, 6, 7]
    assert lp.level_pos.tolist() == [0, 1, 3, 5, 6, 7, 8, 8, 8]  # padded with N
    assert lp.tree_level_ptr.tolist() == [0, 3, 5, 6]
    assert lp.parent_pos.tolist() == [-1, 0, 0, 1, 1, -1, 5, -1]
    assert lp.parent_at_pos.tolist() == [-1, 0, 0, 2, 2, -1, 3, -1]
    assert level_plan(tree) is lp
    assert tree.num_levels == lp.tree_level_ptr[-1].item() == 6
    moved = tree.to("meta")
    assert moved.plan_cache == {} and moved.num_levels == 6


def test_attach_level_plan_is_what_the_scan_reads():
    from treessm.ops.plan import attach_level_plan

    tree = treessm.Tree.from_parent(random_forest(30, 2, torch.Generator().manual_seed(1)))
    fresh = treessm.Tree(tree.parent, tree.order, tree.child_ptr, tree.tree_ptr, tree.depth)
    lp = level_plan(tree)
    attach_level_plan(fresh, lp.level_pos, lp.tree_level_ptr, lp.parent_pos)
    got = level_plan(fresh)
    assert all(torch.equal(a, b) for a, b in zip(got, lp))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_level_and_column_plans_wait_for_nothing():
    # a layer's tree is new in every step: its plans are built without the host waiting for
    # the device (the largest tree's size known, as the topologies give it), equal to the CPU's
    from treessm.ops.plan import column_plan

    parent = random_forest(300, 7, torch.Generator().manual_seed(9))
    cpu = treessm.Tree.from_parent(parent)
    tree = cpu.to("cuda")
    assert tree.max_tree_size is not None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        levels, columns = level_plan(tree), column_plan(tree)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for got, want in zip(levels + columns, level_plan(cpu) + column_plan(cpu)):
        assert torch.equal(got.cpu(), want)


def test_schedule_choice_reads_host_sizes_only():
    from treessm.ops.plan import (PHASES_MIN_TREE_SIZE, PHASES_MIN_TREES, SCHEDULES,
                                  choose_schedule)

    small = treessm.Tree.from_parent(random_forest(400, 1, torch.Generator().manual_seed(1)))
    assert choose_schedule(small) == "trees" == choose_schedule(small, "auto")
    # a large tree (its size known on the host, or bounded by the vertex count) takes the
    # phase schedule, also beside many small ones
    big = treessm.Tree(small.parent, small.order, small.child_ptr, small.tree_ptr, small.depth,
                       num_levels=small.num_levels, max_tree_size=PHASES_MIN_TREE_SIZE + 1)
    assert choose_schedule(big) == "phases"
    unknown = treessm.Tree(small.parent, small.order, small.child_ptr, small.tree_ptr,
                           small.depth)
    assert choose_schedule(unknown) == "trees"  # 400 vertices bound every tree
    # a forest of very many small trees (isolated pixels) takes it too
    isolated = treessm.Tree.from_parent(torch.full((PHASES_MIN_TREES + 1,), -1))
    assert choose_schedule(isolated) == "phases"
    few = treessm.Tree.from_parent(torch.full((PHASES_MIN_TREES,), -1))
    assert choose_schedule(few) == "columns"  # trees of one vertex, their size known
    for s in SCHEDULES:
        assert choose_schedule(small, s) == s == choose_schedule(big, s)
    with pytest.raises(ValueError, match="schedule must be None, 'auto' or one of"):
        choose_schedule(small, "sideways")
    with pytest.raises(ValueError, match="schedule must be None, 'auto' or one of"):
        treessm.tree_scan(torch.ones(400, 1), torch.ones(400, 1), small, schedule="levels")


def test_schedule_choice_takes_columns_for_small_trees_of_known_size():
    from treessm.ops.plan import COLUMNS_MAX_TREE_SIZE, PHASES_MIN_TREES, choose_schedule

    def forest(trees, largest):
        ids = torch.zeros(trees, dtype=torch.long)  # the choice reads sizes only
        return treessm.Tree(ids, ids, torch.zeros(trees + 1, dtype=torch.long),
                            torch.arange(trees + 1), ids, max_tree_size=largest)

    assert choose_schedule(forest(32, COLUMNS_MAX_TREE_SIZE)) == "columns"
    assert choose_schedule(forest(32, COLUMNS_MAX_TREE_SIZE), row_bytes=2560) == "columns"
    assert choose_schedule(forest(32, COLUMNS_MAX_TREE_SIZE + 1)) == "trees"
    assert choose_schedule(forest(32, None)) == "trees"  # size not known on the host
    assert choose_schedule(forest(PHASES_MIN_TREES + 1, 2)) == "phases"
    grids = treessm.GridTopology()(torch.randn(2, 7, 7, 3))  # GrootV's last stage
    assert grids.max_tree_size == 49 and choose_schedule(grids, None, 1280 * 4) == "columns"
    grids = treessm.GridTopology()(torch.randn(2, 10, 10, 3))
    assert grids.max_tree_size == 100 and choose_schedule(grids, None, 640 * 4) == "columns"
    grids = treessm.GridTopology()(torch.randn(2, 14, 14, 3))
    assert choose_schedule(grids, None, 640 * 4) == "trees"


def test_column_plan_is_the_breadth_first_layout():
    from treessm.ops.plan import column_plan

    parent = random_forest(50, 4, torch.Generator().manual_seed(3))
    tree = treessm.Tree.from_parent(parent)
    cp = column_plan(tree)
    assert column_plan(tree) is cp  # cached
    assert all(t.dtype == torch.int32 for t in (cp.order, cp.parent, cp.tree_ptr))
    assert torch.equal(cp.order.long(), tree.order)
    pos = cp.parent.long()
    roots = pos < 0
    assert torch.equal(parent[tree.order][~roots], tree.order[pos[~roots]])
    assert (pos[~roots] < torch.arange(50)[~roots]).all()  # parents first
    assert int(cp.largest_host) == int(torch.diff(tree.tree_ptr).max())
    assert cp.largest_host.device.type == "cpu" and cp.unused.numel() == 0
    unknown = treessm.Tree(tree.parent, tree.order, tree.child_ptr, tree.tree_ptr, tree.depth)
    assert int(column_plan(unknown).largest_host) == int(cp.largest_host)


def test_schedule_choice_takes_tiles_for_large_forests_not_known_to_be_chains():
    from treessm.ops.plan import TILES_MIN_NODES, TILES_MIN_ROW_BYTES, choose_schedule

    def forest(n, levels, largest):
        # the choice reads sizes only: placeholder arrays of n vertices suffice
        ids = torch.zeros(n, dtype=torch.long)
        return treessm.Tree(ids, ids, torch.zeros(n + 1, dtype=torch.long),
                            torch.tensor([0, n]), ids, num_levels=levels, max_tree_size=largest)

    n = TILES_MIN_NODES
    assert choose_schedule(forest(n, n // 4, n)) == "tiles"
    assert choose_schedule(forest(n, n // 4 + 1, n)) == "phases"      # chain-like
    assert choose_schedule(forest(n, None, n)) == "tiles"             # levels unknown
    assert choose_schedule(forest(n - 1, 10, n - 1)) == "phases"      # too small
    # built on the device (a layer's new forest in every forward, its tiled plan replayed):
    # any size with a tree above PHASES_MIN_TREE_SIZE, not forests of small trees only
    assert choose_schedule(forest(n - 1, None, n - 1)) == "tiles"
    assert choose_schedule(forest(4097, None, 4097)) == "tiles"
    assert choose_schedule(forest(4097, 10, 4097)) == "phases"
    assert choose_schedule(forest(4097, None, 4097), row_bytes=16) == "phases"
    assert choose_schedule(forest(20000, None, 4096)) == "trees"
    assert choose_schedule(forest(n, 10, 4096)) == "trees"            # small trees
    assert choose_schedule(forest(n, 10, n), "phases") == "phases"
    # rows narrower than the tiled kernels' 128-byte rows stay on "phases"
    assert choose_schedule(forest(n, 10, n), row_bytes=TILES_MIN_ROW_BYTES) == "tiles"
    assert choose_schedule(forest(n, 10, n), row_bytes=TILES_MIN_ROW_BYTES - 1) == "phases"
    assert choose_schedule(forest(n, 10, 4096), row_bytes=16) == "trees"


def test_schedule_choice_takes_trees_when_large_trees_fill_the_device():
    from treessm.ops.plan import (SCAN_ROW_BYTES, TREES_MAX_TREE_SIZE, TREES_MIN_BLOCKS,
                                  choose_schedule)

    def forest(num_trees, size):
        # num_trees trees of `size` vertices (placeholder arrays: the choice reads sizes)
        n = num_trees * size
        ids = torch.zeros(n, dtype=torch.long)
        ptr = torch.arange(num_trees + 1) * size
        return treessm.Tree(ids, ids, torch.zeros(n + 1, dtype=torch.long), ptr, ids,
                            num_levels=num_trees * 300, max_tree_size=size)

    grids = forest(32, 224 * 224)  # 32 images of 224x224: 8 slices of 64 float32 channels
    assert choose_schedule(grids, row_bytes=256) == "trees"
    assert choose_schedule(grids, row_bytes=128) == "tiles"   # 128 blocks
    assert choose_schedule(grids) == "tiles"                  # channels unknown
    slices = -(-TREES_MIN_BLOCKS // 32)
    assert choose_schedule(grids, row_bytes=slices * SCAN_ROW_BYTES) == "trees"
    assert choose_schedule(grids, row_bytes=(slices - 1) * SCAN_ROW_BYTES) == "tiles"
    big = forest(32, TREES_MAX_TREE_SIZE + 1)
    assert choose_schedule(big, row_bytes=1 << 12) == "tiles"   # trees too large to walk
    one = forest(1, 4096 * 4)
    assert choose_schedule(one, row_bytes=1 << 12) == "phases"  # 128 blocks


def test_launch_defaults_and_plan_cache():
    from treessm.ops import plan

    assert plan.launch_config("trees", 4) == plan.Launch(32, 128)
    assert plan.launch_config("phases", 4, 49) == plan.Launch(32, 128)
    # forests of small trees: one lane per 128 vertices of the largest, 16 to 128
    assert [plan.launch_config("trees", 4, n).lanes for n in (1, 784, 2048, 2049, 3136, 9000)] \
        == [16, 16, 16, 32, 32, 128]
    tree = treessm.Tree.from_parent(random_forest(300, 1, torch.Generator().manual_seed(4)))
    a = plan.scan_plan(tree, 16, torch.float32)
    assert plan.scan_plan(tree, 64, torch.float32) is a  # channels do not change the plan
    assert a.schedule == "trees" and len(a.tensors) == 5
    b = plan.scan_plan(tree, 16, torch.float32, "phases")
    assert b.tensors[4].device.type == "cpu" and int(b.tensors[4][-1]) == 300


def test_phase_counts():
    from treessm.ops.plan import phase_plan

    def phases(parent):
        bounds = phase_plan(treessm.Tree.from_parent(parent)).phase_ptr_host
        return int((bounds[1:] > bounds[:-1]).sum())

    assert phases(chain(20)) == 1
    assert phases(star(9, 0)) == 2
    # a complete binary tree of 2^k - 1 vertices has k phases
    assert phases(torch.tensor([-1] + [(v - 1) // 2 for v in range(1, 31)])) == 5
    assert phases(empty()) == 0


@pytest.mark.parametrize("schedule", ["paths", "phases", "tiles", "columns"])
def test_plans_build_the_same_inside_a_compiled_function(schedule):
    # a first call under torch.compile(fullgraph=True) builds the plan in the traced graph:
    # no step may need the traced sizes to agree by a guard (phases' light entries did,
    # under torch 2.11)
    from treessm.ops.plan import column_plan, phase_plan, tile_plan
    from treessm.ops.tiles import TILE

    build = {"paths": lambda t: list(path_plan(t)), "phases": lambda t: list(phase_plan(t)),
             "tiles": lambda t: tile_plan(t, TILE).op_tensors(),
             "columns": lambda t: list(column_plan(t))}[schedule]
    parent = random_forest(500, 2, torch.Generator().manual_seed(2))
    traced = treessm.Tree.from_parent(parent)

    def f(x):
        return [x + t.double() for t in build(traced)]

    got = torch.compile(f, fullgraph=True)(torch.zeros(()))
    want = build(treessm.Tree.from_parent(parent))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b.double())
