"""Local response normalization (AlexNet's cross-channel normalization)."""

from __future__ import annotations

from typing import Any

from .. import _validation as V
from .._compat import compute_dtype, device
from ._moments import as_compute

Array = Any

__all__ = ["local_response_norm", "local_response_norm_backward"]


def window_sum(a: Array, axis: int, before: int, after: int, *, xp: Any) -> Array:
    """``s[c] = Σ_{o=-before..after} a[c + o]`` along ``axis``, zero outside the array."""
    n = int(a.shape[axis])
    total = None
    for off in range(-before, after + 1):
        lo, hi = max(0, off), min(n, n + off)  # a[lo:hi] lands on s[lo-off:hi-off]
        if hi <= lo:
            continue
        src = [slice(None)] * a.ndim
        src[axis] = slice(lo, hi)
        part = a[tuple(src)]
        pad_lo, pad_hi = lo - off, n - (hi - off)
        pieces = []
        for width in (pad_lo, pad_hi):
            shape = list(a.shape)
            shape[axis] = width
            pieces.append(xp.zeros(tuple(shape), dtype=a.dtype, device=device(a)))
        shifted = xp.concat([pieces[0], part, pieces[1]], axis=axis) if (pad_lo or pad_hi) else part
        total = shifted if total is None else total + shifted
    return total if total is not None else xp.zeros_like(a)


def _prepare(func, x, size, alpha, beta, k, axis, dy=None):
    xp = V.namespace(func, x=x, dy=dy)
    V.check_floating(func, "x", x, xp)
    V.check_known_shape(func, "x", x)
    size = V.check_int(func, "size", size)
    alpha = V.check_number(func, "alpha", alpha)
    beta = V.check_number(func, "beta", beta)
    k = V.check_number(func, "k", k)
    V.check_ndim(func, "x", x, 1)
    (ax,) = V.normalize_axis(func, V.check_channel_axis(func, axis), x.ndim)
    if dy is not None:
        V.check_grad_like(func, dy, x, xp)
    return xp, size, alpha, beta, k, ax


def lrn_forward(
    x: Array, size: int, alpha: float, beta: float, k: float, axis: int, *, xp: Any
) -> tuple[Array, Array]:
    """``(y, d)`` with ``d = k + alpha/size·Σ_window x²`` (compute dtype)."""
    xc = as_compute(x, compute_dtype(xp, x.dtype), xp=xp)
    d = k + (alpha / size) * window_sum(xc * xc, axis, size // 2, (size - 1) // 2, xp=xp)
    return as_compute(xc * d ** (-beta), x.dtype, xp=xp), d


def lrn_backward(
    dy: Array, x: Array, d: Array, size: int, alpha: float, beta: float, axis: int, *, xp: Any
) -> Array:
    """``dx_j = g_j·d_j^(−β) − (2αβ/size)·x_j·Σ_{c: j∈window(c)} g_c·x_c·d_c^(−β−1)``."""
    cdt = d.dtype
    g = as_compute(dy, cdt, xp=xp)
    xc = as_compute(x, cdt, xp=xp)
    scale = d ** (-beta)
    t = g * xc * (scale / d)
    back = window_sum(t, axis, (size - 1) // 2, size // 2, xp=xp)  # the transposed window
    dx = g * scale - (2.0 * alpha * beta / size) * xc * back
    return as_compute(dx, x.dtype, xp=xp)


def local_response_norm(
    x: Array, size: int, *, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, axis: int = 1
) -> Array:
    r"""Local response normalization across channels (``torch.nn.functional
    .local_response_norm``): ``y_c = x_c / (k + alpha/size · Σ_{c'} x_{c'}²)^beta`` where
    ``c'`` runs over ``c − size//2 … c + (size − 1)//2`` (channels outside are zero).

    ``axis`` is the channel axis (1 for NCHW, -1 for channels-last).
    """
    func = "anynorm.functional.local_response_norm"
    xp, size, alpha, beta, k, ax = _prepare(func, x, size, alpha, beta, k, axis)
    return lrn_forward(x, size, alpha, beta, k, ax, xp=xp)[0]


def local_response_norm_backward(
    dy: Array,
    x: Array,
    size: int,
    *,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
    axis: int = 1,
) -> Array:
    """Input gradient of :func:`local_response_norm` (closed form; see :func:`lrn_backward`)."""
    func = "anynorm.functional.local_response_norm_backward"
    xp, size, alpha, beta, k, ax = _prepare(func, x, size, alpha, beta, k, axis, dy)
    _, d = lrn_forward(x, size, alpha, beta, k, ax, xp=xp)
    return lrn_backward(dy, x, d, size, alpha, beta, ax, xp=xp)
