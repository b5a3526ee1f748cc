"""The k-nearest-neighbour topology of docs/topologies.md does what the text says (the page's
code itself runs in tests/test_guides.py)."""
from pathlib import Path

import torch

from test_guides import blocks
from treessm import Tree

DOC = Path(__file__).resolve().parents[2] / "docs" / "topologies.md"


def test_tutorial_topology_does_what_the_text_says():
    code = [c for _, c, reason in blocks(DOC) if reason is None]
    start = next(i for i, c in enumerate(code) if "class KNNTopology" in c)
    namespace = {}
    for block in code[start:start + 2]:  # the class, then its use on two clouds
        exec(compile(block, str(DOC), "exec"), namespace)

    tree, feat, batch = namespace["tree"], namespace["feat"], namespace["batch"]
    topo = namespace["topo"]
    ref = Tree.from_parent(tree.parent, batch)
    for name in ("order", "child_ptr", "tree_ptr", "depth"):
        assert torch.equal(getattr(tree, name), getattr(ref, name))
    # the preferred root of each cloud is the point nearest its centre
    roots = topo.roots(feat, batch)
    for b in range(2):
        cloud = feat[batch == b]
        nearest = int((cloud - cloud.mean(0)).norm(dim=1).argmin()) + 300 * b
        assert int(roots[b]) == nearest
    # candidates: each point's k nearest of its own cloud; the tree uses only those
    edge_index = topo.candidate_edges(feat, batch)[0]
    assert edge_index.shape[1] == 600 * topo.k
    assert (batch[edge_index[0]] == batch[edge_index[1]]).all()
    dist = torch.cdist(feat, feat).masked_fill(batch[:, None] != batch[None, :], float("inf"))
    dist.fill_diagonal_(float("inf"))
    kth = dist.topk(topo.k, largest=False).values[:, -1]
    assert (dist[edge_index[0], edge_index[1]] <= kth[edge_index[0]]).all()
    child = torch.nonzero(tree.parent >= 0).view(-1)
    candidates = set(map(tuple, edge_index.T.tolist()))
    for c, p in zip(child.tolist(), tree.parent[child].tolist()):
        assert (c, p) in candidates or (p, c) in candidates
