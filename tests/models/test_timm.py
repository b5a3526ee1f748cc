import sys
import types

import pytest
import torch

import treessm.integrations.timm as bridge
from treessm.models import GrootV


def test_registration_needs_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.setitem(sys.modules, "timm.models", None)
    with pytest.raises(ImportError, match=r"needs timm: pip install 'treessm\[timm\]'"):
        bridge.register_timm_models()


def test_entrypoints_follow_timms_calling_convention(monkeypatch):
    # a minimal stand-in for timm's registry: name -> entrypoint, keyed by fn.__name__
    registry = {}
    fake = types.ModuleType("timm")
    fake.models = types.ModuleType("timm.models")
    fake.models.register_model = lambda fn: registry.setdefault(fn.__name__, fn)
    fake.is_model = lambda name: name in registry
    monkeypatch.setitem(sys.modules, "timm", fake)
    monkeypatch.setitem(sys.modules, "timm.models", fake.models)
    monkeypatch.setattr(bridge, "_registered", {})

    assert bridge.register_timm_models() == ("grootv_tiny", "grootv_small", "grootv_base")
    assert bridge.is_registered() and sorted(registry) == sorted(bridge.MODEL_NAMES)
    assert bridge.register_timm_models() and len(registry) == 3  # idempotent
    fn = registry["grootv_tiny"]
    assert fn.__module__ == "treessm.integrations.timm"
    # timm.create_model calls entrypoint(pretrained=..., pretrained_cfg=..., overlay=..., **kw)
    with torch.device("meta"):
        model = fn(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None,
                   num_classes=10, drop_path_rate=0.1)
    assert isinstance(model, GrootV) and model.num_classes == 10 and model.dims[0] == 80
    assert model.pretrained_cfg["architecture"] == "grootv_tiny"
    assert model.pretrained_cfg["num_classes"] == 10
    with pytest.raises(ValueError, match="no pretrained weights"):
        fn(pretrained=True)
    with pytest.raises(ValueError, match="no pretrained configurations"):
        fn(pretrained_cfg="in1k")


def test_timm_create_model():
    timm = pytest.importorskip("timm")
    bridge.register_timm_models()
    model = timm.create_model("grootv_tiny", num_classes=10, drop_path_rate=0.1)
    assert isinstance(model, GrootV) and model.num_classes == 10
    backbone = timm.create_model("grootv_tiny", features_only=True, out_indices=(1, 3))
    maps = backbone(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [160, 640]
    assert backbone.feature_info.reduction() == [8, 32]
