"""Extreme but finite features: trees do not depend on the scale of the features (1e-30 or
1e30 give the tree of the same features near 1), rows of wildly different scales are fine
under the cosine, and every topology rejects NaN or infinite features on the CPU."""
import pytest
import torch

from treessm import GraphTopology, GridTopology, SequenceTopology
from treessm.topology import CausalSequenceTopology, GrootLTopology
from treessm.topology.distance import (edge_cost, grid_costs_cpu, grid_costs_torch,
                                       pair_costs_cpu, scale_by_power_of_two)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_EDGES = torch.randint(0, 84, (2, 240), generator=torch.Generator().manual_seed(5))


def _feat(dtype=torch.float32, device="cpu"):
    return torch.randn(2, 6, 7, 8, generator=torch.Generator().manual_seed(3),
                       dtype=dtype).to(device)


# topology -> how it is called on features [2, 6, 7, 8]
BUILDERS = {
    "grid4": lambda d: lambda x: GridTopology(4, d)(x),
    "grid8": lambda d: lambda x: GridTopology(8, d)(x),
    "graph": lambda d: lambda x: GraphTopology(d)(x.reshape(84, 8), _EDGES.to(x.device)),
    "sequence": lambda d: lambda x: SequenceTopology(3, d)(x.reshape(2, 42, 8)),
    "grootl": lambda d: lambda x: GrootLTopology(distance=d)(x.reshape(2, 42, 8)),
    "causal": lambda d: lambda x: CausalSequenceTopology(3, d)(x.reshape(2, 42, 8)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distance", ["cosine", "l2"])
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_tree_does_not_depend_on_the_scale(kind, distance, device):
    build = BUILDERS[kind](distance)
    x = _feat(device=device)
    ref = build(x).parent
    # powers of two: the very same costs, so the very same tree
    for scale in (2.0 ** 120, 2.0 ** -120, 2.0 ** -140):
        assert torch.equal(build(x * scale).parent, ref), scale
    # decimal scales change the costs by rounding only
    for scale in (1e30, 1e-30, 1e36):
        assert torch.equal(build(x * scale).parent, ref), scale
    x64 = _feat(torch.float64, device)
    ref64 = build(x64).parent
    for scale in (1e300, 1e-300, 2.0 ** -1000):
        assert torch.equal(build(x64 * scale).parent, ref64), scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_rows_of_any_scale_under_the_cosine(kind, device):
    build = BUILDERS[kind]("cosine")
    x = _feat(device=device)
    rows = torch.logspace(-35, 35, 84, device=device)[torch.randperm(84)].reshape(2, 6, 7, 1)
    assert torch.equal(build(x * rows).parent, build(x).parent)
    zero = x.clone()
    zero[0, 1:3] = 0  # zero rows: cosine 0 with everything, no NaN
    assert build(zero).num_nodes == 84


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_are_rejected(kind, bad):
    for distance in ("cosine", "l2"):
        x = _feat()
        x[1, 2, 3, 4] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            BUILDERS[kind](distance)(x)


def test_cpu_kernels_agree_with_the_torch_path_at_extreme_scales():
    x = _feat().reshape(84, 8)
    rows = torch.logspace(-30, 30, 84).reshape(84, 1)
    src, dst = _EDGES[0].numpy(), _EDGES[1].numpy()
    for feat in (x * rows, x * 1e-30, x * 1e30):
        for distance in ("cosine", "l2"):
            torch.testing.assert_close(grid_costs_cpu(feat, 2, 6, 7, 8, distance),
                                       grid_costs_torch(feat, 2, 6, 7, 8, distance))
            torch.testing.assert_close(pair_costs_cpu(feat, src, dst, distance),
                                       edge_cost(feat, _EDGES, distance))


def test_scale_by_power_of_two():
    x = torch.tensor([[3.0, -6.0], [0.0, 0.0], [1e-40, 0.0], [float("inf"), 1.0]])
    y = scale_by_power_of_two(x, -1)
    assert torch.equal(y[0], torch.tensor([0.375, -0.75]))  # exact: 6 * 2^-3
    assert torch.equal(y[1], x[1]) and torch.equal(y[3], x[3])
    assert 0.5 <= float(y[2, 0]) < 1.0
    assert scale_by_power_of_two(torch.zeros(0, 3), -1).shape == (0, 3)
    big = torch.full((2, 3), 3e38, dtype=torch.float32)
    assert torch.isfinite(scale_by_power_of_two(big, (0, 1))).all()
