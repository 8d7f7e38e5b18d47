"""Lp normalization layers (no parameters)."""

from __future__ import annotations

from typing import Any

from .. import _validation as V
from ..functional._lp import lp_backward, lp_forward
from ._base import Layer

Array = Any


class LpNorm(Layer):
    r"""Lp normalization layer: ``y = x / max(‖x‖_p, eps)`` along ``axis``.

    The layer form of :func:`anynorm.functional.lp_normalize` (the semantics of
    ``torch.nn.functional.normalize``). It has no parameters: ``params``, ``grads`` and
    ``buffers`` stay empty and ``update()`` is a no-op. The forward keeps a reference to
    ``x`` and the per-vector norms for the backward.

    Parameters
    ----------
    p : float, default 2.0
        Exponent, ``>= 1`` or ``math.inf``.
    axis : int, tuple of ints or None, default -1
        The axes forming each vector (None: the whole array).
    eps : float, default 1e-12
        Lower bound of the divisor; zero vectors map to zero with a finite gradient.

    Examples
    --------
    >>> import numpy as np, anynorm
    >>> layer = anynorm.L2Norm(axis=1)
    >>> y = layer(np.array([[3.0, 4.0]]))
    >>> y
    array([[0.6, 0.8]])
    >>> dx = layer.backward(np.array([[1.0, 0.0]]))
    """

    def __init__(
        self,
        p: float = 2.0,
        axis: int | tuple[int, ...] | None = -1,
        eps: float = 1e-12,
        *,
        xp: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(xp=xp, device=device, dtype=dtype)
        func = f"anynorm.{type(self).__name__}"
        self.p = V.check_p(func, p)
        self.axis = V.check_axis_arg(func, axis)
        self.eps = V.check_eps(func, eps)

    def _config(self) -> dict:
        axis = list(self.axis) if isinstance(self.axis, tuple) else self.axis
        return {"p": self.p, "axis": axis, "eps": self.eps}

    def _forward(self, x: Array, xp: Any):
        axes = V.normalize_axis(self._f("forward"), self.axis, x.ndim)
        y, norm = lp_forward(x, self.p, axes, self.eps, xp=xp)
        return y, (x, norm, axes)

    def _backward(self, dy: Array, cache: Any, xp: Any):
        x, norm, axes = cache
        return lp_backward(dy, x, norm, self.p, axes, self.eps, xp=xp), {}


class _FixedLpNorm(LpNorm):
    """An LpNorm whose exponent is fixed by the class (``_fixed_p``)."""

    _fixed_p: float

    def __init__(
        self,
        axis: int | tuple[int, ...] | None = -1,
        eps: float = 1e-12,
        *,
        xp: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(self._fixed_p, axis, eps, xp=xp, device=device, dtype=dtype)

    def _config(self) -> dict:
        cfg = super()._config()
        del cfg["p"]
        return cfg


class L2Norm(_FixedLpNorm):
    """L2 normalization layer, ``y = x / max(‖x‖_2, eps)``; see :class:`LpNorm`.

    Replaces NumPyNet's ``L2Norm_layer`` (whose eps sits inside the sqrt and whose backward
    is not a gradient) and Keras's ``UnitNormalization`` / ``Lambda(K.l2_normalize)``."""

    _fixed_p = 2.0


class L1Norm(_FixedLpNorm):
    """L1 normalization layer, ``y = x / max(Σ|x|, eps)``; see :class:`LpNorm`.

    Replaces NumPyNet's ``L1Norm_layer`` (whose backward is not a gradient)."""

    _fixed_p = 1.0
