"""Empty inputs give empty outputs: a batch without images, images without rows or columns,
sequences without tokens, graphs without vertices. Outputs keep their shape and dtype and
stay connected to the parameters, so a training step on an empty batch runs."""
import pytest
import torch

import treessm
from treessm import GraphTopology, GridTopology, SequenceTopology, Tree
from treessm.models import GrootV, grootv_tiny
from treessm.nn import GrootLMixer, TreeSSM, TreeSSMConv
from treessm.topology import CausalSequenceTopology, GrootLTopology, chain_tree

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _assert_empty_forest(tree, device="cpu"):
    assert isinstance(tree, Tree) and tree.num_nodes == 0 and tree.num_trees == 0
    assert tree.device.type == torch.device(device).type
    assert tree.roots.shape == (0,) and tree.order.shape == (0,)
    x = torch.zeros(0, 3, device=device)
    assert treessm.tree_scan(x, x, tree).shape == (0, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 0, 4, 8), (2, 4, 0, 8), (0, 4, 4, 8), (0, 0, 0, 8)])
@pytest.mark.parametrize("connectivity", [4, 8])
def test_grid_topology(shape, connectivity, device):
    _assert_empty_forest(GridTopology(connectivity)(torch.randn(*shape, device=device)), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("topology", [SequenceTopology(1), SequenceTopology(2),
                                      GrootLTopology(), CausalSequenceTopology(3)],
                         ids=["chain", "window2", "grootl", "causal"])
@pytest.mark.parametrize("shape", [(2, 0, 4), (0, 3, 4)])
def test_sequence_topologies(topology, shape, device):
    _assert_empty_forest(topology(torch.randn(*shape, device=device)), device)


def test_chain_tree_without_vertices_has_no_trees():
    for chains, length in ((3, 0), (0, 3), (0, 0)):
        _assert_empty_forest(chain_tree(chains, length))


@pytest.mark.parametrize("device", DEVICES)
def test_graph_topology(device):
    x, ei = torch.randn(0, 4, device=device), torch.zeros(2, 0, dtype=torch.long, device=device)
    _assert_empty_forest(GraphTopology()(x, ei), device)
    _assert_empty_forest(GraphTopology()(x, ei, batch=torch.zeros(0, dtype=torch.long,
                                                                    device=device)), device)


def test_tree_and_spanning_tree():
    _assert_empty_forest(Tree.from_parent([]))
    mask = treessm.minimum_spanning_tree(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), 0)
    assert mask.shape == (0,) and mask.dtype == torch.bool


def _check_empty_output(module, x, expected_shape, *args, **kwargs):
    out = module(x, *args, **kwargs)
    assert out.shape == expected_shape and out.dtype == x.dtype
    out.sum().backward()  # a training step on an empty batch runs
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(not g.any() for g in grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 4, 4, 8), (2, 0, 4, 8), (2, 4, 0, 8)])
@pytest.mark.parametrize("scan", ["tree", "raster"])
def test_tree_ssm(shape, scan, device):
    layer = TreeSSM(8, scan=scan).to(device)
    _check_empty_output(layer, torch.randn(*shape, device=device), shape)
    out, tree = layer(torch.randn(*shape, device=device), return_tree=True)
    _assert_empty_forest(tree, device)


@pytest.mark.parametrize("device", DEVICES)
def test_tree_ssm_conv(device):
    conv = TreeSSMConv(4, 6).to(device)
    x, ei = torch.randn(0, 4, device=device), torch.zeros(2, 0, dtype=torch.long, device=device)
    _check_empty_output(conv, x, (0, 6), ei)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["chain", "causal", "paper"])
@pytest.mark.parametrize("shape", [(0, 4, 8), (2, 0, 8)])
def test_grootl_mixer(mode, shape, device):
    mixer = GrootLMixer(8, state_size=4, mode=mode).to(device)
    _check_empty_output(mixer, torch.randn(*shape, device=device), shape)
    mask = torch.ones(shape[:2], device=device)
    assert mixer(torch.randn(*shape, device=device), attention_mask=mask).shape == shape


@pytest.mark.parametrize("device", DEVICES)
def test_grootv(device):
    for training in (True, False):
        model = GrootV(num_classes=3, dims=(8, 16), depths=(1, 1)).to(device).train(training)
        assert model(torch.randn(0, 3, 32, 32, device=device)).shape == (0, 3)
    features = GrootV(dims=(8, 16), depths=(1, 1), features_only=True).to(device)
    assert [m.shape for m in features(torch.randn(0, 3, 32, 32, device=device))] == \
        [(0, 8, 8, 8), (0, 16, 4, 4)]


def test_grootv_tiny():
    with torch.no_grad():
        assert grootv_tiny().eval()(torch.randn(0, 3, 224, 224)).shape == (0, 1000)
