"""Token sequences: the minimum spanning tree of a chain with short skip edges.

Vertex ``b*L + t`` is token ``t`` of sequence ``b``. The candidate edges of a sequence
form one contiguous block: the chain ``(t, t+1)`` for all ``t``, then the skips
``(t, t+2)``, ..., ``(t, t+window)``, each by ascending ``t``. With ``window = 1`` the
tree is the chain itself and the scan reduces to Mamba's recurrence.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch import Tensor

from ..tree import Tree
from .base import Plan, Topology, check_features
from .distance import Distance
from .rooting import lattice_offsets

__all__ = ["SequenceTopology", "sequence_edges"]


def sequence_edges(num_seqs: int, length: int, window: int = 1) -> np.ndarray:
    """Candidate edges ``[2, E]`` (int64) of ``num_seqs`` sequences, in the documented order."""
    t = np.arange(length, dtype=np.int64)
    src = np.concatenate([t[:length - k] for k in range(1, min(window, length - 1) + 1)]
                         + [np.zeros(0, np.int64)])
    dst = np.concatenate([t[k:] for k in range(1, min(window, length - 1) + 1)]
                         + [np.zeros(0, np.int64)])
    offset = (np.arange(num_seqs, dtype=np.int64) * length)[:, None]
    return np.stack([(src[None, :] + offset).reshape(-1), (dst[None, :] + offset).reshape(-1)])


class _Candidates:
    __slots__ = ("edge_index", "batch", "roots", "plan", "hints")

    def __init__(self, edges: np.ndarray, num_seqs: int, length: int, device):
        per_seq = edges.shape[1] // max(num_seqs, 1)
        self.plan = Plan(np.ascontiguousarray(edges[0]), np.ascontiguousarray(edges[1]),
                         np.arange(num_seqs + 1, dtype=np.int64) * length,
                         np.arange(num_seqs + 1, dtype=np.int64) * per_seq,
                         lattice_offsets(edges[0, :per_seq], edges[1, :per_seq]))
        self.edge_index = torch.from_numpy(edges).to(device)
        self.batch = torch.arange(num_seqs, device=device).repeat_interleave(length)
        self.roots = torch.arange(num_seqs, device=device) * length
        # each sequence is one tree: the device builder need not count them
        self.hints = dict(num_trees=num_seqs, max_tree_size=length) if num_seqs * length else {}


class SequenceTopology(Topology):
    r"""Minimum spanning tree of each sequence over chain and skip edges (GrootL).

    Candidate edges join tokens at most ``window`` apart; the edge cost is
    :math:`d(x_s, x_t)`. One tree per sequence, rooted at its first token, so
    ``direction="down"`` stays causal along the tree.

    Other language-model layouts (for instance a different root rule or candidate set for
    generation) are subclasses that override :meth:`roots` or :meth:`sequence_edges`.

    Args:
        window (int): longest edge, in tokens; ``1`` is the plain chain. (default: ``1``)
        distance (str or callable): ``"cosine"``, ``"l2"`` or ``f(feat_u, feat_v) -> [E]``.
            (default: ``"cosine"``)

    Shapes:
        - feat: :math:`[B, L, C]` -> :class:`~treessm.Tree` over :math:`N = BL` vertices,
          ``batch`` set.
    """

    def __init__(self, window: int = 1, distance: Distance = "cosine"):
        super().__init__(distance)
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)):
            raise TypeError(f"window must be an int, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = int(window)

    def __call__(self, feat: Tensor) -> Tree:
        tree = super().__call__(feat)
        if (self.window == 1 and type(self).roots is SequenceTopology.roots
                and type(self).spanning_tree is Topology.spanning_tree):
            # each sequence is a chain rooted at its first token: one level per token, known
            # without asking the device (the CUDA scan picks its schedule from it)
            tree.num_levels = tree.num_nodes
        return tree

    def sequence_edges(self, num_seqs: int, length: int) -> np.ndarray:
        """Candidate edges of ``num_seqs`` sequences of ``length`` tokens (``[2, E]`` int64,
        each sequence a contiguous block)."""
        return sequence_edges(num_seqs, length, self.window)

    # ------------------------------------------------------------------ steps
    def _candidates(self, feat: Tensor) -> _Candidates:
        check_features(feat, 3, shape="[B, L, C]")
        b, length, _ = feat.shape
        return self._cache.get((b, length, self.window, feat.device),
                               lambda: _Candidates(self.sequence_edges(b, length), b, length,
                                                   feat.device))

    def candidate_edges(self, feat: Tensor) -> Tuple[Tensor, Tensor, int]:
        """Chain and skip edges of each sequence (cached per shape and device)."""
        entry = self._candidates(feat)
        return entry.edge_index, entry.batch, entry.batch.shape[0]

    def roots(self, feat: Tensor) -> Tensor:
        """First token of each sequence."""
        return self._candidates(feat).roots

    def extra_repr(self) -> str:
        return f"window={self.window}, {super().extra_repr()}"
