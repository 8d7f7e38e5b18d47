"""Every user-facing check and error message of anynorm.

Each message names the function, the argument, what was received and how to fix it. Checks run
on shapes, dtypes and Python values only: never on array *values* (that would force a
device-to-host sync and break ``jax.jit``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from . import _compat

Array = Any


def _describe(value: Any) -> str:
    if _compat.is_array(value):
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def check_array(func: str, name: str, x: Any) -> None:
    if not _compat.is_array(x):
        raise TypeError(
            f"{func}: `{name}` must be an array (NumPy, CuPy, PyTorch, JAX, Dask or "
            f"array-api-strict); received {_describe(x)}. Convert it first, e.g. "
            f"numpy.asarray({name}, dtype=numpy.float32)."
        )


def namespace(func: str, **arrays: Any) -> Any:
    """Check every named argument (``None`` entries skipped) is an array, that all share one
    namespace (TypeError) and one device (ValueError); return the compat namespace."""
    given = {k: v for k, v in arrays.items() if v is not None}
    for name, value in given.items():
        check_array(func, name, value)
    names = list(given)
    spaces = [_compat.array_namespace(given[n]) for n in names]
    first = spaces[0]
    for n, sp in zip(names[1:], spaces[1:], strict=True):
        if sp is not first:
            raise TypeError(
                f"{func}: all arrays must come from one namespace; `{names[0]}` is "
                f"{_compat.namespace_name(first)} but `{n}` is {_compat.namespace_name(sp)}. "
                f"Convert `{n}` to {_compat.namespace_name(first)} first."
            )
    dev0 = _compat.device(given[names[0]])
    for n in names[1:]:
        dev = _compat.device(given[n])
        if not _compat.same_device(dev, dev0):
            raise ValueError(
                f"{func}: all arrays must be on one device; `{names[0]}` is on {dev0} but "
                f"`{n}` is on {dev}. Move `{n}` to {dev0} first."
            )
    return first


def check_floating(func: str, name: str, x: Array, xp: Any) -> None:
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"{func}: `{name}` must have a real floating dtype (float16, bfloat16, float32 or "
            f"float64); received dtype {x.dtype}. Cast it first, e.g. "
            f"xp.astype({name}, xp.float32)."
        )


def check_ndim(func: str, name: str, x: Array, min_ndim: int, hint: str = "") -> None:
    if x.ndim < min_ndim:
        hint = hint or (
            f"Pass an input with at least {min_ndim} axes (e.g. add a batch axis: x[None])."
        )
        raise ValueError(
            f"{func}: `{name}` must have at least {min_ndim} dimensions; received shape "
            f"{tuple(x.shape)} ({x.ndim}-D). {hint}"
        )


def check_known_shape(func: str, name: str, x: Array) -> None:
    if any(s is None or (isinstance(s, float) and math.isnan(s)) for s in x.shape):
        raise ValueError(
            f"{func}: `{name}` has unknown dimension sizes {tuple(x.shape)} (a dask array "
            f"after boolean indexing?). Call {name}.compute_chunk_sizes() first."
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def normalize_axis(func: str, axis: Any, ndim: int, name: str = "axis") -> tuple[int, ...]:
    """``axis`` (int, sequence of ints, or None for all) as a sorted tuple of non-negative
    ints; out of range or repeated axes are a ValueError."""
    if axis is None:
        return tuple(range(ndim))
    items = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    if not all(_is_int(a) for a in items):
        raise TypeError(
            f"{func}: `{name}` must be an int, a tuple of ints or None; received "
            f"{_describe(axis)}. Pass e.g. {name}=-1 or {name}=(1, 2)."
        )
    out = []
    for a in items:
        a = int(a)
        if ndim == 0:
            raise ValueError(
                f"{func}: `{name}`={axis!r} is out of range for a 0-D input, which has no axes; "
                "pass an array with at least one axis."
            )
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{func}: `{name}`={axis!r} is out of range for a {ndim}-D input (valid axes "
                f"are {-ndim}..{ndim - 1})."
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{func}: `{name}`={axis!r} repeats an axis; list each axis once.")
    return tuple(sorted(out))


def check_axis_arg(func: str, axis: Any, name: str = "axis", allow_none: bool = True) -> Any:
    """Type-check an ``axis`` argument before the input's rank is known; returns an int, a
    tuple of ints or None."""
    if axis is None and allow_none:
        return None
    if _is_int(axis):
        return int(axis)
    if isinstance(axis, (tuple, list)) and axis and all(_is_int(a) for a in axis):
        if len(set(axis)) != len(axis):
            raise ValueError(f"{func}: `{name}`={axis!r} repeats an axis; list each axis once.")
        return tuple(int(a) for a in axis)
    kinds = ", a tuple of ints or None" if allow_none else " or a non-empty tuple of ints"
    raise TypeError(
        f"{func}: `{name}` must be an int{kinds}; "
        f"received {_describe(axis)}. Pass e.g. {name}=-1 or {name}=(1, 2)."
    )


def check_channel_axis(func: str, axis: Any) -> int:
    """The channel ``axis`` of group/instance/local-response norm: one int."""
    if not _is_int(axis):
        raise TypeError(
            f"{func}: `axis` (the channel axis) must be an int; received {_describe(axis)}. "
            "Use axis=1 for channels-first or axis=-1 for channels-last input."
        )
    return int(axis)


def check_number(
    func: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    allow_none: bool = False,
    allow_inf: bool = False,
    hint: str = "",
) -> float | None:
    """A real Python/NumPy scalar within [low, high] (``low_open`` excludes ``low``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{func}: `{name}` must be a real number; received {_describe(value)}.{hint}"
        )
    v = float(value)
    bad = math.isnan(v) or (math.isinf(v) and not allow_inf)
    if low is not None and (v < low or (low_open and v == low)):
        bad = True
    if high is not None and v > high:
        bad = True
    if bad:
        lo = "(" if low_open or low is None else "["
        hi = f"{high}]" if high is not None else ("inf]" if allow_inf else "inf)")
        rng = f"{lo}{'-inf' if low is None else low}, {hi}"
        hint = hint or f" Pass a finite number in {rng}."
        raise ValueError(f"{func}: `{name}` must be in {rng}; received {value!r}.{hint}")
    return v


def check_eps(func: str, eps: Any) -> float:
    return check_number(func, "eps", eps, low=0.0, hint=" Use e.g. eps=1e-5.")


def check_momentum(func: str, momentum: Any) -> float | None:
    return check_number(
        func,
        "momentum",
        momentum,
        low=0.0,
        high=1.0,
        allow_none=True,
        hint=" It is PyTorch's momentum (weight of the new batch; Keras momentum=0.99 is "
        "momentum=0.01 here), or None for a cumulative average.",
    )


def check_p(func: str, p: Any) -> float:
    """Lp exponent: a real number >= 1 or math.inf. bool and NaN are ValueErrors."""
    if isinstance(p, bool) or (isinstance(p, numbers.Real) and math.isnan(float(p))):
        raise ValueError(
            f"{func}: `p` must be a real number >= 1 or math.inf; received {p!r}. "
            "Use p=2 for the Euclidean norm."
        )
    return check_number(
        func, "p", p, low=1.0, allow_inf=True, hint=" Use p=2 for the Euclidean norm."
    )


def check_int(func: str, name: str, value: Any, *, low: int = 1) -> int:
    if not _is_int(value):
        raise TypeError(
            f"{func}: `{name}` must be an int; received {_describe(value)}. Pass a whole "
            f"number, e.g. {name}={max(low, 1)}."
        )
    if value < low:
        raise ValueError(
            f"{func}: `{name}` must be >= {low}; received {value!r}. Pass {name}={low} or more."
        )
    return int(value)


def check_bool(func: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(
            f"{func}: `{name}` must be True or False; received {_describe(value)}. Pass "
            f"{name}=True or {name}=False (not 0/1 or a string)."
        )
    return value


def check_shape(func: str, name: str, value: Any) -> tuple[int, ...]:
    """An int or a sequence of positive ints, as a tuple."""
    items = (value,) if _is_int(value) else value
    if (
        not isinstance(items, Sequence)
        or isinstance(items, str)
        or not all(_is_int(s) for s in items)
    ):
        raise TypeError(
            f"{func}: `{name}` must be an int or a tuple of ints; received {_describe(value)}. "
            f"Pass e.g. {name}=64 or {name}=(8, 8)."
        )
    if len(items) == 0 or any(s < 1 for s in items):
        raise ValueError(
            f"{func}: `{name}` must be a non-empty tuple of positive ints; received {value!r}. "
            "Every size must be at least 1."
        )
    return tuple(int(s) for s in items)


def check_param(
    func: str, name: str, param: Array | None, expected: tuple[int, ...], xp: Any
) -> None:
    """A weight/bias passed to a functional form must be a floating array of ``expected``."""
    if param is None:
        return
    check_floating(func, name, param, xp)
    if tuple(param.shape) != tuple(expected):
        raise ValueError(
            f"{func}: `{name}` must have shape {tuple(expected)} (one entry per feature of "
            f"the input); received shape {tuple(param.shape)}. Pass a `{name}` of shape "
            f"{tuple(expected)} or check the `axis` argument."
        )


def check_grad(func: str, dy: Any, expected: dict) -> None:
    """``dy`` must match the last output in namespace, dtype, device and exact shape."""
    check_array(func, "dy", dy)
    xp = _compat.array_namespace(dy)
    if xp is not expected["xp"]:
        raise TypeError(
            f"{func}: `dy` is a {_compat.namespace_name(xp)} array but the last forward "
            f"returned a {_compat.namespace_name(expected['xp'])} array; pass the upstream "
            "gradient in the same namespace as the output."
        )
    if dy.dtype != expected["dtype"]:
        raise TypeError(
            f"{func}: `dy` has dtype {dy.dtype} but the last output has dtype "
            f"{expected['dtype']}; cast dy to {expected['dtype']}."
        )
    dev = _compat.device(dy)
    if not _compat.same_device(dev, expected["device"]):
        raise ValueError(
            f"{func}: `dy` is on device {dev} but the last output is on {expected['device']}; "
            "move dy there first."
        )
    if tuple(dy.shape) != tuple(expected["shape"]):
        raise ValueError(
            f"{func}: `dy` must have the shape of the last output {tuple(expected['shape'])}; "
            f"received {tuple(dy.shape)} (broadcasting is not applied to gradients)."
        )


def check_grad_like(func: str, dy: Array, x: Array, xp: Any) -> None:
    """Functional backward passes: ``dy`` must be a real floating array with exactly the dtype
    (TypeError, as in ``Layer.backward``) and the shape (ValueError) of ``x``. Namespace and
    device are checked with the other arrays by :func:`namespace`."""
    check_known_shape(func, "dy", dy)
    check_floating(func, "dy", dy, xp)
    if dy.dtype != x.dtype:
        raise TypeError(
            f"{func}: `dy` has dtype {dy.dtype} but `x` has dtype {x.dtype}; cast dy to "
            f"{x.dtype} (the upstream gradient has the dtype of the output, which is x's)."
        )
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(
            f"{func}: `dy` must have the shape and dtype of `x` {tuple(x.shape)}, {x.dtype}; "
            f"received {tuple(dy.shape)}, {dy.dtype} (broadcasting is not applied to gradients)."
        )


def check_values_per_stat(func: str, x: Array, count: int, per: str, fix: str) -> None:
    """Statistics over zero values (a dimension of size 0) would be NaN and leak into running
    statistics and parameter gradients: refuse them with a ValueError on every backend."""
    if count == 0:
        raise ValueError(
            f"{func}: `x` of shape {tuple(x.shape)} has 0 values per {per} to compute "
            f"statistics from (a dimension of size 0); {fix}"
        )


def check_param_dtype(func: str, dtype: Any, xp: Any) -> None:
    """The ``dtype`` given for parameters and buffers (constructor or ``to``) must be a real
    floating dtype of ``xp``: integer parameters would silently truncate every update.
    ``None`` (no arrays to create, or "follow the input") passes."""
    if dtype is None:
        return
    try:
        ok = xp.isdtype(dtype, "real floating")
    except Exception:  # not a dtype of this namespace at all (a string, a Python type...)
        ok = False
    if not ok:
        raise TypeError(
            f"{func}: `dtype` for the parameters and buffers must be a real floating dtype "
            f"of the layer's namespace; received {dtype!r}. Pass e.g. dtype=xp.float32, or "
            "leave dtype=None to follow the input (float32 for float16/bfloat16 input)."
        )


def check_state_floating(func: str, state: Any, names: Sequence[str]) -> None:
    """Every array entry ``names`` of a state dict has a real floating dtype (TypeError),
    checked before anything is loaded so that a refused state leaves the layer unchanged."""
    for k in names:
        value = state.get(k) if hasattr(state, "get") else None
        if _compat.is_array(value) and not _compat.array_namespace(value).isdtype(
            value.dtype, "real floating"
        ):
            raise TypeError(
                f"{func}: entry {k!r} must have a real floating dtype; received {value.dtype}. "
                f"Cast it first, e.g. xp.astype(state[{k!r}], xp.float32)."
            )
