"""Token sequences: the minimum spanning tree of a chain with short skip edges.

Vertex ``b*L + t`` is token ``t`` of sequence ``b``. The candidate edges of a sequence
form one contiguous block: the chain ``(t, t+1)`` for all ``t``, then the skips
``(t, t+2)``, ..., ``(t, t+window)``, each by ascending ``t``. With ``window = 1`` the
tree is the chain itself (:func:`chain_tree`) and the scan reduces to Mamba's recurrence.
"""
from __future__ import annotations

import functools
from typing import Tuple

import numpy as np
import torch
from torch import Tensor

from ..tree import Tree
from .base import Candidates, Topology, check_features
from .distance import Distance

__all__ = ["SequenceTopology", "sequence_edges", "chain_tree"]


def sequence_edges(num_seqs: int, length: int, window: int = 1) -> np.ndarray:
    """Candidate edges ``[2, E]`` (int64) of ``num_seqs`` sequences, in the documented order."""
    t = np.arange(length, dtype=np.int64)
    src = np.concatenate([t[:length - k] for k in range(1, min(window, length - 1) + 1)]
                         + [np.zeros(0, np.int64)])
    dst = np.concatenate([t[k:] for k in range(1, min(window, length - 1) + 1)]
                         + [np.zeros(0, np.int64)])
    offset = (np.arange(num_seqs, dtype=np.int64) * length)[:, None]
    return np.stack([(src[None, :] + offset).reshape(-1), (dst[None, :] + offset).reshape(-1)])


@functools.lru_cache(maxsize=64)
def _chain_tree(num_chains: int, length: int, device: torch.device) -> Tree:
    n = num_chains * length
    ar = torch.arange(n, device=device)
    local = ar % max(length, 1)
    parent = torch.where(local == 0, -1, ar - 1)
    tree_ptr = torch.arange(num_chains + 1, device=device) * length
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
    device)``; equal to ``Tree.from_parent`` of the same parent array.
    """
    for name, value in (("num_chains", num_chains), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return _chain_tree(int(num_chains), int(length), torch.device(device))


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
    """

    def __init__(self, window: int = 1, distance: Distance = "cosine"):
        super().__init__(distance)
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)):
            raise TypeError(f"window must be an int, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = int(window)

    def __call__(self, feat: Tensor) -> Tree:
        if self.window == 1 and self._standard():
            # the chain is the only spanning tree of a path graph
            check_features(feat, 3, shape="[B, L, C]")
            return chain_tree(feat.shape[0], feat.shape[1], feat.device)
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
