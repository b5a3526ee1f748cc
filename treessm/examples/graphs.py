"""Graphs with TreeSSMConv: Zachary's karate club and a long-range task, against GCNConv.

Runs on the CPU in a few minutes with bundled or generated data (no download)::

    python -m treessm.examples.graphs --out graphs_out

* **karate** -- :class:`torch_geometric.datasets.KarateClub`: 34 members, 4 communities,
  one labelled member per community, the other 30 to predict;
* **far label** -- graphs that are long paths whose first vertex carries a colour; every
  vertex must predict the colour of its path's head, up to ``length - 1`` hops away, which
  a few rounds of message passing cannot see.

Prints one JSON line (test accuracy and time per epoch of each model) and draws
``karate.png``: the club, the spanning tree the trained first TreeSSMConv layer builds
from its own features, and the predicted communities. Under ``torchrun`` the long-range
task trains on mini-batches of graphs, each process on its share
(``DistributedSampler``); rank 0 shows progress, evaluates and draws, and every rank prints
``param_checksum <value>`` at the end (``docs/distributed.md``)::

    torchrun --standalone --nproc_per_node=2 -m treessm.examples.graphs --out DIR

With ``--root`` (a PyG root holding ``planetoid/Cora``, e.g. the raw files of
``Planetoid(root + "/planetoid", "Cora")``; a read-only root is copied first; default:
``$TREESSM_DATA``) it also trains a node classifier of
:class:`~treessm.nn.TreeGPSConv` blocks (:func:`treessm.models.node_classifier`) on Cora's
public split and draws ``cora_tree.png``: the spanning tree its last block's scan used,
vertices coloured by predicted class. The tasks, models and training loop are also used by
``benchmarks/graph.py``, which adds PyG's ``InfectionDataset``, GATConv and GINConv,
depths 1, 2 and 4, and three seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Batch, Data

from treessm.examples.distributed import World, param_checksum, setup
from treessm.nn import TreeSSMConv

__all__ = ["karate", "far_label", "infection", "NodeClassifier", "make_conv", "matched_model",
           "train_node_classifier", "main"]


# ---------------------------------------------------------------------------- tasks
class Task:
    """A node-classification task: training and test graphs (each a PyG ``Data`` or one
    ``Batch``) with node masks, the feature width and the number of classes."""

    def __init__(self, name: str, train: Data, test: Data, num_features: int, num_classes: int):
        self.name, self.train, self.test = name, train, test
        self.num_features, self.num_classes = num_features, num_classes


def karate() -> Task:
    """Zachary's karate club with PyG's split: one labelled member per community."""
    from torch_geometric.datasets import KarateClub

    data = KarateClub()[0]
    data.test_mask = ~data.train_mask
    return Task("karate", data, data, data.num_features, int(data.y.max()) + 1)


def far_label(length: int = 24, num_colors: int = 4, num_train: int = 48, num_test: int = 16,
              seed: int = 0) -> Task:
    """Paths of ``length`` vertices; the head's features hold a one-hot colour, every other
    vertex only a constant; every vertex's label is its path's colour. A vertex ``k`` hops
    from the head needs ``k`` rounds of message passing to see it."""
    g = torch.Generator().manual_seed(seed)

    def graphs(count):
        out = []
        for _ in range(count):
            color = int(torch.randint(num_colors, (1,), generator=g))
            x = torch.zeros(length, num_colors + 1)
            x[:, -1] = 1.0
            x[0, color] = 1.0
            src = torch.arange(length - 1)
            ei = torch.stack([torch.cat([src, src + 1]), torch.cat([src + 1, src])])
            # the head sits anywhere in the vertex numbering
            perm = torch.randperm(length, generator=g)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(length)
            ones = torch.ones(length, dtype=torch.bool)
            out.append(Data(x=x[perm], edge_index=inv[ei], y=torch.full((length,), color),
                            train_mask=ones, test_mask=ones))
        return Batch.from_data_list(out)

    return Task(f"far_label_{length}", graphs(num_train), graphs(num_test), num_colors + 1,
                num_colors)


def infection(max_path_length: int = 5, num_nodes: int = 300, num_graphs: int = 8,
              seed: int = 0) -> Task:
    """PyG's ``InfectionDataset`` on Erdős–Rényi graphs (mean degree about 3): predict the
    shortest-path distance to the nearest infected vertex, up to ``max_path_length``, or
    'farther'. The last quarter of the graphs is the test set."""
    from torch_geometric.datasets import InfectionDataset
    from torch_geometric.datasets.graph_generator import ERGraph

    torch.manual_seed(seed)
    data = InfectionDataset(ERGraph(num_nodes=num_nodes, edge_prob=3.0 / num_nodes),
                            num_infected_nodes=max(1, num_nodes // 30),
                            max_path_length=max_path_length, num_graphs=num_graphs)
    ones = lambda d: torch.ones(d.num_nodes, dtype=torch.bool)  # noqa: E731
    graphs = [Data(x=d.x, edge_index=d.edge_index, y=d.y, train_mask=ones(d), test_mask=ones(d))
              for d in data]
    cut = num_graphs - max(1, num_graphs // 4)
    train, test = Batch.from_data_list(graphs[:cut]), Batch.from_data_list(graphs[cut:])
    return Task(f"infection_{max_path_length}", train, test, 2, max_path_length + 2)


# ---------------------------------------------------------------------------- models
CONVS = ("tree_ssm", "gcn", "gat", "gin")


def make_conv(kind: str, channels: int, d_state: int = 4) -> nn.Module:
    """One graph layer of ``channels`` in and out."""
    from torch_geometric.nn import GATConv, GCNConv, GINConv

    if kind == "tree_ssm":
        return TreeSSMConv(channels, channels, d_state=d_state)
    if kind == "gcn":
        return GCNConv(channels, channels)
    if kind == "gat":
        return GATConv(channels, channels // 4, heads=4)
    if kind == "gin":
        return GINConv(nn.Sequential(nn.Linear(channels, channels), nn.ReLU(),
                                     nn.Linear(channels, channels)))
    raise ValueError(f"kind must be one of {CONVS}, got {kind!r}")


class NodeClassifier(nn.Module):
    """Linear encoder, ``depth`` residual pre-norm graph layers, linear head."""

    def __init__(self, kind: str, num_features: int, num_classes: int, channels: int,
                 depth: int, d_state: int = 4):
        super().__init__()
        self.kind = kind
        self.encode = nn.Linear(num_features, channels)
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in range(depth))
        self.convs = nn.ModuleList(make_conv(kind, channels, d_state) for _ in range(depth))
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor, edge_index: Tensor, batch: Optional[Tensor] = None) -> Tensor:
        h = self.encode(x)
        for norm, conv in zip(self.norms, self.convs):
            z = norm(h)
            z = conv(z, edge_index, batch=batch) if self.kind == "tree_ssm" else conv(z, edge_index)
            h = h + F.gelu(z)
        return self.head(h)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_model(kind: str, task: Task, depth: int, channels: int = 32,
                  d_state: int = 4) -> NodeClassifier:
    """A model of ``kind`` whose parameter count is closest to the TreeSSMConv model of
    ``channels`` channels (widths in steps of 4, for GAT's four heads)."""
    target = num_params(NodeClassifier("tree_ssm", task.num_features, task.num_classes, channels,
                                       depth, d_state))
    if kind == "tree_ssm":
        return NodeClassifier(kind, task.num_features, task.num_classes, channels, depth, d_state)
    best = min(range(4, 257, 4), key=lambda c: abs(num_params(NodeClassifier(
        kind, task.num_features, task.num_classes, c, depth)) - target))
    return NodeClassifier(kind, task.num_features, task.num_classes, best, depth)


# ---------------------------------------------------------------------------- training
def _accuracy(model: nn.Module, data: Data, mask: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(data.x, data.edge_index, getattr(data, "batch", None)).argmax(-1)
    return float((pred[mask] == data.y[mask]).float().mean())


def _loader(task: Task, world: World, batch_size: Optional[int]):
    """The training data of one epoch: the whole training set at once, or mini-batches of
    graphs (this process's share of them under ``torchrun``), and their sampler."""
    train = task.train
    many = isinstance(train, Batch) and train.num_graphs > 1
    if not many or (batch_size is None and not world.distributed):
        return [train], None
    from torch.utils.data.distributed import DistributedSampler
    from torch_geometric.loader import DataLoader

    graphs = train.to_data_list()
    size = batch_size or -(-len(graphs) // world.size)
    sampler = (DistributedSampler(graphs, num_replicas=world.size, rank=world.rank, seed=0)
               if world.distributed else None)
    return DataLoader(graphs, batch_size=size, sampler=sampler, shuffle=sampler is None), sampler


def train_node_classifier(model: nn.Module, task: Task, epochs: int = 150, lr: float = 5e-3,
                          weight_decay: float = 5e-4,
                          progress: Optional[Callable[[int], None]] = None,
                          world: World = World(), batch_size: Optional[int] = None
                          ) -> Dict[str, float]:
    """Adam with gradients clipped to norm 1, full-batch or on mini-batches of
    ``batch_size`` graphs (the default under ``torchrun``: each process one share of the
    graphs per step), in DistributedDataParallel under ``torchrun``. Returns test accuracy
    and seconds per epoch."""
    net = world.wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loader, sampler = _loader(task, world, batch_size)
    start = time.perf_counter()
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        for data in loader:
            data = data.to(world.device)
            out = net(data.x, data.edge_index, getattr(data, "batch", None))
            loss = F.cross_entropy(out[data.train_mask], data.y[data.train_mask])
            opt.zero_grad()
            loss.backward()
            # clipped, as Mamba models are trained: a LayerNorm over nearly equal states can
            # send one step's gradient far off
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        if progress is not None:
            progress(epoch)
    per_epoch = (time.perf_counter() - start) / max(epochs, 1)
    test, train = task.test.to(world.device), task.train.to(world.device)
    return dict(test_accuracy=_accuracy(model, test, test.test_mask),
                train_accuracy=_accuracy(model, train, train.train_mask),
                seconds_per_epoch=per_epoch, params=num_params(model))


# ---------------------------------------------------------------------------- picture
def draw_karate(model: NodeClassifier, task: Task, path: Path) -> None:
    """The club's graph, the spanning tree of the first TreeSSMConv layer (thick edges) and
    the predicted communities (colours; labelled members ringed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    data = task.train
    model.eval()
    with torch.no_grad():
        pred = model(data.x, data.edge_index).argmax(-1)
        z = model.norms[0](model.encode(data.x))
        _, tree = model.convs[0](z, data.edge_index, return_tree=True)
    graph = nx.Graph(data.edge_index.t().tolist())
    layout = nx.spring_layout(graph, seed=3)
    tree_edges = [(v, p) for v, p in enumerate(tree.parent.tolist()) if p >= 0]
    fig, ax = plt.subplots(figsize=(7, 6))
    nx.draw_networkx_edges(graph, layout, ax=ax, alpha=0.25, width=0.8)
    nx.draw_networkx_edges(graph, layout, edgelist=tree_edges, ax=ax, width=2.4,
                           edge_color="black")
    nx.draw_networkx_nodes(graph, layout, ax=ax, node_color=pred.tolist(), cmap="tab10",
                           vmin=0, vmax=9, node_size=260,
                           edgecolors=["red" if m else "white" for m in data.train_mask.tolist()],
                           linewidths=2.0)
    nx.draw_networkx_labels(graph, layout, ax=ax, font_size=7)
    acc = float((pred[task.test.test_mask] == data.y[task.test.test_mask]).float().mean())
    ax.set_title(f"Karate club: TreeSSMConv spanning tree (thick) and predicted communities\n"
                 f"(red rings: the 4 labelled members; test accuracy {acc:.2f})", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_cora(root: str):
    """Cora's public split with row-normalised features (PyG's ``NormalizeFeatures``), from
    ``root`` laid out as :func:`treessm.datasets.load_dataset` reads it
    (``root/planetoid/Cora``) or as ``Planetoid(root, "Cora")`` keeps it (``root/Cora``);
    features as a sparse matrix (dropout then touches the stored entries only)."""
    from torch_geometric.datasets import Planetoid
    from torch_geometric.transforms import NormalizeFeatures

    from treessm.datasets import load_dataset

    if (Path(root) / "planetoid" / "Cora").exists():
        data = load_dataset("Cora", root, transform=NormalizeFeatures())[0]
    else:
        data = Planetoid(root, "Cora", transform=NormalizeFeatures())[0]
    data.x = data.x.to_sparse()
    return data


def train_cora(root: str, epochs: int, seed: int = 0) -> tuple:
    """The two-layer GCN with a TreeSSMConv global branch
    (:class:`treessm.models.LocalGlobalNet`) on Cora's public split, with the recipe of
    ``benchmarks/graph.py``: Adam at 0.01, dropout 0.5, weight decay 5e-4 on the first
    layer and 0.5 on the tree branch, the test accuracy at the epoch of the best
    validation accuracy. Returns ``(model, data, results)``."""
    from treessm.models import LocalGlobalNet

    data = load_cora(root)
    torch.manual_seed(seed)
    model = LocalGlobalNet(data.num_features, 64, 7, mixer="tree", dropout=0.5)
    opt = torch.optim.Adam(model.parameter_groups(5e-4, mixer_weight_decay=0.5), lr=0.01)
    best, start = (-1.0, 0.0, None), time.perf_counter()
    for _ in range(epochs):
        model.train()
        loss = F.cross_entropy(model(data.x, data.edge_index)[data.train_mask],
                               data.y[data.train_mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            pred = model(data.x, data.edge_index).argmax(-1)
        val = float((pred[data.val_mask] == data.y[data.val_mask]).float().mean())
        if val > best[0]:
            state = {k: v.clone() for k, v in model.state_dict().items()}
            best = (val, float((pred[data.test_mask] == data.y[data.test_mask]).float().mean()),
                    state)
    if best[2] is not None:
        model.load_state_dict(best[2])  # the model of the best validation epoch
    return model, data, dict(val_accuracy=best[0], test_accuracy=best[1],
                             seconds_per_epoch=(time.perf_counter() - start) / max(epochs, 1),
                             params=num_params(model))


def draw_cora(model: nn.Module, data: Data, path: Path) -> None:
    """The spanning forest that the model's tree scan used on Cora, vertices coloured by
    predicted class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    model.eval()
    inputs = []  # what the tree branch receives; its forest is rebuilt from it
    hook = model.mixer.register_forward_hook(lambda mod, args, out: inputs.append(args))
    with torch.no_grad():
        pred = model(data.x, data.edge_index).argmax(-1)
        hook.remove()
        tree = model.mixer(*inputs[0], return_tree=True)[1]
    edges = [(v, p) for v, p in enumerate(tree.parent.tolist()) if p >= 0]
    graph = nx.Graph(edges)
    graph.add_nodes_from(range(data.num_nodes))
    layout = nx.spring_layout(graph, seed=0, iterations=40)
    fig, ax = plt.subplots(figsize=(9, 9))
    nx.draw_networkx_edges(graph, layout, ax=ax, width=0.4, alpha=0.5)
    nx.draw_networkx_nodes(graph, layout, ax=ax, node_size=6, node_color=pred.tolist(),
                           cmap="tab10", vmin=0, vmax=9, linewidths=0)
    ax.set_title(f"Cora: the spanning forest of the tree branch ({tree.num_trees} trees), "
                 f"vertices coloured by predicted class", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="graphs_out", help="folder for the picture and JSON")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--length", type=int, default=24, help="far-label path length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="few epochs (checks the script)")
    parser.add_argument("--root", default=os.environ.get("TREESSM_DATA"),
                        help="root with planetoid/Cora (or a PyG root with Cora): also train "
                             "and draw Cora")
    parser.add_argument("--cora-only", action="store_true",
                        help="with --root: Cora alone (no karate, no far label)")
    parser.add_argument("--cora-picture", default=None,
                        help="file of the Cora drawing (default: OUT/cora_tree.png)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                        help="where to train; under torchrun with GPUs: cuda (default: cpu)")
    args = parser.parse_args(argv)
    world = setup(args.device)
    try:
        return _run(args, world)
    finally:
        world.close()


def _run(args, world: World) -> dict:
    from tqdm import tqdm

    out = Path(args.out)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
    epochs = 5 if args.quick else args.epochs
    tasks = [karate(), far_label(length=args.length, seed=args.seed,
                                 **(dict(num_train=8, num_test=4) if args.quick else {}))]
    summary = dict(example="graphs", epochs=epochs, seed=args.seed, processes=world.size,
                   results={})
    models = {}
    if args.cora_only:
        if not args.root:
            raise SystemExit("--cora-only needs --root (or $TREESSM_DATA)")
        tasks = []
    for task in tasks:
        for kind in ("tree_ssm", "gcn"):
            torch.manual_seed(args.seed)
            model = matched_model(kind, task, depth=2)
            bar = tqdm(total=epochs, desc=f"{task.name} {kind}", leave=False,
                       disable=not world.main)
            r = train_node_classifier(model, task, epochs, progress=lambda _: bar.update(),
                                      world=world)
            bar.close()
            summary["results"][f"{task.name}/{kind}"] = {k: round(v, 4) for k, v in r.items()}
            models[f"{task.name}/{kind}"] = model
    summary["param_checksum"] = sum(param_checksum(m) for m in models.values())
    if world.main and args.root:
        model, data, r = train_cora(args.root, 5 if args.quick else 200, args.seed)
        summary["results"]["cora/gcn_tree"] = {k: round(v, 4) for k, v in r.items()}
        picture = Path(args.cora_picture) if args.cora_picture else out / "cora_tree.png"
        draw_cora(model, data, picture)
        summary["cora_picture"] = str(picture)
    if world.main and tasks:
        draw_karate(models["karate/tree_ssm"].cpu(), tasks[0], out / "karate.png")
        summary["picture"] = str(out / "karate.png")
    if world.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary))
    print(f"param_checksum {summary['param_checksum']!r}", flush=True)
    return summary


if __name__ == "__main__":
    main()
