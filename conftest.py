"""The multi-backend test harness.

Every test that takes the ``bk`` fixture runs once per (backend, device, dtype) case, with ids
like ``torch-cpu-float32``. Backends are chosen with ``pytest --backend=numpy,torch`` (or
``--backend=all`` for every importable one) or the ``ANYNORM_BACKEND`` environment variable;
the default is ``numpy,array_api_strict``. A backend named explicitly that cannot be imported
is a usage error, never a silent pass.

The helpers here convert test data to and from each backend *without* anynorm's own code, so
a bug in anynorm's conversions cannot hide a bug in its math.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

ALL_BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "dask", "cupy")
DEFAULT_BACKENDS = ("numpy", "array_api_strict")
#: relative tolerances (max abs error / max abs reference) against a float64 oracle
TOLERANCES = {"float64": 1e-10, "float32": 1e-5, "float16": 5e-3, "bfloat16": 4e-2}


@dataclass(frozen=True)
class Case:
    """One (backend, device, dtype) combination."""

    backend: str
    device_name: str
    dtype_name: str
    xp: Any = field(repr=False, compare=False)
    device: Any = field(repr=False, compare=False)
    dtype: Any = field(repr=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.device_name}-{self.dtype_name}"

    @property
    def tol(self) -> float:
        return TOLERANCES[self.dtype_name]

    @property
    def half(self) -> bool:
        return self.dtype_name in ("float16", "bfloat16")

    @property
    def param_dtype(self) -> Any:
        """What anynorm promises for parameters: float32 for half inputs."""
        return self.xp.float32 if self.half else self.dtype

    # -- conversion without anynorm ---------------------------------------------------
    def asarray(self, a: Any, dtype: Any = None) -> Any:
        """A float64 NumPy array as an array of this case (rounded to its dtype)."""
        a = np.asarray(a, dtype=np.float64)
        dtype = self.dtype if dtype is None else dtype
        dname = dtype.__name__ if isinstance(dtype, type) else str(dtype).split(".")[-1]
        if self.backend == "numpy":
            return np.asarray(a, dtype=dtype)
        if self.backend == "dask":
            import dask.array as da

            # two chunks along the first and the last axis: reductions cross chunk borders
            chunks = tuple(
                max(1, s // 2) if i in (0, a.ndim - 1) else s for i, s in enumerate(a.shape)
            )
            return da.from_array(a.astype(dname), chunks=chunks)
        if self.backend == "torch":
            import torch

            return torch.asarray(a, device=self.device).to(dtype)
        if self.backend == "jax":
            import jax

            return jax.device_put(jax.numpy.asarray(a).astype(dtype), self.device)
        if self.backend == "cupy":
            import cupy

            return cupy.asarray(a).astype(dtype)
        # array_api_strict: build on the device in a dtype it has, then cast
        base = a.astype(np.float32) if dname in ("float32", "float16") else a
        return self.xp.astype(self.xp.asarray(base, device=self.device), dtype)

    def to_numpy(self, a: Any) -> np.ndarray:
        """Any array of this case back to a float64 NumPy array."""
        if self.backend == "numpy":
            return np.asarray(a, dtype=np.float64)
        if self.backend == "dask":
            return np.asarray(a.compute(), dtype=np.float64)
        if self.backend == "torch":
            return a.detach().cpu().double().numpy()
        if self.backend == "cupy":
            return a.get().astype(np.float64)
        if self.backend == "jax":
            return np.asarray(a.astype("float64") if a.dtype != "float64" else a, dtype=np.float64)
        cpu = self.xp.__array_namespace_info__().default_device()
        b = a.to_device(cpu) if a.device != cpu else a
        if b.dtype != self.xp.float64 and self.device_name != "no_float64":
            b = self.xp.astype(b, self.xp.float64)
        return np.asarray(np.from_dlpack(b), dtype=np.float64)

    def round(self, a: np.ndarray) -> np.ndarray:
        """``a`` rounded to this case's dtype, as float64 NumPy (the oracle's input)."""
        return self.to_numpy(self.asarray(a))

    # -- assertions -------------------------------------------------------------------
    def check(self, a: Any, shape: tuple, dtype: Any = None, what: str = "output") -> None:
        """Assert namespace, dtype, device and shape of ``a``."""
        import array_api_compat

        dtype = self.dtype if dtype is None else dtype
        assert array_api_compat.array_namespace(a) is self.xp, (
            f"{what}: namespace {array_api_compat.array_namespace(a)} is not {self.xp}"
        )
        assert a.dtype == dtype, f"{what}: dtype {a.dtype} != {dtype}"
        assert array_api_compat.device(a) == self.device, (
            f"{what}: device {array_api_compat.device(a)} != {self.device}"
        )
        assert tuple(a.shape) == tuple(shape), f"{what}: shape {tuple(a.shape)} != {shape}"

    def close(self, got: Any, ref: np.ndarray, what: str = "output", tol: float | None = None):
        """Assert ``got`` (array of this case) matches the float64 reference ``ref``."""
        err = rel_err(self.to_numpy(got), ref)
        limit = self.tol if tol is None else tol
        assert err <= limit, f"{what}: relative error {err:.3g} > {limit:.1g} ({self.id})"
        return err

    def close_parts(self, parts: list, ref: np.ndarray, what: str = "output") -> float:
        """Assert the arrays ``parts`` (per-rank slices along axis 0) joined match ``ref``."""
        err = rel_err(np.concatenate([self.to_numpy(p) for p in parts], axis=0), ref)
        assert err <= self.tol, f"{what}: relative error {err:.3g} > {self.tol:.1g} ({self.id})"
        return err


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got − ref| / max |ref| (0 for two empty arrays; inf on shape mismatch)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return float("inf")
    if ref.size == 0:
        return 0.0
    if not np.array_equal(np.isnan(got), np.isnan(ref)):
        return float("inf")
    mask = ~np.isnan(ref)
    scale = max(float(np.max(np.abs(ref[mask]), initial=0.0)), 1e-300)
    return float(np.max(np.abs(got[mask] - ref[mask]), initial=0.0)) / scale


def _cases_for(backend: str) -> list[Case]:
    """Import ``backend`` (ImportError if absent) and list its (device, dtype) cases."""
    cases: list[Case] = []

    def add(xp, dev, dev_name, names):
        for n in names:
            dt = getattr(xp, n, None)
            if dt is not None:
                cases.append(Case(backend, dev_name, n, xp, dev, dt))

    if backend == "numpy":
        import array_api_compat.numpy as xp

        add(xp, "cpu", "cpu", ("float32", "float64", "float16"))
    elif backend == "array_api_strict":
        xp = importlib.import_module("array_api_strict")
        for name, dtypes in (
            ("CPU_DEVICE", ("float32", "float64")),
            ("device1", ("float32", "float64")),
            ("no_float64", ("float32",)),
        ):
            add(xp, xp.Device(name), name, dtypes)
    elif backend == "torch":
        import array_api_compat.torch as xp
        import torch

        names = ("float32", "float64", "float16", "bfloat16")
        add(xp, torch.device("cpu"), "cpu", names)
        if torch.cuda.is_available():
            add(xp, torch.device("cuda", 0), "cuda", names)
    elif backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as xp

        dev = jax.devices()[0]
        add(xp, dev, dev.platform, ("float32", "float64", "float16", "bfloat16"))
    elif backend == "dask":
        import array_api_compat.dask.array as xp
        import dask

        dask.config.set(scheduler="synchronous")
        add(xp, "cpu", "cpu", ("float32", "float64"))
    elif backend == "cupy":
        import array_api_compat.cupy as xp
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise ImportError("cupy is installed but no CUDA device is visible")
        add(xp, cupy.cuda.Device(0), "cuda", ("float32", "float64", "float16"))
    else:
        raise ValueError(backend)
    return cases


def pytest_addoption(parser):
    parser.addoption(
        "--backend",
        default=None,
        help="comma-separated backends to test ("
        + ", ".join(ALL_BACKENDS)
        + ") or 'all' for every importable one; default $ANYNORM_BACKEND or "
        + ",".join(DEFAULT_BACKENDS),
    )
    parser.addoption(
        "--distributed",
        action="store_true",
        default=False,
        help="also run the multi-process tests marked `distributed` (torch.distributed, "
        "mpi4py); the tests-distributed nox session passes it",
    )


def pytest_configure(config):
    spec = config.getoption("--backend") or os.environ.get("ANYNORM_BACKEND") or ""
    spec = spec.strip() or ",".join(DEFAULT_BACKENDS)
    cases: list[Case] = []
    if spec == "all":
        for b in ALL_BACKENDS:
            with contextlib.suppress(ImportError):
                cases += _cases_for(b)
    else:
        for b in (s.strip() for s in spec.split(",") if s.strip()):
            if b not in ALL_BACKENDS:
                raise pytest.UsageError(
                    f"--backend: unknown backend {b!r}; choose from {', '.join(ALL_BACKENDS)} "
                    "or 'all'."
                )
            try:
                cases += _cases_for(b)
            except ImportError as exc:
                raise pytest.UsageError(
                    f"--backend: backend {b!r} was asked for but cannot be used here: {exc}. "
                    f"Install it (pip install 'anynorm[{b}]') or drop it from --backend."
                ) from exc
    config._anynorm_cases = cases
    config.addinivalue_line("markers", "dtypes(*names): restrict `bk` to these dtypes")
    config.addinivalue_line("markers", "backends(*names): restrict `bk` to these backends")
    config.addinivalue_line(
        "markers",
        "small_path: keep anynorm's plain path for small inputs (see fast_paths_at_test_sizes)",
    )


def pytest_report_header(config):
    cases = getattr(config, "_anynorm_cases", [])
    return "anynorm backends: " + ", ".join(c.id for c in cases)


def pytest_generate_tests(metafunc):
    if "bk" not in metafunc.fixturenames:
        return
    cases = list(metafunc.config._anynorm_cases)
    marker = metafunc.definition.get_closest_marker("dtypes")
    if marker is not None:
        cases = [c for c in cases if c.dtype_name in marker.args]
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None:
        cases = [c for c in cases if c.backend in marker.args]
    metafunc.parametrize("bk", cases, ids=[c.id for c in cases])


@pytest.fixture
def rng():
    return np.random.default_rng(20261121)


@pytest.fixture(autouse=True)
def fast_paths_at_test_sizes(request, monkeypatch):
    """Below ``anynorm.functional._moments._SMALL`` values anynorm skips planning its fast
    paths (BLAS sums, blocked sums of products, long-row views, blocks) and runs the plain
    operations. Test arrays are almost all that small, so every test runs with the threshold
    at 0: the fast paths are what the oracle tests check, at test sizes. Tests marked
    ``small_path`` keep the production threshold and check the plain path."""
    if request.node.get_closest_marker("small_path") is None:
        from anynorm.functional import _moments

        monkeypatch.setattr(_moments, "_SMALL", 0)


@pytest.fixture
def torch_oracle():
    """torch in float64 on the CPU: the independent oracle (skips, with the reason, if absent)."""
    return pytest.importorskip("torch", reason="torch (the float64 oracle) is not installed")


def pytest_collection_modifyitems(config, items):
    """Tests restricted (by marker) to backends or dtypes not selected in this run are
    deselected, not reported as skips: they are not applicable here, nothing was skipped."""
    keep, drop = [], []
    for item in items:
        skip = item.get_closest_marker("skip")
        reason = "" if skip is None else str(skip.kwargs.get("reason", ""))
        if item.get_closest_marker("distributed") and not config.getoption("--distributed"):
            drop.append(item)  # multi-process: only in the tests-distributed session
            continue
        (drop if reason.startswith("got empty parameter set") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
