r"""The GrootVL authors' GrootV weights in treessm's :class:`~treessm.models.GrootV`, and back.

The authors publish ImageNet-1K checkpoints of GrootV-T/S/B (83.4 / 84.2 / 84.8 top-1) in
their repository https://github.com/EasonXiao-888/GrootVL (``docs/vision.md`` says how to
fetch and load them; treessm downloads nothing). A checkpoint holds their model's state
dict under ``"model"`` and, when trained with an exponential moving average, that
average under ``"model_ema"``.

Their model and treessm's compute the same function for the same weights; module by
module (theirs: ``GrootV/classification/models/grootv.py`` and ``tree_scanning.py``)::

    authors' module                               treessm module
    patch_embed (StemLayer: conv LN GELU conv LN) stem (grootv.Stem)
    levels.i.blocks.j (GrootVLayer, pre-norm)     stages.i.blocks.j (GrootVBlock)
      .norm1.0 / .norm2.0 / .mlp.fc1, .fc2          .norm1 / .norm2 / .mlp.fc1, .fc2
      .TreeSSM (Tree_SSM)                           .mixer (nn.TreeSSM)
      .TreeSSM.in_proj / .conv2d / .out_proj        .mixer.in_proj / .conv / .out_proj
      .TreeSSM.x_proj_weight [1, R + 2N, D]         .mixer.x_proj.weight [R + 2N, D]
      .TreeSSM.dt_projs_weight [1, D, R]            .mixer.dt_proj.weight [D, R]
      .TreeSSM.dt_projs_bias [1, D]                 .mixer.dt_proj.bias [D]
      .TreeSSM.A_logs / .Ds                         .mixer.A_log / .D
      .TreeSSM.h_norm / .out_norm                   .mixer.h_norm / .out_norm
    levels.i.norm.0 (closes level i)              stages.i.norm (closes stage i)
    levels.i.downsample (ends level i)            stages.{i+1}.downsample (opens stage i+1)
    conv_head.0 / conv_head.1.0 (BatchNorm)       conv_head.0 / conv_head.1
    head                                          head

What makes the functions equal, beyond the names: the backbone's LayerNorms have
``eps=1e-6`` and the mixer's ``h_norm`` / ``out_norm`` PyTorch's ``1e-5``, as theirs; the
mixer computes :math:`W_{out}(\mathrm{LN}(C\,\mathrm{LN}_h(h) + D u) \odot
\mathrm{SiLU}(z))` with :math:`u = \mathrm{SiLU}(\mathrm{DWConv}(W_{in} x))` and :math:`h`
the ``"both"`` tree scan of :math:`\Delta B u` over the minimum spanning tree of the
4-neighbour grid under :math:`\exp(-\cos)` of :math:`u`; and each edge decays with the
step of its end farther from the image's first pixel, where their breadth-first search
starts (treessm's grid trees are rooted there too). Their level ``i`` ends with the downsampling
that treessm's stage ``i + 1`` starts with: the same operations in the same order, so the
maps of :meth:`~treessm.models.GrootV.forward_intermediates` are theirs before
downsampling (their ``forward_features_seq_out``). Their ``drop_rate`` drops after the stem
and inside the MLPs, treessm's before the classifier: both are off in evaluation. Where two
candidate edges have exactly the same cost (constant image regions), the two minimum
spanning tree codes may choose different trees, and the outputs differ there.
"""
from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .._checks import check_bool

__all__ = ["grootvl_to_treessm", "treessm_to_grootvl", "read_grootvl_checkpoint",
           "load_grootvl_checkpoint"]

# One row per kind of tensor: (authors' name, treessm's name). {i} is a level / stage, {k}
# the stage i + 1 that treessm's downsampling belongs to, {j} a block, {p} the tensor
# (weight, bias, running_mean, ...).
_NAMES = (
    ("patch_embed.conv1.{p}", "stem.conv1.{p}"),
    ("patch_embed.norm1.1.{p}", "stem.norm1.{p}"),
    ("patch_embed.conv2.{p}", "stem.conv2.{p}"),
    ("patch_embed.norm2.1.{p}", "stem.norm2.{p}"),
    ("levels.{i}.blocks.{j}.norm1.0.{p}", "stages.{i}.blocks.{j}.norm1.{p}"),
    ("levels.{i}.blocks.{j}.TreeSSM.in_proj.{p}", "stages.{i}.blocks.{j}.mixer.in_proj.{p}"),
    ("levels.{i}.blocks.{j}.TreeSSM.conv2d.{p}", "stages.{i}.blocks.{j}.mixer.conv.{p}"),
    ("levels.{i}.blocks.{j}.TreeSSM.x_proj_weight", "stages.{i}.blocks.{j}.mixer.x_proj.weight"),
    ("levels.{i}.blocks.{j}.TreeSSM.dt_projs_weight", "stages.{i}.blocks.{j}.mixer.dt_proj.weight"),
    ("levels.{i}.blocks.{j}.TreeSSM.dt_projs_bias", "stages.{i}.blocks.{j}.mixer.dt_proj.bias"),
    ("levels.{i}.blocks.{j}.TreeSSM.A_logs", "stages.{i}.blocks.{j}.mixer.A_log"),
    ("levels.{i}.blocks.{j}.TreeSSM.Ds", "stages.{i}.blocks.{j}.mixer.D"),
    ("levels.{i}.blocks.{j}.TreeSSM.h_norm.{p}", "stages.{i}.blocks.{j}.mixer.h_norm.{p}"),
    ("levels.{i}.blocks.{j}.TreeSSM.out_norm.{p}", "stages.{i}.blocks.{j}.mixer.out_norm.{p}"),
    ("levels.{i}.blocks.{j}.TreeSSM.out_proj.{p}", "stages.{i}.blocks.{j}.mixer.out_proj.{p}"),
    ("levels.{i}.blocks.{j}.norm2.0.{p}", "stages.{i}.blocks.{j}.norm2.{p}"),
    ("levels.{i}.blocks.{j}.mlp.fc1.{p}", "stages.{i}.blocks.{j}.mlp.fc1.{p}"),
    ("levels.{i}.blocks.{j}.mlp.fc2.{p}", "stages.{i}.blocks.{j}.mlp.fc2.{p}"),
    ("levels.{i}.norm.0.{p}", "stages.{i}.norm.{p}"),
    ("levels.{i}.downsample.conv.{p}", "stages.{k}.downsample.conv.{p}"),
    ("levels.{i}.downsample.norm.1.{p}", "stages.{k}.downsample.norm.{p}"),
    ("conv_head.0.{p}", "conv_head.0.{p}"),
    ("conv_head.1.0.{p}", "conv_head.1.{p}"),
    ("head.{p}", "head.{p}"),
)
# the authors keep these per scan direction, with a leading axis of one direction
_STACKED = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias")

_FIELDS = {"i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "k": r"(?P<k>\d+)", "p": r"(?P<p>[a-z_]+)"}


def _pattern(template: str) -> "re.Pattern":
    parts = re.split(r"(\{[ijkp]\})", template)
    return re.compile("".join(_FIELDS[s[1]] if re.fullmatch(r"\{[ijkp]\}", s) else re.escape(s)
                              for s in parts) + r"\Z")


_RULES = tuple((_pattern(a), a, _pattern(t), t) for a, t in _NAMES)


def _fill(template: str, fields: Dict[str, str]) -> str:
    if "i" in fields and "k" not in fields:
        fields = dict(fields, k=str(int(fields["i"]) + 1))
    elif "k" in fields and "i" not in fields:
        fields = dict(fields, i=str(int(fields["k"]) - 1))
    return template.format(**fields)


def _authors_to_treessm_name(key: str) -> Optional[Tuple[str, bool]]:
    """treessm's name of an authors' tensor and whether it carries their leading axis."""
    for pattern, _, _, template in _RULES:
        m = pattern.match(key)
        if m:
            return _fill(template, m.groupdict()), key.rsplit(".", 1)[-1] in _STACKED
    return None


def _treessm_to_authors_name(name: str) -> Optional[Tuple[str, bool]]:
    """The authors' name of a treessm tensor and whether it takes their leading axis."""
    for _, template, pattern, _ in _RULES:
        m = pattern.match(name)
        if m and not (m.groupdict().get("k") == "0"):  # stage 0 has no downsampling
            key = _fill(template, m.groupdict())
            return key, key.rsplit(".", 1)[-1] in _STACKED
    return None


def _tensors(state_dict, name: str) -> Mapping[str, Tensor]:
    if isinstance(state_dict, nn.Module):
        return state_dict.state_dict()
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{name} must be a state dict (a mapping of names to tensors), got "
                        f"{type(state_dict).__name__}")
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise TypeError(f"{name} must map names to tensors, got {key!r}: "
                            f"{type(value).__name__}")
    return state_dict


def grootvl_to_treessm(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Rename the authors' GrootV state dict to treessm's names (and drop the leading axis
    of one scan direction of their ``x_proj_weight``, ``dt_projs_weight`` and
    ``dt_projs_bias``); the tensors are shared, not copied.

    Args:
        state_dict (Mapping[str, Tensor]): the authors' state dict (``checkpoint["model"]``).

    Returns:
        an ordered dict in treessm's names, for :meth:`torch.nn.Module.load_state_dict` of a
        :class:`~treessm.models.GrootV` of the same size (or, checked tensor by tensor,
        :func:`load_grootvl_checkpoint`).

    Raises:
        TypeError: ``state_dict`` is not a mapping of names to tensors.
        ValueError: a key that no tensor of the authors' GrootV has (named in the message),
            or a stacked tensor whose leading axis is not one.

    Shapes:
        the tensors keep their shapes, but for the three stacked ones: ``[1, *]`` becomes
        ``[*]``.

    Example:
        >>> model = GrootV(num_classes=10, dims=(16, 32, 48, 64), depths=(1, 1, 1, 1))
        >>> theirs = treessm_to_grootvl(model)                  # the authors' names
        >>> ours = grootvl_to_treessm(theirs)
        >>> ours.keys() == model.state_dict().keys()
        True
    """
    out = OrderedDict()
    for key, value in _tensors(state_dict, "state_dict").items():
        mapped = _authors_to_treessm_name(key)
        if mapped is None:
            hint = " (treessm's names: load it with model.load_state_dict)" \
                if _treessm_to_authors_name(key) is not None else ""
            raise ValueError(f"state_dict holds {key!r}, which is not a tensor of the GrootVL "
                             f"authors' GrootV{hint}")
        name, stacked = mapped
        if stacked:
            if value.dim() < 1 or value.shape[0] != 1:
                raise ValueError(f"{key} must have a leading axis of size 1 (one scan "
                                 f"direction), got shape {list(value.shape)}")
            value = value[0]
        out[name] = value
    return out


def treessm_to_grootvl(state_dict: Union[nn.Module, Mapping[str, Tensor]]) -> Dict[str, Tensor]:
    """The inverse of :func:`grootvl_to_treessm`: a treessm GrootV's weights in the names
    and shapes of the authors' model, for their ``model.load_state_dict``.

    Args:
        state_dict (nn.Module or Mapping[str, Tensor]): a :class:`~treessm.models.GrootV`
            with its classification head (their model always has one) or its state dict.

    Returns:
        an ordered dict in the authors' names; the tensors are shared, not copied.

    Raises:
        TypeError: not a module or a mapping of names to tensors.
        ValueError: a tensor the authors' model has no place for (named in the message), or
            a model without the head.

    Shapes:
        the tensors keep their shapes, but for the three the authors stack per scan
        direction: ``[*]`` becomes ``[1, *]``.

    Example:
        >>> theirs = treessm_to_grootvl(GrootV(num_classes=10, dims=(16, 32, 48, 64), depths=(1, 1, 1, 1)))
        >>> tuple(theirs["levels.0.blocks.0.TreeSSM.x_proj_weight"].shape)  # one direction
        (1, 3, 32)
    """
    if isinstance(state_dict, nn.Module) and (
            getattr(state_dict, "conv_head", True) is None
            or not isinstance(getattr(state_dict, "head", nn.Linear(1, 1)), nn.Linear)):
        raise ValueError("the authors' GrootV always has its classification head; convert a "
                         "model built without features_only, not pruned and with "
                         "num_classes > 0")
    out = OrderedDict()
    for name, value in _tensors(state_dict, "state_dict").items():
        mapped = _treessm_to_authors_name(name)
        if mapped is None:
            raise ValueError(f"the GrootVL authors' GrootV has no tensor for {name!r}")
        key, stacked = mapped
        out[key] = value.unsqueeze(0) if stacked else value
    return out


# ---------------------------------------------------------------------------- files
def read_grootvl_checkpoint(path: Union[str, os.PathLike], use_ema: bool = False,
                            weights_only: bool = True) -> Dict[str, Tensor]:
    """The authors' state dict stored in a local checkpoint file.

    Args:
        path (str or os.PathLike): a file written by the authors' training script (the state
            dict under ``"model"``, the moving average under ``"model_ema"``) or a bare state
            dict.
        use_ema (bool): take ``"model_ema"`` instead of ``"model"``. (default: ``False``)
        weights_only (bool): unpickle tensors and plain containers only
            (:func:`torch.load`). The authors' training checkpoints also pickle their
            ``yacs`` configuration: for those, either extract the state dict once into a
            file of its own or, for a file you trust, pass ``False`` (with ``yacs``
            installed). (default: ``True``)

    Returns:
        the state dict in the authors' names, with a ``module.`` prefix of data-parallel
        training removed.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no GrootV state dict, or ``use_ema`` without
            ``"model_ema"``.
        pickle.UnpicklingError: with ``weights_only``, a file that pickles other objects
            (the message says what to do).

    Shapes:
        the tensors as stored.

    Example:
        >>> theirs = treessm_to_grootvl(GrootV(num_classes=10, dims=(16, 32, 48, 64), depths=(1, 1, 1, 1)))
        >>> torch.save({"model": theirs, "model_ema": theirs}, "grootv_t.pth")
        >>> read_grootvl_checkpoint("grootv_t.pth", use_ema=True).keys() == theirs.keys()
        True
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    use_ema = check_bool(use_ema, "use_ema")
    weights_only = check_bool(weights_only, "weights_only")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {os.fspath(path)!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(
            f"{os.fspath(path)!r} pickles more than tensors (the authors' training "
            "checkpoints also store their yacs config and optimizer). If you trust the file, "
            "pass weights_only=False (needs `pip install yacs`), or extract the weights once: "
            "torch.save(torch.load(path, weights_only=False)['model'], 'grootv_in1k.pth'). "
            f"torch said: {exc}") from None
    except (EOFError, KeyError, IndexError, ValueError, RuntimeError) as exc:
        # an empty, truncated or foreign file: torch.load's own errors say little about it
        raise ValueError(f"{os.fspath(path)!r} is not a checkpoint that torch.load can read "
                         f"({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, Mapping) and ("model" in obj or "model_ema" in obj):
        key = "model_ema" if use_ema else "model"
        if key not in obj:
            raise ValueError(f"{os.fspath(path)!r} has no {key!r} entry (it has "
                             f"{sorted(k for k in obj if isinstance(k, str))})")
        obj = obj[key]
    elif use_ema:
        raise ValueError(f"{os.fspath(path)!r} holds a bare state dict, without 'model_ema'")
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{os.fspath(path)!r} holds no state dict (got "
                         f"{type(obj).__name__})")
    if all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = OrderedDict((k[len("module."):], v) for k, v in obj.items())
    return obj


def _shape(t: Tensor) -> list:
    return list(t.shape)


def load_grootvl_checkpoint(model: nn.Module,
                            checkpoint: Union[str, os.PathLike, Mapping[str, Tensor]],
                            use_ema: bool = False, classifier: Optional[bool] = None,
                            weights_only: bool = True) -> nn.Module:
    """Load the authors' GrootV weights into a treessm :class:`~treessm.models.GrootV`,
    strictly: every tensor of the model is filled from the checkpoint with its shape
    checked, and every tensor of the checkpoint is used, except those of the parts the
    model does not build (the head of a ``features_only`` model, its stages after the last
    output) and, as ``classifier`` says, the linear classifier.

    Args:
        model (GrootV): the model to fill, of the checkpoint's size (``grootv_tiny`` for
            GrootV-T, ...).
        checkpoint (str, os.PathLike or Mapping[str, Tensor]): a local file
            (:func:`read_grootvl_checkpoint`) or the authors' state dict itself.
        use_ema (bool): from a file, load the moving average (``"model_ema"``). (default:
            ``False``)
        classifier (bool, optional): load the linear classifier ``head``; ``None`` loads it
            when the model's has the checkpoint's shape and otherwise leaves the model's
            own (fine-tuning to other classes, as timm does). (default: ``None``)
        weights_only (bool): of :func:`read_grootvl_checkpoint`. (default: ``True``)

    Returns:
        the model.

    Raises:
        ValueError: the first mismatch, named both ways: a key that is not the authors', a
            tensor the checkpoint lacks, a shape that differs (e.g. a checkpoint of another
            size), or a checkpoint tensor the model has no place for.

    Shapes:
        every tensor of the checkpoint must have the shape of the model's (checked).

    Example:
        >>> source, target = GrootV(num_classes=10, dims=(16, 32, 48, 64), depths=(1, 1, 1, 1)), GrootV(num_classes=10, dims=(16, 32, 48, 64), depths=(1, 1, 1, 1))
        >>> torch.save({"model": treessm_to_grootvl(source)}, "grootv_t.pth")
        >>> model = load_grootvl_checkpoint(target, "grootv_t.pth")
        >>> torch.equal(model.head.weight, source.head.weight)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a GrootV module, got {type(model).__name__}")
    if classifier is not None:
        classifier = check_bool(classifier, "classifier")
    if not isinstance(checkpoint, (str, os.PathLike, Mapping)):
        raise TypeError(f"checkpoint must be a path (str or os.PathLike) or the authors' state "
                        f"dict, got {type(checkpoint).__name__}")
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_grootvl_checkpoint(checkpoint, use_ema, weights_only)
    weights = grootvl_to_treessm(checkpoint)
    target = model.state_dict()
    has_head = getattr(model, "conv_head", None) is not None
    if classifier is None:
        classifier = has_head and all(
            name in weights and weights[name].shape == t.shape
            for name, t in target.items() if name.startswith("head."))
    elif classifier and not has_head:
        raise ValueError("classifier=True, but the model has no classifier (features_only "
                         "or pruned)")

    def owned_elsewhere(name: str) -> bool:
        """A checkpoint tensor of a part the model leaves out on purpose."""
        if name.startswith(("conv_head.", "head.")):
            return not has_head or (name.startswith("head.") and not classifier)
        m = re.match(r"stages\.(\d+)\.", name)
        return m is not None and int(m.group(1)) >= len(getattr(model, "stages", ()))

    def authors(name: str) -> str:
        mapped = _treessm_to_authors_name(name)
        return mapped[0] if mapped else name

    load = OrderedDict()
    for name, t in target.items():
        if name.startswith("head.") and not classifier:
            continue
        if name not in weights:
            raise ValueError(f"the checkpoint lacks {authors(name)} (the model's {name}, "
                             f"shape {_shape(t)}): a truncated file or a model of another "
                             "architecture?")
        if weights[name].shape != t.shape:
            raise ValueError(f"{authors(name)} has shape {_shape(weights[name])} in the "
                             f"checkpoint, but the model's {name} has {_shape(t)}: a "
                             "checkpoint of another GrootV size?")
        load[name] = weights[name]
    for name in weights:
        if name not in load and not owned_elsewhere(name):
            raise ValueError(f"the checkpoint's {authors(name)} (treessm's {name}) has no place "
                             "in the model: a checkpoint of a deeper or differently built "
                             "GrootV?")
    result = model.load_state_dict(load, strict=False)
    skipped = set(target) - set(load)
    if result.unexpected_keys or set(result.missing_keys) != skipped:
        raise RuntimeError(f"loading left {result}")  # unreachable after the checks above
    return model
