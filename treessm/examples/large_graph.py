"""Training on a graph too large for one step: mini-batches from PyG's own loaders.

A planted-partition graph (``--num-nodes`` vertices, 10^6 by default, about ``--degree``
edges per vertex, most of them inside the vertex's community) whose vertices must name
their community; only a fraction of the vertices carry a hint of it in their features, so
a model has to gather it from the graph. Each step trains a node classifier of
:class:`~treessm.nn.TreeGPSConv` blocks on one mini-batch:

* ``--loader tree`` (the default) -- ``--parts`` pieces of a spanning forest's depth-first
  order (:func:`treessm.topology.tree_partition`), each the subgraph of its vertices
  (``Data.subgraph``), through :class:`torch_geometric.loader.DataLoader`: a part holds
  whole subtrees (and ancestors of its last vertex) and the edges among them (needs nothing
  beyond PyG);
* ``--loader random`` -- :class:`torch_geometric.loader.RandomNodeLoader`: a random
  ``1 / --parts`` of the vertices and the edges among them (needs nothing beyond PyG);
* ``--loader neighbor`` -- :class:`torch_geometric.loader.NeighborLoader`: seed vertices
  and a sampled few-hop neighbourhood of each (needs ``pyg-lib`` or ``torch-sparse``).

The test vertices are predicted from the whole graph in one forward pass without a gradient
(``--eval full``, the default), or batch by batch through the loader (``--eval batches``,
for a graph whose forward pass does not fit).

Every batch is a graph of its own, and its tree layers build the spanning forest of that
graph: the vertices of a batch reach each other along the sampled edges only
(``docs/graphs.md``). Predictions are collected per vertex through the batch's ``n_id``
(the ids of its vertices in the whole graph). Prints one JSON line::

    python -m treessm.examples.large_graph --device cuda            # 10^6 vertices, one GPU
    python -m treessm.examples.large_graph --num-nodes 5000 --epochs 2   # small, CPU
    torchrun --standalone --nproc_per_node=2 -m treessm.examples.large_graph --num-nodes 5000

Under ``torchrun`` every process trains on its share of each epoch's vertices
(``DistributedSampler``) in DistributedDataParallel; rank 0 reports, and every rank prints
``param_checksum <value>`` (``docs/distributed.md``).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Batch, Data

from treessm.examples.distributed import World, param_checksum, setup
from treessm.models import node_classifier
from treessm.topology import tree_partition

__all__ = ["planted_partition", "make_loader", "predict", "main"]


def planted_partition(num_nodes: int, num_classes: int = 8, degree: int = 10,
                      inside: float = 0.8, informative: float = 0.3, num_features: int = 16,
                      seed: int = 0) -> Data:
    """A graph of ``num_nodes`` vertices in ``num_classes`` communities (the labels) with
    ``degree * num_nodes / 2`` undirected edges, a fraction ``inside`` of them within a
    community; the features of a random ``informative`` fraction of the vertices hold a
    noisy code of their community, the rest pure noise. Made in a few vectorised passes
    (10^6 vertices in seconds)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(num_classes, (num_nodes,), generator=g)
    order = torch.argsort(y)
    counts = torch.bincount(y, minlength=num_classes)
    start = torch.cumsum(counts, 0) - counts
    m = degree * num_nodes // 2
    src = torch.randint(num_nodes, (m,), generator=g)
    same = torch.rand(m, generator=g) < inside
    # a partner in the same community: a uniform position inside its block of `order`
    block = y[src]
    offset = (torch.rand(m, generator=g) * counts[block]).long()
    dst = torch.where(same, order[start[block] + offset], torch.randint(num_nodes, (m,),
                                                                        generator=g))
    edge_index = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])
    codes = torch.randn(num_classes, num_features, generator=g)
    x = torch.randn(num_nodes, num_features, generator=g)
    hint = torch.rand(num_nodes, generator=g) < informative
    x[hint] += 2.0 * codes[y[hint]]
    train = torch.rand(num_nodes, generator=g) < 0.5
    return Data(x=x, edge_index=edge_index, y=y, train_mask=train, test_mask=~train,
                n_id=torch.arange(num_nodes))


def make_loader(data: Data, kind: str, parts: int, world: World, batch_size: int = 1024,
                epoch_seed: int = 0, split: str = "train"):
    """A loader over ``data`` (this process's share under ``torchrun``); a NeighborLoader's
    seeds are the vertices of ``split`` (``"train"``, shuffled, or ``"test"``)."""
    from torch.utils.data.distributed import DistributedSampler

    if kind == "tree":
        from torch_geometric.loader import DataLoader

        part = tree_partition(data.edge_index, data.num_nodes, parts * world.size,
                              generator=torch.Generator().manual_seed(epoch_seed))
        pieces = [data.subgraph(part == k) for k in range(parts * world.size)]
        sampler = (DistributedSampler(pieces, num_replicas=world.size, rank=world.rank,
                                      seed=epoch_seed)
                   if world.distributed else None)
        return DataLoader(pieces, batch_size=1, sampler=sampler,
                          shuffle=sampler is None and split == "train"), sampler
    if kind == "random":
        from torch_geometric.loader import RandomNodeLoader

        sampler = (DistributedSampler(range(data.num_nodes), num_replicas=world.size,
                                      rank=world.rank, seed=epoch_seed)
                   if world.distributed else None)
        return RandomNodeLoader(data, num_parts=parts * world.size, sampler=sampler,
                                shuffle=sampler is None), sampler
    if kind == "neighbor":
        import torch_geometric.typing as pyg_typing

        if not (pyg_typing.WITH_PYG_LIB or pyg_typing.WITH_TORCH_SPARSE):
            raise ImportError("--loader neighbor needs pyg-lib or torch-sparse (PyG's "
                              "NeighborLoader samples with them): pip install pyg-lib -f "
                              "https://data.pyg.org/whl/torch-<version>+<cpu|cuXXX>.html, or "
                              "build torch-sparse from source (pip install torch-sparse)")
        from torch_geometric.loader import NeighborLoader

        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        seeds = data[f"{split}_mask"].nonzero().view(-1)
        seeds = seeds[world.rank::world.size]  # each process its share of the seeds
        return NeighborLoader(data, num_neighbors=[10, 10], input_nodes=seeds,
                              batch_size=batch_size, shuffle=split == "train"), None
    raise ValueError(f"loader must be 'tree', 'random' or 'neighbor', got {kind!r}")


def _seed_rows(batch: Data) -> slice:
    """The rows a batch is responsible for: NeighborLoader puts its ``batch_size`` seed
    vertices first; a RandomNodeLoader batch, a batch of parts (a PyG ``Batch``, whose
    ``batch_size`` counts its graphs) and the whole graph own all of their rows."""
    size = None if isinstance(batch, Batch) else getattr(batch, "batch_size", None)
    return slice(0, size) if size is not None else slice(None)


@torch.no_grad()
def predict(model: nn.Module, loader, num_nodes: int, device) -> Tensor:
    """Predicted class of every vertex a loader covers, placed by the batches' ``n_id``
    (``-1`` where no batch predicted).

    Raises:
        ValueError: when a batch carries no ``n_id`` (give the graph one before building
            the loader: ``data.n_id = torch.arange(data.num_nodes)``; NeighborLoader adds
            it itself).
    """
    model.eval()
    out = torch.full((num_nodes,), -1, dtype=torch.long)
    for batch in loader:
        if getattr(batch, "n_id", None) is None:
            raise ValueError("the loader's batches carry no n_id, so their predictions cannot "
                             "be placed in the whole graph: set data.n_id = "
                             "torch.arange(data.num_nodes) before building the loader")
        batch = copy.copy(batch).to(device)  # Data.to moves in place: leave the caller's
        rows = _seed_rows(batch)
        pred = model(batch.x, batch.edge_index)[rows].argmax(-1)
        out[batch.n_id[rows].cpu()] = pred.cpu()
    return out


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-nodes", type=int, default=1_000_000)
    parser.add_argument("--degree", type=int, default=10)
    parser.add_argument("--loader", default="tree", choices=("tree", "random", "neighbor"))
    parser.add_argument("--parts", type=int, default=20,
                        help="tree and random loaders: batches per epoch and process")
    parser.add_argument("--eval", default="full", choices=("full", "batches"),
                        help="predict the test vertices from the whole graph at once, or "
                             "batch by batch through the loader")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    args = parser.parse_args(argv)
    world = setup(args.device)
    try:
        return _run(args, world)
    finally:
        world.close()


def _run(args, world: World) -> dict:
    t0 = time.perf_counter()
    data = planted_partition(args.num_nodes, degree=args.degree, seed=args.seed)
    made = time.perf_counter() - t0
    torch.manual_seed(args.seed)
    model = node_classifier(data.num_features, int(data.y.max()) + 1, args.hidden,
                            num_layers=2, conv="sage", dropout=0.0, norm="layer_norm",
                            d_state=4)
    net = world.wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader, sampler = make_loader(data, args.loader, args.parts, world)
    steps, t_train = 0, 0.0
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(world.device)
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        t = time.perf_counter()
        for batch in loader:
            batch = batch.to(world.device)
            rows = _seed_rows(batch)
            mask = batch.train_mask[rows]
            out = net(batch.x, batch.edge_index)[rows]
            loss = F.cross_entropy(out[mask], batch.y[rows][mask])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        t_train += time.perf_counter() - t
    summary = dict(example="large_graph", num_nodes=data.num_nodes,
                   num_edges=data.num_edges, loader=args.loader, eval=args.eval,
                   epochs=args.epochs,
                   steps_per_process=steps, processes=world.size,
                   seconds_to_make_graph=round(made, 2),
                   seconds_per_epoch=round(t_train / max(args.epochs, 1), 2),
                   param_checksum=param_checksum(model))
    if world.device.type == "cuda":
        summary["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(world.device)
                                              / 2 ** 30, 2)
    if world.main:
        eval_loader = [data] if args.eval == "full" else make_loader(
            data, args.loader, args.parts, World(device=world.device), split="test")[0]
        pred = predict(model, eval_loader, data.num_nodes, world.device)
        seen = data.test_mask & (pred >= 0)
        summary["test_accuracy"] = round(float((pred[seen] == data.y[seen]).float().mean()), 4)
        summary["test_vertices_predicted"] = int(seen.sum())
        print(json.dumps(summary), flush=True)
    print(f"param_checksum {summary['param_checksum']!r}", flush=True)
    return summary


if __name__ == "__main__":
    main()
