"""Square sparse CSR matrices over the vertices, built from index arrays that are already
sorted and in range: the graph layers' neighbour mean (:mod:`treessm.topology.prepared_graph`)
and the parent-to-child sums of the selective scan (:mod:`treessm.ops.selective_scan`).
Their products with dense matrices (not transposed) add each row in a fixed order."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["square_csr"]


def square_csr(crow: Tensor, col: Tensor, values: Tensor, num_nodes: int) -> Tensor:
    """The ``[num_nodes, num_nodes]`` CSR matrix of ``crow``, ``col`` and ``values``,
    trusted as given (sorted, in range): nothing for torch to check, and the warning that
    sparse CSR support is in beta says nothing a user can act on.

    >>> square_csr(torch.tensor([0, 1, 1]), torch.tensor([1]), torch.ones(1), 2).to_dense()
    tensor([[0., 1.],
            [0., 0.]])
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, (num_nodes, num_nodes),
                                       check_invariants=False)
