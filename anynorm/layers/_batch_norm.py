"""BatchNorm: the stateful layer over :mod:`anynorm.functional._batch_norm`."""

from __future__ import annotations

from typing import Any

from .. import _validation as V
from .._compat import compute_dtype, no_autodiff
from ..functional._batch_norm import (
    broadcast_shape,
    check_enough_values,
    feature_layout,
    update_running_stats,
)
from ..functional._moments import (
    _size,
    as_compute,
    centered_moments,
    inv_std,
    standardize,
    standardize_backward,
)
from ..functional._sync import SyncHook, check_sync, gradient_reducer, synced_moments
from ._base import Layer

Array = Any


def feature_shape_arg(func: str, num_features: Any, name: str = "num_features"):
    """``num_features`` as a shape tuple (None stays None)."""
    if num_features is None:
        return None
    return V.check_shape(func, name, num_features)


class _RunningStatsMixin:
    """Running mean/var bookkeeping shared by BatchNorm and InstanceNorm (PyTorch's rule)."""

    def _momentum_now(self, xp: Any) -> Any:
        nbt = self.buffers["num_batches_tracked"] + 1
        self.buffers["num_batches_tracked"] = nbt
        if self.momentum is not None:
            return self.momentum
        # cumulative moving average: weight 1/n for the n-th batch (no host sync)
        return 1.0 / xp.astype(nbt, self.buffers["running_mean"].dtype)

    def _track(self, xp: Any, mean: Array, var: Array, count: Any, fshape: tuple) -> None:
        with no_autodiff(xp):  # running statistics are state, not part of any graph
            self._track_now(xp, mean, var, count, fshape)

    def _track_now(self, xp: Any, mean: Array, var: Array, count: Any, fshape: tuple) -> None:
        momentum = self._momentum_now(xp)
        self.buffers["running_mean"], self.buffers["running_var"] = update_running_stats(
            self.buffers["running_mean"],
            self.buffers["running_var"],
            xp.reshape(mean, fshape),
            xp.reshape(var, fshape),
            count,
            momentum,
            xp=xp,
        )


class BatchNorm(_RunningStatsMixin, Layer):
    r"""Batch normalization over any feature axis (or axes), like ``torch.nn.BatchNorm1d/2d/3d``.

    ``y = weight·(x − μ)/sqrt(σ² + eps) + bias`` with ``μ``, ``σ²`` per feature, taken over
    every axis except ``axis``.

    Parameters
    ----------
    num_features : int or tuple of ints, optional
        Size of the feature axis (a tuple for several feature axes). Without it the shape is
        taken from the first input; an input that disagrees later is a ValueError.
    axis : int or tuple of ints, default 1
        Feature axis (axes): 1 for NCHW/NCL/NC (torch), -1 for NHWC (Keras, NumPyNet,
        PIL/OpenCV images), ``(1, 2, 3)`` on NHWC for NumPyNet's per-pixel batch norm.
        Never 0 (the batch axis).
    eps : float, default 1e-5
        Added to the variance.
    momentum : float or None, default 0.1
        PyTorch's convention: ``running = (1 − momentum)·running + momentum·batch``. Keras's
        and Flax's ``momentum=0.99`` is ``momentum=0.01`` here. ``None``: cumulative average.
        The running variance uses the unbiased batch variance; normalization uses the biased.
    affine : bool, default True
        Learn ``weight`` (ones) and ``bias`` (zeros).
    track_running_stats : bool, default True
        Keep ``running_mean`` (zeros), ``running_var`` (ones) and ``num_batches_tracked``
        and use them in evaluation mode; without them batch statistics are used in both modes.
    sync : callable, optional
        Synchronized batch norm (data parallel over processes): a hook that sums a 1-D array
        over all processes, e.g. :func:`anynorm.distributed.all_reduce_torch` (torch.distributed,
        any backend) or :func:`anynorm.distributed.all_reduce_mpi` (mpi4py). Batch statistics
        are then those of the union of every process's batch (exact two-pass); the backward
        gives each process its slice of the full-batch input gradient and the full-batch
        ``weight``/``bias`` gradients (identical on every process: do not all-reduce them
        again); running statistics agree on every process. Per step and layer the hook sums
        ``C + 1`` and ``C`` values in forward and ``2C`` in backward (``C`` features). Every
        process must run the same layers in the same mode and order. The hook is not saved
        with the layer: set ``layer.sync`` again after :func:`anynorm.load`.
    xp, device, dtype
        Create the arrays at construction (needs ``num_features``); see :class:`Layer`.

    Notes
    -----
    In training mode the backward is the full gradient through the batch mean and variance,
    ``dx = istd/M·(M·dx̂ − Σdx̂ − x̂·Σ(dx̂·x̂))`` with ``dx̂ = weight·dy``; in evaluation mode
    (running statistics) it is ``dx = weight·istd·dy``. Training with one value per feature
    raises ValueError, as torch does. float16/bfloat16 inputs use float32 statistics,
    parameters and running statistics; the output keeps the input dtype.
    """

    _param_names = ("weight", "bias")
    _buffer_names = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(
        self,
        num_features: int | tuple[int, ...] | None = None,
        *,
        axis: int | tuple[int, ...] = 1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        sync: SyncHook | None = None,
        xp: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(xp=xp, device=device, dtype=dtype)
        func = f"anynorm.{type(self).__name__}"
        self._fshape = feature_shape_arg(func, num_features)
        self.axis = V.check_axis_arg(func, axis, allow_none=False)
        if self._fshape is not None:
            n_axes = 1 if isinstance(self.axis, int) else len(self.axis)
            if n_axes != len(self._fshape):
                raise ValueError(
                    f"{func}: `num_features`={num_features!r} has {len(self._fshape)} entries "
                    f"but `axis`={axis!r} names {n_axes} feature axes; give one size per axis."
                )
        self.eps = V.check_eps(func, eps)
        self.momentum = V.check_momentum(func, momentum)
        self.affine = V.check_bool(func, "affine", affine)
        self.track_running_stats = V.check_bool(func, "track_running_stats", track_running_stats)
        self.sync = sync
        self._maybe_materialize_early()

    @property
    def sync(self) -> SyncHook | None:
        """The all-reduce hook of synchronized batch norm (None: this process only)."""
        return self._sync

    @sync.setter
    def sync(self, hook: SyncHook | None) -> None:
        self._sync = check_sync(f"anynorm.{type(self).__name__}", hook)

    @property
    def num_features(self) -> int | tuple[int, ...] | None:
        if self._fshape is None:
            return None
        return self._fshape[0] if len(self._fshape) == 1 else self._fshape

    def _config(self) -> dict:
        nf = self.num_features
        return {
            "num_features": list(nf) if isinstance(nf, tuple) else nf,
            "axis": list(self.axis) if isinstance(self.axis, tuple) else self.axis,
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
        }

    def _state_shapes(self) -> dict:
        shapes: dict = {}
        if self.affine:
            shapes.update(weight=self._fshape, bias=self._fshape)
        if self.track_running_stats:
            shapes.update(
                running_mean=self._fshape, running_var=self._fshape, num_batches_tracked=()
            )
        return shapes

    def _set_feature_shape(self, shape: tuple[int, ...]) -> None:
        self._fshape = tuple(shape)

    def _feature_shape_from(self, x: Array) -> tuple[int, ...]:
        func = self._f("forward")
        _, _, fshape = feature_layout(func, x, self.axis)
        if self._fshape is not None and fshape != self._fshape:
            raise ValueError(
                f"{func}: the layer has num_features={self.num_features!r} (feature shape "
                f"{self._fshape}) but `x` of shape {tuple(x.shape)} has feature shape {fshape} "
                f"along axis={self.axis!r}. Use a matching input or a new layer."
            )
        return fshape

    def _uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def _forward(self, x: Array, xp: Any):
        func = self._f("forward")
        feat, red, fshape = feature_layout(func, x, self.axis)
        cdt = compute_dtype(xp, x.dtype)
        bshape = broadcast_shape(x.ndim, feat, fshape)

        def shaped(name: str, store: dict) -> Array | None:
            a = store.get(name)
            return None if a is None else xp.reshape(as_compute(a, cdt, xp=xp), bshape)

        weight, bias = shaped("weight", self.params), shaped("bias", self.params)
        batch = self._uses_batch_stats()
        centered = count = None
        if batch and self.sync is not None:  # statistics of every process's batch
            mean, var, centered, count = synced_moments(func, x, red, cdt, self.sync, xp=xp)
            if self.training and self.track_running_stats:
                self._track(xp, mean, var, count, fshape)
        elif batch:
            V.check_values_per_stat(
                func,
                x,
                _size(x, red),
                "feature",
                "pass a non-empty batch, or use evaluation "
                "mode (layer.eval()) with running statistics, where an empty batch gives an "
                "empty output.",
            )
            check_enough_values(func, x, red)
            mean, var, centered = centered_moments(x, red, cdt, xp=xp)
            if self.training and self.track_running_stats:
                self._track(xp, mean, var, _size(x, red), fshape)
        else:
            mean, var = shaped("running_mean", self.buffers), shaped("running_var", self.buffers)
        istd = inv_std(var, self.eps, xp=xp)
        y = standardize(x, mean, istd, weight, bias, red, xp=xp, centered=centered)
        return y, (x, mean, istd, weight, red, not batch, fshape, count, self.sync)

    def _backward(self, dy: Array, cache: Any, xp: Any):
        x, mean, istd, weight, red, frozen, fshape, count, sync = cache
        reduce = None if sync is None else gradient_reducer(self._f("backward"), sync, xp=xp)
        dx, dw, db = standardize_backward(
            dy,
            x,
            mean,
            istd,
            weight,
            red,
            red if self.affine else None,
            frozen=frozen,
            xp=xp,
            reduce=reduce,
            count=count,
        )
        grads = {}
        if self.affine:
            grads = {"weight": xp.reshape(dw, fshape), "bias": xp.reshape(db, fshape)}
        return dx, grads
