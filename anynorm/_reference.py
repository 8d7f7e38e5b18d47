"""Float64 NumPy textbook references, independent of anynorm's own math.

Used by the self-check (``python -m anynorm``) and as the oracle of the test suite, where
each is itself checked against ``torch.nn.functional`` in float64. Written the plain way
(loops over vectors where that is clearest); shares no code with ``anynorm.functional``.
Gradients come from :func:`fd_vjp`, central finite differences with Richardson
extrapolation, so no closed-form backward is assumed here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np


def _axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axis = axis if isinstance(axis, tuple) else (axis,)
    return tuple(sorted(a % ndim for a in axis))


def lp_normalize(x, p=2.0, axis=-1, eps=1e-12):
    x = np.asarray(x, dtype=np.float64)
    ax = _axes(axis, x.ndim)
    if math.isinf(p):
        n = np.max(np.abs(x), axis=ax, keepdims=True) if x.size else np.zeros(())
    else:
        n = np.sum(np.abs(x) ** p, axis=ax, keepdims=True) ** (1.0 / p)
    return x / np.maximum(n, eps)


def _standardize(x, ax, eps):
    mean = x.mean(axis=ax, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=ax, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def _affine(y, weight, bias, shape):
    if weight is not None:
        y = y * np.reshape(weight, shape)
    if bias is not None:
        y = y + np.reshape(bias, shape)
    return y


def batch_norm(x, weight=None, bias=None, axis=1, eps=1e-5, mean=None, var=None):
    """Statistics over every axis but ``axis`` (batch or given frozen ``mean``/``var``)."""
    x = np.asarray(x, dtype=np.float64)
    feat = _axes(axis, x.ndim)
    red = tuple(a for a in range(x.ndim) if a not in feat)
    shape = [x.shape[a] if a in feat else 1 for a in range(x.ndim)]
    if mean is None:
        y = _standardize(x, red, eps)
    else:
        y = (x - np.reshape(mean, shape)) / np.sqrt(np.reshape(var, shape) + eps)
    return _affine(y, weight, bias, shape)


def layer_norm(x, weight=None, bias=None, axis=-1, eps=1e-5):
    """Statistics over ``axis``; weight/bias have the shape of those axes."""
    x = np.asarray(x, dtype=np.float64)
    ax = _axes(axis, x.ndim)
    shape = [x.shape[a] if a in ax else 1 for a in range(x.ndim)]
    return _affine(_standardize(x, ax, eps), weight, bias, shape)


def group_norm(x, num_groups, weight=None, bias=None, axis=1, eps=1e-5):
    """Per sample, per group of channels along ``axis``: statistics over the group's
    channels and every other non-batch axis."""
    x = np.asarray(x, dtype=np.float64)
    c_ax = axis % x.ndim
    xm = np.moveaxis(x, c_ax, 1)
    n, c = xm.shape[:2]
    g = xm.reshape(n, num_groups, -1)
    out = np.empty_like(g)
    for i in range(n):
        for j in range(num_groups):
            v = g[i, j]
            out[i, j] = (v - v.mean()) / np.sqrt(v.var() + eps)
    y = out.reshape(xm.shape)
    shape = [1] * x.ndim
    shape[1] = c
    y = _affine(y, weight, bias, shape)
    return np.moveaxis(y, 1, c_ax)


def instance_norm(x, weight=None, bias=None, axis=1, eps=1e-5, mean=None, var=None):
    """Per sample and channel, statistics over the spatial axes (or frozen ``mean``/``var``
    per channel)."""
    x = np.asarray(x, dtype=np.float64)
    c_ax = axis % x.ndim
    red = tuple(a for a in range(1, x.ndim) if a != c_ax)
    shape = [1] * x.ndim
    shape[c_ax] = x.shape[c_ax]
    if mean is None:
        y = _standardize(x, red, eps)
    else:
        y = (x - np.reshape(mean, shape)) / np.sqrt(np.reshape(var, shape) + eps)
    return _affine(y, weight, bias, shape)


def rms_norm(x, weight=None, axis=-1, eps=1e-6):
    x = np.asarray(x, dtype=np.float64)
    ax = _axes(axis, x.ndim)
    shape = [x.shape[a] if a in ax else 1 for a in range(x.ndim)]
    y = x / np.sqrt(np.mean(x * x, axis=ax, keepdims=True) + eps)
    return _affine(y, weight, None, shape)


def local_response_norm(x, size, alpha=1e-4, beta=0.75, k=1.0, axis=1):
    """``y_c = x_c / (k + alpha/size · Σ_{c' in window(c)} x_{c'}²)^beta``, window
    ``[c − size//2, c + (size − 1)//2]`` clipped to the channels (torch's zero padding)."""
    x = np.asarray(x, dtype=np.float64)
    xm = np.moveaxis(x, axis % x.ndim, 0)
    c = xm.shape[0]
    out = np.empty_like(xm)
    for ch in range(c):
        lo, hi = max(0, ch - size // 2), min(c, ch + (size - 1) // 2 + 1)
        s = np.sum(xm[lo:hi] ** 2, axis=0)
        out[ch] = xm[ch] / (k + alpha / size * s) ** beta
    return np.moveaxis(out, 0, axis % x.ndim)


def fd_vjp(
    f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, g: np.ndarray, h: float = 1e-3
) -> np.ndarray:
    """``J(x)ᵀ g`` of ``f`` by central differences with one Richardson step (error
    O(h⁴)); one pair of evaluations per element of ``x``: for small arrays only."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty(x.size)
    flat = x.reshape(-1)
    for i in range(x.size):

        def at(t, i=i):
            z = flat.copy()
            z[i] += t
            return float(np.sum(g * f(z.reshape(x.shape))))

        d1 = (at(h) - at(-h)) / (2 * h)
        d2 = (at(2 * h) - at(-2 * h)) / (4 * h)
        out[i] = (4 * d1 - d2) / 3
    return out.reshape(x.shape)


def fd_directional(
    f: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    g: np.ndarray,
    v: np.ndarray,
    h: float = 1e-3,
) -> float:
    """``gᵀ J(x) v`` (directional derivative of ``Σ g·f``) with Richardson extrapolation."""

    def at(t):
        return float(np.sum(g * f(x + t * v)))

    d1 = (at(h) - at(-h)) / (2 * h)
    d2 = (at(2 * h) - at(-2 * h)) / (4 * h)
    return (4 * d1 - d2) / 3
