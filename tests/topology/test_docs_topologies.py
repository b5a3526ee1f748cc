"""The code of docs/topologies.md runs as written and does what the text says."""
import re
from pathlib import Path

import torch

from treessm import Tree

DOC = Path(__file__).resolve().parents[2] / "docs" / "topologies.md"


def test_tutorial_code_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace = {}
    for block in blocks:  # the blocks build on each other, like a notebook
        exec(compile(block, str(DOC), "exec"), namespace)

    tree, pos, batch = namespace["tree"], namespace["pos"], namespace["batch"]
    ref = Tree.from_parent(tree.parent, batch)
    for name in ("order", "child_ptr", "tree_ptr", "depth"):
        assert torch.equal(getattr(tree, name), getattr(ref, name))
    # the preferred root of each cloud is the point nearest its centre
    roots = namespace["topo"].roots(namespace["feat"], pos, batch)
    for b in range(2):
        cloud = pos[batch == b]
        nearest = int((cloud - cloud.mean(0)).norm(dim=1).argmin()) + 300 * b
        assert int(roots[b]) == nearest
    # every tree edge is a kNN candidate edge, and no tree joins the two clouds
    child = torch.nonzero(tree.parent >= 0).view(-1)
    assert (batch[child] == batch[tree.parent[child]]).all()
    edge_index = namespace["topo"].candidate_edges(namespace["feat"], pos, batch)[0]
    candidates = set(map(tuple, edge_index.T.tolist()))
    for c, p in zip(child.tolist(), tree.parent[child].tolist()):
        assert (c, p) in candidates or (p, c) in candidates
