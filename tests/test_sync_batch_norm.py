"""Synchronized batch norm (``BatchNorm(sync=...)``) on every backend, in one process.

The ranks are threads and the collective is :class:`ThreadSum`, an all-reduce written here
(a barrier and a sum in rank order, in the arrays' own namespace), so the math of the sync
path runs on NumPy, array-api-strict, torch, JAX and Dask alike. The oracle is
``torch.nn.BatchNorm*d`` in float64 on the concatenated batch. The same layer over real
processes (torch.distributed/gloo, mpi4py) is tested in ``tests/test_distributed.py``.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_batch_norm import _torch_bn

import anynorm
from anynorm import functional as F

TIMEOUT = 60.0


class ThreadSum:
    """An all-reduce (SUM) among ``world`` threads; ``hook(rank)`` is one rank's sync hook.
    Records the length of every array each rank sends."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world, timeout=TIMEOUT)
        self.sent: list[list[int]] = [[] for _ in range(world)]

    def hook(self, rank: int):
        def sync(a):
            self.sent[rank].append(int(a.shape[0]))
            self.slots[rank] = a
            self.barrier.wait()
            total = self.slots[0]
            for other in self.slots[1:]:
                total = total + other
            self.barrier.wait()  # nobody overwrites a slot before everyone has summed
            return total

        return sync


def run_ranks(world: int, fn):
    """``[fn(rank) for rank in range(world)]`` with one thread per rank; re-raises the first
    error (the barrier is aborted so the other ranks do not hang)."""
    results: list = [None] * world
    errors: list = []
    barrier_holder: list = []

    def target(rank):
        try:
            results[rank] = fn(rank)
        except BaseException as err:  # re-raised in the main thread
            errors.append(err)
            for b in barrier_holder:
                b.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    if errors:
        raise errors[0]
    return results


def settle(bk, layers, out):
    """On Dask, compute a step's outputs and the layers' state in one graph execution
    (``anynorm.persist``, as a Dask training loop does); elsewhere nothing to do."""
    if bk.backend != "dask":
        return out
    flat = [a for y, dx, grads in out for a in (y, dx, *grads.values())]
    done = iter(anynorm.persist(*layers, *flat)[len(layers) :])
    return [(next(done), next(done), {k: next(done) for k in grads}) for _, _, grads in out]


def shards(a: np.ndarray, sizes: tuple[int, ...]) -> list[np.ndarray]:
    return np.split(a, np.cumsum(sizes)[:-1], axis=0)


# (feature shape after the batch axis, axis, per-rank batch sizes, torch module)
CASES = {
    "NC-2ranks-1+4": ((3,), 1, (1, 4), "BatchNorm1d"),
    "NCHW-2ranks-3+2": ((3, 4, 5), 1, (3, 2), "BatchNorm2d"),
    "NCL-3ranks-2+1+3": ((4, 6), 1, (2, 1, 3), "BatchNorm1d"),
    "NHWC-3ranks-1+3+2": ((4, 3, 5), -1, (1, 3, 2), "BatchNorm2d"),
    "NCHW-3ranks-3+0+2": ((2, 3, 3), 1, (3, 0, 2), "BatchNorm2d"),
}
CONFIGS = [
    {"momentum": 0.1, "affine": True, "track_running_stats": True},
    {"momentum": None, "affine": False, "track_running_stats": True},
    {"momentum": 0.1, "affine": True, "track_running_stats": False},
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("case", list(CASES))
def test_sync_layer_equals_full_batch_torch(bk, rng, torch_oracle, case, cfg):
    """3 training steps with SGD updates, then an evaluation step: every rank's output and
    input gradient are its slice of the full-batch ones; parameter gradients, parameters
    and running statistics equal the full-batch ones on every rank."""
    torch = torch_oracle
    fshape, axis, sizes, kind = CASES[case]
    world, n = len(sizes), sum(sizes)
    shape = (n, *fshape)
    perm = None if axis == 1 else (0, len(shape) - 1, *range(1, len(shape) - 1))
    c = shape[1] if axis == 1 else shape[-1]
    module = _torch_bn(torch, kind, c, cfg, rng)
    hub = ThreadSum(world)
    layers = [anynorm.BatchNorm(c, axis=axis, sync=hub.hook(r), **cfg) for r in range(world)]
    if cfg["affine"]:
        for layer in layers:
            layer.load_state_dict(
                {k: bk.asarray(v.detach().numpy()) for k, v in module.named_parameters()},
                strict=False,
            )
    for step in range(4):
        if step == 3:
            module.eval()
            for layer in layers:
                layer.eval()
        x = bk.round(rng.standard_normal(shape) * 2.0 + 3.0)
        g = bk.round(rng.standard_normal(shape))
        xt = torch.tensor(x, requires_grad=True)
        yt = module(xt if perm is None else xt.permute(*perm))
        yt = yt if perm is None else yt.permute(*np.argsort(perm))
        yt.backward(torch.tensor(g))
        xs, gs = shards(x, sizes), shards(g, sizes)

        def rank_step(r, xs=xs, gs=gs, step=step):
            layer = layers[r]
            y = layer.forward(bk.asarray(xs[r]))
            dx = layer.backward(bk.asarray(gs[r]))
            grads = dict(layer.grads)
            if cfg["affine"] and step < 3:
                layer.update(lr=0.1)
            return y, dx, grads

        out = settle(bk, layers, run_ranks(world, rank_step))
        for r, (y, dx, _) in enumerate(out):
            bk.check(y, xs[r].shape, what=f"rank {r} y")
            bk.check(dx, xs[r].shape, what=f"rank {r} dx")
        what = f"step {step}"
        bk.close_parts([o[0] for o in out], yt.detach().numpy(), what=f"{what} y")
        bk.close_parts([o[1] for o in out], xt.grad.numpy(), what=f"{what} dx")
        for name, p in module.named_parameters():
            for r, (_, _, grads) in enumerate(out):
                bk.check(grads[name], (c,), bk.param_dtype, what=f"rank {r} grad {name}")
                bk.close(grads[name], p.grad.numpy(), what=f"{what} rank {r} d{name}")
        with torch.no_grad():
            for p in module.parameters():
                if step < 3:
                    p -= 0.1 * p.grad
                p.grad = None
        for r, layer in enumerate(layers):
            for name, p in module.named_parameters():
                bk.close(layer.params[name], p.detach().numpy(), what=f"{what} rank {r} {name}")
            if cfg["track_running_stats"]:
                for name in ("running_mean", "running_var"):
                    buf = layer.buffers[name]
                    bk.check(buf, (c,), bk.param_dtype, what=f"rank {r} {name}")
                    bk.close(buf, getattr(module, name).numpy(), what=f"{what} rank {r} {name}")
                assert int(bk.to_numpy(layer.buffers["num_batches_tracked"])) == int(
                    module.num_batches_tracked
                )


def test_sync_functional_forms_equal_full_batch(bk, rng, torch_oracle):
    """batch_norm / batch_norm_backward / batch_norm_stats with ``sync``, batch and frozen
    statistics, against torch.nn.functional.batch_norm on the concatenated batch."""
    torch = torch_oracle
    sizes, c = (2, 3), 3
    shape = (sum(sizes), c, 4)
    x = bk.round(rng.standard_normal(shape) * 3.0 - 2.0)
    g = bk.round(rng.standard_normal(shape))
    w = bk.round(rng.standard_normal(c) + 1.0)
    b = bk.round(rng.standard_normal(c))
    rm, rv = bk.round(rng.standard_normal(c)), bk.round(rng.random(c) + 0.5)
    xs, gs = shards(x, sizes), shards(g, sizes)
    for frozen in (False, True):
        xt = torch.tensor(x, requires_grad=True)
        wt = torch.tensor(w, requires_grad=True)
        bt = torch.tensor(b, requires_grad=True)
        yt = torch.nn.functional.batch_norm(
            xt, torch.tensor(rm), torch.tensor(rv), wt, bt, training=not frozen, eps=1e-5
        )
        yt.backward(torch.tensor(g))
        hub = ThreadSum(len(sizes))
        stats = {} if not frozen else {"mean": bk.asarray(rm), "var": bk.asarray(rv)}

        def rank(r, hub=hub, stats=stats):
            sync = hub.hook(r)
            xr, gr = bk.asarray(xs[r]), bk.asarray(gs[r])
            wr, br = bk.asarray(w), bk.asarray(b)
            y = F.batch_norm(xr, wr, br, sync=sync, **stats)
            dx, dw, db = F.batch_norm_backward(gr, xr, wr, sync=sync, **stats)
            mean, var = F.batch_norm_stats(xr, sync=sync)
            return y, dx, dw, db, mean, var

        out = run_ranks(len(sizes), rank)
        what = "frozen" if frozen else "batch"
        bk.close_parts([o[0] for o in out], yt.detach().numpy(), what=f"{what} y")
        bk.close_parts([o[1] for o in out], xt.grad.numpy(), what=f"{what} dx")
        for r, (_, _, dw, db, mean, var) in enumerate(out):
            bk.check(dw, (c,), bk.param_dtype, what=f"rank {r} dw")
            bk.close(dw, wt.grad.numpy(), what=f"{what} rank {r} dw")
            bk.close(db, bt.grad.numpy(), what=f"{what} rank {r} db")
            bk.close(mean, x.mean(axis=(0, 2)), what=f"rank {r} mean")
            bk.close(var, x.var(axis=(0, 2)), what=f"rank {r} var")


@pytest.mark.dtypes("float64")
def test_sync_statistics_are_two_pass_exact(bk, rng):
    """Mean 1e8, std 1 over 2 ranks: E[x²]−E[x]² would lose every digit; the synced
    two-pass variance matches the float64 NumPy two-pass variance of the whole batch to
    rounding (measured 2.5e-16 relative; 1e-12 allowed for other summation orders)."""
    sizes = (5, 7)
    x = rng.standard_normal((sum(sizes), 3)) + 1e8
    hub = ThreadSum(2)
    xs = shards(x, sizes)
    out = run_ranks(2, lambda r: F.batch_norm_stats(bk.asarray(xs[r]), sync=hub.hook(r)))
    ref = x.var(axis=0)
    for mean, var in out:
        np.testing.assert_allclose(bk.to_numpy(mean), x.mean(axis=0), rtol=1e-15)
        np.testing.assert_allclose(bk.to_numpy(var), ref, rtol=1e-12)


@pytest.mark.dtypes("float32")
def test_sync_communication_per_step(bk, rng):
    """What each rank all-reduces per step: ``C + 1`` and ``C`` values in a training
    forward, ``2C`` in backward; nothing in an evaluation forward with running statistics,
    and ``2C`` in its backward only for the parameter gradients of an affine layer."""
    c, sizes = 5, (2, 3)
    x = rng.standard_normal((sum(sizes), c, 2))
    xs, gs = shards(x, sizes), shards(rng.standard_normal(x.shape), sizes)
    for affine in (True, False):
        hub = ThreadSum(2)
        layers = [anynorm.BatchNorm(c, affine=affine, sync=hub.hook(r)) for r in range(2)]

        def step(r, layers=layers):
            y = layers[r].forward(bk.asarray(xs[r]))
            layers[r].backward(bk.asarray(gs[r]))
            return y

        run_ranks(2, step)
        assert hub.sent == [[c + 1, c, 2 * c]] * 2
        for layer in layers:
            layer.eval()
        run_ranks(2, step)
        assert hub.sent == [[c + 1, c, 2 * c] + ([2 * c] if affine else [])] * 2


def test_sync_hook_contract_errors(bk, rng):
    x = bk.asarray(rng.standard_normal((4, 3)))
    with pytest.raises(TypeError, match=r"BatchNorm: `sync` must be None or a callable.*'no'"):
        anynorm.BatchNorm(3, sync="no")
    layer = anynorm.BatchNorm(3)
    with pytest.raises(TypeError, match="`sync` must be None or a callable"):
        layer.sync = 3
    assert layer.sync is None
    with pytest.raises(TypeError, match=r"batch_norm: `sync` must be None or a callable"):
        F.batch_norm(x, sync=object())
    bad_shape = anynorm.BatchNorm(3, sync=lambda a: a[:1])
    with pytest.raises(ValueError, match=r"`sync` hook .* returned shape \(1,\).*shape \(4,\)"):
        bad_shape.forward(x)
    bad_kind = anynorm.BatchNorm(3, sync=lambda a: [1.0, 2.0])
    with pytest.raises(TypeError, match=r"`sync` hook .* returned list; it must return"):
        bad_kind.forward(x)
    bad_backward = anynorm.BatchNorm(3, sync=lambda a: a if a.shape[0] != 6 else a[:2])
    bad_backward.forward(x)
    with pytest.raises(ValueError, match=r"BatchNorm.backward: the `sync` hook"):
        bad_backward.backward(bk.asarray(rng.standard_normal((4, 3))))


def test_single_rank_sync_equals_plain_batch_norm(bk, rng):
    """A world of one (the hook is the identity) gives exactly the unsynchronized layer, and
    the hook survives ``to()`` but is not saved (set it again after load)."""
    x = bk.asarray(rng.standard_normal((6, 3, 4)) + 1.0)
    g = bk.asarray(rng.standard_normal((6, 3, 4)))
    calls = []

    def identity(a):
        calls.append(int(a.shape[0]))
        return a

    plain, synced = anynorm.BatchNorm(3), anynorm.BatchNorm(3, sync=identity)
    bk.close(synced.forward(x), bk.to_numpy(plain.forward(x)), what="y")
    bk.close(synced.backward(g), bk.to_numpy(plain.backward(g)), what="dx")
    for name in ("weight", "bias"):
        bk.close(synced.grads[name], bk.to_numpy(plain.grads[name]), what=name)
    for name in ("running_mean", "running_var"):
        bk.close(synced.buffers[name], bk.to_numpy(plain.buffers[name]), what=name)
    assert calls == [4, 3, 6]
    assert synced.to(bk.xp, device=bk.device).sync is identity
    assert "sync" not in synced._config()
