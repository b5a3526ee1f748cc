r"""GrootL: Mamba's selective state-space mixer with the recurrence run over a tree.

:class:`GrootLMixer` has the parameters and state-dict keys of transformers'
``MambaMixer`` (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``,
``out_proj``), so a pretrained Mamba's weights load into it unchanged
(:func:`treessm.integrations.transformers.grootl_from_mamba` swaps every mixer of a model).
The selective scan is the fused :func:`treessm.selective_tree_scan` over a tree of the
tokens (per token :math:`x_t = \Delta_t B_t u_t` and :math:`w_t = \exp(\Delta_t A)`, both
``[d_inner, d_state]``, never formed), with the parameters, initialisation and
discretisation of :class:`~treessm.nn.SelectiveSSM`. Three trees (``mode``):

* ``"chain"`` -- token :math:`t` below :math:`t - 1`; the ``"down"`` scan
  :math:`h_t = w_t h_{t-1} + x_t` is exactly Mamba's recurrence;
* ``"causal"`` -- token :math:`t` below the most similar of tokens :math:`t-k .. t-1`
  (:class:`~treessm.topology.sequence.CausalSequenceTopology` on the scan inputs
  :math:`x`), scanned ``"down"``: :math:`h_t = w_t h_{p(t)} + x_t`, which mixes every
  token with its past only, so the layer generates text with a cache;
* ``"paper"`` -- the GrootVL authors' construction: the chain scan plus ``tree_scale``
  times a leaf-to-root scan over the minimum spanning tree of the chain and short skip
  edges (:class:`~treessm.topology.sequence.GrootLTopology`), which is not causal.

The output is Mamba's: :math:`y_t = W_{out}\big((C_t \cdot h_t + D \odot u_t) \odot
\mathrm{SiLU}(z_t)\big)`. ``docs/language_models.md`` has the math of each mode and how
generation works with each.

The module is one class of about 500 lines: each mode's forward and the state it keeps in
a transformers cache must agree exactly, so they stay side by side.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_bool, check_choice, check_int, check_int_or_auto, check_number
from ..topology import chain_tree
from ..topology.distance import check_distance
from ..topology.sequence import (CausalSequenceTopology, GrootLTopology, causal_forest,
                                 causal_parents)
from ..tree import Tree
from .selective_ssm import SelectiveSSM

__all__ = ["GrootLMixer", "MODES"]

#: Trees a :class:`GrootLMixer` scans over.
MODES = ("chain", "causal", "paper")

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
                "tanh": torch.tanh}
_DEFAULT_K = 4
# what the mixer calls on a cache (transformers' linear-attention cache layers)
_CACHE_METHODS = ("has_previous_state", "update_conv_state", "update_recurrent_state")
_DEFAULT_TREE_SCALE = 0.3  # the GrootVL authors' factor on the tree scan


class GrootLMixer(SelectiveSSM):
    r"""Mamba's mixer with the selective scan over a tree of the tokens (GrootL).

    For the inputs :math:`s_t \in \mathbb{R}^{d_{model}}` of a sequence,

    .. math::
        u_t, z_t &= W_{in} s_t, \qquad u \leftarrow \sigma(\mathrm{CausalConv1d}(u))

        \Delta_t &= \mathrm{softplus}(W_\Delta W_r u_t + b_\Delta), \quad
        B_t, C_t = W_B u_t, W_C u_t, \quad A = -\exp(A_{\log})

        x_t &= \Delta_t B_t u_t, \qquad w_t = \exp(\Delta_t A)
        \qquad (\text{both } d_{inner} \times d_{state})

        y_t &= W_{out}\big((C_t \cdot h_t + D \odot u_t) \odot \mathrm{SiLU}(z_t)\big)

    where the states :math:`h` depend on ``mode``:

    * ``"chain"``: :math:`h_t = w_t h_{t-1} + x_t` (Mamba);
    * ``"causal"``: :math:`h_t = w_t h_{p(t)} + x_t` with :math:`p(t)` the most similar of
      the ``k`` tokens before :math:`t` under :math:`\exp(-\cos(x_s, x_t))`, ties to the
      latest (a ``"down"`` scan over
      :class:`~treessm.topology.sequence.CausalSequenceTopology`);
    * ``"paper"``: :math:`h = \mathrm{chain}(x, w) + \lambda\, \mathrm{up}_T(x, w')`, the
      GrootVL authors' construction: :math:`T` is the minimum spanning tree of the chain and
      the skip edges of up to 3 tokens among the first ``context_len`` tokens, rooted at the
      last token (:class:`~treessm.topology.sequence.GrootLTopology`), :math:`\mathrm{up}_T`
      its leaf-to-root scan, the edge from token :math:`t` to its parent carries
      :math:`w'_t = w_{t+1}` (as in the authors' code) and :math:`\lambda` is
      ``tree_scale``. A token's subtree may hold later tokens: **not causal**.

    The discretisation and the scan run in float32 (float64 for float64 inputs), as in
    transformers' ``MambaMixer``. The linear layers are called as modules, so adapters
    (PEFT's LoRA) on any of them take effect; ``conv1d`` is read through its weight, as in
    ``MambaMixer``.

    With a transformers cache (``cache`` or ``cache_params``, a ``DynamicCache`` with
    linear-attention layers) the layer continues a sequence: ``"chain"`` keeps Mamba's
    convolution and recurrent states (so its cache is a plain Mamba cache); ``"causal"``
    keeps the convolution state and, for each of the last ``k`` tokens, its state
    :math:`h`, its scan input :math:`x` (for the similarity) and whether it may be a
    parent, packed in one tensor ``[B, k, 2 d_{inner} d_{state} + 1]``; ``"paper"`` keeps
    only the convolution state and refuses to continue, since every new token can change
    the tree over all earlier ones (generate by recomputing the sequence, see
    ``docs/language_models.md``).

    Args:
        hidden_size (int): :math:`d_{model}`.
        state_size (int): :math:`d_{state}`. (default: ``16``)
        expand (float): ``d_inner = int(expand * hidden_size)`` unless
            ``intermediate_size`` is given. (default: ``2``)
        conv_kernel (int): width of the causal depthwise convolution. (default: ``4``)
        time_step_rank (int or str): rank of the :math:`\Delta` projection; ``"auto"`` is
            :math:`\lceil d_{model} / 16 \rceil`. (default: ``"auto"``)
        intermediate_size (int, optional): :math:`d_{inner}`. (default: ``None``)
        use_conv_bias (bool): bias in the convolution. (default: ``True``)
        use_bias (bool): biases in the input and output projections. (default: ``False``)
        hidden_act (str): activation after the convolution, ``"silu"``, ``"swish"``,
            ``"gelu"``, ``"relu"`` or ``"tanh"``; the gate is always SiLU, as in Mamba.
            (default: ``"silu"``)
        mode (str): ``"chain"``, ``"causal"`` or ``"paper"``. (default: ``"chain"``)
        k (int, optional): candidate parents per token, ``mode="causal"`` only; ``1`` is
            the chain. (default: ``4``)
        context_len (int, optional): ``mode="paper"`` only: skip edges join tokens among
            the first ``context_len`` (the authors pass the prompt length); ``None`` allows
            them everywhere. Settable on the module. (default: ``None``)
        tree_scale (float, optional): ``mode="paper"`` only: :math:`\lambda`, the weight of
            the tree scan added to the chain scan. (default: ``0.3``)
        distance (str or callable): tree cost between scan inputs for ``"causal"`` and
            ``"paper"``. (default: ``"cosine"``)
        layer_idx (int): the layer's index in the model, which addresses its cache.
            (default: ``0``)
        backend (str, optional): :func:`treessm.selective_tree_scan` backend. (default:
            ``None``)
        topology (callable, optional): the tree instead of the mode's own: with
            ``mode="causal"`` a :class:`~treessm.topology.CausalSequenceTopology` (its ``k``,
            distance and tie tolerance are the layer's, so that a cached continuation
            follows the same rule); with ``mode="paper"`` any callable from features
            :math:`(B, L, C)` to a :class:`~treessm.Tree` over the :math:`BL` tokens, whose
            leaf-to-root scan is added to the chain. Not with ``"chain"``. (default:
            ``None``)

    Shapes:
        - **input:** hidden states :math:`(B, L, d_{model})`; optionally an attention mask
          :math:`(B, L)` (0 at padding) and a cache
        - **output:** :math:`(B, L, d_{model})`

    Raises:
        ValueError, TypeError: on an argument outside its range (named in the message), an
            option of another mode (``k`` without ``mode="causal"``, ``context_len`` or
            ``tree_scale`` without ``mode="paper"``), or a ``topology`` the mode cannot use.

    Example:
        >>> mixer = GrootLMixer(64, state_size=8, mode="causal", k=4)
        >>> mixer(torch.randn(2, 16, 64)).shape
        torch.Size([2, 16, 64])
        >>> tree = mixer.scan_tree(torch.randn(1, 16, 64))
        >>> bool((tree.parent[1:] < torch.arange(1, 16)).all())   # each token below an earlier one
        True
    """

    def __init__(self, hidden_size: int, state_size: int = 16, expand: float = 2,
                 conv_kernel: int = 4, time_step_rank: Union[int, str] = "auto",
                 intermediate_size: Optional[int] = None, use_conv_bias: bool = True,
                 use_bias: bool = False, hidden_act: str = "silu", mode: str = "chain",
                 k: Optional[int] = None, context_len: Optional[int] = None,
                 tree_scale: Optional[float] = None, distance: Any = "cosine",
                 layer_idx: int = 0, backend: Optional[str] = None,
                 topology: Optional[Callable] = None):
        super().__init__()
        hidden_size = check_int(hidden_size, "hidden_size", 1)
        state_size = check_int(state_size, "state_size", 1)
        conv_kernel = check_int(conv_kernel, "conv_kernel", 1)
        if intermediate_size is None:
            expand = check_number(expand, "expand", 0, low_open=True)
            if int(expand * hidden_size) < 1:
                raise ValueError(f"expand must be positive with int(expand * hidden_size) >= 1, "
                                 f"got {expand!r}")
            intermediate_size = int(expand * hidden_size)
        intermediate_size = check_int(intermediate_size, "intermediate_size", 1)
        time_step_rank = check_int_or_auto(time_step_rank, "time_step_rank",
                                           math.ceil(hidden_size / 16))
        use_conv_bias = check_bool(use_conv_bias, "use_conv_bias")
        use_bias = check_bool(use_bias, "use_bias")
        hidden_act = check_choice(hidden_act, "hidden_act", tuple(_ACTIVATIONS))
        mode = check_choice(mode, "mode", MODES)
        if k is not None and mode != "causal":
            raise ValueError(f"k is used with mode='causal' only, got k={k!r} with mode={mode!r}")
        if mode != "paper":
            for name, value in (("context_len", context_len), ("tree_scale", tree_scale)):
                if value is not None:
                    raise ValueError(f"{name} is used with mode='paper' only, got {name}="
                                     f"{value!r} with mode={mode!r}")
        layer_idx = check_int(layer_idx, "layer_idx", 0)
        if topology is not None:
            if mode == "chain":
                raise ValueError("topology is used with mode='causal' or 'paper', got "
                                 "mode='chain'")
            if mode == "causal" and not isinstance(topology, CausalSequenceTopology):
                raise TypeError(f"with mode='causal', topology must be a "
                                f"CausalSequenceTopology (the cached continuation follows "
                                f"its rule), got {type(topology).__name__}")
            if not callable(topology):
                raise TypeError(f"topology must be a callable Topology, got "
                                f"{type(topology).__name__}")
            for name, value in (("k", k), ("context_len", context_len)):
                if value is not None:
                    raise ValueError(f"give {name} to the topology, not to the layer, when a "
                                     f"topology is given")
            if distance != "cosine":
                raise ValueError("give the distance to the topology, not to the layer, when "
                                 "a topology is given")

        self.hidden_size = hidden_size
        self.ssm_state_size = state_size
        self.intermediate_size = intermediate_size
        self.conv_kernel_size = conv_kernel
        self.time_step_rank = time_step_rank
        self.use_conv_bias = bool(use_conv_bias)
        self.use_bias = bool(use_bias)
        self.activation = hidden_act
        self.layer_idx = layer_idx
        self.mode = mode
        self.distance = check_distance(distance)
        self.topology: Optional[Callable] = None
        self.k = None
        self.tree_scale = None
        if mode == "causal":
            self.topology = topology if topology is not None else CausalSequenceTopology(
                _DEFAULT_K if k is None else k, distance)
            self.k = self.topology.k
            self.distance = self.topology.distance
        elif mode == "paper":
            self.topology = (topology if topology is not None
                             else GrootLTopology(context_len, 3, distance))
            self.tree_scale = check_number(_DEFAULT_TREE_SCALE if tree_scale is None
                                           else tree_scale, "tree_scale")

        d_inner = intermediate_size
        # registered in MambaMixer's order, so that the state dicts list the same keys in
        # the same order
        self.conv1d = nn.Conv1d(d_inner, d_inner, conv_kernel, groups=d_inner,
                                padding=conv_kernel - 1, bias=use_conv_bias)
        self.in_proj = nn.Linear(hidden_size, 2 * d_inner, bias=use_bias)
        self._build_ssm(d_inner, state_size, time_step_rank, backend=backend)
        self.out_proj = nn.Linear(d_inner, hidden_size, bias=use_bias)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config, layer_idx: int = 0, **options) -> "GrootLMixer":
        """A mixer shaped like the ``MambaMixer`` that ``config`` (a transformers
        ``MambaConfig``, or anything with its attributes) builds for layer ``layer_idx``;
        ``options`` are the keyword arguments of :class:`GrootLMixer` (``mode``, ``k``,
        ``context_len``, ``tree_scale``, ``distance``, ``backend``)."""
        for name in ("hidden_size", "state_size", "intermediate_size", "conv_kernel",
                     "time_step_rank"):
            if not hasattr(config, name):
                raise TypeError(f"config must describe a Mamba model (a transformers "
                                f"MambaConfig); it has no attribute {name!r}")
        return cls(config.hidden_size, state_size=config.state_size,
                   intermediate_size=config.intermediate_size, conv_kernel=config.conv_kernel,
                   time_step_rank=int(config.time_step_rank),
                   use_conv_bias=getattr(config, "use_conv_bias", True),
                   use_bias=getattr(config, "use_bias", False),
                   hidden_act=getattr(config, "hidden_act", "silu"), layer_idx=layer_idx,
                   **options)

    def reset_parameters(self):
        r"""Mamba's initialisation: S4D-real :math:`A = -(1, \dots, N)`, :math:`D = 1`,
        :math:`\Delta` log-uniform in ``[0.001, 0.1]`` through the inverse softplus of its
        bias, the projections as ``nn.Linear`` and ``nn.Conv1d`` initialise them."""
        for mod in (self.in_proj, self.conv1d, self.x_proj, self.out_proj):
            mod.reset_parameters()
        self.reset_ssm_parameters()

    @property
    def context_len(self) -> Optional[int]:
        """``mode="paper"``: the skip edges join tokens among the first ``context_len``."""
        return getattr(self.topology, "context_len", None) if self.mode == "paper" else None

    @context_len.setter
    def context_len(self, value: Optional[int]) -> None:
        if self.mode != "paper":
            raise ValueError(f"context_len is used with mode='paper' only, this mixer has "
                             f"mode={self.mode!r}")
        if not isinstance(self.topology, GrootLTopology):
            raise ValueError(f"context_len belongs to the GrootL topology; this mixer scans "
                             f"{type(self.topology).__name__}")
        self.topology = GrootLTopology(value, self.topology.window, self.distance)

    # ------------------------------------------------------------------ pieces
    def project_in(self, hidden_states: Tensor, mask: Optional[Tensor] = None,
                   cache=None) -> Tuple[Tensor, Tensor]:
        """Inner features ``u`` (input projection, causal convolution, activation) and the
        gate's pre-activation ``z``, both ``[B, L, d_inner]``; with a cache, the
        convolution continues from its state and the state is updated."""
        dtype, length = hidden_states.dtype, hidden_states.shape[1]
        if mask is not None:
            hidden_states = (hidden_states * mask.unsqueeze(-1)).to(dtype)
        u, z = self.in_proj(hidden_states).chunk(2, dim=-1)
        u = u.transpose(1, 2)
        if cache is not None:
            # earlier inputs in front (at most conv_kernel of them; zeros at the start)
            u = cache.update_conv_state(u, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
        conv = F.conv1d(u.to(self.conv1d.weight.dtype), self.conv1d.weight, self.conv1d.bias,
                        padding=self.conv_kernel_size - 1, groups=self.intermediate_size)
        u = _ACTIVATIONS[self.activation](conv[..., :u.shape[-1]][..., -length:])
        u = u.transpose(1, 2).to(dtype)
        if mask is not None:
            u = (u * mask.unsqueeze(-1)).to(dtype)
        return u, z

    @torch.no_grad()
    def scan_tree(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None) -> Tree:
        """The tree this layer scans for ``hidden_states [B, L, hidden_size]`` computed
        without a cache: the chain (``"chain"``), the causal tree (``"causal"``) or the
        GrootL tree of the tree scan (``"paper"``, rooted at the last token)."""
        mask = None if attention_mask is None else attention_mask[:, -hidden_states.shape[1]:]
        u, _ = self.project_in(hidden_states, mask)
        b, length = u.shape[:2]
        if self.mode == "chain":
            return chain_tree(b, length, u.device)
        if self.mode == "causal":
            valid = None if mask is None else mask > 0
            if self._compares_factors():
                a, b = self.tree_factors(u)
                return self.topology(a, valid, outer=b)
            return self.topology(self.tree_features(u), valid)
        return self._paper_tree(u)

    @torch.no_grad()
    def tree_factors(self, u: Tensor) -> Tuple[Tensor, Tensor]:
        r"""The factors of the scan inputs of inner features ``u [B, L, d_inner]``:
        :math:`\Delta \odot u` ``[B, L, d_inner]`` and :math:`B` ``[B, L, d_state]``, in
        float32 (float64 for float64 input), without gradient; :meth:`tree_features` is
        their outer product."""
        delta, b, _ = self.ssm_inputs(u)
        acc = torch.promote_types(u.dtype, torch.float32)
        return F.softplus(delta.to(acc)) * u.to(acc), b.to(acc)

    @torch.no_grad()
    def tree_features(self, u: Tensor) -> Tensor:
        r"""The scan inputs :math:`x = \Delta B u` of inner features ``u [B, L, d_inner]``,
        flattened to ``[B, L, d_inner * d_state]`` in float32 (float64 for float64 input):
        what the causal and GrootL trees compare tokens by. Formed for tree construction
        only, without gradient; the scan itself never forms them, and neither do the
        causal and GrootL trees with the cosine distance, which compare the factors
        (:meth:`tree_factors`; :math:`\cos(a \otimes b, a' \otimes b') = \cos(a, a')
        \cos(b, b')`)."""
        a, b = self.tree_factors(u)
        return (a.unsqueeze(-1) * b.unsqueeze(-2)).flatten(2)

    def _paper_tree(self, u: Tensor) -> Tree:
        """The GrootL tree of ``mode="paper"``: its own topology with the cosine distance
        compares the factors of the scan inputs (:meth:`tree_factors`), any other the scan
        inputs themselves."""
        if type(self.topology) is GrootLTopology and self.topology.distance == "cosine":
            a, b = self.tree_factors(u)
            return self.topology(a, outer=b)
        return self.topology(self.tree_features(u))

    def _compares_factors(self) -> bool:
        """Whether the causal tree compares the factors of the scan inputs (cosine) rather
        than the scan inputs themselves."""
        return self.mode == "causal" and self.distance == "cosine"

    def _cached_features(self, u: Tensor) -> Tensor:
        """What the causal tree compares tokens by, as kept in the cache: the factors side
        by side ``[B, L, d_inner + d_state]`` (cosine), else the scan inputs."""
        if self._compares_factors():
            return torch.cat(self.tree_factors(u), -1)
        return self.tree_features(u)

    def _chain(self, u: Tensor, past: Optional[Tensor], keep: bool):
        # Mamba's recurrence; a cached state enters each chain's first token
        b, length = u.shape[:2]
        last = (torch.arange(1, b + 1, device=u.device) * length - 1) if keep else None
        return self.ssm(u.reshape(b * length, -1), chain_tree(b, length, u.device), "down",
                        initial_state=past, state_vertices=last)

    def _causal(self, u: Tensor, valid: Optional[Tensor], past, keep: int):
        # the causal tree over the new tokens; a token whose parent is a cached token is a
        # root into which that token's cached state enters
        b, length = u.shape[:2]
        feat = self._cached_features(u)
        # the factors are split again where the tree compares them
        split = [self.intermediate_size] if self._compares_factors() else []
        h0 = None
        if past is None:
            first, *outer = feat.tensor_split(split, -1)
            tree = self.topology(first, valid, outer=outer[0] if outer else None)
        else:
            h_past, f_past, v_past = past
            k = h_past.shape[1]
            cur = (torch.ones(b, length, dtype=torch.bool, device=u.device) if valid is None
                   else valid)
            # the cached tokens come first: they are candidates, never children
            first, *outer = torch.cat([f_past.to(feat.dtype), feat], 1).tensor_split(split, -1)
            parent = causal_parents(first, self.k, self.distance, torch.cat([v_past, cur], 1),
                                    self.topology.tie_rtol,
                                    outer=outer[0] if outer else None)[:, k:]
            tree = causal_forest(torch.where(parent >= k, parent - k, -1))
            roots = tree.roots
            above = parent.reshape(-1)[roots]  # a cached token's slot, or -1
            h0 = h_past[roots // length, above.clamp(min=0)].to(feat.dtype)
            h0 = torch.where((above >= 0).view(-1, 1, 1), h0, 0)
        rows = None
        if keep:
            rows = (torch.arange(b, device=u.device)[:, None] * length
                    + torch.arange(length - keep, length, device=u.device)).reshape(-1)
        out = self.ssm(u.reshape(b * length, -1), tree, "down", initial_state=h0,
                       state_vertices=rows)
        return out, feat

    def _paper(self, u: Tensor) -> Tensor:
        # the chain scan plus tree_scale times the leaf-to-root scan of the GrootL tree,
        # whose edge (t, parent(t)) takes the step of token t + 1 (the root's is never read)
        b, length = u.shape[:2]
        flat = u.reshape(b * length, -1)
        inputs = self.ssm_inputs(flat)
        y = self.ssm(flat, chain_tree(b, length, u.device), "down", inputs=inputs)
        tree = self._paper_tree(u)
        shifted = inputs[0].view(b, length, -1).roll(-1, dims=1).reshape(b * length, -1)
        return y + self.tree_scale * self.ssm(flat, tree, "up", skip=False, edge_step=shifted,
                                              inputs=inputs)

    # ------------------------------------------------------------------ cache
    def _cached_feature_size(self) -> int:
        if self._compares_factors():
            return self.intermediate_size + self.ssm_state_size
        return self.intermediate_size * self.ssm_state_size

    def _causal_packed_size(self) -> int:
        return self.intermediate_size * self.ssm_state_size + self._cached_feature_size() + 1

    def _unpack(self, state: Tensor, b: int):
        states = self.intermediate_size * self.ssm_state_size
        if self.mode == "chain":
            expected = (b, self.intermediate_size, self.ssm_state_size)
        else:
            expected = (b, self.k, self._causal_packed_size())
        if tuple(state.shape) != expected:
            raise ValueError(
                f"the cache of layer {self.layer_idx} holds a recurrent state of shape "
                f"{list(state.shape)}, but GrootLMixer(mode={self.mode!r}"
                + (f", k={self.k}" if self.mode == "causal" else "")
                + f") keeps {list(expected)}; was the cache filled by another model or mode?")
        if self.mode == "chain":
            return state
        h = state[..., :states].reshape(b, self.k, self.intermediate_size, self.ssm_state_size)
        return h, state[..., states:-1], state[..., -1] > 0.5

    def _pack_causal(self, h: Tensor, x: Tensor, valid: Optional[Tensor], past) -> Tensor:
        # h [B, m, d_inner, d_state] and the cached features x [B, m, F] of the last m
        # tokens
        b, m = x.shape[:2]
        cur_valid = (torch.ones(b, m, dtype=h.dtype, device=h.device) if valid is None
                     else valid.to(h.dtype))
        cur = torch.cat([h.reshape(b, m, -1), x.reshape(b, m, -1), cur_valid.unsqueeze(-1)],
                        -1)
        if past is not None:
            h_p, f_p, v_p = past
            old = torch.cat([h_p.reshape(b, self.k, -1).to(h.dtype), f_p.to(h.dtype),
                             v_p.to(h.dtype).unsqueeze(-1)], -1)
            cur = torch.cat([old, cur], 1)
        elif m < self.k:
            # slots before the first token: zero and never chosen as parents
            cur = torch.cat([cur.new_zeros(b, self.k - m, cur.shape[-1]), cur], 1)
        return cur[:, -self.k:]

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: Tensor, cache=None, attention_mask: Optional[Tensor] = None,
                *, cache_params=None, cache_position: Optional[Tensor] = None,
                **kwargs) -> Tensor:
        """Mix ``hidden_states [B, L, hidden_size]``.

        Args:
            hidden_states (Tensor [B, L, hidden_size]): the block's normalised inputs.
            cache (transformers Cache, optional): states of earlier tokens, read and
                updated in place (``DynamicCache`` with linear-attention layers, as
                ``MambaModel`` makes). (default: ``None``)
            attention_mask (Tensor [B, L], optional): 1 for tokens, 0 for padding; padded
                inputs are zeroed (as in Mamba) and never become parents in
                ``mode="causal"``. (default: ``None``)
            cache_params: the name transformers releases before 5.24 give ``cache``.
            cache_position: accepted for the signatures of older releases; unused.

        Returns:
            Tensor [B, L, hidden_size] in the dtype of ``hidden_states``.

        Raises:
            TypeError, ValueError: on hidden states that are not ``[B, L, hidden_size]``, a
                malformed attention mask, two different caches, or a cache filled by
                another model or mode.
        """
        if cache is not None and cache_params is not None and cache is not cache_params:
            raise ValueError("pass the cache once, as cache or as cache_params, not two "
                             "different ones")
        cache = cache if cache is not None else cache_params
        if cache is not None and not all(hasattr(cache, name) for name in _CACHE_METHODS):
            raise TypeError(f"cache must be a transformers Cache of linear-attention layers "
                            f"(a DynamicCache made by a Mamba model), got "
                            f"{type(cache).__name__}")
        if (not isinstance(hidden_states, Tensor) or hidden_states.dim() != 3
                or hidden_states.shape[-1] != self.hidden_size):
            shape = (list(hidden_states.shape) if isinstance(hidden_states, Tensor)
                     else type(hidden_states).__name__)
            raise ValueError(f"hidden_states must be a [B, L, {self.hidden_size}] tensor, got "
                             f"{shape}")
        if not hidden_states.is_floating_point():
            raise TypeError(f"hidden_states must be a floating-point tensor, got "
                            f"{hidden_states.dtype}")
        b, length, _ = hidden_states.shape
        dtype = hidden_states.dtype
        mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor):
                raise TypeError(f"attention_mask must be a tensor [B, L] of 0 and 1, got "
                                f"{type(attention_mask).__name__}")
            if attention_mask.is_complex():
                raise TypeError(f"attention_mask must be a bool, integer or real tensor of 0 "
                                f"and 1, got {attention_mask.dtype}")
            if attention_mask.dim() != 2 or attention_mask.shape[0] != b or \
                    attention_mask.shape[1] < length:
                raise ValueError(f"attention_mask must have shape [{b}, >= {length}], got "
                                 f"{list(attention_mask.shape)}")
            if attention_mask.device != hidden_states.device:
                raise ValueError(f"attention_mask must be on the device of hidden_states "
                                 f"({hidden_states.device}), got {attention_mask.device}")
            mask = attention_mask[:, -length:]
        if b * length == 0:  # no token: an empty output, the cache untouched
            u, z = self.in_proj(hidden_states).chunk(2, dim=-1)
            return self.out_proj(u * F.silu(z))

        has_past = cache is not None and cache.has_previous_state(self.layer_idx)
        if has_past and self.mode == "paper":
            raise ValueError(
                "GrootLMixer(mode='paper') cannot continue a cached sequence: its tree is not "
                "causal, so every new token can change the states of all earlier ones. "
                "Recompute the whole sequence instead, e.g. model.generate(..., "
                "use_cache=False), or convert with mode='causal' for cached generation")
        past = None
        if has_past:
            state = _recurrent_state(cache, self.layer_idx)
            if state is None:
                raise ValueError(f"the cache of layer {self.layer_idx} has a convolution "
                                 "state but no recurrent state")
            past = self._unpack(state, b)

        u, z = self.project_in(hidden_states, mask, cache)
        valid = None if mask is None else mask > 0
        keep = cache is not None
        if self.mode == "chain":
            y = self._chain(u, past, keep)
            if keep:
                y, new_state = y
        elif self.mode == "causal":
            m = min(self.k, length) if keep else 0
            y, feat = self._causal(u, valid, past, m)
            if keep:
                y, states = y
                new_state = self._pack_causal(
                    states.view(b, m, self.intermediate_size, self.ssm_state_size),
                    feat[:, length - m:], None if valid is None else valid[:, length - m:],
                    past)
        else:
            y = self._paper(u)
        if keep and self.mode != "paper":
            cache.update_recurrent_state(new_state.detach(), self.layer_idx)
        y = y.view(b, length, -1) * F.silu(z.to(y.dtype))
        return self.out_proj(y.to(dtype))

    def extra_repr(self) -> str:
        text = (f"{self.hidden_size}, d_inner={self.intermediate_size}, "
                f"d_state={self.ssm_state_size}, dt_rank={self.time_step_rank}, "
                f"d_conv={self.conv_kernel_size}, layer_idx={self.layer_idx}, mode={self.mode!r}")
        if self.mode == "causal":
            text += f", k={self.k}"
        elif self.mode == "paper":
            text += f", context_len={self.context_len}, tree_scale={self.tree_scale}"
        return text


def _recurrent_state(cache, layer_idx: int) -> Optional[Tensor]:
    """The recurrent state of a linear-attention cache layer (transformers >= 5.17)."""
    get = getattr(cache, "get_recurrent_state", None)
    if get is not None:  # 5.24 and later
        return get(layer_idx)
    state = cache.layers[layer_idx].recurrent_states
    return state[0] if isinstance(state, dict) else state
