"""GrootV: hierarchical vision backbones whose token mixer is the tree SSM.

The architecture of *GrootVL* (Xiao, Song et al., NeurIPS 2024), section 3.3: a stem of
two stride-2 3x3 convolutions, four stages of pre-norm blocks (LayerNorm -> TreeSSM ->
drop path, LayerNorm -> MLP -> drop path) at widths C, 2C, 4C, 8C separated by stride-2
3x3 convolutions, a LayerNorm closing every stage, and a convolutional classification
head. The file reads top-down: stem and downsampling, block, stage, model, weight init,
then the registered constructors.

All maps inside the network are channels-last ``[B, H, W, C]`` (the layout of the tree
scan); what the model hands out (``forward_features``, ``features_only`` maps) is
channels-first ``[B, C, H, W]``, as timm backbones do.

Sizes at 224x224 (``count_flops``: multiply-accumulates as fvcore counts them):
GrootV-T 29.96M parameters / 4.75 GFLOPs, GrootV-S 51.33M / 8.49 GFLOPs, GrootV-B
90.60M / 15.05 GFLOPs, against 30M / 4.8G, 51M / 8.5G and 91M / 15.1G in the paper.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._checks import check_bool, check_int, check_ints, check_number
from ..nn.layers import DropPath, LayerNorm2d, Mlp
from ..nn.tree_ssm import TreeSSM
from ..tree import Tree

__all__ = ["GrootV", "GrootVBlock", "GrootVStage", "FeatureInfo", "count_flops",
           "grootv_tiny", "grootv_small", "grootv_base"]


class Stem(nn.Module):
    """Two 3x3 convolutions (``out_chans / 2`` then ``out_chans``), each followed by a
    LayerNorm, with a GELU between them. Channels-first in, channels-last out."""

    def __init__(self, in_chans: int, out_chans: int, strides: Sequence[int] = (2, 2)):
        super().__init__()
        mid = out_chans // 2
        self.conv1 = nn.Conv2d(in_chans, mid, 3, stride=strides[0], padding=1)
        self.norm1 = LayerNorm2d(mid)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(mid, out_chans, 3, stride=strides[1], padding=1)
        self.norm2 = nn.LayerNorm(out_chans)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.norm1(self.conv1(x)))
        return self.norm2(self.conv2(x).permute(0, 2, 3, 1))


class Downsample(nn.Module):
    """3x3 convolution without bias (stride 2 between the stages of the paper) and a
    LayerNorm, on channels-last maps."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_chans)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class GrootVBlock(nn.Module):
    r"""Pre-norm residual block: :math:`x + \mathrm{DropPath}(\mathrm{TreeSSM}(\mathrm{LN}(x)))`,
    then :math:`x + \mathrm{DropPath}(\mathrm{MLP}(\mathrm{LN}(x)))`.

    Args:
        dim (int): channels.
        mlp_ratio (float): hidden channels of the MLP per channel. (default: ``4.0``)
        d_state (int), ssm_ratio (float), d_conv (int): of the :class:`~treessm.nn.TreeSSM`
            (whose depthwise convolution has no bias). (default: ``1``, ``2.0``, ``3``)
        drop_path (float): stochastic depth of both branches. (default: ``0.0``)
        scan (str), topology (callable, optional): of the TreeSSM. (default: ``"tree"``,
            ``None``)

    Shapes:
        - **input:** features :math:`(B, H, W, dim)` and optionally a tree over its pixels
        - **output:** features :math:`(B, H, W, dim)` and the tree its mixer used
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, d_state: int = 1,
                 ssm_ratio: float = 2.0, d_conv: int = 3, drop_path: float = 0.0,
                 scan: str = "tree", topology: Optional[Callable[[Tensor], Tree]] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = TreeSSM(dim, d_state=d_state, ssm_ratio=ssm_ratio, d_conv=d_conv,
                             conv_bias=False, scan=scan, topology=topology)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, tree: Optional[Tree] = None):
        y, tree = self.mixer(self.norm1(x), tree=tree, return_tree=True)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, tree


class GrootVStage(nn.Module):
    """Optional downsampling, ``depth`` blocks and a closing LayerNorm.

    With ``shared_tree=True`` the first block builds the tree from its own features and
    the other blocks of the stage scan that same tree (the faster variant of the paper),
    instead of each block building its own.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, stride: int = 2,
                 downsample: bool = True, drop_path: Sequence[float] = (),
                 shared_tree: bool = False, **block_kwargs):
        super().__init__()
        self.downsample = Downsample(in_dim, dim, stride) if downsample else nn.Identity()
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            GrootVBlock(dim, drop_path=drop_path[i], **block_kwargs) for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.shared_tree = shared_tree

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        tree = None
        for block in self.blocks:
            x, block_tree = block(x, tree)
            if self.shared_tree:
                tree = block_tree
        return self.norm(x)


class FeatureInfo(list):
    """Per-stage ``dict(num_chs, reduction, module)``, with timm's ``channels()`` and
    ``reduction()`` accessors that detection and segmentation necks read."""

    def channels(self) -> List[int]:
        return [info["num_chs"] for info in self]

    def reduction(self) -> List[int]:
        return [info["reduction"] for info in self]


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
            ``drop_rate`` play no part, as in timm); :meth:`forward` returns the maps of the
            stages in ``out_indices``. (default: ``False``)
        out_indices (Sequence[int], optional): stages returned with ``features_only``.
            (default: all)

    Shapes:
        - **input:** images :math:`(B, C_{in}, H, W)`
        - **output:** logits :math:`(B, \text{num_classes})`, or with ``features_only`` a
          list of maps :math:`(B, \text{dims}_i, H / r_i, W / r_i)` with
          :math:`r_i` = ``feature_info[i]["reduction"]`` (4, 8, 16, 32 by default)
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3,
                 dims: Sequence[int] = (80, 160, 320, 640), depths: Sequence[int] = (2, 2, 9, 2),
                 mlp_ratio: float = 4.0, d_state: int = 1, ssm_ratio: float = 2.0,
                 d_conv: int = 3, head_ratio: float = 1.5, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, scan: str = "tree", shared_tree: bool = False,
                 topology: Optional[Callable[[Tensor], Tree]] = None,
                 stem_strides: Sequence[int] = (2, 2),
                 downsample_strides: Optional[Sequence[int]] = None,
                 features_only: bool = False, out_indices: Optional[Sequence[int]] = None):
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
        if out_indices is None:
            out_indices = tuple(range(num_stages))
        out_indices = check_ints(out_indices, "out_indices")
        if not out_indices or not all(-num_stages <= i < num_stages for i in out_indices):
            raise ValueError(f"out_indices must be a non-empty sequence of stage indices in "
                             f"[{-num_stages}, {num_stages}), got {out_indices!r}")
        out_indices = tuple(sorted({i % num_stages for i in out_indices}))

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.dims = dims
        self.depths = depths
        self.drop_rate = drop_rate
        self.features_only = features_only
        self.out_indices = out_indices
        self.num_features = int(dims[-1] * head_ratio)

        self.stem = Stem(in_chans, dims[0], stem_strides)
        total = sum(depths)
        rates = [drop_path_rate * i / max(1, total - 1) for i in range(total)]
        num_built = out_indices[-1] + 1 if features_only else num_stages
        reduction = stem_strides[0] * stem_strides[1]
        self.stages = nn.ModuleList()
        info = []
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
        self.feature_info = FeatureInfo(info[i] for i in out_indices) if features_only \
            else FeatureInfo(info)

        if features_only:
            self.conv_head = self.head_drop = self.head = None
        else:
            self.conv_head = nn.Sequential(
                nn.Conv2d(dims[-1], self.num_features, 1, bias=False),
                nn.BatchNorm2d(self.num_features),
                nn.GELU())
            self.head_drop = nn.Dropout(drop_rate)
            self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 \
                else nn.Identity()
        self.reset_parameters()

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

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int):
        """Replace the linear classifier by a fresh one with ``num_classes`` outputs
        (``0``: none, :meth:`forward` then returns pooled features)."""
        if self.features_only:
            raise RuntimeError("a features_only model has no classifier")
        self.num_classes = num_classes = check_int(num_classes, "num_classes", 0)
        device = self.conv_head[0].weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) \
            if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: Tensor):
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_chans:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a [B, {self.in_chans}, H, W] image batch, got {shape}")

    def forward_features(self, x: Tensor) -> Tensor:
        """Unpooled map of the last stage, ``[B, dims[-1], H / 32, W / 32]``."""
        self._check_input(x)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x.permute(0, 3, 1, 2)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """1x1 convolution, BatchNorm, GELU, average pooling and the classifier; with
        ``pre_logits`` the pooled ``[B, num_features]`` features."""
        if self.features_only:
            raise RuntimeError("a features_only model has no head")
        # a contiguous map gives the 1x1 convolution's weight gradient the weight's own
        # layout, which DistributedDataParallel's gradient buckets expect
        x = self.conv_head(x.contiguous()).mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Union[Tensor, List[Tensor]]:
        if not self.features_only:
            return self.forward_head(self.forward_features(x))
        self._check_input(x)
        x = self.stem(x)
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                out.append(x.permute(0, 3, 1, 2))
        return out


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
def grootv_tiny(**kwargs) -> GrootV:
    """GrootV-T: C = 80, depths 2-2-9-2 (30M parameters); ``kwargs`` go to :class:`GrootV`."""
    return GrootV(dims=(80, 160, 320, 640), depths=(2, 2, 9, 2), **kwargs)


def grootv_small(**kwargs) -> GrootV:
    """GrootV-S: C = 96, depths 2-2-13-2 (51M parameters); ``kwargs`` go to :class:`GrootV`."""
    return GrootV(dims=(96, 192, 384, 768), depths=(2, 2, 13, 2), **kwargs)


def grootv_base(**kwargs) -> GrootV:
    """GrootV-B: C = 128, depths 2-2-13-2 (91M parameters); ``kwargs`` go to :class:`GrootV`."""
    return GrootV(dims=(128, 256, 512, 1024), depths=(2, 2, 13, 2), **kwargs)
