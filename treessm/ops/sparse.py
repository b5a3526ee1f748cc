"""Square sparse CSR matrices over the vertices, built from index arrays that are already
sorted and in range, and their products with dense matrices: the graph layers' neighbour
mean (:mod:`treessm.topology.prepared_graph`) and the parent-to-child sums of the selective
scan (:mod:`treessm.ops.selective_scan`). :func:`csr_matmul` adds each row's entries in
their stored order: the same bits on every run."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..typing import cuda_extension_available

__all__ = ["square_csr", "csr_matmul"]


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


def csr_matmul(matrix: Tensor, dense: Tensor) -> Tensor:
    """``matrix @ dense`` for a sparse CSR ``matrix [R, K]`` and ``dense [K, C]`` of the
    same floating dtype (float32 or float64), each row's entries added in their stored
    order, so that the product has the same bits on every run. On CUDA this is the
    extension's kernel (``torch.ops.treessm.cuda_csr_matmul``): torch's product calls
    cuSPARSE's SpMM, which reorders the sums of large products between runs (a neighbour
    mean over 10^6 vertices and 10^7 entries did). Elsewhere, in a call traced by
    ``torch.compile`` and without the extension, torch's product.

    >>> m = square_csr(torch.tensor([0, 2, 2]), torch.tensor([0, 1]), torch.ones(2), 2)
    >>> csr_matmul(m, torch.tensor([[1.0], [2.0]]))
    tensor([[3.],
            [0.]])
    """
    if (dense.is_cuda and not torch.compiler.is_compiling()
            and dense.dtype in (torch.float32, torch.float64) and cuda_extension_available()):
        return torch.ops.treessm.cuda_csr_matmul(matrix.crow_indices(), matrix.col_indices(),
                                                 matrix.values(), dense.contiguous())
    return matrix @ dense
