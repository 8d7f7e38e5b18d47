"""The self-check behind ``python -m anynorm``.

For every array backend and device importable here, and every anynorm layer, it runs a
forward and a backward pass on random data and compares them with the float64 NumPy
references of :mod:`anynorm._reference`: the forward with the textbook formula, the backward
(input gradient and parameter gradients) with finite differences of that formula
(:func:`anynorm._reference.fd_vjp`) for a random upstream gradient. It also times one
forward+backward call per layer on a medium-sized input. The versions printed first are what
a bug report needs.

Nothing here is imported by ``import anynorm``; numpy and the backends are imported lazily
inside the functions, so a missing NumPy gives a clear message instead of a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from . import _compat

if TYPE_CHECKING:
    import numpy as np

__all__ = ["BACKENDS", "TOLERANCES", "main"]

#: every backend the self-check knows, in the order of the table
BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "dask", "cupy")
#: relative tolerance (max |got − ref| / max |ref|) per dtype; the finite-difference
#: reference itself is accurate to about 1e-10
TOLERANCES = {"float64": 1e-8, "float32": 1e-4}
#: timed calls per layer (after one warm-up call); the median is reported. Slow calls stop
#: after MIN_REPEATS once TIME_BUDGET_S seconds are spent, to keep the whole run short.
REPEATS = 5
MIN_REPEATS = 3
TIME_BUDGET_S = 0.4
#: learning rate of the training step before the evaluation-mode batch-norm check
LEARNING_RATE = 0.1
#: batch norm's default momentum (PyTorch's convention), used by the step reference
BN_MOMENTUM = 0.1
SEED = 20261121

#: the command to install the reference's dependency
INSTALL_NUMPY = 'pip install "anynorm[numpy]"'

Array = Any
State = dict[str, Any]


# ----------------------------------------------------------------------------- targets
class Unavailable(Exception):
    """A backend that is not installed, or installed but unusable here (the reason)."""


@dataclass
class Target:
    """One (backend, device) to check, with the floating dtype used there.

    Parameters
    ----------
    backend : str
        One of :data:`BACKENDS`.
    device_name : str
        The device as shown in the table.
    xp : namespace
        The array namespace (array-api-compat's wrapper where there is one).
    device : object
        The device object arrays are created on.
    dtype_name : str
        ``"float64"`` where the device has it, else ``"float32"``.
    """

    backend: str
    device_name: str
    xp: Any = field(repr=False)
    device: Any = field(repr=False)
    dtype_name: str = "float64"

    @property
    def dtype(self) -> Any:
        return getattr(self.xp, self.dtype_name)

    @property
    def tol(self) -> float:
        return TOLERANCES[self.dtype_name]

    def asarray(self, a: np.ndarray, batch_chunks: bool = False) -> Array:
        """A NumPy float64 array as an array of this backend, on its device, in its dtype.

        Dask arrays get several chunks along every axis, so that reductions cross chunk
        borders; with ``batch_chunks`` only along the first axis (4 chunks, as data is
        usually chunked; used for the timings)."""
        host = a.astype(self.dtype_name)
        if self.backend == "numpy":
            return host
        if self.backend == "dask":
            import dask.array as da

            if batch_chunks:
                chunks = (max(1, host.shape[0] // 4), *host.shape[1:])
            else:
                chunks = tuple(max(1, s // 2) for s in host.shape)
            return da.from_array(host, chunks=chunks)
        if self.backend == "torch":
            import torch

            return torch.asarray(host, device=self.device)
        if self.backend == "jax":
            import jax

            return jax.device_put(host, self.device)
        if self.backend == "cupy":
            import cupy

            with self.device:
                return cupy.asarray(host)
        return self.xp.asarray(host, device=self.device)

    def sync(self, *arrays: Array) -> None:
        """Wait until ``arrays`` are computed (lazy and asynchronous backends)."""
        if self.backend == "dask":
            import dask

            dask.compute(*arrays)
        elif self.backend == "jax":
            import jax

            jax.block_until_ready(arrays)
        elif self.backend == "torch" and self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        elif self.backend == "cupy":
            self.device.synchronize()


def _float_dtype_name(xp: Any, device: Any) -> str:
    """``"float64"`` where ``device`` supports it, else ``"float32"``."""
    info = getattr(xp, "__array_namespace_info__", None)
    if info is None:
        return "float64"
    try:
        names = info().dtypes(device=device, kind="real floating")
    except Exception:  # an info object that rejects device=: assume float64 exists
        return "float64"
    return "float64" if "float64" in names else "float32"


def _targets_for(backend: str) -> list[Target]:
    """Import ``backend`` and list its devices; :class:`Unavailable` with the reason if not."""
    try:
        return _make_targets(backend)
    except Unavailable:
        raise
    except ImportError as exc:
        raise Unavailable(f"not installed ({exc})") from exc
    except Exception as exc:  # installed but broken here (no driver, bad build, ...)
        raise Unavailable(f"cannot be used here: {type(exc).__name__}: {exc}") from exc


def _make_targets(backend: str) -> list[Target]:
    out: list[Target] = []

    def add(xp: Any, dev: Any, name: str) -> None:
        out.append(Target(backend, name, xp, dev, _float_dtype_name(xp, dev)))

    if backend == "numpy":
        import numpy

        add(_compat.namespace_of(numpy), "cpu", "cpu")
    elif backend == "array_api_strict":
        xp = importlib.import_module("array_api_strict")
        for name in ("CPU_DEVICE", "device1", "no_float64"):
            dev = xp.Device(name)
            if dev in xp.__array_namespace_info__().devices():
                add(xp, dev, name)
    elif backend == "torch":
        import torch

        xp = _compat.namespace_of(torch)
        add(xp, torch.device("cpu"), "cpu")
        if torch.cuda.is_available():
            add(xp, torch.device("cuda", 0), "cuda:0")
    elif backend == "jax":
        import jax

        # float64 needs x64 mode; it must be on before any jax array is created
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as xp

        dev = jax.devices()[0]
        add(xp, dev, f"{dev.platform}:{dev.id}")
    elif backend == "dask":
        import dask.array

        add(_compat.namespace_of(dask.array), "cpu", "cpu")
    elif backend == "cupy":
        import cupy

        xp = _compat.namespace_of(cupy)

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise Unavailable("installed, but no CUDA device is visible")
        add(xp, cupy.cuda.Device(0), "cuda:0")
    else:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    return out


# ----------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class Spec:
    """How to build, feed and check one layer (in one mode).

    Parameters
    ----------
    label : str
        Row label; starts with the layer's class name.
    small : tuple of int
        Input shape of the correctness check (small: the reference gradient costs four
        reference forwards per input element).
    medium : tuple of int
        Input shape of the timing.
    make : callable
        ``make(shape)`` returns a fresh layer for inputs of ``shape``.
    state : callable
        ``state(shape, rng)`` returns the random ``load_state_dict`` entries as NumPy
        float64 arrays (or Python ints).
    ref : callable
        ``ref(x, state)``: the float64 reference forward with the parameters in ``state``
        (which also holds the checked dtype's name under ``"_dtype"``).
    params : tuple of str
        The trainable parameters whose gradients are checked.
    step : callable, optional
        ``step(x0, g0, state)``: the state after one training step (forward on ``x0``,
        backward with ``g0``, ``update(lr=LEARNING_RATE)``), computed by the reference. Given:
        the layer takes that step, switches to evaluation mode, and is checked there.
    """

    label: str
    small: tuple[int, ...]
    medium: tuple[int, ...]
    make: Callable[[tuple[int, ...]], Any]
    state: Callable[[tuple[int, ...], Any], State]
    ref: Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]
    params: tuple[str, ...] = ()
    step: Callable[[np.ndarray, np.ndarray, Mapping[str, Any]], State] | None = None


def _no_state(shape: tuple[int, ...], rng: Any) -> State:
    return {}


def _affine_state(pshape: tuple[int, ...], rng: Any, bias: bool = True) -> State:
    """Random weight around 1 and bias around 0, never exactly ones or zeros."""
    out: State = {"weight": rng.uniform(0.5, 1.5, size=pshape)}
    if bias:
        out["bias"] = rng.normal(0.0, 0.5, size=pshape)
    return out


def _bn_state(shape: tuple[int, ...], rng: Any) -> State:
    c = (shape[1],)
    return {
        **_affine_state(c, rng),
        "running_mean": rng.normal(0.0, 0.5, size=c),
        "running_var": rng.uniform(0.5, 2.0, size=c),
        "num_batches_tracked": 0,
    }


def _specs() -> list[Spec]:
    """Every layer of anynorm, in the order of the table."""
    import numpy as np

    import anynorm
    from anynorm import _reference as R

    flat2, flat2_t = (4, 6), (256, 1024)
    conv4, conv4_t = (2, 4, 3, 3), (16, 64, 16, 16)
    lrn = {"size": 4, "alpha": 0.5, "beta": 0.75, "k": 1.5}

    def bn_train(x, s):
        return R.batch_norm(x, s["weight"], s["bias"], axis=1)

    def bn_eval(x, s):
        return R.batch_norm(
            x, s["weight"], s["bias"], axis=1, mean=s["running_mean"], var=s["running_var"]
        )

    def bn_step(x0, g0, s):
        """PyTorch's rule: running stats with momentum (unbiased variance), then SGD."""
        red = tuple(a for a in range(x0.ndim) if a != 1)
        grads = _fd_param_grads(bn_train, x0, g0, s, ("weight", "bias"))
        return {
            **s,
            "weight": s["weight"] - LEARNING_RATE * grads["weight"],
            "bias": s["bias"] - LEARNING_RATE * grads["bias"],
            "running_mean": (1 - BN_MOMENTUM) * s["running_mean"] + BN_MOMENTUM * x0.mean(axis=red),
            "running_var": (1 - BN_MOMENTUM) * s["running_var"]
            + BN_MOMENTUM * x0.var(axis=red, ddof=1),
            "num_batches_tracked": 1,
        }

    def groups(shape):
        return min(8, shape[1] // 2)

    return [
        Spec(
            "L1Norm",
            flat2,
            flat2_t,
            lambda s: anynorm.L1Norm(axis=-1),
            _no_state,
            lambda x, s: R.lp_normalize(x, 1.0, axis=-1),
        ),
        Spec(
            "L2Norm",
            flat2,
            flat2_t,
            lambda s: anynorm.L2Norm(axis=-1),
            _no_state,
            lambda x, s: R.lp_normalize(x, 2.0, axis=-1),
        ),
        Spec(
            "LpNorm(p=3)",
            flat2,
            flat2_t,
            lambda s: anynorm.LpNorm(p=3.0, axis=-1),
            _no_state,
            lambda x, s: R.lp_normalize(x, 3.0, axis=-1),
        ),
        Spec(
            "BatchNorm (train)",
            conv4,
            conv4_t,
            lambda s: anynorm.BatchNorm(s[1]),
            _bn_state,
            bn_train,
            ("weight", "bias"),
        ),
        Spec(
            "BatchNorm (eval)",
            conv4,
            conv4_t,
            lambda s: anynorm.BatchNorm(s[1]),
            _bn_state,
            bn_eval,
            ("weight", "bias"),
            step=bn_step,
        ),
        Spec(
            "LayerNorm",
            conv4,
            conv4_t,
            lambda s: anynorm.LayerNorm(s[-2:]),
            lambda s, rng: _affine_state(s[-2:], rng),
            lambda x, s: R.layer_norm(x, s["weight"], s["bias"], axis=(-2, -1)),
            ("weight", "bias"),
        ),
        Spec(
            "GroupNorm",
            conv4,
            conv4_t,
            lambda s: anynorm.GroupNorm(groups(s), s[1]),
            lambda s, rng: _affine_state((s[1],), rng),
            lambda x, s: R.group_norm(x, groups(x.shape), s["weight"], s["bias"]),
            ("weight", "bias"),
        ),
        Spec(
            "InstanceNorm",
            conv4,
            conv4_t,
            lambda s: anynorm.InstanceNorm(s[1], affine=True),
            lambda s, rng: _affine_state((s[1],), rng),
            lambda x, s: R.instance_norm(x, s["weight"], s["bias"]),
            ("weight", "bias"),
        ),
        Spec(
            "RMSNorm",
            flat2,
            flat2_t,
            lambda s: anynorm.RMSNorm(s[-1]),
            lambda s, rng: _affine_state(s[-1:], rng, bias=False),
            # eps=None in the layer: the machine epsilon of the dtype, as torch does
            lambda x, s: R.rms_norm(x, s["weight"], eps=float(np.finfo(s["_dtype"]).eps)),
            ("weight",),
        ),
        Spec(
            "LocalResponseNorm",
            conv4,
            conv4_t,
            lambda s: anynorm.LocalResponseNorm(
                lrn["size"], alpha=lrn["alpha"], beta=lrn["beta"], k=lrn["k"]
            ),
            _no_state,
            lambda x, s: R.local_response_norm(x, **lrn),
        ),
    ]


def _layer_classes() -> list[str]:
    """Names of the layer classes anynorm exports."""
    import anynorm

    return [
        name
        for name in anynorm.__all__
        if isinstance(getattr(anynorm, name), type)
        and issubclass(getattr(anynorm, name), anynorm.Layer)
        and getattr(anynorm, name) is not anynorm.Layer
    ]


# ----------------------------------------------------------------------------- reference
def _fd_param_grads(
    f: Callable[[np.ndarray, Mapping[str, Any]], np.ndarray],
    x: np.ndarray,
    g: np.ndarray,
    state: Mapping[str, Any],
    names: Sequence[str],
) -> dict[str, np.ndarray]:
    """Finite-difference ``Jᵀg`` of ``f(x, state)`` with respect to each parameter."""
    from anynorm._reference import fd_vjp

    out = {}
    for name in names:

        def fp(p, name=name):
            return f(x, {**state, name: p})

        out[name] = fd_vjp(fp, state[name], g)
    return out


@dataclass
class Expected:
    """Inputs, state and reference results of one layer check in one dtype."""

    x: np.ndarray
    g: np.ndarray
    state: State
    y: np.ndarray
    dx: np.ndarray
    grads: dict[str, np.ndarray]
    x0: np.ndarray | None = None
    g0: np.ndarray | None = None


def _rounded(a: np.ndarray, dtype_name: str) -> np.ndarray:
    """``a`` rounded to ``dtype_name`` and back to float64 (what the backend will see)."""
    import numpy as np

    return a.astype(dtype_name).astype(np.float64)


def _random_input(rng: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Normal data pushed away from 0 (L1's |x| has a kink there that finite differences
    would straddle)."""
    import numpy as np

    z = rng.standard_normal(shape)
    return z + 0.25 * np.sign(z)


def _expected(spec: Spec, index: int, dtype_name: str) -> Expected:
    """The reference results for ``spec`` on data rounded to ``dtype_name``."""
    import numpy as np

    from anynorm._reference import fd_vjp

    rng = np.random.default_rng([SEED, index])
    shape = spec.small
    x = _rounded(_random_input(rng, shape), dtype_name)
    g = _rounded(rng.standard_normal(shape), dtype_name)
    state = {
        k: (_rounded(v, dtype_name) if isinstance(v, np.ndarray) else v)
        for k, v in spec.state(shape, rng).items()
    }
    x0 = g0 = None
    ref_state: State = {**state, "_dtype": dtype_name}
    if spec.step is not None:
        x0 = _rounded(_random_input(rng, shape) * 1.5 + 0.3, dtype_name)
        g0 = _rounded(rng.standard_normal(shape), dtype_name)
        ref_state = {**spec.step(x0, g0, ref_state), "_dtype": dtype_name}
    y = spec.ref(x, ref_state)
    dx = fd_vjp(lambda z: spec.ref(z, ref_state), x, g)
    grads = _fd_param_grads(spec.ref, x, g, ref_state, spec.params)
    return Expected(x, g, state, y, dx, grads, x0, g0)


def rel_err(got: Any, ref: np.ndarray) -> float:
    """``max|got − ref| / max|ref|``; ``inf`` for a shape mismatch or a non-finite value."""
    import numpy as np

    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return math.inf
    if ref.size == 0:
        return 0.0
    diff = float(np.max(np.abs(got - ref)))
    if not math.isfinite(diff):
        return math.inf
    scale = float(np.max(np.abs(ref)))
    return diff / scale if scale > 0 else diff


# ----------------------------------------------------------------------------- checks
@dataclass
class Row:
    """One line of the table."""

    target: Target
    label: str
    fwd: float = math.nan
    bwd: float = math.nan
    ms: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _load(layer: Any, target: Target, state: Mapping[str, Any], batch_chunks: bool = False) -> None:
    import numpy as np

    if state:
        layer.load_state_dict(
            {
                k: target.asarray(v, batch_chunks) if isinstance(v, np.ndarray) else v
                for k, v in state.items()
            }
        )


def _same_kind(what: str, got: Array, like: Array, shape: tuple[int, ...]) -> list[str]:
    """Problems with ``got``'s namespace, dtype, device or shape (compared with ``like``)."""
    problems = []
    if _compat.array_namespace(got) is not _compat.array_namespace(like):
        problems.append(f"{what} is a {type(got).__name__}, not a {type(like).__name__}")
    if got.dtype != like.dtype:
        problems.append(f"{what} has dtype {got.dtype}, expected {like.dtype}")
    if _compat.device(got) != _compat.device(like):
        problems.append(
            f"{what} is on device {_compat.device(got)}, expected {_compat.device(like)}"
        )
    if tuple(got.shape) != tuple(shape):
        problems.append(f"{what} has shape {tuple(got.shape)}, expected {tuple(shape)}")
    return problems


def _check(spec: Spec, exp: Expected, target: Target) -> Row:
    """Forward and backward of ``spec`` on ``target`` against the reference ``exp``."""
    from anynorm._compat import to_numpy

    row = Row(target, spec.label)
    tol = target.tol
    layer = spec.make(spec.small)
    _load(layer, target, exp.state)
    if spec.step is not None:
        layer.forward(target.asarray(exp.x0))
        layer.backward(target.asarray(exp.g0))
        layer.update(lr=LEARNING_RATE)
        layer.eval()
    x, g = target.asarray(exp.x), target.asarray(exp.g)
    y = layer.forward(x)
    dx = layer.backward(g)
    row.problems += _same_kind("output", y, x, exp.x.shape)
    row.problems += _same_kind("input gradient", dx, x, exp.x.shape)
    row.fwd = rel_err(to_numpy(y), exp.y)
    errs = {"input gradient": rel_err(to_numpy(dx), exp.dx)}
    for name in spec.params:
        got = layer.grads.get(name)
        if got is None:
            errs[f"{name} gradient"] = math.inf
            continue
        row.problems += _same_kind(f"{name} gradient", got, x, exp.grads[name].shape)
        errs[f"{name} gradient"] = rel_err(to_numpy(got), exp.grads[name])
    row.bwd = max(errs.values())
    if not row.fwd <= tol:
        row.problems.append(f"output: relative error {row.fwd:.2g} > {tol:.0e}")
    for what, err in errs.items():
        if not err <= tol:
            row.problems.append(f"{what}: relative error {err:.2g} > {tol:.0e}")
    return row


def _time(spec: Spec, index: int, target: Target) -> float:
    """Median milliseconds of one forward+backward call on ``spec.medium`` input (3 to 5
    calls after a warm-up call)."""
    import numpy as np

    rng = np.random.default_rng([SEED, index, 1])
    shape = spec.medium
    layer = spec.make(shape)
    _load(layer, target, spec.state(shape, rng), batch_chunks=True)
    x = target.asarray(_random_input(rng, shape), batch_chunks=True)
    g = target.asarray(rng.standard_normal(shape), batch_chunks=True)
    if spec.step is not None:
        layer.forward(x)
        layer.backward(g)
        layer.update(lr=LEARNING_RATE)
        layer.eval()

    def call() -> None:
        y = layer.forward(x)
        dx = layer.backward(g)
        target.sync(y, dx)

    call()  # warm-up (JAX compiles here, torch and CuPy load their kernels)
    times: list[float] = []
    while len(times) < REPEATS and (len(times) < MIN_REPEATS or sum(times) < TIME_BUDGET_S):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


# ----------------------------------------------------------------------------- output
def _versions() -> list[tuple[str, str]]:
    """``(name, version)`` of anynorm, array-api-compat, Python, the platform, and every
    backend (``"not installed"`` where absent)."""
    import anynorm

    rows = [
        ("anynorm", f"{anynorm.__version__} ({anynorm.__path__[0]})"),
        ("array-api-compat", _compat.compat_version()),
        ("python", f"{platform.python_version()} ({platform.python_implementation()})"),
        ("platform", platform.platform()),
    ]
    for name in BACKENDS:
        rows.append((name, _version_of(name)))
    return rows


def _version_of(module: str) -> str:
    """The version of backend ``module``, ``"not installed"`` if absent (jax with jaxlib)."""
    version = _installed_version(module)
    if module == "jax" and version != "not installed":
        jaxlib = _installed_version("jaxlib")
        if jaxlib != "not installed":
            version += f" (jaxlib {jaxlib})"
    return version


def _installed_version(module: str) -> str:
    """The version of ``module`` without importing it (its ``__version__`` if imported)."""
    mod = sys.modules.get(module)
    if mod is not None and getattr(mod, "__version__", None):
        return str(mod.__version__)
    try:
        if importlib.util.find_spec(module) is None:
            return "not installed"
    except (ImportError, ValueError):
        return "not installed"
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(module)
    # distribution named unlike the module (cupy-cuda12x, ...): scan the installed ones
    for dist in importlib.metadata.packages_distributions().get(module, []):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return "installed (version unknown)"


def _fmt_err(err: float) -> str:
    return "error" if math.isnan(err) else f"{err:.1e}"


class _Table:
    """Fixed-width table printed row by row as the checks finish."""

    headers = ("backend", "device", "dtype", "layer", "fwd err", "bwd err", "ms/call", "status")
    right = (False, False, False, False, True, True, True, False)

    def __init__(self, widths: Sequence[int], out: TextIO) -> None:
        self.widths = [max(w, len(h)) for w, h in zip(widths, self.headers, strict=True)]
        self.out = out

    def _line(self, cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if r else c.ljust(w)
            for c, w, r in zip(cells, self.widths, self.right, strict=True)
        ]
        return "  ".join(parts).rstrip()

    def header(self) -> None:
        print(self._line(self.headers), file=self.out)
        print(self._line(["-" * w for w in self.widths]), file=self.out, flush=True)

    def row(self, row: Row) -> None:
        t = row.target
        cells = (
            t.backend,
            t.device_name,
            t.dtype_name,
            row.label,
            _fmt_err(row.fwd),
            _fmt_err(row.bwd),
            "-" if row.ms is None else f"{row.ms:.2f}",
            "ok" if row.ok else "FAIL",
        )
        print(self._line(cells), file=self.out, flush=True)


# ----------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m anynorm",
        usage=(
            "python -m anynorm [-h] [--backend NAMES] [--quick]\n"
            "       python -m anynorm bench\n       python -m anynorm bench-sync"
        ),
        description=(
            "anynorm self-check: forward and backward of every layer on every installed "
            "array backend, against float64 NumPy references, with the time per call. "
            "Exit status 0 if every check passes, 1 if any fails, 2 on a usage error."
        ),
    )
    parser.add_argument(
        "--backend",
        metavar="NAMES",
        default=None,
        help=(
            "comma-separated backends to check, from: "
            + ", ".join(BACKENDS)
            + " (default: every one installed)"
        ),
    )
    parser.add_argument(
        "--quick", action="store_true", help="skip the timings (correctness checks only)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("bench", help="the benchmark suite (python -m anynorm bench --help)")
    sub.add_parser(
        "bench-sync",
        help="synchronized batch norm over processes vs one process "
        "(python -m anynorm bench-sync --help)",
    )
    return parser


def _backends_arg(parser: argparse.ArgumentParser, spec: str | None) -> tuple[list[str], bool]:
    """The backends to run and whether they were named explicitly."""
    if spec is None or spec.strip() in ("", "all"):
        return list(BACKENDS), False
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        parser.error(
            f"--backend: unknown backend(s) {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(BACKENDS)}"
        )
    return list(dict.fromkeys(names)), True


def main(argv: Sequence[str] | None = None) -> int:
    """Run the self-check; return the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        Command-line arguments (default ``sys.argv[1:]``): ``--backend numpy,torch`` limits
        the backends, ``--quick`` skips the timings; ``bench ...`` runs the benchmark suite
        (:func:`anynorm._bench.main`) and ``bench-sync ...`` the synchronized batch norm
        benchmark (:func:`anynorm._bench_sync.main`) with the remaining arguments.

    Returns
    -------
    int
        0 if every check passed, 1 if any failed, 2 on a usage error (unknown or unusable
        backend asked for, NumPy missing).

    Notes
    -----
    Checking JAX turns on ``jax_enable_x64`` (for float64) in this process. Each row is one
    check: the forward output, the input gradient and every parameter gradient of one layer
    on one backend and device, each within the dtype's tolerance, with the namespace, dtype,
    device and shape of the input.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from . import _bench

        return _bench.main(argv[1:])
    if argv[:1] == ["bench-sync"]:
        from . import _bench_sync

        return _bench_sync.main(argv[1:])
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        backends, explicit = _backends_arg(parser, args.backend)
    except SystemExit as exc:  # argparse reports usage errors (and --help) this way
        return exc.code if isinstance(exc.code, int) else 0
    out = sys.stdout
    try:
        import numpy  # noqa: F401  (the float64 reference runs on NumPy)
    except ImportError:
        print(
            "anynorm: the self-check needs NumPy (its float64 reference runs on NumPy), "
            f"which is not installed. Install it with:\n    {INSTALL_NUMPY}",
            file=sys.stderr,
        )
        return 2

    start = time.perf_counter()
    targets: list[Target] = []
    skipped: list[tuple[str, str]] = []
    for name in backends:
        try:
            targets += _targets_for(name)
        except Unavailable as exc:
            skipped.append((name, str(exc)))
    print("anynorm self-check", file=out)
    versions = _versions()
    width = max(len(n) for n, _ in versions)
    for name, version in versions:
        print(f"  {name.ljust(width)}  {version}", file=out)
    print(file=out)
    if explicit and skipped:
        for name, reason in skipped:
            print(
                f"anynorm: --backend {name} was asked for but {reason}. Install it "
                f'(pip install "anynorm[{name}]") or leave it out of --backend.',
                file=sys.stderr,
            )
        return 2
    for name, reason in skipped:
        print(f"skipped {name}: {reason}", file=out)
    if skipped:
        print(file=out)

    specs = _specs()
    widths = [
        max((len(t.backend) for t in targets), default=0),
        max((len(t.device_name) for t in targets), default=0),
        len("float64"),
        max(len(s.label) for s in specs),
        len("0.0e+00"),
        len("0.0e+00"),
        len("10000.00"),
        len("FAIL"),
    ]
    table = _Table(widths, out)
    table.header()
    cache: dict[tuple[int, str], Expected] = {}
    rows: list[Row] = []
    for target in targets:
        for index, spec in enumerate(specs):
            # a crash is a failed check, not the end of the run
            try:
                key = (index, target.dtype_name)
                if key not in cache:
                    cache[key] = _expected(spec, index, target.dtype_name)
                row = _check(spec, cache[key], target)
            except Exception as exc:
                row = Row(target, spec.label)
                row.problems.append(f"raised {type(exc).__name__}: {exc}")
            else:
                if not args.quick:
                    try:
                        row.ms = _time(spec, index, target)
                    except Exception as exc:
                        row.problems.append(f"timing raised {type(exc).__name__}: {exc}")
            rows.append(row)
            table.row(row)

    failed = [r for r in rows if not r.ok]
    print(file=out)
    missing = sorted(set(_layer_classes()) - {s.label.split()[0].split("(")[0] for s in specs})
    if missing:
        print(f"warning: layers not covered by the self-check: {', '.join(missing)}", file=out)
    for r in failed:
        t = r.target
        for problem in r.problems:
            print(f"FAIL {t.backend} {t.device_name} {t.dtype_name} {r.label}: {problem}", file=out)
    tols = ", ".join(f"{k} {v:.0e}" for k, v in TOLERANCES.items())
    print(
        f"{len(rows)} checks, {len(failed)} failed (relative tolerance {tols}; "
        f"{time.perf_counter() - start:.1f} s)",
        file=out,
    )
    if failed:
        print(
            "Some checks failed: please report them with this whole output at "
            "https://github.com/anynorm/anynorm/issues",
            file=out,
        )
    if not rows:
        print("nothing was checked: no backend is usable", file=out)
        return 1
    return 1 if failed else 0
