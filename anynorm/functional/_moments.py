"""The shared core of batch, layer, instance and group normalization.

They differ only in which axes the statistics reduce over (``axes``) and which axes the
affine parameters vary along. This module computes the statistics (two-pass: mean, then the
centred second moment), applies ``x̂ = (x − μ)·istd`` with the affine map, and holds the one
backward every member of the family uses:

    x̂  = (x − μ)·istd,   y = γ·x̂ + β,   dx̂ = γ·g
    dx = istd/M · (M·dx̂ − Σ_R dx̂ − x̂·Σ_R(dx̂·x̂))          (training statistics)
    dx = istd·dx̂                                             (frozen statistics)
    dγ = Σ_P g·x̂,   dβ = Σ_P g

with ``R`` the statistics axes (``M`` elements) and ``P`` the axes the parameters are
broadcast over. Arrays are in the compute dtype (float32 for float16/bfloat16 input).
"""

from __future__ import annotations

import math
from typing import Any

Array = Any


def _size(x: Array, axes: tuple[int, ...]) -> int:
    return math.prod(int(x.shape[a]) for a in axes)


def _sum(a: Array, axes: tuple[int, ...], *, xp: Any) -> Array:
    # An empty axis tuple means "no reduction" (torch.sum(dim=()) would sum everything).
    return xp.sum(a, axis=axes, keepdims=True) if axes else a


def as_compute(a: Array, cdt: Any, *, xp: Any) -> Array:
    return a if a.dtype == cdt else xp.astype(a, cdt)


def moments(x: Array, axes: tuple[int, ...], cdt: Any, *, xp: Any) -> tuple[Array, Array]:
    """Mean and biased variance over ``axes`` (keepdims) in ``cdt``, two-pass."""
    xc = as_compute(x, cdt, xp=xp)
    mean = xp.mean(xc, axis=axes, keepdims=True)
    d = xc - mean
    var = xp.mean(d * d, axis=axes, keepdims=True)
    return mean, var


def mean_square(x: Array, axes: tuple[int, ...], cdt: Any, *, xp: Any) -> Array:
    """Mean of ``x²`` over ``axes`` (keepdims) in ``cdt``: the RMS statistic."""
    xc = as_compute(x, cdt, xp=xp)
    return xp.mean(xc * xc, axis=axes, keepdims=True)


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
) -> Array:
    """``y = γ·(x − μ)·istd + β`` cast back to ``x.dtype``.

    ``mean``, ``istd``, ``weight`` and ``bias`` broadcast against ``x`` (keepdims shapes) and
    are in the compute dtype. When ``γ`` is constant along the statistics axes (batch and
    instance norm) it runs as one fused ``x·scale + shift`` with per-group vectors.
    ``mean=None`` is the uncentred (RMS) form ``y = γ·x·istd + β``."""
    cdt = istd.dtype
    xc = as_compute(x, cdt, xp=xp)
    if _constant_over(weight, axes):
        scale = istd if weight is None else istd * weight
        y = xc * scale
        if mean is not None:
            y = y - mean * scale
        if bias is not None:
            y = y + bias
    else:
        y = xc * istd if mean is None else (xc - mean) * istd
        y = y * weight
        if bias is not None:
            y = y + bias
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
) -> tuple[Array, Array | None, Array | None]:
    """Gradients of :func:`standardize` (statistics from ``x`` unless ``frozen``).

    Returns ``(dx, dweight, dbias)``; ``dweight``/``dbias`` are summed over ``param_axes``
    with keepdims (``None`` when ``param_axes`` is None). ``dx`` has ``x.dtype``.

    ``mean=None`` is the uncentred (RMS) form: ``x̂ = x·istd`` and the ``Σ_R dx̂`` term, which
    comes from differentiating the mean, is absent."""
    cdt = istd.dtype
    g = as_compute(dy, cdt, xp=xp)
    xc = as_compute(x, cdt, xp=xp)
    m_count = _size(x, axes)
    dweight = dbias = None
    per_group = _constant_over(weight, axes) and (
        param_axes is None or set(axes) <= set(param_axes)
    )
    if per_group:
        # Everything follows from two per-group sums: A = Σ_R g, C = Σ_R g·x̂.
        a_sum = _sum(g, axes, xp=xp)
        gx = _sum(g * xc, axes, xp=xp)
        c_sum = istd * (gx if mean is None else gx - mean * a_sum)
        k = istd if weight is None else istd * weight
        if frozen:
            dx = g * k
        else:
            # dx = k·(g − (A + x̂·C)/M) = k·g + m·x + n with per-group m, n.
            m = -(k * istd * c_sum) / m_count
            if mean is None:
                dx = g * k + xc * m
            else:
                n = -(k * a_sum) / m_count - m * mean
                dx = g * k + xc * m + n
        if param_axes is not None:
            rest = tuple(a for a in param_axes if a not in axes)
            dweight = _sum(c_sum, rest, xp=xp)
            dbias = _sum(a_sum, rest, xp=xp)
    else:
        xhat = xc * istd if mean is None else (xc - mean) * istd
        dxh = g if weight is None else g * weight
        if frozen:
            dx = dxh * istd
        else:
            s2 = _sum(dxh * xhat, axes, xp=xp)
            if mean is None:
                dx = (dxh - xhat * (s2 / m_count)) * istd
            else:
                s1 = _sum(dxh, axes, xp=xp)
                dx = (dxh - (s1 + xhat * s2) / m_count) * istd
        if param_axes is not None:
            dweight = _sum(g * xhat, param_axes, xp=xp)
            dbias = _sum(g, param_axes, xp=xp)
    return as_compute(dx, x.dtype, xp=xp), dweight, dbias
