"""GrootV: hierarchical vision backbones whose token mixer is the tree SSM.

The architecture of *GrootVL* (Xiao, Song et al., NeurIPS 2024), section 3.3: a stem of
two stride-2 3x3 convolutions, four stages of pre-norm blocks (LayerNorm -> TreeSSM ->
drop path, LayerNorm -> MLP -> drop path) at widths C, 2C, 4C, 8C separated by stride-2
3x3 convolutions, a LayerNorm closing every stage, and a convolutional classification
head. For the same weights it computes the function of the authors' released model
(their LayerNorms' ``eps=1e-6``, their mixer, and grid trees rooted at each image's first
pixel as theirs are, so every edge decays with the step of its end farther from that
pixel), so their ImageNet checkpoints load with
:func:`~treessm.models.load_grootvl_checkpoint` (the module-by-module correspondence is in
:mod:`treessm.models.grootvl_weights`). The file reads top-down: stem and downsampling,
mixer, block, stage, model, weight init, then the constructors.

All maps inside the network are channels-last ``[B, H, W, C]`` (the layout of the tree
scan); what the model hands out (``forward_features``, ``forward_intermediates``,
``features_only`` maps) is channels-first ``[B, C, H, W]`` unless ``output_fmt="NHWC"``
is asked for, as timm backbones do. Any input size works: every stride-``s`` convolution
(kernel 3, padding 1) maps ``n`` pixels to ``ceil(n / s)``, so stage ``i`` of an
``H x W`` image is ``ceil(H / r_i) x ceil(W / r_i)`` with ``r_i`` its reduction
(4, 8, 16, 32): a 200x300 image gives 50x75, 25x38, 13x19 and 7x10.

Sizes at 224x224 (``count_flops``: multiply-accumulates as fvcore counts them):
GrootV-T 29.96M parameters / 4.75 GFLOPs, GrootV-S 51.33M / 8.49 GFLOPs, GrootV-B
90.60M / 15.05 GFLOPs, against 30M / 4.8G, 51M / 8.5G and 91M / 15.1G in the paper.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .._checks import check_bool, check_int, check_ints, check_number
from ..nn.layers import DropPath, LayerNorm2d, Mlp
from ..nn.tree_ssm import TreeSSM
from ..tree import Tree
from .grootvl_weights import load_grootvl_checkpoint

__all__ = ["GrootV", "GrootVBlock", "GrootVStage", "FeatureInfo", "count_flops",
           "take_indices", "default_cfgs", "ARCHITECTURES", "grootv_tiny", "grootv_small",
           "grootv_base"]

#: eps of the backbone's LayerNorms (stem, blocks, stages, downsampling), as the authors'
#: model has them; the mixer's own two norms keep PyTorch's 1e-5, as theirs do.
NORM_EPS = 1e-6

OUTPUT_FORMATS = ("NCHW", "NHWC")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _cfg(**kwargs) -> Dict:
    """Pretrained configuration in timm's format: how the authors evaluate on ImageNet-1K
    (resize the short side to 224 with bicubic interpolation, centre crop 224, ImageNet
    mean and standard deviation)."""
    cfg = dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
               crop_pct=1.0, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
               first_conv="stem.conv1", classifier="head", license="mit",
               origin_url="https://github.com/EasonXiao-888/GrootVL",
               paper_ids="arXiv:2406.02395",
               paper_name="GrootVL: Tree Topology is All You Need in State Space Model")
    cfg.update(kwargs)
    return cfg


#: Configurations of the authors' ImageNet-1K weights (top-1 83.4 / 84.2 / 84.8), keyed as
#: timm keys them. treessm downloads nothing: ``url`` is empty, the checkpoints are a
#: manual download (``docs/vision.md``) loaded from a local file.
default_cfgs: Dict[str, Dict] = {
    "grootv_tiny.in1k": _cfg(),
    "grootv_small.in1k": _cfg(),
    "grootv_base.in1k": _cfg(),
}


class Stem(nn.Module):
    """Two 3x3 convolutions (``out_chans / 2`` then ``out_chans``), each followed by a
    LayerNorm, with a GELU between them. Channels-first in, channels-last out."""

    def __init__(self, in_chans: int, out_chans: int, strides: Sequence[int] = (2, 2)):
        super().__init__()
        mid = out_chans // 2
        self.conv1 = nn.Conv2d(in_chans, mid, 3, stride=strides[0], padding=1)
        self.norm1 = LayerNorm2d(mid, eps=NORM_EPS)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(mid, out_chans, 3, stride=strides[1], padding=1)
        self.norm2 = nn.LayerNorm(out_chans, eps=NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.norm1(self.conv1(x)))
        return self.norm2(self.conv2(x).permute(0, 2, 3, 1))


class Downsample(nn.Module):
    """3x3 convolution without bias (stride 2 between the stages of the paper) and a
    LayerNorm, on channels-last maps."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_chans, eps=NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


# ---------------------------------------------------------------------------- block
class GrootVBlock(nn.Module):
    r"""Pre-norm residual block: :math:`x + \mathrm{DropPath}(\mathrm{TreeSSM}(\mathrm{LN}(x)))`,
    then :math:`x + \mathrm{DropPath}(\mathrm{MLP}(\mathrm{LN}(x)))`.

    Args:
        dim (int): channels.
        mlp_ratio (float): hidden channels of the MLP per channel. (default: ``4.0``)
        d_state (int), ssm_ratio (float), d_conv (int): of the
            :class:`~treessm.nn.TreeSSM` mixer (whose depthwise convolution has no bias).
            (default: ``1``, ``2.0``, ``3``)
        drop_path (float): stochastic depth of both branches. (default: ``0.0``)
        scan (str), topology (callable, optional): of the mixer. (default: ``"tree"``,
            ``None``)

    Shapes:
        - **input:** features :math:`(B, H, W, dim)` and optionally a tree over its pixels
        - **output:** features :math:`(B, H, W, dim)` and the tree its mixer used

    Returns:
        Called as ``block(x, tree=None)``, the pair ``(features, tree)``, so that a stage
        can hand the tree to its next block.

    Raises:
        ValueError, TypeError: as :class:`~treessm.nn.TreeSSM` and
            :class:`~treessm.nn.Mlp`, on arguments outside their ranges.

    Example:
        >>> block = GrootVBlock(32)
        >>> y, tree = block(torch.randn(2, 8, 8, 32))
        >>> y.shape, tree.num_nodes
        (torch.Size([2, 8, 8, 32]), 128)
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, d_state: int = 1,
                 ssm_ratio: float = 2.0, d_conv: int = 3, drop_path: float = 0.0,
                 scan: str = "tree", topology: Optional[Callable[[Tensor], Tree]] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mixer = TreeSSM(dim, d_state=d_state, ssm_ratio=ssm_ratio, d_conv=d_conv,
                             conv_bias=False, scan=scan, topology=topology)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, tree: Optional[Tree] = None):
        y, tree = self.mixer(self.norm1(x), tree=tree, return_tree=True)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, tree


class GrootVStage(nn.Module):
    r"""Optional downsampling, ``depth`` blocks and a closing LayerNorm.

    With ``shared_tree=True`` the first block builds the tree from its own features and
    the other blocks of the stage scan that same tree (the faster variant of the paper),
    instead of each block building its own. With ``grad_checkpointing`` set (by
    :meth:`GrootV.set_grad_checkpointing`) each block keeps only its input for the
    backward pass and recomputes the rest, tree included.

    Args:
        in_dim (int): channels of the input.
        dim (int): channels of the stage.
        depth (int): blocks.
        stride (int): stride of the downsampling convolution. (default: ``2``)
        downsample (bool): begin with a strided convolution (and LayerNorm) from
            ``in_dim`` to ``dim``. (default: ``True``)
        drop_path (Sequence[float]): stochastic depth of each block. (default: none)
        shared_tree (bool): one tree per stage instead of one per block. (default:
            ``False``)
        block_kwargs: further arguments of :class:`GrootVBlock`.

    Shapes:
        - **input:** :math:`(B, H, W, \mathrm{in\_dim})`, channels last
        - **output:** :math:`(B, \lceil H / s \rceil, \lceil W / s \rceil, \mathrm{dim})`
          for stride :math:`s` (:math:`s = 1` without downsampling)

    Returns:
        Calling the stage returns its output map.

    Raises:
        ValueError, TypeError: as :class:`GrootVBlock`, on arguments outside their ranges.

    Example:
        >>> stage = GrootVStage(16, 32, depth=2, shared_tree=True)
        >>> stage(torch.randn(1, 8, 8, 16)).shape
        torch.Size([1, 4, 4, 32])
    """

    def __init__(self, in_dim: int, dim: int, depth: int, stride: int = 2,
                 downsample: bool = True, drop_path: Sequence[float] = (),
                 shared_tree: bool = False, **block_kwargs):
        super().__init__()
        self.downsample = Downsample(in_dim, dim, stride) if downsample else nn.Identity()
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            GrootVBlock(dim, drop_path=drop_path[i], **block_kwargs) for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.shared_tree = shared_tree
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        tree = None
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, block_tree = checkpoint(block, x, tree, use_reentrant=False)
            else:
                x, block_tree = block(x, tree)
            if self.shared_tree:
                tree = block_tree
        return self.norm(x)


class FeatureInfo(list):
    """Per-stage ``dict(num_chs, reduction, module)``, with timm's ``channels()``,
    ``reduction()`` and ``module_name()`` accessors that detection and segmentation necks
    read.

    Args:
        iterable: the stages' dicts, as a list is built. (default: empty)

    Raises:
        KeyError: from an accessor, when a stage's dict lacks its key.

    Example:
        >>> model = GrootV(dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), features_only=True)
        >>> model.feature_info.channels(), model.feature_info.reduction()
        ([16, 32, 48, 64], [4, 8, 16, 32])
    """

    def channels(self) -> List[int]:
        return [info["num_chs"] for info in self]

    def reduction(self) -> List[int]:
        return [info["reduction"] for info in self]

    def module_name(self) -> List[str]:
        return [info["module"] for info in self]


def take_indices(num_stages: int, indices: Union[None, int, Sequence[int]] = None,
                 name: str = "indices") -> Tuple[List[int], int]:
    """Absolute stage indices to return, as timm's ``feature_take_indices`` reads them:
    ``None`` all stages, an int ``n`` the last ``n``, a sequence the given stages
    (negative ones count from the end).

    Args:
        num_stages (int): stages of the model.
        indices (None, int or Sequence[int]): which stages. (default: ``None``, all)
        name (str): the argument's name in error messages. (default: ``"indices"``)

    Example:
        >>> take_indices(4, 2), take_indices(4, [0, -1])
        (([2, 3], 3), ([0, 3], 3))

    Returns:
        the indices (in the given order) and the largest of them.

    Raises:
        TypeError: neither ``None``, an int nor a sequence of ints.
        ValueError: an index outside ``[-num_stages, num_stages)``, ``n`` outside
            ``[1, num_stages]``, or an empty sequence.
    """
    if indices is None:
        indices = num_stages
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence):
        n = check_int(indices, name, 1)
        if n > num_stages:
            raise ValueError(f"{name} as an int takes the last n stages, so it must lie in "
                             f"[1, {num_stages}], got {n}")
        take = list(range(num_stages - n, num_stages))
    else:
        take = list(check_ints(indices, name))
        if not take or not all(-num_stages <= i < num_stages for i in take):
            raise ValueError(f"{name} must be None, an int or a non-empty sequence of stage "
                             f"indices in [{-num_stages}, {num_stages}), got {indices!r}")
        take = [i % num_stages for i in take]
    return take, max(take)


class GrootV(nn.Module):
    r"""The GrootV backbone and classifier.

    Args:
        num_classes (int): classes of the linear head; ``0`` returns pooled features.
            (default: ``1000``)
        in_chans (int): input channels. (default: ``3``)
        dims (Sequence[int]): channels of the stages; the stem outputs ``dims[0]``.
            (default: ``(80, 160, 320, 640)``, GrootV-T)
        depths (Sequence[int]): blocks per stage. (default: ``(2, 2, 9, 2)``)
        mlp_ratio (float): MLP hidden channels per channel. (default: ``4.0``)
        d_state (int): SSM state size. (default: ``1``)
        ssm_ratio (float): inner channels of the TreeSSM per channel. (default: ``2.0``)
        d_conv (int): kernel of the TreeSSM's depthwise convolution. (default: ``3``)
        head_ratio (float): the head's 1x1 convolution widens ``dims[-1]`` by this factor.
            (default: ``1.5``)
        drop_rate (float): dropout before the classifier. (default: ``0.0``)
        drop_path_rate (float): stochastic depth of the last block, growing linearly from
            ``0`` at the first. (default: ``0.0``)
        scan (str): ``"tree"`` or ``"raster"`` (a plain bidirectional selective scan over a
            row-major chain, the ablation). (default: ``"tree"``)
        shared_tree (bool): build one tree per stage from the first block's features and
            reuse it in the stage's other blocks. (default: ``False``)
        topology (callable, optional): tree builder of every TreeSSM, e.g.
            ``GridTopology(8, "cosine")``; only with ``scan="tree"``. (default: ``None``,
            the 4-neighbour cosine MST)
        stem_strides (Sequence[int]): strides of the two stem convolutions. (default:
            ``(2, 2)``)
        downsample_strides (Sequence[int], optional): stride of the convolution opening
            each stage after the first; ``1`` keeps the resolution (for tiny inputs).
            (default: ``2`` everywhere)
        features_only (bool): build no head (so ``num_classes``, ``head_ratio`` and
            ``drop_rate`` play no part, as in timm) and no stage after the last of
            ``out_indices``; :meth:`forward` returns the maps of the stages in
            ``out_indices``. (default: ``False``)
        out_indices (int or Sequence[int], optional): stages returned with
            ``features_only``, as :func:`take_indices` reads them. (default: all)
        device (torch.device, optional): where the parameters are created. (default:
            ``None``, PyTorch's default device)
        dtype (torch.dtype, optional): floating-point type of the parameters and buffers.
            (default: ``None``, PyTorch's default dtype)

    Shapes:
        - **input:** images :math:`(B, C_{in}, H, W)`, any :math:`H, W \ge 1`
        - **output:** logits :math:`(B, \text{num_classes})`, or with ``features_only`` a
          list of maps :math:`(B, \text{dims}_i, \lceil H / r_i \rceil, \lceil W / r_i
          \rceil)` with :math:`r_i` = ``feature_info[i]["reduction"]`` (4, 8, 16, 32 by
          default)

    Returns:
        Calling the model returns the logits, or with ``features_only`` the list of maps
        (see Shapes).

    Raises:
        ValueError, TypeError: on an argument outside its range, named in the message
            (``dims`` and ``depths`` of different lengths, an odd ``d_conv``, ``out_indices``
            outside the stages, ...), or input images that are not :math:`(B, C_{in}, H, W)`.

    Example:
        >>> model = GrootV(num_classes=10, dims=(16, 32, 48, 64), depths=(1, 1, 2, 1)).eval()
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])
        >>> maps = model.forward_intermediates(torch.randn(1, 3, 50, 75),
        ...                                    intermediates_only=True)
        >>> [tuple(m.shape[1:]) for m in maps]
        [(16, 13, 19), (32, 7, 10), (48, 4, 5), (64, 2, 3)]
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3,
                 dims: Sequence[int] = (80, 160, 320, 640), depths: Sequence[int] = (2, 2, 9, 2),
                 mlp_ratio: float = 4.0, d_state: int = 1, ssm_ratio: float = 2.0,
                 d_conv: int = 3, head_ratio: float = 1.5, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, scan: str = "tree", shared_tree: bool = False,
                 topology: Optional[Callable[[Tensor], Tree]] = None,
                 stem_strides: Sequence[int] = (2, 2),
                 downsample_strides: Optional[Sequence[int]] = None,
                 features_only: bool = False,
                 out_indices: Union[None, int, Sequence[int]] = None,
                 device: Optional[Union[torch.device, str]] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        num_classes = check_int(num_classes, "num_classes", 0)
        in_chans = check_int(in_chans, "in_chans", 1)
        depths = check_ints(depths, "depths", 1)
        if not depths:
            raise ValueError("depths must hold at least one stage, got ()")
        dims = check_ints(dims, "dims", 1, len(depths))
        if dims[0] < 2:
            raise ValueError(f"dims[0] must be at least 2 (the stem halves it), got {dims[0]}")
        stem_strides = check_ints(stem_strides, "stem_strides", 1, 2)
        num_stages = len(depths)
        if downsample_strides is None:
            downsample_strides = (2,) * (num_stages - 1)
        downsample_strides = check_ints(downsample_strides, "downsample_strides", 1,
                                        num_stages - 1)
        mlp_ratio = check_number(mlp_ratio, "mlp_ratio", 0, low_open=True)
        head_ratio = check_number(head_ratio, "head_ratio", 0, low_open=True)
        drop_rate = check_number(drop_rate, "drop_rate", 0.0, 1.0, high_open=True)
        drop_path_rate = check_number(drop_path_rate, "drop_path_rate", 0.0, 1.0,
                                      high_open=True)
        shared_tree = check_bool(shared_tree, "shared_tree")
        features_only = check_bool(features_only, "features_only")
        if not features_only and out_indices is not None:
            raise ValueError("out_indices is only used with features_only=True")
        out_indices = tuple(sorted(set(take_indices(num_stages, out_indices,
                                                    "out_indices")[0])))
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.dims = dims
        self.depths = depths
        self.drop_rate = drop_rate
        self.features_only = features_only
        self.out_indices = out_indices
        # timm's names: channels of forward_features, and of the pooled pre-logits
        self.num_features = dims[-1]
        self.head_hidden_size = int(dims[-1] * head_ratio)
        self.pretrained_cfg = _cfg(num_classes=num_classes, input_size=(in_chans, 224, 224))

        total = sum(depths)
        rates = [drop_path_rate * i / max(1, total - 1) for i in range(total)]
        num_built = out_indices[-1] + 1 if features_only else num_stages
        reduction = stem_strides[0] * stem_strides[1]
        info = []
        place = torch.device(device) if device is not None else contextlib.nullcontext()
        with place:
            self.stem = Stem(in_chans, dims[0], stem_strides)
            self.stages = nn.ModuleList()
            for i in range(num_built):
                stride = downsample_strides[i - 1] if i > 0 else 1
                reduction *= stride
                start = sum(depths[:i])
                self.stages.append(GrootVStage(
                    dims[i - 1] if i > 0 else dims[0], dims[i], depths[i], stride=stride,
                    downsample=i > 0, drop_path=rates[start:start + depths[i]],
                    shared_tree=shared_tree, mlp_ratio=mlp_ratio, d_state=d_state,
                    ssm_ratio=ssm_ratio, d_conv=d_conv, scan=scan, topology=topology))
                info.append(dict(num_chs=dims[i], reduction=reduction, module=f"stages.{i}"))
            if features_only:
                self.conv_head = self.head_drop = self.head = None
            else:
                self.conv_head = nn.Sequential(
                    nn.Conv2d(dims[-1], self.head_hidden_size, 1, bias=False),
                    nn.BatchNorm2d(self.head_hidden_size),
                    nn.GELU())
                self.head_drop = nn.Dropout(drop_rate)
                self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 \
                    else nn.Identity()
            self.reset_parameters()
        self.feature_info = FeatureInfo(info[i] for i in out_indices) if features_only \
            else FeatureInfo(info)
        if dtype is not None:
            self.to(dtype=dtype)

    # ------------------------------------------------------------------ weight init
    def reset_parameters(self):
        """Truncated-normal (std 0.02) linear layers, unit LayerNorms, default
        convolutions, and each TreeSSM's own initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d, nn.Conv2d)):
                m.reset_parameters()
        for m in self.modules():
            if isinstance(m, TreeSSM):  # its Δ projection must keep Mamba's init
                m.reset_parameters()

    def no_weight_decay(self) -> set:
        """Names of the parameters excluded from weight decay (the SSM's ``A_log`` and
        ``D``), for timm's optimizer factory and hand-written parameter groups."""
        return {name for name, p in self.named_parameters()
                if getattr(p, "_no_weight_decay", False)}

    def group_matcher(self, coarse: bool = False) -> Dict:
        """Parameter groups by depth (the stem, then each stage or block), in the format of
        timm's layer-wise learning-rate decay."""
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.norm", (99999,)),
            ])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them
        (:func:`torch.utils.checkpoint.checkpoint`): training memory of a stage falls to
        about one map per block, at the cost of a second forward pass of every block."""
        enable = check_bool(enable, "enable")
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> Optional[nn.Module]:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """Replace the linear classifier by a fresh one with ``num_classes`` outputs
        (``0``: none, :meth:`forward` then returns pooled features). ``global_pool`` is
        timm's argument; only average pooling (``None``, ``"avg"``) exists here."""
        if self.conv_head is None:
            raise RuntimeError("this model has no classifier (built with features_only or "
                               "pruned by prune_intermediate_layers)")
        num_classes = check_int(num_classes, "num_classes", 0)
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool must be None or 'avg', got {global_pool!r}")
        self.num_classes = num_classes
        weight = self.conv_head[0].weight
        self.head = nn.Linear(self.head_hidden_size, num_classes, device=weight.device,
                              dtype=weight.dtype) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load the authors' checkpoint file into this model (timm calls this for a
        configuration with ``custom_load=True``). The classifier is loaded when it has the
        checkpoint's number of classes and otherwise keeps its fresh initialisation, as
        timm does (:func:`~treessm.models.load_grootvl_checkpoint`)."""
        load_grootvl_checkpoint(self, checkpoint_path)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: Tensor):
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_chans:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a [B, {self.in_chans}, H, W] image batch, got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.shape[2] == 0 or x.shape[3] == 0:  # B = 0 is an empty batch; no pixel is no image
            raise ValueError(f"x must have at least one pixel per image (H, W >= 1), got "
                             f"{list(x.shape)}")

    def forward_intermediates(self, x: Tensor,
                              indices: Union[None, int, Sequence[int]] = None,
                              norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """The maps of chosen stages, for detection and segmentation necks (timm's
        interface).

        Args:
            x (Tensor [B, in_chans, H, W]): images.
            indices (int or Sequence[int], optional): stages to return, as
                :func:`take_indices` reads them (an int ``n``: the last ``n``). (default:
                ``None``, all)
            norm (bool): timm's request to normalise the outputs; every stage already ends
                with its LayerNorm, so the maps are the same either way. (default:
                ``False``)
            stop_early (bool): run no stage after the last one asked for. (default:
                ``False``)
            output_fmt (str): ``"NCHW"`` or ``"NHWC"`` (the layout inside the network, no
                copy). (default: ``"NCHW"``)
            intermediates_only (bool): return only the list of maps. (default: ``False``)

        Returns:
            the list of maps, stage by stage, each :math:`(B, \\text{dims}_i, \\lceil H /
            r_i \\rceil, \\lceil W / r_i \\rceil)`; unless ``intermediates_only``, preceded
            by the last computed map in ``NCHW`` (:meth:`forward_features` when all
            stages ran).
        """
        norm = check_bool(norm, "norm")
        stop_early = check_bool(stop_early, "stop_early")
        intermediates_only = check_bool(intermediates_only, "intermediates_only")
        fmt = getattr(output_fmt, "value", output_fmt)  # timm passes a str-valued Enum
        if fmt not in OUTPUT_FORMATS:
            raise ValueError(f"output_fmt must be one of {OUTPUT_FORMATS}, got {output_fmt!r}")
        take, last = take_indices(len(self.stages), indices)
        self._check_input(x)
        x = self.stem(x)
        stages = self.stages[:last + 1] if stop_early else self.stages
        out = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                out.append(x.permute(0, 3, 1, 2) if fmt == "NCHW" else x)
        if intermediates_only:
            return out
        return x.permute(0, 3, 1, 2), out

    def prune_intermediate_layers(self, indices: Union[None, int, Sequence[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True
                                  ) -> List[int]:
        """Drop the stages after the last of ``indices`` and, with ``prune_head``, the
        classification head (timm's interface, used by its ``features_only`` wrapper).
        ``prune_norm`` is accepted for timm: the stage norms belong to the stages.

        Returns:
            the absolute indices of ``indices``.
        """
        take, last = take_indices(len(self.stages), indices)
        self.stages = self.stages[:last + 1]
        if prune_head:
            self.conv_head = self.head_drop = self.head = None
            self.num_classes = 0
        return take

    def forward_features(self, x: Tensor) -> Tensor:
        """Unpooled map of the last stage, ``[B, dims[-1], ceil(H / 32), ceil(W / 32)]``."""
        return self.forward_intermediates(x, indices=1)[0]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """1x1 convolution, BatchNorm, GELU, average pooling and the classifier; with
        ``pre_logits`` the pooled ``[B, head_hidden_size]`` features."""
        if self.conv_head is None:
            raise RuntimeError("this model has no head (built with features_only or pruned "
                               "by prune_intermediate_layers)")
        # a contiguous map gives the 1x1 convolution's weight gradient the weight's own
        # layout, which DistributedDataParallel's gradient buckets expect
        x = self.conv_head(x.contiguous()).mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Union[Tensor, List[Tensor]]:
        if self.features_only:
            return self.forward_intermediates(x, self.out_indices, intermediates_only=True)
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------- counting
def count_flops(model: nn.Module, *inputs: Tensor) -> int:
    """Multiply-accumulates of one forward pass in evaluation mode, the unit of the "FLOPs"
    that fvcore and the GrootVL paper report.

    Matrix products and convolutions are counted by
    :class:`torch.utils.flop_counter.FlopCounterMode` (two per multiply-accumulate, so
    halved); every :class:`~treessm.nn.TreeSSM` adds :meth:`~treessm.nn.TreeSSM.extra_macs`
    for its scan. Normalisations, activations and tree construction are not counted: the
    trees are built in a first, uncounted pass and replayed in the counted one, so the
    count does not depend on how a topology computes its edge costs.

    Args:
        model (torch.nn.Module): any module, e.g. a :class:`GrootV`.
        inputs (Tensor): the inputs of one forward pass, e.g. ``torch.randn(1, 3, 224, 224)``.

    Returns:
        int: multiply-accumulates (GrootV-T at 224²: 4.75 G, the paper's "4.8 GFLOPs").

    Raises:
        Exception: whatever the forward pass of ``model`` raises on ``inputs``.

    Example:
        >>> count_flops(torch.nn.Linear(8, 4), torch.randn(2, 8))   # 2 * 8 * 4
        64
    """
    from torch.utils.flop_counter import FlopCounterMode

    ssms = [m for m in model.modules() if isinstance(m, TreeSSM)]
    shadowed = {id(m): m.__dict__.get("scan_tree") for m in ssms}
    built = {id(m): [] for m in ssms}
    extra = [0]

    def recorder(m):
        build = m.scan_tree

        def record(u):
            built[id(m)].append(build(u))
            return built[id(m)][-1]
        return record

    def replayer(m):
        trees = iter(built[id(m)])
        return lambda u: next(trees)

    def add_scan(module, args, output):
        b, h, w, _ = args[0].shape
        extra[0] += module.extra_macs(b * h * w)

    was_training = model.training
    handles = []
    model.eval()
    try:
        with torch.no_grad():
            for m in ssms:
                m.scan_tree = recorder(m)
            model(*inputs)
            for m in ssms:
                m.scan_tree = replayer(m)
                handles.append(m.register_forward_hook(add_scan))
            counter = FlopCounterMode(display=False)
            with counter:
                model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        for m in ssms:
            if shadowed[id(m)] is None:
                del m.scan_tree
            else:
                m.scan_tree = shadowed[id(m)]
        model.train(was_training)
    return counter.get_total_flops() // 2 + extra[0]


# ---------------------------------------------------------------------------- constructors
#: Stage widths and depths of the three sizes of the paper.
ARCHITECTURES: Dict[str, Dict[str, Tuple[int, ...]]] = {
    "grootv_tiny": dict(dims=(80, 160, 320, 640), depths=(2, 2, 9, 2)),
    "grootv_small": dict(dims=(96, 192, 384, 768), depths=(2, 2, 13, 2)),
    "grootv_base": dict(dims=(128, 256, 512, 1024), depths=(2, 2, 13, 2)),
}


def _create(variant: str, pretrained: Union[None, bool, str], kwargs) -> GrootV:
    if pretrained is True:
        raise ValueError(
            f"{variant} downloads nothing: download the GrootVL authors' checkpoint "
            "(https://github.com/EasonXiao-888/GrootVL, see docs/vision.md) and pass its path "
            "as pretrained=")
    model = GrootV(**dict(ARCHITECTURES[variant], **kwargs))
    model.pretrained_cfg = dict(default_cfgs[f"{variant}.in1k"], architecture=variant,
                                num_classes=model.num_classes,
                                input_size=(model.in_chans, 224, 224))
    if pretrained:
        load_grootvl_checkpoint(model, pretrained)
    return model


def grootv_tiny(pretrained: Union[None, bool, str] = None, **kwargs) -> GrootV:
    r"""GrootV-T: C = 80, depths 2-2-9-2 (30M parameters); ``kwargs`` go to :class:`GrootV`.

    Args:
        pretrained (str or os.PathLike, optional): the authors' ImageNet-1K checkpoint
            (83.4% top-1), a local file loaded by
            :func:`~treessm.models.load_grootvl_checkpoint`; the classifier is kept fresh
            when ``num_classes`` is not 1000. (default: ``None``)
        kwargs: arguments of :class:`GrootV` (``num_classes``, ``features_only``, ...).

    Shapes:
        as :class:`GrootV`: images :math:`(B, 3, H, W)` to logits
        :math:`(B, \mathrm{num\_classes})`.

    Returns:
        :class:`GrootV`

    Raises:
        ValueError, TypeError: as :class:`GrootV`; from ``pretrained``, as
            :func:`~treessm.models.load_grootvl_checkpoint` (a missing file, a checkpoint
            of another size).

    Example:
        >>> model = grootv_tiny(device="meta")             # the shapes, no memory
        >>> round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        29.96
        >>> model.feature_info.channels()
        [80, 160, 320, 640]
    """
    return _create("grootv_tiny", pretrained, kwargs)


def grootv_small(pretrained: Union[None, bool, str] = None, **kwargs) -> GrootV:
    """GrootV-S: C = 96, depths 2-2-13-2 (51M parameters); ``kwargs`` go to :class:`GrootV`.

    Args:
        pretrained (str or os.PathLike, optional): a local file of the authors' checkpoint
            (84.2% top-1), as in :func:`grootv_tiny`. (default: ``None``)
        kwargs: arguments of :class:`GrootV`.

    Shapes:
        as :class:`GrootV`.

    Returns:
        :class:`GrootV`

    Raises:
        ValueError, TypeError: as :func:`grootv_tiny`.

    Example:
        >>> grootv_small(num_classes=10, device="meta").feature_info.channels()
        [96, 192, 384, 768]
    """
    return _create("grootv_small", pretrained, kwargs)


def grootv_base(pretrained: Union[None, bool, str] = None, **kwargs) -> GrootV:
    """GrootV-B: C = 128, depths 2-2-13-2 (91M parameters); ``kwargs`` go to :class:`GrootV`.

    Args:
        pretrained (str or os.PathLike, optional): a local file of the authors' checkpoint
            (84.8% top-1), as in :func:`grootv_tiny`. (default: ``None``)
        kwargs: arguments of :class:`GrootV`.

    Shapes:
        as :class:`GrootV`.

    Returns:
        :class:`GrootV`

    Raises:
        ValueError, TypeError: as :func:`grootv_tiny`.

    Example:
        >>> grootv_base(num_classes=10, device="meta").feature_info.channels()
        [128, 256, 512, 1024]
    """
    return _create("grootv_base", pretrained, kwargs)
