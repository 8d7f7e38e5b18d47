"""Lp normalization: ``y = x / max(‖x‖_p, eps)`` along ``axis``, with its explicit backward."""

from __future__ import annotations

import functools
import math
from typing import Any

from .. import _validation as V
from .._compat import autograd_safe, compute_dtype, numpy_loops, product_plus
from ._moments import _cast_step, _chunks, _elementwise, _imul, as_compute, sum_prod

Array = Any

__all__ = [
    "l1_normalize",
    "l1_normalize_backward",
    "l2_normalize",
    "l2_normalize_backward",
    "lp_normalize",
    "lp_normalize_backward",
]


def _prepare(func: str, x: Array, p: Any, axis: Any, eps: Any, dy: Array | None = None):
    xp = V.namespace(func, x=x, dy=dy)
    V.check_floating(func, "x", x, xp)
    V.check_known_shape(func, "x", x)
    p = V.check_p(func, p)
    eps = V.check_eps(func, eps)
    axes = V.normalize_axis(func, axis, x.ndim)
    if dy is not None:
        V.check_grad_like(func, dy, x, xp)
        V.check_floating(func, "dy", dy, xp)
    return xp, p, axes, eps


def lp_norm(x: Array, p: float, axes: tuple[int, ...], *, xp: Any) -> Array:
    """‖x‖_p over ``axes`` (keepdims) in the compute dtype; overflow-safe for general p."""
    cdt = compute_dtype(xp, x.dtype)
    step = _cast_step(xp, x, cdt) if p in (1.0, 2.0) else None
    if step is not None:  # float16 on NumPy: cast chunk by chunk
        fn = functools.partial(_l2_sq if p == 2.0 else _l1_sum, axes=axes, xp=xp)
        how = "sum" if 0 in axes else "concat"
        r = _chunks(xp, fn, [x], [], cdt, step, how)
        return xp.sqrt(r) if p == 2.0 else r
    xc = as_compute(x, cdt, xp=xp)
    if math.prod([int(s) for s in x.shape]) == 0:  # empty: norms are 0, max() would fail
        return _l1_sum(xc, axes=axes, xp=xp)
    if p == 2.0:
        return xp.sqrt(_l2_sq(xc, axes=axes, xp=xp))
    if p == 1.0:
        return _l1_sum(xc, axes=axes, xp=xp)
    a = xp.abs(xc)
    big = xp.max(a, axis=axes, keepdims=True)
    if math.isinf(p):
        return big
    # Scale by the largest magnitude so |x|^p neither overflows nor underflows.
    safe = xp.where(big > 0, big, xp.ones_like(big))
    return big * xp.sum((a / safe) ** p, axis=axes, keepdims=True) ** (1.0 / p)


def _l2_sq(a: Array, *, axes: tuple[int, ...], xp: Any) -> Array:
    return sum_prod(a, a, axes, xp=xp)


def _l1_sum(a: Array, *, axes: tuple[int, ...], xp: Any) -> Array:
    return xp.sum(xp.abs(a), axis=axes, keepdims=True)


def _divide_cast(a: Array, norm: Array, *, eps: float, dtype: Any, xp: Any) -> Array:
    """``a / max(norm, eps)`` (whole, or a chunk), cast to ``dtype``."""
    return as_compute(a / xp.clip(norm, min=eps), dtype, xp=xp)


def lp_forward(x: Array, p: float, axes: tuple[int, ...], eps: float, *, xp: Any):
    """``(y, norm)`` where ``norm`` is the unclamped per-vector norm (keepdims, compute
    dtype): all the backward needs besides ``x``. float16 on NumPy (L1, L2) is cast chunk
    by chunk (:func:`anynorm.functional._moments._cast_step`): no float32 copy of ``x``."""
    norm = lp_norm(x, p, axes, xp=xp)
    step = _cast_step(xp, x, norm.dtype) if p in (1.0, 2.0) else None
    if step is not None:
        fn = functools.partial(_divide_cast, eps=eps, dtype=x.dtype, xp=xp)
        with numpy_loops(xp, x.shape, norm.shape):
            return _chunks(xp, fn, [x], [norm], norm.dtype, step, "concat"), norm
    with numpy_loops(xp, x.shape, norm.shape):
        y = _divide_cast(as_compute(x, norm.dtype, xp=xp), norm, eps=eps, dtype=x.dtype, xp=xp)
    return y, norm


@autograd_safe
def lp_backward(
    dy: Array, x: Array, norm: Array, p: float, axes: tuple[int, ...], eps: float, *, xp: Any
) -> Array:
    """``dx`` for ``y = x / max(N, eps)``, ``N = ‖x‖_p``:

    ``dx = g/N' − [N > eps] · sign(x)·(|x|/N)^(p−1) · Σ(g·x)/N'²`` with ``N' = max(N, eps)``;
    for ``p = inf`` the subgradient of ``max|x|`` is shared equally among tied maxima.

    Memory: at most two full-size arrays at a time (``dx`` and one temporary, both fresh and
    updated in place where the namespace allows)."""
    with numpy_loops(xp, x.shape, norm.shape):
        return _lp_backward(dy, x, norm, p, axes, eps, xp)


def _lp_backward(dy, x, norm, p, axes, eps, xp):
    cdt = norm.dtype
    step = _cast_step(xp, x, cdt) if p in (1.0, 2.0) and dy.dtype == x.dtype else None
    if step is None:
        g = as_compute(dy, cdt, xp=xp)
        xc = as_compute(x, cdt, xp=xp)
        dot = sum_prod(g, xc, axes, xp=xp)
    else:  # float16 on NumPy (L1, L2): cast chunk by chunk
        how = "sum" if 0 in axes else "concat"
        dot_of = functools.partial(sum_prod, axes=axes, xp=xp)
        dot = _chunks(xp, dot_of, [dy, x], [], cdt, step, how)
    inv = 1.0 / xp.clip(norm, min=eps)
    # −Σ(g·x)/N' where N > eps (else the norm is clamped and constant)
    ncoef = xp.where(norm > eps, -(dot * inv), xp.zeros_like(dot))
    fn = functools.partial(_lp_dx, p=p, axes=axes, dtype=x.dtype, xp=xp)
    if step is None:
        return fn(xc, g, ncoef, inv, norm)
    return _chunks(xp, fn, [x, dy], [ncoef, inv, norm], cdt, step, "concat")


def _lp_dx(x, g, ncoef, inv, norm, *, p, axes, dtype, xp):
    """``dx = (g − sign(x)·term)·inv`` (L2: ``(g − x·Σ(g·x)/N'²)·inv``) from the per-vector
    ``ncoef = −Σ(g·x)/N'`` (0 where clamped) and ``inv = 1/N'``, cast to ``dtype``; on the
    whole arrays or on a chunk of them (float16, L1/L2)."""
    if p == 2.0:
        op = functools.partial(_l2_dx, xp)
        return as_compute(_elementwise(xp, op, [ncoef * inv, inv], x, g, chain=True), dtype, xp=xp)
    if p == 1.0:
        term = ncoef
    elif math.isinf(p):
        term = xp.astype(xp.abs(x) == norm, inv.dtype)  # the tied maxima
        term = _imul(term, ncoef / xp.clip(xp.sum(term, axis=axes, keepdims=True), min=1.0))
    else:
        safe = xp.where(norm > 0, norm, xp.ones_like(norm))
        term = _imul((xp.abs(x) / safe) ** (p - 1.0), ncoef)  # not ·(1/safe): denormals
    dx = product_plus(xp, xp.sign(x), term, g, scratch=True)
    return as_compute(_imul(dx, inv), dtype, xp=xp)


def _l2_dx(xp: Any, x: Array, g: Array, c: Array, inv: Array) -> Array:
    """``(x·c + g)·inv``, a fresh result."""
    return _imul(product_plus(xp, x, c, g), inv)


def lp_normalize(x: Array, p: float = 2.0, axis: Any = -1, eps: float = 1e-12) -> Array:
    r"""Lp-normalize ``x`` along ``axis``: ``y = x / max(‖x‖_p, eps)``.

    Exactly the semantics of ``torch.nn.functional.normalize(x, p, dim=axis, eps)``: a
    vector whose norm is at most ``eps`` is divided by ``eps`` (a zero vector maps to zero).

    Parameters
    ----------
    x : array
        Real floating input of any namespace (NumPy, CuPy, PyTorch, JAX, Dask,
        array-api-strict). float16/bfloat16 are reduced in float32.
    p : float, default 2.0
        The exponent, a real number ``>= 1`` or ``math.inf`` (``‖x‖_inf = max|x|``).
    axis : int, tuple of ints or None, default -1
        Axes forming each vector; ``None`` normalizes the whole array as one vector.
    eps : float, default 1e-12
        Lower bound of the divisor (``>= 0``).

    Returns
    -------
    array
        ``y`` with the namespace, device, dtype and shape of ``x``.

    See Also
    --------
    lp_normalize_backward : the explicit gradient.
    """
    return _normalize("lp_normalize", x, p, axis, eps)


def _normalize(name: str, x: Array, p: Any, axis: Any, eps: Any) -> Array:
    """The forward of the public ``name`` (whose name the error messages carry)."""
    xp, p, axes, eps = _prepare(f"anynorm.functional.{name}", x, p, axis, eps)
    return lp_forward(x, p, axes, eps, xp=xp)[0]


def _normalize_backward(name: str, dy: Array, x: Array, p: Any, axis: Any, eps: Any) -> Array:
    xp, p, axes, eps = _prepare(f"anynorm.functional.{name}", x, p, axis, eps, dy=dy)
    norm = lp_norm(x, p, axes, xp=xp)
    return lp_backward(dy, x, norm, p, axes, eps, xp=xp)


def lp_normalize_backward(
    dy: Array, x: Array, p: float = 2.0, axis: Any = -1, eps: float = 1e-12
) -> Array:
    r"""Input gradient of :func:`lp_normalize` for upstream gradient ``dy``.

    With ``N = ‖x‖_p`` over ``axis`` and ``N' = max(N, eps)``:

    ``dx = dy/N' − [N > eps] · sign(x)·(|x|/N)^(p−1) · Σ(dy·x) / N'²``

    (for p = 2: ``dx = (dy − y·Σ(dy·y))/N``; for p = 1: ``dx = dy/S − sign(x)·Σ(dy·x)/S²``).
    Where the norm is clamped to ``eps`` the map is linear, ``dx = dy/eps``: zero vectors get
    a finite gradient. For ``p = inf`` the gradient of ``max|x|`` is split equally among tied
    maxima (as torch does).

    Returns
    -------
    array
        ``dx`` with the namespace, device, dtype and shape of ``x``.
    """
    return _normalize_backward("lp_normalize_backward", dy, x, p, axis, eps)


def l2_normalize(x: Array, axis: Any = -1, eps: float = 1e-12) -> Array:
    """``x / max(‖x‖_2, eps)`` along ``axis``; see :func:`lp_normalize`."""
    return _normalize("l2_normalize", x, 2.0, axis, eps)


def l2_normalize_backward(dy: Array, x: Array, axis: Any = -1, eps: float = 1e-12) -> Array:
    """``dx = (dy − y·Σ(dy·y)) / ‖x‖`` (``dy/eps`` where clamped); see
    :func:`lp_normalize_backward`."""
    return _normalize_backward("l2_normalize_backward", dy, x, 2.0, axis, eps)


def l1_normalize(x: Array, axis: Any = -1, eps: float = 1e-12) -> Array:
    """``x / max(Σ|x|, eps)`` along ``axis``; see :func:`lp_normalize`."""
    return _normalize("l1_normalize", x, 1.0, axis, eps)


def l1_normalize_backward(dy: Array, x: Array, axis: Any = -1, eps: float = 1e-12) -> Array:
    """``dx = dy/S − sign(x)·Σ(dy·x)/S²`` with ``S = max(Σ|x|, eps)``; see
    :func:`lp_normalize_backward`."""
    return _normalize_backward("l1_normalize_backward", dy, x, 1.0, axis, eps)
