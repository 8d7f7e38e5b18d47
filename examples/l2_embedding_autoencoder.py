"""An autoencoder with an L2-normalized bottleneck, trained with explicit backward passes.

The Keras question "How to apply l2 normalization to a layer in keras?" asks for an
autoencoder whose codes are divided by their L2 norm, and the usual answer is
``Lambda(lambda x: K.l2_normalize(x, axis=1))``. Here that layer is ``anynorm.L2Norm(axis=1)``,
with its own, exact ``backward()``:

    encoder  dense(64→H) → ReLU → dense(H→D)
    bottleneck  anynorm.L2Norm(axis=1)          every code z has ‖z‖₂ = 1
    decoder  dense(D→H) → ReLU → dense(H→64) → sigmoid

trained on scikit-learn's bundled digits (8×8 images, no download) scaled to [0, 1], with the
mean squared reconstruction error. The dense layers, ReLU, sigmoid and the loss are written
below with array API operations, so the same code runs on NumPy, PyTorch, JAX, CuPy, Dask and
array-api-strict arrays. After every epoch the script prints the reconstruction error and the
largest deviation of a test code's norm from 1. If a code does not have unit norm (to the
dtype's rounding) it says so and exits with status 1 (no ``assert``). It saves a PNG with
test digits (top row) and their reconstructions (bottom row).

Run from the repository root::

    python examples/l2_embedding_autoencoder.py --backend numpy --epochs 30
    python examples/l2_embedding_autoencoder.py --backend torch --dtype float64

``main(argv)`` returns a dict (losses per step, errors per epoch, norm check) for tests.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

import anynorm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared _common.py beside this file
from _common import (
    BACKENDS,
    DEFAULT_OUT,
    Dense,
    ReLU,
    get_backend,
    load_data,
    progress,
    to_numpy,
    to_xp,
)

#: largest accepted | ‖z‖₂ − 1 | per dtype (a few units of rounding of a 16-term sum)
UNIT_NORM_TOL = {"float32": 1e-5, "float64": 1e-12}


# ---------------------------------------------------------------------------- model
class Sigmoid:
    def __init__(self, xp):
        self.xp = xp

    def forward(self, x):
        self._y = 1 / (1 + self.xp.exp(-x))
        return self._y

    def backward(self, g):
        return g * self._y * (1 - self._y)


class Autoencoder:
    def __init__(self, args, rng, xp, dev):
        h, d = args.hidden, args.code
        self.encoder = [Dense(64, h, rng, xp, dev, args.dtype), ReLU(xp)]
        self.encoder.append(Dense(h, d, rng, xp, dev, args.dtype))
        self.bottleneck = anynorm.L2Norm(axis=1)  # Keras: Lambda(K.l2_normalize(x, axis=1))
        self.decoder = [Dense(d, h, rng, xp, dev, args.dtype), ReLU(xp)]
        self.decoder += [Dense(h, 64, rng, xp, dev, args.dtype), Sigmoid(xp)]
        self.layers = [*self.encoder, self.bottleneck, *self.decoder]

    def encode(self, x):
        for layer in self.encoder:
            x = layer.forward(x)
        return self.bottleneck.forward(x)

    def decode(self, z):
        for layer in self.decoder:
            z = layer.forward(z)
        return z

    def backward(self, g):
        for layer in reversed(self.layers):
            g = layer.backward(g)
        return g

    def update(self, lr, momentum, decay):
        for layer in self.layers:
            if hasattr(layer, "update"):
                layer.update(lr, momentum, decay)  # L2Norm has no parameters: a no-op

    @property
    def dense(self) -> list:
        return [layer for layer in self.layers if isinstance(layer, Dense)]


def mse(y, x, xp):
    """Mean squared error over all pixels and its gradient ``2(y − x)/size``."""
    diff = y - x
    size = diff.shape[0] * diff.shape[1]
    return xp.sum(diff * diff) / size, 2 * diff / size


# ---------------------------------------------------------------------------- helpers
def save_grid(path: Path, originals: np.ndarray, recon: np.ndarray, title: str) -> str | None:
    """2 rows × n columns: originals on top, reconstructions below."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no picture (pip install matplotlib)")
        return None
    n = originals.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.1 * n, 2.8))
    for j in range(n):
        for row, images in enumerate((originals, recon)):
            ax = axes[row, j]
            ax.imshow(images[j].reshape(8, 8), cmap="gray_r", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, j].set_title(str(j))
    axes[0, 0].set_ylabel("original")
    axes[1, 0].set_ylabel("reconstructed")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved originals vs reconstructions to {path}")
    return str(path)


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=BACKENDS, default="numpy")
    p.add_argument(
        "--device",
        default=None,
        help="torch: cpu, cuda; jax: cpu, gpu; cupy: 0, 1; array_api_strict: CPU_DEVICE, device1",
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--code", type=int, default=16, help="bottleneck (code) size")
    p.add_argument("--lr", type=float, default=2.0)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--plot", type=Path, default=None, help="PNG path (default examples/out/autoencoder_...)"
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    xp, dev, _ = get_backend(args.backend, args.device, args.dtype)
    x_tr, x_te, _, y_te = load_data(args.seed)
    X_tr, X_te = to_xp(x_tr, xp, dev, args.dtype), to_xp(x_te, xp, dev, args.dtype)
    rng = np.random.default_rng(args.seed)
    model = Autoencoder(args, rng, xp, dev)
    n = x_tr.shape[0]
    steps = math.ceil(n / args.batch_size)
    tol = UNIT_NORM_TOL[args.dtype]
    print(
        f"L2-embedding autoencoder: backend={args.backend} device={dev} dtype={args.dtype} "
        f"64-{args.hidden}-{args.code}-L2Norm-{args.hidden}-64, {n} train / {x_te.shape[0]} test"
    )
    result: dict = {"losses": [], "train_mse": [], "test_mse": [], "norm_dev": []}
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        te = time.perf_counter()
        order = rng.permutation(n)
        bar = progress(range(steps), steps, f"epoch {epoch}/{args.epochs}", args.no_progress)
        epoch_losses = []
        for step in bar:
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            xb = to_xp(x_tr[idx], xp, dev, args.dtype)
            loss, dy = mse(model.decode(model.encode(xb)), xb, xp)
            model.backward(dy)
            model.update(args.lr, args.momentum, args.decay)
            *_, loss = anynorm.persist(*model.dense, loss)  # Dask: bound the graph
            epoch_losses.append(float(loss))
            bar.set_postfix_str(f"mse {epoch_losses[-1]:.4f}")
        result["losses"] += epoch_losses
        result["train_mse"].append(float(mse(model.decode(model.encode(X_tr)), X_tr, xp)[0]))
        z = model.encode(X_te)
        result["test_mse"].append(float(mse(model.decode(z), X_te, xp)[0]))
        # the check, computed here without anynorm: ‖z‖₂ of every test code
        norms = xp.sqrt(xp.sum(z * z, axis=1))
        result["norm_dev"].append(float(xp.max(xp.abs(norms - 1))))
        print(
            f"epoch {epoch:3d}/{args.epochs}  train mse {result['train_mse'][-1]:.5f}  "
            f"test mse {result['test_mse'][-1]:.5f}  "
            f"max |‖z‖₂ − 1| {result['norm_dev'][-1]:.1e}  ({time.perf_counter() - te:.2f} s)"
        )
    result["time_s"] = time.perf_counter() - t0
    worst = max(result["norm_dev"])
    result["unit_norm"] = worst <= tol
    verdict = "OK" if result["unit_norm"] else "FAILED"
    print(
        f"done in {result['time_s']:.1f} s: test mse {result['test_mse'][-1]:.5f}; bottleneck "
        f"codes max |‖z‖₂ − 1| = {worst:.2e} (tolerance {tol:.0e} for {args.dtype}): {verdict}"
    )
    result["plot"] = None
    if not args.no_plot:
        first = np.array([np.flatnonzero(y_te == d)[0] for d in range(10)])  # one per digit
        sample = to_xp(x_te[first], xp, dev, args.dtype)
        recon = to_numpy(model.decode(model.encode(sample)), args.backend)
        path = args.plot or DEFAULT_OUT / f"autoencoder_{args.backend}_{args.dtype}.png"
        title = (
            f"L2-normalized {args.code}-d codes ({args.backend} {args.dtype}): "
            f"test digits (top) and reconstructions (bottom), test mse "
            f"{result['test_mse'][-1]:.4f}"
        )
        result["plot"] = save_grid(path, x_te[first], recon, title)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["unit_norm"] else 1)
