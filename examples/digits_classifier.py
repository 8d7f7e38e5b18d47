"""Train a small MLP on scikit-learn's bundled digits with anynorm's explicit backward.

The network is ``dense(64→H) → norm → ReLU → dense(H→10) → softmax`` where ``norm`` is
anynorm's ``BatchNorm``, ``LayerNorm`` or ``GroupNorm`` (``--norm``). There is no autograd
anywhere: the dense layers, the ReLU and the softmax cross-entropy (forward and backward) are
written below with array API operations (``xp.matmul``, ``xp.exp``, ...); the normalization
layer is anynorm's, with its own ``backward()`` and ``update()``. The dense parameters are
updated with the same SGD rule as ``anynorm.Layer.update``.

Everything array-side goes through the array namespace of the chosen backend, so the same code
trains on NumPy, PyTorch, JAX, CuPy, Dask and array-api-strict arrays. The data (``load_digits``,
bundled with scikit-learn, no download), the initial weights and the minibatch order come from
a fixed NumPy random generator, so every backend sees the same numbers: in float64 the loss
curves of NumPy and PyTorch agree to rounding.

Run from the repository root::

    python examples/digits_classifier.py --backend numpy --epochs 10
    python examples/digits_classifier.py --backend torch --dtype float64 --norm layer
    python examples/digits_classifier.py --backend jax --dtype float32 --plot my_loss.png

``main(argv)`` returns a dict (losses per step, accuracies per epoch, run time) for tests.
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
    to_xp,
)

NORMS = ("batch", "layer", "group")


# ---------------------------------------------------------------------------- model
def softmax_cross_entropy(z, onehot, xp):
    """Mean cross-entropy of logits ``z`` against one-hot targets and its gradient
    ``(softmax(z) − onehot)/N`` (the max shift cancels in the gradient)."""
    zs = z - xp.max(z, axis=1, keepdims=True)
    logp = zs - xp.log(xp.sum(xp.exp(zs), axis=1, keepdims=True))
    n = z.shape[0]
    loss = -xp.sum(onehot * logp) / n
    return loss, (xp.exp(logp) - onehot) / n


def make_norm(kind: str, hidden: int, groups: int) -> anynorm.Layer:
    if kind == "batch":
        return anynorm.BatchNorm(hidden)  # feature axis 1 of (N, hidden)
    if kind == "layer":
        return anynorm.LayerNorm(hidden)
    return anynorm.GroupNorm(groups, hidden)


class MLP:
    def __init__(self, args, rng, xp, dev):
        self.layers = [
            Dense(64, args.hidden, rng, xp, dev, args.dtype),
            make_norm(args.norm, args.hidden, args.groups),
            ReLU(xp),
            Dense(args.hidden, 10, rng, xp, dev, args.dtype),
        ]

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, g):
        for layer in reversed(self.layers):
            g = layer.backward(g)
        return g

    def update(self, lr, momentum, decay):
        for layer in self.layers:
            if hasattr(layer, "update"):
                layer.update(lr, momentum, decay)

    def train(self, mode: bool = True):
        self.layers[1].train(mode)  # only BatchNorm behaves differently in eval mode

    @property
    def stateful(self) -> list:
        return [layer for layer in self.layers if hasattr(layer, "params")]


# ---------------------------------------------------------------------------- helpers
def accuracy(model: MLP, x, y, xp) -> float:
    model.train(False)
    pred = xp.argmax(model.forward(x), axis=1)
    model.train(True)
    return float(xp.mean(xp.astype(pred == y, x.dtype)))


def save_plot(path: Path, result: dict, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    losses = np.asarray(result["losses"])
    steps_per_epoch = len(losses) / len(result["epoch_loss"])
    epochs = np.arange(1, len(result["epoch_loss"]) + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.semilogy(
        np.arange(1, len(losses) + 1) / steps_per_epoch,
        losses,
        lw=0.8,
        alpha=0.6,
        label="minibatch",
    )
    ax1.semilogy(epochs - 0.5, result["epoch_loss"], "o-", label="epoch mean")
    ax1.set(xlabel="epoch", ylabel="cross-entropy loss", title="training loss")
    ax1.legend()
    ax1.grid(True, which="both", alpha=0.3)
    ax2.plot(epochs, 100 * np.asarray(result["train_acc"]), "o-", label="train")
    ax2.plot(epochs, 100 * np.asarray(result["test_acc"]), "s-", label="test")
    low = min(80.0, 100 * min(result["train_acc"] + result["test_acc"]) - 2)
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy", ylim=(low, 100.5))
    ax2.legend()
    ax2.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved the loss curve to {path}")
    return str(path)


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=BACKENDS, default="numpy")
    p.add_argument(
        "--device",
        default=None,
        help="torch: cpu, cuda, cuda:1; jax: cpu, gpu; cupy: 0, 1; "
        "array_api_strict: CPU_DEVICE, device1 (default: the backend's)",
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--norm", choices=NORMS, default="batch")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--groups", type=int, default=8, help="groups of --norm group")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="PNG path (default examples/out/digits_<backend>_<norm>_<dtype>.png)",
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    xp, dev, _ = get_backend(args.backend, args.device, args.dtype)
    x_tr, x_te, y_tr, y_te = load_data(args.seed)
    onehot_tr = np.eye(10)[y_tr]
    # whole sets on the device once, for the accuracy; minibatches are converted per step
    X_tr, X_te = to_xp(x_tr, xp, dev, args.dtype), to_xp(x_te, xp, dev, args.dtype)
    Y_tr, Y_te = to_xp(y_tr, xp, dev), to_xp(y_te, xp, dev)

    rng = np.random.default_rng(args.seed)
    model = MLP(args, rng, xp, dev)
    n = x_tr.shape[0]
    steps = math.ceil(n / args.batch_size)
    print(
        f"digits classifier: backend={args.backend} device={dev} dtype={args.dtype} "
        f"norm={type(model.layers[1]).__name__} hidden={args.hidden}, "
        f"{n} train / {x_te.shape[0]} test images"
    )
    result: dict = {"losses": [], "epoch_loss": [], "train_acc": [], "test_acc": []}
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        te = time.perf_counter()
        order = rng.permutation(n)
        bar = progress(range(steps), steps, f"epoch {epoch}/{args.epochs}", args.no_progress)
        epoch_losses = []
        for step in bar:
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            xb = to_xp(x_tr[idx], xp, dev, args.dtype)
            tb = to_xp(onehot_tr[idx], xp, dev, args.dtype)
            loss, dz = softmax_cross_entropy(model.forward(xb), tb, xp)
            model.backward(dz)
            model.update(args.lr, args.momentum, args.decay)
            # Dask: compute the step (state and loss) in one go and drop its graph; a no-op
            # on eager backends
            *_, loss = anynorm.persist(*model.stateful, loss)
            epoch_losses.append(float(loss))  # one host sync per step, for the curve
            bar.set_postfix_str(f"loss {epoch_losses[-1]:.4f}")
        result["losses"] += epoch_losses
        result["epoch_loss"].append(sum(epoch_losses) / len(epoch_losses))
        result["train_acc"].append(accuracy(model, X_tr, Y_tr, xp))
        result["test_acc"].append(accuracy(model, X_te, Y_te, xp))
        print(
            f"epoch {epoch:3d}/{args.epochs}  loss {result['epoch_loss'][-1]:.4f}  "
            f"train acc {100 * result['train_acc'][-1]:6.2f} %  "
            f"test acc {100 * result['test_acc'][-1]:6.2f} %  "
            f"({time.perf_counter() - te:.2f} s)"
        )
    result["time_s"] = time.perf_counter() - t0
    print(
        f"done: test accuracy {100 * result['test_acc'][-1]:.2f} % after {args.epochs} epochs "
        f"in {result['time_s']:.1f} s"
    )
    result["plot"] = None
    if not args.no_plot:
        path = args.plot or DEFAULT_OUT / f"digits_{args.backend}_{args.norm}_{args.dtype}.png"
        title = (
            f"digits MLP with anynorm.{type(model.layers[1]).__name__} — "
            f"{args.backend} {args.dtype}, test acc {100 * result['test_acc'][-1]:.1f} %"
        )
        result["plot"] = save_plot(path, result, title)
    return result


if __name__ == "__main__":
    main()
