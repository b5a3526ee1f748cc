"""The fused CUDA grid-cost kernel (``torch.ops.treessm.cuda_grid_costs`` and
:func:`treessm.topology.cuda_grid.grid_costs`) against ``grid_costs_torch``, and
``GridTopology`` on CUDA features against the CPU construction. Needs a CUDA GPU and the
extension."""
import pytest
import torch

import treessm
from treessm import Topology
from treessm.ops.plan import level_plan
from treessm.topology import cuda_grid, distance, grid
from treessm.topology.distance import EPS, grid_costs_torch, kind_code

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU: torch.cuda.is_available() is False")]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TREE_FIELDS = ("parent", "order", "child_ptr", "tree_ptr", "depth", "batch")


@pytest.fixture(scope="module")
def ops(cuda_ops):
    if not hasattr(cuda_ops, "cuda_grid_costs"):
        pytest.skip("the loaded CUDA extension predates cuda_grid_costs")
    return cuda_ops


def tolerance(dtype):
    # both paths accumulate in float32 (float64 for float64), in different orders
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-6)


def reference(feat, b, h, w, connectivity, distance):
    return grid_costs_torch(feat.reshape(b * h * w, feat.shape[-1]).cpu(), b, h, w,
                            connectivity, distance)


# (B, H, W, C): 1 x W, H x 1 and 1 x 1 images, odd C (single-element loads), C with 16-byte
# rows, and rows of 1 to 256 packs (every group size of the launch)
SHAPES = [(2, 1, 7, 3), (2, 6, 1, 5), (3, 1, 1, 4), (2, 2, 2, 1), (3, 7, 5, 8), (2, 9, 11, 36),
          (2, 8, 8, 68), (1, 13, 12, 33), (2, 14, 14, 160), (1, 6, 7, 400), (1, 5, 4, 1024),
          (1, 3, 5, 2048)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("connectivity", [4, 8])
def test_op_matches_torch(ops, dtype, connectivity):
    gen = torch.Generator().manual_seed(connectivity + DTYPES.index(dtype))
    for b, h, w, c in SHAPES:
        feat = torch.randn(b, h, w, c, generator=gen, dtype=torch.float64).to(dtype)
        x = feat.cuda().reshape(b * h * w, c)
        for distance in ("cosine", "l2"):
            got = ops.cuda_grid_costs(x, b, h, w, connectivity, kind_code(distance), EPS, 0)
            ref = reference(feat, b, h, w, connectivity, distance)
            assert got.is_cuda and got.dtype == ref.dtype
            torch.testing.assert_close(got.cpu(), ref, **tolerance(dtype),
                                       msg=lambda m: f"{b}x{h}x{w}x{c} {distance}: {m}")


def test_op_layouts_and_empty(ops):
    gen = torch.Generator().manual_seed(3)
    b, h, w, c = 2, 5, 6, 12
    feat = torch.randn(b, h, w, c, generator=gen)
    ref = reference(feat, b, h, w, 8, "cosine")
    kind = kind_code("cosine")
    # [B, H, W, C] as is
    got = ops.cuda_grid_costs(feat.cuda(), b, h, w, 8, kind, EPS, 0)
    torch.testing.assert_close(got.cpu(), ref, **tolerance(torch.float32))
    # rows shifted off 16-byte alignment (single-element loads), and a non-contiguous view
    storage = torch.zeros(b * h * w * c + 1, device="cuda")
    storage[1:] = feat.cuda().reshape(-1)
    shifted = storage[1:].view(b * h * w, c)
    got = ops.cuda_grid_costs(shifted, b, h, w, 8, kind, EPS, 0)
    torch.testing.assert_close(got.cpu(), ref, **tolerance(torch.float32))
    wide = torch.zeros(b * h * w, 2 * c, device="cuda")
    wide[:, ::2] = feat.cuda().reshape(-1, c)
    got = ops.cuda_grid_costs(wide[:, ::2], b, h, w, 8, kind, EPS, 0)
    torch.testing.assert_close(got.cpu(), ref, **tolerance(torch.float32))
    # no images, 1 x 1 images, no channels
    assert ops.cuda_grid_costs(torch.zeros(0, 4, device="cuda"), 0, 3, 3, 4, kind, EPS, 0).numel() == 0
    assert ops.cuda_grid_costs(torch.zeros(3, 4, device="cuda"), 3, 1, 1, 8, kind, EPS, 0).numel() == 0
    none = torch.zeros(2 * 9, 0, device="cuda")
    assert ops.cuda_grid_costs(none, 2, 3, 3, 4, kind, EPS, 0).eq(1).all()
    assert ops.cuda_grid_costs(none, 2, 3, 3, 4, kind_code("l2"), EPS, 0).eq(0).all()


def test_op_zero_features(ops):
    feat = torch.randn(1, 4, 4, 8, dtype=torch.float64)
    feat[0, 1] = 0.0
    got = ops.cuda_grid_costs(feat.cuda(), 1, 4, 4, 8, kind_code("cosine"), EPS, 0)
    torch.testing.assert_close(got.cpu(), reference(feat, 1, 4, 4, 8, "cosine"),
                               **tolerance(torch.float64))


def test_op_beyond_32_bit_offsets(ops):
    """More than 2^31 feature elements: row offsets need 64 bits."""
    b, h, w, c = 2049, 32, 32, 1024  # 2.15e9 bfloat16 elements, 4.3 GB
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with 24 GB")
    feat = torch.empty(b, h, w, c, device="cuda", dtype=torch.bfloat16)
    assert feat.numel() > 2**31
    tail = torch.randn(2, h, w, c, generator=torch.Generator().manual_seed(8))
    feat[-2:] = tail.to(device="cuda", dtype=torch.bfloat16)
    feat[:-2] = 1.0
    for distance in ("cosine", "l2"):
        got = ops.cuda_grid_costs(feat, b, h, w, 8, kind_code(distance), EPS, 0)
        e = cuda_grid.num_candidate_edges(h, w, 8)
        ref = reference(tail.to(torch.bfloat16), 2, h, w, 8, distance)
        torch.testing.assert_close(got[-2 * e:].cpu(), ref, **tolerance(torch.bfloat16))
    del feat, got
    torch.cuda.empty_cache()


def test_grid_costs_wrapper(ops):
    gen = torch.Generator().manual_seed(4)
    feat = torch.randn(2, 5, 6, 7, generator=gen)
    got = cuda_grid.grid_costs(feat.cuda(), 2, 5, 6, 8, "l2")
    torch.testing.assert_close(got.cpu(), reference(feat, 2, 5, 6, 8, "l2"),
                               **tolerance(torch.float32))
    assert cuda_grid.grid_costs(feat, 2, 5, 6) is None  # CPU features
    with pytest.raises(ValueError, match="feat must have shape"):
        cuda_grid.grid_costs(feat.cuda(), 2, 5, 5)
    with pytest.raises(ValueError, match="connectivity"):
        cuda_grid.grid_costs(feat.cuda(), 2, 5, 6, 6)
    with pytest.raises(ValueError, match="distance"):
        cuda_grid.grid_costs(feat.cuda(), 2, 5, 6, 4, "hamming")
    with pytest.raises(TypeError, match="floating-point"):
        cuda_grid.grid_costs(feat.cuda().long(), 2, 5, 6)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_topology_on_cuda_gives_the_cpu_tree(ops, connectivity, distance):
    # float64 features: no near-ties that the two paths could round apart
    gen = torch.Generator().manual_seed(5 * connectivity + (distance == "l2"))
    topo = treessm.GridTopology(connectivity, distance)
    for b, h, w, c in [(3, 9, 8, 16), (2, 1, 7, 3), (2, 6, 1, 5), (2, 1, 1, 4), (0, 4, 4, 2),
                       (4, 23, 19, 40)]:
        feat = torch.randn(b, h, w, c, generator=gen, dtype=torch.float64)
        cpu = topo(feat)
        gpu = topo(feat.cuda())
        assert gpu.device.type == "cuda"
        for name in TREE_FIELDS:
            assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), (name, b, h, w)
        for got, want in zip(level_plan(gpu), level_plan(cpu)):
            assert torch.equal(got.cpu(), want)


def test_topology_image_too_large_for_the_fused_tree(ops):
    # the tree kernel declines (shared memory), the costs still come from the cost kernel
    feat = torch.randn(1, 300, 300, 3, generator=torch.Generator().manual_seed(9),
                       dtype=torch.float64)
    assert not cuda_grid.fits(300, 300, 8, "cuda")
    cpu = treessm.GridTopology(8)(feat)
    gpu = treessm.GridTopology(8)(feat.cuda())
    for name in TREE_FIELDS:
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name


def test_topology_uses_the_kernel_and_falls_back(ops, monkeypatch):
    gen = torch.Generator().manual_seed(6)
    feat = torch.randn(2, 10, 12, 24, generator=gen, dtype=torch.float64)
    cpu = treessm.GridTopology()(feat)

    def forbidden(*args, **kwargs):
        raise AssertionError("the torch cost path ran")

    monkeypatch.setattr(grid, "grid_costs_torch", forbidden)
    monkeypatch.setattr(distance, "grid_costs_torch", forbidden)
    topo = treessm.GridTopology()
    # the fused build and the step-by-step path (edge_cost) both use the kernel
    for tree in (topo(feat.cuda()), Topology.__call__(topo, feat.cuda())):
        for name in TREE_FIELDS:
            assert torch.equal(getattr(tree, name).cpu(), getattr(cpu, name)), name
    monkeypatch.undo()
    # features the cost kernel does not take (it declines): tensor operations, same tree
    monkeypatch.setattr(cuda_grid, "_COST_TYPES", ())
    tree = treessm.GridTopology()(feat.cuda())
    for name in TREE_FIELDS:
        assert torch.equal(getattr(tree, name).cpu(), getattr(cpu, name)), name


def test_topology_half_and_grad_features(ops):
    gen = torch.Generator().manual_seed(7)
    feat = torch.randn(2, 8, 9, 16, generator=gen, device="cpu").cuda().requires_grad_()
    for x in (feat, feat.detach().half(), feat.detach().bfloat16()):
        tree = treessm.GridTopology(8)(x)
        assert tree.num_nodes == 144 and tree.num_trees == 2
        assert not tree.parent.requires_grad


def test_topology_does_not_synchronise(ops):
    feat = torch.randn(32, 56, 56, 160, device="cuda")
    topo = treessm.GridTopology()
    level_plan(topo(feat))  # warm up: load, device properties, candidate grid
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tree = topo(feat)
        level_plan(tree)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tree.num_trees == 32


@pytest.mark.parametrize("group", [1, 4, 32])
def test_op_lanes_per_pixel(ops, group):
    # every group size computes the same costs as the torch reference
    gen = torch.Generator().manual_seed(1)
    for b, h, w, c in [(2, 7, 9, 160), (1, 5, 6, 7), (1, 4, 4, 1024)]:
        feat = torch.randn(b, h, w, c, generator=gen)
        for conn in (4, 8):
            for kind, name in ((0, "cosine"), (1, "l2")):
                got = ops.cuda_grid_costs(feat.cuda(), b, h, w, conn, kind, EPS, group)
                ref = grid_costs_torch(feat.reshape(-1, c), b, h, w, conn, name)
                torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["cosine", "l2"])
def test_edge_list_costs_match_torch(ops, dtype, name):
    # the edge-list kernel (cuda_edge_costs) against edge_cost on the CPU: self-loops,
    # repeated edges, rows of 1 to 1,024 channels, zero rows, a row of extreme scale among
    # ordinary ones (cosine: each row is scaled on its own) and features of extreme scale
    # (l2: all of them are scaled by one power of two)
    gen = torch.Generator().manual_seed(31 + DTYPES.index(dtype) + 5 * (name == "l2"))
    for n, e, c in [(1, 1, 3), (5, 12, 1), (50, 200, 8), (300, 2000, 36), (40, 100, 1024)]:
        feat = torch.randn(n, c, generator=gen, dtype=torch.float64)
        feat[0] = 0
        if dtype in (torch.float32, torch.float64):
            if name == "cosine":
                feat[1 % n] *= 1e30
            else:
                feat *= 1e30
        feat = feat.to(dtype)
        ei = torch.randint(0, n, (2, e), generator=gen)
        ei[:, 0] = ei[0, 0]
        got = cuda_grid.pair_costs_cuda(feat.cuda(), ei.cuda(), name)
        ref = distance.edge_cost(feat, ei, name)
        assert got.dtype == ref.dtype and got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), ref, **tolerance(dtype))
    assert cuda_grid.pair_costs_cuda(torch.randn(3, 2), torch.zeros(2, 1, dtype=torch.long)) is None
    empty = cuda_grid.pair_costs_cuda(torch.randn(3, 2, device="cuda"),
                                      torch.zeros(2, 0, dtype=torch.long, device="cuda"), name)
    assert empty.shape == (0,)


def test_edge_list_l2_of_mixed_scales_equals_the_cpu_kernel(ops):
    # one row of scale 1e30 among ordinary ones: after the one power of two that brings the
    # largest magnitude near 1, the squared differences of ordinary rows underflow float32
    # on both kernels (the CPU's compiled one and this one) alike, so GraphTopology's trees
    # stay the same on both devices
    gen = torch.Generator().manual_seed(41)
    for n, e, c in [(5, 12, 1), (50, 200, 8), (300, 2000, 36)]:
        feat = torch.randn(n, c, generator=gen)
        feat[1] *= 1e30
        ei = torch.randint(0, n, (2, e), generator=gen)
        got = cuda_grid.pair_costs_cuda(feat.cuda(), ei.cuda(), "l2")
        ref = distance.pair_costs_cpu(feat, ei[0].numpy(), ei[1].numpy(), "l2")
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=0)


def test_graph_topology_on_cuda_equals_the_cpu_tree(ops):
    # GraphTopology's costs on the GPU come from the edge-list kernel: the same forest
    gen = torch.Generator().manual_seed(33)
    n = 3000
    x = torch.randn(n, 24, generator=gen)
    ei = torch.randint(0, n, (2, 5 * n), generator=gen)
    for name in ("cosine", "l2"):
        topo = treessm.GraphTopology(distance=name)
        cpu, gpu = topo(x, ei), topo(x.cuda(), ei.cuda())
        for f in TREE_FIELDS[:-1]:
            assert torch.equal(getattr(gpu, f).cpu(), getattr(cpu, f)), (name, f)
