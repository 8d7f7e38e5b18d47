"""LayerNorm, GroupNorm, InstanceNorm, RMSNorm and LocalResponseNorm layers."""

from __future__ import annotations

from typing import Any

from .. import _validation as V
from .._compat import compute_dtype
from ..functional._layer_norm import (
    _shaped,
    check_spatial,
    group_layout,
    instance_layout,
    layer_layout,
)
from ..functional._lrn import lrn_backward, lrn_forward
from ..functional._moments import (
    _size,
    centered_moments,
    inv_std,
    normalize,
    standardize,
    standardize_backward,
)
from ..functional._rms_norm import rms_eps
from ._base import Layer
from ._batch_norm import _RunningStatsMixin

Array = Any


class _AffineLayer(Layer):
    """Shared plumbing: per-feature ``weight``/``bias`` of a fixed shape, cast to the
    compute dtype and reshaped for broadcasting in forward; gradients reshaped back."""

    _param_names = ("weight", "bias")
    _pshape: tuple[int, ...]

    def _has(self, name: str) -> bool:
        return name in self._state_shapes()

    def _cast(self, name: str, cdt: Any, bshape: tuple, xp: Any) -> Array | None:
        return _shaped(self.params.get(name), cdt, bshape, xp=xp)

    def _param_grads(self, dw: Array | None, db: Array | None, xp: Any) -> dict:
        grads = {}
        if self._has("weight"):
            grads["weight"] = xp.reshape(dw, self._pshape)
        if self._has("bias"):
            grads["bias"] = xp.reshape(db, self._pshape)
        return grads

    def _check_channels(self, x: Array, layout: tuple, name: str, expected: int) -> tuple:
        """``layout`` (its last entry is the channel count of ``x``) if it has ``expected``
        channels; else the ValueError naming both."""
        if layout[-1] != expected:
            raise ValueError(
                f"{self._f('forward')}: the layer has {name}={expected} but `x` of shape "
                f"{tuple(x.shape)} has {layout[-1]} channels on axis={self.axis}."
            )
        return layout

    def _feature_shape_from(self, x: Array) -> None:
        self._layout(x)  # validates x against the layer; the parameter shape is fixed
        return None

    def _backward(self, dy: Array, cache: Any, xp: Any):
        x, mean, istd, weight, stats, params, frozen, gshape = cache
        xv = x if gshape is None else xp.reshape(x, gshape)
        dyv = dy if gshape is None else xp.reshape(dy, gshape)
        want = params if self.params else None
        dx, dw, db = standardize_backward(
            dyv, xv, mean, istd, weight, stats, want, frozen=frozen, xp=xp
        )
        if gshape is not None:
            dx = xp.reshape(dx, x.shape)
        return dx, self._param_grads(dw, db, xp)


class LayerNorm(_AffineLayer):
    r"""Layer normalization over the trailing axes, like ``torch.nn.LayerNorm``.

    ``y = weight·(x − μ)/sqrt(σ² + eps) + bias`` with ``μ``, ``σ²`` (biased) over the last
    ``len(normalized_shape)`` axes; ``weight`` (ones) and ``bias`` (zeros) of shape
    ``normalized_shape``. Keras's ``LayerNormalization(axis=-1)`` is
    ``LayerNorm(x.shape[-1])``; for other axis sets use
    :func:`anynorm.functional.layer_norm` with ``axis=``.

    Parameters
    ----------
    normalized_shape : int or tuple of ints
        Shape of the trailing axes to normalize; must equal ``x.shape[-len(...):]``.
    eps : float, default 1e-5
    elementwise_affine : bool, default True
        Learn ``weight`` (and ``bias`` if ``bias=True``).
    bias : bool, default True
    xp, device, dtype
        Create the parameters at construction; see :class:`Layer`.
    """

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...],
        *,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        xp: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(xp=xp, device=device, dtype=dtype)
        func = "anynorm.LayerNorm"
        self.normalized_shape = V.check_shape(func, "normalized_shape", normalized_shape)
        self._pshape = self.normalized_shape
        self.eps = V.check_eps(func, eps)
        self.elementwise_affine = V.check_bool(func, "elementwise_affine", elementwise_affine)
        self.bias = V.check_bool(func, "bias", bias)
        self._maybe_materialize_early()

    def _config(self) -> dict:
        return {
            "normalized_shape": list(self.normalized_shape),
            "eps": self.eps,
            "elementwise_affine": self.elementwise_affine,
            "bias": self.bias,
        }

    def _state_shapes(self) -> dict:
        shapes = {}
        if self.elementwise_affine:
            shapes["weight"] = self._pshape
            if self.bias:
                shapes["bias"] = self._pshape
        return shapes

    def _axes_for(self, x: Array) -> tuple[int, ...]:
        func = self._f("forward")
        k = len(self.normalized_shape)
        if x.ndim < k or tuple(int(s) for s in x.shape[x.ndim - k :]) != self.normalized_shape:
            raise ValueError(
                f"{func}: normalized_shape={self.normalized_shape} must equal the trailing "
                f"axes of `x`, but x has shape {tuple(x.shape)}. Pass an input ending in "
                f"{self.normalized_shape} or build {self._name}({tuple(x.shape[-k:])})."
            )
        return tuple(range(x.ndim - k, x.ndim))

    def _feature_shape_from(self, x: Array) -> None:
        self._axes_for(x)
        return None

    def _forward(self, x: Array, xp: Any):
        axes, _, bshape, rest = layer_layout(self._f("forward"), x, self._axes_for(x))
        cdt = compute_dtype(xp, x.dtype)
        weight, bias = self._cast("weight", cdt, bshape, xp), self._cast("bias", cdt, bshape, xp)
        y, mean, istd = normalize(x, axes, weight, bias, cdt, self.eps, xp=xp)
        return y, (x, mean, istd, weight, axes, rest, False, None)


class GroupNorm(_AffineLayer):
    r"""Group normalization, like ``torch.nn.GroupNorm`` (plus channels-last ``axis=-1``).

    Channels are split into ``num_groups`` groups of consecutive channels; each sample and
    group is standardized over its channels and all other non-batch axes, then scaled by the
    per-channel ``weight`` (ones) and shifted by ``bias`` (zeros), shape ``(num_channels,)``.

    Parameters
    ----------
    num_groups : int
        Must divide ``num_channels`` (ValueError naming both otherwise).
    num_channels : int
    eps : float, default 1e-5
    affine : bool, default True
    axis : int, default 1
        The channel axis (1 for NCHW, -1 for NHWC); never 0.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        axis: int = 1,
        xp: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(xp=xp, device=device, dtype=dtype)
        func = "anynorm.GroupNorm"
        self.num_groups = V.check_int(func, "num_groups", num_groups)
        self.num_channels = V.check_int(func, "num_channels", num_channels)
        if self.num_channels % self.num_groups:
            raise ValueError(
                f"{func}: `num_groups`={num_groups} must divide `num_channels`={num_channels}."
            )
        self.eps = V.check_eps(func, eps)
        self.affine = V.check_bool(func, "affine", affine)
        self.axis = V.check_channel_axis(func, axis)
        self._pshape = (self.num_channels,)
        self._maybe_materialize_early()

    def _config(self) -> dict:
        return {
            "num_groups": self.num_groups,
            "num_channels": self.num_channels,
            "eps": self.eps,
            "affine": self.affine,
            "axis": self.axis,
        }

    def _state_shapes(self) -> dict:
        return {"weight": self._pshape, "bias": self._pshape} if self.affine else {}

    def _layout(self, x: Array):
        func = self._f("forward")
        return self._check_channels(
            x, group_layout(func, x, self.num_groups, self.axis), "num_channels", self.num_channels
        )

    def _forward(self, x: Array, xp: Any):
        gshape, stats, bshape, params, _ = self._layout(x)
        cdt = compute_dtype(xp, x.dtype)
        weight, bias = self._cast("weight", cdt, bshape, xp), self._cast("bias", cdt, bshape, xp)
        y, mean, istd = normalize(xp.reshape(x, gshape), stats, weight, bias, cdt, self.eps, xp=xp)
        y = xp.reshape(y, x.shape)
        return y, (x, mean, istd, weight, stats, params, False, gshape)


class InstanceNorm(_RunningStatsMixin, _AffineLayer):
    r"""Instance normalization, like ``torch.nn.InstanceNorm1d/2d/3d``.

    Each sample and channel is standardized over its spatial axes. Input
    ``(N, C, *spatial)`` (channel axis configurable) with at least one spatial axis;
    unbatched input is a ValueError (add a batch axis).

    Parameters
    ----------
    num_features : int
        Number of channels ``C``.
    eps : float, default 1e-5
    momentum : float or None, default 0.1
        PyTorch's convention, as in :class:`BatchNorm`; ``None`` is a true cumulative
        average. (torch's InstanceNorm treats ``momentum=None`` as 0, i.e. its running
        statistics never change, and leaves ``num_batches_tracked`` at 0; anynorm counts
        the training batches in ``num_batches_tracked`` as BatchNorm does.)
    affine : bool, default False
        Learn per-channel ``weight`` and ``bias`` (torch's default is also False).
    track_running_stats : bool, default False
        Keep running mean/var (the batch mean of the per-instance statistics, unbiased
        variance) and use them in evaluation mode.
    axis : int, default 1
        The channel axis (-1 for channels-last).
    """

    _buffer_names = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        axis: int = 1,
        xp: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(xp=xp, device=device, dtype=dtype)
        func = "anynorm.InstanceNorm"
        self.num_features = V.check_int(func, "num_features", num_features)
        self.eps = V.check_eps(func, eps)
        self.momentum = V.check_momentum(func, momentum)
        self.affine = V.check_bool(func, "affine", affine)
        self.track_running_stats = V.check_bool(func, "track_running_stats", track_running_stats)
        self.axis = V.check_channel_axis(func, axis)
        self._pshape = (self.num_features,)
        self._maybe_materialize_early()

    def _config(self) -> dict:
        return {
            "num_features": self.num_features,
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
            "axis": self.axis,
        }

    def _state_shapes(self) -> dict:
        shapes = {"weight": self._pshape, "bias": self._pshape} if self.affine else {}
        if self.track_running_stats:
            shapes.update(
                running_mean=self._pshape, running_var=self._pshape, num_batches_tracked=()
            )
        return shapes

    def _layout(self, x: Array):
        func = self._f("forward")
        return self._check_channels(
            x, instance_layout(func, x, self.axis), "num_features", self.num_features
        )

    def _forward(self, x: Array, xp: Any):
        func = self._f("forward")
        c, stats, bshape, _ = self._layout(x)
        cdt = compute_dtype(xp, x.dtype)
        weight, bias = self._cast("weight", cdt, bshape, xp), self._cast("bias", cdt, bshape, xp)
        batch = self.training or not self.track_running_stats
        centered = None
        if batch:
            check_spatial(func, x, stats)
            mean, var, centered = centered_moments(x, stats, cdt, xp=xp)
            if self.training and self.track_running_stats:
                V.check_values_per_stat(
                    func,
                    x,
                    int(x.shape[0]),
                    "channel across the batch",
                    "running statistics "
                    "cannot be updated from an empty batch; skip empty batches, or call "
                    "layer.eval() first.",
                )
                # running statistics follow the batch average of the per-instance ones
                self._track(
                    xp, xp.mean(mean, axis=0), xp.mean(var, axis=0), _size(x, stats), self._pshape
                )
        else:
            mean = _shaped(self.buffers["running_mean"], cdt, bshape, xp=xp)
            var = _shaped(self.buffers["running_var"], cdt, bshape, xp=xp)
        istd = inv_std(var, self.eps, xp=xp)
        y = standardize(x, mean, istd, weight, bias, stats, xp=xp, centered=centered)
        params = tuple(a for a in range(x.ndim) if a != c)
        return y, (x, mean, istd, weight, stats, params, not batch, None)


class RMSNorm(_AffineLayer):
    r"""RMS normalization over the trailing axes, like ``torch.nn.RMSNorm``:
    ``y = weight · x / sqrt(mean(x²) + eps)``.

    Parameters
    ----------
    normalized_shape : int or tuple of ints
        Shape of the trailing axes to normalize.
    eps : float or None, default None
        None: the machine epsilon of the compute dtype (float32's for float16/bfloat16).
    elementwise_affine : bool, default True
        Learn ``weight`` (ones); RMSNorm has no bias, as in torch.
    """

    _param_names = ("weight",)

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...],
        *,
        eps: float | None = None,
        elementwise_affine: bool = True,
        xp: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(xp=xp, device=device, dtype=dtype)
        func = "anynorm.RMSNorm"
        self.normalized_shape = V.check_shape(func, "normalized_shape", normalized_shape)
        self._pshape = self.normalized_shape
        self.eps = None if eps is None else V.check_eps(func, eps)
        self.elementwise_affine = V.check_bool(func, "elementwise_affine", elementwise_affine)
        self._maybe_materialize_early()

    def _config(self) -> dict:
        return {
            "normalized_shape": list(self.normalized_shape),
            "eps": self.eps,
            "elementwise_affine": self.elementwise_affine,
        }

    def _state_shapes(self) -> dict:
        return {"weight": self._pshape} if self.elementwise_affine else {}

    _axes_for = LayerNorm._axes_for
    _feature_shape_from = LayerNorm._feature_shape_from

    def _forward(self, x: Array, xp: Any):
        func = self._f("forward")
        axes, _, bshape, rest = layer_layout(func, x, self._axes_for(x))
        cdt = compute_dtype(xp, x.dtype)
        weight = self._cast("weight", cdt, bshape, xp)
        eps = rms_eps(func, self.eps, cdt, xp=xp)
        y, _, istd = normalize(x, axes, weight, None, cdt, eps, xp=xp, rms=True)
        return y, (x, None, istd, weight, axes, rest, False, None)


class LocalResponseNorm(Layer):
    r"""Local response normalization across channels, like ``torch.nn.LocalResponseNorm``:
    ``y_c = x_c / (k + alpha/size · Σ_{c'} x_{c'}²)^beta`` over the window
    ``c − size//2 … c + (size − 1)//2`` (zero outside). No parameters. The forward keeps
    only a reference to ``x``: the backward recomputes the (input-sized) denominator, in
    cache-sized blocks for large inputs (see :mod:`anynorm.functional._lrn`).

    Parameters
    ----------
    size : int
        Number of neighbouring channels in the window (>= 1).
    alpha : float, default 1e-4
    beta : float, default 0.75
    k : float, default 1.0
    axis : int, default 1
        The channel axis (-1 for channels-last).
    """

    def __init__(
        self,
        size: int,
        *,
        alpha: float = 1e-4,
        beta: float = 0.75,
        k: float = 1.0,
        axis: int = 1,
        xp: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(xp=xp, device=device, dtype=dtype)
        func = "anynorm.LocalResponseNorm"
        self.size = V.check_int(func, "size", size)
        self.alpha = V.check_number(func, "alpha", alpha)
        self.beta = V.check_number(func, "beta", beta)
        self.k = V.check_number(func, "k", k)
        self.axis = V.check_channel_axis(func, axis)

    def _config(self) -> dict:
        return {
            "size": self.size,
            "alpha": self.alpha,
            "beta": self.beta,
            "k": self.k,
            "axis": self.axis,
        }

    def _forward(self, x: Array, xp: Any):
        (ax,) = V.normalize_axis(self._f("forward"), self.axis, x.ndim)
        y = lrn_forward(x, self.size, self.alpha, self.beta, self.k, ax, xp=xp)
        return y, (x, ax)  # the backward recomputes the (full-size) denominator

    def _backward(self, dy: Array, cache: Any, xp: Any):
        x, ax = cache
        dx = lrn_backward(dy, x, self.size, self.alpha, self.beta, self.k, ax, xp=xp)
        return dx, {}
