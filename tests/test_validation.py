"""The validation table of docs/validation.md, and the tests that keep it true.

For each public callable, ``ACCEPTS`` says in words what each argument accepts, and
``CASES`` lists inputs with what they give: a result, or an exception with (the start of)
its message. The tests run every case; ``test_the_document_is_current`` checks that
docs/validation.md is exactly what this module renders, so the document cannot drift from
the code. After changing a case, regenerate it with ``python tests/test_validation.py``.
"""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import pytest
import torch

import treessm
from treessm import (GraphTopology, GridTopology, SequenceTopology, Tree, minimum_spanning_tree,
                     prepare_graph, selective_tree_scan, tree_scan)
from treessm.datasets import load_dataset
from treessm.models import GrootV, load_grootvl_checkpoint, treessm_to_grootvl
from treessm.nn import GrootLMixer, TreeSSM, TreeSSMConv
from treessm.topology import (CausalSequenceTopology, GrootLTopology, chain_tree, root_forest,
                              tree_from_edges, tree_partition)

DOC = Path(__file__).resolve().parents[1] / "docs" / "validation.md"
NAN, INF = float("nan"), float("inf")


class Case(NamedTuple):
    """``call()`` gives ``result`` (a short description, checked by ``check`` when given), or
    raises ``error`` with a message matching ``message`` (its start, or a part of it)."""
    input: str
    call: Callable
    error: Optional[type] = None
    message: str = ""
    check: Optional[Callable] = None


def ok(input, call, result, check=None):
    return Case(input, call, None, result, check)


def bad(input, call, error, message):
    return Case(input, call, error, message)


def _tree(n=4):
    return Tree.from_parent(torch.tensor([-1, 0, 0, 1][:n]))


def _x(*shape, dtype=torch.float32):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


_LINE = torch.tensor([[0, 1, 2], [1, 2, 3]])
_I64 = torch.long


# ---------------------------------------------------------------------------- the table
ACCEPTS = {}
CASES = {}

name = "treessm.Tree.from_parent(parent, batch=None, validate=True)"
ACCEPTS[name] = {
    "parent": "1-D integer tensor, sequence or array of `N` ids in `[0, N)` or `-1` (root), on "
              "any device (the layout is built on the host); every vertex must reach a root. "
              "`N = 0` gives the empty forest.",
    "batch": "`None`, or one integer example id per vertex; with `validate`, a parent must "
             "lie in its child's example.",
    "validate": "`bool`: check the examples of parents. Ids outside `[-1, N)` and cycles are "
                "rejected either way.",
}
CASES[name] = [
    ok("`[-1, 0, 0, 1]`", lambda: Tree.from_parent([-1, 0, 0, 1]), "a tree of 4 vertices",
       lambda t: t.num_trees == 1),
    ok("`[]`", lambda: Tree.from_parent([]), "the empty forest", lambda t: t.num_nodes == 0),
    ok("int32 parent", lambda: Tree.from_parent(torch.tensor([-1, 0], dtype=torch.int32)),
       "a tree (ids widened to int64)", lambda t: t.parent.dtype == _I64),
    bad("`[-1, 7, 0]`, `validate=False`",
        lambda: Tree.from_parent(torch.tensor([-1, 7, 0]), validate=False), ValueError,
        "parent must hold vertex ids in [0, 3) or -1 for a root; parent[1] = 7"),
    bad("`[-1, -2]`", lambda: Tree.from_parent([-1, -2]), ValueError,
        "parent must hold vertex ids in [0, 2) or -1"),
    bad("`[1, 0]` (a cycle)", lambda: Tree.from_parent([1, 0]), ValueError,
        "parent does not describe a forest"),
    bad("float parent", lambda: Tree.from_parent(torch.tensor([-1.0, 0.0])), TypeError,
        "parent must be an integer tensor"),
    bad("2-D parent", lambda: Tree.from_parent(torch.tensor([[-1, 0]])), ValueError,
        "parent must be 1-D"),
    bad("parent in another example", lambda: Tree.from_parent([-1, 0], [0, 1]), ValueError,
        "a tree may not span examples"),
    bad("batch of another length", lambda: Tree.from_parent([-1, 0], [0]), ValueError,
        "batch must have one entry per vertex (2), got 1"),
]

name = "treessm.tree_scan(x, weight, tree, direction='both', backend=None, schedule=None)"
ACCEPTS[name] = {
    "x": "float32, float64, float16 or bfloat16 tensor `[N, *]` (`N = tree.num_nodes`; "
         "trailing dimensions are channels, possibly none), on the tree's device; "
         "half types accumulate in float32. Differentiable.",
    "weight": "same shape, dtype and device as `x`; any real values: decays in `(0, 1)`, zeros "
              "(which cut a path), values above one and negative values (the scan is linear). "
              "The rows of roots are never read (any value, NaN included; gradient zero). "
              "Non-finite values elsewhere are not checked (that would wait for the device) "
              "and propagate to the outputs they reach. Differentiable.",
    "tree": "a `treessm.Tree` on the device of `x`.",
    "direction": "`'both'`, `'up'` or `'down'`.",
    "backend": "`None`/`'auto'` (numba on the CPU, the CUDA extension on CUDA), `'torch'` (any "
               "device), `'numba'` (CPU tensors), `'cuda'` (CUDA tensors).",
    "schedule": "`None`, `'auto'` or one of `treessm.ops.plan.SCHEDULES` (CUDA only; every "
                "schedule computes the same sums).",
}
CASES[name] = [
    ok("`x, weight [4, 3]` float32", lambda: tree_scan(_x(4, 3), _x(4, 3), _tree()),
       "`[4, 3]` float32"),
    ok("`x, weight [4, 2, 5]` float16",
       lambda: tree_scan(_x(4, 2, 5, dtype=torch.float16), _x(4, 2, 5, dtype=torch.float16),
                         _tree()), "`[4, 2, 5]` float16",
       lambda y: y.shape == (4, 2, 5) and y.dtype == torch.float16),
    ok("weights `-2` and `3`", lambda: tree_scan(_x(4, 1), torch.tensor([[-2.0], [3.0], [1.0],
                                                                         [0.0]]), _tree()),
       "the linear scan with those weights"),
    ok("NaN in a root's weight row",
       lambda: tree_scan(_x(4, 1), torch.tensor([[NAN], [0.5], [0.5], [0.5]]), _tree()),
       "finite outputs", lambda y: bool(torch.isfinite(y).all())),
    ok("`x [0, 3]`, the empty tree",
       lambda: tree_scan(_x(0, 3), _x(0, 3), Tree.from_parent([])), "`[0, 3]`"),
    ok("`x [4, 0]` (no channels)", lambda: tree_scan(_x(4, 0), _x(4, 0), _tree()), "`[4, 0]`"),
    bad("integer `x`", lambda: tree_scan(torch.ones(4, 3, dtype=_I64), _x(4, 3), _tree()),
        TypeError, "x must be a floating-point tensor"),
    bad("`weight` float64, `x` float32",
        lambda: tree_scan(_x(4, 3), _x(4, 3, dtype=torch.float64), _tree()), TypeError,
        "weight must have the dtype of x"),
    bad("`weight [4, 2]`, `x [4, 3]`", lambda: tree_scan(_x(4, 3), _x(4, 2), _tree()),
        ValueError, "weight must have the same shape as x"),
    bad("`x [5, 3]` for 4 vertices", lambda: tree_scan(_x(5, 3), _x(5, 3), _tree()),
        ValueError, "x must have one row per tree vertex (4), got 5"),
    bad("a scalar `x`", lambda: tree_scan(torch.tensor(1.0), torch.tensor(1.0), _tree()),
        ValueError, "x must have at least one dimension"),
    bad("`direction='left'`", lambda: tree_scan(_x(4, 3), _x(4, 3), _tree(), "left"),
        ValueError, "direction must be one of ('both', 'up', 'down')"),
    bad("`backend='cuda'` on CPU tensors",
        lambda: tree_scan(_x(4, 3), _x(4, 3), _tree(), backend="cuda"), ValueError,
        "backend 'cuda' runs on CUDA tensors"),
    bad("a parent array instead of a tree",
        lambda: tree_scan(_x(4, 3), _x(4, 3), torch.tensor([-1, 0, 0, 1])), TypeError,
        "tree must be a treessm.Tree"),
]

name = ("treessm.selective_tree_scan(u, delta, A, B, C, tree, D=None, delta_bias=None, "
        "delta_softplus=False, direction='both', edge_step='child', *, initial_state=None, "
        "state_vertices=None, state_norm=False, norm_weight=None, norm_bias=None, norm_eps=1e-5, "
        "backend=None)")
ACCEPTS[name] = {
    "u, delta": "floating-point tensors `[N, D]` (`N = tree.num_nodes`), any of float32, "
                "float64, float16, bfloat16 (half types are computed in float32); the output has "
                "the dtype of `u`. Differentiable.",
    "A": "floating-point tensor `[D, S]` (`S = 0` leaves the skip alone, with or without "
         "`state_norm`). Differentiable.",
    "B, C": "floating-point tensors `[N, S]`. Differentiable.",
    "tree": "a `treessm.Tree` over the `N` vertices, on the device of `u`.",
    "D, delta_bias": "`None` or a floating-point tensor `[D]`. Differentiable.",
    "delta_softplus, state_norm": "`bool`.",
    "direction": "`'both'`, `'up'` or `'down'`.",
    "edge_step": "`'child'`, `'mean'`, or a floating-point tensor `[N, D]` of edge steps "
                 "(differentiable).",
    "initial_state": "`None`, or with `direction='down'` a floating-point tensor `[T, D, S]` "
                     "(`T = tree.num_trees`). Differentiable.",
    "state_vertices": "`None` or a 1-D integer tensor of vertex ids in `[0, N)` (repeats "
                      "allowed; uint8 ids are ids, not a mask); the call then returns "
                      "`(y, states)`.",
    "norm_weight, norm_bias": "`None`, or with `state_norm=True` a floating-point tensor "
                              "`[D, S]` or `[D * S]`. Differentiable.",
    "norm_eps": "a real number `> 0`.",
    "backend": "`None`/`'auto'` (numba on the CPU; on CUDA the expansion through "
               "`tree_scan`'s kernels), `'torch'` (the reference, any device), `'numba'` (CPU "
               "tensors), `'cuda'` (CUDA tensors).",
}


def _sts(n=4, d=3, s=2, **change):
    args = dict(u=_x(n, d), delta=_x(n, d), A=-_x(d, s), B=_x(n, s), C=_x(n, s),
                tree=_tree(n) if n else Tree.from_parent([]))
    args.update(change)
    return selective_tree_scan(**args)


CASES[name] = [
    ok("`u, delta [4, 3]`, `A [3, 2]`, `B, C [4, 2]` float32", lambda: _sts(), "`[4, 3]` float32",
       lambda y: y.shape == (4, 3) and y.dtype == torch.float32),
    ok("bfloat16 `u, delta, B, C`, float32 `A`",
       lambda: _sts(u=_x(4, 3, dtype=torch.bfloat16), delta=_x(4, 3, dtype=torch.bfloat16),
                    B=_x(4, 2, dtype=torch.bfloat16), C=_x(4, 2, dtype=torch.bfloat16)),
       "`[4, 3]` bfloat16", lambda y: y.dtype == torch.bfloat16),
    ok("`state_vertices=[3, 0, 3]`", lambda: _sts(state_vertices=torch.tensor([3, 0, 3])),
       "`(y [4, 3], states [3, 3, 2])`", lambda r: r[1].shape == (3, 3, 2)),
    ok("`u [0, 3]`, the empty tree", lambda: _sts(0), "`[0, 3]`"),
    ok("`A [3, 0]` (no states)", lambda: _sts(s=0), "`[4, 3]` zeros (the skip alone)"),
    ok("`A [3, 0]`, `state_norm=True`", lambda: _sts(s=0, state_norm=True),
       "`[4, 3]` zeros (no state to normalise)", lambda y: not y.any()),
    ok("uint8 `state_vertices=[3, 0]`",
       lambda: _sts(state_vertices=torch.tensor([3, 0], dtype=torch.uint8)),
       "`(y [4, 3], states [2, 3, 2])`, the states of vertices 3 and 0",
       lambda r: r[1].shape == (2, 3, 2) and torch.equal(
           r[1], _sts(state_vertices=torch.tensor([3, 0]))[1])),
    bad("`u` a list", lambda: _sts(u=[[1.0]]), TypeError, "u must be a Tensor"),
    bad("`u [4]`", lambda: _sts(u=_x(4)), ValueError, "u must be 2-D"),
    bad("integer `u`", lambda: _sts(u=torch.ones(4, 3, dtype=_I64)), TypeError,
        "u must be a floating-point tensor"),
    bad("`delta [4, 4]`", lambda: _sts(delta=_x(4, 4)), ValueError,
        "delta must have shape [4, 3]"),
    bad("`A [4, 2]`", lambda: _sts(A=_x(4, 2)), ValueError, "A must have shape [3, d_state]"),
    bad("`B [4, 3]`", lambda: _sts(B=_x(4, 3)), ValueError, "B must have shape [4, 2]"),
    bad("`C [5, 2]`", lambda: _sts(C=_x(5, 2)), ValueError, "C must have shape [4, 2]"),
    bad("`tree` a parent tensor", lambda: _sts(tree=torch.tensor([-1, 0, 0, 1])), TypeError,
        "tree must be a treessm.Tree"),
    bad("`u [3, 3]` for 4 vertices",
        lambda: _sts(u=_x(3, 3), delta=_x(3, 3), B=_x(3, 2), C=_x(3, 2)), ValueError,
        "u must have one row per tree vertex (4), got 3"),
    bad("`D [4]`", lambda: _sts(D=_x(4)), ValueError, "D must have shape [3]"),
    bad("`delta_bias [1, 3]`", lambda: _sts(delta_bias=_x(1, 3)), ValueError,
        "delta_bias must be 1-D"),
    bad("`direction='sideways'`", lambda: _sts(direction="sideways"), ValueError,
        "direction must be one of ('both', 'up', 'down')"),
    bad("`delta_softplus=1`", lambda: _sts(delta_softplus=1), TypeError,
        "delta_softplus must be a bool"),
    bad("`edge_step='max'`", lambda: _sts(edge_step="max"), ValueError,
        "edge_step must be one of ('child', 'mean') or a tensor"),
    bad("`edge_step [4, 4]`", lambda: _sts(edge_step=_x(4, 4)), ValueError,
        "edge_step must have shape [4, 3]"),
    bad("`edge_step` a NumPy array", lambda: _sts(edge_step=_x(4, 3).numpy()), ValueError,
        "edge_step must be one of ('child', 'mean') or a tensor"),
    bad("`initial_state` with `direction='both'`", lambda: _sts(initial_state=_x(1, 3, 2)),
        ValueError, "initial_state enters the roots of a 'down' scan"),
    bad("`initial_state [2, 3, 2]` for one tree",
        lambda: _sts(direction="down", initial_state=_x(2, 3, 2)), ValueError,
        "initial_state must have shape [1, 3, 2]"),
    bad("float `state_vertices`", lambda: _sts(state_vertices=torch.tensor([0.5])), TypeError,
        "state_vertices must be an integer tensor"),
    bad("`state_vertices=[4]`", lambda: _sts(state_vertices=torch.tensor([4])), ValueError,
        "state_vertices must hold vertex ids in [0, 4)"),
    bad("complex `state_vertices`", lambda: _sts(state_vertices=torch.tensor([1j])), TypeError,
        "state_vertices must be an integer tensor"),
    bad("`state_vertices` on another device",
        lambda: _sts(state_vertices=torch.tensor([1]).to("meta")), ValueError,
        "state_vertices must be on the device of u"),
    bad("`norm_weight` without `state_norm`", lambda: _sts(norm_weight=_x(3, 2)), ValueError,
        "norm_weight is used only with state_norm=True"),
    bad("`norm_bias [3, 3]`", lambda: _sts(state_norm=True, norm_bias=_x(3, 3)), ValueError,
        "norm_bias must have shape [3, 2] or [6]"),
    bad("boolean `norm_weight`",
        lambda: _sts(state_norm=True, norm_weight=torch.ones(3, 2, dtype=torch.bool)),
        TypeError, "norm_weight must be a floating-point tensor"),
    bad("`state_norm=1`", lambda: _sts(state_norm=1), TypeError, "state_norm must be a bool"),
    bad("`norm_eps=0`", lambda: _sts(norm_eps=0.0), ValueError, "norm_eps must be > 0"),
    bad("`backend='fast'`", lambda: _sts(backend="fast"), ValueError, "backend must be one of"),
    bad("`backend='numba'` on meta tensors",
        lambda: _sts(u=_x(4, 3).to("meta"), delta=_x(4, 3).to("meta"), A=_x(3, 2).to("meta"),
                     B=_x(4, 2).to("meta"), C=_x(4, 2).to("meta"), tree=_tree().to("meta"),
                     backend="numba"), ValueError, "backend 'numba' runs on CPU tensors"),
    bad("`delta` on another device", lambda: _sts(delta=_x(4, 3).to("meta")), ValueError,
        "delta must be on the device of u"),
    bad("`tree` on another device", lambda: _sts(tree=_tree().to("meta")), ValueError,
        "tree must be on the device of u"),
]

name = "treessm.minimum_spanning_tree(edge_index, edge_weight, num_nodes, batch=None)"
ACCEPTS[name] = {
    "edge_index": "integer tensor `[2, E]` of ids in `[0, num_nodes)`; self-loops and "
                  "repeated edges allowed (never chosen twice).",
    "edge_weight": "float16, bfloat16, float32 or float64 tensor `[E]`, finite; any sign; "
                   "ties go to the lower edge index (`-0.0` ties `0.0`).",
    "num_nodes": "non-negative int (or 0-dim integer tensor).",
    "batch": "`None` or an integer tensor `[N]`: a hint that lets examples be solved in "
             "parallel; any ids (huge or with gaps cost nothing), any order.",
}
CASES[name] = [
    ok("a path of 4 vertices", lambda: minimum_spanning_tree(_LINE, _x(3), 4), "`[3]` bool",
       lambda m: m.all()),
    ok("no edges, no vertices",
       lambda: minimum_spanning_tree(torch.zeros(2, 0, dtype=_I64), torch.zeros(0), 0),
       "`[0]` bool"),
    ok("`batch` ids `0, 0, 10**12, 10**12`",
       lambda: minimum_spanning_tree(torch.tensor([[0, 2], [1, 3]]), _x(2), 4,
                                     batch=torch.tensor([0, 0, 10 ** 12, 10 ** 12])),
       "the same forest as without `batch`"),
    bad("vertex id 4 with `num_nodes=4`",
        lambda: minimum_spanning_tree(torch.tensor([[0], [4]]), _x(1), 4), ValueError,
        "edge_index must hold vertex ids in [0, 4), found 4"),
    bad("NaN weight", lambda: minimum_spanning_tree(_LINE, torch.tensor([1.0, NAN, 2.0]), 4),
        ValueError, "edge_weight must be finite"),
    bad("integer weights", lambda: minimum_spanning_tree(_LINE, torch.ones(3, dtype=_I64), 4),
        TypeError, "edge_weight must be a floating-point tensor"),
    bad("`edge_weight [2]` for 3 edges", lambda: minimum_spanning_tree(_LINE, _x(2), 4),
        ValueError, "edge_weight must have shape [E] = [3]"),
    bad("`num_nodes=True`", lambda: minimum_spanning_tree(_LINE, _x(3), True), TypeError,
        "num_nodes must be a non-negative int"),
    bad("`num_nodes=-1`", lambda: minimum_spanning_tree(_LINE, _x(3), -1), ValueError,
        "num_nodes must be a non-negative int, got -1"),
]

name = "treessm.topology.root_forest(edge_index, num_nodes, roots=None), tree_from_edges(...)"
ACCEPTS[name] = {
    "edge_index": "integer tensor `[2, E]`: the edges of a forest, in either or both "
                  "directions, repeats allowed.",
    "num_nodes": "non-negative int.",
    "roots": "`None` or integer ids, at most one per component.",
    "batch": "(`tree_from_edges`) `None` or one example id per vertex.",
}
CASES[name] = [
    ok("a path, rooted at 2", lambda: root_forest(_LINE, 4, [2]), "`[1, 2, -1, 2]`",
       lambda p: p.tolist() == [1, 2, -1, 2]),
    ok("no edges", lambda: tree_from_edges(torch.zeros(2, 0, dtype=_I64), 3),
       "3 single-vertex trees", lambda t: t.num_trees == 3),
    bad("a cycle", lambda: root_forest(torch.tensor([[0, 1, 2], [1, 2, 0]]), 3), ValueError,
        "edge_index must describe a forest"),
    bad("a self-loop", lambda: root_forest(torch.tensor([[1], [1]]), 3), ValueError,
        "holds the self-loop (1, 1)"),
    bad("two roots in one tree", lambda: root_forest(_LINE, 4, [0, 3]), ValueError,
        "roots must hold at most one vertex per connected component"),
    bad("root 9 of 4 vertices", lambda: root_forest(_LINE, 4, [9]), ValueError,
        "roots must hold vertex ids in [0, 4), found 9"),
]

name = "treessm.topology.tree_partition(edge_index, num_nodes, num_parts, *, generator=None)"
ACCEPTS[name] = {
    "edge_index": "integer tensor `[2, E]`: edges in either or both directions, repeats and "
                  "self-loops allowed.",
    "num_nodes": "non-negative int.",
    "num_parts": "int from 1 to `max(num_nodes, 1)`.",
    "generator": "`None` or a CPU `torch.Generator` (draws the random edge costs).",
}
CASES[name] = [
    ok("a path of 4 vertices in 2 parts", lambda: tree_partition(_LINE, 4, 2), "`[0, 0, 1, 1]`",
       lambda p: p.tolist() == [0, 0, 1, 1]),
    ok("no edges, 3 parts of 3 vertices", lambda: tree_partition(torch.zeros(2, 0, dtype=_I64),
                                                                 3, 3),
       "`[0, 1, 2]`", lambda p: p.tolist() == [0, 1, 2]),
    bad("`num_parts=0`", lambda: tree_partition(_LINE, 4, 0), ValueError,
        "num_parts must be a positive int, got 0"),
    bad("`num_parts=5` for 4 vertices", lambda: tree_partition(_LINE, 4, 5), ValueError,
        "num_parts must be at most the number of vertices (4), got 5"),
    bad("`num_parts=2.0`", lambda: tree_partition(_LINE, 4, 2.0), TypeError,
        "num_parts must be a positive int"),
    bad("vertex 4 of 4", lambda: tree_partition(torch.tensor([[0], [4]]), 4, 2), ValueError,
        "edge_index must hold vertex ids in [0, 4), found 4"),
    bad("`generator=3`", lambda: tree_partition(_LINE, 4, 2, generator=3), TypeError,
        "generator must be None or a CPU torch.Generator, got int"),
]

name = "treessm.topology.chain_tree(num_chains, length, device='cpu')"
ACCEPTS[name] = {
    "num_chains, length": "non-negative ints; a chain of no vertex is no tree.",
    "device": "a `torch.device`, a device string or a CUDA index.",
}
CASES[name] = [
    ok("`(2, 3)`", lambda: chain_tree(2, 3), "2 chains of 3", lambda t: t.num_trees == 2),
    ok("`(3, 0)`", lambda: chain_tree(3, 0), "the empty forest (`roots` empty)",
       lambda t: t.roots.numel() == 0),
    bad("`device='xyz'`", lambda: chain_tree(2, 3, device="xyz"), ValueError,
        "device must name a torch device"),
    bad("`length=2.0`", lambda: chain_tree(2, 2.0), TypeError,
        "length must be a non-negative int"),
    bad("`num_chains=-1`", lambda: chain_tree(-1, 2), ValueError,
        "num_chains must be a non-negative int, got -1"),
]

name = "treessm.GridTopology(connectivity=4, distance='cosine')(feat)"
ACCEPTS[name] = {
    "connectivity": "`4` or `8` (ints).",
    "distance": "`'cosine'`, `'l2'` or a callable `f(feat_u [E, C], feat_v [E, C]) -> [E]`.",
    "feat": "floating-point tensor `[B, H, W, C]`, any device; finite values of any "
            "magnitude (the tree does not depend on the scale: `1e-30` and `1e30` are fine). "
            "`B`, `H` or `W` zero gives the empty forest. NaN or infinite values raise on "
            "the CPU (on CUDA they give an unspecified tree: checking would wait for the "
            "device).",
}
CASES[name] = [
    ok("`[2, 5, 6, 8]`", lambda: GridTopology()(_x(2, 5, 6, 8)), "a tree per image",
       lambda t: t.num_trees == 2),
    ok("features `* 1e30`", lambda: GridTopology()(_x(2, 5, 6, 8) * 1e30),
       "the tree of the unscaled features",
       lambda t: torch.equal(t.parent, GridTopology()(_x(2, 5, 6, 8)).parent)),
    ok("features `* 1e-30`", lambda: GridTopology(8)(_x(2, 5, 6, 8) * 1e-30),
       "the tree of the unscaled features",
       lambda t: torch.equal(t.parent, GridTopology(8)(_x(2, 5, 6, 8)).parent)),
    ok("`[2, 0, 4, 8]`", lambda: GridTopology()(_x(2, 0, 4, 8)), "the empty forest",
       lambda t: t.num_nodes == 0 and t.num_trees == 0),
    bad("`connectivity=6`", lambda: GridTopology(6), ValueError,
        "connectivity must be one of (4, 8)"),
    bad("`distance='manhattan'`", lambda: GridTopology(distance="manhattan"), ValueError,
        "distance must be one of ('cosine', 'l2') or a callable"),
    bad("`[5, 6, 8]`", lambda: GridTopology()(_x(5, 6, 8)), ValueError,
        "feat must have shape [B, H, W, C], got [5, 6, 8]"),
    bad("integer features", lambda: GridTopology()(torch.ones(1, 2, 2, 3, dtype=_I64)),
        TypeError, "feat must be a floating-point tensor"),
    bad("a NaN feature", lambda: GridTopology()(torch.full((1, 2, 2, 3), NAN)), ValueError,
        "feat must be finite, got NaN or infinite values"),
]

name = ("treessm.SequenceTopology(window=1, distance='cosine')(feat), "
        "GrootLTopology(context_len=None, window=3, distance='cosine')(feat)")
ACCEPTS[name] = {
    "window": "positive int.",
    "context_len": "`None` or a non-negative int.",
    "feat": "floating-point tensor `[B, L, C]`, finite values of any magnitude; `B` or `L` "
            "zero gives the empty forest.",
}
CASES[name] = [
    ok("`[2, 9, 4]`, `window=3`", lambda: SequenceTopology(3)(_x(2, 9, 4)), "a tree per sequence",
       lambda t: t.num_trees == 2),
    ok("`[2, 0, 4]`, `window=2`", lambda: SequenceTopology(2)(_x(2, 0, 4)), "the empty forest",
       lambda t: t.num_trees == 0),
    ok("`[2, 0, 4]`, GrootL", lambda: GrootLTopology()(_x(2, 0, 4)), "the empty forest",
       lambda t: t.num_trees == 0),
    bad("`window=0`", lambda: SequenceTopology(0), ValueError,
        "window must be a positive int, got 0"),
    bad("`window=True`", lambda: SequenceTopology(True), TypeError,
        "window must be a positive int"),
    bad("`context_len=-1`", lambda: GrootLTopology(-1), ValueError,
        "context_len must be a non-negative int"),
    bad("`[9, 4]`", lambda: SequenceTopology(2)(_x(9, 4)), ValueError,
        "feat must have shape [B, L, C]"),
]

name = "treessm.topology.CausalSequenceTopology(k=4, distance='cosine', tie_rtol=1e-5)(feat, valid=None)"
ACCEPTS[name] = {
    "k": "positive int.",
    "tie_rtol": "real number in `[0, 1)`.",
    "feat": "floating-point tensor `[B, L, C]`, finite values of any magnitude; NaN or "
            "infinite values raise on the CPU (on accelerators they give an unspecified "
            "tree). `B` or `L` zero gives the empty forest.",
    "valid": "`None` or a boolean tensor `[B, L]`: the tokens that may be parents.",
}
CASES[name] = [
    ok("`[2, 9, 4]`", lambda: CausalSequenceTopology(3)(_x(2, 9, 4)),
       "every parent among the 3 tokens before", lambda t: t.num_nodes == 18),
    ok("`[2, 0, 4]`", lambda: CausalSequenceTopology()(_x(2, 0, 4)), "the empty forest",
       lambda t: t.num_trees == 0),
    bad("a NaN feature", lambda: CausalSequenceTopology()(torch.full((1, 3, 2), NAN)),
        ValueError, "feat must be finite, got NaN or infinite features"),
    bad("an infinite feature",
        lambda: CausalSequenceTopology()(torch.tensor([[[1.0, INF], [1.0, 2.0]]])), ValueError,
        "feat must be finite"),
    bad("`k=0`", lambda: CausalSequenceTopology(0), ValueError, "k must be a positive int"),
    bad("`tie_rtol=1`", lambda: CausalSequenceTopology(tie_rtol=1), ValueError,
        "tie_rtol must be in [0.0, 1.0), got 1.0"),
    bad("`valid [2, 5]` for `[2, 4]` tokens",
        lambda: CausalSequenceTopology()(_x(2, 4, 3), torch.ones(2, 5, dtype=torch.bool)),
        ValueError, "valid must be a BoolTensor of shape [2, 4]"),
]

name = ("treessm.GraphTopology(distance='cosine')(x, edge_index, batch=None, edge_attr=None, "
        "edge_weight=None), treessm.prepare_graph(edge_index, num_nodes=None, ...)")
ACCEPTS[name] = {
    "x": "floating-point tensor `[N, C]`, finite values of any magnitude (checked on every "
         "device, except while a CUDA graph is being captured: the eager steps before a "
         "capture check theirs, and replays check nothing); `N = 0` gives the empty forest.",
    "edge_index": "integer tensor `[2, E]`, `EdgeIndex`, sparse adjacency (square, `[N, N]`, "
                  "one value per edge) or `PreparedGraph`, on the device of `x`; ids in "
                  "`[0, N)`; directions, repeats and self-loops do not matter.",
    "batch": "`None` or a sorted, non-negative integer tensor `[N]` (PyG's); ids may be "
             "huge or skip numbers; no edge may join two examples (checked as `x` is).",
    "edge_weight": "`None` or a positive, finite tensor `[E]`.",
    "edge_attr": "`None` or a tensor `[E]` or `[E, F]` for a distance that reads it.",
    "reduce, cache": "(`prepare_graph`) `'mean'`, `'min'`, `'max'` or `'sum'`; `bool`. "
                     "A `PreparedGraph` is returned as it is: its edge weights and features "
                     "were given when it was prepared.",
}
CASES[name] = [
    ok("a path of 4 vertices", lambda: GraphTopology()(_x(4, 3), _LINE), "one tree",
       lambda t: t.num_trees == 1),
    ok("`x * 1e30`", lambda: GraphTopology()(_x(4, 3) * 1e30, _LINE), "the same tree",
       lambda t: torch.equal(t.parent, GraphTopology()(_x(4, 3), _LINE).parent)),
    ok("`N = 0`", lambda: GraphTopology()(_x(0, 3), torch.zeros(2, 0, dtype=_I64)),
       "the empty forest", lambda t: t.num_nodes == 0),
    ok("`batch` ids `0, 0, 10**12, 10**12`",
       lambda: GraphTopology()(_x(4, 3), torch.tensor([[0, 2], [1, 3]]),
                               batch=torch.tensor([0, 0, 10 ** 12, 10 ** 12])), "two trees",
       lambda t: t.num_trees == 2),
    bad("a NaN feature", lambda: GraphTopology()(torch.full((4, 3), NAN), _LINE), ValueError,
        "x must be finite"),
    bad("vertex id 4 of 4", lambda: GraphTopology()(_x(4, 3), torch.tensor([[0], [4]])),
        ValueError, "edge_index must hold vertex ids in [0, 4)"),
    bad("float `edge_index`", lambda: GraphTopology()(_x(4, 3), _LINE.float()), TypeError,
        "edge_index must be an integer tensor"),
    bad("unsorted `batch`",
        lambda: GraphTopology()(_x(4, 3), _LINE, batch=torch.tensor([1, 1, 0, 0])), ValueError,
        "batch must be sorted"),
    bad("`edge_weight` zero", lambda: prepare_graph(_LINE, 4, edge_weight=torch.zeros(3)),
        ValueError, "edge_weight must be positive and finite"),
    bad("`edge_index` on another device",
        lambda: GraphTopology()(_x(4, 3), _LINE.to("meta")), ValueError,
        "edge_index must be on the device of x"),
    bad("a sparse adjacency `[4, 5]`",
        lambda: prepare_graph(torch.sparse_coo_tensor(_LINE, torch.ones(3), (4, 5))),
        ValueError, "edge_index as a sparse adjacency must be a square [N, N] matrix"),
    bad("a sparse adjacency of 5 vertices for 4 rows",
        lambda: GraphTopology()(_x(4, 3), torch.sparse_coo_tensor(_LINE, torch.ones(3), (5, 5))),
        ValueError, "edge_index is an adjacency over 5 vertices, but num_nodes"),
    bad("a `PreparedGraph` and `edge_weight`",
        lambda: prepare_graph(prepare_graph(_LINE, 4), edge_weight=torch.ones(3)), ValueError,
        "edge_weight and edge_attr cannot be added to a PreparedGraph"),
    bad("`cache='no'`", lambda: prepare_graph(_LINE, 4, cache="no"), TypeError,
        "cache must be a bool"),
]

name = ("treessm.nn.TreeSSM(d_model, d_state=1, ssm_ratio=2.0, dt_rank='auto', d_conv=3, ...)"
        "(x, tree=None, return_tree=False)")
ACCEPTS[name] = {
    "d_model, d_state": "positive ints (`bool` refused).",
    "ssm_ratio": "positive real with `int(ssm_ratio * d_model) >= 1`.",
    "dt_rank": "positive int or `'auto'`.",
    "d_conv": "`0` or an odd positive int.",
    "dt_min, dt_max, dt_init_floor": "finite positive reals, `dt_min <= dt_max`.",
    "conv_bias, bias": "`bool`.",
    "scan": "`'tree'` or `'raster'`; `topology` only with `'tree'`, a callable.",
    "x": "floating-point tensor `[B, H, W, d_model]`; `B`, `H` or `W` zero gives an empty "
         "output (connected to the parameters).",
    "tree": "`None` or a `Tree` over the `B * H * W` pixels.",
}
CASES[name] = [
    ok("`x [2, 5, 6, 8]`", lambda: TreeSSM(8)(_x(2, 5, 6, 8)), "`[2, 5, 6, 8]`"),
    ok("`x [2, 0, 6, 8]`", lambda: TreeSSM(8)(_x(2, 0, 6, 8)), "`[2, 0, 6, 8]`",
       lambda y: y.shape == (2, 0, 6, 8)),
    ok("`x [0, 5, 6, 8]`", lambda: TreeSSM(8)(_x(0, 5, 6, 8)), "`[0, 5, 6, 8]`",
       lambda y: y.shape == (0, 5, 6, 8)),
    bad("`TreeSSM(True)`", lambda: TreeSSM(True), TypeError,
        "d_model must be a positive int, got True"),
    bad("`dt_rank=True`", lambda: TreeSSM(8, dt_rank=True), TypeError,
        "dt_rank must be a positive int or 'auto'"),
    bad("`d_state=True`", lambda: TreeSSM(8, d_state=True), TypeError,
        "d_state must be a positive int"),
    bad("`d_conv=2`", lambda: TreeSSM(8, d_conv=2), ValueError,
        "d_conv must be 0 or an odd positive int"),
    bad("`ssm_ratio='2'`", lambda: TreeSSM(8, ssm_ratio="2"), TypeError,
        "ssm_ratio must be a real number"),
    bad("`x [2, 8, 5, 6]` (channels first)", lambda: TreeSSM(8)(_x(2, 8, 5, 6)), ValueError,
        "x must be a [B, H, W, 8] channels-last tensor"),
    bad("a tree of 5 vertices for 4 pixels",
        lambda: TreeSSM(8)(_x(1, 2, 2, 8), Tree.from_parent([-1, 0, 0, 0, 0])), ValueError,
        "tree must span the B * H * W = 4 pixels of x"),
]

name = ("treessm.nn.TreeSSMConv(in_channels, out_channels, d_state=4, ...)"
        "(x, edge_index, edge_weight=None, *, batch=None, edge_attr=None)")
ACCEPTS[name] = {
    "in_channels": "positive int, or `-1` (lazy: taken from the first input).",
    "out_channels, d_state": "positive ints.",
    "tree_features": "`'inner'` or `'input'`; `local_mixing`, `bias`, `return_tree`: `bool`.",
    "x": "floating-point tensor `[N, in_channels]`, finite; the tree does not depend on the "
         "scale of the features, the layer's own float32 arithmetic does (features beyond "
         "about `1e10` overflow its states); `N = 0` gives `[0, out_channels]`.",
    "edge_index, edge_weight, batch, edge_attr": "as `GraphTopology`.",
    "topology": "`None` or a callable `(feat [N, C], graph, batch) -> Tree` over the `N` "
                "vertices; not with a `distance` of the layer's own.",
}
CASES[name] = [
    ok("a path of 4 vertices", lambda: TreeSSMConv(3, 5)(_x(4, 3), _LINE), "`[4, 5]`",
       lambda y: y.shape == (4, 5)),
    ok("`topology=` the chain", lambda: TreeSSMConv(3, 5, topology=lambda f, g, b: chain_tree(
        1, f.shape[0]))(_x(4, 3), torch.zeros(2, 0, dtype=_I64)), "`[4, 5]`",
       lambda y: y.shape == (4, 5)),
    bad("`topology='knn'`", lambda: TreeSSMConv(3, 4, topology="knn"), TypeError,
        "topology must be a callable Topology, got str"),
    bad("`topology=` a tree of 2 vertices for `N = 4`",
        lambda: TreeSSMConv(3, 5, topology=lambda f, g, b: chain_tree(1, 2))(_x(4, 3), _LINE),
        ValueError, "topology must return a Tree over the 4 vertices, got a Tree over 2"),
    ok("`N = 0`", lambda: TreeSSMConv(3, 5)(_x(0, 3), torch.zeros(2, 0, dtype=_I64)),
       "`[0, 5]`", lambda y: y.shape == (0, 5)),
    bad("`TreeSSMConv(True, 4)`", lambda: TreeSSMConv(True, 4), TypeError,
        "in_channels must be a positive int"),
    bad("`tree_features='edges'`", lambda: TreeSSMConv(3, 4, tree_features="edges"),
        ValueError, "tree_features must be one of ('inner', 'input')"),
    bad("`local_mixing='yes'`", lambda: TreeSSMConv(3, 4, local_mixing="yes"), TypeError,
        "local_mixing must be a bool"),
    bad("`x [4, 2]` for `in_channels=3`", lambda: TreeSSMConv(3, 5)(_x(4, 2), _LINE),
        ValueError, "x must have in_channels = 3 columns, got 2"),
    bad("`return_tree='yes'`", lambda: TreeSSMConv(3, 5)(_x(4, 3), _LINE, return_tree="yes"),
        TypeError, "return_tree must be a bool"),
]

name = ("treessm.nn.GrootLMixer(hidden_size, state_size=16, mode='chain', ...)"
        "(hidden_states, cache=None, attention_mask=None)")
ACCEPTS[name] = {
    "hidden_size, state_size, conv_kernel, intermediate_size": "positive ints.",
    "time_step_rank": "positive int or `'auto'`.",
    "mode": "`'chain'`, `'causal'` (with `k`, a positive int) or `'paper'` (with "
            "`context_len`, a non-negative int or `None`, and `tree_scale`, a finite real).",
    "use_conv_bias, use_bias": "`bool`; `hidden_act`: `'silu'`, `'swish'`, `'gelu'`, `'relu'` "
                               "or `'tanh'`; `layer_idx`: non-negative int.",
    "hidden_states": "floating-point tensor `[B, L, hidden_size]`; `B` or `L` zero gives an "
                     "empty output (the cache untouched).",
    "cache": "`None` or a transformers cache of linear-attention layers (`DynamicCache` of a "
             "Mamba model); `mode='paper'` cannot continue one.",
    "attention_mask": "`None` or a bool, integer or real tensor `[B, >= L]` of 0 and 1 on the "
                      "device of `hidden_states`.",
    "topology": "`None`; with `mode='causal'` a `CausalSequenceTopology` (then no `k` or "
                "`distance` of the layer's own), with `mode='paper'` a callable `[B, L, C] -> "
                "Tree`.",
}
CASES[name] = [
    ok("`[2, 7, 8]`, causal", lambda: GrootLMixer(8, mode="causal")(_x(2, 7, 8)), "`[2, 7, 8]`"),
    ok("`[2, 0, 8]`", lambda: GrootLMixer(8, mode="paper")(_x(2, 0, 8)), "`[2, 0, 8]`",
       lambda y: y.shape == (2, 0, 8)),
    bad("`tree_scale='a'`", lambda: GrootLMixer(8, mode="paper", tree_scale="a"), TypeError,
        "tree_scale must be a real number"),
    bad("`k=2` with `mode='chain'`", lambda: GrootLMixer(8, k=2), ValueError,
        "k is used with mode='causal' only"),
    bad("`topology=SequenceTopology()` with `mode='causal'`",
        lambda: GrootLMixer(8, mode="causal", topology=SequenceTopology()), TypeError,
        "with mode='causal', topology must be a CausalSequenceTopology"),
    bad("`attention_mask=[[1, 1, 1]]`",
        lambda: GrootLMixer(8)(_x(1, 3, 8), attention_mask=[[1, 1, 1]]), TypeError,
        "attention_mask must be a tensor [B, L] of 0 and 1, got list"),
    bad("`cache=object()`", lambda: GrootLMixer(8)(_x(1, 3, 8), cache=object()), TypeError,
        "cache must be a transformers Cache of linear-attention layers"),
    bad("`hidden_states [1, 3, 6]` for `hidden_size=8`",
        lambda: GrootLMixer(8)(_x(1, 3, 6)), ValueError,
        "hidden_states must be a [B, L, 8] tensor, got [1, 3, 6]"),
    bad("integer `hidden_states`", lambda: GrootLMixer(8)(torch.ones(1, 3, 8, dtype=_I64)),
        TypeError, "hidden_states must be a floating-point tensor"),
    bad("complex `attention_mask`",
        lambda: GrootLMixer(8)(_x(1, 3, 8), attention_mask=torch.ones(1, 3, dtype=torch.cfloat)),
        TypeError, "attention_mask must be a bool, integer or real tensor"),
]

name = ("treessm.models.GrootV(num_classes=1000, in_chans=3, dims=..., depths=..., ...)(x); "
        "grootv_tiny / grootv_small / grootv_base(**kwargs)")
ACCEPTS[name] = {
    "num_classes": "non-negative int (`0`: pooled features).",
    "in_chans": "positive int.",
    "dims, depths": "sequences of positive ints of one length (at least one stage), "
                    "`dims[0] >= 2`; `stem_strides`, `downsample_strides` likewise.",
    "mlp_ratio, head_ratio": "positive reals; `drop_rate`, `drop_path_rate`: reals in `[0, 1)`.",
    "features_only, shared_tree": "`bool`; `out_indices` only with `features_only`.",
    "x": "floating-point tensor `[B, in_chans, H, W]`, `H, W >= 1` (any sizes, not only "
         "squares); `B = 0` gives `[0, num_classes]`.",
    "indices, norm, stop_early, output_fmt, intermediates_only": "(`forward_intermediates`) "
        "`None`, an int `n` (the last `n` stages) or a sequence of stage indices; `bool`; "
        "`bool`; `'NCHW'` or `'NHWC'`; `bool`.",
    "enable": "(`set_grad_checkpointing`) `bool`.",
}
_SMALL = dict(dims=(8, 16), depths=(1, 1))
CASES[name] = [
    ok("`x [2, 3, 32, 32]`", lambda: GrootV(num_classes=5, **_SMALL)(_x(2, 3, 32, 32)),
       "`[2, 5]`", lambda y: y.shape == (2, 5)),
    ok("`x [0, 3, 32, 32]`", lambda: GrootV(num_classes=5, **_SMALL)(_x(0, 3, 32, 32)),
       "`[0, 5]`", lambda y: y.shape == (0, 5)),
    bad("`num_classes=True`", lambda: GrootV(num_classes=True, **_SMALL), TypeError,
        "num_classes must be a non-negative int"),
    bad("`in_chans=True`", lambda: GrootV(in_chans=True, **_SMALL), TypeError,
        "in_chans must be a positive int"),
    bad("`depths=(True, 1)`", lambda: GrootV(dims=(8, 16), depths=(True, 1)), TypeError,
        "depths[0] must be a positive int"),
    bad("`dims=(8,)` with two stages", lambda: GrootV(dims=(8,), depths=(1, 1)), ValueError,
        "dims must have 2 entries, got 1"),
    bad("`drop_rate=1.0`", lambda: GrootV(drop_rate=1.0, **_SMALL), ValueError,
        "drop_rate must be in [0.0, 1.0), got 1.0"),
    bad("`x [2, 1, 32, 32]` for `in_chans=3`", lambda: GrootV(**_SMALL)(_x(2, 1, 32, 32)),
        ValueError, "x must be a [B, 3, H, W] image batch"),
    ok("`x [1, 3, 1, 1]`, evaluation mode",
       lambda: GrootV(num_classes=5, **_SMALL).eval()(_x(1, 3, 1, 1)), "`[1, 5]`",
       lambda y: y.shape == (1, 5) and bool(y.isfinite().all())),
    bad("`x [2, 3, 0, 32]`", lambda: GrootV(**_SMALL)(_x(2, 3, 0, 32)), ValueError,
        "x must have at least one pixel per image"),
    bad("integer `x`", lambda: GrootV(**_SMALL)(torch.ones(1, 3, 8, 8, dtype=_I64)), TypeError,
        "x must be a floating-point tensor"),
    bad("`forward_intermediates(x, intermediates_only='no')`",
        lambda: GrootV(**_SMALL).forward_intermediates(_x(1, 3, 8, 8), intermediates_only="no"),
        TypeError, "intermediates_only must be a bool"),
    bad("`set_grad_checkpointing('no')`", lambda: GrootV(**_SMALL).set_grad_checkpointing("no"),
        TypeError, "enable must be a bool"),
]


name = ("treessm.models.load_grootvl_checkpoint(model, checkpoint, use_ema=False, "
        "classifier=None, weights_only=True), treessm_to_grootvl(state_dict)")
ACCEPTS[name] = {
    "model": "a `GrootV` of the checkpoint's size (`treessm_to_grootvl`: one with its linear "
             "classifier, or its state dict).",
    "checkpoint": "a path (`str` or `os.PathLike`) of a file `torch.load` reads, holding the "
                  "authors' state dict (bare or under `'model'` / `'model_ema'`), or that "
                  "state dict itself.",
    "use_ema, weights_only": "`bool`.",
    "classifier": "`None` (load the classifier when its shape fits) or a `bool`.",
}


_FILES = tempfile.TemporaryDirectory(prefix="treessm-validation-")  # removed at exit


def _checkpoint_file(content: bytes) -> str:
    path = Path(_FILES.name) / f"checkpoint-{len(list(Path(_FILES.name).iterdir()))}.pth"
    path.write_bytes(content)
    return str(path)


CASES[name] = [
    ok("the authors' names of a `GrootV`",
       lambda: load_grootvl_checkpoint(GrootV(num_classes=5, **_SMALL),
                                       treessm_to_grootvl(GrootV(num_classes=5, **_SMALL))),
       "the model, filled"),
    bad("`checkpoint=None`", lambda: load_grootvl_checkpoint(GrootV(**_SMALL), None), TypeError,
        "checkpoint must be a path (str or os.PathLike) or the authors' state dict"),
    bad("an empty file", lambda: load_grootvl_checkpoint(GrootV(**_SMALL), _checkpoint_file(b"")),
        ValueError, "is not a checkpoint that torch.load can read"),
    bad("a text file",
        lambda: load_grootvl_checkpoint(GrootV(**_SMALL), _checkpoint_file(b"hello world\n")),
        ValueError, "is not a checkpoint that torch.load can read"),
    bad("`use_ema='no'`",
        lambda: load_grootvl_checkpoint(GrootV(**_SMALL), _checkpoint_file(b""), use_ema="no"),
        TypeError, "use_ema must be a bool"),
    bad("`classifier='yes'`",
        lambda: load_grootvl_checkpoint(GrootV(**_SMALL), {}, classifier="yes"), TypeError,
        "classifier must be a bool"),
    bad("`treessm_to_grootvl` of a `GrootV` with `num_classes=0`",
        lambda: treessm_to_grootvl(GrootV(num_classes=0, **_SMALL)), ValueError,
        "the authors' GrootV always has its classification head"),
]

name = "treessm.datasets.load_dataset(name, root, copy_to=None, **kwargs)"
ACCEPTS[name] = {
    "name": "one of `treessm.datasets.DATASETS` (`'Cora'`, `'minesweeper'`, `'tolokers'`, "
            "`'MUTAG'`, `'PROTEINS'`).",
    "root, copy_to": "a folder (`str` or `os.PathLike`); `copy_to` may be `None`.",
}
CASES[name] = [
    bad("`name='Citeseer'`", lambda: load_dataset("Citeseer", "data"), ValueError,
        "name must be one of ('Cora'"),
    bad("`name=['Cora']`", lambda: load_dataset(["Cora"], "data"), ValueError,
        "name must be one of ('Cora'"),
    bad("`root=None`", lambda: load_dataset("Cora", None), TypeError,
        "root must be a str or os.PathLike folder"),
    bad("`copy_to=5`", lambda: load_dataset("Cora", "data", copy_to=5), TypeError,
        "copy_to must be a str or os.PathLike folder"),
]


# ---------------------------------------------------------------------------- tests
_ALL = [(name, case) for name, cases in CASES.items() for case in cases]


@pytest.mark.parametrize("name, case", _ALL, ids=[f"{n.split('(')[0]}: {c.input}"
                                                    for n, c in _ALL])
def test_case(name, case):
    if case.error is not None:
        with pytest.raises(case.error, match=re.escape(case.message)):
            case.call()
        return
    with torch.no_grad():
        result = case.call()
    if case.check is not None:
        assert case.check(result)


def test_every_public_callable_is_in_the_table():
    public = {"Tree", "tree_scan", "selective_tree_scan", "minimum_spanning_tree", "GridTopology", "SequenceTopology",
              "GraphTopology", "prepare_graph", "CausalSequenceTopology", "GrootLTopology",
              "chain_tree", "root_forest", "tree_from_edges", "TreeSSM", "TreeSSMConv",
              "GrootLMixer", "GrootV", "grootv_tiny", "load_grootvl_checkpoint",
              "treessm_to_grootvl", "load_dataset"}
    text = " ".join(CASES)
    assert not {p for p in public if p not in text}
    assert set(ACCEPTS) == set(CASES)
    assert set(treessm.__all__) - {"__version__", "Topology", "PreparedGraph"} <= public


def render() -> str:
    lines = [
        "# What each public callable accepts and raises",
        "",
        "Generated from `tests/test_validation.py`, which runs every row below in the test "
        "suite; regenerate with `python tests/test_validation.py` after changing a case. "
        "Conventions: an argument of the wrong type raises `TypeError`, a value of the right "
        "type outside its range `ValueError`, and both messages name the argument and say "
        "what was expected (`bool` is never taken for an int). Messages below are their "
        "beginnings or a part of them.",
        "",
    ]
    for name in CASES:
        assert all("|" not in c.message and "`" not in c.message  # inside a code span
                   for c in CASES[name] if c.error is not None)
        lines += [f"## `{name}`", "", "| argument | accepts |", "|---|---|"]
        lines += [f"| `{arg}` | {text} |" if "," not in arg else
                  "| " + ", ".join(f"`{a.strip()}`" for a in arg.split(",")) + f" | {text} |"
                  for arg, text in ACCEPTS[name].items()]
        lines += ["", "| input | gives |", "|---|---|"]
        for case in CASES[name]:
            if case.error is None:
                gives = case.message
            else:
                gives = f"`{case.error.__name__}`: `{case.message}`"
            lines.append(f"| {case.input} | {gives} |")
        lines.append("")
    return "\n".join(lines)


def test_the_document_is_current():
    assert DOC.read_text() == render(), ("docs/validation.md is out of date: run "
                                         "python tests/test_validation.py")


if __name__ == "__main__":
    DOC.write_text(render())
    sys.stdout.write(f"wrote {DOC}\n")
