"""Tree scanning inside transformers' Mamba: GrootL as a module swap, not a patch.

:func:`grootl_from_mamba` replaces the ``MambaMixer`` of every block of a
``MambaForCausalLM`` or ``MambaModel`` by a :class:`~treessm.nn.grootl.GrootLMixer` with the
same weights, in place. The model keeps its class, its configuration and its state-dict
keys, so ``generate()``, the Trainer, PEFT/LoRA and ``save_pretrained`` work as for the
original model (a saved model is a plain Mamba checkpoint; convert again after loading)::

    from transformers import MambaForCausalLM
    from treessm.integrations.transformers import grootl_from_mamba

    model = MambaForCausalLM.from_pretrained("state-spaces/mamba-130m-hf")
    grootl_from_mamba(model, mode="causal", k=4)     # exactly causal, cached generation
    out = model.generate(input_ids, max_new_tokens=32)

transformers is optional and imported only by :func:`grootl_from_mamba`; the supported
releases are :data:`TRANSFORMERS_RANGE`. ``docs/language_models.md`` describes the modes.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..nn.grootl import MODES, GrootLMixer
from ..typing import release, require

__all__ = ["grootl_from_mamba", "set_context_len", "check_transformers_version",
           "TRANSFORMERS_RANGE", "MODES"]

#: Supported transformers releases, ``(lowest, first unsupported)``: the cache of
#: linear-attention layers (``DynamicCache`` with ``update_conv_state``,
#: ``update_recurrent_state`` and per-state dictionaries) as 5.17 to 5.24 have it; 5.24
#: renamed the mixer's ``cache_params`` argument to ``cache`` and both names are accepted.
TRANSFORMERS_RANGE = ((5, 17), (6, 0))


def _range_text() -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = TRANSFORMERS_RANGE
    return f"transformers>={lo_major}.{lo_minor},<{hi_major}"


def check_transformers_version(version: Optional[str] = None) -> str:
    """Raise an :class:`ImportError` naming the supported range when transformers (or the
    given ``version`` string) lies outside :data:`TRANSFORMERS_RANGE`; return the version.

    Args:
        version (str, optional): a version string to check instead of the installed
            release. (default: ``None``)

    Returns:
        str: the version checked.

    Raises:
        ImportError: transformers is missing or its release is outside the range.

    Example:
        >>> check_transformers_version("5.20.0")
        '5.20.0'
        >>> check_transformers_version("4.46.0")
        Traceback (most recent call last):
        ...
        ImportError: treessm's Mamba integration supports transformers>=5.17,<6, ...
    """
    if version is None:
        require("transformers", "treessm.integrations.transformers")
        import transformers

        version = transformers.__version__
    lo, hi = TRANSFORMERS_RANGE
    if not lo <= release(version, "transformers") < hi:
        raise ImportError(f"treessm's Mamba integration supports {_range_text()}, found "
                          f"transformers {version}; install a supported release: "
                          f"pip install '{_range_text()}'")
    return version


def _mamba_blocks(model: nn.Module):
    """The blocks of a Mamba model whose mixer is a ``MambaMixer`` or a GrootLMixer."""
    from transformers.models.mamba.modeling_mamba import MambaMixer

    return [m for m in model.modules()
            if isinstance(getattr(m, "mixer", None), (MambaMixer, GrootLMixer))]


def grootl_from_mamba(model: nn.Module, mode: str = "chain", **options) -> nn.Module:
    r"""Replace every Mamba mixer of ``model`` by a :class:`~treessm.nn.grootl.GrootLMixer`
    with the same weights, device and dtype, in place.

    ``mode="chain"`` reproduces the original model; ``mode="causal"`` hangs every token
    below the most similar of the ``k`` tokens before it (exactly causal, generates with
    the model's cache); ``mode="paper"`` is the GrootVL authors' construction (chain scan
    plus ``tree_scale`` times a non-causal tree scan), for fine-tuning and scoring; its
    generation recomputes the whole sequence at every step, so this function sets
    ``model.generation_config.use_cache = False`` (and back to ``True`` when a later call
    converts to another mode). A model converted before can be converted again, to
    another mode.

    Args:
        model (transformers.MambaForCausalLM or transformers.MambaModel): the model; any
            module holding Mamba blocks works.
        mode (str): ``"chain"``, ``"causal"`` or ``"paper"``. (default: ``"chain"``)
        **options: keyword arguments of :class:`~treessm.nn.grootl.GrootLMixer`: ``k``
            (``"causal"``), ``context_len`` and ``tree_scale`` (``"paper"``), ``distance``,
            ``backend``.

    Returns:
        The same ``model``, its class unchanged.

    Raises:
        ImportError: transformers is missing or outside :data:`TRANSFORMERS_RANGE`.
        ValueError: an unknown ``mode`` or option value, or a model without Mamba mixers.

    Shapes:
        the model's own: ``input_ids`` :math:`(B, L)` to logits :math:`(B, L, V)`.

    Example:
        >>> from transformers import MambaConfig, MambaForCausalLM
        >>> config = MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2)
        >>> model = grootl_from_mamba(MambaForCausalLM(config), mode="causal", k=4)
        >>> type(model).__name__, type(model.backbone.layers[0].mixer).__name__
        ('MambaForCausalLM', 'GrootLMixer')
        >>> model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False).shape
        torch.Size([1, 8])
    """
    check_transformers_version()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers MambaForCausalLM or MambaModel, got "
                        f"{type(model).__name__}")
    blocks = _mamba_blocks(model)
    if not blocks:
        raise ValueError(f"model must be a transformers MambaForCausalLM or MambaModel with "
                         f"MambaMixer layers; {type(model).__name__} has none")
    config = getattr(model, "config", None)
    was_paper = False
    for block in blocks:
        old = block.mixer
        was_paper |= isinstance(old, GrootLMixer) and old.mode == "paper"
        layer_config = getattr(old, "config", None) or getattr(block, "config", None) or config
        ref = old.A_log
        new = GrootLMixer.from_config(layer_config, layer_idx=old.layer_idx, mode=mode,
                                      **options)
        new.to(device=ref.device, dtype=ref.dtype)
        new.load_state_dict(old.state_dict())
        for name, param in new.named_parameters():
            param.requires_grad_(old.get_parameter(name).requires_grad)
        new.train(old.training)
        block.mixer = new
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        if mode == "paper":
            generation_config.use_cache = False
        elif was_paper:
            generation_config.use_cache = True
    return model


def set_context_len(model: nn.Module, context_len: Optional[int]) -> nn.Module:
    """Set ``context_len`` of every ``mode="paper"`` mixer of ``model`` (the authors pass
    the length of the prompt, so that only the continuation is scored causally).

    Args:
        model (torch.nn.Module): a model converted by :func:`grootl_from_mamba` with
            ``mode="paper"``.
        context_len (int, optional): the prompt length; ``None`` allows skip edges
            everywhere.

    Returns:
        the same ``model``.

    Raises:
        ValueError: the model has no ``mode="paper"`` mixer, or ``context_len`` is not a
            positive int or ``None``.

    Example:
        >>> from transformers import MambaConfig, MambaForCausalLM
        >>> config = MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2)
        >>> model = grootl_from_mamba(MambaForCausalLM(config), mode="paper")
        >>> model = set_context_len(model, 12)
        >>> model.backbone.layers[0].mixer.context_len
        12
    """
    mixers = [m for m in model.modules() if isinstance(m, GrootLMixer) and m.mode == "paper"]
    if not mixers:
        raise ValueError("model has no GrootLMixer with mode='paper'; convert it with "
                         "grootl_from_mamba(model, mode='paper') first")
    for m in mixers:
        m.context_len = context_len
    return model
