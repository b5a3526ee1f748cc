r"""Edge costs from vertex features: how dissimilar the two ends of a candidate edge are.

Named distances (:data:`DISTANCES`):

* ``"cosine"`` -- :math:`\exp(-\cos(x_u, x_v))`, the cost of GrootVL; a zero vector has
  cosine 0 with everything instead of NaN;
* ``"l2"`` -- the Euclidean distance :math:`\lVert x_u - x_v \rVert_2`;

or any callable ``f(feat_u [E, C], feat_v [E, C]) -> cost [E]``.

Trees do not depend on the scale of the features, however large or small (any finite
value): the cosine does not depend on the scale of either vector, so every row is first
multiplied by the power of two that brings its largest entry into :math:`[1/2, 1)`
(:func:`scale_by_power_of_two`; exact, and it keeps squared norms far from overflow and
underflow); ``"l2"`` distances are computed from the features of each example scaled
alike and multiplied back, exactly, so that only distances beyond the range of the dtype
overflow. On the CPU the compiled cosine kernels check instead that every squared norm
lies in a safe range and redo the work on scaled rows only when one does not.

Tree construction carries no gradient: every cost is computed under ``torch.no_grad``
from detached features. :func:`edge_cost` is plain torch and runs on any device. On
the CPU the named distances also have compiled kernels (:func:`pair_costs_cpu`, and
:func:`grid_costs_cpu` for image grids, where every pixel is read once for all its
edges); their channel sums use fixed-width vector lanes with a fixed order of
additions, so results are deterministic, and they agree with :func:`edge_cost` to
rounding. On CUDA devices the grid costs come from one fused kernel,
:func:`treessm.topology.cuda_grid.grid_costs`, with :func:`grid_costs_torch` as its
fallback and reference.
"""
from __future__ import annotations

import math

from typing import Callable, Union

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .._checks import all_finite
from ..ops.chunks import run_chunks

__all__ = ["DISTANCES", "EPS", "check_distance", "edge_cost", "pair_costs_cpu", "grid_costs_cpu",
           "grid_costs_torch", "scale_by_power_of_two"]

DISTANCES = ("cosine", "l2")
#: Norm floor of the cosine distance (as in ``torch.nn.functional.normalize``).
EPS = 1e-12

Distance = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]

_COSINE, _L2 = 0, 1


def kind_code(distance: str) -> int:
    """Code of a named distance in the compiled kernels."""
    return _COSINE if distance == "cosine" else _L2


def check_distance(distance) -> Distance:
    """Validate a distance argument (a name of :data:`DISTANCES` or a callable)."""
    if callable(distance):
        return distance
    if isinstance(distance, str) and distance in DISTANCES:
        return distance
    raise ValueError(f"distance must be one of {DISTANCES} or a callable "
                     f"f(feat_u, feat_v) -> cost, got {distance!r}")


def _work_dtype(feat: torch.Tensor) -> torch.dtype:
    # half types lose too much in a sum over channels; float64 stays float64
    return torch.float64 if feat.dtype == torch.float64 else torch.float32


def scale_by_power_of_two(x: torch.Tensor, dim, return_scale: bool = False):
    """``x`` multiplied, per slice along ``dim``, by the power of two :math:`2^{-e}` that
    brings the slice's largest magnitude into ``[1/2, 1)``; zero and non-finite slices stay
    as they are.

    Multiplying by a power of two is exact (barring subnormal results), so the cosine of
    two rows, or the order of the distances inside a slice, is what it was, while sums of
    squares neither overflow nor underflow. With ``return_scale``, also :math:`2^{e}` per
    slice (``keepdim`` shape), which turns a distance of scaled features back into the
    distance of the features.
    """
    if x.numel() == 0:
        return (x, torch.ones((), dtype=x.dtype, device=x.device)) if return_scale else x
    amax = torch.linalg.vector_norm(x, math.inf, dim=dim, keepdim=True)  # max |x|, one pass
    _, e = torch.frexp(amax)  # amax = m * 2^e with m in [1/2, 1); e = 0 for 0, inf, NaN
    e = e.to(torch.int32)
    half = torch.div(e, 2, rounding_mode="floor")
    one = torch.ones_like(amax)
    # two factors: 2^-e alone overflows for subnormal slices (e down to -1074)
    scaled = x * torch.ldexp(one, -half) * torch.ldexp(one, half - e)
    return (scaled, torch.ldexp(one, e)) if return_scale else scaled


# ---------------------------------------------------------------------------- torch path
def edge_cost(feat: torch.Tensor, edge_index: torch.Tensor, distance: Distance = "cosine"
              ) -> torch.Tensor:
    r"""Cost of every edge from the features of its ends, in torch (any device).

    Args:
        feat (Tensor [N, C]): vertex features.
        edge_index (LongTensor [2, E]): edges.
        distance (str or callable): ``"cosine"``, ``"l2"`` or ``f(feat_u, feat_v) -> [E]``.
            (default: ``"cosine"``)

    Returns:
        Tensor [E] (float32, or float64 for float64 features), without gradient.
    """
    distance = check_distance(distance)
    with torch.no_grad():
        x = feat.detach()
        if x.dim() != 2:
            x = x.reshape(x.shape[0], -1)
        src, dst = edge_index[0], edge_index[1]
        if callable(distance):
            cost = distance(x[src], x[dst])
            if not isinstance(cost, torch.Tensor) or cost.shape != (edge_index.shape[1],):
                got = list(cost.shape) if isinstance(cost, torch.Tensor) else type(cost).__name__
                raise ValueError(f"distance callable must return a tensor of shape "
                                 f"[{edge_index.shape[1]}], got {got}")
            if not cost.is_floating_point():
                cost = cost.float()
            return cost.detach()
        x = x.to(_work_dtype(x))
        if distance == "cosine":
            x = torch.nn.functional.normalize(scale_by_power_of_two(x, -1), dim=-1, eps=EPS)
            return torch.exp(-(x[src] * x[dst]).sum(-1))
        x, scale = scale_by_power_of_two(x, (0, 1), return_scale=True)
        return torch.linalg.vector_norm(x[src] - x[dst], dim=-1) * scale.reshape(())


# ---------------------------------------------------------------------------- vector lanes
def _lane_intrinsic(op: str, with_self: bool = False):
    """Intrinsic ``f(x, p, qs, n) -> tuple``: for each offset ``q`` of the tuple ``qs``,
    ``sum_k g(x[p + k], x[q + k])`` over ``k < n`` with ``g = a * b`` (``"dot"``) or
    ``(a - b)^2`` (``"sqdiff"``); ``with_self`` prepends ``g(x[p + k], x[p + k])``, from
    the same loads.

    LLVM vectorises a float sum only if allowed to reorder it; here the order is fixed
    by hand instead: one accumulator per vector lane, then a fixed tree over the lanes
    (upper half added onto lower half), then the ``n % lanes`` leftover terms in sequence.
    """

    @intrinsic
    def lanes(typingctx, x, p, qs, n):
        # raw pointer arithmetic below: only contiguous float arrays
        if not isinstance(x, types.Array) or x.dtype not in (types.float32, types.float64) \
                or x.layout != "C":
            return None
        if not isinstance(qs, types.BaseTuple) or \
                not all(isinstance(t, types.Integer) for t in qs.types):
            return None
        dt = x.dtype
        num = len(qs.types) + with_self
        sig = types.UniTuple(dt, num)(x, p, qs, n)

        def codegen(context, builder, signature, args):
            x_val, p_val, qs_val, n_val = args
            arr = context.make_array(signature.args[0])(context, builder, x_val)
            fty = context.get_value_type(dt)
            # 512 bits of lanes; narrower machines split the vector, with the same result
            width = 16 if dt == types.float32 else 8
            align = 4 if dt == types.float32 else 8
            vty = ir.VectorType(fty, width)
            i64 = ir.IntType(64)
            p_val = builder.sext(p_val, i64) if p_val.type != i64 else p_val
            n_val = builder.sext(n_val, i64) if n_val.type != i64 else n_val
            base_p = builder.gep(arr.data, [p_val])
            base_q = [base_p] if with_self else []
            for k in range(num - with_self):
                q = builder.extract_value(qs_val, k)
                q = builder.sext(q, i64) if q.type != i64 else q
                base_q.append(builder.gep(arr.data, [q]))

            def term(a, b):
                if op == "dot":
                    return builder.fmul(a, b)
                d = builder.fsub(a, b)
                return builder.fmul(d, d)

            fn = builder.function
            entry = builder.block
            vloop = fn.append_basic_block("lanes.vloop")
            vdone = fn.append_basic_block("lanes.vdone")
            sloop = fn.append_basic_block("lanes.sloop")
            done = fn.append_basic_block("lanes.done")
            nvec = builder.sdiv(n_val, ir.Constant(i64, width))
            zero_v = ir.Constant(vty, [0.0] * width)
            builder.cbranch(builder.icmp_signed(">", nvec, ir.Constant(i64, 0)), vloop, vdone)

            builder.position_at_end(vloop)
            i = builder.phi(i64)
            i.add_incoming(ir.Constant(i64, 0), entry)
            accs = []
            for k in range(num):
                a = builder.phi(vty)
                a.add_incoming(zero_v, entry)
                accs.append(a)
            off = builder.mul(i, ir.Constant(i64, width))
            va = builder.load(builder.bitcast(builder.gep(base_p, [off]), vty.as_pointer()),
                              align=align)
            new_accs = []
            for k in range(num):
                if with_self and k == 0:
                    vb = va
                else:
                    vb = builder.load(builder.bitcast(builder.gep(base_q[k], [off]),
                                                      vty.as_pointer()), align=align)
                new_accs.append(builder.fadd(accs[k], term(va, vb)))
            i_next = builder.add(i, ir.Constant(i64, 1))
            i.add_incoming(i_next, vloop)
            for k in range(num):
                accs[k].add_incoming(new_accs[k], vloop)
            builder.cbranch(builder.icmp_signed("<", i_next, nvec), vloop, vdone)

            builder.position_at_end(vdone)
            finals = []
            for k in range(num):  # phis first: LLVM wants them at the top of the block
                acc = builder.phi(vty)
                acc.add_incoming(zero_v, entry)
                acc.add_incoming(new_accs[k], vloop)
                finals.append(acc)
            sums = []
            for acc in finals:
                # fixed tree over the lanes: add the upper half onto the lower half until
                # one lane is left
                half = width
                while half > 1:
                    half //= 2
                    lo = builder.shuffle_vector(acc, acc, ir.Constant(
                        ir.VectorType(ir.IntType(32), half), list(range(half))))
                    hi = builder.shuffle_vector(acc, acc, ir.Constant(
                        ir.VectorType(ir.IntType(32), half), list(range(half, 2 * half))))
                    acc = builder.fadd(lo, hi)
                sums.append(builder.extract_element(acc, ir.Constant(ir.IntType(32), 0)))
            start = builder.mul(nvec, ir.Constant(i64, width))
            vdone_end = builder.block
            builder.cbranch(builder.icmp_signed("<", start, n_val), sloop, done)

            builder.position_at_end(sloop)
            j = builder.phi(i64)
            j.add_incoming(start, vdone_end)
            s_phis = []
            for k in range(num):
                s = builder.phi(fty)
                s.add_incoming(sums[k], vdone_end)
                s_phis.append(s)
            a = builder.load(builder.gep(base_p, [j]))
            s_next = []
            for k in range(num):
                b = a if with_self and k == 0 else builder.load(builder.gep(base_q[k], [j]))
                s_next.append(builder.fadd(s_phis[k], term(a, b)))
            j_next = builder.add(j, ir.Constant(i64, 1))
            j.add_incoming(j_next, sloop)
            for k in range(num):
                s_phis[k].add_incoming(s_next[k], sloop)
            builder.cbranch(builder.icmp_signed("<", j_next, n_val), sloop, done)

            builder.position_at_end(done)
            out = []
            for k in range(num):
                r = builder.phi(fty)
                r.add_incoming(sums[k], vdone_end)
                r.add_incoming(s_next[k], sloop)
                out.append(r)
            return context.make_tuple(builder, signature.return_type, out)

        return sig, codegen

    return lanes


_dots = _lane_intrinsic("dot")
_self_dots = _lane_intrinsic("dot", with_self=True)  # squared norm first, then the dots
_sqdiffs = _lane_intrinsic("sqdiff")


# ---------------------------------------------------------------------------- CPU kernels
@njit(cache=True)
def _inv_norm(sq, eps):
    return 1.0 / max(np.sqrt(sq), eps)


def safe_squares(dtype) -> tuple:
    """``(lo, hi)``: a row whose squared norm lies in ``[lo, hi]`` has its squared norm and
    its dot products with such rows computed without overflow and with (almost) every bit,
    in ``dtype`` (float32 or float64), for up to :math:`2^{20}` channels."""
    if np.dtype(dtype) == np.float32:
        return np.float32(2.0 ** -100), np.float32(2.0 ** 100)
    return np.float64(2.0 ** -900), np.float64(2.0 ** 900)


@njit(cache=True)
def _norm_ok(sq, lo, hi, flat, p, c):
    """Whether row ``flat[p : p + c]`` with squared norm ``sq`` can be used as it is: ``sq``
    in ``[lo, hi]`` (:func:`safe_squares`), or the row is zero."""
    if lo <= sq <= hi:
        return True
    if sq != 0.0:
        return False
    for k in range(c):
        if flat[p + k] != 0.0:
            return False
    return True


# Vertices or edges per chunk of the pair kernels.
_BLOCK = 4096


@njit(cache=True, nogil=True)
def _norm_chunk(k0, k1, x, eps, lo, hi, inv, ok):
    flat = x.reshape(-1)
    c = x.shape[1]
    for k in range(k0, k1):
        good = True
        for v in range(k * _BLOCK, min((k + 1) * _BLOCK, x.shape[0])):
            (sq,) = _self_dots(flat, v * c, (), c)
            inv[v] = _inv_norm(sq, eps)
            good &= _norm_ok(sq, lo, hi, flat, v * c, c)
        ok[k] = good


@njit(cache=True, nogil=True)
def _pair_chunk(k0, k1, x, src, dst, kind, inv, out):
    flat = x.reshape(-1)
    c = x.shape[1]
    for e in range(k0 * _BLOCK, min(k1 * _BLOCK, src.shape[0])):
        u = src[e]
        v = dst[e]
        if kind == _COSINE:
            (d,) = _dots(flat, u * c, (v * c,), c)
            out[e] = np.exp(-(d * inv[u] * inv[v]))
        else:
            (d,) = _sqdiffs(flat, u * c, (v * c,), c)
            out[e] = np.sqrt(d)


@njit(cache=True)
def _finish(s, inv_u, inv_v, kind):
    if kind == _COSINE:
        return np.exp(-(s * inv_u * inv_v))
    return np.sqrt(s)


@njit(cache=True)
def grid_image_costs(flat, c, b, h, w, diag, kind, eps, lo, hi, out):
    """Costs of the candidate edges of image ``b`` into ``out[b * E_img : (b + 1) * E_img]``.

    Row by row, every pixel is read once for all of its edges: its squared norm and its
    channel sums towards the right, lower and (``diag``) lower diagonal neighbours. A
    row's horizontal edges are finished as soon as the row is done, its downward edges
    one row later, when the norms below are known; two rows of sums are all it keeps.

    Returns whether the costs can be used: for the cosine, whether every pixel's squared
    norm lies in ``[lo, hi]`` or the pixel is zero (:func:`safe_squares`); otherwise the
    caller scales the pixels and calls again.
    """
    good = True
    p0 = b * h * w
    e_h = h * (w - 1)
    e_v = (h - 1) * w
    e_d = (h - 1) * (w - 1)
    base = b * (e_h + e_v + (2 * e_d if diag else 0))
    raw = np.empty((2, w, 4), flat.dtype)  # [row parity, column, right/down/dr/dl]
    inv = np.ones((2, w), flat.dtype)
    for i in range(h):
        cur = i % 2
        prev = 1 - cur
        last_row = i == h - 1
        for j in range(w):
            p = p0 + i * w + j
            right = p + 1 if j < w - 1 else p
            down = p + w if not last_row else p
            if diag:
                dr = p + w + 1 if (not last_row and j < w - 1) else p
                dl = p + w - 1 if (not last_row and j > 0) else p
                if kind == _COSINE:
                    sq, a, d, d1, d2 = _self_dots(flat, p * c, (right * c, down * c, dr * c,
                                                                dl * c), c)
                    inv[cur, j] = _inv_norm(sq, eps)
                    good &= _norm_ok(sq, lo, hi, flat, p * c, c)
                else:
                    a, d, d1, d2 = _sqdiffs(flat, p * c, (right * c, down * c, dr * c, dl * c), c)
                raw[cur, j, 2] = d1
                raw[cur, j, 3] = d2
            elif kind == _COSINE:
                sq, a, d = _self_dots(flat, p * c, (right * c, down * c), c)
                inv[cur, j] = _inv_norm(sq, eps)
                good &= _norm_ok(sq, lo, hi, flat, p * c, c)
            else:
                a, d = _sqdiffs(flat, p * c, (right * c, down * c), c)
            raw[cur, j, 0] = a
            raw[cur, j, 1] = d
        for j in range(w - 1):
            out[base + i * (w - 1) + j] = _finish(raw[cur, j, 0], inv[cur, j], inv[cur, j + 1],
                                                  kind)
        if i == 0:
            continue
        r = i - 1  # downward edges of the row above
        for j in range(w):
            out[base + e_h + r * w + j] = _finish(raw[prev, j, 1], inv[prev, j], inv[cur, j],
                                                  kind)
            if diag:
                if j < w - 1:
                    out[base + e_h + e_v + r * (w - 1) + j] = \
                        _finish(raw[prev, j, 2], inv[prev, j], inv[cur, j + 1], kind)
                if j > 0:  # anti-diagonal of cell (r, j - 1): (r, j) - (r + 1, j - 1)
                    out[base + e_h + e_v + e_d + r * (w - 1) + j - 1] = \
                        _finish(raw[prev, j, 3], inv[prev, j], inv[cur, j - 1], kind)
    return good


@njit(cache=True, nogil=True)
def _grid_chunk(b0, b1, x, h, w, diag, kind, eps, lo, hi, out, ok):
    flat = x.reshape(-1)
    for b in range(b0, b1):
        ok[b] = grid_image_costs(flat, x.shape[1], b, h, w, diag, kind, eps, lo, hi, out)


def cpu_features(feat: torch.Tensor, distance: str, num_examples: int = 1):
    """Features as a contiguous ``[N, C]`` float32/float64 array for the kernels, and the
    factor per example (``[num_examples]`` or ``None``) that turns their costs into those
    of ``feat``: for ``"l2"``, each of the ``num_examples`` equal blocks of rows is scaled
    by a power of two (:func:`scale_by_power_of_two`)."""
    x = feat.detach()
    if x.dim() != 2:
        x = x.reshape(x.shape[0], -1)
    x = x.to(_work_dtype(x))
    scale = None
    if distance == "l2" and x.numel():
        shape = x.shape
        x, scale = scale_by_power_of_two(x.reshape(num_examples, -1), 1, return_scale=True)
        x, scale = x.reshape(shape), scale.reshape(num_examples).numpy()
    return x.contiguous().numpy(), scale


def scaled_rows(x: np.ndarray) -> np.ndarray:
    """The rows of kernel features scaled as :func:`scale_by_power_of_two` scales them,
    for the compiled cosine kernels to redo their work when a squared norm fell outside
    :func:`safe_squares`.

    Raises:
        ValueError: on NaN or infinite features (no scale helps those).
    """
    t = torch.from_numpy(x)
    if not all_finite(t):
        raise ValueError("feat must be finite, got NaN or infinite values")
    return scale_by_power_of_two(t, -1).contiguous().numpy()


def pair_costs_cpu(feat: torch.Tensor, src: np.ndarray, dst: np.ndarray, distance: str
                   ) -> torch.Tensor:
    """Named ``distance`` of the edges ``(src[e], dst[e])`` (int64 arrays) of CPU features
    ``feat [N, C]``, by a compiled kernel. Returns a CPU tensor ``[E]``."""
    x, scale = cpu_features(feat, distance)
    out = np.empty(src.shape[0], x.dtype)
    kind = kind_code(distance)
    inv = np.empty(x.shape[0] if kind == _COSINE else 0, x.dtype)
    if kind == _COSINE:
        blocks = -(-x.shape[0] // _BLOCK)
        ok = np.ones(blocks, np.bool_)
        lo, hi = safe_squares(x.dtype)
        run_chunks(_norm_chunk, blocks, x, x.dtype.type(EPS), lo, hi, inv, ok)
        if not ok.all():
            x = scaled_rows(x)
            run_chunks(_norm_chunk, blocks, x, x.dtype.type(EPS), lo, hi, inv, ok)
    run_chunks(_pair_chunk, -(-src.shape[0] // _BLOCK), x, src, dst, kind, inv, out)
    if scale is not None:
        out *= scale[0]
    return torch.from_numpy(out)


def grid_costs_cpu(feat: torch.Tensor, num_images: int, height: int, width: int,
                   connectivity: int, distance: str) -> torch.Tensor:
    """Named ``distance`` of the grid edges of CPU features ``feat [B*H*W, C]``, laid out as
    :class:`~treessm.GridTopology` orders its candidate edges. Returns a CPU tensor."""
    x, scale = cpu_features(feat, distance, num_images)
    e_h = height * (width - 1)
    e_v = (height - 1) * width
    e_d = (height - 1) * (width - 1)
    per_image = e_h + e_v + (2 * e_d if connectivity == 8 else 0)
    out = np.empty(num_images * per_image, x.dtype)
    if out.shape[0]:
        ok = np.ones(num_images, np.bool_)
        args = (height, width, connectivity == 8, kind_code(distance), x.dtype.type(EPS),
                *safe_squares(x.dtype), out, ok)
        run_chunks(_grid_chunk, num_images, x, *args)
        if not ok.all():
            run_chunks(_grid_chunk, num_images, scaled_rows(x), *args)
        if scale is not None:
            out.reshape(num_images, per_image)[:] *= scale[:, None]
    return torch.from_numpy(out)


@torch.no_grad()
def grid_costs_torch(feat: torch.Tensor, num_images: int, height: int, width: int,
                     connectivity: int, distance: str) -> torch.Tensor:
    """Costs of the candidate edges of ``num_images`` grids (order of
    :func:`treessm.topology.grid.grid_edges`) from ``feat [B*H*W, C]``, with tensor
    operations on any device: each edge family is one product of shifted views."""
    # the channel count from the shape: -1 is ambiguous for empty features
    x = feat.detach().reshape(num_images, height, width, feat.shape[-1])
    x = x.to(_work_dtype(x))
    if distance == "cosine":
        x = torch.nn.functional.normalize(scale_by_power_of_two(x, -1), dim=-1, eps=EPS)

        def cost(a, b):
            return torch.exp(-(a * b).sum(-1)).flatten(1)
    else:
        x, scale = scale_by_power_of_two(x, (1, 2, 3), return_scale=True)

        def cost(a, b):
            return torch.linalg.vector_norm(a - b, dim=-1).flatten(1) * scale.reshape(-1, 1)
    parts = [cost(x[:, :, :-1], x[:, :, 1:]), cost(x[:, :-1, :], x[:, 1:, :])]
    if connectivity == 8:
        parts += [cost(x[:, :-1, :-1], x[:, 1:, 1:]), cost(x[:, :-1, 1:], x[:, 1:, :-1])]
    return torch.cat(parts, 1).reshape(-1)
