"""Dense O(N^2) oracle of the tree scan and random forests for the tests.

The oracle evaluates the definition of docs/concepts.md literally: it forms the
transfer matrix ``S(u, v)`` (product of the edge weights on the path between ``u``
and ``v`` through their lowest common ancestor) from the parent array and sums
``S(u, v) x[u]`` over the vertices each direction admits. It shares no code with the
library's dynamic programs, works in whatever dtype it is given (the tests use
float64) and is differentiable, so autograd through it gives reference gradients.

The generators return parent arrays (``LongTensor [N]``, ``-1`` at roots).
"""
from __future__ import annotations

from typing import List, Optional

import torch

__all__ = ["ancestors", "lowest_common_ancestors", "transfer_matrix", "dense_tree_scan",
           "kruskal_mask", "kruskal_parents", "random_forest", "chain", "star", "single_vertex", "empty",
           "all_roots"]


def ancestors(parent) -> List[List[int]]:
    """For each vertex the list ``[v, p(v), p(p(v)), ..., root]``."""
    parent = [int(p) for p in parent]
    out = []
    for v in range(len(parent)):
        path = [v]
        while parent[path[-1]] >= 0:
            path.append(parent[path[-1]])
            if len(path) > len(parent):
                raise ValueError("parent array has a cycle")
        out.append(path)
    return out


def lowest_common_ancestors(parent) -> torch.Tensor:
    """``L [N, N]``: the lowest common ancestor of ``u`` and ``v``, or -1 across trees."""
    paths = ancestors(parent)
    n = len(paths)
    lca = torch.full((n, n), -1, dtype=torch.long)
    for u in range(n):
        up_u = set(paths[u])
        for v in range(n):
            for a in paths[v]:  # first ancestor of v (from v upwards) that is above u
                if a in up_u:
                    lca[u, v] = a
                    break
    return lca


def transfer_matrix(parent, weight: torch.Tensor) -> torch.Tensor:
    """``S [N, N, C]``: product of ``weight`` over the path between ``u`` and ``v``.

    ``weight[e]`` labels the edge ``(e, parent[e])``; ``S(v, v) = 1``; ``S = 0`` across trees.
    """
    paths = ancestors(parent)
    n = len(paths)
    c = weight[0].numel() if n else int(torch.tensor(weight.shape[1:]).prod())
    weight = weight.reshape(n, c)
    # rise[u, a] = product of the weights from u up to its ancestor a (1 at a = u)
    rise = [[None] * n for _ in range(n)]
    zero = weight.new_zeros(c)
    one = weight.new_ones(c)
    for u, path in enumerate(paths):
        prod = one
        rise[u][path[0]] = prod
        for k in range(1, len(path)):
            prod = prod * weight[path[k - 1]]
            rise[u][path[k]] = prod
    lca = lowest_common_ancestors(parent)
    rows = []
    for u in range(n):
        row = []
        for v in range(n):
            a = int(lca[u, v])
            row.append(zero if a < 0 else rise[u][a] * rise[v][a])
        rows.append(torch.stack(row) if row else weight.new_zeros(0, c))
    if n == 0:
        return weight.new_zeros(0, 0, c)
    return torch.stack(rows)


def dense_tree_scan(x: torch.Tensor, weight: torch.Tensor, parent, direction: str = "both"):
    """``h[v] = sum_u S(u, v) x[u]`` over the vertices ``direction`` admits.

    ``both``: all of v's tree; ``up``: v's subtree (v is an ancestor of u);
    ``down``: the path root..v (u is an ancestor of v). ``x`` and ``weight`` are
    ``[N, *]``; the result has the shape of ``x``.
    """
    shape = x.shape
    n = shape[0]
    x2 = x.reshape(n, int(torch.tensor(shape[1:]).prod()))
    s = transfer_matrix(parent, weight)
    lca = lowest_common_ancestors(parent)
    idx = torch.arange(n)
    if direction == "both":
        mask = lca >= 0
    elif direction == "up":
        mask = lca == idx[None, :]   # lca(u, v) = v
    elif direction == "down":
        mask = lca == idx[:, None]   # lca(u, v) = u
    else:
        raise ValueError(direction)
    s = s * mask.to(s.dtype)[:, :, None]
    h = torch.einsum("uvc,uc->vc", s, x2)
    return h.reshape(shape)


# ---------------------------------------------------------------------------- forests
def kruskal_mask(edge_index, weight, num_nodes: int) -> torch.Tensor:
    """Mask of the minimum spanning forest's edges by plain Kruskal: edges in ascending
    ``(weight, index)`` order (so ties go to the lower index and ``-0.0`` ties ``0.0``),
    each kept when it joins two components of a union-find without tricks."""
    ei = edge_index.tolist()
    w = weight.double().tolist()
    comp = list(range(num_nodes))

    def find(v):
        while comp[v] != v:
            v = comp[v]
        return v

    mask = [False] * len(w)
    for e in sorted(range(len(w)), key=lambda e: (w[e], e)):
        a, b = find(ei[0][e]), find(ei[1][e])
        if a != b:
            comp[a] = b
            mask[e] = True
    return torch.tensor(mask, dtype=torch.bool)


def kruskal_parents(num_nodes: int, pairs, cost, root: int) -> List[int]:
    """Parent list of the minimum spanning tree of ``pairs`` (``cost(s, t)`` per pair,
    Kruskal in sorted order, a plain union-find), walked from ``root``; vertices outside
    ``root``'s tree keep -1."""
    comp = list(range(num_nodes))

    def find(v):
        while comp[v] != v:
            v = comp[v]
        return v

    adj = {v: [] for v in range(num_nodes)}
    for s, t in sorted(pairs, key=lambda e: cost(*e)):
        rs, rt = find(s), find(t)
        if rs != rt:
            comp[rs] = rt
            adj[s].append(t)
            adj[t].append(s)
    parent, seen, stack = [-1] * num_nodes, {root}, [root]
    while stack:
        v = stack.pop()
        for u in adj[v]:
            if u not in seen:
                seen.add(u)
                parent[u] = v
                stack.append(u)
    return parent


def random_forest(n: int, num_roots: int = 1, generator: Optional[torch.Generator] = None,
                  locality: Optional[int] = None) -> torch.LongTensor:
    """A random forest with ``num_roots`` trees and shuffled vertex ids.

    Vertices are inserted in a random order; each one after the first ``num_roots``
    hangs from a random earlier one (among the last ``locality`` inserted, when given,
    which makes deep, thin trees).
    """
    if not 0 <= num_roots <= n or (n > 0 and num_roots == 0):
        raise ValueError(f"need 1 <= num_roots <= n, got n={n}, num_roots={num_roots}")
    perm = torch.randperm(n, generator=generator)
    parent = torch.full((n,), -1, dtype=torch.long)
    for i in range(num_roots, n):
        lo = 0 if locality is None else max(0, i - locality)
        j = int(torch.randint(lo, i, (1,), generator=generator))
        parent[perm[i]] = perm[j]
    return parent


def chain(n: int, generator: Optional[torch.Generator] = None) -> torch.LongTensor:
    """A path rooted at one end: ``0 <- 1 <- ... <- n-1``, or with shuffled ids when a
    ``generator`` is given (the chain then visits ``perm[0], perm[1], ...``)."""
    parent = torch.arange(-1, n - 1, dtype=torch.long)
    if generator is None:
        return parent
    perm = torch.randperm(n, generator=generator)
    out = torch.full((n,), -1, dtype=torch.long)
    out[perm[1:]] = perm[:-1]
    return out


def star(n: int, center: int = 0) -> torch.LongTensor:
    """One root ``center`` with ``n - 1`` leaf children."""
    parent = torch.full((n,), center, dtype=torch.long)
    parent[center] = -1
    return parent


def all_roots(n: int) -> torch.LongTensor:
    """``n`` isolated vertices."""
    return torch.full((n,), -1, dtype=torch.long)


def single_vertex() -> torch.LongTensor:
    return torch.tensor([-1], dtype=torch.long)


def empty() -> torch.LongTensor:
    return torch.zeros(0, dtype=torch.long)
