r"""``selective_tree_scan``: Mamba's selective state-space scan over a tree, fused.

A selective SSM layer runs, per inner channel ``d`` and state ``s``, the tree scan of
``x = Δ B u`` with edge weights ``w = exp(Δ_e A)`` and reads the states out with ``C``
(``docs/concepts.md``, "The selective tree scan"). Formed naively, ``x``, ``w`` and the
states are ``[N, D, S]`` tensors: ``S`` times the memory and traffic of the layer's own
``[N, D]`` features. This module computes the same result without them:

* :func:`selective_tree_scan` -- the public operator, its input checks and dispatcher;
* :func:`selective_tree_scan_ref` -- the readable definition (it materialises the
  expansion and scans it level by level in torch, with its own accurate ``"both"``), as
  mamba pairs ``selective_scan_fn`` with ``selective_scan_ref``;
* the custom operators ``torch.ops.treessm.selective_tree_scan`` and
  ``torch.ops.treessm.selective_tree_scan_backward`` (``torch.library``, with fake
  implementations and autograd, so ``torch.compile(fullgraph=True)`` traces through them),
  which run the fused kernels of a backend.

Backends: ``"torch"`` is the reference (any device). ``"numba"`` is the fused CPU kernel
(:mod:`treessm.ops.selective_scan_cpu`; no ``[N, D, S]`` tensor in the forward or the
backward, which recomputes the states). ``"cuda"`` runs the fused kernels of
:mod:`treessm.ops.selective_scan_cuda` for the directions ``"down"`` and ``"up"`` (chains,
causal trees, any forest) without ``state_norm`` and ``d_state`` up to 16; other problems
(``"both"``, the state normalisation) form the expansion in blocks of channels of at most
:data:`EXPANSION_BLOCK_BYTES` per expanded tensor (or :data:`EXPANSION_MIN_ROW_BYTES` per
vertex, where that is more), each recomputed in the backward, so that no expansion of the
whole problem is held: :mod:`treessm.ops.expansion_cuda` forms, reads out and reduces each
block in one pass of its kernels around :func:`treessm.tree_scan`'s CUDA kernels (the
options it does not take, incoming and returned states, and traced calls compose torch
operators block by block, :func:`expanded_in_blocks`, and so does ``d_state`` 1, whose
states are no larger than ``u``). A backend's kernels are one entry of
:data:`FUSED_KERNELS`.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import register_flop_formula

from .._checks import INDEX_TYPES, check_bool, check_choice, check_number
from ..tree import Tree
from ..typing import cuda_extension_available
from . import expansion_cuda, recompute, selective_scan_cpu, selective_scan_cuda
from .plan import TILES_MIN_ROW_BYTES, level_groups
from .sparse import csr_matmul, square_csr
from .tree_scan import DIRECTIONS, tree_scan

__all__ = ["selective_tree_scan", "selective_tree_scan_ref", "reference_tree_scan",
           "edge_steps", "EDGE_STEPS", "SELECTIVE_BACKENDS", "FUSED_KERNELS",
           "EXPANSION_BLOCK_BYTES", "EXPANSION_MIN_ROW_BYTES"]

#: Rules for the step of the edge ``(v, parent(v))``: the child's own step (GrootV, GrootL)
#: or the mean of the steps of the edge's two ends (symmetric: the scan does not depend on
#: the root). A tensor of per-edge steps is accepted too.
EDGE_STEPS = ("child", "mean")
SELECTIVE_BACKENDS = ("torch", "numba", "cuda")
_FLOAT_TYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class FusedKernels(NamedTuple):
    """What a backend provides: ``forward`` and ``backward`` (arguments as in
    :func:`treessm.ops.selective_scan_cpu.forward` and ``backward``, with the tree given
    as ``layout, layout_sizes``; the forward also takes ``keep``, whether a backward will
    follow, and returns a fifth tensor, ``kept``, which the backward takes after ``mu``:
    what the forward leaves it, ``kept_rows(layout_sizes, n, d, d_state)`` rows of
    ``[d, d_state]`` when asked to keep, else none); ``layout(tree, dtype)``, the list of
    tensors and the list of integers that stand for the tree in those calls; ``supports(direction,
    moments, d_state)``, whether the kernels run such a problem (else the expanded path
    does)."""
    forward: Callable
    backward: Callable
    layout: Callable
    supports: Callable
    kept_rows: Callable


def _tree_arrays(tree: Tree, dtype: torch.dtype) -> Tuple[List[Tensor], List[int]]:
    return [tree.parent, tree.order, tree.child_ptr, tree.tree_ptr], []


def _numba_forward(u, dx, de, A, B, C, gamma, h0, srow, snext, layout, layout_sizes, direction,
                   edge_rule, moments, keep):
    out = selective_scan_cpu.forward(u, dx, de, A, B, C, gamma, h0, srow, snext, *layout,
                                     direction, edge_rule, moments)
    return (*out, u.new_empty(0, u.shape[1], A.shape[1]))  # the backward recomputes all


def _numba_backward(gy, gmu, gm2, gstates, u, dx, de, A, B, C, gamma, h0, mu, kept, srow,
                    snext, layout, layout_sizes, *args):
    return selective_scan_cpu.backward(gy, gmu, gm2, gstates, u, dx, de, A, B, C, gamma, h0, mu,
                                       srow, snext, *layout, *args)


#: Fused kernels by backend. The CUDA kernels run the directions ``"down"`` and ``"up"``
#: without ``state_norm`` for ``d_state`` up to 16; other problems on CUDA take the expanded
#: path.
FUSED_KERNELS: Dict[str, FusedKernels] = {
    "numba": FusedKernels(_numba_forward, _numba_backward, _tree_arrays,
                          lambda direction, moments, d_state: True, lambda *sizes: 0),
    "cuda": FusedKernels(selective_scan_cuda.forward, selective_scan_cuda.backward,
                         selective_scan_cuda.layout, selective_scan_cuda.supports,
                         selective_scan_cuda.kept_rows),
}

#: Bytes one expanded ``[N, D', S]`` tensor of a problem without fused kernels may take:
#: wider problems run in blocks of ``D'`` channels, each recomputed in the backward
#: (:class:`treessm.ops.expansion_cuda.ExpandedScan`, or non-reentrant
#: :func:`torch.utils.checkpoint.checkpoint` around torch operators), so the peak memory follows
#: the block, not the layer (a ``TreeSSMConv(64, 64)`` on 10^6 vertices: 128 inner channels
#: of 16 MB each, 4 states in float32, in 8 blocks of 16). Channels are independent, so the
#: values are those of one block; ``state_norm``, which couples all states of a vertex,
#: combines the blocks' moments (:func:`expanded_in_blocks`). Measured there on an H200
#: (the scan, forward / forward+backward ms and peak GiB): 2^27 bytes 35.2 / 121.9 ms, 3.4 /
#: 6.2 GiB; 2^28 28.5 / 93.1 ms, 3.6 / 7.7 GiB; 2^29 31.4 / 99.4 ms, 5.9 / 11.3 GiB; 2^30
#: 28.5 / 89.6 ms, 9.7 / 17.3 GiB.
EXPANSION_BLOCK_BYTES = 1 << 28
#: ... or, where that is more, this many bytes of states per vertex: a block narrower than
#: the rows the CUDA scan kernels take whole (:data:`treessm.ops.plan.TILES_MIN_ROW_BYTES`)
#: leaves their lanes part-empty and pays every scan's fixed costs (its launches, its pass
#: over the tree's plan) once per few channels. ``TreeSSMConv(64, 64)`` on 10^7 vertices
#: went through 128 blocks of one inner channel (16-byte rows) under the byte budget alone.
EXPANSION_MIN_ROW_BYTES = TILES_MIN_ROW_BYTES


# ---------------------------------------------------------------------------- shared pieces
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # states in float32 at least: exp(Δ A) and products of decays along long paths lose
    # everything in half precision
    return torch.float64 if dtype == torch.float64 else torch.float32


_SOFTPLUS_THRESHOLD = 20.0  # torch's softplus: the identity above it


class _Softplus(torch.autograd.Function):
    r""":func:`torch.nn.functional.softplus` keeping only its output for the backward:
    :math:`\mathrm{softplus}'(x) = \sigma(x) = 1 - e^{-\mathrm{softplus}(x)}`, formed as
    ``-expm1(-y)`` (accurate where the derivative is tiny), and 1 where torch's softplus is
    the identity (above its threshold of 20). The scans keep the steps ``y`` for their own
    backward, so the steps before the softplus (an ``[N, D]`` array that torch's softplus
    would keep) are freed after the forward. Taken where :func:`treessm.ops.recompute.keeps_less`
    says so."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = F.softplus(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        slope = -torch.expm1(-y)  # nothing in place: a backward may build its own graph
        if y.dtype == torch.float64:  # in float32 the slope rounds to 1 there by itself
            slope = torch.where(y > _SOFTPLUS_THRESHOLD, torch.ones_like(slope), slope)
        return grad * slope


def _steps(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool,
           dtype: torch.dtype) -> Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)
    if not delta_softplus:
        return delta
    if recompute.keeps_less(delta):  # large steps off the CPU (treessm.ops.recompute)
        return _Softplus.apply(delta)
    return F.softplus(delta)


def edge_steps(delta: Tensor, tree: Tree, rule: str = "child") -> Tensor:
    r"""The step of the edge ``(v, parent(v))``, in row ``v``, from the vertex steps
    ``delta [N, D]``: ``"child"`` is ``delta[v]``; ``"mean"`` is
    :math:`\tfrac12(\Delta_v + \Delta_{p(v)})`. A root's row (used only for an incoming
    state) is its own step under both rules."""
    if rule == "child":
        return delta
    if rule != "mean":
        raise ValueError(f"edge_step must be one of {EDGE_STEPS} or a tensor, got {rule!r}")
    return _MeanEdgeSteps.apply(delta, tree)


def children_sums(values: Tensor, tree: Tree) -> Tensor:
    """Sums of ``values [N, K]`` (floating point) over each vertex's children, each taken
    in one fixed order (the same bits on every run): the product with the sparse matrix of
    the parent-to-child edges (:func:`children_matrix`), where adding the children into
    their parent's row (``index_add_``) would add them in whatever order atomics land on a
    GPU."""
    dtype = values.dtype if values.dtype in (torch.float32, torch.float64) else torch.float32
    return csr_matmul(children_matrix(tree, dtype), values.to(dtype)).to(values.dtype)


def children_matrix(tree: Tree, dtype: torch.dtype) -> Tensor:
    """The ``[N, N]`` sparse CSR matrix with a 1 at ``(parent(v), v)`` for every non-root
    ``v`` (``dtype`` values), built on the tree's device without a host read and cached in
    ``tree.plan_cache``: a row holds its vertex's children, by ascending id."""
    key = ("children", dtype)
    cached = tree.plan_cache.get(key)
    if cached is not None:
        return cached
    n, parent = tree.num_nodes, tree.parent
    edges = n - tree.num_trees
    # the non-roots by parent (roots last, past every row): rows and columns of the edges
    by_parent = torch.sort(torch.where(parent >= 0, parent, n), stable=True)
    crow = torch._convert_indices_from_coo_to_csr(by_parent.values[:edges], n)
    matrix = square_csr(crow, by_parent.indices[:edges],
                        torch.ones(edges, dtype=dtype, device=parent.device), n)
    tree.plan_cache[key] = matrix
    return matrix


class _MeanEdgeSteps(torch.autograd.Function):
    """``edge_steps(delta, tree, "mean")``: the gradient of a step reaches the edge below
    and the edges to its children, whose shares are summed by :func:`children_sums`."""

    @staticmethod
    def forward(ctx, delta: Tensor, tree: Tree) -> Tensor:
        own = torch.arange(tree.num_nodes, device=delta.device)
        parent_or_self = torch.where(tree.parent >= 0, tree.parent, own)
        ctx.tree = tree
        return 0.5 * (delta + delta.index_select(0, parent_or_self))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        tree = ctx.tree
        root = (tree.parent < 0).to(grad.dtype).unsqueeze(1)  # a root's edge is its own step
        return 0.5 * (grad * (1 + root) + children_sums(grad, tree)), None


def _edge_steps(delta, tree, edge_step, delta_bias, delta_softplus, dtype):
    if isinstance(edge_step, Tensor):
        return _steps(edge_step, delta_bias, delta_softplus, dtype)
    return edge_steps(delta, tree, edge_step)


def _norm_affine(norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], state_norm: bool,
                 d: int, s: int, dtype: torch.dtype) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The state normalisation's weight and bias as ``[d, s]`` tensors of ``dtype`` (``None``
    where absent or without ``state_norm``)."""
    def shaped(t):
        return None if t is None or not state_norm else t.reshape(d, s).to(dtype)
    return shaped(norm_weight), shaped(norm_bias)


def _output(y1: Tensor, mu: Tensor, m2: Tensor, C: Tensor, weight: Optional[Tensor],
            bias: Optional[Tensor], u: Tensor, D: Optional[Tensor], state_norm: bool,
            eps: float, dtype: torch.dtype) -> Tensor:
    """The output in ``dtype`` from the read-out ``y1 = sum_s C g h`` (and, with
    ``state_norm``, the states' mean ``mu`` and squared deviations ``m2``), ``C``, ``u``
    and the norm's affine in the accumulation type: the normalised read-out, plus the skip
    ``D u``."""
    skip = None if D is None else D.to(u.dtype)
    if state_norm:
        y1 = torch.ops.treessm.normalised_readout(y1, mu, m2, C, weight, bias, u, skip, eps)
    elif skip is not None:
        y1 = y1 + skip * u
    return y1.to(dtype)


# ---------------------------------------------------------------------------- reference
def _level_layout(tree: Tree):
    """Vertices by breadth-first level, each vertex's rank inside its level and the
    permutation back to vertex order."""
    level_order, level_ptr = level_groups(tree)
    levels = [level_order[level_ptr[k]:level_ptr[k + 1]] for k in range(len(level_ptr) - 1)]
    n = tree.num_nodes
    rank = torch.empty(n, dtype=torch.long, device=tree.device)
    back = torch.empty(n, dtype=torch.long, device=tree.device)
    for idx in levels:
        rank[idx] = torch.arange(idx.shape[0], device=tree.device)
    back[level_order] = torch.arange(n, device=tree.device)
    return levels, rank, back


def _exclusive_run_sums(a: Tensor, run: Tensor) -> Tensor:
    """Sum of ``a`` over the earlier rows of each row's run of equal ``run`` values
    (contiguous runs), by doubling: no sum is ever formed as a total minus a part."""
    m = a.shape[0]
    ones = (-1,) + (1,) * (a.dim() - 1)
    longest = int(torch.unique_consecutive(run, return_counts=True)[1].max()) if m else 0
    inc, step = a, 1
    while step < longest:  # inc[i] = sum over the last min(2 * step, run) rows up to i
        same = (run[step:] == run[:-step]).view(ones)
        inc = torch.cat([inc[:step], inc[step:] + torch.where(same, inc[:-step], 0)])
        step *= 2
    follows = torch.zeros(m, dtype=torch.bool, device=a.device)
    follows[1:] = run[1:] == run[:-1]
    shifted = torch.cat([torch.zeros_like(a[:1]), inc[:-1]])
    return torch.where(follows.view(ones), shifted, 0)


def reference_tree_scan(x: Tensor, weight: Tensor, tree: Tree, direction: str = "both"
                        ) -> Tensor:
    r"""The tree scan of ``docs/concepts.md`` in plain torch, level by level (any device,
    differentiable by autograd): ``up``, ``down``, and ``both = up + out`` with

    .. math::
        \mathrm{out}_v = w_v \Big(\mathrm{out}_{p} + x_{p}
            + \sum_{s \in \mathrm{siblings}(v)} w_s\, \mathrm{up}_s\Big), \qquad
        \mathrm{out}_{\mathrm{root}} = 0,

    the sibling sums formed from prefix and suffix sums over the parent's children.

    Shapes:
        - **input:** x :math:`(N, *)`, weight :math:`(N, *)`
        - **output:** :math:`(N, *)`
    """
    if tree.num_nodes == 0:
        return x + 0 * weight
    levels, rank, back = _level_layout(tree)
    xs = [x[idx] for idx in levels]
    ws = [weight[idx] for idx in levels]
    par = [None] + [rank[tree.parent[idx]] for idx in levels[1:]]  # parent's rank above
    depth = len(levels)
    if direction == "down":
        h = [xs[0]]
        for k in range(1, depth):
            h.append(xs[k] + ws[k] * h[k - 1][par[k]])
        return torch.cat(h)[back]
    up = [None] * depth
    up[-1] = xs[-1]
    for k in range(depth - 2, -1, -1):  # each vertex adds its children in order
        up[k] = xs[k].index_add(0, par[k + 1], ws[k + 1] * up[k + 1])
    if direction == "up":
        return torch.cat(up)[back]
    out = [torch.zeros_like(up[0])]
    for k in range(1, depth):
        a = ws[k] * up[k]
        siblings = (_exclusive_run_sums(a, par[k])
                    + _exclusive_run_sums(a.flip(0), par[k].flip(0)).flip(0))
        out.append(ws[k] * ((out[k - 1][par[k]] + xs[k - 1][par[k]]) + siblings))
    return torch.cat([u + o for u, o in zip(up, out)])[back]


def selective_tree_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                            tree: Tree, D: Optional[Tensor] = None,
                            delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                            direction: str = "both", edge_step: Union[str, Tensor] = "child",
                            *, initial_state: Optional[Tensor] = None,
                            state_vertices: Optional[Tensor] = None, state_norm: bool = False,
                            norm_weight: Optional[Tensor] = None,
                            norm_bias: Optional[Tensor] = None, norm_eps: float = 1e-5,
                            scan: Optional[Callable] = None):
    """The definition of :func:`selective_tree_scan` (same arguments), written out with the
    state expansion materialised; ``scan(x, weight, tree, direction)`` is the tree scan it
    runs over the expanded tensors (default: :func:`reference_tree_scan`).

    Args:
        u, delta, A, B, C, tree: as :func:`selective_tree_scan`, and so are the others.
        scan (callable, optional): the tree scan of the expanded tensors. (default: the
            torch reference)

    Shapes:
        as :func:`selective_tree_scan`; the expansion :math:`(N, D, S)` is held in memory.

    Returns:
        as :func:`selective_tree_scan`.

    Raises:
        as :func:`selective_tree_scan` for arguments it reads; it checks less, being the
        readable reference the fused op is tested against.

    Example:
        >>> tree = Tree.from_parent([-1, 0, 1])
        >>> u, delta = torch.randn(3, 4), torch.rand(3, 4)
        >>> A, B, C = -torch.rand(4, 2), torch.randn(3, 2), torch.randn(3, 2)
        >>> y = selective_tree_scan_ref(u, delta, A, B, C, tree)
        >>> torch.allclose(y, selective_tree_scan(u, delta, A, B, C, tree), atol=1e-5)
        True
    """
    acc = _compute_dtype(u.dtype)
    uc = u.to(acc)
    h = _expanded_states(u, delta, A, B, tree, delta_bias, delta_softplus, direction, edge_step,
                         initial_state, scan)
    states = None if state_vertices is None else h[state_vertices]
    if state_norm:
        n, d, s = h.shape
        weight = None if norm_weight is None else norm_weight.reshape(d * s).to(acc)
        bias = None if norm_bias is None else norm_bias.reshape(d * s).to(acc)
        h = F.layer_norm(h.reshape(n, d * s), (d * s,), weight, bias, norm_eps).view(n, d, s)
    y = (h * C.to(acc)[:, None, :]).sum(-1)
    if D is not None:
        y = y + D.to(acc) * uc
    y = y.to(u.dtype)
    return y if state_vertices is None else (y, states)


def _expanded_states(u, delta, A, B, tree, delta_bias, delta_softplus, direction, edge_step,
                     initial_state, scan) -> Tensor:
    """The states ``h [N, D, S]`` of :func:`selective_tree_scan_ref`, from the expansion."""
    acc = _compute_dtype(u.dtype)
    delta = _steps(delta, delta_bias, delta_softplus, acc)
    edge = _edge_steps(delta, tree, edge_step, delta_bias, delta_softplus, acc)
    x = (delta * u.to(acc))[:, :, None] * B.to(acc)[:, None, :]  # [N, D, S], one pass
    w = torch.exp(edge[:, :, None] * A.to(acc))                  # [N, D, S]
    if initial_state is not None:  # enters each root through the root's own edge
        roots = tree.roots
        x = x.index_add(0, roots, w[roots] * initial_state.to(acc))
    return (scan or reference_tree_scan)(x, w, tree, direction)


# ---------------------------------------------------------------------------- custom ops
def _kernels(backend: str) -> FusedKernels:
    return FUSED_KERNELS[backend]


@torch.library.custom_op("treessm::selective_tree_scan", mutates_args=())
def _fused_op(u: Tensor, dx: Tensor, de: Optional[Tensor], A: Tensor, B: Tensor, C: Tensor,
              gamma: Optional[Tensor], h0: Optional[Tensor], srow: Tensor, snext: Tensor,
              layout: List[Tensor], layout_sizes: List[int], direction: str, edge_rule: str,
              moments: bool, backend: str, keep: bool
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _kernels(backend).forward(u, dx, de, A, B, C, gamma, h0, srow, snext, layout,
                                     layout_sizes, direction, edge_rule, moments, keep)


@_fused_op.register_fake
def _(u, dx, de, A, B, C, gamma, h0, srow, snext, layout, layout_sizes, direction, edge_rule,
      moments, backend, keep):
    n, d = u.shape
    s = A.shape[1]
    stat = n if moments else 0
    kept = _kernels(backend).kept_rows(layout_sizes, n, d, s) if keep else 0
    return (u.new_empty(n, d), u.new_empty(stat), u.new_empty(stat),
            u.new_empty(snext.shape[0], d, s), u.new_empty(kept, d, s))


@torch.library.custom_op("treessm::selective_tree_scan_backward", mutates_args=())
def _fused_backward_op(gy: Tensor, gmu: Tensor, gm2: Tensor, gstates: Tensor, u: Tensor,
                       dx: Tensor, de: Optional[Tensor], A: Tensor, B: Tensor, C: Tensor,
                       gamma: Optional[Tensor], h0: Optional[Tensor], mu: Tensor,
                       kept: Tensor, srow: Tensor, snext: Tensor, layout: List[Tensor],
                       layout_sizes: List[int], direction: str, edge_rule: str, moments: bool,
                       backend: str) -> List[Tensor]:
    grads = _kernels(backend).backward(gy, gmu, gm2, gstates, u, dx, de, A, B, C, gamma, h0, mu,
                                       kept, srow, snext, layout, layout_sizes, direction,
                                       edge_rule, moments)
    return [u.new_empty(0) if g is None else g for g in grads]


@_fused_backward_op.register_fake
def _(gy, gmu, gm2, gstates, u, dx, de, A, B, C, gamma, h0, mu, kept, srow, snext, layout,
      layout_sizes, direction, edge_rule, moments, backend):
    like = lambda t: u.new_empty(0) if t is None else torch.empty_like(t)  # noqa: E731
    return [like(u), like(dx), like(de), like(A), like(B), like(C), like(gamma), like(h0)]


def _setup_context(ctx, inputs, output):
    (u, dx, de, A, B, C, gamma, h0, srow, snext, layout, layout_sizes, direction, edge_rule,
     moments, backend, keep) = inputs
    ctx.save_for_backward(u, dx, de, A, B, C, gamma, h0, output[1], output[4], srow, snext,
                          *layout)
    ctx.args = (layout_sizes, direction, edge_rule, moments, backend)


def _backward(ctx, gy, gmu, gm2, gstates, gkept):
    (u, dx, de, A, B, C, gamma, h0, mu, kept, srow, snext, *layout) = ctx.saved_tensors
    gu, gdx, gde, gA, gB, gC, gg, gh0 = torch.ops.treessm.selective_tree_scan_backward(
        gy, gmu, gm2, gstates, u, dx, de, A, B, C, gamma, h0, mu, kept, srow, snext, layout,
        *ctx.args)
    present = lambda t, g: None if t is None else g  # noqa: E731
    # custom ops take a list holding anything but tensors as one input, unless it is empty
    sizes = None if ctx.args[0] else []
    return (gu, gdx, present(de, gde), gA, gB, gC, present(gamma, gg), present(h0, gh0),
            None, None, [None] * len(layout), sizes, None, None, None, None, None)


_fused_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- fused path
def _state_rows(state_vertices: Optional[Tensor], n: int, device) -> Tuple[Tensor, Tensor]:
    """``srow [N]``: the first row of ``state_vertices`` naming each vertex (-1: none);
    ``snext [K]``: the next row naming the same vertex (-1: none)."""
    if state_vertices is None:
        return (torch.full((n,), -1, dtype=torch.long, device=device),
                torch.zeros(0, dtype=torch.long, device=device))
    sv = state_vertices.long()
    k = sv.shape[0]
    rows = torch.arange(k, device=device)
    first = torch.full((n,), k, dtype=torch.long, device=device).scatter_reduce(
        0, sv, rows, "amin")
    srow = torch.where(first == k, -1, first)
    ordered, perm = torch.sort(sv, stable=True)
    snext = torch.full((k,), -1, dtype=torch.long, device=device)
    if k > 1:
        same = ordered[1:] == ordered[:-1]
        snext = snext.index_put((perm[:-1],), torch.where(same, perm[1:], -1))
    return srow, snext


def _readout_reference(y1: Tensor, mu: Tensor, m2: Tensor, C: Tensor,
                       weight: Optional[Tensor], bias: Optional[Tensor], u: Tensor,
                       D: Optional[Tensor], eps: float) -> Tensor:
    r""":math:`\sum_s C_s\, \mathrm{LN}(h)_{d,s} + D_d u_d` from ``y1 = sum_s C g h`` and the
    vertex's mean ``mu`` and sum of squared deviations ``m2`` over all its ``D * S``
    states: :math:`\mathrm{rstd}\,(y_1 - \mu \sum_s C_s g_{d,s}) + \sum_s C_s b_{d,s} +
    D_d u_d`."""
    d, s = y1.shape[1], C.shape[1]
    rstd = torch.rsqrt(m2 / (d * s) + eps).unsqueeze(1)
    cg = C @ weight.t() if weight is not None else C.sum(1, keepdim=True)
    y = rstd * (y1 - mu.unsqueeze(1) * cg)
    if bias is not None:
        y = y + C @ bias.t()
    return y if D is None else y + D * u


@torch.library.custom_op("treessm::normalised_readout", mutates_args=())
def _readout_op(y1: Tensor, mu: Tensor, m2: Tensor, C: Tensor, weight: Optional[Tensor],
                bias: Optional[Tensor], u: Tensor, D: Optional[Tensor], eps: float) -> Tensor:
    if y1.device.type == "cpu":  # one pass over the rows, no [N, D] temporaries
        return selective_scan_cpu.normalised_readout(y1, mu, m2, C, weight, bias, u, D, eps)
    return _readout_reference(y1, mu, m2, C, weight, bias, u, D, eps)


@_readout_op.register_fake
def _(y1, mu, m2, C, weight, bias, u, D, eps):
    return torch.empty_like(y1)


def _readout_setup_context(ctx, inputs, output):
    y1, mu, m2, C, weight, bias, u, D, eps = inputs
    ctx.save_for_backward(y1, mu, m2, C, weight, bias, u, D)
    ctx.eps = eps


def _readout_backward(ctx, gy):
    # the derivative of _readout_reference, written out (autograd would keep its
    # temporaries alive from the forward); on the CPU in one pass over the rows
    y1, mu, m2, C, weight, bias, u, D = ctx.saved_tensors
    if y1.device.type == "cpu":
        g = torch.ops.treessm.normalised_readout_backward(gy.contiguous(), y1, mu, m2, C,
                                                          weight, bias, u, D, ctx.eps)
        present = lambda t, grad: None if t is None else grad  # noqa: E731
        return (g[0], g[1], g[2], g[3], present(weight, g[4]), present(bias, g[5]),
                present(D, g[6]), present(D, g[7]), None)
    return _readout_backward_reference(gy, y1, mu, m2, C, weight, bias, u, D, ctx.eps) + (None,)


def _readout_backward_reference(gy, y1, mu, m2, C, weight, bias, u, D, eps):
    """Gradients of :func:`_readout_reference` for ``y1, mu, m2, C, weight, bias, u, D``
    (``None`` for absent arguments), in torch."""
    d, s = y1.shape[1], C.shape[1]
    rstd = torch.rsqrt(m2 / (d * s) + eps)
    cg = C @ weight.t() if weight is not None else C.sum(1, keepdim=True)
    g_y1 = gy * rstd.unsqueeze(1)
    g_rstd = (gy * (y1 - mu.unsqueeze(1) * cg)).sum(1)
    g_m2 = g_rstd * (-0.5 / (d * s)) * rstd ** 3
    g_mu = -(g_y1 * cg).sum(1)
    g_cg = g_y1 * -mu.unsqueeze(1)
    if weight is not None:
        g_C, g_w = g_cg @ weight, g_cg.t() @ C
    else:
        g_C, g_w = g_cg.sum(1, keepdim=True).expand(-1, s), None
    g_b = None
    if bias is not None:
        g_C = g_C + gy @ bias
        g_b = gy.t() @ C
    g_u = g_D = None
    if D is not None:
        g_u, g_D = gy * D, (gy * u).sum(0)
    return g_y1, g_mu, g_m2, g_C, g_w, g_b, g_u, g_D


_readout_op.register_autograd(_readout_backward, setup_context=_readout_setup_context)


def _readout_products(C_shape, weight_shape, bias_shape) -> int:
    # the [N, S] x [S, D] products with the weight and the bias, as FlopCounterMode counts a
    # matrix product (two per multiply-accumulate)
    n, s = C_shape
    return sum(2 * n * s * p[0] for p in (weight_shape, bias_shape) if p is not None)


@register_flop_formula(torch.ops.treessm.normalised_readout)
def _(y1_shape, mu_shape, m2_shape, C_shape, weight_shape, bias_shape, *args, **kwargs) -> int:
    return _readout_products(C_shape, weight_shape, bias_shape)


@torch.library.custom_op("treessm::normalised_readout_backward", mutates_args=())
def _readout_backward_op(gy: Tensor, y1: Tensor, mu: Tensor, m2: Tensor, C: Tensor,
                         weight: Optional[Tensor], bias: Optional[Tensor], u: Tensor,
                         D: Optional[Tensor], eps: float) -> List[Tensor]:
    grads = selective_scan_cpu.normalised_readout_backward(gy, y1, mu, m2, C, weight, bias, u,
                                                           D, eps)
    return [u.new_empty(0) if g is None else g for g in grads]


@register_flop_formula(torch.ops.treessm.normalised_readout_backward)
def _(gy_shape, y1_shape, mu_shape, m2_shape, C_shape, weight_shape, bias_shape, *args,
      **kwargs) -> int:
    return 2 * _readout_products(C_shape, weight_shape, bias_shape)  # data and parameters


@_readout_backward_op.register_fake
def _(gy, y1, mu, m2, C, weight, bias, u, D, eps):
    like = lambda t: u.new_empty(0) if t is None else torch.empty_like(t)  # noqa: E731
    return [like(y1), like(mu), like(m2), like(C), like(weight), like(bias),
            like(u) if D is not None else u.new_empty(0), like(D)]


def _fused(u, delta, A, B, C, tree, D, delta_bias, delta_softplus, direction, edge_step, *,
           initial_state, state_vertices, state_norm, norm_weight, norm_bias, norm_eps,
           backend):
    acc = _compute_dtype(u.dtype)
    n, d = u.shape
    s = A.shape[1]
    uc = u.to(acc)
    dx = _steps(delta, delta_bias, delta_softplus, acc)
    if isinstance(edge_step, Tensor):
        rule, de = "given", _steps(edge_step, delta_bias, delta_softplus, acc)
    else:
        rule, de = edge_step, None
    weight, bias = _norm_affine(norm_weight, norm_bias, state_norm, d, s, acc)
    h0 = None if initial_state is None else initial_state.to(acc)
    srow, snext = _state_rows(state_vertices, n, u.device)
    Cc = C.to(acc)
    layout, layout_sizes = _kernels(backend).layout(tree, acc)
    inputs = (uc, dx, de, A.to(acc), B.to(acc), Cc, weight, h0)
    # a backward will follow: the forward may leave it what it would otherwise recompute
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    y, mu, m2, states, _ = torch.ops.treessm.selective_tree_scan(
        *inputs, srow, snext, layout, layout_sizes, direction, rule, state_norm, backend, keep)
    y = _output(y, mu, m2, Cc, weight, bias, uc, D, state_norm, norm_eps, u.dtype)
    return y if state_vertices is None else (y, states)


# ---------------------------------------------------------------------------- public API
def _tensor(value, name: str, dims: int, floating: bool = True) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    if value.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {list(value.shape)}")
    if floating and value.dtype not in _FLOAT_TYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float64, bfloat16 "
                        f"or float16), got {value.dtype}")


def _shape(value: Tensor, name: str, shape: Tuple[int, ...], what: str) -> None:
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)} ({what}), got "
                         f"{list(value.shape)}")


def _check_inputs(u, delta, A, B, C, tree, D, delta_bias, delta_softplus, direction, edge_step,
                  initial_state, state_vertices, state_norm, norm_weight, norm_bias,
                  norm_eps) -> None:
    _tensor(u, "u", 2)
    n, d = u.shape
    _tensor(delta, "delta", 2)
    _shape(delta, "delta", (n, d), "one step per vertex and channel, like u")
    _tensor(A, "A", 2)
    if A.shape[0] != d:
        raise ValueError(f"A must have shape [{d}, d_state] (one row per channel of u), got "
                         f"{list(A.shape)}")
    s = A.shape[1]
    _tensor(B, "B", 2)
    _shape(B, "B", (n, s), "one row per vertex, d_state columns like A")
    _tensor(C, "C", 2)
    _shape(C, "C", (n, s), "one row per vertex, d_state columns like A")
    if not isinstance(tree, Tree):
        raise TypeError(f"tree must be a treessm.Tree, got {type(tree).__name__}")
    if tree.num_nodes != n:
        raise ValueError(f"u must have one row per tree vertex ({tree.num_nodes}), got {n}")
    for name, value in (("D", D), ("delta_bias", delta_bias)):
        if value is not None:
            _tensor(value, name, 1)
            _shape(value, name, (d,), "one entry per channel of u")
    check_choice(direction, "direction", DIRECTIONS)
    check_bool(delta_softplus, "delta_softplus")
    check_bool(state_norm, "state_norm")
    check_number(norm_eps, "norm_eps", 0, low_open=True)
    if isinstance(edge_step, Tensor):
        _tensor(edge_step, "edge_step", 2)
        _shape(edge_step, "edge_step", (n, d), "the step of each vertex's edge to its parent")
    elif not isinstance(edge_step, str) or edge_step not in EDGE_STEPS:
        raise ValueError(f"edge_step must be one of {EDGE_STEPS} or a tensor of edge steps, "
                         f"got {edge_step!r}")
    if initial_state is not None:
        if direction != "down":
            raise ValueError(f"initial_state enters the roots of a 'down' scan; direction is "
                             f"{direction!r}")
        _tensor(initial_state, "initial_state", 3)
        _shape(initial_state, "initial_state", (tree.num_trees, d, s),
               "one state per tree, in the order of tree.tree_ptr")
    if state_vertices is not None:
        _tensor(state_vertices, "state_vertices", 1, floating=False)
        if state_vertices.dtype not in INDEX_TYPES:
            raise TypeError(f"state_vertices must be an integer tensor, got "
                            f"{state_vertices.dtype}")
    for name, value in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if value is None:
            continue
        if not state_norm:
            raise ValueError(f"{name} is used only with state_norm=True")
        if not isinstance(value, Tensor) or value.numel() != d * s or value.dim() not in (1, 2):
            got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must have shape [{d}, {s}] or [{d * s}] (one entry per "
                             f"state of a vertex), got {got}")
        if value.dim() == 2 and tuple(value.shape) != (d, s):
            raise ValueError(f"{name} must have shape [{d}, {s}] or [{d * s}], got "
                             f"{list(value.shape)}")
        if value.dtype not in _FLOAT_TYPES:
            raise TypeError(f"{name} must be a floating-point tensor (float32, float64, "
                            f"bfloat16 or float16), got {value.dtype}")
    for name, value in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D),
                        ("delta_bias", delta_bias), ("initial_state", initial_state),
                        ("state_vertices", state_vertices), ("norm_weight", norm_weight),
                        ("norm_bias", norm_bias),
                        ("edge_step", edge_step if isinstance(edge_step, Tensor) else None)):
        if value is not None and value.device != u.device:
            raise ValueError(f"{name} must be on the device of u ({u.device}), got "
                             f"{value.device}")
    if tree.device != u.device:
        raise ValueError(f"tree must be on the device of u ({u.device}), got {tree.device}; "
                         "use tree.to(u.device)")
    # ids are read on the host, once every tensor is known to be where it belongs (the
    # values of meta tensors and of tensors being traced are unknown)
    if (state_vertices is not None and state_vertices.numel()
            and state_vertices.device.type != "meta" and not torch.compiler.is_compiling()):
        low, high = (int(v) for v in torch.stack([state_vertices.min(), state_vertices.max()]))
        if low < 0 or high >= n:
            raise ValueError(f"state_vertices must hold vertex ids in [0, {n}), got values in "
                             f"[{low}, {high}]")


def _resolve_backend(backend: Optional[str], device: torch.device) -> str:
    if backend is None or backend == "auto":
        return {"cpu": "numba", "cuda": "cuda"}.get(device.type, "torch")
    if backend not in SELECTIVE_BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + SELECTIVE_BACKENDS}, got "
                         f"{backend!r}")
    if backend == "numba" and device.type != "cpu":
        raise ValueError(f"backend 'numba' runs on CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' runs on CUDA tensors, got tensors on {device}")
    return backend


def selective_tree_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, tree: Tree,
                        D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                        delta_softplus: bool = False, direction: str = "both",
                        edge_step: Union[str, Tensor] = "child", *,
                        initial_state: Optional[Tensor] = None,
                        state_vertices: Optional[Tensor] = None, state_norm: bool = False,
                        norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None,
                        norm_eps: float = 1e-5, backend: Optional[str] = None
                        ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    r"""Mamba's selective scan over a tree, without materialising the state expansion
    (``docs/concepts.md``, "The selective tree scan").

    With the steps :math:`\Delta = \mathrm{softplus}(\delta + b_\Delta)` (or
    :math:`\delta + b_\Delta` without ``delta_softplus``), per vertex :math:`v`, channel
    :math:`d` and state :math:`s`:

    .. math::
        x_{v,d,s} = \Delta_{v,d}\, B_{v,s}\, u_{v,d}, \qquad
        w_{v,d,s} = \exp(\Delta^{e}_{v,d} A_{d,s}), \qquad
        h_{\cdot,d,s} = \mathrm{scan}(x_{\cdot,d,s}, w_{\cdot,d,s})

        y_{v,d} = \sum_s C_{v,s}\, h_{v,d,s} + D_d\, u_{v,d}

    where :math:`\mathrm{scan}` is :func:`treessm.tree_scan` in ``direction`` and
    :math:`\Delta^{e}_v` the step of the edge :math:`(v, \mathrm{parent}(v))`
    (``edge_step``). With ``state_norm`` the states of each vertex are first normalised
    together, :math:`h_v \leftarrow \mathrm{LayerNorm}_{D \cdot S}(h_v)` with the affine
    ``norm_weight``, ``norm_bias``: TreeSSM's normalisation of the scan output.

    Args:
        u (Tensor): inputs :math:`(N, D)`.
        delta (Tensor): steps before bias and softplus, :math:`(N, D)`.
        A (Tensor): state matrix :math:`(D, S)` (negative for decays).
        B (Tensor): input projection per vertex :math:`(N, S)`.
        C (Tensor): output projection per vertex :math:`(N, S)`.
        tree (Tree): forest over the :math:`N` vertices, on the device of ``u``.
        D (Tensor, optional): skip :math:`(D)`. (default: ``None``)
        delta_bias (Tensor, optional): added to ``delta`` :math:`(D)`. (default: ``None``)
        delta_softplus (bool): apply softplus to the steps. (default: ``False``)
        direction (str): ``"both"``, ``"up"`` or ``"down"``. (default: ``"both"``)
        edge_step (str or Tensor): the step of edge :math:`(v, p(v))`: ``"child"``
            (:math:`\Delta_v`, GrootV, GrootL), ``"mean"``
            (:math:`\frac12(\Delta_v + \Delta_{p(v)})`, symmetric, TreeSSMConv) or a tensor
            :math:`(N, D)` of edge steps in the form of ``delta`` (bias and softplus
            applied alike). (default: ``"child"``)
        initial_state (Tensor, optional): ``direction="down"`` only: a state
            :math:`(T, D, S)` per tree (in the order of ``tree.tree_ptr``) that enters its
            root through the root's own edge step, :math:`h_r = x_r + w_r h^0`: a chain
            continued from a cached state. (default: ``None``)
        state_vertices (LongTensor, optional): vertices :math:`(K)` whose states
            :math:`h` (before ``state_norm``) are returned too. (default: ``None``)
        state_norm (bool): normalise each vertex's :math:`D \cdot S` states before the
            read-out. (default: ``False``)
        norm_weight (Tensor, optional), norm_bias (Tensor, optional): affine of the state
            normalisation, :math:`(D, S)` or :math:`(D \cdot S)`. (default: ``None``)
        norm_eps (float): added to the variance. (default: ``1e-5``)
        backend (str, optional): ``"numba"`` (fused, CPU; the default there), ``"torch"``
            (the reference, any device) or ``"cuda"`` (the default on CUDA tensors: fused
            for ``"down"`` and ``"up"`` without ``state_norm`` and ``d_state`` up to 16;
            otherwise the expansion is formed by kernels and scanned by
            :func:`treessm.tree_scan`'s CUDA kernels, in blocks of channels of at most
            :data:`EXPANSION_BLOCK_BYTES` each, or :data:`EXPANSION_MIN_ROW_BYTES` per
            vertex where that is more).
            (default: ``None``)

    Returns:
        ``y`` :math:`(N, D)` in the dtype of ``u``; with ``state_vertices`` the pair
        ``(y, states)``, states :math:`(K, D, S)` in float32 (float64 for float64 ``u``).
        Computation runs in float32 for 16-bit inputs. Gradients flow to every tensor
        argument (``u``, ``delta``, ``A``, ``B``, ``C``, ``D``, ``delta_bias``, an
        ``edge_step`` tensor, ``initial_state``, the norm's affine) and from ``states``.

    Raises:
        TypeError, ValueError: on arguments of the wrong type, shape, device or range; the
            message names the argument.

    Shapes:
        - **input:** u, delta :math:`(N, D)`; A :math:`(D, S)`; B, C :math:`(N, S)`
        - **output:** :math:`(N, D)`, and :math:`(K, D, S)` with ``state_vertices``

    Example:
        >>> import torch, treessm
        >>> tree = treessm.Tree.from_parent(torch.tensor([-1, 0, 0, 1]))
        >>> u, delta = torch.randn(4, 8), torch.randn(4, 8)
        >>> A = -torch.rand(8, 2)
        >>> B, C = torch.randn(4, 2), torch.randn(4, 2)
        >>> y = treessm.selective_tree_scan(u, delta, A, B, C, tree, delta_softplus=True)
        >>> y.shape
        torch.Size([4, 8])
    """
    _check_inputs(u, delta, A, B, C, tree, D, delta_bias, delta_softplus, direction, edge_step,
                  initial_state, state_vertices, state_norm, norm_weight, norm_bias, norm_eps)
    backend = _resolve_backend(backend, u.device)
    if state_vertices is not None:  # ids of any integer type (uint8 too: ids, not a mask)
        state_vertices = state_vertices.long()
    if state_norm and u.shape[1] * A.shape[1] == 0:
        # no state to normalise: the read-out of no states is zero, with or without the norm
        state_norm, norm_weight, norm_bias = False, None, None
    args = (u, delta, A, B, C, tree, D, delta_bias, delta_softplus, direction, edge_step)
    options = dict(initial_state=initial_state, state_vertices=state_vertices,
                   state_norm=state_norm, norm_weight=norm_weight, norm_bias=norm_bias,
                   norm_eps=norm_eps)
    if backend == "torch":
        return selective_tree_scan_ref(*args, **options)
    if not FUSED_KERNELS[backend].supports(direction, state_norm, A.shape[1]):
        # the expansion through tree_scan's kernels
        budget = max(EXPANSION_BLOCK_BYTES, u.shape[0] * EXPANSION_MIN_ROW_BYTES)
        # the expansion kernels, eagerly (a traced call composes torch operators, which
        # dynamo follows), for the options they take and more than one state a channel
        # (with one, the states are no larger than u and torch's broadcasts, whose autograd
        # keeps them for the backward, ran GrootV-T's training faster: docs/cuda.md)
        if (initial_state is None and state_vertices is None and A.shape[1] > 1
                and cuda_extension_available() and not torch.compiler.is_compiling()
                and expansion_cuda.block_width(1, A.shape[1], _compute_dtype(u.dtype))):
            return _expanded_kernels(*args, **options, block_bytes=budget)
        return expanded_in_blocks(*args, **options, block_bytes=budget,
                                  scan=functools.partial(tree_scan, backend=None))
    return _fused(*args, **options, backend=backend)


def _expanded_kernels(u, delta, A, B, C, tree, D, delta_bias, delta_softplus, direction,
                      edge_step, *, state_norm, norm_weight, norm_bias, norm_eps, block_bytes,
                      **unused):
    """:func:`selective_tree_scan` on CUDA through :class:`treessm.ops.expansion_cuda.
    ExpandedScan` (blocks of channels of at most ``block_bytes`` per expanded tensor)."""
    acc = _compute_dtype(u.dtype)
    n, d = u.shape
    s = A.shape[1]
    dx = _steps(delta, delta_bias, delta_softplus, acc)
    de = _edge_steps(dx, tree, edge_step, delta_bias, delta_softplus, acc)
    item = torch.empty((), dtype=acc).element_size()
    width = expansion_cuda.block_width(max(1, block_bytes // max(1, n * s * item)), s, acc)
    weight, bias = _norm_affine(norm_weight, norm_bias, state_norm, d, s, acc)
    uc, Cc = u.to(acc).contiguous(), C.to(acc).contiguous()
    y1, mu, m2 = expansion_cuda.ExpandedScan.apply(
        uc, dx.contiguous(), de.contiguous(), A.to(acc).contiguous(), B.to(acc).contiguous(),
        Cc, None if weight is None else weight.contiguous(), tree, direction, width, state_norm)
    return _output(y1, mu, m2, Cc, weight, bias, uc, D, state_norm, norm_eps, u.dtype)


def expanded_in_blocks(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, tree: Tree,
                       D: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                       direction: str, edge_step: Union[str, Tensor], *, scan: Callable,
                       block_bytes: int = EXPANSION_BLOCK_BYTES, **options):
    """:func:`selective_tree_scan_ref` with ``scan``, over blocks of channels whose expanded
    tensors take at most ``block_bytes`` each (see :data:`EXPANSION_BLOCK_BYTES`); the
    arguments are :func:`selective_tree_scan`'s, checked. With ``state_norm`` each block
    returns its read-out before normalisation and the mean and squared deviations of its
    states; the blocks' moments are combined in order (Chan's formula) and the normalised
    read-out is formed from them, as the fused kernels do."""
    n, d = u.shape
    s = A.shape[1]
    acc = _compute_dtype(u.dtype)
    item = torch.empty((), dtype=acc).element_size()
    width = max(1, block_bytes // max(1, n * s * item))
    if width >= d:
        return selective_tree_scan_ref(u, delta, A, B, C, tree, D, delta_bias, delta_softplus,
                                       direction, edge_step, scan=scan, **options)
    edge_tensor = edge_step if isinstance(edge_step, Tensor) else None
    initial = options.get("initial_state")
    vertices = options.get("state_vertices")
    norm = options.get("state_norm", False)
    weight, bias = _norm_affine(options.get("norm_weight"), options.get("norm_bias"), norm, d, s,
                                acc)
    Cc = C.to(acc)

    def block(u_, delta_, A_, D_, bias_, edge_, init_, g_, B_, C_):
        if not norm:
            return selective_tree_scan_ref(
                u_, delta_, A_, B_, C_, tree, D_, bias_, delta_softplus, direction,
                edge_ if edge_ is not None else edge_step, initial_state=init_,
                state_vertices=vertices, scan=scan)
        h = _expanded_states(u_, delta_, A_, B_, tree, bias_, delta_softplus, direction,
                             edge_ if edge_ is not None else edge_step, init_, scan)
        flat = h.reshape(n, -1)
        var, mean = torch.var_mean(flat, 1, correction=0)  # one pass over the states
        m2 = var * flat.shape[1]
        read = C_[:, None, :] if g_ is None else C_[:, None, :] * g_
        y1 = (h * read).sum(-1)
        states = h[vertices] if vertices is not None else h.new_zeros(0)
        return y1, mean, m2, states

    def part(t, sl, dim=0):
        return None if t is None else t.narrow(dim, sl.start, sl.stop - sl.start)

    outs = []
    for c0 in range(0, d, width):
        sl = slice(c0, min(d, c0 + width))
        outs.append(checkpoint(block, part(u, sl, 1), part(delta, sl, 1), part(A, sl),
                               part(D, sl), part(delta_bias, sl), part(edge_tensor, sl, 1),
                               part(initial, sl, 1), part(weight, sl), B, Cc,
                               use_reentrant=False))
    if not norm:
        if vertices is None:
            return torch.cat(outs, 1)
        return torch.cat([o[0] for o in outs], 1), torch.cat([o[1] for o in outs], 1)
    # the blocks' moments, combined in order: mean of the means weighted by the blocks'
    # sizes, squared deviations within blocks plus those of the block means
    sizes = [(min(d, c0 + width) - c0) * s for c0 in range(0, d, width)]
    mu, m2 = expansion_cuda.combined_moments([(k, o[1], o[2]) for o, k in zip(outs, sizes)],
                                             d * s)
    y1 = torch.cat([o[0] for o in outs], 1)
    y = _output(y1, mu, m2, Cc, weight, bias, u.to(acc), D, True, options.get("norm_eps", 1e-5),
                u.dtype)
    if vertices is None:
        return y
    return y, torch.cat([o[3] for o in outs], 1)
