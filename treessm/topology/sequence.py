"""Token sequences: chains, minimum spanning trees of a chain with short skip edges, and
causal trees.

Vertex ``b*L + t`` is token ``t`` of sequence ``b``. Three ways to make a tree over a
sequence, one class each:

* :class:`SequenceTopology` -- the minimum spanning tree of the chain and the skip edges
  up to ``window`` tokens long, rooted at the first token. Its candidate edges form one
  contiguous block per sequence: the chain ``(t, t+1)`` for all ``t``, then the skips
  ``(t, t+2)``, ..., ``(t, t+window)``, each by ascending ``t``. With ``window = 1`` the
  tree is the chain itself (:func:`chain_tree`) and a ``"down"`` scan is Mamba's
  recurrence.
* :class:`GrootLTopology` -- the tree of the GrootL language models (GrootVL): the same
  kind of spanning tree, with skip edges only among the first ``context_len`` tokens and
  rooted at the *last* token, for leaf-to-root (``"up"``) scans. Not causal: a token's
  subtree may hold later tokens.
* :class:`CausalSequenceTopology` -- every token's parent is the most similar of the
  ``k`` tokens before it, so every ancestor of a token is earlier than the token and a
  ``"down"`` scan mixes each token with its past only.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .._checks import all_finite, check_device, check_features, check_int, check_number
from ..ops.recorded import RECORDED_PLAN_MAX_NODES, RECORDED_PLANS, Recordings
from ..tree import Tree
from .base import BoundedCache, Candidates, Topology
from .captured import copied_tree
from .distance import EPS, Distance, check_distance, scale_by_power_of_two
from .euler_tour import forest_on_device
from .layout import empty_forest

__all__ = ["SequenceTopology", "GrootLTopology", "CausalSequenceTopology", "sequence_edges",
           "grootl_edges", "causal_parents", "causal_forest", "chain_tree", "TIE_RTOL"]


def sequence_edges(num_seqs: int, length: int, window: int = 1) -> np.ndarray:
    """Candidate edges ``[2, E]`` (int64) of ``num_seqs`` sequences, in the documented order."""
    t = np.arange(length, dtype=np.int64)
    src = np.concatenate([t[:length - k] for k in range(1, min(window, length - 1) + 1)]
                         + [np.zeros(0, np.int64)])
    dst = np.concatenate([t[k:] for k in range(1, min(window, length - 1) + 1)]
                         + [np.zeros(0, np.int64)])
    offset = (np.arange(num_seqs, dtype=np.int64) * length)[:, None]
    return np.stack([(src[None, :] + offset).reshape(-1), (dst[None, :] + offset).reshape(-1)])


def _num_nodes(tree: Tree) -> int:
    return tree.num_nodes


# chains already built, with their scan plans: the 64 most recent ones of together at most
# 2^22 vertices (some hundred MB of index arrays)
_CHAINS = BoundedCache(64, 2 ** 22, _num_nodes)


def _chain_tree(num_chains: int, length: int, device: torch.device) -> Tree:
    n = num_chains * length
    ar = torch.arange(n, device=device)
    local = ar % max(length, 1)
    parent = torch.where(local == 0, -1, ar - 1)
    # a chain of no vertices is no tree
    tree_ptr = torch.arange((num_chains if length else 0) + 1, device=device) * length
    batch = torch.arange(num_chains, device=device).repeat_interleave(length)
    # each position's children start right after it: the clip at the end of its tree
    # leaves the last token of a chain without any
    return Tree(parent, ar, torch.arange(1, n + 2, device=device).clamp(max=n), tree_ptr, local,
                batch, num_levels=n, max_tree_size=length)


def chain_tree(num_chains: int, length: int, device="cpu") -> Tree:
    r"""``num_chains`` chains of ``length`` vertices, chain ``b`` over the vertices
    ``b * L .. b * L + L - 1`` in order, rooted at its first vertex (``batch`` set).

    A ``"down"`` scan over it is exactly Mamba's recurrence :math:`h_t = w_t h_{t-1} + x_t`.
    Built on ``device`` with no host round-trip and cached per ``(num_chains, length,
    device)`` (the most recent ones, up to a total size); equal to ``Tree.from_parent`` of
    the same parent array.

    Args:
        num_chains (int): :math:`B`, the number of chains.
        length (int): :math:`L`, the vertices of each chain.
        device (torch.device or str): where the tree lives. (default: ``"cpu"``)

    Shapes:
        - **output:** a :class:`~treessm.Tree` over :math:`N = BL` vertices

    Returns:
        :class:`~treessm.Tree`

    Raises:
        ValueError: if ``num_chains`` or ``length`` is not a non-negative int.

    Example:
        >>> chain_tree(2, 3).parent.tolist()
        [-1, 0, 1, -1, 3, 4]
    """
    num_chains = check_int(num_chains, "num_chains", 0)
    length = check_int(length, "length", 0)
    device = check_device(device)
    if torch.compiler.is_compiling():  # traced into the graph: nothing to keep
        return _chain_tree(num_chains, length, device)
    return _CHAINS.get((num_chains, length, device),
                       lambda: _chain_tree(num_chains, length, device))


class SequenceTopology(Topology):
    r"""Minimum spanning tree of each sequence over chain and skip edges (GrootL).

    Candidate edges join tokens at most ``window`` apart; the edge cost is
    :math:`d(x_s, x_t)`. One tree per sequence, rooted at its first token, so
    ``direction="down"`` stays causal along the chain (``window=1``).

    Args:
        window (int): longest edge, in tokens; ``1`` is the plain chain. (default: ``1``)
        distance (str or callable): ``"cosine"``, ``"l2"`` or ``f(feat_u, feat_v) -> [E]``.
            (default: ``"cosine"``)

    Shapes:
        - **input:** features :math:`(B, L, C)`
        - **output:** a :class:`~treessm.Tree` over :math:`N = BL` vertices, ``batch`` set

    Returns:
        Called on features, the :class:`~treessm.Tree` of the sequences' spanning trees,
        token ``t`` of sequence ``b`` being vertex ``b * L + t``.

    Raises:
        ValueError: if ``window`` is not a positive int, or the features are not a
            ``[B, L, C]`` floating-point tensor with finite values.
        TypeError: if ``distance`` is neither a known name nor a callable.

    Example:
        >>> tree = SequenceTopology(window=2)(torch.randn(2, 10, 8))
        >>> tree.num_nodes, tree.roots.tolist()
        (20, [0, 10])
    """

    def __init__(self, window: int = 1, distance: Distance = "cosine"):
        super().__init__(distance)
        self.window = check_int(window, "window", 1)

    @torch.compiler.disable
    def __call__(self, feat: Tensor) -> Tree:
        check_features(feat, 3, shape="[B, L, C]")
        if self.window == 1 and self._standard():
            # the chain is the only spanning tree of a path graph
            return chain_tree(feat.shape[0], feat.shape[1], feat.device)
        if feat.shape[:2].numel() == 0:
            return empty_forest(feat.device)
        return super().__call__(feat)

    def _standard(self) -> bool:
        cls = type(self)
        return (cls.roots is SequenceTopology.roots and cls.spanning_tree is Topology.spanning_tree
                and cls.candidate_edges is SequenceTopology.candidate_edges)

    def sequence_edges(self, num_seqs: int, length: int) -> np.ndarray:
        """Candidate edges of ``num_seqs`` sequences of ``length`` tokens (``[2, E]`` int64,
        each sequence a contiguous block)."""
        return sequence_edges(num_seqs, length, self.window)

    # ------------------------------------------------------------------ steps
    def _candidates(self, feat: Tensor) -> Candidates:
        check_features(feat, 3, shape="[B, L, C]")
        b, length, _ = feat.shape
        return self._cache.get((b, length, self.window, feat.device),
                               lambda: Candidates(self.sequence_edges(b, length), b, length, 0,
                                                  feat.device, (b, length)))

    def candidate_edges(self, feat: Tensor) -> Tuple[Tensor, Tensor, int]:
        """Chain and skip edges of each sequence (cached per shape and device)."""
        entry = self._candidates(feat)
        return entry.edge_index, entry.batch, entry.batch.shape[0]

    def roots(self, feat: Tensor) -> Tensor:
        """First token of each sequence."""
        return self._candidates(feat).roots

    def extra_repr(self) -> str:
        return f"window={self.window}, {super().extra_repr()}"


# ---------------------------------------------------------------------------- GrootL tree
def grootl_edges(num_seqs: int, length: int, context_len: Optional[int] = None,
                 window: int = 3) -> np.ndarray:
    """Candidate edges ``[2, E]`` (int64) of the GrootL tree of ``num_seqs`` sequences: the
    chain ``(t, t+1)`` for all ``t``, then the skips ``(t, t+d)`` for ``d = 2 .. window``
    with both ends among the first ``context_len`` tokens (all tokens when ``None``), each
    by ascending ``t``; one contiguous block per sequence."""
    c = length if context_len is None else min(int(context_len), length)
    t = np.arange(length, dtype=np.int64)
    src, dst = [t[:max(length - 1, 0)]], [t[1:]]
    for d in range(2, window + 1):
        src.append(t[:max(c - d, 0)])
        dst.append(t[:max(c - d, 0)] + d)
    src, dst = np.concatenate(src), np.concatenate(dst)
    offset = (np.arange(num_seqs, dtype=np.int64) * length)[:, None]
    return np.stack([(src[None, :] + offset).reshape(-1), (dst[None, :] + offset).reshape(-1)])


class GrootLTopology(Topology):
    r"""The tree of GrootL, the language half of GrootVL: the minimum spanning tree of each
    sequence over the chain and short skip edges among its first ``context_len`` tokens,
    rooted at its last token.

    The GrootVL authors reverse the sequence, build the tree over the chain of the reversed
    sequence plus the edges from each token to the next 1, 2 and 3 tokens inside the last
    ``context_len`` positions, root it at the first position of the reversed sequence and
    aggregate from the leaves to the root. In the original order that is

    .. math::
        T = \mathrm{MST}\big(\{(t, t+1)\} \cup \{(s, t) : 0 \le s < t < c,\ t - s \le
        \mathrm{window}\},\ d(x_s, x_t)\big), \qquad \text{rooted at token } L - 1

    with :math:`c = \min(\mathrm{context\_len}, L)`, scanned with ``direction="up"``.
    On the chain part alone the ``"up"`` scan is Mamba's recurrence, so a token aggregates
    its past; a skip edge can hang a later token below an earlier one, so **a token's
    subtree may hold tokens after it: the tree is not causal.** Tokens from ``c - 1`` on
    lie on a path to the root and see only their past, which is why the authors set
    ``context_len`` to the length of the prompt when they score a continuation. Ties
    between equal costs go to the lower edge index of :func:`grootl_edges` (chain edges
    first), which the authors' CUDA kernel need not share.

    Args:
        context_len (int, optional): the skip edges join tokens among the first
            ``context_len``; ``None`` allows them everywhere, and ``context_len <= 2``
            leaves the plain chain (as in the authors' code). (default: ``None``)
        window (int): longest skip edge, in tokens (the authors use 3). (default: ``3``)
        distance (str or callable): ``"cosine"`` (:math:`\exp(-\cos)`, the authors' cost),
            ``"l2"`` or ``f(feat_u, feat_v) -> [E]``. (default: ``"cosine"``)

    Shapes:
        - **input:** features :math:`(B, L, C)`
        - **output:** a :class:`~treessm.Tree` over :math:`N = BL` vertices, ``batch`` set,
          one tree per sequence rooted at its last token

    Returns:
        Called on features, the :class:`~treessm.Tree` of each sequence's spanning tree.

    Raises:
        ValueError: if ``context_len`` or ``window`` is not a positive int, or the features
            are not a ``[B, L, C]`` floating-point tensor with finite values.
        TypeError: if ``distance`` is neither a known name nor a callable.

    Example:
        >>> tree = GrootLTopology(window=3)(torch.randn(2, 8, 16))
        >>> tree.roots.tolist()                                  # the last token of each
        [7, 15]
    """

    def __init__(self, context_len: Optional[int] = None, window: int = 3,
                 distance: Distance = "cosine"):
        super().__init__(distance)
        self.context_len = None if context_len is None else check_int(context_len,
                                                                        "context_len", 0)
        self.window = check_int(window, "window", 1)

    def _effective_context(self, length: int) -> int:
        c = length if self.context_len is None else min(self.context_len, length)
        return c if c > 2 else 0

    @torch.compiler.disable
    def __call__(self, feat: Tensor, *, outer: Optional[Tensor] = None) -> Tree:
        r"""The tree of features ``feat [B, L, C]``; with ``outer [B, L, S]`` (cosine
        distance only) the tokens' features are the outer products
        :math:`x_t = f_t \otimes o_t`, compared without forming them:
        :math:`\cos(x_s, x_t) = \cos(f_s, f_t) \cos(o_s, o_t)` (GrootL's scan inputs
        :math:`\Delta u \otimes B`, ``C * S`` values a token)."""
        check_features(feat, 3, shape="[B, L, C]")
        _check_outer(feat, outer, self.distance)
        b, length, _ = feat.shape
        if b * length == 0:
            return empty_forest(feat.device)
        if outer is None:
            return super().__call__(feat)
        with torch.no_grad():
            entry = self._candidates(feat)
            src, dst = entry.edge_index
            rows = [f.reshape(b * length, -1) for f in _unit_rows(*_finite_factors(feat, outer))]
            cost = _named_cost([f[src] for f in rows], [f[dst] for f in rows], "cosine")
            return self._build(entry.edge_index, cost, b * length, entry.roots, entry.batch)

    def _candidates(self, feat: Tensor) -> Candidates:
        check_features(feat, 3, shape="[B, L, C]")
        b, length, _ = feat.shape
        c = self._effective_context(length)
        return self._cache.get(
            (b, length, c, self.window, feat.device),
            lambda: Candidates(grootl_edges(b, length, c, self.window), b, length,
                               length - 1, feat.device, (b, length)))

    def candidate_edges(self, feat: Tensor) -> Tuple[Tensor, Tensor, int]:
        """Chain and skip edges of each sequence (cached per shape and device)."""
        entry = self._candidates(feat)
        return entry.edge_index, entry.batch, entry.batch.shape[0]

    def roots(self, feat: Tensor) -> Tensor:
        """Last token of each sequence."""
        return self._candidates(feat).roots

    def extra_repr(self) -> str:
        return (f"context_len={self.context_len}, window={self.window}, "
                f"{super().extra_repr()}")


# ---------------------------------------------------------------------------- causal tree
#: Relative tolerance under which two costs of :func:`causal_parents` count as equal.
TIE_RTOL = 1e-5


def _check_tie_rtol(value) -> float:
    return check_number(value, "tie_rtol", 0.0, 1.0, high_open=True)


def _work_dtype(feat: Tensor) -> torch.dtype:
    return torch.float64 if feat.dtype == torch.float64 else torch.float32


def _check_outer(feat: Tensor, outer: Optional[Tensor], distance) -> None:
    """``outer [B, L, S]``: second factors of the tokens of ``feat [B, L, C]``, compared
    with the cosine distance only."""
    if outer is None:
        return
    check_features(outer, 3, shape="[B, L, S]")
    if outer.shape[:2] != feat.shape[:2]:
        raise ValueError(f"outer must have the tokens of feat, [{feat.shape[0]}, "
                         f"{feat.shape[1]}, S], got {list(outer.shape)}")
    if distance != "cosine":
        raise ValueError(f"outer factors are compared with distance='cosine' only, got "
                         f"{distance!r}")


def _finite_factors(feat: Tensor, outer: Optional[Tensor]) -> Tuple[List[Tensor], torch.dtype]:
    """The detached factors of the tokens' features and their working dtype; NaN or
    infinite features raise on the CPU (elsewhere the check would wait for the device:
    there, as for the other topologies, NaN features give an unspecified tree)."""
    factors = [feat.detach()] if outer is None else [feat.detach(), outer.detach()]
    if feat.device.type == "cpu" and not all(all_finite(f) for f in factors):
        raise ValueError("feat must be finite, got NaN or infinite features")
    work = _work_dtype(feat) if outer is None else \
        torch.promote_types(_work_dtype(feat), _work_dtype(outer))
    return factors, work


def _unit_rows(factors: List[Tensor], work: torch.dtype) -> List[Tensor]:
    """Each factor's rows scaled to unit length (zero rows stay zero), for cosines."""
    return [torch.nn.functional.normalize(scale_by_power_of_two(f.to(work), -1), dim=-1,
                                          eps=EPS) for f in factors]


def causal_parents(feat: Tensor, k: int, distance: Distance = "cosine",
                   valid: Optional[Tensor] = None, tie_rtol: float = TIE_RTOL, *,
                   outer: Optional[Tensor] = None) -> Tensor:
    r"""The parent of every token in the causal tree: the most similar of the ``k`` tokens
    before it,

    .. math::
        p(t) = \max\,\{s \in [\max(0, t-k), t) : d(x_s, x_t) \le c_t + \epsilon |c_t|\},
        \qquad c_t = \min_{\max(0, t-k) \le s < t} d(x_s, x_t),

    the latest of the candidates whose cost ties with the lowest one up to the relative
    tolerance :math:`\epsilon` = ``tie_rtol``. The tolerance is what makes the choice
    reproducible: repeated tokens have features that are equal but for rounding, and
    rounding differs between computing a sequence at once and token by token (a cached
    decoder), so without it their order would be decided by rounding. Computed with ``k``
    shifted comparisons of the whole batch (no loop over tokens, no host synchronisation),
    without gradient.

    Args:
        feat (Tensor [B, L, C]): token features.
        k (int): how many earlier tokens are candidates; ``1`` gives the chain.
        distance (str or callable): ``"cosine"`` (:math:`\exp(-\cos(x_s, x_t))`), ``"l2"``
            or ``f(feat_s [E, C], feat_t [E, C]) -> [E]``. (default: ``"cosine"``)
        valid (BoolTensor [B, L], optional): tokens that may be parents (e.g. not padding).
            (default: all)
        tie_rtol (float): relative tolerance under which costs count as equal; ``0`` is the
            plain arg min with ties to the latest. (default: ``1e-5``)
        outer (Tensor [B, L, S], optional): the tokens' features are the outer products
            :math:`x_t = f_t \otimes o_t` of ``feat`` and ``outer`` (flattened, ``C * S``
            values; GrootL's scan inputs :math:`\Delta u \otimes B`), compared without
            forming them: :math:`\cos(x_s, x_t) = \cos(f_s, f_t) \cos(o_s, o_t)`.
            ``distance="cosine"`` only. (default: ``None``)

    Returns:
        LongTensor [B, L]: the parent's position in its sequence, or ``-1`` for a token
        without a candidate (the first token, or one preceded by ``k`` invalid tokens).

    Raises:
        TypeError, ValueError: on malformed arguments, and on NaN or infinite features
            on the CPU (elsewhere the check would wait for the device).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> f, o = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 3, generator=g)
        >>> flat = (f.unsqueeze(-1) * o.unsqueeze(-2)).flatten(2)
        >>> torch.equal(causal_parents(f, 3, outer=o), causal_parents(flat, 3))
        True
    """
    check_features(feat, 3, shape="[B, L, C]")
    _check_outer(feat, outer, distance)
    k = check_int(k, "k", 1)
    distance = check_distance(distance)
    tie_rtol = _check_tie_rtol(tie_rtol)
    b, length, channels = feat.shape
    if valid is not None:
        if not isinstance(valid, Tensor) or valid.shape != (b, length):
            got = list(valid.shape) if isinstance(valid, Tensor) else type(valid).__name__
            raise ValueError(f"valid must be a BoolTensor of shape {[b, length]}, got {got}")
        valid = valid.to(device=feat.device, dtype=torch.bool)
    span = min(k, max(length - 1, 0))
    t = torch.arange(length, device=feat.device)
    if span == 0:
        return torch.full((b, length), -1, dtype=torch.long, device=feat.device)
    with torch.no_grad():
        factors, work = _finite_factors(feat, outer)
        x = factors[0]
        if isinstance(distance, str):
            if distance == "cosine":
                factors = _unit_rows(factors, work)
            else:
                factors = [scale_by_power_of_two(x.to(work), (1, 2))]
            x = factors[0]
        # column d - 1 holds the cost to the token d steps back, so the first minimum
        # along the last dimension is the nearest of equally good candidates
        cost = torch.full((b, length, span), math.inf, dtype=work, device=x.device)
        if isinstance(distance, str):
            # the batch as one contiguous sequence: each shift compares contiguous rows
            # (pairs across two sequences are masked below as unavailable)
            flat = [f.contiguous().view(b * length, f.shape[-1]) for f in factors]
            flat_cost = cost.view(b * length, span)
            for d in range(1, span + 1):
                flat_cost[d:, d - 1] = _named_cost([f[:-d] for f in flat], [f[d:] for f in flat],
                                                   distance)
        else:
            for d in range(1, span + 1):
                cost[:, d:, d - 1] = _callable_cost(x[:, :-d], x[:, d:], distance)
        avail = (t[:, None] - torch.arange(1, span + 1, device=x.device)) >= 0  # [L, span]
        avail = avail.expand(b, length, span)
        if valid is not None:
            before = torch.stack([torch.nn.functional.pad(valid[:, :-d], (d, 0))
                                  for d in range(1, span + 1)], -1)
            avail = avail & before
        cost = cost.masked_fill(~avail, math.inf)
        low = cost.min(-1, keepdim=True).values
        tie = avail & (cost <= low + tie_rtol * low.abs())
        # the first tie along the last dimension is the nearest token
        nearest = tie.to(torch.uint8).argmax(-1)
        return torch.where(avail.any(-1), t - 1 - nearest, -1)


def _named_cost(earlier: List[Tensor], later: List[Tensor], distance: str) -> Tensor:
    """Costs ``[M]`` of a named distance between matched tokens given by the factors of
    their features (``[M, C_i]`` each; one factor without ``outer``), cosine factors
    already normalised."""
    if distance == "cosine":
        cos = (earlier[0] * later[0]).sum(-1)
        for e, t in zip(earlier[1:], later[1:]):
            cos = cos * (e * t).sum(-1)
        return torch.exp(-cos)
    return torch.linalg.vector_norm(earlier[0] - later[0], dim=-1)


def _callable_cost(earlier: Tensor, later: Tensor, distance) -> Tensor:
    """Costs ``[B, M]`` of a distance callable between matched tokens ``[B, M, C]``."""
    b, m, c = earlier.shape
    cost = distance(earlier.reshape(b * m, c), later.reshape(b * m, c))
    if not isinstance(cost, Tensor) or cost.shape != (b * m,):
        got = list(cost.shape) if isinstance(cost, Tensor) else type(cost).__name__
        raise ValueError(f"distance callable must return a tensor of shape [{b * m}], got {got}")
    return cost.reshape(b, m).to(_work_dtype(cost) if cost.is_floating_point() else torch.float32)


@torch.compiler.disable
def causal_forest(parent: Tensor, rooted_at_first: bool = False,
                  on_device: Optional[bool] = None) -> Tree:
    """The :class:`~treessm.Tree` of a batch of causal parent arrays (``[B, L]``, positions
    in the sequence or ``-1``, every parent earlier than its child).

    Args:
        parent (LongTensor [B, L]): e.g. from :func:`causal_parents`.
        rooted_at_first (bool): the caller knows that only the first token of each sequence
            is a root (true when no token is marked invalid), so the tree is laid out on the
            device without asking it how many trees there are. (default: ``False``)
        on_device (bool, optional): lay out with tensor operations where the parents live
            (:func:`~treessm.topology.euler_tour.forest_on_device`) rather than on
            the host; by default on any device but the CPU. (default: ``None``)
    """
    b, length = parent.shape
    n = b * length
    offset = torch.arange(b, device=parent.device)[:, None] * length
    flat = torch.where(parent >= 0, parent + offset, -1).reshape(-1)
    batch = torch.arange(b, device=parent.device).repeat_interleave(length)
    if on_device is None:
        on_device = parent.device.type != "cpu"
    if not on_device or n == 0 or not rooted_at_first:
        return Tree.from_parent(flat, batch, validate=False)
    child = (offset + torch.arange(1, length, device=parent.device)).reshape(-1)
    edge_index = torch.stack([child, flat[child]])
    return forest_on_device(edge_index, offset.expand(b, length).reshape(-1), b, batch,
                            max_tree_size=length)


_CAUSAL_BUILDS = Recordings(RECORDED_PLANS)


class CausalSequenceTopology(Topology):
    r"""A causal tree per sequence: every token hangs below the most similar of the ``k``
    tokens before it.

    .. math::
        p(t) = \operatorname*{arg\,min}_{\max(0, t-k) \le s < t} d(x_s, x_t),
        \qquad d(x_s, x_t) = \exp(-\cos(x_s, x_t)) \text{ by default}

    with ties (up to a relative ``tie_rtol``, see :func:`causal_parents`) to the latest
    :math:`s`, and the first token as the root. Every ancestor of
    a token is earlier than the token, so ``tree_scan(..., direction="down")`` mixes each
    token with its past only: changing later tokens never changes earlier outputs, and a
    recurrent layer needs only the states of the last ``k`` tokens (and their features)
    to continue a sequence. ``k = 1`` is the chain, where the ``"down"`` scan is Mamba's
    recurrence. The tree is no minimum spanning tree: each token chooses its parent on its
    own, from tensor operations over the whole batch, on the CPU and on accelerators
    (there without a host synchronisation unless tokens are masked).

    Args:
        k (int): how many earlier tokens are candidate parents. (default: ``4``)
        distance (str or callable): ``"cosine"``, ``"l2"`` or
            ``f(feat_s [E, C], feat_t [E, C]) -> [E]``. (default: ``"cosine"``)
        tie_rtol (float): costs within this relative tolerance of the lowest one tie.
            (default: ``1e-5``)

    Shapes:
        - **input:** features :math:`(B, L, C)`; optionally ``valid`` :math:`(B, L)`, the
          tokens that may be parents
        - **output:** a :class:`~treessm.Tree` over :math:`N = BL` vertices, ``batch`` set

    Returns:
        Called as ``topology(feat, valid=None)``, the causal :class:`~treessm.Tree`: every
        token's parent is earlier in its sequence, so a ``"down"`` scan is causal.

    Raises:
        ValueError: if ``k`` is not a positive int, ``tie_rtol`` negative, the features not
            a ``[B, L, C]`` floating-point tensor or ``valid`` not a ``[B, L]`` mask.
        TypeError: if ``distance`` is neither a known name nor a callable.

    Example:
        >>> tree = CausalSequenceTopology(k=3)(torch.randn(1, 6, 8))
        >>> bool((tree.parent[1:] < torch.arange(1, 6)).all())     # parents come earlier
        True
    """

    def __init__(self, k: int = 4, distance: Distance = "cosine", tie_rtol: float = TIE_RTOL):
        super().__init__(distance)
        self.k = check_int(k, "k", 1)
        self.tie_rtol = _check_tie_rtol(tie_rtol)

    def parents(self, feat: Tensor, valid: Optional[Tensor] = None, *,
                outer: Optional[Tensor] = None) -> Tensor:
        """Parent position of every token (``[B, L]``, ``-1`` at roots); see
        :func:`causal_parents` (``outer``: features given as outer products)."""
        return causal_parents(feat, self.k, self.distance, valid, self.tie_rtol, outer=outer)

    @torch.compiler.disable
    def __call__(self, feat: Tensor, valid: Optional[Tensor] = None, *,
                 outer: Optional[Tensor] = None) -> Tree:
        """The causal forest of ``feat [B, L, C]`` (``valid`` and ``outer`` as in
        :func:`causal_parents`). On CUDA, without ``valid`` and with a named distance, the
        build waits for nothing, so it is recorded in a CUDA graph once per shape and
        replayed for later features of that shape (:mod:`treessm.ops.recorded`): a causal
        mixer builds a new tree in every forward."""
        with torch.no_grad():
            if valid is None:
                tree = self._replayed(feat, outer)
                if tree is not None:
                    return tree
            return self._build_tree(feat, valid, outer)

    def _build_tree(self, feat: Tensor, valid: Optional[Tensor],
                    outer: Optional[Tensor]) -> Tree:
        parent = self.parents(feat, valid, outer=outer)
        return causal_forest(parent, rooted_at_first=valid is None)

    def _replayed(self, feat: Tensor, outer: Optional[Tensor]) -> Optional[Tree]:
        if not (isinstance(feat, Tensor) and feat.dim() == 3 and isinstance(self.distance, str)
                and 0 < feat.shape[0] * feat.shape[1] <= RECORDED_PLAN_MAX_NODES
                and (outer is None or isinstance(outer, Tensor))):
            return None  # (malformed inputs get their errors from the eager build)
        inputs = (feat,) if outer is None else (feat, outer)
        key = (tuple((t.shape, t.dtype, t.device) for t in inputs), self.k, self.distance,
               self.tie_rtol)

        def build(f: Tensor, o: Optional[Tensor] = None) -> Tree:
            return self._build_tree(f, None, o)

        tree = _CAUSAL_BUILDS.replay(key, build, *inputs)
        return None if tree is None else copied_tree(tree)

    def candidate_edges(self, feat: Tensor) -> Tuple[Tensor, Tensor, int]:
        """The edges from each token to the ``k`` tokens before it (for inspection; the
        tree is not their spanning tree)."""
        check_features(feat, 3, shape="[B, L, C]")
        b, length, _ = feat.shape
        entry = self._cache.get((b, length, self.k, feat.device),
                                lambda: Candidates(sequence_edges(b, length, self.k), b, length,
                                                   0, feat.device, (b, length)))
        return entry.edge_index, entry.batch, entry.batch.shape[0]

    def extra_repr(self) -> str:
        return f"k={self.k}, tie_rtol={self.tie_rtol}, {super().extra_repr()}"
