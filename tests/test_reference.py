"""The float64 NumPy reference (the oracle) is itself checked against torch.nn.functional."""

from __future__ import annotations

import math

import numpy as np
import pytest

from anynorm import _reference as ref


@pytest.fixture
def torch(torch_oracle):
    return torch_oracle


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("axis", [-1, 1, (1, 2)])
def test_lp_normalize(torch, rng, p, axis):
    x = rng.standard_normal((3, 4, 5))
    x[0, 1] = 0.0
    expect = torch.nn.functional.normalize(torch.tensor(x), p=p, dim=axis).numpy()
    np.testing.assert_allclose(ref.lp_normalize(x, p, axis), expect, rtol=1e-13, atol=1e-15)


def test_batch_norm(torch, rng):
    x = rng.standard_normal((6, 3, 4, 5))
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    m, v = rng.standard_normal(3), rng.random(3) + 0.1
    t = torch.tensor
    for training, mean, var in ((True, None, None), (False, m, v)):
        expect = torch.nn.functional.batch_norm(t(x), t(m), t(v), t(w), t(b), training=training)
        got = ref.batch_norm(x, w, b, axis=1, mean=mean, var=var)
        np.testing.assert_allclose(got, expect.numpy(), rtol=1e-12, atol=1e-12)


def test_layer_group_instance_rms(torch, rng):
    t = torch.tensor
    F = torch.nn.functional
    x = rng.standard_normal((3, 6, 4, 5))
    w, b = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    np.testing.assert_allclose(
        ref.layer_norm(x, w, b, axis=(2, 3)),
        F.layer_norm(t(x), (4, 5), t(w), t(b)).numpy(),
        atol=1e-12,
    )
    wc, bc = rng.standard_normal(6), rng.standard_normal(6)
    np.testing.assert_allclose(
        ref.group_norm(x, 3, wc, bc), F.group_norm(t(x), 3, t(wc), t(bc)).numpy(), atol=1e-12
    )
    np.testing.assert_allclose(
        ref.instance_norm(x, wc, bc),
        F.instance_norm(t(x), weight=t(wc), bias=t(bc)).numpy(),
        atol=1e-12,
    )
    np.testing.assert_allclose(
        ref.rms_norm(x, w, axis=(2, 3), eps=1e-6),
        F.rms_norm(t(x), (4, 5), t(w), eps=1e-6).numpy(),
        atol=1e-12,
    )


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_local_response_norm(torch, rng, size):
    x = rng.standard_normal((2, 6, 3, 4))
    expect = torch.nn.functional.local_response_norm(torch.tensor(x), size, alpha=0.3, k=1.5)
    np.testing.assert_allclose(
        ref.local_response_norm(x, size, alpha=0.3, k=1.5), expect.numpy(), atol=1e-12
    )


def test_finite_differences_are_accurate(torch, rng):
    x = rng.standard_normal((3, 4))
    g = rng.standard_normal((3, 4))
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.layer_norm(xt, (4,)).backward(torch.tensor(g))
    fd = ref.fd_vjp(lambda z: ref.layer_norm(z), x, g)
    np.testing.assert_allclose(fd, xt.grad.numpy(), rtol=1e-9, atol=1e-10)
    v = rng.standard_normal((3, 4))
    d = ref.fd_directional(lambda z: ref.layer_norm(z), x, g, v)
    assert abs(d - float(np.sum(xt.grad.numpy() * v))) < 1e-9
