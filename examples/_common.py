"""What the two examples share: backend selection, NumPy ↔ backend conversion, a dense
layer and a ReLU with explicit backward passes, the progress bar and the digits data. Each
example imports it from its own folder.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

import anynorm

BACKENDS = ("numpy", "torch", "jax", "cupy", "dask", "array_api_strict")
DEFAULT_OUT = Path(__file__).resolve().parent / "out"


# ---------------------------------------------------------------------------- backend
def get_backend(name: str, device: str | None, dtype_name: str) -> tuple[Any, Any, Any]:
    """The array namespace, device and float dtype for ``--backend/--device/--dtype``."""
    if name == "numpy":
        import array_api_compat.numpy as xp

        dev = "cpu"
    elif name == "torch":
        import array_api_compat.torch as xp
        import torch

        dev = torch.device(device or "cpu")
    elif name == "jax":
        import jax

        if dtype_name == "float64":
            jax.config.update("jax_enable_x64", True)  # JAX is float32-only otherwise
        import jax.numpy as xp

        dev = jax.devices(device)[0] if device else jax.devices()[0]
    elif name == "cupy":
        import array_api_compat.cupy as xp
        import cupy

        dev = cupy.cuda.Device(int(device or 0))
    elif name == "dask":
        import array_api_compat.dask.array as xp

        dev = "cpu"
    elif name == "array_api_strict":
        import array_api_strict as xp

        dev = xp.Device(device) if device else xp.__array_namespace_info__().default_device()
    else:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    return xp, dev, getattr(xp, dtype_name)


def to_xp(a: np.ndarray, xp: Any, dev: Any, dtype_name: str | None = None) -> Any:
    """A NumPy array as an array of ``xp`` on ``dev`` (cast in NumPy first, so a device
    without float64 never sees float64 data)."""
    if dtype_name is not None:
        a = a.astype(dtype_name)
    return xp.asarray(a, device=dev)


def to_numpy(a: Any, backend: str) -> np.ndarray:
    """Back to NumPy on the host, for the picture only."""
    if backend == "cupy":
        return a.get()
    if backend == "torch":
        return a.detach().cpu().numpy()
    if backend == "dask":
        return np.asarray(a.compute())
    if backend == "array_api_strict":
        import array_api_strict as xp

        return np.from_dlpack(a.to_device(xp.Device("CPU_DEVICE")))
    return np.asarray(a)  # numpy, jax


# ---------------------------------------------------------------------------- layers
class Dense(anynorm.Layer):
    """``y = x @ W + b`` with an explicit backward. It is an ``anynorm.Layer``, so
    ``update()`` is anynorm's SGD rule (``v = momentum·v − lr·(g + decay·θ)``, ``θ = θ + v``),
    not a copy of it."""

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator, xp, dev, dtype_name):
        super().__init__(xp=xp, device=dev)
        w = rng.standard_normal((n_in, n_out)) * math.sqrt(2.0 / n_in)  # He init
        self.params = {
            "weight": to_xp(w, xp, dev, dtype_name),
            "bias": to_xp(np.zeros(n_out), xp, dev, dtype_name),
        }
        self._x = None

    def forward(self, x):
        self._x = x
        return self._xp.matmul(x, self.params["weight"]) + self.params["bias"]

    def backward(self, g):
        xp = self._xp
        self.grads = {
            "weight": xp.matmul(xp.matrix_transpose(self._x), g),  # dW = xᵀ g
            "bias": xp.sum(g, axis=0),  # db = Σ_batch g
        }
        return xp.matmul(g, xp.matrix_transpose(self.params["weight"]))  # dx = g Wᵀ


class ReLU:
    def __init__(self, xp):
        self.xp = xp

    def forward(self, x):
        self._mask = x > 0
        return self.xp.where(self._mask, x, self.xp.zeros_like(x))

    def backward(self, g):
        return self.xp.where(self._mask, g, self.xp.zeros_like(g))


# ---------------------------------------------------------------------------- helpers
class TextBar:
    """The fallback progress bar when tqdm is not installed: one stderr line, rewritten."""

    def __init__(self, iterable, total: int, desc: str, disable: bool = False):
        self.iterable, self.total, self.desc, self.disable = iterable, total, desc, disable
        self.postfix = ""

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def __iter__(self):
        for i, item in enumerate(self.iterable, 1):
            yield item
            if not self.disable:
                width = 30 * i // self.total
                bar = "#" * width + "." * (30 - width)
                print(
                    f"\r{self.desc} [{bar}] {i}/{self.total} {self.postfix}",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
        if not self.disable:
            print(file=sys.stderr)


def progress(iterable, total: int, desc: str, disable: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return TextBar(iterable, total, desc, disable)
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False, unit="step")


def load_data(seed: int):
    """Digits 8×8 (1797 images) scaled to [0, 1], stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float64) / 16.0
    return train_test_split(
        x, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )
