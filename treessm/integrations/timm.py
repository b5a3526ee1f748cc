"""GrootV backbones in timm's model registry.

timm is optional. When it is installed, importing this module registers ``grootv_tiny``,
``grootv_small`` and ``grootv_base`` so that timm's factory, training scripts and feature
extraction find them::

    import timm
    import treessm.integrations.timm  # noqa: F401  (registers the models)

    model = timm.create_model("grootv_tiny", num_classes=100, drop_path_rate=0.2)
    backbone = timm.create_model("grootv_tiny", features_only=True, out_indices=(1, 2, 3))

There are no pretrained weights: ``pretrained=True`` raises.
"""
from __future__ import annotations

from typing import Callable, Dict

from ..models import grootv as _grootv
from ..typing import WITH_TIMM, require

__all__ = ["register_timm_models", "is_registered", "MODEL_NAMES"]

MODEL_NAMES = ("grootv_tiny", "grootv_small", "grootv_base")

# ImageNet statistics and input size, as timm's data pipeline expects in a model's config.
_PRETRAINED_CFG = dict(input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                       interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                       std=(0.229, 0.224, 0.225), first_conv="stem.conv1",
                       classifier="head")

_registered: Dict[str, Callable] = {}


def _entrypoint(name: str) -> Callable:
    constructor = getattr(_grootv, name)

    def create(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None,
               cache_dir=None, **kwargs):
        # cache_dir: where timm would download pretrained weights; there are none to fetch
        if pretrained:
            raise ValueError(f"{name} has no pretrained weights; use pretrained=False")
        if pretrained_cfg or pretrained_cfg_overlay:
            raise ValueError(f"{name} has no pretrained configurations, got "
                             f"pretrained_cfg={pretrained_cfg!r}, "
                             f"pretrained_cfg_overlay={pretrained_cfg_overlay!r}")
        model = constructor(**kwargs)
        cfg = dict(_PRETRAINED_CFG, architecture=name, num_classes=model.num_classes)
        model.pretrained_cfg = cfg
        model.default_cfg = cfg
        return model

    # timm keys its registry by the entrypoint's name and module
    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = constructor.__doc__
    return create


def register_timm_models() -> tuple:
    """Register the GrootV constructors with timm's model registry (idempotent).

    Returns:
        the registered model names.

    Raises:
        ImportError: timm is not installed.
    """
    require("timm", "registering GrootV models with timm")
    import timm
    from timm.models import register_model

    for name in MODEL_NAMES:
        if name in _registered and timm.is_model(name):
            continue
        fn = _entrypoint(name)
        globals()[name] = fn  # timm looks the entrypoint up in its module
        register_model(fn)
        _registered[name] = fn
    return MODEL_NAMES


def is_registered() -> bool:
    """Whether the GrootV models are in timm's registry."""
    return len(_registered) == len(MODEL_NAMES)


if WITH_TIMM:  # register on import when timm is there; stay importable without it
    register_timm_models()
