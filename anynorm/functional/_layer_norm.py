"""Layer, group and instance normalization: the moments core with other reduction axes."""

from __future__ import annotations

from typing import Any

from .. import _validation as V
from .._compat import compute_dtype
from ._batch_norm import broadcast_shape
from ._moments import (
    _size,
    as_compute,
    batch_or_frozen,
    inv_std,
    moments,
    normalize,
    rows_standardize,
    standardize,
    standardize_backward,
)

Array = Any

__all__ = [
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "layer_norm",
    "layer_norm_backward",
]


def _common(func, x, eps, dy, **arrays):
    xp = V.namespace(func, x=x, dy=dy, **arrays)
    V.check_floating(func, "x", x, xp)
    V.check_known_shape(func, "x", x)
    if dy is not None:
        V.check_grad_like(func, dy, x, xp)
    return xp, V.check_eps(func, eps), compute_dtype(xp, x.dtype)


def _shaped(a, cdt, shape, *, xp):
    return None if a is None else xp.reshape(as_compute(a, cdt, xp=xp), shape)


def _normalize(x, axes, weight, bias, bshape, cdt, eps, *, xp):
    """Standardize over ``axes`` with statistics of ``x``, then the affine map."""
    weight, bias = _shaped(weight, cdt, bshape, xp=xp), _shaped(bias, cdt, bshape, xp=xp)
    return normalize(x, axes, weight, bias, cdt, eps, xp=xp)[0]


def _normalize_backward(dy, x, axes, params, weight, bshape, cdt, eps, *, xp):
    """The shared standardize backward with the statistics recomputed from ``x``."""
    weight = _shaped(weight, cdt, bshape, xp=xp)
    rows = rows_standardize(x, axes, weight, None, cdt, eps, xp=xp, want_y=False)
    if rows is not None:
        _, mean, istd = rows
    else:
        mean, var = moments(x, axes, cdt, xp=xp)
        istd = inv_std(var, eps, xp=xp)
    return standardize_backward(dy, x, mean, istd, weight, axes, params, xp=xp)


# --------------------------------------------------------------------------- layer norm
def layer_layout(func: str, x: Array, axis: Any):
    """``(axes, param_shape, bshape, param_axes)`` for layer norm over ``axis``."""
    axes = V.normalize_axis(func, axis, x.ndim)
    if not axes:
        raise ValueError(f"{func}: `axis` must name at least one axis; received {axis!r}.")
    pshape = tuple(int(x.shape[a]) for a in axes)
    V.check_values_per_stat(
        func,
        x,
        _size(x, axes),
        f"normalized slice (axis={axis!r})",
        "normalize over axes of non-zero size (empty other axes, e.g. an empty batch, are "
        "fine and give an empty output).",
    )
    rest = tuple(a for a in range(x.ndim) if a not in axes)
    return axes, pshape, broadcast_shape(x.ndim, axes, pshape), rest


def layer_norm(
    x: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    axis: Any = -1,
    eps: float = 1e-5,
) -> Array:
    r"""Layer normalization: ``y = weight·(x − μ)/sqrt(σ² + eps) + bias`` with ``μ``, ``σ²``
    (biased) over ``axis`` for every other index.

    ``axis`` may be any int or tuple of axes (Keras's ``LayerNormalization(axis=[...])``);
    ``torch.nn.functional.layer_norm(x, normalized_shape)`` is ``axis`` = the trailing
    ``len(normalized_shape)`` axes. ``weight`` and ``bias`` have the shape
    ``tuple(x.shape[a] for a in sorted(axis))``.

    Returns ``y`` with the namespace, device, dtype and shape of ``x``.
    """
    func = "anynorm.functional.layer_norm"
    xp, eps, cdt = _common(func, x, eps, None, weight=weight, bias=bias)
    axes, pshape, bshape, _ = layer_layout(func, x, axis)
    V.check_param(func, "weight", weight, pshape, xp)
    V.check_param(func, "bias", bias, pshape, xp)
    return _normalize(x, axes, weight, bias, bshape, cdt, eps, xp=xp)


def layer_norm_backward(
    dy: Array, x: Array, weight: Array | None = None, *, axis: Any = -1, eps: float = 1e-5
) -> tuple[Array, Array, Array]:
    r"""Gradients of :func:`layer_norm`: ``(dx, dweight, dbias)``.

    ``dx = istd/M·(M·dx̂ − Σdx̂ − x̂·Σ(dx̂·x̂))`` over ``axis`` with ``dx̂ = weight·dy``;
    ``dweight = Σ dy·x̂`` and ``dbias = Σ dy`` over the other axes (compute dtype)."""
    func = "anynorm.functional.layer_norm_backward"
    xp, eps, cdt = _common(func, x, eps, dy, weight=weight)
    axes, pshape, bshape, rest = layer_layout(func, x, axis)
    V.check_param(func, "weight", weight, pshape, xp)
    dx, dw, db = _normalize_backward(dy, x, axes, rest, weight, bshape, cdt, eps, xp=xp)
    return dx, xp.reshape(dw, pshape), xp.reshape(db, pshape)


# --------------------------------------------------------------------------- group norm
def channel_axis(func: str, x: Array, axis: Any, min_ndim: int, hint: str) -> int:
    V.check_ndim(func, "x", x, min_ndim, hint)
    (c,) = V.normalize_axis(func, V.check_channel_axis(func, axis), x.ndim)
    if c == 0:
        raise ValueError(
            f"{func}: `axis`={axis!r} is the batch axis 0; the channel axis must be 1..."
            f"{x.ndim - 1} (axis=1 for NCHW, axis=-1 for channels-last)."
        )
    return c


def group_layout(func: str, x: Array, num_groups: int, axis: Any):
    """Reshape plan: ``(grouped_shape, stats_axes, bshape, param_axes, C)`` with the channel
    axis ``c`` split into ``(num_groups, C // num_groups)``."""
    c = channel_axis(func, x, axis, 2, "Group norm needs (N, C, *) input.")
    n_ch = int(x.shape[c])
    V.check_int(func, "num_groups", num_groups)
    if n_ch % num_groups:
        raise ValueError(
            f"{func}: `num_groups`={num_groups} must divide the number of channels {n_ch} "
            f"(axis {axis} of shape {tuple(x.shape)})."
        )
    shape = tuple(int(s) for s in x.shape)
    gshape = (*shape[:c], num_groups, n_ch // num_groups, *shape[c + 1 :])
    V.check_values_per_stat(
        func,
        x,
        _size(x, tuple(a for a in range(1, x.ndim) if a != c)) * (n_ch // num_groups),
        "group",
        "each group needs channels and a non-empty spatial extent (an empty batch "
        "is fine and gives an empty output).",
    )
    stats = tuple(a for a in range(1, len(gshape)) if a != c)
    bshape = broadcast_shape(len(gshape), (c, c + 1), (num_groups, n_ch // num_groups))
    params = tuple(a for a in range(len(gshape)) if a not in (c, c + 1))
    return gshape, stats, bshape, params, n_ch


def group_norm(
    x: Array,
    num_groups: int,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
) -> Array:
    r"""Group normalization (``torch.nn.functional.group_norm``; channels on ``axis``).

    The ``C`` channels are split into ``num_groups`` groups of consecutive channels; for each
    sample and group, ``μ`` and ``σ²`` (biased) are taken over the group's channels and all
    other non-batch axes. ``weight``/``bias`` are per channel, shape ``(C,)``. ``axis=-1``
    handles channels-last input.

    Returns ``y`` with the namespace, device, dtype and shape of ``x``.
    """
    func = "anynorm.functional.group_norm"
    xp, eps, cdt = _common(func, x, eps, None, weight=weight, bias=bias)
    gshape, stats, bshape, _, n_ch = group_layout(func, x, num_groups, axis)
    V.check_param(func, "weight", weight, (n_ch,), xp)
    V.check_param(func, "bias", bias, (n_ch,), xp)
    y = _normalize(xp.reshape(x, gshape), stats, weight, bias, bshape, cdt, eps, xp=xp)
    return xp.reshape(y, x.shape)


def group_norm_backward(
    dy: Array,
    x: Array,
    num_groups: int,
    weight: Array | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
) -> tuple[Array, Array, Array]:
    """Gradients of :func:`group_norm`: ``(dx, dweight, dbias)`` (the shared standardize
    backward on the grouped view; ``dweight``/``dbias`` of shape ``(C,)``)."""
    func = "anynorm.functional.group_norm_backward"
    xp, eps, cdt = _common(func, x, eps, dy, weight=weight)
    gshape, stats, bshape, params, n_ch = group_layout(func, x, num_groups, axis)
    V.check_param(func, "weight", weight, (n_ch,), xp)
    dx, dw, db = _normalize_backward(
        xp.reshape(dy, gshape),
        xp.reshape(x, gshape),
        stats,
        params,
        weight,
        bshape,
        cdt,
        eps,
        xp=xp,
    )
    return xp.reshape(dx, x.shape), xp.reshape(dw, (n_ch,)), xp.reshape(db, (n_ch,))


# --------------------------------------------------------------------------- instance norm
def instance_layout(func: str, x: Array, axis: Any):
    """``(c, stats_axes, bshape, C)``: statistics per sample and channel over the spatial
    axes."""
    c = channel_axis(
        func,
        x,
        axis,
        3,
        "Instance norm needs (N, C, *spatial) input with a batch axis and at least "
        "one spatial axis; for a single sample add a batch axis (x[None]).",
    )
    n_ch = int(x.shape[c])
    stats = tuple(a for a in range(1, x.ndim) if a != c)
    return c, stats, broadcast_shape(x.ndim, (c,), (n_ch,)), n_ch


def check_spatial(func: str, x: Array, stats: tuple[int, ...]) -> None:
    """Instance statistics need at least 2 spatial values per channel (0 is refused too)."""
    V.check_values_per_stat(
        func,
        x,
        _size(x, stats),
        "channel of each sample",
        "instance norm needs at least 2 spatial elements per channel.",
    )
    if _size(x, stats) == 1:
        raise ValueError(
            f"{func}: expected more than 1 spatial element per channel when using instance "
            f"statistics, got input of shape {tuple(x.shape)}."
        )


def _instance_stats(func, x, stats, bshape, cdt, eps, mean, var, *, xp):
    if (mean is None) != (var is None):
        raise ValueError(f"{func}: pass both `mean` and `var` (frozen statistics) or neither.")
    if mean is None:
        check_spatial(func, x, stats)
    return batch_or_frozen(
        x,
        stats,
        cdt,
        eps,
        _shaped(mean, cdt, bshape, xp=xp),
        _shaped(var, cdt, bshape, xp=xp),
        xp=xp,
    )


def instance_norm(
    x: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
    mean: Array | None = None,
    var: Array | None = None,
) -> Array:
    r"""Instance normalization (``torch.nn.functional.instance_norm``; channels on ``axis``).

    For each sample and channel, ``μ`` and ``σ²`` (biased) over the spatial axes; or frozen
    per-channel ``mean``/``var`` (running statistics). Input ``(N, C, *spatial)`` with at
    least one spatial axis; ``weight``/``bias`` of shape ``(C,)``.
    """
    func = "anynorm.functional.instance_norm"
    xp, eps, cdt = _common(func, x, eps, None, weight=weight, bias=bias, mean=mean, var=var)
    _, stats, bshape, n_ch = instance_layout(func, x, axis)
    for name, a in (("weight", weight), ("bias", bias), ("mean", mean), ("var", var)):
        V.check_param(func, name, a, (n_ch,), xp)
    mu, istd, d = _instance_stats(func, x, stats, bshape, cdt, eps, mean, var, xp=xp)
    weight, bias = _shaped(weight, cdt, bshape, xp=xp), _shaped(bias, cdt, bshape, xp=xp)
    return standardize(x, mu, istd, weight, bias, stats, xp=xp, centered=d)


def instance_norm_backward(
    dy: Array,
    x: Array,
    weight: Array | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
    mean: Array | None = None,
    var: Array | None = None,
) -> tuple[Array, Array, Array]:
    """Gradients of :func:`instance_norm`: ``(dx, dweight, dbias)``, ``dweight``/``dbias``
    of shape ``(C,)``; with frozen ``mean``/``var``, ``dx = weight·istd·dy``."""
    func = "anynorm.functional.instance_norm_backward"
    xp, eps, cdt = _common(func, x, eps, dy, weight=weight, mean=mean, var=var)
    c, stats, bshape, n_ch = instance_layout(func, x, axis)
    for name, a in (("weight", weight), ("mean", mean), ("var", var)):
        V.check_param(func, name, a, (n_ch,), xp)
    mu, istd, _ = _instance_stats(func, x, stats, bshape, cdt, eps, mean, var, xp=xp)
    params = tuple(a for a in range(x.ndim) if a != c)
    dx, dw, db = standardize_backward(
        dy,
        x,
        mu,
        istd,
        _shaped(weight, cdt, bshape, xp=xp),
        stats,
        params,
        frozen=mean is not None,
        xp=xp,
    )
    return dx, xp.reshape(dw, (n_ch,)), xp.reshape(db, (n_ch,))
