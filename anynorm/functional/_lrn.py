"""Local response normalization (AlexNet's cross-channel normalization).

Memory and speed: nothing but ``x`` is needed for the backward. The denominator
``d = k + alpha/size·Σ_window x²`` is full-size, so instead of caching it the backward
recomputes it (one window sum; cheaper than keeping a second input-sized array alive between
forward and backward). Where a fresh array may be written (not on JAX), inputs above
``BLOCK`` elements run block by block along a non-channel axis (every block holds whole
channel windows) into one fresh result: the temporaries are a few cache-sized blocks, not
a few inputs (torch autograd differentiates through the block writes). Window sums add
shifted slices into one fresh array where it may be written (no padded copies).
"""

from __future__ import annotations

import math
from typing import Any

from .. import _validation as V
from .._compat import autograd_safe, compute_dtype, device, inplace_ok
from ._moments import _imul, _isub, as_compute

Array = Any

__all__ = ["local_response_norm", "local_response_norm_backward"]

#: inputs above this many elements (1 MiB of float32) run in blocks of about this size:
#: the temporaries stay near the CPU caches and are a fraction of the input
BLOCK = 1 << 18
#: a blocked input is split into at least this many blocks, so that the peak memory (the
#: result plus about 3 blocks for the backward) stays below 1.5× the input
MIN_BLOCKS = 8


def _along(ndim: int, axis: int, start: int, stop: int) -> tuple:
    """The index ``[..., start:stop, ...]`` with the slice on ``axis``."""
    idx = [slice(None)] * ndim
    idx[axis] = slice(start, stop)
    return tuple(idx)


def _ipow(a: Array, p: float) -> Array:
    """``a**p``, written into ``a`` when ``a`` is a fresh temporary that may be written."""
    if inplace_ok(a):
        a **= p
        return a
    return a**p


def window_sum(
    a: Array, axis: int, before: int, after: int, *, xp: Any, shift: float = 0.0
) -> Array:
    """``shift + Σ_{o=-before..after} a[c + o]`` along ``axis`` (zero outside the array),
    a fresh array. Mutable arrays: shifted slices added in place into one fresh array;
    immutable ones (JAX) and tensors under autograd: one zero-padded copy, then slices."""
    n = int(a.shape[axis])
    out = a + shift  # the centre term (offset 0): a fresh array
    offsets = [o for o in range(-before, after + 1) if o != 0 and abs(o) < n]
    if inplace_ok(out):
        for off in offsets:
            lo, hi = max(0, -off), min(n, n - off)  # out[lo:hi] += a[lo+off:hi+off]
            out[_along(a.ndim, axis, lo, hi)] += a[_along(a.ndim, axis, lo + off, hi + off)]
        return out
    if not offsets:
        return out
    pieces = []
    for width in (before, after):
        shape = list(a.shape)
        shape[axis] = width
        pieces.append(xp.zeros(tuple(shape), dtype=a.dtype, device=device(a)))
    padded = xp.concat([pieces[0], a, pieces[1]], axis=axis)
    for off in offsets:
        out = out + padded[_along(a.ndim, axis, before + off, before + off + n)]
    return out


def _denominator(xc: Array, size: int, alpha: float, k: float, axis: int, *, xp: Any) -> Array:
    """``d = k + alpha/size·Σ_window x²`` (fresh, compute dtype)."""
    sq = _imul(xc * xc, alpha / size)
    return window_sum(sq, axis, size // 2, (size - 1) // 2, xp=xp, shift=k)


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


def _lrn_y(x: Array, size: int, alpha: float, beta: float, k: float, axis: int, *, xp: Any):
    xc = as_compute(x, compute_dtype(xp, x.dtype), xp=xp)
    d = _denominator(xc, size, alpha, k, axis, xp=xp)
    return _imul(_ipow(d, -beta), xc)


@autograd_safe
def lrn_forward(
    x: Array, size: int, alpha: float, beta: float, k: float, axis: int, *, xp: Any
) -> Array:
    """``y = x·d^(−β)`` with ``d = k + alpha/size·Σ_window x²`` (blocked like the backward)."""
    return _blockwise(_lrn_y, (x,), axis, (size, alpha, beta, k, axis), xp=xp)


def _blockwise(fn, arrays, axis, args, *, xp):
    """``fn(*arrays, *args, xp=xp)`` cast to the dtype of ``arrays[-1]``; on large mutable
    arrays block by block (see :func:`_blocks`), each block written into one fresh result."""
    x = arrays[-1]
    blocks = _blocks(tuple(int(s) for s in x.shape), axis)
    dev = device(x)
    if blocks is None or not inplace_ok(xp.empty((0,), dtype=x.dtype, device=dev)):
        return as_compute(fn(*arrays, *args, xp=xp), x.dtype, xp=xp)
    out = xp.empty(x.shape, dtype=x.dtype, device=dev)
    for idx in blocks:
        out[idx] = as_compute(fn(*[a[idx] for a in arrays], *args, xp=xp), x.dtype, xp=xp)
    return out


def _blocks(shape: tuple[int, ...], axis: int) -> list[tuple] | None:
    """Slices splitting ``shape`` along one non-channel axis into blocks of about ``BLOCK``
    elements (at least ``MIN_BLOCKS`` of them), or None when the array is small or has no
    other axis. The axis is the outermost one with ``MIN_BLOCKS`` entries (contiguous
    blocks for C-ordered data), else the longest."""
    total = math.prod(shape)
    others = [a for a in range(len(shape)) if a != axis]
    if total <= BLOCK or not others:
        return None
    long_enough = [a for a in others if shape[a] >= MIN_BLOCKS]
    along = long_enough[0] if long_enough else max(others, key=lambda a: shape[a])
    n = shape[along]
    count = min(n, max(MIN_BLOCKS, -(-total // BLOCK)))
    if count < 2:
        return None
    return [_along(len(shape), along, n * i // count, n * (i + 1) // count) for i in range(count)]


def _lrn_grad(
    dy: Array, x: Array, size: int, alpha: float, beta: float, k: float, axis: int, *, xp: Any
) -> Array:
    """The input gradient of one block (compute dtype); see :func:`lrn_backward`."""
    cdt = compute_dtype(xp, x.dtype)
    g = as_compute(dy, cdt, xp=xp)
    xc = as_compute(x, cdt, xp=xp)
    t = _denominator(xc, size, alpha, k, axis, xp=xp)  # d
    dx = t ** (-beta)
    t = _imul(_ipow(t, -1.0), dx)  # d^(−β−1), in d's buffer
    t = _imul(_imul(_imul(t, g), xc), 2.0 * alpha * beta / size)
    dx = _imul(dx, g)  # g·d^(−β)
    back = window_sum(t, axis, (size - 1) // 2, size // 2, xp=xp)  # the transposed window
    del t  # at most three block-sized arrays are alive at a time
    return _isub(dx, _imul(back, xc))


@autograd_safe
def lrn_backward(
    dy: Array,
    x: Array,
    size: int,
    alpha: float,
    beta: float,
    k: float,
    axis: int,
    *,
    xp: Any,
) -> Array:
    """``dx_j = g_j·d_j^(−β) − (2αβ/size)·x_j·Σ_{c: j∈window(c)} g_c·x_c·d_c^(−β−1)``,
    with ``d`` recomputed from ``x`` (blocked as described in the module docstring)."""
    return _blockwise(_lrn_grad, (dy, x), axis, (size, alpha, beta, k, axis), xp=xp)


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
    return lrn_forward(x, size, alpha, beta, k, ax, xp=xp)


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
    return lrn_backward(dy, x, size, alpha, beta, k, ax, xp=xp)
