"""TreeGPSConv: shapes, permutation equivariance, batch consistency, gradients to every
parameter, PyG Sequential, edge features through the local layer."""
import pytest
import torch
from torch_geometric.data import Batch, Data
from torch_geometric.nn import GINEConv, Sequential, global_mean_pool

from treessm.nn import TreeGPSConv, TreeSSMConv, local_conv


def _graph(n, e, seed, c=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randint(0, n, (2, e), generator=g)


def _block(conv="gcn", **kw):
    torch.manual_seed(0)
    # layer norm per node: a batch's rows do not depend on the other graphs of the batch
    return TreeGPSConv(8, conv=conv, d_state=2, norm="layer_norm",
                       norm_kwargs=dict(mode="node"), **kw).double().eval()


@pytest.mark.parametrize("conv", ["gcn", "sage", "gat", "gin", None])
def test_shapes_and_equivariance(conv):
    block = _block(conv)
    x, ei = _graph(40, 100, 1)
    x = x.double()
    y = block(x, ei)
    assert y.shape == (40, 8)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(40)
    torch.testing.assert_close(block(x[perm], inv[ei]), y[perm], rtol=1e-9, atol=1e-10)


def test_batch_consistent():
    block = _block("sage")
    graphs = [Data(x=_graph(n, 2 * n, n)[0].double(), edge_index=_graph(n, 2 * n, n)[1])
              for n in (6, 1, 15, 9)]
    batch = Batch.from_data_list(graphs)
    y = block(batch.x, batch.edge_index, batch=batch.batch)
    torch.testing.assert_close(y, torch.cat([block(d.x, d.edge_index) for d in graphs]))


def test_gradients_reach_every_parameter():
    torch.manual_seed(3)
    block = TreeGPSConv(8, conv="gat", d_state=2, dropout=0.1).double()
    x, ei = _graph(30, 80, 4)
    x = x.double().requires_grad_()
    (block(x, ei) * torch.randn(30, 8, dtype=torch.float64)).sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_edge_features_reach_the_local_layer_and_sequential_use():
    torch.manual_seed(5)
    block = TreeGPSConv(8, conv="gine", edge_dim=3, d_state=2)
    assert isinstance(block.conv, GINEConv) and isinstance(block.mixer, TreeSSMConv)
    x, ei = _graph(20, 50, 6)
    attr = torch.randn(50, 3)
    model = Sequential("x, edge_index, edge_attr, batch", [
        (block, "x, edge_index, edge_attr -> x"),
        (global_mean_pool, "x, batch -> x"),
        torch.nn.Linear(8, 2),
    ]).eval()
    out = model(x, ei, attr, torch.zeros(20, dtype=torch.long))
    assert out.shape == (1, 2)
    assert not torch.allclose(block(x, ei, attr * 2), block(x, ei, attr))
    assert "TreeGPSConv(\n  8, dropout=0.0" in repr(block)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="conv must be one of"):
        TreeGPSConv(8, conv="transformer")
    with pytest.raises(TypeError, match="conv must be a name"):
        TreeGPSConv(8, conv=3)
    with pytest.raises(ValueError, match="must be divisible by heads"):
        local_conv("gat", 6)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 8\]"):
        TreeGPSConv(8)(torch.randn(4, 5), torch.zeros(2, 0, dtype=torch.long))


def test_topology_reaches_the_tree_mixer():
    from treessm.topology import chain_tree

    def chain(feat, graph, batch):
        return chain_tree(1, feat.shape[0], feat.device)

    block = TreeGPSConv(8, conv=None, topology=chain)
    assert block.mixer.topology is chain
    _, tree = block.mixer(torch.randn(5, 8), torch.empty(2, 0, dtype=torch.long),
                          return_tree=True)
    assert tree.parent.tolist() == [-1, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="give topology once"):
        TreeGPSConv(8, topology=chain, mixer_kwargs={"topology": chain})
