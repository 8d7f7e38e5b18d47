"""Batch normalization: statistics over every axis except the feature axis (or axes)."""

from __future__ import annotations

from typing import Any

from .. import _validation as V
from .._compat import compute_dtype
from ._moments import (
    _size,
    as_compute,
    batch_or_frozen,
    inv_std,
    moments,
    standardize,
    standardize_backward,
)
from ._sync import SyncHook, check_sync, gradient_reducer, synced_moments

Array = Any

__all__ = ["batch_norm", "batch_norm_backward", "batch_norm_stats", "update_running_stats"]


def broadcast_shape(ndim: int, axes: tuple[int, ...], sizes: tuple[int, ...]) -> tuple:
    """The keepdims shape that puts ``sizes`` on ``axes`` and 1 elsewhere."""
    shape = [1] * ndim
    for a, s in zip(axes, sizes, strict=True):
        shape[a] = s
    return tuple(shape)


def feature_layout(func: str, x: Array, axis: Any):
    """``(feature_axes, reduce_axes, feature_shape)`` for batch-norm style ``axis``."""
    V.check_ndim(func, "x", x, 2, "Batch norm needs a batch axis and a feature axis.")
    feat = V.normalize_axis(func, axis, x.ndim)
    if 0 in feat:
        raise ValueError(
            f"{func}: `axis`={axis!r} includes the batch axis 0 of the {x.ndim}-D input; "
            "the feature axes must be among 1.."
            f"{x.ndim - 1} (axis=1 for NCHW, axis=-1 for NHWC)."
        )
    red = tuple(a for a in range(x.ndim) if a not in feat)
    return feat, red, tuple(int(x.shape[a]) for a in feat)


def check_enough_values(func: str, x: Array, red: tuple[int, ...]) -> None:
    if _size(x, red) == 1:
        raise ValueError(
            f"{func}: expected more than 1 value per feature when using batch statistics, "
            f"got input of shape {tuple(x.shape)}; use a batch of at least 2, or evaluation "
            "mode with running statistics."
        )


def _prepare(func, x, weight, bias, mean, var, axis, eps, dy=None, sync=None):
    xp = V.namespace(func, x=x, weight=weight, bias=bias, mean=mean, var=var, dy=dy)
    V.check_floating(func, "x", x, xp)
    V.check_known_shape(func, "x", x)
    eps = V.check_eps(func, eps)
    check_sync(func, sync)
    feat, red, fshape = feature_layout(func, x, axis)
    for name, arr in (("weight", weight), ("bias", bias), ("mean", mean), ("var", var)):
        V.check_param(func, name, arr, fshape, xp)
    if (mean is None) != (var is None):
        raise ValueError(
            f"{func}: pass both `mean` and `var` (frozen statistics) or neither (batch statistics)."
        )
    if mean is None and sync is None:  # with `sync` the global batch counts (see _sync)
        V.check_values_per_stat(
            func,
            x,
            _size(x, red),
            "feature",
            "pass a non-empty batch, or frozen `mean` and "
            "`var` (an empty batch normalized with them gives an empty output).",
        )
        check_enough_values(func, x, red)
    if dy is not None:
        V.check_grad_like(func, dy, x, xp)
    cdt = compute_dtype(xp, x.dtype)
    bshape = broadcast_shape(x.ndim, feat, fshape)

    def shaped(a):
        return None if a is None else xp.reshape(as_compute(a, cdt, xp=xp), bshape)

    return xp, eps, red, fshape, cdt, shaped


def _statistics(func, x, red, cdt, eps, mean, var, sync, xp):
    """``(mean, istd, centred, count)``: batch statistics (over every process with ``sync``)
    or the frozen ones; ``count`` is None unless synchronized."""
    if mean is None and sync is not None:
        mu, v, d, count = synced_moments(func, x, red, cdt, sync, xp=xp)
        return mu, inv_std(v, eps, xp=xp), d, count
    mu, istd, d = batch_or_frozen(x, red, cdt, eps, mean, var, xp=xp)
    return mu, istd, d, None


def batch_norm(
    x: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    axis: Any = 1,
    eps: float = 1e-5,
    mean: Array | None = None,
    var: Array | None = None,
    sync: SyncHook | None = None,
) -> Array:
    r"""Batch normalization ``y = weight·(x − μ)/sqrt(σ² + eps) + bias``.

    ``μ`` and the biased ``σ²`` are taken over every axis except the feature ``axis``
    (batch statistics), or given as ``mean`` and ``var`` (frozen statistics, e.g. running
    statistics in evaluation mode).

    Parameters
    ----------
    x : array
        Input of rank >= 2 with the batch on axis 0.
    weight, bias : array, optional
        Per-feature scale and shift, of the feature shape ``x.shape[axis]``.
    axis : int or tuple of ints, default 1
        The feature axis (axes) that keeps its own statistics: 1 for NCHW/NCL/NC (torch),
        -1 for NHWC (Keras), ``(1, 2, 3)`` for NumPyNet's per-pixel batch norm on NHWC.
    eps : float, default 1e-5
        Added to the variance.
    mean, var : array, optional
        Frozen per-feature statistics; both or neither.
    sync : callable, optional
        Synchronized batch norm: a hook that sums a 1-D array over processes (e.g.
        :func:`anynorm.distributed.all_reduce_torch`). Batch statistics are then those of
        the union of every process's ``x`` (exact two-pass, two all-reduces of ``C + 1`` and
        ``C`` values). Every process must call with the same arguments and feature shape;
        a process may hold an empty or one-sample batch, but the global batch needs at least
        2 values per feature (not checked: it would need a host sync).

    Returns
    -------
    array
        ``y``, same namespace, device, dtype and shape as ``x``. float16/bfloat16 inputs are
        normalized with float32 statistics.

    Raises
    ------
    ValueError
        If batch statistics are requested with one value per feature.
    """
    func = "anynorm.functional.batch_norm"
    xp, eps, red, _, cdt, shaped = _prepare(func, x, weight, bias, mean, var, axis, eps, sync=sync)
    mu, istd, d, _ = _statistics(func, x, red, cdt, eps, shaped(mean), shaped(var), sync, xp)
    return standardize(x, mu, istd, shaped(weight), shaped(bias), red, xp=xp, centered=d)


def batch_norm_backward(
    dy: Array,
    x: Array,
    weight: Array | None = None,
    *,
    axis: Any = 1,
    eps: float = 1e-5,
    mean: Array | None = None,
    var: Array | None = None,
    sync: SyncHook | None = None,
) -> tuple[Array, Array, Array]:
    r"""Gradients of :func:`batch_norm` for upstream gradient ``dy``.

    With batch statistics (``mean``/``var`` not given), ``M`` values per feature,
    ``x̂ = (x − μ)·istd`` and ``dx̂ = weight·dy``:

    ``dx = istd/M · (M·dx̂ − Σdx̂ − x̂·Σ(dx̂·x̂))``

    With frozen statistics: ``dx = weight·istd·dy``. In both cases
    ``dweight = Σ dy·x̂`` and ``dbias = Σ dy`` over the non-feature axes.

    With ``sync`` (see :func:`batch_norm`) the sums and ``M`` are over every process (one
    more all-reduce of ``2C`` values): ``dx`` is this process's slice of the full-batch input
    gradient, and ``dweight``/``dbias`` are the full-batch parameter gradients, identical on
    every process (do not all-reduce them again).

    Returns
    -------
    (dx, dweight, dbias)
        ``dx`` like ``x``; ``dweight`` and ``dbias`` of the feature shape in the compute
        dtype (float32 for float16/bfloat16 input).
    """
    func = "anynorm.functional.batch_norm_backward"
    xp, eps, red, fshape, cdt, shaped = _prepare(
        func, x, weight, None, mean, var, axis, eps, dy=dy, sync=sync
    )
    mu, istd, _, count = _statistics(func, x, red, cdt, eps, shaped(mean), shaped(var), sync, xp)
    reduce = None if sync is None else gradient_reducer(func, sync, xp=xp)
    dx, dw, db = standardize_backward(
        dy,
        x,
        mu,
        istd,
        shaped(weight),
        red,
        red,
        frozen=mean is not None,
        xp=xp,
        reduce=reduce,
        count=count,
    )
    return dx, xp.reshape(dw, fshape), xp.reshape(db, fshape)


def batch_norm_stats(
    x: Array, *, axis: Any = 1, sync: SyncHook | None = None
) -> tuple[Array, Array]:
    """Per-feature batch mean and biased variance (two-pass, compute dtype), feature-shaped;
    over every process with ``sync`` (see :func:`batch_norm`)."""
    func = "anynorm.functional.batch_norm_stats"
    xp = V.namespace(func, x=x)
    V.check_floating(func, "x", x, xp)
    V.check_known_shape(func, "x", x)
    check_sync(func, sync)
    _, red, fshape = feature_layout(func, x, axis)
    cdt = compute_dtype(xp, x.dtype)
    if sync is None:
        mu, var = moments(x, red, cdt, xp=xp)
    else:
        mu, var, _, _ = synced_moments(func, x, red, cdt, sync, xp=xp)
    return xp.reshape(mu, fshape), xp.reshape(var, fshape)


def update_running_stats(
    running_mean: Array,
    running_var: Array,
    mean: Array,
    var: Array,
    count: int | Array,
    momentum: float | Array,
    *,
    xp: Any,
) -> tuple[Array, Array]:
    """PyTorch's running-statistics update, out of place:

    ``running = (1 − momentum)·running + momentum·batch``, where the variance uses the
    unbiased batch variance ``var·count/(count − 1)`` (``count`` values per feature; an
    array for synchronized batch norm, where it is the global count)."""
    if isinstance(count, int):
        unbiased = var * (count / (count - 1)) if count > 1 else var
    else:
        unbiased = var * (count / (count - 1))
    mean = as_compute(mean, running_mean.dtype, xp=xp)
    unbiased = as_compute(unbiased, running_var.dtype, xp=xp)
    new_mean = (1 - momentum) * running_mean + momentum * mean
    new_var = (1 - momentum) * running_var + momentum * unbiased
    return new_mean, new_var
