"""BatchNorm against torch.nn.BatchNorm1d/2d/3d, the float64 reference and finite differences."""

from __future__ import annotations

import numpy as np
import pytest

import anynorm
from anynorm import _reference as ref
from anynorm import functional as F

SHAPES = {
    "NC": ((8, 3), "BatchNorm1d"),
    "NCHW": ((4, 3, 5, 6), "BatchNorm2d"),
    "NCDHW": ((2, 3, 4, 3, 2), "BatchNorm3d"),
}
CONFIGS = [
    {"momentum": 0.1, "affine": True, "track_running_stats": True},
    {"momentum": None, "affine": True, "track_running_stats": True},
    {"momentum": 0.3, "affine": False, "track_running_stats": True},
    {"momentum": 0.1, "affine": True, "track_running_stats": False},
]


def _torch_bn(torch, kind, n, cfg, rng):
    module = getattr(torch.nn, kind)(n, eps=1e-5, **cfg).double()
    if cfg["affine"]:
        with torch.no_grad():
            module.weight.copy_(torch.tensor(rng.standard_normal(n) + 1.0))
            module.bias.copy_(torch.tensor(rng.standard_normal(n)))
    return module


def _compare_steps(bk, torch, layer, module, shape, rng, perm=None, steps=5):
    """5 training steps then one eval step: outputs, dx, dweight/dbias, running stats."""
    for step in range(steps + 1):
        if step == steps:
            layer.eval()
            module.eval()
        x = bk.round(rng.standard_normal(shape) * 2.0 + 0.5)
        g = bk.round(rng.standard_normal(shape))
        xt = torch.tensor(x, requires_grad=True)
        for p in module.parameters():
            p.grad = None
        xin = xt if perm is None else xt.permute(*perm)
        yt = module(xin)
        yt = yt if perm is None else yt.permute(*np.argsort(perm))
        yt.backward(torch.tensor(g))

        y = layer(bk.asarray(x))
        bk.check(y, shape)
        bk.close(y, yt.detach().numpy(), what=f"step {step} y")
        dx = layer.backward(bk.asarray(g))
        bk.check(dx, shape, what="dx")
        bk.close(dx, xt.grad.numpy(), what=f"step {step} dx")
        for name, param in module.named_parameters():
            bk.check(layer.params[name], param.shape, bk.param_dtype, what=name)
            bk.check(layer.grads[name], param.shape, bk.param_dtype, what=f"grad {name}")
            bk.close(layer.grads[name], param.grad.numpy(), what=f"step {step} d{name}")
        for name in ("running_mean", "running_var"):
            if module.track_running_stats:
                buf = layer.buffers[name]
                bk.check(buf, (module.num_features,), bk.param_dtype, what=name)
                bk.close(buf, getattr(module, name).numpy(), what=f"step {step} {name}")
        if module.track_running_stats:
            nbt = layer.buffers["num_batches_tracked"]
            assert int(bk.to_numpy(nbt)) == int(module.num_batches_tracked)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("layout", list(SHAPES))
def test_matches_torch_over_training_steps(bk, rng, torch_oracle, layout, cfg):
    shape, kind = SHAPES[layout]
    module = _torch_bn(torch_oracle, kind, shape[1], cfg, rng)
    layer = anynorm.BatchNorm(**cfg)
    if cfg["affine"]:
        layer.load_state_dict(
            {k: bk.asarray(v.detach().numpy()) for k, v in module.named_parameters()}, strict=False
        )
    _compare_steps(bk, torch_oracle, layer, module, shape, rng)


@pytest.mark.parametrize("shape", [(4, 5, 6, 3), (6, 7, 3)], ids=str)
def test_channels_last_matches_torch_on_permuted_tensor(bk, rng, torch_oracle, shape):
    cfg = CONFIGS[0]
    kind = "BatchNorm2d" if len(shape) == 4 else "BatchNorm1d"
    module = _torch_bn(torch_oracle, kind, shape[-1], cfg, rng)
    layer = anynorm.BatchNorm(shape[-1], axis=-1, **cfg)
    layer.load_state_dict({k: bk.asarray(v.numpy()) for k, v in module.state_dict().items()})
    perm = (0, len(shape) - 1, *range(1, len(shape) - 1))
    _compare_steps(bk, torch_oracle, layer, module, shape, rng, perm=perm)


def test_numpynet_per_pixel_axes_match_reference(bk, rng):
    """axis=(1, 2, 3) on NHWC: one statistic per pixel and channel (NumPyNet's layout)."""
    shape = (6, 3, 4, 2)
    x = bk.round(rng.standard_normal(shape) * 3 + 1)
    g = bk.round(rng.standard_normal(shape))
    w, b = rng.standard_normal(shape[1:]), rng.standard_normal(shape[1:])
    layer = anynorm.BatchNorm(shape[1:], axis=(1, 2, 3))
    layer.load_state_dict({"weight": w, "bias": b}, strict=False)
    # parameters loaded before the first forward adopt the given arrays' namespace (NumPy):
    # move them to the case's namespace, device and parameter dtype
    layer.to(bk.xp, device=bk.device, dtype=bk.param_dtype)
    y = layer(bk.asarray(x))
    bk.check(y, shape)
    bk.close(y, ref.batch_norm(x, w, b, axis=(1, 2, 3)))
    dx = layer.backward(bk.asarray(g))
    bk.check(dx, shape, what="dx")
    if bk.dtype_name == "float64":
        expect = ref.fd_vjp(lambda z: ref.batch_norm(z, w, b, axis=(1, 2, 3)), x, g)
        bk.close(dx, expect, what="dx", tol=1e-10)
    bk.check(layer.grads["weight"], shape[1:], bk.param_dtype, what="dweight")


@pytest.mark.dtypes("float64")
@pytest.mark.parametrize("axis, shape", [(1, (5, 3)), (1, (3, 2, 4)), (-1, (3, 2, 2, 3))])
def test_gradients_match_finite_differences(bk, rng, axis, shape):
    x = rng.standard_normal(shape)
    g = rng.standard_normal(shape)
    n = shape[axis]
    w, b = rng.standard_normal(n), rng.standard_normal(n)
    mean, var = rng.standard_normal(n), rng.random(n) + 0.5
    xa, ga, wa = bk.asarray(x), bk.asarray(g), bk.asarray(w)
    # training (batch statistics): through the mean and variance
    dx, dw, db = F.batch_norm_backward(ga, xa, wa, axis=axis)
    bk.close(dx, ref.fd_vjp(lambda z: ref.batch_norm(z, w, b, axis=axis), x, g), "dx", 1e-10)
    bk.close(dw, ref.fd_vjp(lambda v: ref.batch_norm(x, v, b, axis=axis), w, g), "dw", 1e-10)
    bk.close(db, ref.fd_vjp(lambda v: ref.batch_norm(x, w, v, axis=axis), b, g), "db", 1e-10)
    # evaluation (frozen statistics)
    ma, va = bk.asarray(mean), bk.asarray(var)
    dx, dw, db = F.batch_norm_backward(ga, xa, wa, axis=axis, mean=ma, var=va)

    def frozen(z, v=w, c=b):
        return ref.batch_norm(z, v, c, axis=axis, mean=mean, var=var)

    bk.close(dx, ref.fd_vjp(frozen, x, g), "frozen dx", 1e-10)
    bk.close(dw, ref.fd_vjp(lambda v: frozen(x, v), w, g), "frozen dw", 1e-10)
    bk.close(db, ref.fd_vjp(lambda c: frozen(x, w, c), b, g), "frozen db", 1e-10)


def test_functional_forms(bk, rng):
    shape = (6, 4, 3)
    x = bk.round(rng.standard_normal(shape))
    w, b = bk.round(rng.standard_normal(4)), bk.round(rng.standard_normal(4))
    wa, ba = bk.asarray(w, dtype=bk.param_dtype), bk.asarray(b, dtype=bk.param_dtype)
    y = F.batch_norm(bk.asarray(x), wa, ba)
    bk.check(y, shape)
    bk.close(y, ref.batch_norm(x, w, b))
    mean, var = F.batch_norm_stats(bk.asarray(x))
    bk.check(mean, (4,), bk.param_dtype, "mean")
    bk.close(mean, x.mean(axis=(0, 2)), "mean")
    bk.close(var, x.var(axis=(0, 2)), "var")
    dx, dw, db = F.batch_norm_backward(bk.asarray(rng.standard_normal(shape)), bk.asarray(x), wa)
    bk.check(dx, shape, what="dx")
    bk.check(dw, (4,), bk.param_dtype, "dw")
    bk.check(db, (4,), bk.param_dtype, "db")


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1)])
def test_one_value_per_feature_in_training_is_an_error(bk, shape):
    x = bk.asarray(np.ones(shape))
    with pytest.raises(ValueError, match="expected more than 1 value per feature"):
        anynorm.BatchNorm()(x)
    with pytest.raises(ValueError, match="expected more than 1 value per feature"):
        F.batch_norm(x)
    layer = anynorm.BatchNorm(3)
    layer(bk.asarray(np.arange(6.0).reshape((2, 3, *shape[2:]))))
    layer.eval()
    bk.check(layer(x), shape)  # running statistics: fine with one sample


@pytest.mark.dtypes("float16", "bfloat16")
def test_half_precision_large_reduction_does_not_overflow(bk, rng):
    shape = (64, 4, 16, 16)
    x = bk.round(3 * rng.standard_normal(shape) + 1)
    layer = anynorm.BatchNorm()
    y = layer(bk.asarray(x))
    bk.check(y, shape)
    bk.close(y, ref.batch_norm(x))
    for name in ("weight", "bias", "running_mean", "running_var"):
        arr = layer.params.get(name, layer.buffers.get(name))
        bk.check(arr, (4,), bk.xp.float32, what=name)
    assert np.all(np.isfinite(bk.to_numpy(layer.buffers["running_var"])))
    dx = layer.backward(bk.asarray(rng.standard_normal(shape)))
    assert np.all(np.isfinite(bk.to_numpy(dx)))


def test_num_features_mismatch_is_an_error(bk):
    layer = anynorm.BatchNorm(4)
    with pytest.raises(ValueError, match=r"num_features=4 .* feature shape \(3,\)"):
        layer(bk.asarray(np.ones((2, 3))))
    with pytest.raises(ValueError, match="names 1 feature axes"):
        anynorm.BatchNorm((3, 4), axis=1)
    with pytest.raises(ValueError, match="includes the batch axis 0"):
        anynorm.BatchNorm(axis=0)(bk.asarray(np.ones((2, 3))))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"eps": -1e-3}, ValueError, "`eps` must be in"),
        ({"momentum": 1.5}, ValueError, r"`momentum` must be in \[0.0, 1.0\]"),
        ({"momentum": "0.1"}, TypeError, "`momentum` must be a real number"),
        ({"affine": 1}, TypeError, "`affine` must be True or False"),
        ({"num_features": 0}, ValueError, "non-empty tuple of positive ints"),
        ({"num_features": 2.5}, TypeError, "`num_features` must be an int or a tuple"),
        ({"axis": None}, TypeError, "`axis` must be an int or a non-empty tuple"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        anynorm.BatchNorm(**kwargs)


def test_sgd_loop_is_identical_on_numpy_and_torch(torch_oracle):
    """50 steps of SGD with momentum and decay on a tiny regression through BatchNorm:
    the loss curves of NumPy and torch float64 agree to 1e-8."""
    import array_api_compat.numpy as npx

    torch = torch_oracle
    rng = np.random.default_rng(3)
    x_np = rng.standard_normal((16, 4))
    target = rng.standard_normal((16, 4))

    def run(to):
        layer = anynorm.BatchNorm(4)
        losses = []
        for _ in range(50):
            y = layer(to(x_np))
            diff = y - to(target)
            losses.append(float(np.sum(np.asarray(anynorm._compat.to_numpy(diff)) ** 2)))
            layer.backward(2.0 * diff)
            layer.update(lr=0.05, momentum=0.9, decay=1e-3)
        return np.array(losses)

    a = run(lambda v: npx.asarray(v))
    b = run(lambda v: torch.asarray(v, dtype=torch.float64))
    assert a[-1] < 0.5 * a[0]
    np.testing.assert_allclose(a, b, rtol=1e-8)
