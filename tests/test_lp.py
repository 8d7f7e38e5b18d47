"""Lp normalization: functional forms and L1Norm/L2Norm/LpNorm layers on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest

import anynorm
from anynorm import _reference as ref
from anynorm import functional as F

PS = [1.0, 2.0, 3.0, math.inf]
AXES = [-1, 1, (1, 2), None]


@pytest.mark.parametrize("p", PS, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("axis", AXES, ids=str)
def test_forward_matches_reference(bk, rng, p, axis):
    x = bk.round(rng.standard_normal((3, 4, 5)))
    y = F.lp_normalize(bk.asarray(x), p, axis)
    bk.check(y, x.shape)
    bk.close(y, ref.lp_normalize(x, p, axis))


@pytest.mark.parametrize("p", PS, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("axis", AXES, ids=str)
def test_backward_matches_torch_autograd(bk, rng, torch_oracle, p, axis):
    torch = torch_oracle
    x = bk.round(rng.standard_normal((3, 4, 5)))
    g = bk.round(rng.standard_normal((3, 4, 5)))
    xt = torch.tensor(x, requires_grad=True)
    if axis is None:
        yt = torch.nn.functional.normalize(xt.reshape(1, -1), p=p, dim=1).reshape(x.shape)
    else:
        yt = torch.nn.functional.normalize(xt, p=p, dim=axis)
    yt.backward(torch.tensor(g))
    dx = F.lp_normalize_backward(bk.asarray(g), bk.asarray(x), p, axis)
    bk.check(dx, x.shape, what="dx")
    bk.close(dx, xt.grad.numpy(), what="dx")
    # the layer gives the same gradient as the functional form
    layer = anynorm.LpNorm(p, axis)
    y = layer(bk.asarray(x))
    bk.check(y, x.shape)
    # the bar: forward within 1e-12 of torch.nn.functional.normalize in float64
    bk.close(y, yt.detach().numpy(), tol=1e-12 if bk.dtype_name == "float64" else None)
    dxl = layer.backward(bk.asarray(g))
    bk.check(dxl, x.shape, what="layer dx")
    bk.close(dxl, xt.grad.numpy(), what="layer dx")
    assert layer.params == {} and layer.grads == {} and layer.buffers == {}


@pytest.mark.dtypes("float64")
@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, math.inf], ids=lambda p: f"p{p}")
def test_backward_matches_finite_differences(bk, rng, p):
    x = rng.standard_normal((2, 5))
    g = rng.standard_normal((2, 5))
    expect = ref.fd_vjp(lambda z: ref.lp_normalize(z, p, -1), x, g)
    dx = F.lp_normalize_backward(bk.asarray(g), bk.asarray(x), p, -1)
    bk.close(dx, expect, what="dx", tol=1e-10)


@pytest.mark.parametrize("layer_cls, p", [(anynorm.L1Norm, 1.0), (anynorm.L2Norm, 2.0)])
def test_named_layers_equal_lpnorm(bk, rng, layer_cls, p):
    x = bk.round(rng.standard_normal((4, 6)))
    g = bk.round(rng.standard_normal((4, 6)))
    a, b = layer_cls(axis=1), anynorm.LpNorm(p, axis=1)
    ya, yb = a(bk.asarray(x)), b(bk.asarray(x))
    bk.close(ya, bk.to_numpy(yb), tol=0.0)
    bk.close(a.backward(bk.asarray(g)), bk.to_numpy(b.backward(bk.asarray(g))), tol=0.0)
    assert a.get_config() == {"axis": 1, "eps": 1e-12}


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # float16: g/eps > 65504
@pytest.mark.parametrize("p", PS, ids=lambda p: f"p{p}")
def test_zero_vectors_give_zero_and_finite_gradient(bk, rng, p):
    x = rng.standard_normal((3, 4))
    x[1] = 0.0
    g = rng.standard_normal((3, 4))
    xa = bk.asarray(x)
    y = bk.to_numpy(F.lp_normalize(xa, p))
    dx = bk.to_numpy(F.lp_normalize_backward(bk.asarray(g), xa, p))
    assert np.all(y[1] == 0.0)
    assert not np.any(np.isnan(dx))
    # in the clamped region the map is x/eps: the gradient is g/eps (rounded to the dtype;
    # 1e12 exceeds float16's range, so there, and only there, it is ±inf as in torch)
    expect = bk.round(bk.round(g)[1] / 1e-12)
    np.testing.assert_allclose(dx[1], expect, rtol=bk.tol)
    assert np.all(np.isfinite(dx[[0, 2]]))
    if bk.dtype_name != "float16":
        assert np.all(np.isfinite(dx))


@pytest.mark.dtypes("float64")
def test_clamped_region_matches_torch(bk, torch_oracle, rng):
    torch = torch_oracle
    x = rng.standard_normal((4, 3)) * np.array([[1.0], [1e-13], [1e-11], [0.0]])
    g = rng.standard_normal((4, 3))
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.normalize(xt, dim=1, eps=1e-12).backward(torch.tensor(g))
    dx = F.l2_normalize_backward(bk.asarray(g), bk.asarray(x), axis=1)
    bk.close(dx, xt.grad.numpy(), what="dx")


def test_unit_norm_and_direction(bk, rng):
    x = bk.round(rng.standard_normal((5, 7)) * 100)
    y = bk.to_numpy(F.l2_normalize(bk.asarray(x)))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, rtol=10 * bk.tol)
    y1 = bk.to_numpy(F.l1_normalize(bk.asarray(x)))
    np.testing.assert_allclose(np.abs(y1).sum(axis=-1), 1.0, rtol=10 * bk.tol)


@pytest.mark.dtypes("float16")
def test_float16_large_values_do_not_overflow(bk, rng):
    # sum of squares of 6e4 overflows float16 (max 65504): the norm is taken in float32
    x = bk.round(rng.choice([-6e4, 6e4, 300.0], size=(4, 64)))
    y = F.l2_normalize(bk.asarray(x))
    bk.check(y, x.shape)
    bk.close(y, ref.lp_normalize(x, 2.0, -1))


def test_inputs_are_not_modified(bk, rng):
    x = rng.standard_normal((3, 4))
    g = rng.standard_normal((3, 4))
    xa, ga = bk.asarray(x), bk.asarray(g)
    x0, g0 = bk.to_numpy(xa), bk.to_numpy(ga)
    layer = anynorm.L2Norm()
    layer(xa)
    layer.backward(ga)
    F.lp_normalize_backward(ga, xa, 3.0)
    np.testing.assert_array_equal(bk.to_numpy(xa), x0)
    np.testing.assert_array_equal(bk.to_numpy(ga), g0)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"p": 0.5}, ValueError, r"`p` must be in \[1.0, inf\]; received 0.5"),
        ({"p": True}, ValueError, "`p` must be a real number >= 1 or math.inf; received True"),
        ({"p": math.nan}, ValueError, "`p` must be a real number >= 1"),
        ({"p": "2"}, TypeError, "`p` must be a real number; received '2'"),
        ({"eps": -1.0}, ValueError, r"`eps` must be in \[0.0, inf\); received -1.0"),
        ({"axis": 2}, ValueError, r"`axis`=2 is out of range for a 2-D input"),
        ({"axis": (1, -1)}, ValueError, r"repeats an axis"),
        ({"axis": 1.0}, TypeError, "`axis` must be an int, a tuple of ints or None"),
    ],
)
def test_functional_argument_errors(bk, kwargs, exc, match):
    x = bk.asarray(np.ones((2, 3)))
    with pytest.raises(exc, match=match):
        F.lp_normalize(x, **kwargs)


def test_integer_input_is_a_type_error(bk):
    x = (
        bk.xp.ones((2, 3), dtype=bk.xp.int32, device=bk.device)
        if bk.backend != "dask"
        else (bk.xp.ones((2, 3), dtype=bk.xp.int32))
    )
    with pytest.raises(TypeError, match="`x` must have a real floating dtype"):
        F.l2_normalize(x)
    with pytest.raises(TypeError, match="`x` must have a real floating dtype"):
        anynorm.L2Norm()(x)
