"""RMS normalization: the uncentred member of the moments family."""

from __future__ import annotations

from typing import Any

from .. import _validation as V
from ._layer_norm import _common, _shaped, layer_layout
from ._moments import (
    inv_std,
    mean_square,
    normalize,
    standardize_backward,
)

Array = Any

__all__ = ["rms_norm", "rms_norm_backward"]


def rms_eps(func: str, eps: Any, cdt: Any, *, xp: Any) -> float:
    """``eps`` or, for None, the machine epsilon of the compute dtype (torch's default)."""
    if eps is None:
        return float(xp.finfo(cdt).eps)
    return V.check_eps(func, eps)


def _prepare(func, x, weight, axis, eps, dy=None):
    xp, _, cdt = _common(func, x, 0.0, dy, weight=weight)
    eps = rms_eps(func, eps, cdt, xp=xp)
    axes, pshape, bshape, rest = layer_layout(func, x, axis)
    V.check_param(func, "weight", weight, pshape, xp)
    return xp, axes, pshape, bshape, rest, _shaped(weight, cdt, bshape, xp=xp), eps, cdt


def _istd(x, axes, cdt, eps, *, xp):
    return inv_std(mean_square(x, axes, cdt, xp=xp), eps, xp=xp)


def rms_norm(
    x: Array, weight: Array | None = None, *, axis: Any = -1, eps: float | None = None
) -> Array:
    r"""RMS normalization (``torch.nn.functional.rms_norm``):
    ``y = weight · x / sqrt(mean(x², axis) + eps)``.

    ``eps=None`` uses the machine epsilon of the compute dtype (float32's for
    float16/bfloat16 input), as torch does. ``weight`` has the shape of the ``axis`` sizes.
    """
    func = "anynorm.functional.rms_norm"
    xp, axes, _, _, _, w, eps, cdt = _prepare(func, x, weight, axis, eps)
    return normalize(x, axes, w, None, cdt, eps, xp=xp, rms=True)[0]


def rms_norm_backward(
    dy: Array, x: Array, weight: Array | None = None, *, axis: Any = -1, eps: float | None = None
) -> tuple[Array, Array]:
    r"""Gradients of :func:`rms_norm`: ``(dx, dweight)``.

    With ``r = 1/sqrt(mean(x²) + eps)``, ``x̂ = x·r``, ``dx̂ = weight·dy`` and ``M`` the
    reduced size: ``dx = r·(dx̂ − x̂·Σ(dx̂·x̂)/M)``, ``dweight = Σ dy·x̂`` over the other axes.
    """
    func = "anynorm.functional.rms_norm_backward"
    xp, axes, pshape, _, rest, w, eps, cdt = _prepare(func, x, weight, axis, eps, dy)
    istd = _istd(x, axes, cdt, eps, xp=xp)
    dx, dw, _ = standardize_backward(dy, x, None, istd, w, axes, rest, xp=xp)
    return dx, xp.reshape(dw, pshape)
