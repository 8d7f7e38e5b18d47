"""The layer protocol every layer shares: forward/backward/grads/update/train/eval/state/to."""

from __future__ import annotations

import numpy as np
import pytest

import anynorm

# every layer class with constructor arguments for a (4, 6, 5) NCL input
LAYERS = {
    "L2Norm": lambda: anynorm.L2Norm(axis=1),
    "L1Norm": lambda: anynorm.L1Norm(),
    "LpNorm": lambda: anynorm.LpNorm(3.0, axis=(1, 2)),
    "BatchNorm": lambda: anynorm.BatchNorm(6),
    "LayerNorm": lambda: anynorm.LayerNorm((6, 5)),
    "GroupNorm": lambda: anynorm.GroupNorm(3, 6),
    "InstanceNorm": lambda: anynorm.InstanceNorm(6, affine=True, track_running_stats=True),
    "RMSNorm": lambda: anynorm.RMSNorm(5),
    "LocalResponseNorm": lambda: anynorm.LocalResponseNorm(3),
}
SHAPE = (4, 6, 5)


def _param_tol(bk) -> float:
    """Parameters are float64 or float32 (also for half inputs): tolerance of that dtype."""
    return 1e-12 if bk.dtype_name == "float64" else 1e-6


@pytest.fixture(params=list(LAYERS))
def make(request):
    return LAYERS[request.param]


def test_protocol_shapes_dtypes_and_grads(bk, rng, make):
    layer = make()
    x = bk.asarray(rng.standard_normal(SHAPE))
    y = layer(x)
    bk.check(y, SHAPE)
    dx = layer.backward(bk.asarray(rng.standard_normal(SHAPE)))
    bk.check(dx, SHAPE, what="dx")
    assert set(layer.grads) == set(layer.params)
    for name, p in layer.params.items():
        bk.check(p, p.shape, bk.param_dtype, what=name)
        bk.check(layer.grads[name], p.shape, bk.param_dtype, what=f"grad {name}")
    for name, b in layer.buffers.items():
        if name != "num_batches_tracked":
            bk.check(b, b.shape, bk.param_dtype, what=name)
    assert layer.training is True
    assert layer.eval() is layer and layer.training is False
    assert layer.train() is layer and layer.training is True


def test_backward_before_forward_is_a_runtime_error(make):
    with pytest.raises(RuntimeError, match=r"backward\(\) was called before forward\(\)"):
        make().backward(np.ones(SHAPE))


def test_backward_twice_is_allowed_and_identical(bk, rng, make):
    layer = make()
    layer(bk.asarray(rng.standard_normal(SHAPE)))
    g = bk.asarray(rng.standard_normal(SHAPE))
    a = bk.to_numpy(layer.backward(g))
    grads_a = {k: bk.to_numpy(v) for k, v in layer.grads.items()}
    b = bk.to_numpy(layer.backward(g))
    np.testing.assert_array_equal(a, b)
    for k, v in layer.grads.items():
        np.testing.assert_array_equal(grads_a[k], bk.to_numpy(v))


def test_dy_must_match_the_last_output(bk, rng, make):
    layer = make()
    layer(bk.asarray(rng.standard_normal(SHAPE)))
    with pytest.raises(ValueError, match=r"`dy` must have the shape of the last output"):
        layer.backward(bk.asarray(rng.standard_normal((1, 6, 5))))  # would broadcast
    with pytest.raises(ValueError, match=r"received \(4, 6\)"):
        layer.backward(bk.asarray(rng.standard_normal((4, 6))))
    other = bk.xp.float64 if bk.dtype_name == "float32" else bk.xp.float32
    if bk.device_name != "no_float64":
        with pytest.raises(TypeError, match="`dy` has dtype"):
            layer.backward(bk.asarray(rng.standard_normal(SHAPE), dtype=other))
    if bk.backend != "numpy":
        with pytest.raises(TypeError, match="`dy` is a numpy array"):
            layer.backward(rng.standard_normal(SHAPE).astype(np.float32))
    with pytest.raises(TypeError, match="`dy` must be an array"):
        layer.backward([[1.0]])


def test_update_sgd_with_momentum_and_decay(bk, rng):
    layer = anynorm.BatchNorm(6)
    x = bk.asarray(rng.standard_normal(SHAPE))
    layer(x)
    layer.backward(bk.asarray(rng.standard_normal(SHAPE)))
    theta0 = {k: bk.to_numpy(v) for k, v in layer.params.items()}
    g = {k: bk.to_numpy(v) for k, v in layer.grads.items()}
    snapshot = layer.state_dict()
    lr, mom, decay = 0.1, 0.9, 0.01
    layer.update(lr=lr, momentum=mom, decay=decay)
    v1 = {k: -lr * (g[k] + decay * theta0[k]) for k in g}
    theta1 = {k: theta0[k] + v1[k] for k in g}
    for k in g:
        bk.close(layer.params[k], theta1[k], what=k, tol=_param_tol(bk))
    layer.update(lr=lr, momentum=mom, decay=decay)  # same grads, momentum carries v1
    for k in g:
        v2 = mom * v1[k] - lr * (g[k] + decay * theta1[k])
        bk.close(layer.params[k], theta1[k] + v2, what=k, tol=_param_tol(bk))
        bk.check(layer.params[k], (6,), bk.param_dtype, what=k)
    # arrays handed out by state_dict() before the update are untouched
    for k in g:
        np.testing.assert_array_equal(bk.to_numpy(snapshot[k]), theta0[k])


def test_update_without_params_is_a_no_op_and_without_grads_an_error(bk, rng):
    layer = anynorm.L2Norm()
    layer.update(lr=0.1)
    bn = anynorm.BatchNorm(6)
    bn(bk.asarray(rng.standard_normal(SHAPE)))
    with pytest.raises(RuntimeError, match="no gradients; call forward"):
        bn.update()
    with pytest.raises(ValueError, match="`lr` must be in"):
        bn.update(lr=-1.0)


def test_parameters_follow_the_first_input(bk, rng):
    layer = anynorm.LayerNorm(5)
    assert layer.params == {}
    layer(bk.asarray(rng.standard_normal(SHAPE)))
    bk.check(layer.params["weight"], (5,), bk.param_dtype, what="weight")
    np.testing.assert_array_equal(bk.to_numpy(layer.params["weight"]), np.ones(5))
    np.testing.assert_array_equal(bk.to_numpy(layer.params["bias"]), np.zeros(5))


def test_constructor_xp_device_dtype_create_arrays_up_front(bk):
    layer = anynorm.BatchNorm(6, xp=bk.xp, device=bk.device, dtype=bk.param_dtype)
    for name in ("weight", "bias", "running_mean", "running_var"):
        arr = {**layer.params, **layer.buffers}[name]
        bk.check(arr, (6,), bk.param_dtype, what=name)
    assert int(bk.to_numpy(layer.buffers["num_batches_tracked"])) == 0


def test_other_namespace_is_a_type_error_and_to_moves_the_layer(bk, rng):
    import array_api_compat.numpy as npx

    x = rng.standard_normal(SHAPE)
    layer = anynorm.BatchNorm(6)
    layer(npx.asarray(x))
    layer.backward(npx.asarray(rng.standard_normal(SHAPE)))
    layer.update(lr=0.1, momentum=0.5)
    if bk.backend != "numpy":
        with pytest.raises(TypeError, match=r"are numpy arrays but `x` is a .* layer.to\("):
            layer(bk.asarray(x))
    expect = {k: v.copy() for k, v in layer.state_dict().items()}
    assert layer.to(bk.xp, device=bk.device, dtype=bk.param_dtype) is layer
    for k, v in layer.state_dict().items():
        if k == "num_batches_tracked":
            assert int(bk.to_numpy(v)) == 1
            continue
        bk.check(v, (6,), bk.param_dtype, what=k)
        bk.close(v, expect[k], what=k, tol=_param_tol(bk))
    for k, v in layer.grads.items():
        bk.check(v, (6,), bk.param_dtype, what=f"grad {k}")
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(bk.asarray(rng.standard_normal(SHAPE)))  # cache dropped by to()
    bk.check(layer(bk.asarray(x)), SHAPE)
    layer.backward(bk.asarray(rng.standard_normal(SHAPE)))
    layer.update(lr=0.1, momentum=0.5)  # the velocity moved too
    bk.check(layer.params["weight"], (6,), bk.param_dtype, what="weight")


@pytest.mark.backends("array_api_strict")
def test_other_device_is_a_value_error(bk, rng):
    xp = bk.xp
    other = xp.Device("device2")
    layer = anynorm.BatchNorm(6, xp=xp, device=bk.device, dtype=bk.param_dtype)
    x = bk.asarray(rng.standard_normal(SHAPE)).to_device(other)
    with pytest.raises(ValueError, match=r"on device .* but `x` is on .*device2"):
        layer(x)


def test_state_dict_round_trip_and_strict_errors(bk, rng):
    a = anynorm.BatchNorm(6)
    a(bk.asarray(rng.standard_normal(SHAPE)))
    state = a.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    b = anynorm.BatchNorm(6)
    b.load_state_dict(state)
    for k in state:
        np.testing.assert_array_equal(bk.to_numpy(b.state_dict()[k]), bk.to_numpy(state[k]))
    with pytest.raises(
        ValueError,
        match=r"missing keys \['running_var'\].*unexpected keys"
        r" \['extra'\]",
    ):
        b.load_state_dict(
            {**{k: v for k, v in state.items() if k != "running_var"}, "extra": state["weight"]}
        )
    with pytest.raises(
        ValueError,
        match=r"mis-shaped entries: weight: expected \(6,\), "
        r"received \(5,\)",
    ):
        b.load_state_dict({**state, "weight": bk.asarray(np.ones(5))})
    with pytest.raises(TypeError, match="entry 'bias' must be an array or a number"):
        b.load_state_dict({**state, "bias": "zeros"})
    with pytest.raises(TypeError, match="`state` must be a mapping"):
        b.load_state_dict([1, 2])
    result = b.load_state_dict({"weight": state["weight"], "extra": 1.0}, strict=False)
    assert result.missing_keys == ["bias", "running_mean", "running_var", "num_batches_tracked"]
    assert result.unexpected_keys == ["extra"]


def test_torch_batchnorm2d_state_loads_and_reverse(torch_oracle, rng):
    torch = torch_oracle
    module = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        module.weight.copy_(torch.tensor(rng.standard_normal(3)))
        module.bias.copy_(torch.tensor(rng.standard_normal(3)))
    for _ in range(3):
        module(torch.tensor(rng.standard_normal((4, 3, 5, 5))))
    layer = anynorm.BatchNorm(3)
    layer.load_state_dict({k: v.numpy() for k, v in module.state_dict().items()})
    x = rng.standard_normal((4, 3, 5, 5))
    for mode in ("eval", "train"):
        getattr(module, mode)()
        getattr(layer, mode)()
        np.testing.assert_allclose(
            layer(x), module(torch.tensor(x)).detach().numpy(), rtol=1e-12, atol=1e-12
        )
    back = torch.nn.BatchNorm2d(3).double()
    back.load_state_dict(
        {k: torch.from_numpy(np.asarray(v)) for k, v in layer.state_dict().items()}
    )
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), np.asarray(layer.state_dict()[k]))


def test_repr_shows_the_config():
    assert repr(anynorm.BatchNorm(3, axis=-1)) == (
        "BatchNorm(num_features=3, axis=-1, eps=1e-05, momentum=0.1, affine=True, "
        "track_running_stats=True)"
    )
    assert repr(anynorm.L2Norm()) == "L2Norm(axis=-1, eps=1e-12)"


@pytest.mark.backends("torch")
def test_device_given_as_a_string_matches(bk, rng):
    layer = anynorm.BatchNorm(6, xp=bk.xp, device=str(bk.device), dtype=bk.param_dtype)
    bk.check(layer(bk.asarray(rng.standard_normal(SHAPE))), SHAPE)
