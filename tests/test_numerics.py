"""Numerical robustness of every layer, against float64 oracles, on every backend case.

Oracles (float64 NumPy, sharing no code with ``anynorm.functional``):

- forward: ``anynorm._reference`` (textbook formulas, itself checked against torch);
- backward: the textbook vector-Jacobian products written out below (``vjp_*``), checked
  against ``anynorm._reference.fd_vjp`` (finite differences) in
  ``test_oracle_vjps_match_finite_differences``.

Stress cases (``STRESS``): float16/bfloat16 inputs around ±300 and ±6e4 (their squares
overflow float16), float32 data with mean 1e4 and unit variance (a one-pass variance
cancels to 0), constant features (zero variance), zero vectors, denormal-size inputs,
reductions over >= 16k float16 elements, NaN and inf inputs, and empty arrays. Then
hypothesis property tests over random shapes, axes and layers, and the "no silent loss"
checks: nothing passed in is mutated, no output aliases an input, and the explicit backward
on torch tensors that require grad does not keep an autograd graph alive in the layer.

Runtime: JAX compiles every primitive for every new (shape, dtype) (about 45 ms each on a
2-core CPU, 0.4 - 2 s per layer) and dask builds a task graph per call, so on those two
backends the sweeps run the ``CORE`` layers on the shared shape (the other layers run there
in the other test modules, and every layer on every backend is in tests/NUMERICS.md, which
``python tests/test_numerics.py`` regenerates); the hypothesis tests run on numpy,
array-api-strict and torch.

Decisions (also in tests/NUMERICS.md):

- Empty arrays: a mean-type statistic (mean, variance, mean square) over zero values is a
  ValueError on every backend - training-mode batch norm with an empty batch or length,
  layer/RMS norm over an axis of size 0, group and instance norm with an empty length,
  instance norm updating running statistics from an empty batch - because the NaN statistic
  would leak into running statistics and parameter gradients. Everything else that is empty
  (an empty batch, no features, frozen statistics, any Lp or local response norm: sums over
  nothing are 0) gives an empty output, zero parameter gradients and unchanged buffers.
- Denormal inputs are ordinary inputs: an Lp vector whose norm is below ``eps`` comes out as
  ``x/eps``, batch norm of constant denormal data is ``bias``, RMS norm of denormal data is
  ``x/sqrt(eps)``. Backends that flush denormals to zero (XLA on CPU, i.e. JAX) compute the
  result for ``x = 0`` instead; both are accepted there, and only there.
- NaN and inf propagate to every output that depends on them (the vector, the feature, the
  group, the LRN window) and to no other output; they are never clamped or masked away.
"""

from __future__ import annotations

import gc
import math
import sys
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if __name__ == "__main__":  # `python tests/test_numerics.py`: the repository root first
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

import anynorm
from anynorm import _reference as ref
from anynorm import functional as F
from conftest import rel_err

SHAPE = (4, 6, 5)  # (N, C, L), the shape every sweep shares (JAX compiles it once)
LIGHT = ("numpy", "array_api_strict", "torch", "cupy")
HEAVY = ("jax", "dask")
LRN = {"size": 3, "alpha": 0.4, "beta": 0.75, "k": 1.2}


# ============================================================================ oracles
def _lp_norm64(x, p, axes):
    a = np.abs(x)
    if math.isinf(p):
        return np.max(a, axis=axes, keepdims=True)
    return np.sum(a**p, axis=axes, keepdims=True) ** (1.0 / p)


def vjp_lp(x, g, p, axes, eps):
    """``dx`` of ``y = x / max(N, eps)``, ``N = ‖x‖_p`` over ``axes``: with ``N > eps``,
    ``dx = g/N − sign(x)·(|x|/N)^(p−1)·Σ(g·x)/N²`` (for p = inf the ``max`` derivative is
    split among tied maxima); with ``N <= eps``, ``dx = g/eps``."""
    n = _lp_norm64(x, p, axes)
    dot = np.sum(g * x, axis=axes, keepdims=True)
    safe = np.where(n > 0, n, 1.0)
    if math.isinf(p):
        hit = (np.abs(x) == n).astype(float)
        dn = np.sign(x) * hit / np.maximum(np.sum(hit, axis=axes, keepdims=True), 1.0)
    else:
        dn = np.sign(x) * (np.abs(x) / safe) ** (p - 1.0)
    clamped = g / eps
    free = g / safe - dn * dot / safe**2
    # a NaN norm is neither above nor below eps: its vector's gradient is NaN
    return np.where(n > eps, free, np.where(n <= eps, clamped, np.nan))


def vjp_standardize(x, g, w, axes, param_axes, eps):
    """``(dx, dw, db)`` of ``y = w·(x − μ)/sqrt(σ² + eps) + b`` with ``μ``, ``σ²`` (biased)
    over ``axes``; ``w`` broadcasts against ``x``; ``dw``, ``db`` summed over ``param_axes``
    (keepdims). Textbook: ``dx = (dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))/s``, ``dx̂ = w·g``."""
    mu = np.mean(x, axis=axes, keepdims=True)
    s = np.sqrt(np.mean((x - mu) ** 2, axis=axes, keepdims=True) + eps)
    xh = (x - mu) / s
    dxh = g * w
    dx = (
        dxh
        - np.mean(dxh, axis=axes, keepdims=True)
        - xh * np.mean(dxh * xh, axis=axes, keepdims=True)
    ) / s
    dw = np.sum(g * xh, axis=param_axes, keepdims=True)
    return dx, dw, np.sum(g, axis=param_axes, keepdims=True)


def vjp_rms(x, g, w, axes, param_axes, eps):
    """``(dx, dw)`` of ``y = w·x/sqrt(mean(x²) + eps)``: ``dx = r·(dx̂ − x̂·mean(dx̂·x̂))``."""
    r = 1.0 / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + eps)
    xh = x * r
    dxh = g * w
    dx = r * (dxh - xh * np.mean(dxh * xh, axis=axes, keepdims=True))
    return dx, np.sum(g * xh, axis=param_axes, keepdims=True)


def vjp_lrn(x, g, size, alpha, beta, k, axis=1):
    """``dx`` of local response norm: with ``d_c = k + α/size·Σ_{c'∈win(c)} x_{c'}²``,
    ``dx_j = g_j·d_j^(−β) − (2αβ/size)·x_j·Σ_{c: j∈win(c)} g_c·x_c·d_c^(−β−1)``."""
    xm, gm = np.moveaxis(x, axis, 0), np.moveaxis(g, axis, 0)
    c = xm.shape[0]
    win = [range(max(0, ch - size // 2), min(c, ch + (size - 1) // 2 + 1)) for ch in range(c)]
    d = np.stack([k + alpha / size * sum(xm[j] ** 2 for j in win[ch]) for ch in range(c)])
    t = gm * xm * d ** (-beta - 1.0)
    dx = np.stack(
        [
            gm[j] * d[j] ** (-beta)
            - 2.0 * alpha * beta / size * xm[j] * sum(t[ch] for ch in range(c) if j in win[ch])
            for j in range(c)
        ]
    )
    return np.moveaxis(dx, 0, axis)


# ============================================================================ layer specs
@dataclass
class Spec:
    """One layer on an ``(N, C, L)`` input: how to build it, its float64 forward and backward
    oracles, its parameters and its statistic groups."""

    make: Callable[[tuple], Any]  # shape -> layer
    forward: Callable[..., np.ndarray]  # (x, params, eps) -> y
    backward: Callable[..., dict]  # (x, g, params, eps) -> {"dx", "weight", "bias", "scale"}
    pshape: Callable[[tuple], tuple] | None = None  # parameter shape (None: no parameters)
    has_bias: bool = True
    #: label of the statistic group (vector, feature, group) of every element
    groups: Callable[[tuple], np.ndarray] | None = None
    eps: float | None = None  # None: RMS norm's machine epsilon of the compute dtype

    def params(self, shape: tuple) -> dict:
        if self.pshape is None:
            return {}
        rng = np.random.default_rng(5)
        out = {"weight": rng.uniform(0.5, 1.5, self.pshape(shape))}
        if self.has_bias:
            out["bias"] = rng.standard_normal(self.pshape(shape))
        return out


def _labels(shape, keep):
    """A label per element that is equal exactly for elements equal on the axes ``keep``."""
    idx = np.indices(shape)
    if not keep:
        return np.zeros(shape, dtype=int)
    return np.ravel_multi_index([idx[i] for i in keep], [shape[i] for i in keep])


def _gscale(g, axes):
    """The natural size of a parameter gradient ``Σ g·x̂`` (its value for |x̂| = 1): its
    error is measured against this when the gradient itself is ~0 (constant features)."""
    return float(np.max(np.sum(np.abs(g), axis=axes), initial=0.0))


def _lp(p, axis, cls=None, eps=1e-4):
    """Lp layers use eps=1e-4 here, so that the gradient g/eps of a zero vector stays finite
    in float16 (the default 1e-12 makes it ±inf there, as in torch: tests/test_lp.py)."""

    def make(shape):
        return cls(axis=axis, eps=eps) if cls is not None else anynorm.LpNorm(p, axis, eps)

    def fwd(x, prm, e):
        return ref.lp_normalize(x, p, axis, e)

    def bwd(x, g, prm, e):
        return {"dx": vjp_lp(x, g, p, ref._axes(axis, x.ndim), e)}

    def groups(shape):
        ax = ref._axes(axis, len(shape))
        return _labels(shape, [i for i in range(len(shape)) if i not in ax])

    return Spec(make, fwd, bwd, groups=groups, eps=eps)


def _chan(shape):
    return (shape[1],)


def _bn_forward(x, prm, e):
    return ref.batch_norm(x, prm.get("weight"), prm.get("bias"), axis=1, eps=e)


def _bn_backward(x, g, prm, e):
    w = prm["weight"].reshape(1, -1, *([1] * (x.ndim - 2)))
    red = tuple(a for a in range(x.ndim) if a != 1)
    dx, dw, db = vjp_standardize(x, g, w, red, red, e)
    return {"dx": dx, "weight": dw.reshape(-1), "bias": db.reshape(-1), "scale": _gscale(g, red)}


def _ln_forward(x, prm, e):
    return ref.layer_norm(x, prm.get("weight"), prm.get("bias"), axis=(-2, -1), eps=e)


def _ln_backward(x, g, prm, e):
    axes, rest = (x.ndim - 2, x.ndim - 1), tuple(range(x.ndim - 2))
    dx, dw, db = vjp_standardize(x, g, prm["weight"], axes, rest, e)
    shape = prm["weight"].shape
    return {
        "dx": dx,
        "weight": dw.reshape(shape),
        "bias": db.reshape(shape),
        "scale": _gscale(g, rest),
    }


def _gn_forward(x, prm, e):
    return ref.group_norm(x, 3, prm.get("weight"), prm.get("bias"), axis=1, eps=e)


def _gn_backward(x, g, prm, e):
    n, c = x.shape[:2]
    xg, gg = x.reshape(n, 3, c // 3, -1), g.reshape(n, 3, c // 3, -1)
    w = prm["weight"].reshape(1, 3, c // 3, 1)
    dx, dw, db = vjp_standardize(xg, gg, w, (2, 3), (0, 3), e)
    return {
        "dx": dx.reshape(x.shape),
        "weight": dw.reshape(-1),
        "bias": db.reshape(-1),
        "scale": _gscale(gg, (0, 3)),
    }


def _in_forward(x, prm, e):
    return ref.instance_norm(x, prm.get("weight"), prm.get("bias"), axis=1, eps=e)


def _in_backward(x, g, prm, e):
    w = prm["weight"].reshape(1, -1, *([1] * (x.ndim - 2)))
    stats = tuple(range(2, x.ndim))
    params = (0, *stats)
    dx, dw, db = vjp_standardize(x, g, w, stats, params, e)
    return {"dx": dx, "weight": dw.reshape(-1), "bias": db.reshape(-1), "scale": _gscale(g, params)}


def _rms_forward(x, prm, e):
    return ref.rms_norm(x, prm.get("weight"), axis=-1, eps=e)


def _rms_backward(x, g, prm, e):
    rest = tuple(range(x.ndim - 1))
    dx, dw = vjp_rms(x, g, prm["weight"], (x.ndim - 1,), rest, e)
    return {"dx": dx, "weight": dw.reshape(-1), "scale": _gscale(g, rest)}


def _lrn_forward(x, prm, e):
    return ref.local_response_norm(x, **LRN)


def _lrn_backward(x, g, prm, e):
    return {"dx": vjp_lrn(x, g, **LRN)}


SPECS: dict[str, Spec] = {
    "L2Norm": _lp(2.0, 1, cls=anynorm.L2Norm),
    "L1Norm": _lp(1.0, -1, cls=anynorm.L1Norm),
    "LpNorm3": _lp(3.0, (1, 2)),
    "LpNormInf": _lp(math.inf, -1),
    "BatchNorm": Spec(
        lambda s: anynorm.BatchNorm(),
        _bn_forward,
        _bn_backward,
        _chan,
        groups=lambda s: _labels(s, [1]),
        eps=1e-5,
    ),
    "LayerNorm": Spec(
        lambda s: anynorm.LayerNorm(s[-2:]),
        _ln_forward,
        _ln_backward,
        lambda s: tuple(s[-2:]),
        groups=lambda s: _labels(s, list(range(len(s) - 2))),
        eps=1e-5,
    ),
    "GroupNorm": Spec(
        lambda s: anynorm.GroupNorm(3, s[1]),
        _gn_forward,
        _gn_backward,
        _chan,
        groups=lambda s: _labels(s, [0]) * 3 + np.indices(s)[1] // (s[1] // 3),
        eps=1e-5,
    ),
    "InstanceNorm": Spec(
        lambda s: anynorm.InstanceNorm(s[1], affine=True),
        _in_forward,
        _in_backward,
        _chan,
        groups=lambda s: _labels(s, [0, 1]),
        eps=1e-5,
    ),
    "RMSNorm": Spec(
        lambda s: anynorm.RMSNorm(s[-1]),
        _rms_forward,
        _rms_backward,
        lambda s: (s[-1],),
        has_bias=False,
        groups=lambda s: _labels(s, list(range(len(s) - 1))),
    ),
    "LocalResponseNorm": Spec(
        lambda s: anynorm.LocalResponseNorm(**LRN),
        _lrn_forward,
        _lrn_backward,
        groups=lambda s: _labels(s, [0, 2]),  # "constant" = constant across the channels
    ),
}
ALL = list(SPECS)
#: the layers the sweeps run on JAX and dask (see the module docstring)
CORE = ["L2Norm", "BatchNorm", "LayerNorm", "RMSNorm"]
CENTRED = ["BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm"]


def _compute_eps(bk) -> float:
    """Machine epsilon of the compute dtype (float32 for float16/bfloat16 input)."""
    return float(np.finfo(np.float64 if bk.dtype_name == "float64" else np.float32).eps)


def _eps(bk, spec: Spec) -> float:
    return spec.eps if spec.eps is not None else _compute_eps(bk)


# ============================================================================ running a case
@dataclass
class Result:
    """Relative errors (max |got − oracle| / max |oracle|) of one layer on one input."""

    errors: dict[str, float]
    y: np.ndarray
    got: dict[str, np.ndarray]
    want: dict[str, np.ndarray]
    #: y and dx against the unrounded oracle (including the final rounding to the dtype)
    raw: dict[str, float]


def run_layer(bk, name: str, x64: np.ndarray, g64: np.ndarray | None = None, rng=None):
    """Forward + backward of layer ``name`` (with non-trivial parameters loaded) on the case,
    and the float64 oracles on the same rounded input. Checks namespace, dtype, device and
    shape of every returned array. Returns a :class:`Result`."""
    spec = SPECS[name]
    rng = rng or np.random.default_rng(11)
    if g64 is None:  # |g| <= 4: g/eps stays finite in float16 for the Lp eps of 1e-4
        g64 = np.clip(rng.standard_normal(x64.shape), -4.0, 4.0)
    layer = spec.make(x64.shape)
    prm = {k: bk.asarray(v, dtype=bk.param_dtype) for k, v in spec.params(x64.shape).items()}
    if prm:
        layer.to(bk.xp, device=bk.device, dtype=bk.param_dtype)
        layer.load_state_dict(prm, strict=False)
    prm64 = {k: bk.to_numpy(v) for k, v in prm.items()}
    x, g = bk.asarray(x64), bk.asarray(g64)
    xr, gr = bk.to_numpy(x), bk.to_numpy(g)
    with np.errstate(all="ignore"):  # inf − inf in the NaN/inf cases; dask computes late
        y = layer.forward(x)
        dx = layer.backward(g)
        bk.check(y, x64.shape, what=f"{name} y")
        bk.check(dx, x64.shape, what=f"{name} dx")
        got = {"y": bk.to_numpy(y), "dx": bk.to_numpy(dx)}
        for k, v in layer.grads.items():
            bk.check(v, prm64[k].shape, bk.param_dtype, what=f"{name} d{k}")
            got[k] = bk.to_numpy(v)
    e = _eps(bk, spec)
    with np.errstate(all="ignore"):
        want = {"y": spec.forward(xr, prm64, e), **spec.backward(xr, gr, prm64, e)}
    scale = want.pop("scale", 0.0)
    errors = {}
    for k in got:
        # y and dx come back in the input dtype: judge them against the oracle rounded to it
        # (the best representable answer; it matters for float16 results below 6.1e-5)
        target = _round(bk, want[k]) if k in ("y", "dx") else want[k]
        errors[k] = _err(got[k], target, floor=0.0 if k in ("y", "dx") else scale)
    raw = {k: _err(got[k], want[k]) for k in ("y", "dx")}
    return Result(errors, got["y"], got, want, raw)


def _round(bk, a: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return bk.round(a)


def _err(got: np.ndarray, want: np.ndarray, floor: float = 0.0) -> float:
    """max |got − want| / max(max |want|, floor) over the finite entries of ``want``,
    requiring the same non-finite pattern (NaN, +inf, −inf in the same places); ``floor`` is
    the natural scale of a quantity whose true value may be ~0."""
    if got.shape != want.shape:
        return math.inf
    for f in (np.isnan, np.isposinf, np.isneginf):
        if not np.array_equal(f(got), f(want)):
            return math.inf
    fin = np.isfinite(want)
    if not fin.any():
        return 0.0
    # no 1e-300 guard as in rel_err: denormal cases have outputs of 1e-306 and below
    scale = max(float(np.max(np.abs(want[fin]))), floor)
    diff = float(np.max(np.abs(got[fin] - want[fin])))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


# ============================================================================ the stress cases
def _signs(rng, shape):
    return rng.choice([-1.0, 1.0], size=shape)


def data_pm300(rng, shape, bk, name):
    return _signs(rng, shape) * rng.uniform(200.0, 400.0, shape)


def data_pm6e4(rng, shape, bk, name):
    return _signs(rng, shape) * rng.uniform(3e4, 6.5e4, shape)


def data_shifted(rng, shape, bk, name):
    return 1e4 + rng.standard_normal(shape)


def data_constant(rng, shape, bk, name):
    """Constant over every statistic group (zero variance), a different constant per group;
    the Lp layers and RMS norm get zero vectors in every other group instead."""
    labels = SPECS[name].groups(shape)
    values = rng.uniform(-2.0, 2.0, labels.max() + 1)
    if name.startswith(("L1", "L2", "Lp", "RMS")):
        x = rng.standard_normal(shape)
        return np.where(labels % 2 == 0, 0.0, x)
    return values[labels]


def data_denormal(rng, shape, bk, name):
    """Denormal magnitudes (1e-40 in float32, 1e-310 in float64); constant per group for
    batch norm (zero variance), random otherwise."""
    tiny = 1e-310 if bk.dtype_name == "float64" else 1e-40
    if name == "BatchNorm":
        return data_constant(rng, shape, bk, name) * 0 + tiny * rng.integers(1, 5)
    return _signs(rng, shape) * tiny * rng.integers(1, 8, shape)


@dataclass
class Stress:
    data: Callable
    dtypes: tuple[str, ...]
    tol: Callable  # (bk, key) -> tolerance for key in ("y", "dx", "weight", "bias")
    note: str


def _tol_default(bk, key):
    return bk.tol


def _tol_shifted(bk, key):
    # The input's own rounding is in the oracle; what is left is the rounding of the mean:
    # |μ|·ε/σ = 1e4·1.2e-7 ≈ 1.2e-3 per unit of σ in float32 (measured: see NUMERICS.md).
    return bk.tol if bk.dtype_name == "float64" else 2e-3


def _tol_constant(bk, key):
    # x − μ is not exactly 0 when the mean of n copies of v rounds (float32: |x − μ| ≈ ulp(v));
    # that is amplified by 1/sqrt(eps) = 316 (eps = 1e-5) in y and dx. Half inputs are
    # reduced in float32, where the mean of a few half-precision copies is exact.
    return 2e-4 if bk.dtype_name == "float32" else bk.tol


STRESS: dict[str, Stress] = {
    "half ±300": Stress(
        data_pm300,
        ("float16", "bfloat16"),
        _tol_default,
        "x ≈ ±300: x² = 9e4 overflows float16 (max 65504)",
    ),
    "half ±6e4": Stress(
        data_pm6e4,
        ("float16", "bfloat16"),
        _tol_default,
        "x ≈ ±6e4, near float16's max; Σx² ≈ 1e11",
    ),
    "mean 1e4": Stress(
        data_shifted,
        ("float32", "float64"),
        _tol_shifted,
        "mean 1e4, unit variance: one-pass E[x²]−E[x]² cancels to 0 in float32",
    ),
    "constant": Stress(
        data_constant,
        ("float32", "float64", "float16", "bfloat16"),
        _tol_constant,
        "zero variance per group (Lp/RMS: zero vectors): y = bias (0), finite gradients",
    ),
    "denormal": Stress(
        data_denormal,
        ("float32", "float64"),
        _tol_default,
        "|x| ≈ 1e-40 (float32) / 1e-310 (float64)",
    ),
}


def stress_input(bk, case: str, name: str, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"{case}/{name}".encode()))
    return STRESS[case].data(rng, shape, bk, name)


def _flushed(x64: np.ndarray, bk) -> np.ndarray:
    """``x64`` with denormals of the case's dtype set to 0 (what flush-to-zero computes on)."""
    tiny = np.finfo(np.float64 if bk.dtype_name == "float64" else np.float32).tiny
    return np.where(np.abs(x64) < tiny, 0.0, x64)


def stress_errors(bk, case: str, name: str) -> tuple[dict[str, float], Result]:
    """Relative errors of layer ``name`` on stress ``case`` (with JAX's flush-to-zero result
    accepted for denormal inputs)."""
    x64 = stress_input(bk, case, name)
    res = run_layer(bk, name, x64)
    errors = res.errors
    if case == "denormal" and bk.backend == "jax":
        # XLA on CPU flushes denormals to zero: accept the exact result for the flushed input
        alt = run_layer(bk, name, _flushed(x64, bk))
        errors = {
            k: min(
                v, _err(res.got[k], _round(bk, alt.want[k]) if k in ("y", "dx") else alt.want[k])
            )
            for k, v in errors.items()
        }
    return errors, res


def check_stress(bk, case: str, name: str) -> dict[str, float]:
    """Run stress ``case`` on layer ``name``; assert every error is within the case's
    tolerance and every output is finite. Returns the errors."""
    st = STRESS[case]
    errors, res = stress_errors(bk, case, name)
    for k, v in res.got.items():
        assert np.all(np.isfinite(v)), f"{case} {name}: non-finite {k} ({bk.id})"
    for k, err in errors.items():
        limit = st.tol(bk, k)
        assert err <= limit, f"{case} {name} {k}: relative error {err:.3g} > {limit:.1g} ({bk.id})"
    return errors


# ============================================================================ the oracle itself
@pytest.mark.parametrize("name", ALL)
def test_oracle_vjps_match_finite_differences(name):
    """The textbook backward oracles above agree with finite differences of the reference
    forward (float64, small input), for the input and for every parameter."""
    spec = SPECS[name]
    rng = np.random.default_rng(3)
    shape = (3, 6, 4)
    # distinct magnitudes, none near 0: max and |x| stay differentiable within the steps
    x = rng.permutation(np.linspace(-2.0, 2.6, math.prod(shape))).reshape(shape)
    g = rng.standard_normal(shape)
    prm = spec.params(shape)
    eps = spec.eps if spec.eps is not None else 1e-6
    got = spec.backward(x, g, prm, eps)
    want = ref.fd_vjp(lambda z: spec.forward(z, prm, eps), x, g)
    assert rel_err(got["dx"], want) < 1e-8, name
    for k, v in prm.items():
        want_k = ref.fd_vjp(lambda p, k=k: spec.forward(x, {**prm, k: p}, eps), v, g)
        assert rel_err(got[k], want_k) < 1e-8, f"{name} d{k}"


# ============================================================================ stress sweeps
@pytest.mark.backends(*LIGHT)
@pytest.mark.dtypes("float16", "bfloat16")
@pytest.mark.parametrize("case", ["half ±300", "half ±6e4"])
@pytest.mark.parametrize("name", ALL)
def test_half_precision_large_values(bk, name, case):
    """Squares of the inputs overflow float16: statistics are taken in float32, and the
    result is the float64 answer rounded to the input dtype (to within bk.tol)."""
    check_stress(bk, case, name)


@pytest.mark.backends(*HEAVY)
@pytest.mark.dtypes("float16", "bfloat16")
@pytest.mark.parametrize("case", ["half ±300", "half ±6e4"])
@pytest.mark.parametrize("name", CORE)
def test_half_precision_large_values_core(bk, name, case):
    check_stress(bk, case, name)


@pytest.mark.backends(*LIGHT)
@pytest.mark.dtypes("float32", "float64")
@pytest.mark.parametrize("name", ALL)
def test_large_mean_unit_variance(bk, name):
    """Mean 1e4, variance 1: the two-pass variance keeps ~3 digits in float32 where a
    one-pass E[x²] − E[x]² would return 0 (tests/NUMERICS.md has the numbers)."""
    check_stress(bk, "mean 1e4", name)


@pytest.mark.backends(*HEAVY)
@pytest.mark.dtypes("float32", "float64")
@pytest.mark.parametrize("name", CORE)
def test_large_mean_unit_variance_core(bk, name):
    check_stress(bk, "mean 1e4", name)


def test_one_pass_variance_would_fail_the_large_mean_case():
    """The tolerance of the large-mean case (2e-3 in float32) is meaningful: the one-pass
    formula, in float32, is off by orders of magnitude more."""
    assert _one_pass_error() > 100 * 2e-3


@pytest.mark.backends(*LIGHT)
@pytest.mark.parametrize("name", ALL)
def test_constant_features_and_zero_vectors(bk, name):
    """Zero variance: batch/layer/group/instance norm return ``bias`` (to 1e-12 in float64),
    Lp and RMS norm map zero vectors to zero; every gradient is finite and matches the
    oracle (dx = weight·(g − mean g)/sqrt(eps) for the standardizing layers)."""
    errors = check_stress(bk, "constant", name)
    if name in CENTRED and bk.dtype_name == "float64":
        assert errors["y"] <= 1e-12


@pytest.mark.backends(*HEAVY)
@pytest.mark.parametrize("name", CORE)
def test_constant_features_and_zero_vectors_core(bk, name):
    check_stress(bk, "constant", name)


@pytest.mark.backends(*LIGHT)
@pytest.mark.dtypes("float32", "float64")
@pytest.mark.parametrize("name", ALL)
def test_denormal_inputs(bk, name):
    """Denormal-size inputs (1e-40 / 1e-310) are ordinary inputs: the Lp norm falls below
    eps so y = x/eps, batch norm of constant denormal data is bias, RMS norm is x/sqrt(eps)
    - all finite, with finite gradients, as the float64 oracle says."""
    check_stress(bk, "denormal", name)


@pytest.mark.backends(*HEAVY)
@pytest.mark.dtypes("float32", "float64")
@pytest.mark.parametrize("name", CORE)
def test_denormal_inputs_core(bk, name):
    """On JAX (XLA flushes denormals to zero on CPU) the result for the flushed input is
    accepted as well."""
    check_stress(bk, "denormal", name)


# ======================================================================= 16k-element reductions
LONG = {  # layer -> input shape with >= 16384 elements per statistic / vector
    "L2Norm": (2, 16384, 1),
    "L1Norm": (2, 1, 16384),
    "LayerNorm": (2, 1, 16384),
    "RMSNorm": (2, 1, 16384),
    "GroupNorm": (2, 6, 8192),  # 2 channels x 8192 per group
}


def _long_input(name):
    return 3.0 + np.random.default_rng(17).standard_normal(LONG[name])


def _check_long(bk, name):
    x64 = _long_input(name)
    # the case is meaningful: accumulating x² in float16 overflows (65504)
    x16 = x64.astype(np.float16)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.sum(x16 * x16, dtype=np.float16))
    res = run_layer(bk, name, x64)
    for k, err in res.errors.items():
        assert err <= bk.tol, f"{name} {k}: relative error {err:.3g} > {bk.tol} ({bk.id})"
    for k, v in res.got.items():
        assert np.all(np.isfinite(v)), f"{name}: non-finite {k}"


@pytest.mark.backends(*LIGHT)
@pytest.mark.dtypes("float16", "bfloat16")
@pytest.mark.parametrize("name", list(LONG))
def test_half_precision_16k_reductions(bk, name):
    """Reductions over 16k float16 elements (Σx² ≈ 1.6e5 > 65504, Σx ≈ 5e4 where float16
    steps are 32) are accumulated in float32. (Batch norm's is in tests/test_batch_norm.py.)"""
    _check_long(bk, name)


@pytest.mark.backends(*HEAVY)
@pytest.mark.dtypes("float16", "bfloat16")
@pytest.mark.parametrize("name", ["L2Norm", "LayerNorm"])
def test_half_precision_16k_reductions_core(bk, name):
    _check_long(bk, name)


# ============================================================================ NaN and inf
def _check_nonfinite(bk, name, kind):
    """One NaN (or +inf, with −inf elsewhere) in the input: every output that depends on it
    is non-finite, every other output is finite and equals the oracle."""
    spec = SPECS[name]
    rng = np.random.default_rng(23)
    x64 = rng.standard_normal(SHAPE) * 1.5 + 0.3
    hits = [(1, 2, 3)] if kind == "nan" else [(1, 2, 3), (3, 0, 4)]
    values = [math.nan] if kind == "nan" else [math.inf, -math.inf]
    for pos, v in zip(hits, values, strict=True):
        x64[pos] = v
    res = run_layer(bk, name, x64)
    # the affected set: where the float64 oracle on the input with NaN in those places is NaN
    x_nan = x64.copy()
    for pos in hits:
        x_nan[pos] = math.nan
    g = np.clip(np.random.default_rng(11).standard_normal(SHAPE), -4.0, 4.0)
    prm = {
        k: bk.to_numpy(bk.asarray(v, dtype=bk.param_dtype)) for k, v in spec.params(SHAPE).items()
    }
    with np.errstate(all="ignore"):
        xr, gr = bk.round(x_nan), bk.round(g)
        hit_y = np.isnan(spec.forward(xr, prm, _eps(bk, spec)))
        hit_b = {
            k: np.isnan(v)
            for k, v in spec.backward(xr, gr, prm, _eps(bk, spec)).items()
            if k != "scale"
        }
    hit = {"y": hit_y, **hit_b}
    assert hit_y.any() and not hit_y.all(), "the case must affect some outputs and not others"
    for k, got in res.got.items():
        affected = hit[k]
        want = _round(bk, res.want[k]) if k in ("y", "dx") else res.want[k]
        free = ~affected
        assert np.all(np.isfinite(got[free])), (
            f"{kind} in x poisoned {int(np.sum(~np.isfinite(got[free])))} unrelated {k} entries"
        )
        err = _err(got[free], want[free])
        assert err <= bk.tol, f"{k} outside the affected set: relative error {err:.3g}"
        if not affected.any():  # e.g. dbias = Σg does not depend on x
            continue
        if kind == "nan":
            assert np.all(np.isnan(got[affected])), f"NaN hidden in {k}: {got[affected]}"
        else:
            assert not np.all(np.isfinite(got[affected])), f"inf hidden in {k}"
    for pos in hits:  # the entry itself is never silently finite
        assert not np.isfinite(res.got["y"][pos]), f"y{pos} is finite for x{pos} = {x64[pos]}"


@pytest.mark.backends(*LIGHT)
@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("name", ALL)
def test_nan_and_inf_propagate_only_where_they_belong(bk, name, kind):
    _check_nonfinite(bk, name, kind)


@pytest.mark.backends(*HEAVY)
@pytest.mark.dtypes("float32")
@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("name", CORE)
def test_nan_and_inf_propagate_only_where_they_belong_core(bk, name, kind):
    _check_nonfinite(bk, name, kind)


# ============================================================================ empty arrays
#: layer -> [(input shape, mode, expected)]: "empty" (an empty output, zero parameter
#: gradients, finite and unchanged buffers) or ValueError (a statistic over zero values)
EMPTY = {
    **{
        name: [
            ((0, 6, 5), "train", "empty"),
            ((4, 6, 0), "train", "empty"),
            ((4, 0, 5), "train", "empty"),
        ]
        for name in ("L2Norm", "L1Norm", "LpNorm3", "LpNormInf", "LocalResponseNorm")
    },
    "BatchNorm": [
        ((4, 0, 5), "train", "empty"),  # no features: nothing to normalize
        ((0, 6, 5), "eval", "empty"),  # running statistics: an empty batch is fine
        ((4, 6, 0), "eval", "empty"),
        ((0, 6, 5), "train", ValueError),  # batch statistics of zero values
        ((4, 6, 0), "train", ValueError),
    ],
    "LayerNorm": [((0, 6, 5), "train", "empty")],
    "GroupNorm": [((0, 6, 5), "train", "empty"), ((4, 6, 0), "train", ValueError)],
    "InstanceNorm": [((0, 6, 5), "train", "empty"), ((4, 6, 0), "train", ValueError)],
    "RMSNorm": [((0, 6, 5), "train", "empty")],
}


def _check_empty(bk, name, shape, mode, expected):
    spec = SPECS[name]
    layer = spec.make(SHAPE if name == "BatchNorm" and mode == "eval" else shape)
    if mode == "eval":  # running statistics from one ordinary batch first
        layer.forward(bk.asarray(np.random.default_rng(1).standard_normal(SHAPE)))
        layer.eval()
    before = {k: bk.to_numpy(v).copy() for k, v in layer.buffers.items()}
    x = bk.asarray(np.zeros(shape))
    if expected is ValueError:
        with pytest.raises(ValueError, match=r"has 0 values per .* to compute statistics from"):
            layer.forward(x)
        return
    y = layer.forward(x)
    bk.check(y, shape, what="y")
    dx = layer.backward(bk.asarray(np.zeros(shape)))
    bk.check(dx, shape, what="dx")
    assert set(layer.grads) == set(layer.params)
    for k, v in layer.grads.items():
        got = bk.to_numpy(v)
        bk.check(v, tuple(layer.params[k].shape), bk.param_dtype, what=f"d{k}")
        np.testing.assert_array_equal(got, np.zeros(got.shape), err_msg=f"d{k} of an empty input")
    for k, v in layer.buffers.items():
        got = bk.to_numpy(v)
        assert np.all(np.isfinite(got)), f"buffer {k} became {got}"
        if mode == "eval":
            np.testing.assert_array_equal(got, before[k], err_msg=f"eval changed {k}")


@pytest.mark.backends(*LIGHT)
@pytest.mark.dtypes("float32")
@pytest.mark.parametrize(
    ("name", "shape", "mode", "expected"),
    [(n, *c) for n, cases in EMPTY.items() for c in cases],
    ids=[f"{n}-{c[0]}-{c[1]}" for n, cases in EMPTY.items() for c in cases],
)
def test_empty_inputs(bk, name, shape, mode, expected):
    """The empty-array decision of every layer, the same on every backend (the ValueError
    rows are also in tests/test_errors.py with their full messages)."""
    _check_empty(bk, name, shape, mode, expected)


@pytest.mark.backends(*HEAVY)
@pytest.mark.dtypes("float32")
@pytest.mark.parametrize(
    ("name", "shape", "mode", "expected"),
    [(n, *c) for n, cases in EMPTY.items() if n in CORE for c in cases],
    ids=[f"{n}-{c[0]}-{c[1]}" for n, cases in EMPTY.items() if n in CORE for c in cases],
)
def test_empty_inputs_core(bk, name, shape, mode, expected):
    _check_empty(bk, name, shape, mode, expected)


@pytest.mark.backends("dask")
@pytest.mark.dtypes("float32")
@pytest.mark.parametrize("p", [3.0, math.inf])
def test_empty_batch_lp_on_dask(bk, p):
    y = F.lp_normalize(bk.asarray(np.zeros((0, 6, 5))), p, axis=-1)
    assert bk.to_numpy(y).shape == (0, 6, 5)


# ============================================================================ properties
KINDS = ["lp", "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm", "lrn"]


def _axes_subset(draw, axes, ndim):
    chosen = sorted(draw(st.sets(st.sampled_from(axes), min_size=1, max_size=len(axes))))
    # spell some of them negative: the functions must normalize either spelling
    return tuple(a - ndim if draw(st.booleans()) else a for a in chosen)


@st.composite
def problems(draw):
    """A random functional call: kind, shape, axes and hyper-parameters (inputs come from a
    drawn seed, so that hypothesis shrinks the structure, not thousands of floats)."""
    kind = draw(st.sampled_from(KINDS))
    ndim = draw(st.integers(3 if kind == "instance_norm" else 2, 4))
    shape = tuple(draw(st.lists(st.integers(2, 5), min_size=ndim, max_size=ndim)))
    cfg: dict[str, Any] = {"kind": kind, "shape": shape, "seed": draw(st.integers(0, 2**31))}
    cfg["affine"] = draw(st.booleans()) and kind not in ("lp", "lrn")
    cfg["scale"] = draw(st.sampled_from([0.3, 1.0, 5.0]))
    cfg["shift"] = draw(st.sampled_from([0.0, 1.0, -3.0]))
    if kind == "lp":
        cfg["p"] = draw(st.sampled_from([1.0, 2.0, 3.0, math.inf]))
        whole = draw(st.integers(0, 4)) == 0  # axis=None: the whole array is one vector
        cfg["axis"] = None if whole else _axes_subset(draw, list(range(ndim)), ndim)
    elif kind == "batch_norm":
        cfg["axis"] = _axes_subset(draw, list(range(1, ndim)), ndim)
    elif kind in ("layer_norm", "rms_norm"):
        cfg["axis"] = _axes_subset(draw, list(range(ndim)), ndim)
    else:  # a channel axis
        cfg["axis"] = draw(st.sampled_from([1, -1] if ndim >= 3 else [1]))
        c = shape[cfg["axis"]]
        if kind == "group_norm":
            spatial = math.prod(shape) // (shape[0] * c)
            cfg["groups"] = draw(
                st.sampled_from(
                    [gr for gr in range(1, c + 1) if c % gr == 0 and c // gr * spatial >= 2]
                )
            )
        if kind == "lrn":
            cfg["size"] = draw(st.integers(1, 4))
    return cfg


def _oracle(cfg, x, g, w, b):
    """``(y, dx, dw, db, dx_scale)`` in float64 for problem ``cfg``."""
    kind, axis, nd = cfg["kind"], cfg.get("axis"), x.ndim
    if kind == "lp":
        ax = ref._axes(axis, nd)
        n = _lp_norm64(x, cfg["p"], ax)
        return (
            ref.lp_normalize(x, cfg["p"], axis),
            vjp_lp(x, g, cfg["p"], ax, 1e-12),
            None,
            None,
            float(np.max(np.abs(g) / np.maximum(n, 1e-12))),
        )
    if kind == "lrn":
        lrn = {"size": cfg["size"], "alpha": 0.4, "beta": 0.75, "k": 1.2}
        y = ref.local_response_norm(x, axis=axis, **lrn)
        return y, vjp_lrn(x, g, axis=axis % nd, **lrn), None, None, float(np.max(np.abs(g)))
    if kind in ("group_norm", "instance_norm"):
        c = axis % nd
        xm, gm = np.moveaxis(x, c, 1), np.moveaxis(g, c, 1)
        n, ch = xm.shape[:2]
        groups = cfg.get("groups", ch)
        xg, gg = xm.reshape(n, groups, ch // groups, -1), gm.reshape(n, groups, ch // groups, -1)
        wb = (np.ones(ch) if w is None else w).reshape(1, groups, ch // groups, 1)
        dx, dw, db = vjp_standardize(xg, gg, wb, (2, 3), (0, 3), 1e-5)
        if kind == "group_norm":
            y = ref.group_norm(x, groups, w, b, axis=axis)
        else:
            y = ref.instance_norm(x, w, b, axis=axis)
        s = np.sqrt(np.var(xg, axis=(2, 3), keepdims=True) + 1e-5)
        dxs = float(np.max(np.abs(gg * wb / s)))
        return y, np.moveaxis(dx.reshape(xm.shape), 1, c), dw.reshape(-1), db.reshape(-1), dxs
    ax = ref._axes(axis, nd)
    if kind == "batch_norm":
        stat = tuple(a for a in range(nd) if a not in ax)
        pax = stat
    else:
        stat, pax = ax, tuple(a for a in range(nd) if a not in ax)
    pshape = [x.shape[a] if a in ax else 1 for a in range(nd)]
    wb = np.ones(pshape) if w is None else np.reshape(w, pshape)
    if kind == "rms_norm":
        y = ref.rms_norm(x, w, axis=axis, eps=1e-6)
        dx, dw = vjp_rms(x, g, wb, stat, pax, 1e-6)
        r = 1.0 / np.sqrt(np.mean(x * x, axis=stat, keepdims=True) + 1e-6)
        return (
            y,
            dx,
            dw.reshape(np.shape(w)) if w is not None else None,
            None,
            float(np.max(np.abs(g * wb * r))),
        )
    if kind == "batch_norm":
        y = ref.batch_norm(x, w, b, axis=axis)
    else:
        y = ref.layer_norm(x, w, b, axis=axis)
    dx, dw, db = vjp_standardize(x, g, wb, stat, pax, 1e-5)
    s = np.sqrt(np.var(x, axis=stat, keepdims=True) + 1e-5)
    shape_w = None if w is None else np.shape(w)
    dw = None if w is None else dw.reshape(shape_w)
    db = None if w is None else db.reshape(shape_w)
    return y, dx, dw, db, float(np.max(np.abs(g * wb / s)))


def _call(cfg, x, g, w, b):
    """anynorm's functional forward and backward for problem ``cfg``: ``(y, dx, dw, db)``."""
    kind, axis = cfg["kind"], cfg["axis"]
    if kind == "lp":
        return (
            F.lp_normalize(x, cfg["p"], axis),
            F.lp_normalize_backward(g, x, cfg["p"], axis),
            None,
            None,
        )
    if kind == "lrn":
        lrn = {"alpha": 0.4, "beta": 0.75, "k": 1.2, "axis": axis}
        return (
            F.local_response_norm(x, cfg["size"], **lrn),
            F.local_response_norm_backward(g, x, cfg["size"], **lrn),
            None,
            None,
        )
    if kind == "rms_norm":
        dx, dw = F.rms_norm_backward(g, x, w, axis=axis, eps=1e-6)
        return F.rms_norm(x, w, axis=axis, eps=1e-6), dx, dw, None
    if kind == "group_norm":
        y = F.group_norm(x, cfg["groups"], w, b, axis=axis)
        return (y, *F.group_norm_backward(g, x, cfg["groups"], w, axis=axis))
    fwd = {"batch_norm": F.batch_norm, "layer_norm": F.layer_norm, "instance_norm": F.instance_norm}
    bwd = {
        "batch_norm": F.batch_norm_backward,
        "layer_norm": F.layer_norm_backward,
        "instance_norm": F.instance_norm_backward,
    }
    return (fwd[kind](x, w, b, axis=axis), *bwd[kind](g, x, w, axis=axis))


def _param_shape(cfg):
    shape, nd, kind = cfg["shape"], len(cfg["shape"]), cfg["kind"]
    if kind in ("group_norm", "instance_norm"):
        return (shape[cfg["axis"]],)
    return tuple(shape[a] for a in ref._axes(cfg["axis"], nd))


def _grouped(cfg, a):
    """``a`` arranged so that each statistic group of problem ``cfg`` is one slice over the
    returned axes."""
    kind, nd = cfg["kind"], a.ndim
    if kind == "batch_norm":
        return a, tuple(i for i in range(nd) if i not in ref._axes(cfg["axis"], nd))
    if kind in ("layer_norm", "rms_norm", "lp"):
        return a, ref._axes(cfg["axis"], nd)
    am = np.moveaxis(a, cfg["axis"] % nd, 1)
    n, ch = am.shape[:2]
    groups = cfg.get("groups", ch)
    return am.reshape(n, groups, ch // groups, -1), (2, 3)


def _invariants(cfg, x, y, tol):
    """Output invariants of the forms without weight and bias: unit norm; zero mean and
    variance σ²/(σ² + eps) per statistic group; mean(y²) = ms/(ms + eps) for RMS norm."""
    kind = cfg["kind"]
    if kind == "lrn":
        return
    xg, stat = _grouped(cfg, x)
    yg, _ = _grouped(cfg, y)
    if kind == "lp":
        norms = _lp_norm64(yg, cfg["p"], stat)
        np.testing.assert_allclose(norms, 1.0, rtol=10 * tol, err_msg="unit norm")
        return
    if kind == "rms_norm":
        ms = np.mean(xg**2, axis=stat)
        np.testing.assert_allclose(np.mean(yg**2, axis=stat), ms / (ms + 1e-6), rtol=10 * tol)
        return
    var = np.var(xg, axis=stat)
    scale = max(1.0, float(np.max(np.abs(yg))))
    assert np.max(np.abs(np.mean(yg, axis=stat))) <= 10 * tol * scale, "zero mean"
    np.testing.assert_allclose(
        np.mean(yg**2, axis=stat),
        var / (var + 1e-5),
        rtol=10 * tol,
        atol=10 * tol,
        err_msg="variance σ²/(σ² + eps)",
    )


@pytest.mark.backends("numpy", "array_api_strict", "torch")
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(cfg=problems())
def test_properties_against_the_oracle(bk, cfg):
    """Random shapes, axes, layers and hyper-parameters on the case's dtype: the forward and
    the explicit backward agree with the float64 oracle; outputs satisfy their invariants;
    no input is modified."""
    rng = np.random.default_rng(cfg["seed"])
    shape = cfg["shape"]
    x64 = rng.standard_normal(shape) * cfg["scale"] + cfg["shift"]
    g64 = rng.standard_normal(shape)
    x, g = bk.asarray(x64), bk.asarray(g64)
    w = b = None
    if cfg["affine"]:
        pshape = _param_shape(cfg)
        w = bk.asarray(rng.uniform(0.5, 1.5, pshape), dtype=bk.param_dtype)
        b = (
            None
            if cfg["kind"] == "rms_norm"
            else bk.asarray(rng.standard_normal(pshape), dtype=bk.param_dtype)
        )
    given_arrays = {"x": x, "dy": g, "weight": w, "bias": b}
    before = {k: bk.to_numpy(v).copy() for k, v in given_arrays.items() if v is not None}
    y, dx, dw, db = _call(cfg, x, g, w, b)
    bk.check(y, shape, what="y")
    bk.check(dx, shape, what="dx")
    w64 = None if w is None else bk.to_numpy(w)
    b64 = None if b is None else bk.to_numpy(b)
    ry, rdx, rdw, rdb, dx_scale = _oracle(cfg, bk.to_numpy(x), bk.to_numpy(g), w64, b64)
    # random reductions up to 625 elements: a little room over bk.tol, plus the condition
    # number of centring, |μ|/σ of the worst group times the compute dtype's epsilon (two
    # values 0.01 apart around -3 lose log10(300) digits in any implementation)
    tol = 2 * bk.tol
    if cfg["kind"] in ("batch_norm", "layer_norm", "group_norm", "instance_norm"):
        xg, stat = _grouped(cfg, bk.to_numpy(x))
        kappa = float(
            np.max(np.abs(np.mean(xg, axis=stat)) / np.sqrt(np.var(xg, axis=stat) + 1e-5))
        )
        tol += 8 * _compute_eps(bk) * kappa
    assert _err(bk.to_numpy(y), _round(bk, ry)) <= tol, f"y {cfg}"
    err_dx = _err(bk.to_numpy(dx), _round(bk, rdx), floor=dx_scale)
    assert err_dx <= tol, f"dx: relative error {err_dx:.3g} {cfg}"
    if w is not None and cfg["kind"] not in ("lp", "lrn"):
        bk.check(dw, tuple(w.shape), bk.param_dtype, what="dweight")
        g_scale = float(np.max(np.abs(bk.to_numpy(g)))) * math.prod(shape) / math.prod(w.shape)
        assert _err(bk.to_numpy(dw), rdw, floor=g_scale) <= tol, f"dweight {cfg}"
        if rdb is not None and db is not None:
            assert _err(bk.to_numpy(db), rdb, floor=g_scale) <= tol, f"dbias {cfg}"
    if not cfg["affine"]:
        _invariants(cfg, bk.to_numpy(x), bk.to_numpy(y), bk.tol)
    for k, v in given_arrays.items():
        if v is not None:
            np.testing.assert_array_equal(bk.to_numpy(v), before[k], err_msg=f"{k} was modified")


# ============================================================================ no silent loss
def _state_for(bk, name):
    """Parameters (and, for batch norm, running statistics) to load: arrays of the case."""
    spec = SPECS[name]
    rng = np.random.default_rng(29)
    state = {k: bk.asarray(v, dtype=bk.param_dtype) for k, v in spec.params(SHAPE).items()}
    if name == "BatchNorm":
        state["running_mean"] = bk.asarray(rng.standard_normal(6), dtype=bk.param_dtype)
        state["running_var"] = bk.asarray(rng.uniform(0.5, 2.0, 6), dtype=bk.param_dtype)
    return state


def _train_a_little(bk, name, state):
    """Build layer ``name``, load ``state``, and run two training steps (forward, backward,
    SGD update with momentum) and one evaluation forward. Returns the layer, what was passed
    in (``x``, ``dy`` and the state) and everything that came out."""
    rng = np.random.default_rng(31)
    layer = SPECS[name].make(SHAPE)
    if state:
        layer.to(bk.xp, device=bk.device, dtype=bk.param_dtype)
        layer.load_state_dict(state, strict=False)
    handed_out = dict(layer.state_dict())  # arrays state_dict() returned before the updates
    inputs = {
        "x": bk.asarray(rng.standard_normal(SHAPE)),
        "dy": bk.asarray(rng.standard_normal(SHAPE)),
    }
    outputs = {}
    for step in range(2):
        outputs[f"y{step}"] = layer.forward(inputs["x"])
        outputs[f"dx{step}"] = layer.backward(inputs["dy"])
        outputs.update({f"d{k}{step}": v for k, v in layer.grads.items()})
        layer.update(lr=0.1, momentum=0.9, decay=0.01)
    layer.eval()
    outputs["y_eval"] = layer.forward(inputs["x"])
    outputs.update({f"state {k}": v for k, v in layer.state_dict().items()})
    return layer, {**inputs, **{f"given {k}": v for k, v in state.items()}}, handed_out, outputs


@pytest.mark.backends("numpy", "array_api_strict", "torch")
@pytest.mark.parametrize("name", ALL)
def test_nothing_passed_in_is_modified(bk, name):
    """Inputs, upstream gradients and loaded state are never written to; arrays handed out by
    state_dict() keep their values after updates (updates rebind, never write in place)."""
    state = _state_for(bk, name)
    snap = {k: bk.to_numpy(v).copy() for k, v in state.items()}
    rng = np.random.default_rng(31)
    x0, dy0 = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    _, given, handed_out, _ = _train_a_little(bk, name, state)
    handed_snap = {k: bk.to_numpy(v).copy() for k, v in handed_out.items()}
    np.testing.assert_array_equal(bk.to_numpy(given["x"]), bk.round(x0), err_msg="x modified")
    np.testing.assert_array_equal(bk.to_numpy(given["dy"]), bk.round(dy0), err_msg="dy modified")
    for k, v in state.items():
        np.testing.assert_array_equal(bk.to_numpy(v), snap[k], err_msg=f"loaded {k} modified")
    # the state_dict() taken right after loading still equals the loaded values
    for k, v in handed_out.items():
        np.testing.assert_array_equal(bk.to_numpy(v), handed_snap[k], err_msg=f"{k} written")
        if k in snap:
            np.testing.assert_array_equal(handed_snap[k], snap[k], err_msg=f"{k} not loaded")


def _shares_memory(bk, a, b) -> bool:
    if bk.backend == "numpy":
        return bool(np.shares_memory(a, b))
    if a.numel() == 0 or b.numel() == 0:  # torch
        return False
    sa, sb = a.untyped_storage(), b.untyped_storage()
    a0, b0 = sa.data_ptr(), sb.data_ptr()
    return a0 < b0 + sb.nbytes() and b0 < a0 + sa.nbytes()


@pytest.mark.backends("numpy", "torch")
@pytest.mark.parametrize("name", ALL)
def test_outputs_never_alias_inputs(bk, name):
    """No output, gradient, parameter or buffer shares memory with ``x``, ``dy`` or a loaded
    state array: writing into any of them later cannot change the others."""
    state = _state_for(bk, name)
    _, given, _, outputs = _train_a_little(bk, name, state)
    for ko, out in outputs.items():
        for ki, inp in given.items():
            assert not _shares_memory(bk, out, inp), f"{ko} aliases {ki}"


@pytest.mark.backends("numpy", "torch")
@pytest.mark.dtypes("float32", "float64")  # half inputs are cast, so there is a copy
def test_layer_norm_over_all_axes_bias_gradient_does_not_alias_dy(bk):
    rng = np.random.default_rng(37)
    x, dy = bk.asarray(rng.standard_normal((6, 5))), bk.asarray(rng.standard_normal((6, 5)))
    w = bk.asarray(np.ones((6, 5)), dtype=bk.param_dtype)
    _, _, db = F.layer_norm_backward(dy, x, w, axis=None)
    layer = anynorm.LayerNorm((6, 5))
    layer.forward(x)
    layer.backward(dy)
    assert not _shares_memory(bk, db, dy), "functional dbias aliases dy"
    assert not _shares_memory(bk, layer.grads["bias"], dy), "grads['bias'] aliases dy"


# ============================================================================ torch autograd
def _graph_size(torch, t) -> int:
    """Number of autograd nodes reachable from ``t.grad_fn``."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo.extend(nxt for nxt, _ in fn.next_functions)
    return len(seen)


def _live_tensors(torch) -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _sgd_loop(torch, layer, x, g, steps):
    for _ in range(steps):
        layer.forward(x)
        dx = layer.backward(g)
        layer.update(lr=1e-3, momentum=0.9)
    return dx


def test_torch_explicit_backward_under_no_grad_keeps_no_graph(torch_oracle):
    """With ``x.requires_grad_(True)``, 1000 forward + backward + update steps under
    ``torch.no_grad()``: dx and every parameter, gradient and buffer have no grad_fn, and
    the number of live tensors does not grow."""
    torch = torch_oracle
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 4, generator=gen).requires_grad_(True)
    g = torch.randn(8, 3, 4, generator=gen)
    layer = anynorm.BatchNorm(3)
    with torch.no_grad():
        dx = _sgd_loop(torch, layer, x, g, 10)
        live = _live_tensors(torch)
        dx = _sgd_loop(torch, layer, x, g, 990)
    assert dx.grad_fn is None
    for k, v in {**layer.params, **layer.grads, **layer.buffers}.items():
        assert v.grad_fn is None and not v.requires_grad, k
    assert _live_tensors(torch) <= live, "live tensors grew over 990 steps"
    assert x.grad is None  # nothing was propagated into x


def test_torch_explicit_backward_in_grad_mode_keeps_no_graph(torch_oracle):
    torch = torch_oracle
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 4, generator=gen).requires_grad_(True)
    g = torch.randn(8, 3, 4, generator=gen)
    layer = anynorm.BatchNorm(3)
    dx = _sgd_loop(torch, layer, x, g, 10)
    sizes = {k: _graph_size(torch, v) for k, v in {**layer.params, **layer.buffers}.items()}
    live = _live_tensors(torch)
    dx = _sgd_loop(torch, layer, x, g, 290)
    assert dx.grad_fn is None, "the explicit backward recorded an autograd graph"
    grown = {
        k: (sizes[k], _graph_size(torch, v))
        for k, v in {**layer.params, **layer.buffers}.items()
        if _graph_size(torch, v) > sizes[k]
    }
    assert not grown, f"autograd graphs behind the layer state grew (10 → 300 steps): {grown}"
    assert _live_tensors(torch) <= live, "live tensors grew"


# ============================================================================ the report
def _one_pass_error() -> float:
    """Relative error of float32 layer norm with the one-pass variance on the large-mean
    input (what the two-pass variance avoids)."""
    x = stress_input(None, "mean 1e4", "LayerNorm").astype(np.float32)
    mean = x.mean(axis=(1, 2), keepdims=True, dtype=np.float32)
    var1 = (x * x).mean(axis=(1, 2), keepdims=True, dtype=np.float32) - mean * mean
    y1 = (x - mean) / np.sqrt(np.maximum(var1, 0) + np.float32(1e-5))
    return rel_err(y1, ref.layer_norm(x.astype(np.float64), axis=(1, 2)))


def report() -> str:
    """The worst relative error per stress case, dtype and backend (over every layer, every
    output - y, dx, dweight, dbias - and every device), as a markdown table."""
    import conftest

    worst: dict[tuple[str, str], dict[str, tuple[float, str]]] = {}
    raw: dict[tuple[str, str], dict[str, float]] = {}
    tolerance: dict[tuple[str, str], float] = {}
    backends = []
    for backend in conftest.ALL_BACKENDS:
        try:
            cases = conftest._cases_for(backend)
        except ImportError:
            continue
        backends.append(backend)
        for bk in cases:
            jobs = [(c, n) for c, st in STRESS.items() if bk.dtype_name in st.dtypes for n in ALL]
            if bk.half:
                jobs += [("16k elements", n) for n in LONG]
            for case, name in jobs:
                if case == "16k elements":
                    res = run_layer(bk, name, _long_input(name))
                    errors = res.errors
                    tol = {k: bk.tol for k in errors}
                else:
                    errors, res = stress_errors(bk, case, name)
                    tol = {k: STRESS[case].tol(bk, k) for k in errors}
                key = (case, bk.dtype_name)
                cell = raw.setdefault(key, {})
                cell[backend] = max(cell.get(backend, 0.0), *res.raw.values())
                tolerance[key] = max(tolerance.get(key, 0.0), *tol.values())
                for k, err in errors.items():
                    cell = worst.setdefault(key, {}).get(backend, (-1.0, ""))
                    if err > cell[0]:
                        worst[key][backend] = (err, f"{name} {k}")
    order = [*STRESS, "16k elements"]
    dorder = ["float64", "float32", "float16", "bfloat16"]
    lines = [
        "| case | dtype | tolerance | " + " | ".join(backends) + " |",
        "|---|---|---|" + "---|" * len(backends),
    ]
    for case, dt in sorted(worst, key=lambda k: (order.index(k[0]), dorder.index(k[1]))):
        cells = []
        for b in backends:
            err, where = worst[(case, dt)].get(b, (None, ""))
            cells.append("n/a" if err is None else f"{err:.1e} ({where})")
        lines.append(f"| {case} | {dt} | {tolerance[(case, dt)]:.0e} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "y and dx against the *unrounded* float64 oracle (what a user sees, including the "
        "final rounding to the input dtype):",
        "",
        "| case | dtype | " + " | ".join(backends) + " |",
        "|---|---|" + "---|" * len(backends),
    ]
    for case, dt in sorted(raw, key=lambda k: (order.index(k[0]), dorder.index(k[1]))):
        cells = [
            "n/a" if b not in raw[(case, dt)] else f"{raw[(case, dt)][b]:.1e}" for b in backends
        ]
        lines.append(f"| {case} | {dt} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"For comparison, float32 layer norm with the one-pass variance on the `mean 1e4` "
        f"input: relative error {_one_pass_error():.1e}."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
