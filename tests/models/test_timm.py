"""GrootV in timm's registry.

timm itself is optional (and not installed where these tests usually run): its calls into
the model are checked with a stand-in that makes the same calls as timm 1.x
(``register_model`` reading the module's ``default_cfgs``, ``build_model_with_cfg``
setting defaults from the configuration, loading a file with ``custom_load``, the
``FeatureGetterNet`` wrapper); the last tests run against timm where it is installed.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import treessm.integrations.timm as bridge
from treessm.models import GrootV, grootv_tiny, treessm_to_grootvl

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1))

STAND_IN = {
    "timm/__init__.py": '''
        """A stand-in for timm: the calls timm 1.x makes into a registered model."""
        from .models import create_model, is_model, list_models
    ''',
    "timm/models/__init__.py": '''
        import enum
        import fnmatch
        import sys

        import torch

        _entrypoints, _cfgs = {}, {}


        class Format(str, enum.Enum):
            NCHW = "NCHW"
            NHWC = "NHWC"


        def generate_default_cfgs(cfgs):
            out = {}
            for key, cfg in cfgs.items():
                arch, _, tag = key.partition(".")
                out.setdefault(arch, {})[tag] = dict(cfg)
            return out


        def register_model(fn):
            cfgs = getattr(sys.modules[fn.__module__], "default_cfgs", {}).get(fn.__name__)
            _entrypoints[fn.__name__] = fn
            if cfgs:
                _cfgs[fn.__name__] = dict(next(iter(cfgs.values())), architecture=fn.__name__)
            return fn


        def is_model(name):
            return name.split(".")[0] in _entrypoints


        def model_entrypoint(name):
            return _entrypoints[name.split(".")[0]]


        def list_models(pattern="*"):
            return sorted(n for n in _entrypoints if fnmatch.fnmatch(n, pattern))


        def create_model(name, pretrained=False, pretrained_cfg=None,
                         pretrained_cfg_overlay=None, **kwargs):
            return model_entrypoint(name)(pretrained=pretrained, pretrained_cfg=pretrained_cfg,
                                          pretrained_cfg_overlay=pretrained_cfg_overlay,
                                          **kwargs)


        class FeatureGetterNet(torch.nn.Module):
            def __init__(self, model, out_indices, norm=False):
                super().__init__()
                self.out_indices = model.prune_intermediate_layers(out_indices,
                                                                   prune_norm=not norm)
                info = model.feature_info
                for i, fi in enumerate(info):
                    assert fi["num_chs"] > 0 and "module" in fi
                    assert i == 0 or fi["reduction"] >= info[i - 1]["reduction"]
                self.feature_info = [info[i] for i in self.out_indices]
                self.model, self.norm = model, norm

            def forward(self, x):
                return self.model.forward_intermediates(
                    x, indices=self.out_indices, norm=self.norm, output_fmt=Format.NCHW,
                    intermediates_only=True)


        def build_model_with_cfg(model_cls, variant, pretrained, pretrained_cfg=None,
                                 pretrained_cfg_overlay=None, feature_cfg=None,
                                 pretrained_filter_fn=None, **kwargs):
            cfg = dict(_cfgs[variant], **(pretrained_cfg or {}), **(pretrained_cfg_overlay or {}))
            kwargs.setdefault("num_classes", cfg["num_classes"])
            kwargs.setdefault("in_chans", cfg["input_size"][0])
            features = kwargs.pop("features_only", False)
            out_indices = kwargs.pop("out_indices", feature_cfg["out_indices"])
            model = model_cls(**kwargs)
            model.pretrained_cfg = model.default_cfg = cfg
            if pretrained:
                if cfg.get("custom_load"):
                    model.load_pretrained(cfg["file"])
                else:
                    state = cfg.get("state_dict") or torch.load(cfg["file"])
                    state = dict(pretrained_filter_fn(state, model))
                    strict = kwargs["num_classes"] == cfg["num_classes"]
                    if not strict:
                        state.pop(cfg["classifier"] + ".weight")
                        state.pop(cfg["classifier"] + ".bias")
                    model.load_state_dict(state, strict=strict)
            if features:
                model = FeatureGetterNet(model, out_indices)
            return model
    ''',
}


def write_stand_in(root: Path) -> Path:
    for name, text in STAND_IN.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """The stand-in as ``timm`` for this test only, with a fresh treessm registration."""
    root = write_stand_in(tmp_path)
    modules = {}
    for name, path, search in (("timm.models", "timm/models/__init__.py", "timm/models"),
                               ("timm", "timm/__init__.py", "timm")):
        spec = importlib.util.spec_from_file_location(
            name, root / path, submodule_search_locations=[str(root / search)])
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        modules[name] = module
    monkeypatch.setattr(bridge, "_registered", {})
    monkeypatch.setattr(bridge, "default_cfgs", {})
    return modules["timm"]


def test_registration_needs_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.setitem(sys.modules, "timm.models", None)
    with pytest.raises(ImportError, match=r"needs timm: pip install 'treessm\[timm\]'"):
        bridge.register_timm_models()


def test_registration_and_timms_builder(stand_in):
    assert bridge.register_timm_models() == bridge.MODEL_NAMES
    assert bridge.is_registered() and bridge.register_timm_models() == bridge.MODEL_NAMES
    assert stand_in.list_models("grootv*") == sorted(bridge.MODEL_NAMES)
    assert set(bridge.default_cfgs) == set(bridge.MODEL_NAMES)
    model = stand_in.create_model("grootv_tiny", num_classes=10, drop_path_rate=0.1,
                                  device="meta")
    assert isinstance(model, GrootV) and model.num_classes == 10 and model.dims[0] == 80
    assert model.pretrained_cfg["architecture"] == "grootv_tiny"
    assert model.pretrained_cfg["crop_pct"] == 1.0
    torch.manual_seed(0)
    full = stand_in.create_model("grootv_tiny", **SMALL).eval()
    backbone = stand_in.create_model("grootv_tiny", features_only=True, out_indices=(1, -1),
                                     **SMALL)
    backbone.model.load_state_dict(full.state_dict(), strict=False)
    assert len(backbone.model.stages) == 4 and backbone.model.head is None
    assert [f["num_chs"] for f in backbone.feature_info] == [16, 32]
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        maps = backbone.eval()(x)
        want = full.forward_intermediates(x, indices=(1, 3), intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 8, 10), (2, 32, 2, 3)]
    for a, b in zip(maps, want):
        torch.testing.assert_close(a, b)


def test_timms_pretrained_path_reads_local_files(stand_in, tmp_path):
    bridge.register_timm_models()
    with pytest.raises(ValueError, match="no weights to download"):
        stand_in.create_model("grootv_tiny", pretrained=True)
    torch.manual_seed(0)
    source = GrootV(**SMALL).eval()
    path = tmp_path / "authors.pth"
    torch.save({"model": treessm_to_grootvl(source), "epoch": 299}, path)
    model = stand_in.create_model("grootv_tiny", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
    assert torch.equal(model.head.weight, source.head.weight)
    # another class count keeps a fresh classifier, as timm does
    ten = stand_in.create_model("grootv_tiny", pretrained=True, num_classes=10,
                                pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
    assert ten.head.out_features == 10
    assert torch.equal(ten.stem.conv1.weight, source.stem.conv1.weight)
    # timm's own loader (custom_load=False) goes through the filter
    overlay = dict(state_dict=treessm_to_grootvl(source))
    plain = stand_in.create_model("grootv_tiny", pretrained=True, **SMALL,
                                  pretrained_cfg_overlay=overlay)
    assert torch.equal(plain.stages[3].norm.weight, source.stages[3].norm.weight)
    assert bridge.checkpoint_filter_fn(source.state_dict(), plain) is not None


def test_a_name_timm_already_has_is_left_alone(stand_in):
    foreign = lambda pretrained=False, **kw: "theirs"  # noqa: E731
    sys.modules["timm.models"]._entrypoints["grootv_base"] = foreign
    with pytest.warns(RuntimeWarning, match="already has a model named 'grootv_base'"):
        assert bridge.register_timm_models() == ("grootv_tiny", "grootv_small")
    assert stand_in.create_model("grootv_base") == "theirs"


def _run(code: str, pythonpath: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([pythonpath, str(ROOT)]))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_import_treessm_registers_and_never_fails(tmp_path):
    root = write_stand_in(tmp_path / "working")
    done = _run("import treessm, timm; print(timm.list_models('grootv*'))", str(root))
    assert done.returncode == 0, done.stderr
    assert "['grootv_base', 'grootv_small', 'grootv_tiny']" in done.stdout
    broken = tmp_path / "broken" / "timm"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('torchvision does not match torch')\n")
    done = _run("import treessm; print(treessm.models.grootv_tiny)", str(broken.parent))
    assert done.returncode == 0, done.stderr
    assert "could not register its GrootV models with timm" in done.stderr
    assert "torchvision does not match torch" in done.stderr


# ---------------------------------------------------------------------------- timm itself
def test_with_timm(tmp_path):
    timm = pytest.importorskip("timm")
    import treessm  # noqa: F401  (registers on import)

    assert bridge.is_registered()
    assert set(timm.list_models("grootv*")) >= set(bridge.MODEL_NAMES)
    model = timm.create_model("grootv_tiny", num_classes=10, drop_path_rate=0.1)
    assert isinstance(model, GrootV) and model.num_classes == 10
    assert model.pretrained_cfg["crop_pct"] == 1.0
    backbone = timm.create_model("grootv_tiny", features_only=True, out_indices=(1, 3))
    maps = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape[1:]) for m in maps] == [(160, 8, 12), (640, 2, 3)]
    assert backbone.feature_info.channels() == [160, 640]
    assert backbone.feature_info.reduction() == [8, 32]
    source = grootv_tiny().eval()
    path = tmp_path / "authors.pth"
    torch.save({"model": treessm_to_grootvl(source)}, path)
    loaded = timm.create_model("grootv_tiny", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(loaded.head.weight, source.head.weight)
    with pytest.raises(ValueError, match="no weights to download"):
        timm.create_model("grootv_tiny", pretrained=True)
