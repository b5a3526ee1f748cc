"""Argument checks at the public boundary, one helper per kind of check.

Every constructor and function of treessm validates its plain arguments here, so that the
same mistake gets the same error everywhere: a wrong *type* raises :class:`TypeError`, a
value of the right type outside its range raises :class:`ValueError`, and both messages
name the argument and say what was expected. ``bool`` is never accepted where a number
is expected (``True`` is an ``int`` to Python, but ``TreeSSM(True)`` is a mistake).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["check_int", "check_ints", "check_int_or_auto", "check_number", "check_bool",
           "check_choice", "check_optional_choice", "check_device", "check_features",
           "INDEX_TYPES", "check_index_range", "check_edge_index", "all_finite",
           "values_readable"]


def _is_int(value) -> bool:
    if isinstance(value, torch.Tensor):  # a 0-dim integer tensor, as PyG passes sizes
        return value.dim() == 0 and not (value.is_floating_point() or value.is_complex()
                                         or value.dtype == torch.bool)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_range(low: Optional[int]) -> str:
    if low == 1:
        return "a positive int"
    if low == 0:
        return "a non-negative int"
    return "an int" if low is None else f"an int >= {low}"


def check_int(value, name: str, low: Optional[int] = None) -> int:
    """``value`` as an ``int`` (numpy integers and 0-dim integer tensors accepted,
    ``bool`` refused).

    Raises:
        TypeError: if ``value`` is not an integer.
        ValueError: if ``value < low``.
    """
    if not _is_int(value):
        raise TypeError(f"{name} must be {_int_range(low)}, got {value!r} of type "
                        f"{type(value).__name__}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be {_int_range(low)}, got {value}")
    return value


def check_ints(value, name: str, low: Optional[int] = None,
               length: Optional[int] = None) -> Tuple[int, ...]:
    """A sequence of ints (each as :func:`check_int`) as a tuple, of ``length`` entries when
    given.

    Raises:
        TypeError: if ``value`` is not a sequence of integers.
        ValueError: on an entry below ``low`` or a sequence of another length.
    """
    if isinstance(value, (str, bytes, torch.Tensor)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of {_int_range(low)[2:]}s, got "
                        f"{value!r}")
    out = tuple(check_int(v, f"{name}[{i}]", low) for i, v in enumerate(value))
    if length is not None and len(out) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(out)}")
    return out


def check_number(value, name: str, low: Optional[float] = None, high: Optional[float] = None,
                 *, low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite ``float`` in the interval from ``low`` to ``high`` (closed ends
    unless ``low_open`` / ``high_open``).

    Raises:
        TypeError: if ``value`` is not a real number (``bool`` and strings included).
        ValueError: if it is not finite or lies outside the interval.
    """
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type "
                        f"{type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        if low is not None and high is not None:
            where = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            where = f"{'>' if low_open else '>='} {low}"
        else:
            where = f"{'<' if high_open else '<='} {high}"
        raise ValueError(f"{name} must be {where}, got {value!r}")
    return value


def check_bool(value, name: str) -> bool:
    """``value`` as a ``bool`` (Python or numpy booleans only).

    Raises:
        TypeError: on anything else (``0``, ``"no"``, ``None``).
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r} of type {type(value).__name__}")


def check_choice(value, name: str, choices: Sequence):
    """``value`` itself when it is one of ``choices`` (compared with ``==`` after a type
    check, so that ``1.0`` is not taken for ``1`` and an array raises cleanly).

    Raises:
        ValueError: otherwise.
    """
    for choice in choices:
        if type(value) is type(choice) and value == choice:
            return value
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_device(device, name: str = "device") -> torch.device:
    """``device`` (a string, an index or a :class:`torch.device`) as a :class:`torch.device`.

    Raises:
        TypeError: if it is none of those.
        ValueError: if torch does not know the device.
    """
    if isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise TypeError(f"{name} must be a torch.device, a string such as 'cpu' or 'cuda:0', "
                        f"or a CUDA index, got {type(device).__name__}")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{name} must name a torch device such as 'cpu' or 'cuda:0', got "
                         f"{device!r}") from exc


def values_readable(t: Tensor) -> bool:
    """Whether a check may read the values of ``t`` on the host now: not while the current
    CUDA stream is being captured into a CUDA graph, where reading would wait for the
    device, which a capture forbids. The eager steps that a capture needs before it run
    the same checks on their inputs; the replays read nothing. (While ``torch.compile``
    traces, the values are read as before: the check runs eagerly between its graphs.)"""
    return not (t.is_cuda and not torch.compiler.is_compiling()
                and torch.cuda.is_current_stream_capturing())


def all_finite(t: Tensor) -> bool:
    """Whether every entry of the floating-point tensor ``t`` is finite, from its smallest
    and largest entries (both propagate NaN): two values instead of a boolean tensor of
    ``t``'s size, which on the CPU takes several passes and allocations."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_features(feat, dim: int, name: str = "feat", shape: str = "") -> None:
    """A floating-point tensor of ``dim`` dimensions (``shape`` spells them out for the
    message).

    Raises:
        TypeError: if ``feat`` is not a floating-point tensor.
        ValueError: if it has another number of dimensions.
    """
    if not isinstance(feat, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(feat).__name__}")
    if not feat.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {feat.dtype}")
    if feat.dim() != dim:
        raise ValueError(f"{name} must have shape {shape}, got {list(feat.shape)}")


def check_int_or_auto(value, name: str, auto: int) -> int:
    """``auto`` for the string ``"auto"``, else ``value`` as a positive int.

    Raises:
        TypeError: if ``value`` is neither ``"auto"`` nor an integer.
        ValueError: if it is an integer below 1.
    """
    if isinstance(value, str) and value == "auto":
        return auto
    if not _is_int(value):
        raise TypeError(f"{name} must be a positive int or 'auto', got {value!r}")
    return check_int(value, name, 1)


def check_optional_choice(value, name: str, choices: Sequence):
    """``None`` or one of ``choices`` (:func:`check_choice`)."""
    if value is None:
        return None
    try:
        return check_choice(value, name, choices)
    except ValueError:
        raise ValueError(f"{name} must be None or one of {tuple(choices)}, got {value!r}"
                         ) from None


#: Integer dtypes taken for vertex ids (converted to int64).
INDEX_TYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_index_range(ids: Tensor, name: str, num_nodes: int, hint: str = "") -> None:
    """Raise a :class:`ValueError` unless every entry of ``ids`` lies in ``[0, num_nodes)``
    (reads the values: on an accelerator, it waits for the device). ``hint`` is appended to
    the message."""
    if ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= num_nodes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} must hold vertex ids in [0, {num_nodes}), found {bad}"
                             f"{hint}")


def check_edge_index(edge_index, num_nodes: int, *, device=None, rows_of: Optional[str] = None,
                     check_range: bool = True) -> Tensor:
    """An integer tensor ``[2, E]`` of vertex ids in ``[0, num_nodes)``, returned as int64.

    Args:
        device (torch.device, optional): the device it must be on (that of ``rows_of``).
        rows_of (str, optional): the argument whose rows the ids index, for the messages.
        check_range (bool): read the ids to check their range (on an accelerator, that
            waits for the device).

    Raises:
        TypeError: if ``edge_index`` is not an integer tensor.
        ValueError: on another shape, another device, or ids outside ``[0, num_nodes)``.
    """
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"edge_index must be an integer tensor [2, E], got "
                        f"{type(edge_index).__name__}")
    if edge_index.dtype not in INDEX_TYPES:
        raise TypeError(f"edge_index must be an integer tensor [2, E] (int64), got "
                        f"{edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape [2, E], got {list(edge_index.shape)}")
    if device is not None and edge_index.device != device:
        raise ValueError(f"edge_index must be on the device of {rows_of or 'the features'} "
                         f"({device}), got {edge_index.device}")
    edge_index = edge_index.long()
    if check_range:
        hint = f" ({rows_of} has {num_nodes} rows)" if rows_of else ""
        check_index_range(edge_index, "edge_index", num_nodes, hint)
    return edge_index
