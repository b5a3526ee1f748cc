r"""The tiled layout of a forest: what the tiled tree-scan kernels read besides the data.

A tiled scan takes a tree tile by tile, inside a tile in :math:`O(\log n)` dependent steps
(its light levels) whatever its shape, reading and writing every row a bounded number of
times. :func:`tile_plan` lays the forest out for it, once per tree and tile size (cached in
``tree.plan_cache``, shared by every channel count, layer, direction and the backward):

* **positions** -- each tree in *heavy-first* depth-first preorder: a vertex, then the
  whole subtree of its *heavy* child (the largest subtree, the first in breadth-first order
  on ties), then the subtrees of its light children in breadth-first order. Tree ``t``
  keeps its breadth-first range ``[tree_ptr[t], tree_ptr[t + 1])``. Every subtree is the
  position range ``[p, p + size[p])``, a vertex's heavy child is the next position, and
  every heavy path is a contiguous *run* of positions. The *light depth* of a vertex (the
  light edges above it) is at most :math:`\lfloor \log_2 n \rfloor` in a tree of ``n``
  vertices, since a light child holds at most half of its parent's subtree.
* **tiles** -- contiguous ranges of at most ``tile`` positions (``tile_ptr``), packed
  first-fit in position order from *items*: a tree of at most ``tile`` vertices is one
  item (never split), a larger tree is cut into items of ``tile`` positions from its
  start. Consecutive items share a tile while they fit, so the last, shorter item of a
  large tree may share its tile with the small trees after it.
* **scan order** -- inside a tile, positions sorted by light depth (stable): each light
  level of the tile is a contiguous range of slots (``level_ptr``, levels counted from the
  tile's lowest light depth), each run of a level stays contiguous and in path order, and
  a run whose head's parent lies in the tile has that parent one level lower.
* **entries** -- positions whose parent lies in an earlier tile (a cut run's first
  position in a tile is one). Inside a tile every position hangs below one *top*: the
  entry or root heading its in-tile root path (``top``).
* **boundary vertices** -- positions with a child in a later tile. Those of tile ``k`` are
  all ancestors of tile ``k + 1``'s first vertex, so they lie on one in-tile root path and
  share its top. The boundary vertex *feeding* them is that top's parent (``-1`` when the
  top is a root): the feeding relation is a forest, the *boundary tree*, whose depth
  counts the tiles a root path crosses. Boundary vertices are numbered by that depth, then
  by position, so every one comes after the one feeding it, each depth is a contiguous
  range (``boundary_level_ptr``), and each tile's boundary vertices are a contiguous range,
  shallowest first (``tile_boundary``).
* **boundary paths** -- the in-tile root path of a tile's deepest boundary vertex, from the
  top down to it (``path``, ``path_ptr``): it holds all the tile's boundary vertices, and
  only its vertices see anything of the later tiles in ``up`` or leave anything to them in
  ``down``.

A scan then runs in three phases (``docs/cuda.md``): each tile (``up``) or each boundary
path (``down``) scanned with the values entering it kept symbolic, giving a summary per
boundary vertex; the boundary tree solved; each tile (``down``) or each boundary path
(``up``) scanned again with the true values, writing ``h``.

The plan is built with tensor operations and three integer tree sums
(:mod:`treessm.ops.heavy`: compiled tree scans on the CPU, pointer jumping elsewhere) on
the tree's device; it reads nothing back to the host (the tile count is an upper bound
known from host-side sizes, see :func:`max_tiles`). So on CUDA, for forests of at most
:data:`~treessm.ops.recorded.RECORDED_PLAN_MAX_NODES` vertices, the build is recorded in a
CUDA graph once per set of host-side sizes (vertices, trees, the largest tree, the level
count where known, the tile) and replayed for every later tree of those sizes
(:mod:`treessm.ops.recorded`): a graph layer's spanning forest is a new tree in every
forward, of the same sizes.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from ..tree import Tree
from .heavy import heavy_children, root_path_sums
from .recorded import RECORDED_PLAN_MAX_NODES, RECORDED_PLANS, Recordings
from .spare import SPARE_SLOTS, kept_or_spare

__all__ = ["TilePlan", "tile_plan", "max_tiles", "max_light_levels", "heavy_first_preorder",
           "TILE", "ROOT", "HEAD", "ENTRY", "BOUNDARY"]

#: Default positions of a tile: on the spanning tree of a random graph of 10^6 vertices
#: and 5·10^6 edges, 2.4% of its edges cross tiles and its boundary tree is 6 deep
#: (docs/cuda.md).
TILE = 2048

#: Flags of a position (``TilePlan.flags``): a root; the head of a run (a root or a light
#: child: its parent is not the previous position); an entry (its parent lies in an earlier
#: tile); a boundary vertex (a child lies in a later tile).
ROOT, HEAD, ENTRY, BOUNDARY = 1, 2, 4, 8
_RECORDINGS = Recordings(RECORDED_PLANS)


class TilePlan(NamedTuple):
    r"""The tiled layout of a forest (tensors on its device, int32); ``docs/cuda.md``.

    ``N`` vertices, ``T`` trees, ``M`` tiles (:attr:`num_tiles`, an upper bound: the tiles
    after the last nonempty one are empty, ``tile_ptr`` ends in ``N`` repeated), ``L``
    light levels at most per tile (:attr:`num_levels`). A *slot* indexes the scan order.

    Attributes:
        tile (int): the most positions a tile holds.
        num_tiles (int): ``M``, known on the host without asking the device.
        num_levels (int): ``L``; a tile's light levels are ``0 .. tile_levels[k] - 1``.
        vertex (IntTensor [N]): the vertex at each position.
        parent (IntTensor [N]): the position of each position's parent, ``-1`` at roots.
        size (IntTensor [N]): subtree size; the subtree of ``p`` is ``[p, p + size[p])``
            and its children are ``p + 1`` (the heavy one), then each previous child's
            position plus its size, up to ``p + size[p]``.
        light_depth (IntTensor [N]): light edges above each position.
        flags (IntTensor [N]): :data:`ROOT`, :data:`HEAD`, :data:`ENTRY`,
            :data:`BOUNDARY` or'ed.
        top (IntTensor [N]): the entry or root at the top of each position's in-tile root
            path (the last entry or root at or before it).
        tree_ptr (IntTensor [T + 1]): tree ``t`` spans positions
            ``[tree_ptr[t], tree_ptr[t + 1])``, its breadth-first range.
        tile_ptr (IntTensor [M + 1]): tile ``k`` spans positions (and slots)
            ``[tile_ptr[k], tile_ptr[k + 1])``.
        scan (IntTensor [N]): the position at each slot: a tile's positions by light depth,
            in position order within a level.
        level_ptr (IntTensor [M, L + 1]): light level ``j`` of tile ``k`` (light depth
            ``j`` above the tile's lowest) spans slots
            ``[level_ptr[k, j], level_ptr[k, j + 1])``; ``level_ptr[k, L]`` is the tile's
            end.
        tile_levels (IntTensor [M]): light levels of each tile, lowest to highest light
            depth present (``0`` for an empty tile).
        boundary (IntTensor [N]): the number of each boundary vertex, ``-1`` elsewhere.
        boundary_pos (IntTensor [N]): the position of boundary vertex ``i`` (``-1`` past
            the last).
        feeder (IntTensor [N]): the boundary vertex feeding boundary vertex ``i`` (its
            top's parent), ``-1`` when its top is a root or past the last; always below
            ``i``.
        boundary_level_ptr (IntTensor [M + 1]): boundary vertices of depth ``d`` (feeders
            above them) are ``[boundary_level_ptr[d], boundary_level_ptr[d + 1])``; the
            last entry is the number of boundary vertices.
        tile_boundary (IntTensor [M, 2]): tile ``k``'s boundary vertices are
            ``[tile_boundary[k, 0], tile_boundary[k, 1])``, shallowest first, all with one
            top and one feeder (``[0, 0]`` when it has none).
        entries (IntTensor [N]): entry positions grouped by the boundary vertex they hang
            from (their parent), in position order within a group (``-1`` past the last).
        entry_ptr (IntTensor [N + 1]): the entries hanging from boundary vertex ``i`` are
            ``entries[entry_ptr[i]:entry_ptr[i + 1]]``.
        path (IntTensor [N]): the boundary path of each tile, tile by tile: the positions
            from the top of its boundary vertices down to the deepest of them, each the
            parent of the next (``-1`` past the last).
        path_ptr (IntTensor [M + 1]): tile ``k``'s boundary path is
            ``path[path_ptr[k]:path_ptr[k + 1]]`` (empty when it has no boundary vertex).
    """

    tile: int
    num_tiles: int
    num_levels: int
    vertex: Tensor
    parent: Tensor
    size: Tensor
    light_depth: Tensor
    flags: Tensor
    top: Tensor
    tree_ptr: Tensor
    tile_ptr: Tensor
    scan: Tensor
    level_ptr: Tensor
    tile_levels: Tensor
    boundary: Tensor
    boundary_pos: Tensor
    feeder: Tensor
    boundary_level_ptr: Tensor
    tile_boundary: Tensor
    entries: Tensor
    entry_ptr: Tensor
    path: Tensor
    path_ptr: Tensor

    def op_tensors(self) -> List[Tensor]:
        """The ``plan`` the tiled CUDA operators take (``torch.ops.treessm.cuda_tile_scan``
        and its kin): the tensors from :attr:`vertex` to :attr:`path_ptr`, then
        :attr:`tile` as a CPU int64 tensor of one entry, which the operators read on the
        host to size their shared memory. The tile size travels with the layout it was
        cut for, so no caller can pass another."""
        return [*self[3:], torch.tensor([self.tile], dtype=torch.int64)]


def max_tiles(num_nodes: int, num_trees: int, tile: int,
              max_tree_size: Optional[int] = None) -> int:
    r"""An upper bound on the tiles of a forest, from host-side sizes.

    First-fit packing leaves any two consecutive tiles more than ``tile`` positions
    together, so there are at most :math:`2 \lfloor N / (\mathrm{tile} + 1) \rfloor + 1`;
    and at most one per item, :math:`T + \lfloor (N - T) / \mathrm{tile} \rfloor` (exactly
    :math:`\lceil N / \mathrm{tile} \rceil` for one tree; :math:`T` when every tree fits a
    tile).

    Args:
        num_nodes (int): vertices of the forest.
        num_trees (int): trees of the forest.
        tile (int): the most positions of a tile.
        max_tree_size (int, optional): vertices of the largest tree, when known.
            (default: ``None``)

    Example:
        >>> max_tiles(10, 1, 4), max_tiles(100, 30, 8, max_tree_size=5)
        (3, 23)
    """
    if num_nodes == 0:
        return 0
    if max_tree_size is not None and max_tree_size <= tile:
        items = num_trees
    else:
        items = num_trees + (num_nodes - num_trees) // tile
    return min(items, 2 * (num_nodes // (tile + 1)) + 1)


def max_light_levels(num_nodes: int, max_tree_size: Optional[int] = None) -> int:
    r"""An upper bound on the light levels of a forest: :math:`\lfloor \log_2 n \rfloor + 1`
    for its largest tree of ``n`` vertices (``0`` for an empty forest).

    Args:
        num_nodes (int): vertices of the forest.
        max_tree_size (int, optional): vertices of the largest tree, when known; else
            ``num_nodes`` bounds it. (default: ``None``)
    """
    largest = num_nodes if max_tree_size is None else max_tree_size
    return int(largest).bit_length()


def _check(tree, tile) -> None:
    if not isinstance(tree, Tree):
        raise TypeError(f"tree must be a treessm.Tree, got {type(tree).__name__}")
    if isinstance(tile, bool) or not isinstance(tile, int):
        raise TypeError(f"tile must be an int, got {type(tile).__name__}")
    if not 1 <= tile < 2 ** 31:
        raise ValueError(f"tile must be a positive number of positions below 2^31, got {tile}")
    if tree.num_nodes >= 2 ** 31:
        raise ValueError(f"the tiled layout holds int32 positions; the tree has "
                         f"{tree.num_nodes} vertices")


def tile_plan(tree: Tree, tile: int = TILE) -> TilePlan:
    r"""The tiled layout of ``tree`` (:class:`TilePlan`), built once per tile size and
    cached in ``tree.plan_cache``.

    Built on the tree's device by tensor operations and three integer tree sums (subtree
    sizes; positions and light depths; tiles crossed; :mod:`treessm.ops.heavy`), with no
    read back to the host; :func:`torch.compile` traces it (the sums by pointer jumping),
    so a compiled model may build the layout of a tree it builds itself.

    Args:
        tree (Tree): the forest.
        tile (int): the most positions of a tile. (default: :data:`TILE`)

    Returns:
        TilePlan: the layout, int32 tensors on ``tree.device``.

    Shapes:
        - **input:** a forest over :math:`N` vertices
        - **output:** per-position tensors :math:`(N)`; ``tile_ptr`` :math:`(M + 1)` with
          ``M = max_tiles(...)``

    Raises:
        TypeError: if ``tree`` is not a :class:`~treessm.Tree` or ``tile`` not an int.
        ValueError: if ``tile`` is not positive or the forest has :math:`2^{31}` vertices
            or more.

    Example:
        >>> tree = Tree.from_parent([-1, 0, 0, 1, 1, 3])    # 0 - {1 - {3 - 5, 4}, 2}
        >>> plan = tile_plan(tree, tile=4)
        >>> plan.vertex.tolist(), plan.tile_ptr.tolist()
        ([0, 1, 3, 5, 4, 2], [0, 4, 6])
        >>> plan.boundary_pos[:2].tolist(), plan.entries[:2].tolist()  # 0 and 1 feed 2 and 4
        ([0, 1], [5, 4])
    """
    _check(tree, tile)
    key = ("tiles", tile)
    cached = tree.plan_cache.get(key)
    if cached is not None:
        return cached
    plan = _replayed(tree, tile)
    if plan is None:
        plan = _build(tree, tile)
    tree.plan_cache[key] = plan
    return plan


def _replayed(tree: Tree, tile: int) -> Optional[TilePlan]:
    """The plan of ``tree`` from a recorded build of its sizes (copies of the recorded
    outputs), or ``None`` where none is kept: not on CUDA, too large, the caller compiling
    or capturing, or a recording that failed (the eager build runs then)."""
    n = tree.num_nodes
    if not 0 < n <= RECORDED_PLAN_MAX_NODES:
        return None
    key = (tree.device, n, tree.num_trees, tree.max_tree_size, tree.num_levels, tile)
    return _RECORDINGS.replay_layout(key, lambda t: _build(t, tile), tree)


def heavy_first_preorder(tree: Tree):
    """Per vertex: the heavy-first position, the light depth, the subtree size, whether it
    is a light child (int64 / bool, by vertex). Positions number each tree's vertices in
    depth-first preorder (a vertex, then its largest child's subtree, then the others'),
    within the tree's breadth-first range: a subtree is a contiguous run of positions."""
    n = tree.num_nodes
    size, bfs, heavy, biggest, heavy_bfs, earlier = heavy_children(tree)
    nonroot = tree.parent >= 0
    par = torch.where(nonroot, tree.parent, n)  # roots point at a spare slot n
    light = nonroot & ~heavy
    # offset below the parent: the heavy child first, then the light ones in breadth-first
    # order (an earlier heavy sibling is already counted in `earlier`)
    offset = torch.where(light, earlier + torch.where(heavy_bfs[par] > bfs, biggest[par], 0), 0)
    # position: the parent's + 1 + offset, a root at its tree's start (= its bfs position);
    # one sum of both, the light depth (below 64) above the position (below 2^32)
    step = torch.where(nonroot, 1 + offset, bfs.to(torch.float64)).long()
    packed = root_path_sums(step + (light.long() << 32), tree)
    return packed & 0xFFFFFFFF, packed >> 32, size.long(), light


def _last_marked(mark: Tensor) -> Tensor:
    """Per position, the last position at or before it where ``mark`` (bool ``[n]``) is
    set, ``-1`` before the first (a running maximum from one prefix sum and one scatter)."""
    n = mark.shape[0]
    count = torch.cumsum(mark, 0)
    marked = torch.full((n + SPARE_SLOTS,), -1, dtype=torch.long, device=mark.device)
    marked.scatter_(0, kept_or_spare(count - 1, mark, n), torch.arange(n, device=mark.device))
    return torch.where(count > 0, marked[(count - 1).clamp(min=0)], -1)


def _next_marked(mark: Tensor) -> Tensor:
    """Per position, the first position at or after it where ``mark`` is set, ``n`` after
    the last."""
    n = mark.shape[0]
    before = torch.cumsum(mark, 0) - mark.long()
    marked = torch.full((n + SPARE_SLOTS,), n, dtype=torch.long, device=mark.device)
    marked.scatter_(0, kept_or_spare(before, mark, n), torch.arange(n, device=mark.device))
    return marked[before]


def _tile_ptr(start: Tensor, tile: int, num_tiles: int) -> Tensor:
    """First-fit tiles over items starting where ``start`` (bool ``[N]``) is set: tile
    ``k`` starts at ``next^k(0)`` with ``next(p)`` the last item start at or before
    ``p + tile``; ``next^k(0)`` for all ``k <= num_tiles`` at once by repeated squaring."""
    n, dev = start.shape[0], start.device
    idx = torch.arange(n + 1, device=dev)
    last_start = _last_marked(torch.cat([start, start.new_ones(1)]))  # 0 is a start
    jump = last_start[(idx + tile).clamp(max=n)]
    k = torch.arange(num_tiles + 1, device=dev)
    ptr = torch.zeros_like(k)
    bits = num_tiles.bit_length()
    for b in range(bits):
        ptr = torch.where((k >> b) & 1 == 1, jump[ptr], ptr)
        if b + 1 < bits:
            jump = jump[jump]
    return ptr


def _build(tree: Tree, tile: int) -> TilePlan:
    n, dev = tree.num_nodes, tree.device
    long = dict(dtype=torch.long, device=dev)
    M = max_tiles(n, tree.num_trees, tile, tree.max_tree_size)
    L = max_light_levels(n, tree.max_tree_size)
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    ar = torch.arange(n, **long)
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int32, device=dev)
        return TilePlan(tile, 0, L, empty, empty, empty, empty, empty, empty,
                        i32(tree.tree_ptr), torch.zeros(1, dtype=torch.int32, device=dev),
                        empty, torch.zeros(0, L + 1, dtype=torch.int32, device=dev), empty,
                        empty, empty, empty, torch.zeros(1, dtype=torch.int32, device=dev),
                        torch.zeros(0, 2, dtype=torch.int32, device=dev), empty,
                        torch.zeros(1, dtype=torch.int32, device=dev), empty,
                        torch.zeros(1, dtype=torch.int32, device=dev))

    # ---- positions: heavy-first preorder, tree by tree in breadth-first ranges
    pos_v, ld_v, size_v, light_v = heavy_first_preorder(tree)
    vertex = torch.empty(n, **long).scatter_(0, pos_v, ar)
    pv = tree.parent[vertex]
    root = pv < 0
    parent = torch.where(root, -1, pos_v[pv.clamp(min=0)])
    size = size_v[vertex]
    light_depth = ld_v[vertex]
    head = root | light_v[vertex]

    # ---- tiles: first fit over items (small trees; runs of `tile` positions of large ones)
    tree_of = torch.repeat_interleave(torch.arange(tree.num_trees, **long),
                                      tree.tree_ptr.diff(), output_size=n)
    item_start = (ar - tree.tree_ptr[tree_of]) % tile == 0
    tile_ptr = _tile_ptr(item_start, tile, M)
    tile_of = torch.searchsorted(tile_ptr, ar, right=True) - 1
    pp = parent.clamp(min=0)
    entry = ~root & (tile_of[pp] < tile_of)
    top = _last_marked(root | entry)  # a tile starts at one

    # ---- scan order: by light depth inside each tile (a tile's first slot holds its
    # lowest light depth, its last slot its highest); levels from the tile's lowest
    tiles = torch.arange(M, **long)
    start, end = tile_ptr[:-1], tile_ptr[1:]
    nonempty = end > start
    skey, scan = torch.sort(tile_of * (L + 1) + light_depth, stable=True)
    lowest = torch.where(nonempty, skey[start.clamp(max=n - 1)] - tiles * (L + 1), 0)
    highest = torch.where(nonempty, skey[(end - 1).clamp(min=0)] - tiles * (L + 1), -1)
    tile_levels = highest - lowest + 1
    level_key = (tiles * (L + 1) + lowest)[:, None] + torch.arange(L + 1, **long)
    level_ptr = torch.minimum(torch.searchsorted(skey, level_key), end[:, None])

    # ---- boundary vertices and the boundary tree
    boundary_mark = torch.zeros(n + SPARE_SLOTS, dtype=torch.bool, device=dev).index_fill_(
        0, kept_or_spare(parent, entry, n), True)[:n]
    entry_v = torch.zeros(n, dtype=torch.float64, device=dev).scatter_(0, vertex, entry.double())
    crossed = root_path_sums(entry_v, tree)[vertex]  # entries on the root path
    big = (M + 1) * n  # above every key below
    bkey = torch.where(boundary_mark, crossed * n + ar, big)
    bsorted = torch.sort(bkey)
    valid = bsorted.values < big
    boundary_pos = torch.where(valid, bsorted.indices, -1)
    number = torch.full((n + SPARE_SLOTS,), -1, **long).scatter_(
        0, kept_or_spare(bsorted.indices, valid, n), ar)[:n]
    boundary = torch.where(boundary_mark, number, -1)
    btop = top[boundary_pos.clamp(min=0)]
    bparent = parent[btop]
    feeder = torch.where(valid & (bparent >= 0), boundary[bparent.clamp(min=0)], -1)
    boundary_level_ptr = torch.searchsorted(bsorted.values,
                                            torch.arange(M + 1, **long) * n)
    # a tile's boundary vertices share one top (one depth), so their numbers follow their
    # positions: the first and the last of the tile bound them
    last = _last_marked(boundary_mark)[(end - 1).clamp(min=0)]
    first = _next_marked(boundary_mark)[start.clamp(max=n - 1)]
    has = nonempty & (last >= start)
    tile_boundary = torch.stack([torch.where(has, boundary[first.clamp(max=n - 1)], 0),
                                 torch.where(has, boundary[last.clamp(min=0)] + 1, 0)], 1)

    # ---- entries grouped by the boundary vertex they hang from
    ekey = torch.where(entry, boundary[pp], n)
    esorted = torch.sort(ekey, stable=True)
    entries = torch.where(esorted.values < n, esorted.indices, -1)
    entry_ptr = torch.searchsorted(esorted.values, torch.arange(n + 1, **long))

    # ---- boundary paths: the in-tile ancestors of each tile's deepest boundary vertex
    deepest = torch.where(has, last, -1)[tile_of]
    dc = deepest.clamp(min=0)
    on_path = (deepest >= 0) & (ar >= top[dc]) & (ar <= deepest) & (ar + size > deepest)
    on_before = torch.cumsum(on_path, 0) - on_path.long()  # path positions before each
    path = torch.full((n + SPARE_SLOTS,), -1, **long).scatter_(
        0, kept_or_spare(on_before, on_path, n), ar)[:n]
    path_ptr = torch.cat([on_before, on_before[-1:] + on_path[-1:].long()])[tile_ptr]

    flags = (torch.where(root, ROOT, 0) + torch.where(head, HEAD, 0)
             + torch.where(entry, ENTRY, 0) + torch.where(boundary_mark, BOUNDARY, 0))
    return TilePlan(tile, M, L, i32(vertex), i32(parent), i32(size), i32(light_depth),
                    i32(flags), i32(top), i32(tree.tree_ptr), i32(tile_ptr), i32(scan),
                    i32(level_ptr), i32(tile_levels), i32(boundary), i32(boundary_pos),
                    i32(feeder), i32(boundary_level_ptr), i32(tile_boundary), i32(entries),
                    i32(entry_ptr), i32(path), i32(path_ptr))
