"""Dask: every layer and functional form on chunked ``dask.array`` input.

What is proven here, against anynorm on NumPy with the concatenated data (float64, 1e-12):

- laziness: building forward, backward, update and evaluation-mode passes computes nothing
  (a ``dask.callbacks.Callback`` counts scheduler runs; on a ``LocalCluster`` the scheduler's
  transition counter stays put), and one ``dask.compute`` at the end gives every result;
- exactness across chunks: inputs chunked unevenly along the batch *and* the reduced axes,
  and a mean-1e8 (float64) / mean-1e4 (float32) case where ``E[x²] − E[x]²`` would fail;
- the synchronous and the threaded scheduler, and a ``dask.distributed.LocalCluster`` of two
  worker processes;
- ``persist``: with it the task graphs of running statistics, parameters and velocities stay
  bounded over 100 training steps and old batches are freed; without it they grow;
- unknown chunk sizes (boolean indexing) are a ValueError naming the argument and the fix.

The tests taking ``bk`` run only for ``--backend=dask``; the few without ``bk`` check the
eager (non-Dask) behaviour of ``persist`` and need NumPy only. dask is imported inside the
tests, so collecting this module never needs it.
"""

from __future__ import annotations

import gc
import itertools
import subprocess
import sys
import time
import weakref
from collections import Counter

import numpy as np
import pytest

import anynorm
from anynorm import functional as F

pytestmark = [pytest.mark.backends("dask"), pytest.mark.dtypes("float64")]

#: cross-backend agreement (same float64 math, other summation order)
TOL = {"rtol": 1e-12, "atol": 1e-12}
SHAPE = (6, 4, 5, 7)  # (N, C, H, W)
#: the dask input is batches of these sizes, concatenated along axis 0
BATCHES = (2, 3, 1)
#: SGD settings used everywhere (momentum and decay, so the velocity and decay paths run)
SGD = {"lr": 0.1, "momentum": 0.9, "decay": 0.01}


# ----------------------------------------------------------------------------- helpers
def _uneven(n: int) -> tuple[int, ...]:
    """Two chunks of different sizes (one chunk for a length-1 axis)."""
    first = max(1, n // 3)
    return (first, n - first) if n > first else (n,)


def chunked(a: np.ndarray, inner: tuple | None = None):
    """``a`` as a dask array built by concatenating batches of sizes ``BATCHES`` along axis 0,
    each chunked unevenly along every other axis (``inner`` overrides those chunks)."""
    import dask.array as da

    inner = tuple(_uneven(s) for s in a.shape[1:]) if inner is None else inner
    if a.shape[0] != sum(BATCHES):
        return da.from_array(a, chunks=(_uneven(a.shape[0]), *inner))
    parts = np.split(a, np.cumsum(BATCHES)[:-1], axis=0)
    out = da.concatenate([da.from_array(p, chunks=(p.shape[0], *inner)) for p in parts], axis=0)
    assert out.chunks[0] == BATCHES
    return out


def param_chunks(a: np.ndarray):
    """A parameter-like array (any rank) as a dask array with uneven chunks."""
    import dask.array as da

    return da.from_array(a, chunks=tuple(_uneven(s) for s in a.shape))


def compute_counter():
    """A dask callback counting scheduler runs (``_start``) and executed tasks."""
    from dask.callbacks import Callback

    class CountComputes(Callback):
        def __init__(self):
            super().__init__()
            self.computes = 0
            self.tasks = 0

        def _start(self, dsk):
            self.computes += 1

        def _pretask(self, key, dsk, state):
            self.tasks += 1

    return CountComputes()


def graph_len(a) -> int:
    return len(a.__dask_graph__())


def check_lazy(bk, lazy: dict, ref: dict) -> None:
    """Every lazy result is a dask array (namespace), with the reference's dtype and shape."""
    assert set(lazy) == set(ref), sorted(set(lazy) ^ set(ref))
    for k, v in lazy.items():
        r = np.asarray(ref[k])
        dtype = bk.xp.int64 if r.dtype.kind == "i" else bk.dtype
        bk.check(v, r.shape, dtype, what=k)


def assert_equal_results(got: dict, ref: dict, what: str) -> None:
    assert set(got) == set(ref)
    for k in ref:
        g, r = np.asarray(got[k]), np.asarray(ref[k])
        assert g.shape == r.shape, f"{what} {k}: shape {g.shape} != {r.shape}"
        np.testing.assert_allclose(g, r, **TOL, err_msg=f"{what}: {k}")


def data(seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs, upstream gradients and parameters (random, non-trivial) as NumPy float64."""
    rng = np.random.default_rng(20261122 + seed)
    x = rng.standard_normal(SHAPE) * 1.5 + 0.7
    out = {
        "x": x,
        "x2": rng.standard_normal(SHAPE) * 0.8 - 0.3,
        "dy": rng.standard_normal(SHAPE),
        "dy2": rng.standard_normal(SHAPE),
    }
    for name, shape in {"4": (4,), "7": (7,), "57": (5, 7), "47": (4, 7)}.items():
        out["w" + name] = rng.uniform(0.5, 1.5, shape)
        out["b" + name] = rng.standard_normal(shape)
        out["m" + name] = rng.standard_normal(shape)
        out["v" + name] = rng.uniform(0.5, 1.5, shape)
    return out


def as_dask(arrays: dict) -> dict:
    return {k: chunked(v) if v.shape == SHAPE else param_chunks(v) for k, v in arrays.items()}


# ----------------------------------------------------------------------------- layers
#: every layer, as a factory (each call a fresh layer with the same configuration)
LAYERS = {
    "BatchNorm-NCHW": lambda: anynorm.BatchNorm(4),
    "BatchNorm-NHWC": lambda: anynorm.BatchNorm(7, axis=-1),
    "BatchNorm-cumulative": lambda: anynorm.BatchNorm(4, momentum=None),
    "BatchNorm-HW": lambda: anynorm.BatchNorm((5, 7), axis=(2, 3)),
    "LayerNorm": lambda: anynorm.LayerNorm((5, 7)),
    "GroupNorm": lambda: anynorm.GroupNorm(2, 4),
    "GroupNorm-NHWC": lambda: anynorm.GroupNorm(7, 7, axis=-1),
    "InstanceNorm": lambda: anynorm.InstanceNorm(4, affine=True, track_running_stats=True),
    "RMSNorm": lambda: anynorm.RMSNorm((5, 7)),
    "LocalResponseNorm": lambda: anynorm.LocalResponseNorm(3, alpha=0.4, k=1.2),
    "L1Norm": lambda: anynorm.L1Norm(axis=1),
    "L2Norm": lambda: anynorm.L2Norm(axis=(2, 3)),
    "LpNorm": lambda: anynorm.LpNorm(3.0, axis=(1, 3)),
    "LpNorm-inf": lambda: anynorm.LpNorm(float("inf"), axis=None),
}


def train_and_eval(layer, a: dict) -> dict:
    """Two training steps (forward, backward with a random dy, SGD update with momentum),
    then an evaluation-mode forward and backward; every result by name."""
    out = {}
    for i, (x, dy) in enumerate(((a["x"], a["dy"]), (a["x2"], a["dy2"]))):
        out[f"y{i}"] = layer.forward(x)
        out[f"dx{i}"] = layer.backward(dy)
        out.update({f"grad{i}:{k}": g for k, g in layer.grads.items()})
        layer.update(**SGD)
    layer.eval()
    out["y_eval"] = layer.forward(a["x"])
    out["dx_eval"] = layer.backward(a["dy2"])
    out.update({f"param:{k}": v for k, v in layer.params.items()})
    out.update({f"buffer:{k}": v for k, v in layer.buffers.items()})
    return out


def numpy_layer_results(name: str, arrays: dict) -> dict:
    return train_and_eval(LAYERS[name](), arrays)


@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_is_lazy_and_matches_numpy(bk, name, scheduler):
    import dask

    arrays = data()
    ref = numpy_layer_results(name, arrays)
    a = as_dask(arrays)
    assert len(a["x"].chunks[0]) == 3 and all(len(c) == 2 for c in a["x"].chunks[1:])
    counter = compute_counter()
    with dask.config.set(scheduler=scheduler), counter:
        lazy = train_and_eval(LAYERS[name](), a)
        assert counter.computes == 0, f"{name}: {counter.computes} compute(s) while building"
        check_lazy(bk, lazy, ref)
        (got,) = dask.compute(lazy)
    assert counter.computes == 1
    assert_equal_results(got, ref, f"{name} ({scheduler})")


# ----------------------------------------------------------------------------- functional
def functional_cases():
    """name -> (a -> list of outputs); ``a`` holds the inputs of one backend."""
    return {
        "batch_norm": lambda a: [
            F.batch_norm(a["x"], a["w4"], a["b4"]),
            *F.batch_norm_backward(a["dy"], a["x"], a["w4"]),
        ],
        "batch_norm-NHWC-frozen": lambda a: [
            F.batch_norm(a["x"], a["w7"], a["b7"], axis=-1, mean=a["m7"], var=a["v7"]),
            *F.batch_norm_backward(a["dy"], a["x"], a["w7"], axis=-1, mean=a["m7"], var=a["v7"]),
        ],
        "batch_norm_stats": lambda a: [*F.batch_norm_stats(a["x"], axis=(1, 3))],
        "update_running_stats": lambda a: [
            *F.update_running_stats(
                a["m4"],
                a["v4"],
                *F.batch_norm_stats(a["x"]),
                210,
                0.1,
                xp=anynorm._compat.array_namespace(a["x"]),
            )
        ],
        "layer_norm": lambda a: [
            F.layer_norm(a["x"], a["w57"], a["b57"], axis=(2, 3)),
            *F.layer_norm_backward(a["dy"], a["x"], a["w57"], axis=(2, 3)),
        ],
        "layer_norm-non-trailing": lambda a: [
            F.layer_norm(a["x"], a["w47"], a["b47"], axis=(1, 3)),
            *F.layer_norm_backward(a["dy"], a["x"], a["w47"], axis=(1, 3)),
        ],
        "group_norm": lambda a: [
            F.group_norm(a["x"], 2, a["w4"], a["b4"]),
            *F.group_norm_backward(a["dy"], a["x"], 2, a["w4"]),
        ],
        "group_norm-NHWC": lambda a: [
            F.group_norm(a["x"], 7, a["w7"], a["b7"], axis=-1),
            *F.group_norm_backward(a["dy"], a["x"], 7, a["w7"], axis=-1),
        ],
        "instance_norm": lambda a: [
            F.instance_norm(a["x"], a["w4"], a["b4"]),
            *F.instance_norm_backward(a["dy"], a["x"], a["w4"]),
        ],
        "instance_norm-frozen": lambda a: [
            F.instance_norm(a["x"], a["w4"], a["b4"], mean=a["m4"], var=a["v4"]),
            *F.instance_norm_backward(a["dy"], a["x"], a["w4"], mean=a["m4"], var=a["v4"]),
        ],
        "rms_norm": lambda a: [
            F.rms_norm(a["x"], a["w57"], axis=(2, 3)),
            *F.rms_norm_backward(a["dy"], a["x"], a["w57"], axis=(2, 3)),
        ],
        "local_response_norm": lambda a: [
            F.local_response_norm(a["x"], 3, alpha=0.4, k=1.2),
            F.local_response_norm_backward(a["dy"], a["x"], 3, alpha=0.4, k=1.2),
        ],
        "local_response_norm-NHWC": lambda a: [
            F.local_response_norm(a["x"], 4, alpha=0.4, k=1.2, axis=-1),
            F.local_response_norm_backward(a["dy"], a["x"], 4, alpha=0.4, k=1.2, axis=-1),
        ],
        "l1_normalize": lambda a: [
            F.l1_normalize(a["x"], axis=1),
            F.l1_normalize_backward(a["dy"], a["x"], axis=1),
        ],
        "l2_normalize": lambda a: [
            F.l2_normalize(a["x"], axis=(2, 3)),
            F.l2_normalize_backward(a["dy"], a["x"], axis=(2, 3)),
        ],
        "lp_normalize-3": lambda a: [
            F.lp_normalize(a["x"], 3.0, axis=(0, 2)),
            F.lp_normalize_backward(a["dy"], a["x"], 3.0, axis=(0, 2)),
        ],
        "lp_normalize-inf": lambda a: [
            F.lp_normalize(a["x"], float("inf"), axis=None),
            F.lp_normalize_backward(a["dy"], a["x"], float("inf"), axis=None),
        ],
    }


FUNCTIONAL = functional_cases()


@pytest.mark.parametrize("name", list(FUNCTIONAL))
def test_functional_form_is_lazy_and_matches_numpy(bk, name):
    import dask

    arrays = data(1)
    ref = dict(enumerate(FUNCTIONAL[name](arrays)))
    counter = compute_counter()
    with counter:
        lazy = dict(enumerate(FUNCTIONAL[name](as_dask(arrays))))
        assert counter.computes == 0, f"{name}: {counter.computes} compute(s) while building"
        check_lazy(bk, lazy, ref)
        (got,) = dask.compute(lazy)
    assert counter.computes == 1
    assert_equal_results(got, ref, name)


# ----------------------------------------------------------------------------- exactness
#: (statistics axes of the reference, layer factory, functional form) for the centred family
CENTRED = {
    "BatchNorm": ((0, 2, 3), lambda: anynorm.BatchNorm(4)),
    "BatchNorm-NHWC": ((0, 1, 2), lambda: anynorm.BatchNorm(7, axis=-1)),
    "LayerNorm": ((2, 3), lambda: anynorm.LayerNorm((5, 7))),
    "GroupNorm": (None, lambda: anynorm.GroupNorm(2, 4)),
    "InstanceNorm": ((2, 3), lambda: anynorm.InstanceNorm(4, track_running_stats=True)),
}


def two_pass(x: np.ndarray, axes) -> tuple[np.ndarray, np.ndarray]:
    """Textbook float64 mean and biased variance (keepdims), the exactness oracle."""
    mean = x.mean(axis=axes, keepdims=True)
    return mean, ((x - mean) ** 2).mean(axis=axes, keepdims=True)


def reference_normalize(x: np.ndarray, name: str, eps: float = 1e-5) -> np.ndarray:
    axes = CENTRED[name][0]
    if axes is None:  # GroupNorm(2, 4): groups of 2 channels
        xg = x.reshape(x.shape[0], 2, 2, *x.shape[2:])
        mean, var = two_pass(xg, (2, 3, 4))
        return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
    mean, var = two_pass(x, axes)
    return (x - mean) / np.sqrt(var + eps)


def test_large_mean_data_defeats_the_one_pass_variance():
    """The data of the next test is hard: E[x²] − E[x]² in float64 gets the variance wrong
    by far more than the tolerance (so a one-pass implementation would fail it)."""
    x = shifted_1e8(np.random.default_rng(5))
    _, var = two_pass(x, (0, 2, 3))
    one_pass = (x * x).mean(axis=(0, 2, 3), keepdims=True) - x.mean(
        axis=(0, 2, 3), keepdims=True
    ) ** 2
    assert np.max(np.abs(one_pass - var) / var) > 1e-2


def shifted_1e8(rng) -> np.ndarray:
    """Mean 1e8, std ~1, in steps of 1/16: every sum of these is exact in float64, so the
    mean is the same correctly rounded number however the chunks are summed."""
    return 1e8 + np.round(rng.standard_normal(SHAPE) * 16) / 16


@pytest.mark.parametrize("name", list(CENTRED))
def test_statistics_exact_across_chunks_mean_1e8(bk, name):
    """float64, mean 1e8 and std 1, chunked along the batch and the reduced axes: outputs,
    running statistics and ``batch_norm_stats`` match the float64 NumPy two-pass reference."""
    import dask

    x = shifted_1e8(np.random.default_rng(5))
    layer = CENTRED[name][1]()
    lazy = {"y": layer.forward(chunked(x))}
    lazy.update(layer.buffers)
    if name.startswith("BatchNorm"):
        axis = 1 if name == "BatchNorm" else -1
        lazy["stats_mean"], lazy["stats_var"] = F.batch_norm_stats(chunked(x), axis=axis)
    (got,) = dask.compute(lazy)
    np.testing.assert_allclose(got["y"], reference_normalize(x, name), **TOL)
    axes = CENTRED[name][0]
    if name.startswith("BatchNorm"):
        mean, var = (a.reshape(-1) for a in two_pass(x, axes))
        np.testing.assert_allclose(got["stats_mean"], mean, rtol=1e-15)
        np.testing.assert_allclose(got["stats_var"], var, **TOL)
        n = x.size // mean.size
        np.testing.assert_allclose(got["running_var"], 0.9 + 0.1 * var * n / (n - 1), **TOL)
        np.testing.assert_allclose(got["running_mean"], 0.1 * mean, rtol=1e-15)
    if name == "InstanceNorm":
        mean, var = two_pass(x, axes)
        n = 5 * 7
        np.testing.assert_allclose(
            got["running_var"], 0.9 + 0.1 * var.mean(axis=0).reshape(-1) * n / (n - 1), **TOL
        )


@pytest.mark.dtypes("float32")
@pytest.mark.parametrize("name", list(CENTRED))
def test_statistics_two_pass_across_chunks_float32_mean_1e4(bk, name):
    """float32, mean 1e4 and std 1 (one-pass E[x²] − E[x]² cancels to garbage in float32):
    within the float32 two-pass error (|μ|·ε/σ ≈ 1.2e-3, tests/NUMERICS.md) of the float64
    reference on the same float32 data."""
    import dask

    x = (1e4 + np.random.default_rng(6).standard_normal(SHAPE)).astype(np.float32)
    x64 = x.astype(np.float64)
    axes = CENTRED[name][0] or (2, 3)
    _, var = two_pass(x64, axes)
    one_pass = (x * x).mean(axis=axes, keepdims=True) - x.mean(axis=axes, keepdims=True) ** 2
    assert np.max(np.abs(one_pass - var) / var) > 0.1  # the data defeats one pass in float32
    layer = CENTRED[name][1]()
    y = layer.forward(chunked(x))
    bk.check(y, SHAPE)
    (got,) = dask.compute(y)
    ref = reference_normalize(x64, name)
    err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    assert err <= 2e-3, f"{name}: relative error {err:.3g}"


# ----------------------------------------------------------------------------- distributed
#: one layer and functional form per code path on the cluster (tasks cost ~1 ms each there;
#: the synchronous and threaded tests above cover every case)
CLUSTER_LAYERS = (
    "BatchNorm-NCHW",
    "LayerNorm",
    "GroupNorm-NHWC",
    "InstanceNorm",
    "RMSNorm",
    "LocalResponseNorm",
    "LpNorm-inf",
)
CLUSTER_FUNCTIONAL = ("batch_norm-NHWC-frozen", "update_running_stats", "lp_normalize-3")
#: fewer chunks on the cluster: still 3 along the batch and 2 along H
COARSE = ((4,), (2, 3), (7,))


def as_dask_coarse(arrays: dict) -> dict:
    return {
        k: chunked(v, COARSE) if v.shape == SHAPE else param_chunks(v) for k, v in arrays.items()
    }


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes (one thread each, no dashboard) and its client,
    shared by the module's cluster tests and closed after them. The client is not made the
    global default: the tests pass it explicitly or in a ``dask.config.set`` block."""
    distributed = pytest.importorskip(
        "distributed", reason="dask.distributed is not installed (pip install 'anynorm[dask]')"
    )
    t0 = time.perf_counter()
    with (
        distributed.LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            dashboard_address=None,
            host="127.0.0.1",
        ) as lc,
        distributed.Client(lc, set_as_default=False) as client,
    ):
        client.wait_for_workers(2)
        print(f"LocalCluster start: {time.perf_counter() - t0:.2f} s")
        yield client


def _scheduler_transitions(client) -> int:
    return client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)


def _scheduler_tasks(client) -> int:
    return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))


def _settled_tasks(client, at_most: int, timeout: float = 10.0) -> int:
    """The scheduler's task count once it is <= ``at_most`` (releases are asynchronous),
    or its count after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    held = _scheduler_tasks(client)
    while held > at_most and time.monotonic() < deadline:
        time.sleep(0.05)
        held = _scheduler_tasks(client)
    return held


def test_layers_and_functional_forms_on_a_local_cluster(bk, cluster):
    """Layers (two training steps and an evaluation pass) and functional forms built lazily
    (no task reaches the scheduler), computed in one call on 2 worker processes, equal to
    NumPy."""
    import dask

    arrays = data(2)
    refs, lazies = {}, {}
    before = _scheduler_transitions(cluster)
    for name in CLUSTER_LAYERS:
        refs[name] = numpy_layer_results(name, arrays)
        lazies[name] = train_and_eval(LAYERS[name](), as_dask_coarse(arrays))
    for name in CLUSTER_FUNCTIONAL:
        refs["F." + name] = dict(enumerate(FUNCTIONAL[name](arrays)))
        lazies["F." + name] = dict(enumerate(FUNCTIONAL[name](as_dask_coarse(arrays))))
    assert _scheduler_transitions(cluster) == before, "tasks ran while the graphs were built"
    for name, lazy in lazies.items():
        check_lazy(bk, lazy, refs[name])
    t0 = time.perf_counter()
    (got,) = dask.compute(lazies, scheduler=cluster)
    print(f"one compute of {len(lazies)} cases on the cluster: {time.perf_counter() - t0:.2f} s")
    assert _scheduler_transitions(cluster) > before
    for name in refs:
        assert_equal_results(got[name], refs[name], f"{name} (LocalCluster)")


def _train_step(bn, ln, x, dy):
    """One SGD step of a BatchNorm and a LayerNorm side by side on the same batch."""
    bn.forward(x)
    ln.forward(x)
    bn.backward(dy)
    ln.backward(dy)
    bn.update(**SGD)
    ln.update(**SGD)


def _cluster_step(bn, ln, a, chunks=COARSE):
    _train_step(bn, ln, chunked(a["x"], chunks), chunked(a["dy"], chunks))


def test_persist_on_a_local_cluster_keeps_no_history(bk, cluster):
    """Training on the cluster with ``anynorm.persist`` after every step: the state is one
    task per chunk and the scheduler forgets every past step (it holds no task once the
    work is done), while a bare ``dask.persist`` of the same state leaves the scheduler
    holding the history of every step (dask/distributed#809). Values equal NumPy's."""
    import dask

    steps = 4
    bn, ln = anynorm.BatchNorm(4), anynorm.LayerNorm((5, 7))
    held = []
    with dask.config.set(scheduler=cluster):
        for step in range(steps):
            a = data(10 + step)
            _cluster_step(bn, ln, a)
            assert anynorm.persist(bn, ln) == (bn, ln)
            for layer in (bn, ln):
                for store in (layer.params, layer.buffers, layer.grads, layer._velocity):
                    assert all(graph_len(v) == v.npartitions for v in store.values())
            held.append(_settled_tasks(cluster, at_most=0))
        (got,) = dask.compute({**bn.state_dict(), **{"ln." + k: v for k, v in ln.params.items()}})
        assert held == [0] * steps, f"tasks left on the scheduler after each step: {held}"

        # the contrast: a bare dask.persist keeps every step's history on the scheduler
        bare = [anynorm.BatchNorm(4), anynorm.LayerNorm((5, 7))]
        bare_held = []
        for step in range(3):
            _cluster_step(*bare, data(20 + step))
            for layer in bare:
                for store in (layer.params, layer.buffers, layer.grads, layer._velocity):
                    keys = list(store)
                    for k, v in zip(keys, dask.persist(*store.values()), strict=True):
                        store[k] = v
            dask.compute([v for layer in bare for v in layer.state_dict().values()])
            bare_held.append(_settled_tasks(cluster, at_most=0, timeout=0.5))
        print(f"scheduler tasks after each step: anynorm.persist {held}, dask.persist {bare_held}")
        assert bare_held[0] > 0 and bare_held[2] > bare_held[1] > bare_held[0], bare_held
        del bare
    ref = _numpy_reference(steps, first=10)
    assert_equal_results(got, ref, "persisted on the cluster")


# ----------------------------------------------------------------------------- persist
class _Source:
    """An array-like batch source for ``da.from_array`` whose lifetime a weakref can watch
    (dask copies NumPy arrays into the graph, but keeps a reference to other sources)."""

    def __init__(self, a: np.ndarray):
        self.a, self.shape, self.dtype, self.ndim = a, a.shape, a.dtype, a.ndim

    def __getitem__(self, key):
        return self.a[key]


#: chunks of the training batches (2 along the batch, 2 along H; few, to keep 100 steps fast)
TRAIN_CHUNKS = ((3, 3), (4,), (2, 3), (7,))


def _train(steps: int, persist_every: int | None, how: str = "anynorm.persist"):
    """A BatchNorm and a LayerNorm, each trained on the same new dask batch every step (side
    by side: chained, LayerNorm would make BatchNorm's weight gradient a cancellation of
    rounding noise, ill-conditioned over 100 steps); returns the layers,
    the graph sizes after every step, weakrefs to the batch sources and a compute counter."""
    import dask.array as da

    bn, ln = anynorm.BatchNorm(4), anynorm.LayerNorm((5, 7))
    sizes, sources = [], []
    counter = compute_counter()
    with counter:
        for step in range(steps):
            a = data(100 + step)
            src = _Source(a["x"])
            sources.append(weakref.ref(src))
            x = da.from_array(src, chunks=TRAIN_CHUNKS, asarray=True)
            dy = da.from_array(a["dy"], chunks=TRAIN_CHUNKS)
            _train_step(bn, ln, x, dy)
            if persist_every and (step + 1) % persist_every == 0:
                before = counter.computes
                if how == "anynorm.persist":
                    anynorm.persist(bn, ln)
                else:
                    bn.persist()
                    ln.persist()
                assert counter.computes - before == (1 if how == "anynorm.persist" else 2)
            sizes.append(graph_sizes(bn, ln))
        del src, x, dy
    gc.collect()
    return bn, ln, sizes, sources, counter


def graph_sizes(bn, ln) -> dict:
    arrays = {
        **{"bn." + k: v for k, v in {**bn.params, **bn.buffers}.items()},
        **{"ln." + k: v for k, v in ln.params.items()},
        **{"bn.velocity." + k: v for k, v in bn._velocity.items()},
    }
    return {k: (graph_len(v), v.npartitions) for k, v in arrays.items()}


def _numpy_reference(steps: int, first: int = 100) -> dict:
    """The state after ``steps`` NumPy steps on ``data(first)``, ``data(first + 1)``, ..."""
    bn, ln = anynorm.BatchNorm(4), anynorm.LayerNorm((5, 7))
    for step in range(steps):
        a = data(first + step)
        _train_step(bn, ln, a["x"], a["dy"])
    return {**bn.state_dict(), **{"ln." + k: v for k, v in ln.params.items()}}


@pytest.mark.parametrize(
    ("every", "how"), [(10, "anynorm.persist"), (1, "layer.persist")], ids=["every-10", "every-1"]
)
def test_persist_keeps_the_graph_bounded_over_100_steps(bk, every, how):
    """100 steps, persisting every ``every`` steps: right after each persist every array of
    state is one task per chunk; from the second cycle on, every cycle of ``every`` steps
    builds exactly the graph sizes of the one before (a bound independent of the step
    count); one compute per persist call and none otherwise; batches older than ``every``
    steps are freed; the final state equals a NumPy run of the same 100 steps."""
    import dask

    steps = 100
    t0 = time.perf_counter()
    bn, ln, sizes, sources, counter = _train(steps, every, how)
    seconds = time.perf_counter() - t0
    for step, s in enumerate(sizes):
        if (step + 1) % every == 0:
            assert all(n == parts for n, parts in s.values()), (step, s)
        if step >= 2 * every:  # the first cycle starts from the unchunked initial state
            assert s == sizes[step - every], (step, s, sizes[step - every])
    assert counter.computes == (steps // every) * (1 if how == "anynorm.persist" else 2)
    alive = sum(r() is not None for r in sources)
    assert alive <= every, f"{alive} batch sources still alive (persist every {every})"
    worst = {k: max(s[k][0] for s in sizes) for k in sizes[0]}
    print(
        f"persist every {every} ({how}), {steps} steps in {seconds:.1f} s: max graph sizes "
        f"{worst}; after persist {sizes[-1]}; batch sources alive {alive}"
    )
    (got,) = dask.compute({**bn.state_dict(), **{"ln." + k: v for k, v in ln.params.items()}})
    assert_equal_results(got, _numpy_reference(steps), f"100 steps, persist every {every}")


def test_without_persist_the_graph_grows_and_keeps_every_batch(bk):
    """The contrast: without persist every step adds to the graphs (they grow linearly),
    and every past batch stays referenced by the running statistics and parameters."""
    steps = 20
    _, _, sizes, sources, counter = _train(steps, None)
    assert counter.computes == 0
    for k in sizes[0]:
        lens = [s[k][0] for s in sizes]
        assert all(b > a for a, b in itertools.pairwise(lens)), (k, lens)
        assert lens[-1] >= 1.8 * lens[steps // 2 - 1], (k, lens)
    assert sum(r() is not None for r in sources) == steps
    print(
        f"no persist: graph sizes after {steps} steps { {k: v[0] for k, v in sizes[-1].items()} }"
    )


def test_one_persist_call_computes_shared_work_once(bk):
    """``anynorm.persist(bn, ln)`` loads each input chunk once, although the batch feeds
    ``ln``'s gradients and, through ``ln``'s output, ``bn``'s running statistics and
    gradients; two separate ``layer.persist()`` calls load it twice. backward after persist
    still works (the forward caches are kept)."""
    import dask.array as da

    arrays = data(3)
    loads = Counter()

    def load(block, block_id=None):
        loads[block_id] += 1
        return block

    def build():
        x = chunked(arrays["x"]).map_blocks(load, meta=np.empty((0,) * 4))
        bn, ln = anynorm.BatchNorm(4), anynorm.LayerNorm((5, 7))
        bn.forward(ln.forward(x))
        ln.backward(bn.backward(chunked(arrays["dy"])))
        bn.update(**SGD)
        ln.update(**SGD)
        return bn, ln, x

    bn, ln, x = build()
    assert not loads
    assert anynorm.persist(bn, ln) == (bn, ln)
    n_chunks = x.npartitions
    assert len(loads) == n_chunks and set(loads.values()) == {1}, loads
    dx = ln.backward(bn.backward(chunked(arrays["dy2"])))  # the caches survive persist
    assert isinstance(dx, da.Array)

    loads.clear()
    bn2, ln2, _ = build()
    assert bn2.persist() is bn2 and ln2.persist() is ln2
    assert len(loads) == n_chunks and set(loads.values()) == {2}, loads

    ref_bn, ref_ln = anynorm.BatchNorm(4), anynorm.LayerNorm((5, 7))
    ref_bn.forward(ref_ln.forward(arrays["x"]))
    ref_ln.backward(ref_bn.backward(arrays["dy"]))
    ref_bn.update(**SGD)
    ref_ln.update(**SGD)
    ref_dx = ref_ln.backward(ref_bn.backward(arrays["dy2"]))
    np.testing.assert_allclose(dx.compute(), ref_dx, **TOL)
    for got, ref in ((bn, ref_bn), (ln, ref_ln), (bn2, ref_bn), (ln2, ref_ln)):
        for k, v in got.state_dict().items():
            np.testing.assert_allclose(v.compute(), ref.state_dict()[k], **TOL, err_msg=k)


def test_persist_returns_persisted_arrays_and_forwards_kwargs(bk):
    """Arrays among the arguments come back persisted (as with ``dask.persist``), in
    argument order, from the same graph execution as the layers' state (each input chunk
    is evaluated once); keyword arguments reach dask (here ``scheduler="threads"`` while
    the default is synchronous)."""
    import threading

    import dask

    arrays = data(4)
    threads, evaluated = set(), Counter()

    def record(block, block_id=None):
        threads.add(threading.get_ident())
        evaluated[block_id] += 1
        return block

    x = chunked(arrays["x"]).map_blocks(record, meta=np.empty((0,) * 4))
    layer = anynorm.LayerNorm((5, 7))
    y = layer.forward(x)
    layer.backward(chunked(arrays["dy"]))
    layer.update(**SGD)
    loss = (y * y).sum()
    with dask.config.set(scheduler="synchronous"):
        out = anynorm.persist(layer, y, loss, scheduler="threads")
    assert threads - {threading.get_ident()}, "no task ran on the thread pool"
    assert len(evaluated) == x.npartitions and set(evaluated.values()) == {1}, evaluated
    assert len(out) == 3 and out[0] is layer
    assert graph_len(out[1]) == out[1].npartitions and graph_len(out[2]) == 1
    ref = anynorm.LayerNorm((5, 7))
    ref_y = ref.forward(arrays["x"])
    ref.backward(arrays["dy"])
    ref.update(**SGD)
    np.testing.assert_allclose(out[1].compute(), ref_y, **TOL)
    np.testing.assert_allclose(out[2].compute(), np.sum(ref_y * ref_y), **TOL)
    for k, v in layer.state_dict().items():
        assert graph_len(v) == v.npartitions
        np.testing.assert_allclose(v.compute(), ref.state_dict()[k], **TOL)
    assert set(evaluated.values()) == {1}  # reading the persisted results recomputes nothing


# ----------------------------------------------------------------------------- eager persist
@pytest.mark.backends("numpy", "array_api_strict", "torch", "jax", "cupy")
@pytest.mark.dtypes("float32", "float64")
def test_persist_is_a_no_op_on_eager_backends(bk):
    """On eager namespaces ``persist`` changes nothing: the very same array objects stay."""
    layer = anynorm.BatchNorm(3)
    x = bk.asarray(np.random.default_rng(0).standard_normal((4, 3)))
    layer.backward(layer.forward(x))
    layer.update(**SGD)
    before = {
        k: v for store in (layer.params, layer.buffers, layer.grads) for k, v in store.items()
    }
    assert layer.persist() is layer
    out = anynorm.persist(layer, x)
    assert out[0] is layer and out[1] is x
    after = {k: v for store in (layer.params, layer.buffers, layer.grads) for k, v in store.items()}
    assert all(after[k] is v for k, v in before.items())


def test_persist_on_numpy_imports_no_dask():
    code = (
        "import sys, numpy as np, anynorm\n"
        "layer = anynorm.LayerNorm(3)\n"
        "layer.backward(layer.forward(np.ones((2, 3)) * np.arange(3)))\n"
        "layer.update(0.1, momentum=0.9)\n"
        "assert layer.persist() is layer\n"
        "assert anynorm.persist(anynorm.L2Norm(), layer, np.ones(2))[1] is layer\n"
        "assert anynorm.persist() == ()\n"
        "print('dask' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


@pytest.mark.parametrize(
    ("arg", "match"),
    [
        (
            [],
            r"argument 1 \(`objects\[1\]`\) must be an anynorm Layer or an array; received "
            r"\[\] \(list\)\. Fix: unpack the sequence: anynorm\.persist\(\*layers\)",
        ),
        (
            anynorm.BatchNorm,
            r"argument 1 .*received <class .*BatchNorm.*Fix: pass a layer "
            r"instance, not the class",
        ),
        ("layer", r"argument 1 .*received 'layer' \(str\)\. Fix: pass anynorm layers and arrays"),
        (3.0, r"argument 1 .*received 3\.0 \(float\).*dask\.persist"),
    ],
    ids=["list", "class", "str", "number"],
)
def test_persist_argument_errors(arg, match):
    with pytest.raises(TypeError, match=r"^anynorm\.persist: " + match):
        anynorm.persist(anynorm.L2Norm(), arg)


def test_persist_list_of_layers_error_names_the_fix():
    layers = [anynorm.L2Norm(), anynorm.L1Norm()]
    with pytest.raises(TypeError, match=r"argument 0 .*anynorm\.persist\(\*layers\)"):
        anynorm.persist(layers)


# ----------------------------------------------------------------------------- unknown chunks
def unknown_rows(a):
    """``a`` after boolean indexing along axis 0: its chunk sizes (and shape) are unknown."""
    out = a[a[:, 0, 0, 0] > -100]
    assert np.isnan(out.shape[0])
    return out


UNKNOWN_X = r"`x` has unknown dimension sizes \(nan, 4, 5, 7\).*Call x\.compute_chunk_sizes\(\)"
UNKNOWN_DY = r"`dy` has unknown dimension sizes \(nan, 4, 5, 7\).*dy\.compute_chunk_sizes\(\)"


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_refuses_unknown_chunk_sizes(bk, name):
    arrays = as_dask(data())
    layer = LAYERS[name]()
    counter = compute_counter()
    with counter:
        with pytest.raises(ValueError, match=rf"^anynorm\.\w+\.forward: {UNKNOWN_X}"):
            layer.forward(unknown_rows(arrays["x"]))
        layer.forward(arrays["x"])
        with pytest.raises(ValueError, match=rf"^anynorm\.\w+\.backward: {UNKNOWN_DY}"):
            layer.backward(unknown_rows(arrays["dy"]))
    assert counter.computes == 0


#: functional forms whose `x` is checked (name -> call with x, dy)
UNKNOWN_FUNCTIONAL = {
    "batch_norm": lambda x, dy, a: F.batch_norm(x, a["w4"]),
    "batch_norm_backward": lambda x, dy, a: F.batch_norm_backward(dy, x, a["w4"]),
    "batch_norm_stats": lambda x, dy, a: F.batch_norm_stats(x),
    "layer_norm": lambda x, dy, a: F.layer_norm(x, axis=(2, 3)),
    "layer_norm_backward": lambda x, dy, a: F.layer_norm_backward(dy, x, axis=(2, 3)),
    "group_norm": lambda x, dy, a: F.group_norm(x, 2),
    "group_norm_backward": lambda x, dy, a: F.group_norm_backward(dy, x, 2),
    "instance_norm": lambda x, dy, a: F.instance_norm(x),
    "instance_norm_backward": lambda x, dy, a: F.instance_norm_backward(dy, x),
    "rms_norm": lambda x, dy, a: F.rms_norm(x),
    "rms_norm_backward": lambda x, dy, a: F.rms_norm_backward(dy, x),
    "local_response_norm": lambda x, dy, a: F.local_response_norm(x, 3),
    "local_response_norm_backward": lambda x, dy, a: F.local_response_norm_backward(dy, x, 3),
    "lp_normalize": lambda x, dy, a: F.lp_normalize(x, 3.0),
    "lp_normalize_backward": lambda x, dy, a: F.lp_normalize_backward(dy, x, 3.0),
    "l1_normalize": lambda x, dy, a: F.l1_normalize(x),
    "l1_normalize_backward": lambda x, dy, a: F.l1_normalize_backward(dy, x),
    "l2_normalize": lambda x, dy, a: F.l2_normalize(x),
    "l2_normalize_backward": lambda x, dy, a: F.l2_normalize_backward(dy, x),
}


@pytest.mark.parametrize("name", list(UNKNOWN_FUNCTIONAL))
def test_functional_form_refuses_unknown_chunk_sizes(bk, name):
    arrays = as_dask(data())
    xu = unknown_rows(arrays["x"])
    call = UNKNOWN_FUNCTIONAL[name]
    func = name  # every functional form names itself (l1/l2 too, not lp_normalize)
    counter = compute_counter()
    with counter:
        with pytest.raises(ValueError, match=rf"^anynorm\.functional\.{func}: {UNKNOWN_X}"):
            call(xu, unknown_rows(arrays["dy"]), arrays)
        if name.endswith("_backward"):
            # only dy unknown: refused, naming `dy` and its unknown shape
            with pytest.raises(ValueError, match=rf"^anynorm\.functional\.{func}: {UNKNOWN_DY}"):
                call(arrays["x"], unknown_rows(arrays["dy"]), arrays)
    assert counter.computes == 0
