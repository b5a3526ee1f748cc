"""The expanded selective scan of backends without a fused kernel, in blocks of channels
(:func:`treessm.ops.selective_scan.expanded_in_blocks`): the values of one block, for the
output, the returned states and every gradient, with every option that slices by channel.
(Channels are computed independently; on the CPU torch's vectorised and scalar ``exp`` may
differ in the last bit between a strided block and the whole row, hence the tolerance.)"""
import functools

import pytest
import torch

import treessm
from oracle import random_forest
from treessm.ops.selective_scan import expanded_in_blocks, reference_tree_scan

N, D, S = 40, 7, 3


def _inputs(tree, direction, gen):
    t = dict(u=torch.randn(N, D, generator=gen, dtype=torch.float64),
             delta=torch.randn(N, D, generator=gen, dtype=torch.float64),
             A=-torch.rand(D, S, generator=gen, dtype=torch.float64),
             B=torch.randn(N, S, generator=gen, dtype=torch.float64),
             C=torch.randn(N, S, generator=gen, dtype=torch.float64),
             D=torch.randn(D, generator=gen, dtype=torch.float64),
             delta_bias=torch.randn(D, generator=gen, dtype=torch.float64),
             edge=torch.randn(N, D, generator=gen, dtype=torch.float64))
    if direction == "down":
        t["initial"] = torch.randn(tree.num_trees, D, S, generator=gen, dtype=torch.float64)
    return {k: v.requires_grad_() for k, v in t.items()}


def _run(tree, leaves, direction, edge_rule, block_bytes):
    edge_step = leaves["edge"] if edge_rule == "tensor" else edge_rule
    out = expanded_in_blocks(
        leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], tree, leaves["D"],
        leaves["delta_bias"], True, direction, edge_step, scan=reference_tree_scan,
        block_bytes=block_bytes, initial_state=leaves.get("initial"),
        state_vertices=torch.tensor([0, 5, 17]))
    y, states = out
    g = torch.Generator().manual_seed(9)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() \
        + (states * torch.randn(states.shape, generator=g, dtype=y.dtype)).sum()
    names = sorted(leaves)
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    return y, states, dict(zip(names, grads))


@pytest.mark.parametrize("direction", ["both", "up", "down"])
@pytest.mark.parametrize("edge_rule", ["child", "mean", "tensor"])
def test_blocks_of_channels_give_the_values_of_one_block(direction, edge_rule):
    gen = torch.Generator().manual_seed(4)
    tree = treessm.Tree.from_parent(random_forest(N, 3, gen))
    leaves = _inputs(tree, direction, gen)
    whole = _run(tree, leaves, direction, edge_rule, block_bytes=1 << 40)
    per_channel = N * S * 8
    for width in (1, 2, 3):  # 7 channels in blocks of 1, 2 and 3 (a short last block)
        got = _run(tree, leaves, direction, edge_rule, block_bytes=width * per_channel)
        close = functools.partial(torch.testing.assert_close, rtol=1e-12, atol=1e-12)
        close(got[0], whole[0])
        close(got[1], whole[1])
        for k, g in whole[2].items():
            if g is None:
                assert got[2][k] is None, k
            else:
                close(got[2][k], g, msg=f"{width} {k}")


@pytest.mark.parametrize("direction", ["both", "down"])
def test_state_norm_in_blocks_gives_the_values_of_one_block(direction):
    # the normalisation couples every state of a vertex: blocks return their moments,
    # combined in order; every gradient, including the norm's affine, as from one block
    gen = torch.Generator().manual_seed(5)
    tree = treessm.Tree.from_parent(random_forest(N, 2, gen))
    leaves = _inputs(tree, direction, gen)
    leaves["norm_weight"] = (1 + 0.3 * torch.randn(D, S, generator=gen,
                                                    dtype=torch.float64)).requires_grad_()
    leaves["norm_bias"] = (0.3 * torch.randn(D * S, generator=gen,
                                             dtype=torch.float64)).requires_grad_()
    calls = []

    def counting_scan(x, w, tree, direction):
        calls.append(x.shape[1])
        return reference_tree_scan(x, w, tree, direction)

    def run(block_bytes):
        out = expanded_in_blocks(
            leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], tree,
            leaves["D"], leaves["delta_bias"], True, direction, "mean", scan=counting_scan,
            block_bytes=block_bytes, initial_state=leaves.get("initial"),
            state_vertices=torch.tensor([3, 8]), state_norm=True,
            norm_weight=leaves["norm_weight"], norm_bias=leaves["norm_bias"], norm_eps=1e-3)
        y, states = out
        g = torch.Generator().manual_seed(11)
        loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() \
            + (states * torch.randn(states.shape, generator=g, dtype=y.dtype)).sum()
        names = sorted(k for k in leaves if k != "edge")
        return y, states, dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])))

    whole = run(1 << 40)
    assert calls == [D]
    calls.clear()
    got = run(3 * N * S * 8)  # blocks of 3, 3 and 1 channels
    assert calls[:3] == [3, 3, 1]
    close = functools.partial(torch.testing.assert_close, rtol=1e-10, atol=1e-10)
    close(got[0], whole[0])
    close(got[1], whole[1])
    for k, g in whole[2].items():
        close(got[2][k], g, msg=k)


@pytest.mark.parametrize("floor,widths", [(0, [1] * D), (2 * S * 8, [2, 2, 2, 1])])
def test_blocks_hold_at_least_the_row_floor_per_vertex(monkeypatch, floor, widths):
    # a problem without a fused kernel is cut by the byte budget, but never into blocks of
    # fewer than EXPANSION_MIN_ROW_BYTES of states per vertex
    from treessm.ops import selective_scan as ss

    gen = torch.Generator().manual_seed(6)
    tree = treessm.Tree.from_parent(random_forest(N, 3, gen))
    leaves = _inputs(tree, "both", gen)
    calls = []

    def counting_scan(x, w, tree, direction, **kwargs):
        calls.append(x.shape[1])
        return reference_tree_scan(x, w, tree, direction)

    no_fused = ss.FusedKernels(None, None, None, lambda direction, moments, d_state: False,
                               lambda *sizes: 0)
    monkeypatch.setitem(ss.FUSED_KERNELS, "numba", no_fused)
    monkeypatch.setattr(ss, "tree_scan", counting_scan)
    monkeypatch.setattr(ss, "EXPANSION_BLOCK_BYTES", N * S * 8)  # one channel of float64
    monkeypatch.setattr(ss, "EXPANSION_MIN_ROW_BYTES", floor)
    args = [leaves[k] for k in ("u", "delta", "A", "B", "C")]
    y = ss.selective_tree_scan(*args, tree, D=leaves["D"], delta_bias=leaves["delta_bias"],
                               delta_softplus=True, edge_step="mean", backend="numba")
    assert calls == widths  # the channels of each block
    want = ss.selective_tree_scan_ref(*args, tree, D=leaves["D"],
                                      delta_bias=leaves["delta_bias"], delta_softplus=True,
                                      edge_step="mean")
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
