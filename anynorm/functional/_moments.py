"""The shared core of batch, layer, instance, group and RMS normalization.

They differ only in which axes the statistics reduce over (``axes``) and which axes the
affine parameters vary along. This module computes the statistics (two-pass: mean, then the
centred second moment), applies ``x̂ = (x − μ)·istd`` with the affine map, and holds the one
backward every member of the family uses:

    x̂  = (x − μ)·istd,   y = γ·x̂ + β,   dx̂ = γ·g
    dx = istd/M · (M·dx̂ − Σ_R dx̂ − x̂·Σ_R(dx̂·x̂))          (training statistics)
    dx = istd·dx̂                                             (frozen statistics)
    dγ = Σ_P g·x̂,   dβ = Σ_P g

with ``R`` the statistics axes (``M`` elements) and ``P`` the axes the parameters are
broadcast over. RMS norm is the uncentred case (``μ = 0``, no ``Σ_R dx̂`` term). Arrays are in
the compute dtype (float32 for float16/bfloat16 input).

Speed: the kernels make as few passes over memory as they can. Sums of products go through
``vecdot`` when the reduced axes are trailing (no product temporary), and full-size
temporaries the function has just allocated are updated in place where that is safe
(:func:`anynorm._compat.inplace_ok`); inputs and cached arrays are never written.
"""

from __future__ import annotations

import math
from typing import Any

from .._compat import inplace_ok, vecdot_last

Array = Any


def _size(x: Array, axes: tuple[int, ...]) -> int:
    return math.prod([int(x.shape[a]) for a in axes])


def _sum(a: Array, axes: tuple[int, ...], *, xp: Any) -> Array:
    # An empty axis tuple means "no reduction" (torch.sum(dim=()) would sum everything);
    # return a copy then, so a gradient never aliases the caller's dy.
    return xp.sum(a, axis=axes, keepdims=True) if axes else xp.asarray(a, copy=True)


def sum_prod(a: Array, b: Array, axes: tuple[int, ...], *, xp: Any) -> Array:
    """``Σ_axes a·b`` with keepdims. When the reduced axes end with a run of trailing axes,
    that run goes through ``vecdot`` (one read of each operand, no product temporary)."""
    if not axes:
        return a * b
    nd = a.ndim
    if axes[-1] != nd - 1 or a.shape != b.shape:
        return xp.sum(a * b, axis=axes, keepdims=True)
    start = nd - 1
    while start - 1 in axes:
        start -= 1
    lead = tuple(int(s) for s in a.shape[:start])
    flat = (*lead, _size(a, tuple(range(start, nd))))
    r = vecdot_last(xp, xp.reshape(a, flat), xp.reshape(b, flat))
    r = xp.reshape(r, (*lead, *([1] * (nd - start))))
    rest = tuple(ax for ax in axes if ax < start)
    return xp.sum(r, axis=rest, keepdims=True) if rest else r


def _imul(a: Array, b: Any) -> Array:
    """``a·b``, written into ``a`` when ``a`` is a fresh temporary that may be written."""
    if inplace_ok(a):
        a *= b
        return a
    return a * b


def _iadd(a: Array, b: Any) -> Array:
    if inplace_ok(a):
        a += b
        return a
    return a + b


def _isub(a: Array, b: Any) -> Array:
    if inplace_ok(a):
        a -= b
        return a
    return a - b


def as_compute(a: Array, cdt: Any, *, xp: Any) -> Array:
    return a if a.dtype == cdt else xp.astype(a, cdt)


def centered_moments(
    x: Array, axes: tuple[int, ...], cdt: Any, *, xp: Any
) -> tuple[Array, Array, Array]:
    """``(mean, var, x − mean)``: mean and biased variance over ``axes`` (keepdims) in
    ``cdt``, two-pass, plus the centred array (a fresh temporary the caller may consume)."""
    xc = as_compute(x, cdt, xp=xp)
    mean = xp.mean(xc, axis=axes, keepdims=True)
    d = xc - mean
    count = _size(x, axes)
    if count == 0:  # empty reduction: NaN statistics, as the mean of nothing
        return mean, mean, d
    var = sum_prod(d, d, axes, xp=xp) / count
    return mean, var, d


def batch_or_frozen(
    x: Array,
    axes: tuple[int, ...],
    cdt: Any,
    eps: float,
    mean: Array | None,
    var: Array | None,
    *,
    xp: Any,
) -> tuple[Array, Array, Array | None]:
    """``(mean, istd, centred)``: the statistics of ``x`` over ``axes`` with the centred array
    (for :func:`standardize`), or the given frozen ``mean``/``var`` (keepdims shapes, compute
    dtype) with ``centred=None``."""
    if mean is None:
        mu, v, d = centered_moments(x, axes, cdt, xp=xp)
        return mu, inv_std(v, eps, xp=xp), d
    return mean, inv_std(var, eps, xp=xp), None


def moments(x: Array, axes: tuple[int, ...], cdt: Any, *, xp: Any) -> tuple[Array, Array]:
    """Mean and biased variance over ``axes`` (keepdims) in ``cdt``, two-pass."""
    mean, var, _ = centered_moments(x, axes, cdt, xp=xp)
    return mean, var


def mean_square(x: Array, axes: tuple[int, ...], cdt: Any, *, xp: Any) -> Array:
    """Mean of ``x²`` over ``axes`` (keepdims) in ``cdt``: the RMS statistic."""
    xc = as_compute(x, cdt, xp=xp)
    count = _size(x, axes)
    if count == 0:
        return xp.mean(xc, axis=axes, keepdims=True)
    return sum_prod(xc, xc, axes, xp=xp) / count


def inv_std(var: Array, eps: float, *, xp: Any) -> Array:
    return 1.0 / xp.sqrt(var + eps)


def _constant_over(weight: Array | None, axes: tuple[int, ...]) -> bool:
    return weight is None or all(int(weight.shape[a]) == 1 for a in axes)


def standardize(
    x: Array,
    mean: Array | None,
    istd: Array,
    weight: Array | None,
    bias: Array | None,
    axes: tuple[int, ...],
    *,
    xp: Any,
    centered: Array | None = None,
) -> Array:
    """``y = γ·(x − μ)·istd + β`` cast back to ``x.dtype``.

    ``mean``, ``istd``, ``weight`` and ``bias`` broadcast against ``x`` (keepdims shapes) and
    are in the compute dtype. ``centered`` is ``x − mean`` from :func:`centered_moments`,
    consumed (written into) to become ``y``. ``mean=None`` is the uncentred (RMS) form
    ``y = γ·x·istd + β``."""
    cdt = istd.dtype
    if centered is not None:
        y = centered
    elif mean is None:
        y = None
    else:
        y = as_compute(x, cdt, xp=xp) - mean
    if _constant_over(weight, axes):
        scale = istd if weight is None else istd * weight  # per-group vector
        y = as_compute(x, cdt, xp=xp) * scale if y is None else _imul(y, scale)
    else:
        y = as_compute(x, cdt, xp=xp) * istd if y is None else _imul(y, istd)
        y = _imul(y, weight)
    if bias is not None:
        y = _iadd(y, bias)
    return as_compute(y, x.dtype, xp=xp)


def standardize_backward(
    dy: Array,
    x: Array,
    mean: Array | None,
    istd: Array,
    weight: Array | None,
    axes: tuple[int, ...],
    param_axes: tuple[int, ...] | None,
    *,
    frozen: bool = False,
    xp: Any,
    reduce: Any = None,
    count: Any = None,
) -> tuple[Array, Array | None, Array | None]:
    """Gradients of :func:`standardize` (statistics from ``x`` unless ``frozen``).

    Returns ``(dx, dweight, dbias)``; ``dweight``/``dbias`` are summed over ``param_axes``
    with keepdims (``None`` when ``param_axes`` is None). ``dx`` has ``x.dtype``.

    ``mean=None`` is the uncentred (RMS) form: ``x̂ = x·istd`` and the ``Σ_R dx̂`` term, which
    comes from differentiating the mean, is absent.

    ``reduce`` (synchronized batch norm) sums the two per-group sums over processes
    (``reduce([A, Σg·x]) -> [A, Σg·x]``) and ``count`` is then the global number of values
    per group (an array); both need the per-group form (weight constant over ``axes``)."""
    cdt = istd.dtype
    g = as_compute(dy, cdt, xp=xp)
    xc = as_compute(x, cdt, xp=xp)
    m_count = _size(x, axes) if count is None else count
    dweight = dbias = None
    per_group = _constant_over(weight, axes) and (
        param_axes is None or set(axes) <= set(param_axes)
    )
    if reduce is not None and not per_group:
        raise RuntimeError("standardize_backward: `reduce` needs per-group parameters")
    if per_group:
        # Everything follows from two per-group sums: A = Σ_R g, C = Σ_R g·x̂.
        a_sum = _sum(g, axes, xp=xp)
        gx = sum_prod(g, xc, axes, xp=xp)
        if reduce is not None and (param_axes is not None or not frozen):
            a_sum, gx = reduce([a_sum, gx])
        c_sum = istd * (gx if mean is None else gx - mean * a_sum)
        k = istd if weight is None else istd * weight
        if frozen:
            dx = g * k
        else:
            # dx = k·(g − (A + x̂·C)/M) = k·g + m·x + n with per-group m, n.
            m = -(k * istd * c_sum) / m_count
            dx = _iadd(g * k, xc * m)
            if mean is not None:
                dx = _isub(dx, k * a_sum / m_count + m * mean)
        if param_axes is not None:
            rest = tuple(a for a in param_axes if a not in axes)
            dweight = _sum(c_sum, rest, xp=xp)
            dbias = _sum(a_sum, rest, xp=xp)
    else:
        xhat = xc * istd if mean is None else _imul(xc - mean, istd)
        # Sums that need a product temporary are taken before dx̂ exists, so that at most
        # two input-sized arrays are alive (peak 2× the input, not 3×). Reduced axes that
        # are not one trailing run (GroupNorm channels-last: (H, W, C/G) of the grouped
        # (N, H, W, G, C/G)) would leave vecdot a partial sum of input/(C/G) elements: there
        # Σ_R dx̂·x̂ = Σ_R g·x̂·γ comes from the product dweight needs anyway.
        s2 = None
        kept = [a for a in range(len(xhat.shape)) if a not in axes]
        last_kept = kept[-1] if kept else -1
        if not frozen and param_axes and any(a < last_kept for a in axes):
            prod = g * xhat
            dweight = _sum(prod, param_axes, xp=xp)
            prod = prod if weight is None else _imul(prod, weight)
            # the reduced axes before the last kept one first (the partial sum is small),
            # then the trailing ones
            s2 = _sum(prod, tuple(a for a in axes if a < last_kept), xp=xp)
            trail = tuple(a for a in axes if a > last_kept)
            s2 = (_sum(s2, trail, xp=xp) if trail else s2) / m_count
            del prod
        elif param_axes is not None:
            dweight = sum_prod(g, xhat, param_axes, xp=xp)
        if param_axes is not None:
            dbias = _sum(g, param_axes, xp=xp)
        dxh = g * weight if weight is not None else g
        if frozen:
            dx = dxh * istd if dxh is g else _imul(dxh, istd)
        else:
            if s2 is None:
                s2 = sum_prod(dxh, xhat, axes, xp=xp) / m_count
            corr = _imul(xhat, s2)  # x̂ is not needed after this: reuse it
            if mean is not None:
                corr = _iadd(corr, _sum(dxh, axes, xp=xp) / m_count)
            dx = _imul(dxh - corr if dxh is g else _isub(dxh, corr), istd)
    return as_compute(dx, x.dtype, xp=xp), dweight, dbias
