"""Graph model builders: node and graph classifiers of TreeGPSConv blocks train on PyG
batches and give every graph of a batch what it gets alone."""
import torch
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader

from treessm.models import GraphNet, graph_classifier, node_classifier
from treessm.nn import TreeGPSConv


def _graphs(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        n = 4 + i % 7
        out.append(Data(x=torch.randn(n, 5, generator=g),
                        edge_index=torch.randint(0, n, (2, 2 * n), generator=g),
                        y=torch.tensor([i % 2])))
    return out


def test_node_classifier_learns_a_small_graph():
    torch.manual_seed(0)
    data = _graphs(1)[0]
    data.y = (data.x[:, 0] > 0).long()
    model = node_classifier(-1, 2, hidden_channels=16, d_state=2, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(data.x, data.edge_index), data.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.2
    assert model(data.x, data.edge_index).shape == (data.num_nodes, 2)


def test_graph_classifier_pools_each_graph_alone():
    torch.manual_seed(1)
    model = graph_classifier(5, 3, hidden_channels=8, num_layers=2, d_state=2,
                             norm="layer_norm").double().eval()
    model.blocks[0].norm2.mode = model.blocks[1].norm2.mode = "node"  # per-row norms
    for b in model.blocks:
        b.norm1.mode = b.norm3.mode = "node"
    graphs = _graphs(5)
    for d in graphs:
        d.x = d.x.double()
    batch = Batch.from_data_list(graphs)
    out = model(batch.x, batch.edge_index, batch=batch.batch)
    alone = torch.cat([model(d.x, d.edge_index, batch=torch.zeros(d.num_nodes, dtype=torch.long))
                       for d in graphs])
    assert out.shape == (5, 3)
    torch.testing.assert_close(out, alone)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for b in DataLoader(graphs, batch_size=2):
        loss = torch.nn.functional.cross_entropy(model(b.x, b.edge_index, batch=b.batch), b.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)


def test_graph_net_takes_any_block_factory():
    model = GraphNet(5, 8, 2, 3, block=lambda c: TreeGPSConv(c, conv=None, d_state=1))
    assert len(model.blocks) == 3 and all(b.conv is None for b in model.blocks)
    x, ei = _graphs(1)[0].x, _graphs(1)[0].edge_index
    assert model(x, ei).shape == (x.shape[0], 2)


# ------------------------------------------------------------------ LocalGlobalNet
def _local_global(mixer="tree", seed=0):
    from treessm.models import LocalGlobalNet

    torch.manual_seed(seed)
    return LocalGlobalNet(5, 8, 3, mixer=mixer, d_state=2)


def test_local_global_net_starts_as_the_plain_two_layer_network():
    """The mixer's output projection starts at zero: at initialisation the model with the
    tree branch gives the outputs of the same convolutions without it."""
    data = _graphs(1)[0]
    with_tree, plain = _local_global("tree").eval(), _local_global(None).eval()
    plain.conv1.load_state_dict(with_tree.conv1.state_dict())
    plain.conv2.load_state_dict(with_tree.conv2.state_dict())
    assert torch.count_nonzero(with_tree.mixer.out_proj.weight) == 0
    torch.testing.assert_close(with_tree(data.x, data.edge_index), plain(data.x, data.edge_index))


def test_local_global_net_trains_every_parameter_and_groups_each_once():
    data = _graphs(1)[0]
    data.y = (data.x[:, 0] > 0).long()
    model = _local_global()
    groups = model.parameter_groups(weight_decay=5e-4, mixer_weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0, 0.1]
    opt = torch.optim.Adam(groups, lr=0.05)
    for _ in range(3):  # the branch opens in the first step, then every parameter learns
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data.x, data.edge_index), data.y).backward()
        opt.step()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_local_global_net_reads_sparse_features_as_dense_ones():
    data = _graphs(1)[0]
    data.x[data.x.abs() < 1] = 0
    model = _local_global().eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.mixer.out_proj.weight)
    dense = model(data.x, data.edge_index)
    torch.testing.assert_close(model(data.x.to_sparse(), data.edge_index), dense)


def test_feature_dropout_of_sparse_features_drops_stored_entries_only():
    from treessm.models.graph import feature_dropout

    torch.manual_seed(0)
    x = torch.zeros(50, 40)
    x[torch.rand(50, 40) < 0.1] = 2.0
    out = feature_dropout(x.to_sparse(), 0.5, True).to_dense()
    assert set(out.unique().tolist()) <= {0.0, 4.0}       # dropped or scaled by 1 / (1 - p)
    assert torch.all(out[x == 0] == 0)
    kept = (out[x != 0] != 0).float().mean()
    assert 0.35 < kept < 0.65
    assert feature_dropout(x.to_sparse(), 0.5, False) is not None
    torch.testing.assert_close(feature_dropout(x, 0.5, False), x)


def test_local_global_net_rejects_an_unknown_mixer():
    import pytest
    from treessm.models import LocalGlobalNet

    with pytest.raises(ValueError, match="mixer"):
        LocalGlobalNet(5, 8, 3, mixer="attention")
    with pytest.raises(TypeError, match="mixer"):
        LocalGlobalNet(5, 8, 3, mixer=3)
