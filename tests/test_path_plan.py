"""The heavy-path plan (treessm/path_plan.py) against a direct construction with Python loops."""
import math

import pytest
import torch

import treessm
from oracle import all_roots, chain, empty, random_forest, single_vertex, star
from treessm.path_plan import MAX_PHASES, path_plan


def _plan(parent):
    tree = treessm.Tree.from_parent(parent)
    level_pos, tree_level_ptr, parent_pos, _ = tree.scan_plan()
    return tree, [t.long() for t in path_plan(tree.order, tree.child_ptr, tree.tree_ptr,
                                               tree.depth, parent_pos)]


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
    tree, (rec, light, path_ptr, phase_path) = _plan(parent)
    assert rec.shape == (n + 1, 4) and light.shape == (n,) and path_ptr.shape == (n + 1,)
    assert phase_path.shape == (tree.num_trees, MAX_PHASES + 1)
    if n == 0:
        return
    vert, ppar, first_light, light_start = rec[:n, 0], rec[:n, 1], rec[:n, 2], rec[:n, 3]
    assert sorted(vert.tolist()) == list(range(n))
    assert rec[n].tolist() == [-1, -1, -1, n] and path_ptr[n].item() == n
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
        if k + 1 < n and tree_of[int(vert[k + 1])] == tree_of[v]:
            assert light_start[k + 1].item() == s0 + len(lights)
        else:
            assert not lights  # the last index of a tree is a leaf
        assert first_light[k].item() == (lights[0] if lights else -1)


def test_path_plan_is_cached_and_follows_the_tree():
    parent = random_forest(50, 2, torch.Generator().manual_seed(4))
    tree = treessm.Tree.from_parent(parent)
    a = tree.path_plan()
    assert tree.path_plan() is a
    assert all(t.dtype == torch.int32 for t in a)
