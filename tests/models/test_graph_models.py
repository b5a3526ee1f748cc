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
