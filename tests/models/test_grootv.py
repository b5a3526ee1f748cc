import pytest
import torch

from treessm.models import GrootV, count_flops, grootv_base, grootv_small, grootv_tiny
from treessm.nn import TreeSSM, raster_tree


def small(**kwargs):
    kwargs.setdefault("dims", (8, 16, 24, 32))
    kwargs.setdefault("depths", (1, 1, 2, 1))
    return GrootV(**kwargs)


class CountingTopology:
    def __init__(self):
        self.calls = 0

    def __call__(self, feat):
        self.calls += 1
        b, h, w, _ = feat.shape
        return raster_tree(b, h, w, feat.device)


def test_forward_small_config():
    torch.manual_seed(0)
    model = small(num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    feats = model.forward_features(x)
    assert feats.shape == (2, 32, 2, 2)
    torch.testing.assert_close(model.forward_head(feats), out)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features) == (2, 48)


def test_grootv_tiny_at_64():
    torch.manual_seed(0)
    model = grootv_tiny().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert model.feature_info.channels() == [80, 160, 320, 640]
    assert model.feature_info.reduction() == [4, 8, 16, 32]


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 3), (-1,)])
def test_features_only(out_indices):
    torch.manual_seed(0)
    model = small(features_only=True, out_indices=out_indices)
    assert model.head is None
    idx = sorted(i % 4 for i in out_indices)
    assert len(model.stages) == idx[-1] + 1  # stages after the last output are not built
    maps = model(torch.randn(2, 3, 64, 96))
    dims, strides = (8, 16, 24, 32), (4, 8, 16, 32)
    assert [tuple(m.shape) for m in maps] == [
        (2, dims[i], 64 // strides[i], 96 // strides[i]) for i in idx]
    assert model.feature_info.channels() == [dims[i] for i in idx]
    assert model.feature_info.reduction() == [strides[i] for i in idx]
    assert [f["module"] for f in model.feature_info] == [f"stages.{i}" for i in idx]


def test_custom_strides_for_tiny_inputs():
    model = GrootV(num_classes=10, in_chans=1, dims=(8, 16), depths=(1, 1), stem_strides=(1, 1),
                   downsample_strides=(2,))
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert model.feature_info.reduction() == [1, 2]
    feats = GrootV(in_chans=1, dims=(8, 16, 16), depths=(1, 1, 1), stem_strides=(2, 1),
                   downsample_strides=(1, 2), features_only=True)(torch.randn(1, 1, 16, 16))
    assert [tuple(f.shape[2:]) for f in feats] == [(8, 8), (8, 8), (4, 4)]


def test_in_chans_num_classes_and_classifier():
    torch.manual_seed(0)
    model = small(in_chans=1, num_classes=5)
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, 48)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    assert small(num_classes=0)(torch.randn(2, 3, 32, 32)).shape == (2, 48)


def test_drop_path_rate():
    model = small(drop_path_rate=0.4)
    rates = [b.drop_path.p for s in model.stages for b in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.4) and rates == sorted(rates)
    assert len(rates) == 5
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, model(x))


def test_gradients_reach_all_parameters():
    torch.manual_seed(0)
    model = small(num_classes=4, drop_path_rate=0.1)
    # 64x64: the last stage still has 2x2 pixels, so its decays (A_log) are used
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([1, 3]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    assert model.no_weight_decay() == {n for n, _ in model.named_parameters()
                                       if n.endswith(("A_log", ".D"))}


def test_scan_options_reach_every_layer():
    raster = small(scan="raster")
    assert all(m.scan == "raster" for m in raster.modules() if isinstance(m, TreeSSM))
    assert raster(torch.randn(2, 3, 32, 32)).shape == (2, 1000)
    per_block, shared = CountingTopology(), CountingTopology()
    x = torch.randn(2, 3, 32, 32)
    small(topology=per_block)(x)
    small(topology=shared, shared_tree=True)(x)
    assert per_block.calls == 5  # one tree per block
    assert shared.calls == 4  # one tree per stage


def test_shared_tree_reuses_the_first_blocks_tree():
    torch.manual_seed(0)
    model = small(shared_tree=True).eval()
    trees = []
    for block in model.stages[2].blocks:
        block.mixer.register_forward_hook(lambda m, args, out: trees.append(out[1]))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(trees) == 2 and trees[1] is trees[0]


def test_parameter_counts_match_the_paper():
    with torch.device("meta"):
        counts = [sum(p.numel() for p in f().parameters())
                  for f in (grootv_tiny, grootv_small, grootv_base)]
    assert counts == [29_958_600, 51_331_624, 90_597_096]
    for count, paper in zip(counts, (30e6, 51e6, 91e6)):
        assert abs(count / paper - 1) < 0.03


def test_flops_match_the_paper():
    model = grootv_tiny()
    flops = count_flops(model, torch.randn(1, 3, 224, 224))
    assert abs(flops / 4.8e9 - 1) < 0.08
    assert model.training  # count_flops restores the mode
    # the tree scan is counted analytically on top of the operator-level count
    scan = sum(m.extra_macs(h * h) for m, h in
               [(m, 56 // 2 ** i) for i, s in enumerate(model.stages)
                for m in s.modules() if isinstance(m, TreeSSM)])
    assert scan == 27_596_800
    assert flops == 4_753_881_600


@pytest.mark.parametrize("kwargs, match", [
    (dict(depths=(2, 2), dims=(8, 16, 32)), "dims"),
    (dict(depths=(2, 0), dims=(8, 16)), "depths"),
    (dict(dims=(1, 16), depths=(1, 1)), "dims"),
    (dict(num_classes=-1), "num_classes"),
    (dict(in_chans=0), "in_chans"),
    (dict(drop_path_rate=1.0), "drop_path_rate"),
    (dict(drop_rate=-0.1), "drop_rate"),
    (dict(out_indices=(0, 1)), "features_only"),
    (dict(features_only=True, out_indices=(4,)), "out_indices"),
    (dict(features_only=True, out_indices=()), "out_indices"),
    (dict(stem_strides=(2,)), "stem_strides"),
    (dict(downsample_strides=(2, 2)), "downsample_strides"),
    (dict(scan="hilbert"), "scan"),
    (dict(scan="raster", topology=CountingTopology()), "topology"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small(**kwargs)


def test_invalid_input():
    model = small(in_chans=1)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        model.forward_features(torch.randn(32, 32))
