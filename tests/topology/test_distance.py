"""Edge costs: hand-checked values, and the compiled CPU kernels against the torch path."""
import math

import numpy as np
import pytest
import torch

from treessm.topology.distance import edge_cost, grid_costs_cpu, pair_costs_cpu
from treessm.topology.grid import grid_edges


def test_cosine_hand_values():
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [0.0, 0.0]])
    ei = torch.tensor([[0, 0, 0, 0, 4], [1, 2, 3, 4, 4]])
    expected = [math.exp(-1), 1.0, math.e, 1.0, 1.0]  # parallel, orthogonal, opposite, zero
    for cost in (edge_cost(x, ei, "cosine"),
                 pair_costs_cpu(x, ei[0].numpy(), ei[1].numpy(), "cosine")):
        assert cost.tolist() == pytest.approx(expected, rel=1e-6)
        assert torch.isfinite(cost).all()


def test_l2_and_callable():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    ei = torch.tensor([[0, 1], [1, 2]])
    assert edge_cost(x, ei, "l2").tolist() == pytest.approx([5.0, math.sqrt(13)])
    assert pair_costs_cpu(x, ei[0].numpy(), ei[1].numpy(), "l2").tolist() == \
        pytest.approx([5.0, math.sqrt(13)])
    manhattan = lambda a, b: (a - b).abs().sum(-1)  # noqa: E731
    assert edge_cost(x, ei, manhattan).tolist() == [7.0, 5.0]


def test_no_gradient():
    x = torch.randn(5, 3, requires_grad=True)
    ei = torch.tensor([[0, 1, 2], [1, 2, 3]])
    for d in ("cosine", "l2", lambda a, b: (a * b).sum(-1)):
        assert not edge_cost(x, ei, d).requires_grad


def test_bad_distance_and_callable_output():
    x = torch.randn(3, 2)
    ei = torch.tensor([[0], [1]])
    with pytest.raises(ValueError, match="distance"):
        edge_cost(x, ei, "manhattan")
    with pytest.raises(ValueError, match="distance"):
        edge_cost(x, ei, lambda a, b: a)  # [E, C] instead of [E]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("channels", [1, 3, 16, 17, 40])
def test_cpu_kernels_match_torch(dtype, channels):
    gen = torch.Generator().manual_seed(channels)
    b, h, w = 2, 5, 7
    feat = torch.randn(b, h, w, channels, generator=gen).to(dtype)
    feat[0, 0, 0] = 0  # a zero vector
    x = feat.reshape(-1, channels)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for connectivity in (4, 8):
        ei = torch.from_numpy(grid_edges(b, h, w, connectivity))
        for dist in ("cosine", "l2"):
            ref = edge_cost(x, ei, dist)
            grid = grid_costs_cpu(x, b, h, w, connectivity, dist)
            pair = pair_costs_cpu(x, ei[0].numpy(), ei[1].numpy(), dist)
            assert grid.dtype == ref.dtype == pair.dtype
            torch.testing.assert_close(grid, ref, rtol=tol, atol=tol)
            torch.testing.assert_close(pair, ref, rtol=tol, atol=tol)


def test_grid_edge_order():
    ei = grid_edges(2, 2, 3, 8)
    # image 0: horizontal, vertical, diagonal, anti-diagonal; image 1 offset by 6
    expected = [(0, 1), (1, 2), (3, 4), (4, 5), (0, 3), (1, 4), (2, 5), (0, 4), (1, 5),
                (1, 3), (2, 4)]
    assert list(zip(ei[0][:11].tolist(), ei[1][:11].tolist())) == expected
    assert list(zip(ei[0][11:].tolist(), ei[1][11:].tolist())) == \
        [(u + 6, v + 6) for u, v in expected]


def test_kernels_are_deterministic():
    x = torch.randn(4 * 9 * 9, 33)
    a = grid_costs_cpu(x, 4, 9, 9, 8, "cosine")
    b = grid_costs_cpu(x.clone(), 4, 9, 9, 8, "cosine")
    assert torch.equal(a, b)
    np.testing.assert_array_equal(
        pair_costs_cpu(x, np.arange(10), np.arange(1, 11), "l2").numpy(),
        pair_costs_cpu(x.clone(), np.arange(10), np.arange(1, 11), "l2").numpy())


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_grid_costs_torch_match_gathered_costs(connectivity, distance):
    from treessm.topology.distance import edge_cost, grid_costs_torch
    from treessm.topology.grid import grid_edges

    b, h, w, c = 2, 5, 7, 6
    feat = torch.randn(b * h * w, c, generator=torch.Generator().manual_seed(1))
    edges = torch.from_numpy(grid_edges(b, h, w, connectivity))
    got = grid_costs_torch(feat, b, h, w, connectivity, distance)
    torch.testing.assert_close(got, edge_cost(feat, edges, distance), rtol=0, atol=1e-6)
