"""Smoke tests of the examples in ``examples/``: a short run on NumPy and PyTorch.

Each example is imported by path (``examples/`` is not a package) and its ``main(argv)`` run
for two epochs in float64. The tests check that training lowers the loss, that the NumPy and
PyTorch runs give the same loss curve (relative difference ≤ 1e-8: same data, same initial
weights, same minibatch order, only the rounding of the backends differs) and, for the
autoencoder, that every bottleneck code has unit L2 norm. The full-length runs, their
accuracies and timings are in ``examples/README.md``, not here. These tests do not use the
``bk`` backend fixture: they always compare NumPy with PyTorch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the examples train on scikit-learn's load_digits")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EPOCHS = 2
_cache: dict = {}


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(
        f"anynorm_example_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name: str, backend: str, *extra: str) -> dict:
    """``main`` of example ``name``, two float64 epochs, no plot (cached per argument list)."""
    argv = ["--backend", backend, "--dtype", "float64", "--epochs", str(EPOCHS)]
    argv += ["--no-progress", "--no-plot", *extra]
    key = (name, *argv)
    if key not in _cache:
        with one_torch_thread(backend):
            _cache[key] = load_example(name).main(argv)
    return _cache[key]


@contextlib.contextmanager
def one_torch_thread(backend: str):
    """Run torch single-threaded: on matrices this small its thread pool only adds
    overhead, which on a busy 2-core machine made these runs 10-20 times slower."""
    if backend != "torch":
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rel_diff(a: list[float], b: list[float]) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    return float(np.max(np.abs(a - b) / np.abs(b)))


def check_decreasing(result: dict, epoch_key: str) -> None:
    losses = np.asarray(result["losses"])
    k = len(losses) // (2 * EPOCHS)  # half an epoch
    assert losses[-k:].mean() < 0.5 * losses[:k].mean(), "training did not lower the loss"
    epoch = result[epoch_key]
    assert len(epoch) == EPOCHS and all(b < a for a, b in itertools.pairwise(epoch)), epoch


# ---------------------------------------------------------------------------- classifier
def test_classifier_numpy_learns():
    r = run("digits_classifier", "numpy", "--norm", "batch")
    assert len(r["losses"]) == EPOCHS * 45  # 1437 training images, batches of 32
    check_decreasing(r, "epoch_loss")
    assert r["test_acc"][-1] > 0.9  # two epochs already get > 90 % (10 give ≥ 95 %)


@pytest.mark.parametrize("norm", ["batch", "layer", "group"])
def test_classifier_numpy_torch_agree(norm):
    pytest.importorskip("torch", reason="the agreement check compares NumPy with PyTorch")
    ref = run("digits_classifier", "numpy", "--norm", norm)
    got = run("digits_classifier", "torch", "--norm", norm)
    check_decreasing(got, "epoch_loss")
    assert rel_diff(got["losses"], ref["losses"]) <= 1e-8
    assert np.allclose(got["test_acc"], ref["test_acc"], rtol=0, atol=1e-12)


def test_classifier_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib")
    path = tmp_path / "loss.png"
    r = load_example("digits_classifier").main(
        ["--epochs", "1", "--no-progress", "--norm", "layer", "--plot", str(path)]
    )
    assert r["plot"] == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- autoencoder
def test_autoencoder_numpy_learns():
    r = run("l2_embedding_autoencoder", "numpy")
    check_decreasing(r, "train_mse")
    assert r["unit_norm"] and max(r["norm_dev"]) <= 1e-12


def test_autoencoder_numpy_torch_agree():
    pytest.importorskip("torch", reason="the agreement check compares NumPy with PyTorch")
    ref = run("l2_embedding_autoencoder", "numpy")
    got = run("l2_embedding_autoencoder", "torch")
    check_decreasing(got, "train_mse")
    assert got["unit_norm"] and max(got["norm_dev"]) <= 1e-12
    assert rel_diff(got["losses"], ref["losses"]) <= 1e-8
    assert rel_diff(got["test_mse"], ref["test_mse"]) <= 1e-8


def test_autoencoder_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="the picture needs matplotlib")
    path = tmp_path / "grid.png"
    r = load_example("l2_embedding_autoencoder").main(
        ["--epochs", "1", "--no-progress", "--plot", str(path)]
    )
    assert r["unit_norm"]
    assert r["plot"] == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
