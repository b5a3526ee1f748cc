"""The GrootVL authors' GrootV weights in treessm's GrootV: names, shapes, strictness, and the
same function for the same weights.

The authors' names and shapes of all three sizes (``grootvl_state_dict_shapes.json``) were
read from their released model definition (``GrootV(channels=80 / 96 / 128, depths=...)``
of github.com/EasonXiao-888/GrootVL). Their model is re-written below from its definition
in plain torch (their stem, levels, head and mixer; the tree by Kruskal over exp(-cos)
edge costs rooted at the first pixel, as their breadth-first search is; the scan by the
dense oracle), sharing no code with treessm's model.
"""
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from oracle import dense_tree_scan, kruskal_parents
from treessm.models import (GrootV, grootv_base, grootv_small, grootv_tiny, grootvl_to_treessm,
                            load_grootvl_checkpoint, read_grootvl_checkpoint,
                            treessm_to_grootvl)

AUTHORS = Path(__file__).with_name("grootvl_state_dict_shapes.json")
SIZES = {"tiny": grootv_tiny, "small": grootv_small, "base": grootv_base}
TENSORS = {"tiny": 333, "small": 413, "base": 413}


@pytest.fixture(scope="module")
def authors_shapes():
    return json.loads(AUTHORS.read_text())


def meta_state_dict(shapes):
    """A state dict with the authors' names and shapes, on the meta device (no memory)."""
    return {k: torch.empty(v, device="meta",
                           dtype=torch.long if k.endswith("num_batches_tracked") else None)
            for k, v in shapes.items()}


# ---------------------------------------------------------------------------- all sizes
@pytest.mark.parametrize("size", SIZES)
def test_authors_checkpoint_loads_strictly_into_each_size(authors_shapes, size):
    shapes = authors_shapes[size]
    assert len(shapes) == TENSORS[size]
    with torch.device("meta"):
        model = SIZES[size]()
    ours = grootvl_to_treessm(meta_state_dict(shapes))
    target = model.state_dict()
    assert list(ours) and set(ours) == set(target)
    assert all(ours[k].shape == target[k].shape for k in target)
    model.load_state_dict(ours, strict=True)
    load_grootvl_checkpoint(model, meta_state_dict(shapes))
    back = treessm_to_grootvl(model)
    assert {k: list(v.shape) for k, v in back.items()} == shapes


def test_a_checkpoint_of_another_size_names_the_first_mismatch(authors_shapes):
    with torch.device("meta"):
        small = grootv_small()
        base = grootv_base()
    with pytest.raises(ValueError, match=r"patch_embed\.conv1\.weight has shape \[40, 3, 3, 3\] "
                                         r"in the checkpoint, but the model's stem\.conv1\.weight "
                                         r"has \[48, 3, 3, 3\]"):
        load_grootvl_checkpoint(small, meta_state_dict(authors_shapes["tiny"]))
    with pytest.raises(ValueError, match="another GrootV size"):
        load_grootvl_checkpoint(base, meta_state_dict(authors_shapes["small"]))


def test_truncated_and_foreign_checkpoints_are_refused(authors_shapes):
    with torch.device("meta"):
        tiny = grootv_tiny()
    shapes = dict(authors_shapes["tiny"])
    del shapes["levels.2.blocks.4.TreeSSM.A_logs"]
    with pytest.raises(ValueError, match=r"lacks levels\.2\.blocks\.4\.TreeSSM\.A_logs \(the "
                                         r"model's stages\.2\.blocks\.4\.mixer\.A_log"):
        load_grootvl_checkpoint(tiny, meta_state_dict(shapes))
    # a deeper checkpoint: a tensor with no place in the model
    with torch.device("meta"):
        shallow = GrootV(depths=(2, 2, 7, 2))
    with pytest.raises(ValueError, match=r"levels\.2\.blocks\.7\.norm1\.0\.weight \(treessm's "
                                         r"stages\.2\.blocks\.7\.norm1\.weight\) has no place"):
        load_grootvl_checkpoint(shallow, meta_state_dict(authors_shapes["tiny"]))
    # names that are not the authors'
    with pytest.raises(ValueError, match=r"'levels\.0\.blocks\.0\.dcn\.weight', which is not"):
        load_grootvl_checkpoint(tiny, dict(meta_state_dict(authors_shapes["tiny"]),
                                           **{"levels.0.blocks.0.dcn.weight": torch.empty(1)}))
    with pytest.raises(ValueError, match="load it with model.load_state_dict"):
        grootvl_to_treessm(tiny.state_dict())
    bad = meta_state_dict(authors_shapes["tiny"])
    bad["levels.0.blocks.0.TreeSSM.x_proj_weight"] = torch.empty(4, 7, 160, device="meta")
    with pytest.raises(ValueError, match="leading axis of size 1"):
        grootvl_to_treessm(bad)
    with pytest.raises(TypeError, match="map names to tensors"):
        grootvl_to_treessm({"head.bias": [0.0]})
    with pytest.raises(ValueError, match="has no tensor for 'extra.weight'"):
        treessm_to_grootvl({"extra.weight": torch.empty(1)})


def test_backbones_and_other_classifiers_take_what_they_build(authors_shapes):
    sd = meta_state_dict(authors_shapes["tiny"])
    with torch.device("meta"):
        backbone = grootv_tiny(features_only=True, out_indices=(1, 2))
        ten = grootv_tiny(num_classes=10)
    load_grootvl_checkpoint(backbone, sd)  # no head, no stage 3: those tensors are skipped
    assert len(backbone.stages) == 3
    with pytest.raises(ValueError, match="no classifier"):
        load_grootvl_checkpoint(backbone, sd, classifier=True)
    with pytest.raises(ValueError, match="always has its classification head"):
        treessm_to_grootvl(backbone)
    load_grootvl_checkpoint(ten, sd)  # the 1000-class classifier is left out
    with pytest.raises(ValueError, match=r"head\.weight has shape \[1000, 960\]"):
        load_grootvl_checkpoint(ten, sd, classifier=True)


# ---------------------------------------------------------------------------- files
def small_model(**kwargs):
    kwargs.setdefault("dims", (8, 16, 32, 64))
    kwargs.setdefault("depths", (1, 1, 2, 1))
    return GrootV(**kwargs)


def randomize(model, seed=0):
    """Every parameter and BatchNorm statistic random, so that no tensor can be mixed up
    with another unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (0.5 if t.dim() == 1 else 0.2)
                        + (1.0 if name.endswith("norm.weight") or ".norm1.weight" in name
                           or ".norm2.weight" in name else 0.0))
    return model


def test_checkpoint_files_round_trip(tmp_path):
    model = randomize(small_model(num_classes=5)).eval()
    authors = treessm_to_grootvl(model)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in authors.items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"model": authors, "model_ema": ema, "epoch": 299, "max_accuracy": 83.4}, path)
    fresh = small_model(num_classes=5)
    load_grootvl_checkpoint(fresh, path)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    load_grootvl_checkpoint(fresh, str(path), use_ema=True)
    assert torch.equal(fresh.stem.conv1.weight, model.stem.conv1.weight + 1)
    # a bare state dict with data-parallel names
    torch.save({"module." + k: v for k, v in authors.items()}, tmp_path / "bare.pth")
    assert set(read_grootvl_checkpoint(tmp_path / "bare.pth")) == set(authors)
    with pytest.raises(ValueError, match="without 'model_ema'"):
        read_grootvl_checkpoint(tmp_path / "bare.pth", use_ema=True)
    torch.save({"model": authors}, tmp_path / "no_ema.pth")
    with pytest.raises(ValueError, match="no 'model_ema' entry"):
        read_grootvl_checkpoint(tmp_path / "no_ema.pth", use_ema=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        read_grootvl_checkpoint(tmp_path / "missing.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds no state dict"):
        read_grootvl_checkpoint(tmp_path / "list.pth")


class TrainingConfig(dict):
    """Stands for the yacs config that the authors' training checkpoints pickle."""


def test_checkpoints_pickling_other_objects_need_consent(tmp_path):
    model = small_model()
    path = tmp_path / "train.pth"
    torch.save({"model": treessm_to_grootvl(model), "config": TrainingConfig(lr=5e-4)}, path)
    with pytest.raises(pickle.UnpicklingError, match="weights_only=False"):
        read_grootvl_checkpoint(path)
    assert set(read_grootvl_checkpoint(path, weights_only=False)) == set(treessm_to_grootvl(model))


def test_pretrained_path_in_the_constructors(tmp_path, authors_shapes):
    with pytest.raises(ValueError, match="downloads nothing"):
        grootv_tiny(pretrained=True)
    model = randomize(small_model())
    path = tmp_path / "small.pth"
    torch.save({"model": treessm_to_grootvl(model)}, path)
    with pytest.raises(ValueError, match="another GrootV size"):
        grootv_tiny(pretrained=path, device="meta")
    again = small_model()
    again.load_pretrained(str(path))
    assert torch.equal(again.head.weight, model.head.weight)


# ---------------------------------------------------------------------------- the function
def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + "weight"], sd[prefix + "bias"], eps)


def authors_tree(feat):
    """Their tree of one image: minimum spanning tree of the 4-neighbour grid under
    exp(-cosine similarity), walked from the first pixel. ``feat [D, H, W]``."""
    d, h, w = feat.shape
    flat = feat.reshape(d, h * w)
    pairs = [(i * w + j, (i + 1) * w + j) for i in range(h - 1) for j in range(w)]
    pairs += [(i * w + j, i * w + j + 1) for i in range(h) for j in range(w - 1)]
    cost = {p: math.exp(-float(F.cosine_similarity(flat[:, p[0]], flat[:, p[1]], dim=0)))
            for p in pairs}
    return kruskal_parents(h * w, pairs, lambda s, t: cost[(s, t)], root=0)


def authors_mixer(x, sd, p):
    """Their Tree_SSM on a channels-last map ``x [B, H, W, C]``, ``d_state = 1``."""
    u, z = (x @ sd[p + "in_proj.weight"].T).chunk(2, dim=-1)
    z = F.silu(z)
    d = u.shape[-1]
    u = F.silu(F.conv2d(u.permute(0, 3, 1, 2), sd[p + "conv2d.weight"], padding=1, groups=d))
    b, _, h, w = u.shape
    xs = u.reshape(b, d, h * w)
    x_proj, dt_w, dt_b = (sd[p + k][0] for k in ("x_proj_weight", "dt_projs_weight",
                                                  "dt_projs_bias"))
    rank = dt_w.shape[1]
    dts, bs, cs = torch.einsum("bdl,cd->bcl", xs, x_proj).split([rank, 1, 1], dim=1)
    delta = F.softplus(torch.einsum("brl,dr->bdl", dts, dt_w) + dt_b[None, :, None])
    decay = torch.exp(delta * -torch.exp(sd[p + "A_logs"])[None])  # [B, D, L]
    bx = delta * bs * xs
    hs = torch.stack([dense_tree_scan(bx[i].T, decay[i].T, authors_tree(u[i]), "both")
                      for i in range(b)])  # [B, L, D]
    y = _ln(hs, sd, p + "h_norm.", 1e-5) * cs.transpose(1, 2) + sd[p + "Ds"] * xs.transpose(1, 2)
    y = _ln(y, sd, p + "out_norm.", 1e-5).reshape(b, h, w, d) * z
    return y @ sd[p + "out_proj.weight"].T


def authors_grootv(images, sd, depths):
    """Their GrootV forward (evaluation mode) from their state dict."""
    x = F.conv2d(images, sd["patch_embed.conv1.weight"], sd["patch_embed.conv1.bias"], 2, 1)
    x = _ln(x.permute(0, 2, 3, 1), sd, "patch_embed.norm1.1.", 1e-6).permute(0, 3, 1, 2)
    x = F.conv2d(F.gelu(x), sd["patch_embed.conv2.weight"], sd["patch_embed.conv2.bias"], 2, 1)
    x = _ln(x.permute(0, 2, 3, 1), sd, "patch_embed.norm2.1.", 1e-6)
    levels = []
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f"levels.{i}.blocks.{j}."
            x = x + authors_mixer(_ln(x, sd, p + "norm1.0.", 1e-6), sd, p + "TreeSSM.")
            y = F.gelu(_ln(x, sd, p + "norm2.0.", 1e-6) @ sd[p + "mlp.fc1.weight"].T
                       + sd[p + "mlp.fc1.bias"])
            x = x + y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        x = _ln(x, sd, f"levels.{i}.norm.0.", 1e-6)
        levels.append(x.permute(0, 3, 1, 2))
        if i < len(depths) - 1:
            x = F.conv2d(x.permute(0, 3, 1, 2), sd[f"levels.{i}.downsample.conv.weight"],
                         None, 2, 1)
            x = _ln(x.permute(0, 2, 3, 1), sd, f"levels.{i}.downsample.norm.1.", 1e-6)
    x = F.conv2d(x.permute(0, 3, 1, 2), sd["conv_head.0.weight"])
    x = F.batch_norm(x, sd["conv_head.1.0.running_mean"], sd["conv_head.1.0.running_var"],
                     sd["conv_head.1.0.weight"], sd["conv_head.1.0.bias"], False, 0.0, 1e-5)
    x = F.gelu(x).mean(dim=(2, 3))
    return x @ sd["head.weight"].T + sd["head.bias"], levels


def test_same_weights_same_function_as_the_authors_model():
    """Two images, non-square, not a multiple of 32: stages of 7x9, 4x5, 2x3, 1x2 pixels."""
    torch.manual_seed(0)
    model = randomize(small_model(num_classes=6)).double().eval()
    authors = treessm_to_grootvl(model)
    images = torch.randn(2, 3, 28, 36, dtype=torch.float64)
    want, levels = authors_grootv(images, authors, model.depths)
    with torch.no_grad():
        final, maps = model.forward_intermediates(images)
        got = model.forward_head(final)
    assert [tuple(m.shape[2:]) for m in maps] == [(7, 9), (4, 5), (2, 3), (1, 2)]
    for mine, theirs in zip(maps, levels):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # loaded the other way, from their names, the function is the same
    fresh = small_model(num_classes=6).double().eval()
    load_grootvl_checkpoint(fresh, authors)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), want, rtol=1e-9, atol=1e-9)
