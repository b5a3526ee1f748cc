r"""Benchmark graphs: PyG's real datasets from a root folder, and Tree-NeighborsMatch.

:func:`load_dataset` opens Cora, Minesweeper, Tolokers, MUTAG and PROTEINS with PyTorch
Geometric's own classes (:class:`~torch_geometric.datasets.Planetoid`,
:class:`~torch_geometric.datasets.HeterophilousGraphDataset`,
:class:`~torch_geometric.datasets.TUDataset`) under one root laid out as
``<root>/planetoid/Cora``, ``<root>/heterophilous/minesweeper``, ``<root>/tu/MUTAG``, ...:
the raw files are read from there (or downloaded by PyG into an empty root), and a
read-only root is first copied to a writable folder, where PyG writes ``processed/``.

:func:`tree_neighbors_match` generates the over-squashing benchmark of Alon & Yahav
(ICLR 2021) from its definition.
"""
from __future__ import annotations

import itertools
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch_geometric.data import Data

from ._checks import check_int

__all__ = ["DATASETS", "load_dataset", "tree_neighbors_match", "stratified_split"]

#: the datasets :func:`load_dataset` reads: name -> (folder under the root, PyG class name)
DATASETS = {
    "Cora": ("planetoid", "Planetoid"),
    "minesweeper": ("heterophilous", "HeterophilousGraphDataset"),
    "tolokers": ("heterophilous", "HeterophilousGraphDataset"),
    "MUTAG": ("tu", "TUDataset"),
    "PROTEINS": ("tu", "TUDataset"),
}


def load_dataset(name: str, root: Union[str, Path], copy_to: Optional[Union[str, Path]] = None,
                 **kwargs):
    """PyG's dataset ``name`` from ``root`` (layout in the module docstring).

    Args:
        name (str): ``"Cora"``, ``"minesweeper"``, ``"tolokers"``, ``"MUTAG"`` or
            ``"PROTEINS"``.
        root (str or Path): the root folder.
        copy_to (str or Path, optional): copy the dataset's folder here and open the copy
            (a read-only folder is always copied, by default into a new temporary folder).
            (default: ``None``)
        **kwargs: passed to the PyG class (``transform``, ``pre_transform``, ...).

    Returns:
        the PyG dataset.

    Raises:
        ValueError: on an unknown name.
        TypeError: on a ``root`` or ``copy_to`` that is not a path.

    Example:
        >>> dataset = load_dataset("Cora", "data")   # PyG downloads into an empty root
        >>> data = dataset[0]
        >>> data.num_nodes, dataset.num_classes, int(data.train_mask.sum())
        (2708, 7, 140)
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"name must be one of {tuple(DATASETS)}, got {name!r}")
    for arg, value in (("root", root), ("copy_to", copy_to)):
        if not isinstance(value, (str, os.PathLike)) and not (arg == "copy_to" and value is None):
            raise TypeError(f"{arg} must be a str or os.PathLike folder, got "
                            f"{type(value).__name__}")
    import torch_geometric.datasets as pyg_datasets

    family, cls_name = DATASETS[name]
    base = Path(root) / family
    folder = base / name
    # mode bits as well as access(): a superuser may write where the owner said read-only
    if folder.exists() and (copy_to is not None or not os.access(folder, os.W_OK)
                            or not folder.stat().st_mode & 0o222):
        base = Path(copy_to or tempfile.mkdtemp(prefix="treessm-data-")) / family
        if not (base / name).exists():
            shutil.copytree(folder, base / name)
    return getattr(pyg_datasets, cls_name)(str(base), name, **kwargs)


def _permutations(num_leaves: int, count: int, rng: random.Random) -> List[Tuple[int, ...]]:
    if math.factorial(num_leaves) <= 50_000:  # few enough to draw without repeats
        every = list(itertools.permutations(range(1, num_leaves + 1)))
        return rng.sample(every, min(count, len(every)))
    out = []
    for _ in range(count):
        perm = list(range(1, num_leaves + 1))
        rng.shuffle(perm)
        out.append(tuple(perm))
    return out


def tree_neighbors_match(depth: int, num_permutations: Optional[int] = None,
                         max_examples: int = 32_000, seed: int = 0) -> List[Data]:
    r"""Tree-NeighborsMatch (Alon & Yahav, *On the Bottleneck of Graph Neural Networks and
    its Practical Implications*, ICLR 2021): the root of a complete binary tree must name
    the value that the leaf with its key holds, :math:`r` hops down.

    Each example is a complete binary tree of depth :math:`r` (``2^{r+1} - 1`` vertices,
    numbered breadth-first: the children of :math:`v` are :math:`2v + 1` and :math:`2v + 2`,
    the root is 0), with edges from every child to its parent (messages flow toward the
    root) and a self-loop at every vertex. The :math:`2^r` leaves, in depth-first order,
    hold ``(i, π(i))`` for :math:`i = 1 .. 2^r` and a random permutation :math:`π`; inner
    vertices hold ``(0, 0)``; the root holds ``(k, 0)`` and its label is :math:`π(k) - 1`
    (class ids from 0). Every sampled permutation is paired with every key :math:`k`.

    Args:
        depth (int): :math:`r \ge 1`.
        num_permutations (int, optional): permutations to sample. (default: as the paper's
            code: ``min(1000, (2^r)!)`` for :math:`r \le 3`, else
            ``min(1000, max_examples // 2^r)``)
        max_examples (int): bound on the examples of the default. (default: ``32000``)
        seed (int): seed of the permutations. (default: ``0``)

    Returns:
        list of :class:`~torch_geometric.data.Data` with ``x`` (LongTensor ``[V, 2]``: key,
        value), ``edge_index`` (``[2, V - 1 + V]``), ``y`` (LongTensor ``[1]``) and
        ``root_mask`` (BoolTensor ``[V]``, true at the root).

    Shapes:
        - **output:** each graph: :math:`V = 2^{r+1} - 1` vertices, ``x`` :math:`(V, 2)`,
          ``edge_index`` :math:`(2, 2V - 1)`, ``y`` :math:`(1)`, ``root_mask`` :math:`(V)`

    Raises:
        ValueError: if ``depth`` is not a positive int, or ``num_permutations`` or
            ``max_examples`` not positive.

    Example:
        >>> graphs = tree_neighbors_match(2, num_permutations=3)
        >>> len(graphs), graphs[0].num_nodes, graphs[0].x[0].tolist()     # 3 x 4 keys
        (12, 7, [1, 0])
    """
    depth = check_int(depth, "depth", 1)
    num_leaves = 2 ** depth
    if num_permutations is None:
        num_permutations = (min(1000, math.factorial(num_leaves)) if depth <= 3
                            else min(1000, max_examples // num_leaves))
    num_permutations = check_int(num_permutations, "num_permutations", 1)
    n = 2 ** (depth + 1) - 1
    child = torch.arange(1, n)
    loops = torch.arange(n)
    edge_index = torch.stack([torch.cat([child, loops]), torch.cat([(child - 1) // 2, loops])])
    leaves = torch.arange(num_leaves - 1, n)  # breadth-first ids of the leaves, left to right
    root_mask = torch.zeros(n, dtype=torch.bool)
    root_mask[0] = True
    keys = torch.arange(1, num_leaves + 1)
    out = []
    for perm in _permutations(num_leaves, num_permutations, random.Random(seed)):
        values = torch.tensor(perm)
        for k in range(1, num_leaves + 1):
            x = torch.zeros(n, 2, dtype=torch.long)
            x[leaves, 0] = keys
            x[leaves, 1] = values
            x[0, 0] = k
            out.append(Data(x=x, edge_index=edge_index, y=torch.tensor([perm[k - 1] - 1]),
                            root_mask=root_mask))
    return out


def stratified_split(labels: Tensor, train_fraction: float = 0.8, seed: int = 0
                     ) -> Tuple[Tensor, Tensor]:
    """Indices ``(train, test)`` with ``train_fraction`` of every label's examples in
    ``train`` (rounded), shuffled by ``seed``.

    Args:
        labels (Tensor [N]): the label of each example.
        train_fraction (float): share of each label's examples in ``train``. (default:
            ``0.8``)
        seed (int): seed of the shuffle. (default: ``0``)

    Shapes:
        - **input:** labels :math:`(N)`
        - **output:** two index vectors that together hold each of :math:`0 .. N - 1` once

    Returns:
        ``(train, test)``, LongTensors of indices.

    Raises:
        RuntimeError: from torch, when ``labels`` is not a one-dimensional tensor.

    Example:
        >>> train, test = stratified_split(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1]), 0.5)
        >>> len(train), len(test), sorted(torch.cat([train, test]).tolist()) == list(range(10))
        (5, 5, True)
    """
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in torch.unique(labels):
        idx = (labels == label).nonzero().view(-1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        cut = int(round(train_fraction * idx.numel()))
        train.append(idx[:cut])
        test.append(idx[cut:])
    train, test = torch.cat(train), torch.cat(test)
    return (train[torch.randperm(train.numel(), generator=g)],
            test[torch.randperm(test.numel(), generator=g)])
