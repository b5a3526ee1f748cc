"""GrootV backbones in timm's model registry.

timm is optional. When it is installed, ``import treessm`` registers ``grootv_tiny``,
``grootv_small`` and ``grootv_base`` (by importing this module), so that timm's factory,
training scripts and feature extraction find them; without timm nothing happens and this
module still imports::

    import timm
    import treessm  # noqa: F401  (registers the models)

    model = timm.create_model("grootv_tiny", num_classes=100, drop_path_rate=0.2)
    backbone = timm.create_model("grootv_tiny", features_only=True, out_indices=(1, 2, 3))
    backbone.feature_info.channels(), backbone.feature_info.reduction()  # for a neck

    # the GrootVL authors' ImageNet-1K weights, from a local file (nothing is downloaded)
    model = timm.create_model("grootv_tiny", pretrained=True,
                              pretrained_cfg_overlay=dict(file="grootv_t_1k_224.pth"))

The models are built by timm's ``build_model_with_cfg``, as timm's own are: the
``features_only`` wrapper is timm's ``FeatureGetterNet`` over
:meth:`~treessm.models.GrootV.forward_intermediates`, the configurations are
:data:`treessm.models.grootv.default_cfgs`, and a checkpoint file is read by
:meth:`~treessm.models.GrootV.load_pretrained` (the classifier is kept fresh when
``num_classes`` differs from the checkpoint's).
"""
from __future__ import annotations

import warnings
from typing import Dict, Mapping

from ..models import grootv as _grootv
from ..models.grootv import GrootV
from ..models.grootvl_weights import grootvl_to_treessm
from ..typing import WITH_TIMM, require

__all__ = ["register_timm_models", "is_registered", "checkpoint_filter_fn", "MODEL_NAMES",
           "grootv_tiny", "grootv_small", "grootv_base"]

#: the names under which :func:`register_timm_models` registers GrootV with timm
MODEL_NAMES = ("grootv_tiny", "grootv_small", "grootv_base")

#: timm reads the pretrained configurations of a module's models from its ``default_cfgs``
#: (filled by :func:`register_timm_models` with timm's own objects).
default_cfgs: Dict = {}

_registered: Dict[str, object] = {}


def checkpoint_filter_fn(state_dict: Mapping, model: GrootV) -> Mapping:
    """timm's ``pretrained_filter_fn``: the authors' checkpoint (or its ``"model"`` entry) in
    treessm's names; a state dict already in treessm's names passes unchanged.

    Args:
        state_dict (Mapping): a checkpoint as timm loads it.
        model (GrootV): the model it is for (timm's signature; not read).

    Shapes:
        as :func:`~treessm.models.grootvl_to_treessm`.

    Returns:
        the state dict in treessm's names.

    Raises:
        ValueError, TypeError: as :func:`~treessm.models.grootvl_to_treessm`.

    Example:
        >>> from treessm.models import GrootV, treessm_to_grootvl
        >>> model = GrootV(num_classes=10, dims=(16, 32, 48, 64), depths=(1, 1, 1, 1))
        >>> theirs = {"model": treessm_to_grootvl(model)}
        >>> checkpoint_filter_fn(theirs, model).keys() == model.state_dict().keys()
        True
    """
    if isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    if any(k.startswith(("patch_embed.", "levels.")) for k in state_dict):
        return grootvl_to_treessm(state_dict)
    return state_dict


def _create(variant: str, pretrained: bool = False, **kwargs) -> GrootV:
    from timm.models import build_model_with_cfg

    if pretrained:
        cfg = dict(kwargs.get("pretrained_cfg_overlay") or {})
        given = kwargs.get("pretrained_cfg")
        if not (cfg.get("file") or cfg.get("state_dict")
                or (isinstance(given, Mapping) and (given.get("file") or given.get("state_dict")))):
            raise ValueError(
                f"{variant} has no weights to download: fetch the GrootVL authors' checkpoint "
                "(https://github.com/EasonXiao-888/GrootVL, see docs/vision.md) and pass "
                "pretrained_cfg_overlay=dict(file=path)")
        if cfg.get("file"):
            # the authors' training checkpoints pickle more than tensors: read them with
            # GrootV.load_pretrained, which says what to do, rather than a bare torch.load
            cfg.setdefault("custom_load", True)
            kwargs["pretrained_cfg_overlay"] = cfg
    return build_model_with_cfg(
        GrootV, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **dict(_grootv.ARCHITECTURES[variant], **kwargs))


def grootv_tiny(pretrained: bool = False, **kwargs) -> GrootV:
    """GrootV-T (30M parameters) through timm's builder (``timm.create_model(
    "grootv_tiny")`` calls it).

    Args:
        pretrained (bool): load the checkpoint of the model's ``pretrained_cfg`` (a local
            file given to timm as ``pretrained_cfg_overlay=dict(file=...)``). (default:
            ``False``)
        kwargs: arguments of :class:`~treessm.models.GrootV` and of timm's builder
            (``features_only``, ``out_indices``, ...).

    Shapes:
        as :class:`~treessm.models.GrootV`.

    Returns:
        :class:`~treessm.models.GrootV`

    Raises:
        ImportError: timm is not installed.

    Example:
        >>> import timm  # doctest: +SKIP
        >>> model = timm.create_model("grootv_tiny", num_classes=10)  # doctest: +SKIP
    """
    return _create("grootv_tiny", pretrained, **kwargs)


def grootv_small(pretrained: bool = False, **kwargs) -> GrootV:
    """GrootV-S (51M parameters) through timm's builder (``timm.create_model(
    "grootv_small")`` calls it).

    Args:
        pretrained (bool): load the checkpoint of the model's ``pretrained_cfg`` (a local
            file given to timm as ``pretrained_cfg_overlay=dict(file=...)``). (default:
            ``False``)
        kwargs: arguments of :class:`~treessm.models.GrootV` and of timm's builder
            (``features_only``, ``out_indices``, ...).

    Shapes:
        as :class:`~treessm.models.GrootV`.

    Returns:
        :class:`~treessm.models.GrootV`

    Raises:
        ImportError: timm is not installed.

    Example:
        >>> import timm  # doctest: +SKIP
        >>> model = timm.create_model("grootv_small", num_classes=10)  # doctest: +SKIP
    """
    return _create("grootv_small", pretrained, **kwargs)


def grootv_base(pretrained: bool = False, **kwargs) -> GrootV:
    """GrootV-B (91M parameters) through timm's builder (``timm.create_model(
    "grootv_base")`` calls it).

    Args:
        pretrained (bool): load the checkpoint of the model's ``pretrained_cfg`` (a local
            file given to timm as ``pretrained_cfg_overlay=dict(file=...)``). (default:
            ``False``)
        kwargs: arguments of :class:`~treessm.models.GrootV` and of timm's builder
            (``features_only``, ``out_indices``, ...).

    Shapes:
        as :class:`~treessm.models.GrootV`.

    Returns:
        :class:`~treessm.models.GrootV`

    Raises:
        ImportError: timm is not installed.

    Example:
        >>> import timm  # doctest: +SKIP
        >>> model = timm.create_model("grootv_base", num_classes=10)  # doctest: +SKIP
    """
    return _create("grootv_base", pretrained, **kwargs)


def register_timm_models() -> tuple:
    """Register the GrootV models with timm's model registry (idempotent). A name that
    timm already knows from elsewhere is left to its owner, with a warning.

    Returns:
        the names registered by treessm.

    Raises:
        ImportError: timm is not installed (the message says how to install it).

    Example:
        >>> register_timm_models()  # doctest: +SKIP
        ('grootv_tiny', 'grootv_small', 'grootv_base')

        (run by ``import treessm`` whenever timm is installed).
    """
    require("timm", "registering GrootV models with timm")
    from timm.models import generate_default_cfgs, is_model, model_entrypoint, register_model

    if not default_cfgs:
        default_cfgs.update(generate_default_cfgs(_grootv.default_cfgs))
    for name in MODEL_NAMES:
        if name in _registered:
            continue
        if is_model(name) and getattr(model_entrypoint(name), "__module__", None) != __name__:
            warnings.warn(f"timm already has a model named {name!r}; treessm's GrootV is not "
                          "registered under that name (build it with treessm.models."
                          f"{name})", RuntimeWarning, stacklevel=2)
            continue
        _registered[name] = register_model(globals()[name])
    return tuple(_registered)


def is_registered() -> bool:
    """Whether treessm's GrootV models are in timm's registry.

    Returns:
        bool: ``True`` once :func:`register_timm_models` registered all of
        :data:`MODEL_NAMES`.

    Example:
        >>> is_registered() == treessm.typing.WITH_TIMM   # registered on import with timm
        True
    """
    return len(_registered) == len(MODEL_NAMES)


def _register_on_import() -> None:
    # importing treessm must never fail because of timm: a broken or incompatible
    # installation costs the registration, with a warning that says why
    try:
        register_timm_models()
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"treessm could not register its GrootV models with timm "
                      f"({type(exc).__name__}: {exc}); build them with treessm.models.grootv_*",
                      RuntimeWarning, stacklevel=2)


if WITH_TIMM:
    _register_on_import()
