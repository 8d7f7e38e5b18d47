"""LayerNorm, GroupNorm, InstanceNorm, RMSNorm and LocalResponseNorm on every backend case.

Oracles, none of which share code with anynorm:

- ``torch.nn`` modules (for the layers) and ``torch.nn.functional`` (for the functional
  forms), run on the CPU in float64 on the *same rounded* input (``bk.round``) and
  differentiated by autograd with a random upstream gradient (never ones). Channels-last
  inputs go to torch permuted to channels-first, and the results come back permuted.
- the float64 NumPy textbook reference (``anynorm._reference``);
- central finite differences (float64 cases only, small shapes).

Every output and gradient is checked for namespace, dtype, device and shape (``bk.check``)
and compared with the per-dtype relative tolerance (``bk.close``); inputs, upstream
gradients and loaded parameters are checked to be left unmodified.

Runtime: JAX compiles every primitive once per (shape, dtype), so the tests share a few
input shapes, and each layer test also checks the functional form on the same data.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

import anynorm as an
from anynorm import _reference as ref
from anynorm import functional as AF

#: finite differences (Richardson, O(h⁴)) against the explicit backward, float64 only
FD_TOL = 1e-10
#: alpha large enough for the LRN window to matter (torch's default 1e-4 would hide it)
LRN = {"alpha": 0.4, "beta": 0.75, "k": 1.2}
EPS = 1e-5


# ----------------------------------------------------------------------------- helpers
def _data(rng, shape):
    """Random input with a non-zero mean, so centring matters."""
    return rng.standard_normal(shape) * 1.5 + 0.7


def _params(rng, shapes):
    """Random, non-trivial parameters: weights (and variances) in [0.5, 1.5], never all
    ones; biases (and means) standard normal."""
    return {
        name: rng.uniform(0.5, 1.5, shape)
        if name in ("weight", "var")
        else rng.standard_normal(shape)
        for name, shape in shapes.items()
    }


def _cl(shape_cf):
    """The channels-last shape of a channels-first ``(N, C, *spatial)`` shape."""
    return (shape_cf[0], *shape_cf[2:], shape_cf[1])


def _case_params(bk, params_np):
    """``params_np`` as arrays of the case in the parameter dtype, and the same values
    rounded to that dtype as float64 NumPy (what the oracle gets)."""
    arrays = {k: bk.asarray(v, dtype=bk.param_dtype) for k, v in params_np.items()}
    return arrays, {k: bk.to_numpy(v).copy() for k, v in arrays.items()}


def _snapshot(bk, arrays):
    return {k: bk.to_numpy(v).copy() for k, v in arrays.items()}


def _assert_unchanged(bk, arrays, before):
    for k, v in arrays.items():
        np.testing.assert_array_equal(bk.to_numpy(v), before[k], err_msg=f"{k} was modified")


def _unit_affine(shape):
    """The weight/bias that the functional forms differentiate when given None."""
    return {"weight": np.ones(shape), "bias": np.zeros(shape)}


def _compute_eps(bk):
    """Machine epsilon of the compute dtype (float32 for float16/bfloat16 input)."""
    return float(np.finfo(np.float64 if bk.dtype_name == "float64" else np.float32).eps)


# -- the torch oracle
def _torch_vjp(torch, fn, x64, g64, leaves=None, channels_last=False):
    """``y = fn(x)`` in float64 torch and its autograd gradients for upstream ``g64``.

    ``leaves`` are the parameter tensors (requires_grad) whose gradients to return. With
    ``channels_last`` the input is moved to channels-first for ``fn`` and the output back."""
    leaves = leaves or {}
    x = torch.tensor(x64, dtype=torch.float64, requires_grad=True)
    xin = torch.movedim(x, -1, 1) if channels_last else x
    y = fn(xin)
    if channels_last:
        y = torch.movedim(y, 1, -1)
    y.backward(torch.tensor(g64, dtype=torch.float64))
    grads = {k: t.grad.detach().numpy().copy() for k, t in leaves.items()}
    return y.detach().numpy().copy(), x.grad.numpy().copy(), grads


def _torch_leaves(torch, params64):
    return {
        k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params64.items()
    }


def _module(torch, module, params64):
    """A float64 torch module with ``params64`` copied into its parameters."""
    module = module.double()
    with torch.no_grad():
        for k, v in params64.items():
            getattr(module, k).copy_(torch.tensor(v, dtype=torch.float64))
    return module


def _module_vjp(torch, module, x64, g64, names, channels_last=False):
    module.zero_grad(set_to_none=True)
    leaves = {k: getattr(module, k) for k in names}
    return _torch_vjp(torch, module, x64, g64, leaves, channels_last)


# -- running anynorm
def _fwd_bwd(bk, layer, x_np, g_np, pshapes):
    """Forward + backward of ``layer`` on the case; checks every array and that neither the
    input nor the upstream gradient was modified. Returns ``(y, dx, grads)``."""
    x, g = bk.asarray(x_np), bk.asarray(g_np)
    before = _snapshot(bk, {"x": x, "dy": g})
    y = layer.forward(x)
    bk.check(y, x_np.shape, what="y")
    dx = layer.backward(g)
    bk.check(dx, x_np.shape, what="dx")
    assert set(layer.grads) == set(pshapes), f"grads {sorted(layer.grads)} != {sorted(pshapes)}"
    for k, shape in pshapes.items():
        bk.check(layer.grads[k], shape, dtype=bk.param_dtype, what=f"grads[{k!r}]")
    _assert_unchanged(bk, {"x": x, "dy": g}, before)
    return y, dx, dict(layer.grads)


def _run_layer(bk, layer, x_np, g_np, params_np):
    """A first forward, which must create the parameters (ones/zeros, in the input's
    namespace and device, in ``bk.param_dtype``); then ``params_np`` loaded through
    ``load_state_dict`` and forward + backward. Returns ``(y, dx, grads)`` and the loaded
    parameters as case arrays and as the oracle sees them."""
    pshapes = {k: v.shape for k, v in params_np.items()}
    y0 = layer.forward(bk.asarray(x_np))
    bk.check(y0, x_np.shape, what="first forward")
    assert set(layer.params) == set(pshapes), f"params {sorted(layer.params)}"
    for k, p in layer.params.items():
        bk.check(p, pshapes[k], dtype=bk.param_dtype, what=f"created params[{k!r}]")
        assert np.all(bk.to_numpy(p) == (1.0 if k == "weight" else 0.0)), k
    params, params64 = _case_params(bk, params_np)
    if params:
        layer.load_state_dict(params)
        for k in pshapes:
            bk.check(layer.params[k], pshapes[k], dtype=bk.param_dtype, what=f"params[{k!r}]")
    out = _fwd_bwd(bk, layer, x_np, g_np, pshapes)
    _assert_unchanged(bk, params, params64)
    return out, params, params64


def _compare(bk, got, want, what=""):
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = got, want
    bk.close(y, y_ref, what=f"{what}y")
    bk.close(dx, dx_ref, what=f"{what}dx")
    assert set(grads) == set(grads_ref)
    for k in grads_ref:
        bk.close(grads[k], grads_ref[k], what=f"{what}d{k}")


def _functional_vs_torch(bk, torch, x_np, g_np, fwd, bwd, tfn, tparams64, channels_last=False):
    """A functional form against its ``torch.nn.functional`` twin.

    ``fwd(x) -> y`` and ``bwd(dy, x) -> dx or (dx, *dparams)`` run on the case, with the
    dparams in the order of ``tparams64`` (the float64 parameters the torch function
    ``tfn(x, **leaves)`` is differentiated in)."""
    x, g = bk.asarray(x_np), bk.asarray(g_np)
    before = _snapshot(bk, {"x": x, "dy": g})
    y = fwd(x)
    bk.check(y, x_np.shape, what="functional y")
    out = bwd(g, x)
    dx, *dparams = out if isinstance(out, tuple) else (out,)
    bk.check(dx, x_np.shape, what="functional dx")
    assert len(dparams) == len(tparams64), f"backward returned {1 + len(dparams)} arrays"
    grads = dict(zip(tparams64, dparams, strict=True))
    for k, d in grads.items():
        bk.check(d, tparams64[k].shape, dtype=bk.param_dtype, what=f"functional d{k}")
    _assert_unchanged(bk, {"x": x, "dy": g}, before)
    leaves = _torch_leaves(torch, tparams64)
    want = _torch_vjp(
        torch, lambda t: tfn(t, **leaves), bk.round(x_np), bk.round(g_np), leaves, channels_last
    )
    _compare(bk, (y, dx, grads), want, what="functional ")


# ----------------------------------------------------------------------------- LayerNorm
LN_CASES = [
    ((6, 8), (8,), "full"),
    ((2, 6, 5), (5,), "off"),
    ((2, 4, 3, 5), (3, 5), "nobias"),
]


@pytest.mark.parametrize(("shape", "normalized_shape", "affine"), LN_CASES, ids=str)
def test_layer_norm_matches_torch(bk, rng, torch_oracle, shape, normalized_shape, affine):
    torch = torch_oracle
    elementwise, bias = affine != "off", affine == "full"
    names = ("weight", "bias") if bias else ("weight",) if elementwise else ()
    x_np, g_np = _data(rng, shape), rng.standard_normal(shape)
    layer = an.LayerNorm(normalized_shape, elementwise_affine=elementwise, bias=bias)
    params_np = _params(rng, dict.fromkeys(names, normalized_shape))
    got, params, p64 = _run_layer(bk, layer, x_np, g_np, params_np)
    tm = torch.nn.LayerNorm(normalized_shape, elementwise_affine=elementwise, bias=bias)
    tm = _module(torch, tm, p64)
    _compare(bk, got, _module_vjp(torch, tm, bk.round(x_np), bk.round(g_np), p64))

    # functional layer_norm over the same trailing axes
    axis = tuple(range(len(shape) - len(normalized_shape), len(shape)))
    w, b = params.get("weight"), params.get("bias")
    _functional_vs_torch(
        bk,
        torch,
        x_np,
        g_np,
        lambda x: AF.layer_norm(x, w, b, axis=axis, eps=EPS),
        lambda g, x: AF.layer_norm_backward(g, x, w, axis=axis, eps=EPS),
        lambda t, weight, bias: torch.nn.functional.layer_norm(
            t, normalized_shape, weight, bias, eps=EPS
        ),
        {**_unit_affine(normalized_shape), **p64},
    )


LN_AXIS_CASES = [((2, 4, 3, 5), (1, 3), True), ((2, 4, 3, 5), (-1, 1), False)]


@pytest.mark.parametrize(("shape", "axis", "affine"), LN_AXIS_CASES, ids=str)
def test_layer_norm_functional_axis_tuple(bk, rng, torch_oracle, shape, axis, affine):
    """Any axis tuple: forward against the NumPy reference, gradients against torch's
    layer_norm on the input with those axes moved to the end. Without weight/bias the
    backward still returns the gradients of a unit weight and zero bias."""
    torch = torch_oracle
    nd = len(shape)
    axes = sorted(a % nd for a in axis)
    perm = [a for a in range(nd) if a not in axes] + axes
    inv = [int(i) for i in np.argsort(perm)]
    pshape = tuple(shape[a] for a in axes)  # weight shape: the axes in increasing order
    x_np, g_np = _data(rng, shape), rng.standard_normal(shape)
    params, p64 = _case_params(bk, _params(rng, {"weight": pshape, "bias": pshape}))
    if not affine:
        params, p64 = {}, _unit_affine(pshape)
    w, b = params.get("weight"), params.get("bias")
    y = AF.layer_norm(bk.asarray(x_np), w, b, axis=axis, eps=EPS)
    y_ref = ref.layer_norm(bk.round(x_np), p64["weight"], p64["bias"], axis=axis, eps=EPS)
    bk.close(y, y_ref, what="y vs reference")
    _assert_unchanged(bk, params, p64)

    def tfn(t, weight, bias):
        z = torch.nn.functional.layer_norm(t.permute(perm), pshape, weight, bias, eps=EPS)
        return z.permute(inv)

    _functional_vs_torch(
        bk,
        torch,
        x_np,
        g_np,
        lambda x: AF.layer_norm(x, w, b, axis=axis, eps=EPS),
        lambda g, x: AF.layer_norm_backward(g, x, w, axis=axis, eps=EPS),
        tfn,
        p64,
    )


# ----------------------------------------------------------------------------- GroupNorm
# Every group holds at least 3 values: with 2, the standardized output is ±1 whatever x, the
# input gradient is O(eps) and pure cancellation, and float32 (torch's own included) cannot
# reach 1e-5 relative.
GN_CASES = [
    ((6, 8), 2, False, True),
    ((2, 6, 5), 3, False, True),
    ((2, 6, 5), 2, True, False),
    ((2, 4, 3, 5), 2, True, True),
    # >= 8 values per channel within a group: the per-sample-and-channel path
    ((2, 6, 4, 4), 3, False, True),
    ((2, 6, 4, 4), 3, True, True),
    ((3, 8, 2, 3, 4), 4, True, False),
]


@pytest.mark.parametrize(("shape_cf", "num_groups", "channels_last", "affine"), GN_CASES, ids=str)
def test_group_norm_matches_torch(
    bk, rng, torch_oracle, shape_cf, num_groups, channels_last, affine
):
    torch = torch_oracle
    c = shape_cf[1]
    axis = -1 if channels_last else 1
    shape = _cl(shape_cf) if channels_last else shape_cf
    x_np, g_np = _data(rng, shape), rng.standard_normal(shape)
    layer = an.GroupNorm(num_groups, c, affine=affine, axis=axis)
    params_np = _params(rng, {"weight": (c,), "bias": (c,)} if affine else {})
    got, params, p64 = _run_layer(bk, layer, x_np, g_np, params_np)
    tm = _module(torch, torch.nn.GroupNorm(num_groups, c, affine=affine, eps=EPS), p64)
    want = _module_vjp(torch, tm, bk.round(x_np), bk.round(g_np), p64, channels_last)
    _compare(bk, got, want)

    w, b = params.get("weight"), params.get("bias")
    _functional_vs_torch(
        bk,
        torch,
        x_np,
        g_np,
        lambda x: AF.group_norm(x, num_groups, w, b, axis=axis, eps=EPS),
        lambda g, x: AF.group_norm_backward(g, x, num_groups, w, axis=axis, eps=EPS),
        lambda t, weight, bias: torch.nn.functional.group_norm(t, num_groups, weight, bias, EPS),
        {**_unit_affine((c,)), **p64},
        channels_last,
    )


# ----------------------------------------------------------------------------- strided input
def _strided_cases(torch):
    F = torch.nn.functional
    return {
        "BatchNorm": (
            lambda c: an.BatchNorm(c, axis=-1, eps=EPS),
            lambda t, weight, bias: F.batch_norm(t, None, None, weight, bias, True, 0.1, EPS),
            True,
        ),
        "GroupNorm": (
            lambda c: an.GroupNorm(3, c, axis=-1, eps=EPS),
            lambda t, weight, bias: F.group_norm(t, 3, weight, bias, EPS),
            True,
        ),
        "InstanceNorm": (
            lambda c: an.InstanceNorm(c, affine=True, axis=-1, eps=EPS),
            lambda t, weight, bias: F.instance_norm(t, weight=weight, bias=bias, eps=EPS),
            True,
        ),
        "LayerNorm": (
            lambda c: an.LayerNorm(c, eps=EPS),
            lambda t, weight, bias: F.layer_norm(t, (t.shape[-1],), weight, bias, EPS),
            False,
        ),
        "RMSNorm": (
            lambda c: an.RMSNorm(c, eps=EPS),
            lambda t, weight: F.rms_norm(t, (t.shape[-1],), weight, EPS),
            False,
        ),
    }


def _load_random_params(bk, rng, layer, x, name, n):
    """A first forward on ``x`` creates the parameters; random ones (length ``n``) are
    loaded in their place. Returns the float64 values the oracle gets."""
    layer.forward(x)
    names = ["weight"] if name == "RMSNorm" else ["weight", "bias"]
    params, p64 = _case_params(bk, _params(rng, {k: (n,) for k in names}))
    layer.load_state_dict(params, strict=False)
    return p64


def _torch_fn_vjp(bk, torch, tfn, p64, x_np, g_np, channels_last):
    """``tfn(t, **params)`` differentiated by torch in float64 on the rounded data."""
    leaves = _torch_leaves(torch, p64)
    return _torch_vjp(
        torch,
        lambda t: tfn(t, **leaves),
        bk.round(x_np),
        bk.round(g_np),
        leaves,
        channels_last,
    )


@pytest.mark.parametrize("name", ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"])
def test_strided_input_matches_torch(bk, rng, torch_oracle, name):
    """A channels-last *view* of channels-first data (``permute_dims``, not contiguous on
    NumPy/torch/array-api-strict) as input and upstream gradient: the kernels pick their
    reduction strategy by memory layout (``_compat.blas_sums``: BLAS sums only on
    C-contiguous arrays), so the strided path needs its own oracle check. 4×5 spatial
    values per channel put GroupNorm on its per-sample-and-channel path."""
    torch = torch_oracle
    make, tfn, channels_last = _strided_cases(torch)[name]
    c, shape_cf = 6, (2, 6, 4, 5)
    x_cf, g_cf = _data(rng, shape_cf), rng.standard_normal(shape_cf)
    x_np, g_np = x_cf.transpose(0, 2, 3, 1), g_cf.transpose(0, 2, 3, 1)
    x = bk.xp.permute_dims(bk.asarray(x_cf), (0, 2, 3, 1))
    g = bk.xp.permute_dims(bk.asarray(g_cf), (0, 2, 3, 1))
    layer = make(c)
    p64 = _load_random_params(bk, rng, layer, x, name, c)
    _layer_vs_torch(bk, torch, layer, tfn, p64, (x_np, g_np, x, g), channels_last)


def _layer_vs_torch(bk, torch, layer, tfn, p64, data, channels_last):
    """Forward and backward of ``layer`` on ``data = (x_np, g_np, x, g)`` against ``tfn``
    differentiated by torch in float64: namespace, dtype, device and shape of ``y``,
    ``dx`` and every parameter gradient, the inputs unchanged, then the values."""
    x_np, g_np, x, g = data
    before = _snapshot(bk, {"x": x, "dy": g})
    y = layer.forward(x)
    dx = layer.backward(g)
    bk.check(y, x_np.shape, what="y")
    bk.check(dx, x_np.shape, what="dx")
    _assert_unchanged(bk, {"x": x, "dy": g}, before)
    for k, v in p64.items():
        bk.check(layer.grads[k], v.shape, dtype=bk.param_dtype, what=f"grads[{k!r}]")
    want = _torch_fn_vjp(bk, torch, tfn, p64, x_np, g_np, channels_last)
    _compare(bk, (y, dx, dict(layer.grads)), want)


#: name -> (layer, torch functional, input shape, channels_last): sums of products over
#: 150-300 values along leading/middle axes with >= 16 kept values after them: NumPy's
#: blocked einsum path (``_compat.block_dot_sums``, blocks of 128 plus a remainder)
LONG = {
    "BatchNorm NHWC": ("BatchNorm", (3, 10, 9, 16), True),
    "BatchNorm 2-D": ("BatchNorm", (300, 16), False),
    "GroupNorm NHWC": ("GroupNorm", (2, 15, 10, 24), True),
    "InstanceNorm NHWC": ("InstanceNorm", (2, 15, 10, 16), True),
}


@pytest.mark.parametrize("case", list(LONG))
def test_long_leading_reductions_match_torch(bk, rng, torch_oracle, case):
    """Reductions over more values than one block of the blocked sum of products, with a
    remainder block, against torch's float64 autograd (y, dx, dweight, dbias)."""
    torch = torch_oracle
    name, shape, channels_last = LONG[case]
    make, tfn, _ = _strided_cases(torch)[name]
    c = shape[-1] if channels_last else shape[1]
    x_np, g_np = _data(rng, shape), rng.standard_normal(shape)
    x, g = bk.asarray(x_np), bk.asarray(g_np)
    layer = make(c) if channels_last else an.BatchNorm(c, eps=EPS)
    p64 = _load_random_params(bk, rng, layer, x, name, c)
    _layer_vs_torch(bk, torch, layer, tfn, p64, (x_np, g_np, x, g), channels_last)


@pytest.mark.backends("numpy")
@pytest.mark.dtypes("float32", "float64")
@pytest.mark.parametrize("permuted", [False, True], ids=["contiguous", "strided"])
def test_blocked_sum_of_products_reads_the_callers_memory(bk, rng, monkeypatch, permuted):
    """The blocked ``einsum`` sums work on views of the operands, never on copies: a
    channels-last *view* of NCHW memory (whose ``(B, M, K)`` reshape would copy) takes the
    product-and-sum path instead. Sums over 300 values (two blocks and a remainder)."""
    from anynorm import _compat
    from anynorm.functional import _moments

    calls = []

    def spy(xp, a, b, block):
        calls.append((a, b))
        return _compat.block_dot_sums(xp, a, b, block)

    monkeypatch.setattr(_moments, "block_dot_sums", spy)
    shape_cf = (3, 16, 10, 10)
    a_np, b_np = _data(rng, shape_cf), rng.standard_normal(shape_cf)
    a, b = bk.asarray(a_np), bk.asarray(b_np)
    if permuted:
        a, b = a.transpose(0, 2, 3, 1), b.transpose(0, 2, 3, 1)
    else:
        a, b = (
            np.ascontiguousarray(a.transpose(0, 2, 3, 1)),
            np.ascontiguousarray(b.transpose(0, 2, 3, 1)),
        )
    got = _moments.sum_prod(a, b, (0, 1, 2), xp=bk.xp)
    a64, b64 = bk.to_numpy(a).astype(np.float64), bk.to_numpy(b).astype(np.float64)
    want = (a64 * b64).sum(axis=(0, 1, 2))  # float64, plain NumPy: no einsum, no blocks
    bk.check(got, (1, 1, 1, 16), what="Σ a·b")
    bk.close(got, want.reshape(1, 1, 1, 16), what="Σ a·b")
    if permuted:
        assert calls == []
    else:
        assert len(calls) == 1
        assert all(np.shares_memory(v, w) for v, w in zip(calls[0], (a, b), strict=True))


def _loop_cases(torch):
    """name -> (layer maker, torch functional, input shape, channels_last, path): shapes on
    which NumPy runs the elementwise work on long-row views with tiled per-feature vectors
    ("rows": ``_compat.long_row_views``) or with a ufunc buffer at most the inner run
    ("loops": ``_compat.numpy_loops``, arrays of 65536+ elements)."""
    F = torch.nn.functional
    bn = (
        lambda axis: lambda c: an.BatchNorm(c, axis=axis, eps=EPS),
        lambda t, weight, bias: F.batch_norm(t, None, None, weight, bias, True, 0.1, EPS),
    )
    inn = (
        lambda axis: lambda c: an.InstanceNorm(c, affine=True, axis=axis, eps=EPS),
        lambda t, weight, bias: F.instance_norm(t, weight=weight, bias=bias, eps=EPS),
    )
    gn = (
        lambda axis: lambda c: an.GroupNorm(4, c, axis=axis, eps=EPS),
        lambda t, weight, bias: F.group_norm(t, 4, weight, bias, EPS),
    )
    ln = (
        lambda axis: lambda c: an.LayerNorm(c, eps=EPS),
        lambda t, weight, bias: F.layer_norm(t, (t.shape[-1],), weight, bias, EPS),
    )
    return {
        "BatchNorm NHWC rows": (bn[0](-1), bn[1], (8, 32, 32, 16), True, "rows"),
        "InstanceNorm NHWC rows": (inn[0](-1), inn[1], (2, 128, 128, 8), True, "rows"),
        "GroupNorm NHWC rows": (gn[0](-1), gn[1], (2, 128, 128, 8), True, "rows"),
        "LayerNorm NHWC rows": (ln[0](-1), ln[1], (8, 32, 32, 16), False, "rows"),
        "BatchNorm NCHW loops": (bn[0](1), bn[1], (4, 4, 64, 64), False, "loops"),
        "InstanceNorm NCHW loops": (inn[0](1), inn[1], (8, 16, 24, 24), False, "loops"),
        "GroupNorm NCHW loops": (gn[0](1), gn[1], (4, 8, 48, 48), False, "loops"),
        "LayerNorm 2-D loops": (ln[0](-1), ln[1], (64, 1024), False, "loops"),
    }


LOOP_CASES = [
    "BatchNorm NHWC rows",
    "InstanceNorm NHWC rows",
    "GroupNorm NHWC rows",
    "LayerNorm NHWC rows",
    "BatchNorm NCHW loops",
    "InstanceNorm NCHW loops",
    "GroupNorm NCHW loops",
    "LayerNorm 2-D loops",
]


@pytest.mark.parametrize("case", LOOP_CASES)
def test_long_rows_and_ufunc_buffers_match_torch(bk, rng, torch_oracle, monkeypatch, case):
    """Shapes on which NumPy takes the loop-shaping paths (long-row views with tiled
    per-channel vectors; a ufunc buffer no longer than the inner run) against torch's
    float64 autograd, with random parameters so a misaligned tile shows. On NumPy the test
    also proves the path was taken, and that the caller's ufunc buffer size is back."""
    from anynorm import _compat

    torch = torch_oracle
    make, tfn, shape, channels_last, path = _loop_cases(torch)[case]
    plans, sizes = [], []
    real_plan, real_bufsize = _compat._row_plan, _compat._numpy_bufsize

    def plan_spy(shape, vshape):
        r = real_plan(shape, vshape)
        plans.append(r)
        return r

    def bufsize_spy(size):
        sizes.append(size)
        return real_bufsize(size)

    monkeypatch.setattr(_compat, "_row_plan", plan_spy)
    monkeypatch.setattr(_compat, "_numpy_bufsize", bufsize_spy)
    c = shape[-1] if channels_last or len(shape) == 2 or "LayerNorm" in case else shape[1]
    x_np, g_np = _data(rng, shape), rng.standard_normal(shape)
    x, g = bk.asarray(x_np), bk.asarray(g_np)
    layer = make(c)
    p64 = _load_random_params(bk, rng, layer, x, case.split()[0], c)
    plans.clear()
    sizes.clear()
    buffer_before = np.getbufsize()
    _layer_vs_torch(bk, torch, layer, tfn, p64, (x_np, g_np, x, g), channels_last)
    assert np.getbufsize() == buffer_before
    if bk.backend == "numpy":
        if path == "rows":
            assert any(p is not None for p in plans), plans
        else:
            assert sizes and all(512 <= s < 8192 for s in sizes), sizes


@pytest.mark.backends("numpy")
@pytest.mark.parametrize("case", [*LOOP_CASES, "RMSNorm NHWC rows", "L2Norm NCHW"])
def test_blockwise_chains_match_torch(bk, rng, torch_oracle, monkeypatch, case):
    """The elementwise chains evaluated block by block (``_compat.blockwise``) against
    torch's float64 autograd. Blocks of 256 bytes put every case on the block path with
    many blocks, partial last blocks and blocks along the last axis (tiled views)."""
    from anynorm import _compat

    torch = torch_oracle
    F = torch.nn.functional
    if case == "RMSNorm NHWC rows":
        make, tfn = _strided_cases(torch)["RMSNorm"][:2]
        shape, channels_last = (4, 8, 8, 12), False
    elif case == "L2Norm NCHW":
        make, shape, channels_last = (lambda c: an.L2Norm(axis=1)), (3, 5, 16, 12), False
        tfn = lambda t: F.normalize(t, 2.0, 1)  # noqa: E731
    else:
        make, tfn, shape, channels_last, _ = _loop_cases(torch)[case]
    made = []
    real = _compat.blockwise

    def spy(*args, **kwargs):
        r = real(*args, **kwargs)
        made.append(r is not None)
        return r

    monkeypatch.setattr(_compat, "_BLOCK_BYTES", 256)
    monkeypatch.setattr(_compat, "blockwise", spy)
    from anynorm.functional import _moments

    monkeypatch.setattr(_moments, "blockwise", spy)
    name = case.split()[0]
    c = (
        shape[1]
        if name in ("BatchNorm", "InstanceNorm", "GroupNorm") and not channels_last
        else shape[-1]
    )
    x_np, g_np = _data(rng, shape), rng.standard_normal(shape)
    x, g = bk.asarray(x_np), bk.asarray(g_np)
    layer = make(c)
    p64 = {} if name == "L2Norm" else _load_random_params(bk, rng, layer, x, name, c)
    made.clear()
    _layer_vs_torch(bk, torch, layer, tfn, p64, (x_np, g_np, x, g), channels_last)
    assert any(made), made


@pytest.mark.backends("numpy")
@pytest.mark.dtypes("float32")
def test_long_row_plans(bk):
    """The long-row views: rows of 8192 to 32768 + 4c values; none for runs of 512+ (left
    to the ufunc buffer), per-row statistics, a run with no divisor in range (a prime) or
    a tile larger than 1/16 of the array; vectors of one pattern only."""
    from anynorm._compat import _row_plan, long_row_views

    assert _row_plan((32, 56, 56, 64), (1, 1, 1, 64)) == ((784, 8192), (1, 64), (1, 128))
    assert _row_plan((32, 56, 56, 64), (32, 1, 1, 64)) == (
        (32, 16, 12544),
        (32, 1, 64),
        (1, 1, 196),
    )
    for shape, vshape in [
        ((64, 4096), (1, 4096)),  # run of 4096: numpy_loops
        ((100352, 64), (100352, 1)),  # per-row statistic
        ((999983, 4), (1, 4)),  # prime number of rows
        ((6, 7), (1, 7)),  # too small
        ((4, 4096, 16), (4, 1, 16)),  # the tiled vectors would be 1/8 of the array
    ]:
        assert _row_plan(shape, vshape) is None, (shape, vshape)
    x = np.ones((64, 256, 32), dtype=np.float32)
    v, w = np.ones((1, 1, 32), np.float32), np.ones((64, 1, 32), np.float32)
    views = long_row_views(bk.xp, [x], [v, v])
    assert views is not None and views[0][0].shape == (64, 8192) and views[1][0].shape == (1, 8192)
    assert np.shares_memory(views[0][0], x)
    assert long_row_views(bk.xp, [x], [v, w]) is None  # two patterns
    assert long_row_views(bk.xp, [x[:, ::2]], [v[..., ::2]]) is None  # strided
    assert long_row_views(bk.xp, [x], [v[0]]) is None  # not keepdims


def _small_cases(torch):
    """name -> (layer maker, torch functional, input shape, channels_last, features): inputs
    of fewer than ``_moments._SMALL`` values, one per kind of reduction."""
    F = torch.nn.functional

    def bn(t, weight, bias):
        return F.batch_norm(t, None, None, weight, bias, True, 0.1, EPS)

    def gn(t, weight, bias):
        return F.group_norm(t, 3, weight, bias, EPS)

    def inorm(t, weight, bias):
        return F.instance_norm(t, weight=weight, bias=bias, eps=EPS)

    def ln(t, weight, bias):
        return F.layer_norm(t, (t.shape[-1],), weight, bias, EPS)

    def rms(t, weight):
        return F.rms_norm(t, (t.shape[-1],), weight, EPS)

    return {
        "BatchNorm 2-D": (lambda: an.BatchNorm(12, eps=EPS), bn, (32, 12), False, 12),
        "BatchNorm NCHW": (lambda: an.BatchNorm(6, eps=EPS), bn, (4, 6, 5, 7), False, 6),
        "BatchNorm NHWC": (lambda: an.BatchNorm(6, axis=-1, eps=EPS), bn, (4, 5, 7, 6), True, 6),
        "GroupNorm NCHW": (lambda: an.GroupNorm(3, 6, eps=EPS), gn, (4, 6, 5, 7), False, 6),
        "GroupNorm NHWC": (
            lambda: an.GroupNorm(3, 6, axis=-1, eps=EPS),
            gn,
            (4, 5, 7, 6),
            True,
            6,
        ),
        "InstanceNorm NCHW": (
            lambda: an.InstanceNorm(6, affine=True, eps=EPS),
            inorm,
            (4, 6, 5, 7),
            False,
            6,
        ),
        "LayerNorm": (lambda: an.LayerNorm(12, eps=EPS), ln, (32, 12), False, 12),
        "RMSNorm": (lambda: an.RMSNorm(12, eps=EPS), rms, (3, 8, 12), False, 12),
    }


def _fast_path_spy(monkeypatch):
    """Records every call of the planning that only the fast paths reach (the largest run
    of reduced axes for BLAS/blocked sums, the long-row views of elementwise work)."""
    from anynorm.functional import _moments

    calls = []
    for name in ("_main_run", "long_row_views"):
        real = getattr(_moments, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(_moments, name, spy)
    return calls


@pytest.mark.small_path
@pytest.mark.parametrize(
    "case",
    [
        "BatchNorm 2-D",
        "BatchNorm NCHW",
        "BatchNorm NHWC",
        "GroupNorm NCHW",
        "GroupNorm NHWC",
        "InstanceNorm NCHW",
        "LayerNorm",
        "RMSNorm",
    ],
)
def test_small_inputs_take_the_plain_path(bk, rng, torch_oracle, monkeypatch, case):
    """Inputs of fewer than ``_moments._SMALL`` values (the production threshold; every
    other test sets it to 0) run plain sums and elementwise operations without planning the
    fast paths, on every backend: against torch's float64 autograd (random parameters and
    upstream gradient; namespace, dtype, device and shape of every output; inputs
    unchanged), and no fast-path planning was called."""
    from anynorm.functional import _moments

    make, tfn, shape, channels_last, c = _small_cases(torch_oracle)[case]
    assert math.prod(shape) < _moments._SMALL
    calls = _fast_path_spy(monkeypatch)
    x_np, g_np = _data(rng, shape), rng.standard_normal(shape)
    x, g = bk.asarray(x_np), bk.asarray(g_np)
    layer = make()
    p64 = _load_random_params(bk, rng, layer, x, case.split()[0], c)
    calls.clear()
    _layer_vs_torch(bk, torch_oracle, layer, tfn, p64, (x_np, g_np, x, g), channels_last)
    assert calls == []


@pytest.mark.small_path
@pytest.mark.backends("numpy")
@pytest.mark.parametrize("above", [False, True])
def test_small_threshold_boundary(bk, rng, torch_oracle, monkeypatch, above):
    """An input of exactly ``_SMALL`` values takes the fast paths, one value fewer than the
    threshold the plain path; both match torch's float64 autograd."""
    from anynorm.functional import _moments

    make, tfn, shape, channels_last, c = _small_cases(torch_oracle)["BatchNorm NCHW"]
    size = math.prod(shape)
    monkeypatch.setattr(_moments, "_SMALL", size + (1 if above else 0))
    calls = _fast_path_spy(monkeypatch)
    x_np, g_np = _data(rng, shape), rng.standard_normal(shape)
    x, g = bk.asarray(x_np), bk.asarray(g_np)
    layer = make()
    p64 = _load_random_params(bk, rng, layer, x, "BatchNorm", c)
    calls.clear()
    _layer_vs_torch(bk, torch_oracle, layer, tfn, p64, (x_np, g_np, x, g), channels_last)
    assert (calls == []) == above, calls


@pytest.mark.backends("numpy")
@pytest.mark.dtypes("float32")
def test_numpy_loops_sets_and_restores_the_buffer_size(bk):
    """``numpy_loops``: a buffer of the largest power of two within the inner run while
    inside (runs of 512-8191 elements of arrays of 65536+ only), the caller's size after,
    also after an error; a caller's smaller buffer is kept; nothing for other namespaces."""
    from anynorm._compat import numpy_loops

    default = np.getbufsize()
    with numpy_loops(bk.xp, (8, 4, 56, 56), (1, 4, 1, 1)):
        assert np.getbufsize() == 2048
    with numpy_loops(bk.xp, (2, 4, 56, 56), (1, 4, 1, 1)):  # small: left alone
        assert np.getbufsize() == default
    assert np.getbufsize() == default
    with numpy_loops(bk.xp, (128, 600), (128, 1)):
        assert np.getbufsize() == 512
    for vshape in [(1, 64), (1100, 1)]:  # short runs; the full shape (no broadcast)
        with numpy_loops(bk.xp, (1100, 64), vshape, (1100, 64), None):
            assert np.getbufsize() == default

    def fail_inside():
        with numpy_loops(bk.xp, (16, 4096), (16, 1)):
            assert np.getbufsize() == 4096
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        fail_inside()
    assert np.getbufsize() == default
    with np.errstate():
        np.setbufsize(256)
        with numpy_loops(bk.xp, (16, 4096), (1, 4096)):
            assert np.getbufsize() == 256
    import array_api_strict

    with numpy_loops(array_api_strict, (16, 4096), (16, 1)):
        assert np.getbufsize() == default


def test_long_channel_axis_l2_normalize_matches_torch(bk, rng, torch_oracle):
    """L2 over axis 1 of NCHW with 150 channels and 20 values after them (the blocked sum
    of products on NumPy) against ``torch.nn.functional.normalize`` in float64."""
    torch = torch_oracle
    shape = (2, 150, 4, 5)
    x_np, g_np = _data(rng, shape), rng.standard_normal(shape)
    x, g = bk.asarray(x_np), bk.asarray(g_np)
    y = AF.l2_normalize(x, axis=1)
    dx = AF.l2_normalize_backward(g, x, axis=1)
    bk.check(y, shape, what="y")
    bk.check(dx, shape, what="dx")
    want_y, want_dx, _ = _torch_vjp(
        torch,
        lambda t: torch.nn.functional.normalize(t, dim=1),
        bk.round(x_np),
        bk.round(g_np),
    )
    bk.close(y, want_y, what="y")
    bk.close(dx, want_dx, what="dx")


@pytest.mark.backends("torch")
@pytest.mark.dtypes("float32")
@pytest.mark.parametrize("name", ["BatchNorm", "GroupNorm", "LayerNorm"])
def test_torch_reduced_matmul_precision_keeps_float32_sums(bk, rng, torch_oracle, name):
    """``torch.set_float32_matmul_precision("medium")`` (a common training setting) makes
    float32 CPU matmuls run in bfloat16; the BLAS sums must not follow it (they did: 7.5e-4
    absolute error in LayerNorm y at an input offset of 10, against 1.5e-6)."""
    torch = torch_oracle
    make, tfn, channels_last = _strided_cases(torch)[name]
    c, shape_cf = 6, (8, 6, 32, 64)
    shape = _cl(shape_cf) if channels_last else shape_cf
    x_np, g_np = rng.standard_normal(shape) + 10.0, rng.standard_normal(shape)
    layer = make(c if channels_last else shape[-1])
    x, g = bk.asarray(x_np), bk.asarray(g_np)
    p64 = _load_random_params(bk, rng, layer, x, name, c if channels_last else shape[-1])
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        y = layer.forward(x)
        dx = layer.backward(g)
    finally:
        torch.set_float32_matmul_precision(before)
    bk.check(y, shape, what="y")
    bk.check(dx, shape, what="dx")
    want = _torch_fn_vjp(bk, torch, tfn, p64, x_np, g_np, channels_last)
    y_ref, dx_ref, grads_ref = want
    bk.close(y, y_ref, what="y")
    bk.close(dx, dx_ref, what="dx")
    # Σ g·x̂ at |μ|/σ = 10 is conditioned to ~1e-5 in float32 even with exact matmuls
    for k in grads_ref:
        bk.close(layer.grads[k], grads_ref[k], what=f"d{k}", tol=1e-4)


# ----------------------------------------------------------------------------- InstanceNorm
def _torch_instance_norm(torch, ndim):
    return {3: torch.nn.InstanceNorm1d, 4: torch.nn.InstanceNorm2d, 5: torch.nn.InstanceNorm3d}[
        ndim
    ]


IN_CASES = [
    ((2, 6, 5), False, True),
    ((2, 4, 3, 5), True, False),
    ((2, 4, 2, 3, 2), False, True),
]


@pytest.mark.parametrize(("shape_cf", "channels_last", "affine"), IN_CASES, ids=str)
def test_instance_norm_matches_torch(bk, rng, torch_oracle, shape_cf, channels_last, affine):
    torch = torch_oracle
    c = shape_cf[1]
    axis = -1 if channels_last else 1
    shape = _cl(shape_cf) if channels_last else shape_cf
    pshapes = {"weight": (c,), "bias": (c,)} if affine else {}
    x_np, g_np = _data(rng, shape), rng.standard_normal(shape)
    layer = an.InstanceNorm(c, affine=affine, axis=axis)
    got, params, p64 = _run_layer(bk, layer, x_np, g_np, _params(rng, pshapes))
    assert layer.buffers == {}
    tm = _module(torch, _torch_instance_norm(torch, len(shape))(c, affine=affine, eps=EPS), p64)
    want = _module_vjp(torch, tm, bk.round(x_np), bk.round(g_np), p64, channels_last)
    _compare(bk, got, want)
    # evaluation mode without running statistics still uses the instance statistics
    layer.eval()
    tm.eval()
    _compare(bk, _fwd_bwd(bk, layer, x_np, g_np, pshapes), want, what="eval ")

    w, b = params.get("weight"), params.get("bias")

    def tfn(t, weight, bias):
        return torch.nn.functional.instance_norm(t, weight=weight, bias=bias, eps=EPS)

    _functional_vs_torch(
        bk,
        torch,
        x_np,
        g_np,
        lambda x: AF.instance_norm(x, w, b, axis=axis, eps=EPS),
        lambda g, x: AF.instance_norm_backward(g, x, w, axis=axis, eps=EPS),
        tfn,
        {**_unit_affine((c,)), **p64},
        channels_last,
    )


IN_RUNNING_CASES = [((2, 4, 3, 5), False, 0.1, True), ((2, 6, 5), True, 0.3, False)]


@pytest.mark.parametrize(
    ("shape_cf", "channels_last", "momentum", "affine"), IN_RUNNING_CASES, ids=str
)
def test_instance_norm_running_stats_match_torch(
    bk, rng, torch_oracle, shape_cf, channels_last, momentum, affine
):
    """Four training steps, then one evaluation step (frozen running statistics): outputs,
    gradients and running_mean/var follow torch at every step; in evaluation the functional
    form with ``mean``/``var`` equals torch's ``instance_norm(use_input_stats=False)``.

    Deliberate, documented difference: torch's InstanceNorm leaves ``num_batches_tracked`` at
    0, anynorm counts the training steps (as BatchNorm does), so that buffer is compared with
    the step count, not with torch."""
    torch = torch_oracle
    c = shape_cf[1]
    axis = -1 if channels_last else 1
    shape = _cl(shape_cf) if channels_last else shape_cf
    pshapes = {"weight": (c,), "bias": (c,)} if affine else {}
    layer = an.InstanceNorm(
        c, affine=affine, track_running_stats=True, momentum=momentum, axis=axis
    )
    params, p64 = _case_params(bk, _params(rng, pshapes))
    if affine:
        # loaded before any forward: the layer materializes in the parameters'
        # namespace/device/dtype, buffers included
        layer.load_state_dict(params, strict=False)
        for k in ("running_mean", "running_var"):
            bk.check(layer.buffers[k], (c,), dtype=bk.param_dtype, what=k)
        np.testing.assert_array_equal(bk.to_numpy(layer.buffers["running_mean"]), np.zeros(c))
        np.testing.assert_array_equal(bk.to_numpy(layer.buffers["running_var"]), np.ones(c))
    tm = _torch_instance_norm(torch, len(shape))(
        c, affine=affine, track_running_stats=True, momentum=momentum, eps=EPS
    )
    tm = _module(torch, tm, p64)
    steps = 4
    for step in range(steps + 1):
        if step == steps:
            layer.eval()
            tm.eval()
        what = f"step {step} ({'eval' if step == steps else 'train'}) "
        x_np = rng.standard_normal(shape) * (1.0 + step) + (step - 1.5)
        g_np = rng.standard_normal(shape)
        got = _fwd_bwd(bk, layer, x_np, g_np, pshapes)
        want = _module_vjp(torch, tm, bk.round(x_np), bk.round(g_np), p64, channels_last)
        _compare(bk, got, want, what=what)
        for k in ("running_mean", "running_var"):
            bk.check(layer.buffers[k], (c,), dtype=bk.param_dtype, what=what + k)
            bk.close(layer.buffers[k], getattr(tm, k).numpy(), what=what + k)
    nbt = layer.buffers["num_batches_tracked"]
    assert tuple(nbt.shape) == ()
    assert int(bk.to_numpy(nbt)) == steps
    _assert_unchanged(bk, params, p64)

    # the functional form with the frozen statistics (the layer's own running buffers)
    mean, var = layer.buffers["running_mean"], layer.buffers["running_var"]
    stats64 = {"running_mean": bk.to_numpy(mean), "running_var": bk.to_numpy(var)}
    w, b = params.get("weight"), params.get("bias")

    def tfn(t, weight, bias):
        frozen = {k: torch.tensor(v) for k, v in stats64.items()}
        return torch.nn.functional.instance_norm(
            t, **frozen, weight=weight, bias=bias, use_input_stats=False, eps=EPS
        )

    _functional_vs_torch(
        bk,
        torch,
        x_np,
        g_np,
        lambda x: AF.instance_norm(x, w, b, axis=axis, eps=EPS, mean=mean, var=var),
        lambda g, x: AF.instance_norm_backward(g, x, w, axis=axis, eps=EPS, mean=mean, var=var),
        tfn,
        {**_unit_affine((c,)), **p64},
        channels_last,
    )


# ----------------------------------------------------------------------------- RMSNorm
RMS_CASES = [
    ((6, 8), (8,), True, None),
    ((2, 6, 5), (5,), False, 1e-6),
    ((2, 4, 3, 5), (3, 5), True, 1e-5),
]


@pytest.mark.parametrize(("shape", "normalized_shape", "affine", "eps"), RMS_CASES, ids=str)
def test_rms_norm_matches_torch(bk, rng, torch_oracle, shape, normalized_shape, affine, eps):
    """``eps=None`` is compared with the machine epsilon of the compute dtype (see
    :func:`test_rms_norm_eps_none_is_machine_epsilon`)."""
    torch = torch_oracle
    pshapes = {"weight": normalized_shape} if affine else {}
    x_np, g_np = _data(rng, shape), rng.standard_normal(shape)
    layer = an.RMSNorm(normalized_shape, eps=eps, elementwise_affine=affine)
    got, params, p64 = _run_layer(bk, layer, x_np, g_np, _params(rng, pshapes))
    teps = _compute_eps(bk) if eps is None else eps
    tm = torch.nn.RMSNorm(normalized_shape, eps=teps, elementwise_affine=affine)
    tm = _module(torch, tm, p64)
    _compare(bk, got, _module_vjp(torch, tm, bk.round(x_np), bk.round(g_np), p64))

    axis = tuple(range(-len(normalized_shape), 0))
    w = params.get("weight")
    _functional_vs_torch(
        bk,
        torch,
        x_np,
        g_np,
        lambda x: AF.rms_norm(x, w, axis=axis, eps=eps),
        lambda g, x: AF.rms_norm_backward(g, x, w, axis=axis, eps=eps),
        lambda t, weight: torch.nn.functional.rms_norm(t, normalized_shape, weight, eps=teps),
        {"weight": np.ones(normalized_shape), **p64},
    )


def test_rms_norm_eps_none_is_machine_epsilon(bk, rng, torch_oracle):
    """``eps=None`` is torch's default ``finfo(dtype).eps``; for float16/bfloat16 input
    anynorm (documented) uses float32's, its compute dtype. The data has a mean square of
    about eps, so the choice of eps changes the result far beyond the tolerance."""
    torch = torch_oracle
    eps = _compute_eps(bk)
    shape = (6, 8)
    x_np = rng.standard_normal(shape) * np.sqrt(eps)
    g_np = rng.standard_normal(shape)
    x64, g64 = bk.round(x_np), bk.round(g_np)

    # torch's own default on the compute dtype is the machine epsilon ...
    cdt = torch.float64 if bk.dtype_name == "float64" else torch.float32
    default = torch.nn.RMSNorm(8, eps=None).to(cdt)
    y_default = default(torch.tensor(x64, dtype=cdt)).detach().double().numpy()
    y_plain = torch.nn.functional.rms_norm(torch.tensor(x64), (8,), eps=eps).numpy()
    assert np.max(np.abs(y_default - y_plain)) <= 1e-5 * np.max(np.abs(y_plain))
    # ... and this data is sensitive to eps: eps=0 is far off
    y_eps0 = ref.rms_norm(x64, axis=-1, eps=0.0)
    assert np.max(np.abs(y_eps0 - y_plain)) > 10 * bk.tol * np.max(np.abs(y_plain))

    layer = an.RMSNorm(8)
    assert layer.eps is None
    got, params, p64 = _run_layer(bk, layer, x_np, g_np, _params(rng, {"weight": (8,)}))
    tm = _module(torch, torch.nn.RMSNorm(8, eps=eps), p64)
    _compare(bk, got, _module_vjp(torch, tm, x64, g64, p64))
    # the functional form, eps omitted
    w = params["weight"]
    _functional_vs_torch(
        bk,
        torch,
        x_np,
        g_np,
        lambda x: AF.rms_norm(x, w),
        lambda g, x: AF.rms_norm_backward(g, x, w),
        lambda t, weight: torch.nn.functional.rms_norm(t, (8,), weight, eps=eps),
        p64,
    )


# ----------------------------------------------------------------------------- LRN
LRN_CASES = [((2, 6, 5), 3, False), ((2, 4, 3, 5), 6, True)]


@pytest.mark.parametrize(("shape_cf", "size", "channels_last"), LRN_CASES, ids=str)
def test_local_response_norm_matches_torch(bk, rng, torch_oracle, shape_cf, size, channels_last):
    """An odd window and an even one wider than the channels; the forward also against the
    reference."""
    torch = torch_oracle
    axis = -1 if channels_last else 1
    shape = _cl(shape_cf) if channels_last else shape_cf
    x_np, g_np = _data(rng, shape), rng.standard_normal(shape)
    layer = an.LocalResponseNorm(size, axis=axis, **LRN)
    got, _, _ = _run_layer(bk, layer, x_np, g_np, {})
    assert layer.params == {}
    assert layer.grads == {}
    assert layer.buffers == {}
    tm = torch.nn.LocalResponseNorm(size, **LRN)
    want = _module_vjp(torch, tm, bk.round(x_np), bk.round(g_np), {}, channels_last)
    _compare(bk, got, want)
    y_ref = ref.local_response_norm(bk.round(x_np), size, axis=axis, **LRN)
    bk.close(got[0], y_ref, what="y vs reference")

    _functional_vs_torch(
        bk,
        torch,
        x_np,
        g_np,
        lambda x: AF.local_response_norm(x, size, axis=axis, **LRN),
        lambda g, x: AF.local_response_norm_backward(g, x, size, axis=axis, **LRN),
        lambda t: torch.nn.functional.local_response_norm(t, size, **LRN),
        {},
        channels_last,
    )


# ----------------------------------------------------------------------------- finite diffs
# Shapes and settings mirror cases above, so on JAX nothing new is compiled.
FD_LAYERS = {
    "layer_norm": (
        (6, 8),
        lambda: an.LayerNorm(8),
        {"weight": (8,), "bias": (8,)},
        lambda z, weight, bias: ref.layer_norm(z, weight, bias, axis=-1, eps=EPS),
    ),
    "group_norm_channels_last": (
        (2, 3, 5, 4),
        lambda: an.GroupNorm(2, 4, axis=-1),
        {"weight": (4,), "bias": (4,)},
        lambda z, weight, bias: ref.group_norm(z, 2, weight, bias, axis=-1, eps=EPS),
    ),
    "instance_norm": (
        (2, 6, 5),
        lambda: an.InstanceNorm(6, affine=True),
        {"weight": (6,), "bias": (6,)},
        lambda z, weight, bias: ref.instance_norm(z, weight, bias, axis=1, eps=EPS),
    ),
    "rms_norm_eps_none": (
        (6, 8),
        lambda: an.RMSNorm(8),
        {"weight": (8,)},
        lambda z, weight: ref.rms_norm(z, weight, axis=-1, eps=float(np.finfo(np.float64).eps)),
    ),
    "local_response_norm": (
        (2, 6, 5),
        lambda: an.LocalResponseNorm(3, **LRN),
        {},
        lambda z: ref.local_response_norm(z, 3, axis=1, **LRN),
    ),
    "local_response_norm_channels_last": (
        (2, 3, 5, 4),
        lambda: an.LocalResponseNorm(6, axis=-1, **LRN),
        {},
        lambda z: ref.local_response_norm(z, 6, axis=-1, **LRN),
    ),
}


@functools.cache
def _fd_expectations(name):
    """Data, reference output and ``fd_vjp`` gradients of the reference forward (NumPy
    only, so computed once and shared by every float64 case)."""
    shape, _, pshapes, f = FD_LAYERS[name]
    rng = np.random.default_rng(list(FD_LAYERS).index(name))
    x_np, g_np = _data(rng, shape), rng.standard_normal(shape)
    params_np = _params(rng, pshapes)
    fd_dx = ref.fd_vjp(lambda z: f(z, **params_np), x_np, g_np)
    fd_params = {
        k: ref.fd_vjp(lambda p, k=k: f(x_np, **{**params_np, k: p}), v, g_np)
        for k, v in params_np.items()
    }
    return x_np, g_np, params_np, f(x_np, **params_np), fd_dx, fd_params


@pytest.mark.dtypes("float64")
@pytest.mark.parametrize("name", list(FD_LAYERS))
def test_layer_backward_matches_finite_differences(bk, name):
    """The layers' explicit backward against ``fd_vjp`` of the NumPy reference forward."""
    x_np, g_np, params_np, y_ref, fd_dx, fd_params = _fd_expectations(name)
    (y, dx, grads), _, _ = _run_layer(bk, FD_LAYERS[name][1](), x_np, g_np, params_np)
    bk.close(y, y_ref, what="y vs reference")
    bk.close(dx, fd_dx, what="dx vs finite differences", tol=FD_TOL)
    for k, fd in fd_params.items():
        bk.close(grads[k], fd, what=f"d{k} vs finite differences", tol=FD_TOL)


FD_FUNCTIONAL = {
    # name: (shape, differentiated params, constants, forward, backward -> (dx, *dparams))
    "layer_norm_axis_1_3": (
        (2, 4, 3, 5),
        {"weight": (4, 5), "bias": (4, 5)},
        {},
        lambda x, weight, bias: AF.layer_norm(x, weight, bias, axis=(1, 3)),
        lambda g, x, weight, bias: AF.layer_norm_backward(g, x, weight, axis=(1, 3)),
    ),
    "group_norm": (
        (2, 6, 5),
        {"weight": (6,), "bias": (6,)},
        {},
        lambda x, weight, bias: AF.group_norm(x, 3, weight, bias),
        lambda g, x, weight, bias: AF.group_norm_backward(g, x, 3, weight),
    ),
    "instance_norm_channels_last": (
        (2, 5, 6),
        {"weight": (6,), "bias": (6,)},
        {},
        lambda x, weight, bias: AF.instance_norm(x, weight, bias, axis=-1),
        lambda g, x, weight, bias: AF.instance_norm_backward(g, x, weight, axis=-1),
    ),
    "instance_norm_frozen": (
        (2, 4, 3, 5),
        {"weight": (4,), "bias": (4,)},
        {"mean": (4,), "var": (4,)},
        lambda x, weight, bias, mean, var: AF.instance_norm(x, weight, bias, mean=mean, var=var),
        lambda g, x, weight, bias, mean, var: AF.instance_norm_backward(
            g, x, weight, mean=mean, var=var
        ),
    ),
    "rms_norm_eps_none": (
        (2, 4, 3, 5),
        {"weight": (3, 5)},
        {},
        lambda x, weight: AF.rms_norm(x, weight, axis=(-2, -1)),
        lambda g, x, weight: AF.rms_norm_backward(g, x, weight, axis=(-2, -1)),
    ),
    "local_response_norm": (
        (2, 6, 5),
        {},
        {},
        lambda x: AF.local_response_norm(x, 3, **LRN),
        lambda g, x: (AF.local_response_norm_backward(g, x, 3, **LRN),),
    ),
}


@pytest.mark.dtypes("float64")
@pytest.mark.parametrize("name", list(FD_FUNCTIONAL))
def test_functional_backward_matches_finite_differences(bk, rng, name):
    """The functional backward (on the case) against directional finite differences of
    anynorm's own forward evaluated on NumPy float64, along a random direction for the input
    and for every parameter: ``gᵀ J v`` vs ``⟨grad, v⟩``, relative to ``‖grad‖·‖v‖``."""
    shape, pshapes, cshapes, fwd, bwd = FD_FUNCTIONAL[name]
    x_np, g_np = _data(rng, shape), rng.standard_normal(shape)
    p_np, c_np = _params(rng, pshapes), _params(rng, cshapes)
    args = {k: bk.asarray(v) for k, v in {**p_np, **c_np}.items()}
    grads = bwd(bk.asarray(g_np), bk.asarray(x_np), **args)
    inputs = {"x": x_np, **p_np}
    assert len(grads) == len(inputs)
    for (k, v), grad in zip(inputs.items(), grads, strict=True):
        bk.check(grad, v.shape, what=f"d{k}")
        grad = bk.to_numpy(grad)

        def f(z, k=k):
            kw = {**inputs, **c_np, k: z}
            return np.asarray(fwd(kw.pop("x"), **kw))

        direction = rng.standard_normal(v.shape)
        fd = ref.fd_directional(f, v, g_np, direction)
        err = abs(fd - float(np.sum(grad * direction)))
        scale = np.linalg.norm(grad) * np.linalg.norm(direction)
        assert err <= FD_TOL * scale, f"d{k}: |fd - analytic| = {err:.3g} ({bk.id})"


# ----------------------------------------------------------------------------- errors
def test_group_norm_num_groups_must_divide_channels(bk, rng):
    with pytest.raises(ValueError, match=r"num_groups`=4 must divide `num_channels`=6"):
        an.GroupNorm(4, 6)
    x = bk.asarray(rng.standard_normal((2, 6, 5)))
    with pytest.raises(ValueError, match=r"num_groups`=4 must divide .*channels 6"):
        AF.group_norm(x, 4)
    with pytest.raises(ValueError, match=r"num_groups`=4 must divide .*channels 6"):
        AF.group_norm_backward(x, x, 4)
    # the layer also refuses an input whose channel count is not its own
    with pytest.raises(ValueError, match=r"num_channels=4 .* 6 channels"):
        an.GroupNorm(2, 4)(x)


def test_instance_norm_needs_a_batch_axis(bk, rng):
    x = bk.asarray(rng.standard_normal((6, 8)))  # unbatched (C, L)
    with pytest.raises(ValueError, match="batch axis"):
        an.InstanceNorm(6)(x)
    with pytest.raises(ValueError, match="batch axis"):
        AF.instance_norm(x)
    with pytest.raises(ValueError, match="batch axis"):
        AF.instance_norm_backward(x, x)
    # one spatial element per channel has no instance statistics (torch refuses it too)
    x1 = bk.asarray(rng.standard_normal((2, 3, 1)))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        an.InstanceNorm(3)(x1)


@pytest.mark.parametrize("cls", [an.LayerNorm, an.RMSNorm], ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    ("normalized_shape", "shape"), [((5, 6), (2, 6, 5)), (6, (2, 6, 5)), ((2, 6, 8), (6, 8))]
)
def test_normalized_shape_must_match_trailing_axes(bk, rng, cls, normalized_shape, shape):
    layer = cls(normalized_shape)
    x = bk.asarray(rng.standard_normal(shape))
    with pytest.raises(ValueError, match=r"normalized_shape=.* must equal the trailing axes"):
        layer.forward(x)
    assert layer.params == {}


#: name -> (oracle test, shape, normalized_shape, affine[, eps]): LayerNorm and RMSNorm
#: cases with rows of 12 or 84 values, enough of them for ``_compat.row_blocks`` to take
#: them in blocks of 1 KiB (the last block shorter)
ROW_BLOCK_CASES = {
    "LayerNorm full": ("layer", (8, 9, 10, 12), (12,), "full"),
    "LayerNorm off": ("layer", (720, 12), (12,), "off"),
    "LayerNorm nobias, 2 axes": ("layer", (12, 9, 7, 12), (7, 12), "nobias"),
    "RMSNorm": ("rms", (8, 9, 10, 12), (12,), True, 1e-5),
    "RMSNorm off, eps None": ("rms", (720, 12), (12,), False, None),
    "RMSNorm 2 axes": ("rms", (12, 9, 7, 12), (7, 12), True, 1e-6),
    # without a weight, GroupNorm and InstanceNorm NCHW reduce over trailing axes: rows
    "GroupNorm NCHW off": ("group", (100, 6, 4, 4), 3, False, False),
    "InstanceNorm NCHW off": ("instance", (40, 16, 4, 4), False, False),
}

#: evaluations by ``row_blocks`` per case (every forward and backward of the case that can
#: take the block path). LayerNorm and RMSNorm layers: two forwards (the first creates the
#: parameters) and a backward; functional: the forward, the backward's statistics
#: (LayerNorm only) and the backward.
#: GroupNorm: the layer's two forwards and its backward, the functional forward and the
#: functional backward's statistics; InstanceNorm: the layer's backward, in training and in
#: evaluation mode.
ROW_BLOCK_CALLS = {
    "LayerNorm full": 6,
    "LayerNorm off": 6,
    "LayerNorm nobias, 2 axes": 6,
    "RMSNorm": 5,
    "RMSNorm off, eps None": 5,
    "RMSNorm 2 axes": 5,
    "GroupNorm NCHW off": 5,
    "InstanceNorm NCHW off": 2,
}


@pytest.mark.backends("numpy")
@pytest.mark.parametrize("case", list(ROW_BLOCK_CASES))
def test_row_blocks_match_torch(bk, rng, torch_oracle, monkeypatch, case):
    """LayerNorm and RMSNorm (and Group/InstanceNorm without a weight) computed block by
    block of whole rows (``_compat.row_blocks``: forward, backward and the functional
    backward's statistics) against torch's float64 autograd, through the full oracle tests
    of each layer (layer and functional forms: dtypes, shapes, parameter gradients, inputs
    unchanged).
    Blocks of 1 KiB give 35-108 blocks of 1-21 rows with a shorter last one; the spy
    proves every forward and backward took the block path."""
    from anynorm import _compat
    from anynorm.functional import _moments

    taken = []

    def spy(*args, **kwargs):
        taken.append(True)
        return _compat.row_blocks(*args, **kwargs)

    monkeypatch.setattr(_compat, "_ROW_BLOCK_BYTES", 1024)
    monkeypatch.setattr(_moments, "row_blocks", spy)
    kind, *args = ROW_BLOCK_CASES[case]
    test = {
        "layer": test_layer_norm_matches_torch,
        "rms": test_rms_norm_matches_torch,
        "group": test_group_norm_matches_torch,
        "instance": test_instance_norm_matches_torch,
    }[kind]
    test(bk, rng, torch_oracle, *args)
    assert taken == [True] * ROW_BLOCK_CALLS[case], taken


@pytest.mark.backends("numpy")
@pytest.mark.dtypes("float32", "float64")
def test_row_blocks_plan_and_results(bk, monkeypatch):
    """``_compat.row_block_size`` and ``row_blocks`` directly: equal blocks with a shorter
    last one; "rows" results stacked in order, "sum" results summed over the blocks,
    per-row vectors sliced with the rows, tiled vectors cut for the short last block; no
    blocks for other namespaces, strided or non-2-D input, rows longer than a block and
    fewer than 32 blocks. ``row_outer`` is the exact outer product."""
    import array_api_strict

    from anynorm import _compat

    monkeypatch.setattr(_compat, "_ROW_BLOCK_BYTES", 256)
    xp, dt = bk.xp, np.dtype(bk.dtype_name)
    per_block = 256 // max(4, dt.itemsize) // 5
    rows = 32 * per_block + 3  # 33 blocks: equal ones, the last one shorter
    x = np.arange(rows * 5, dtype=dt).reshape(rows, 5)
    r = np.arange(rows, dtype=dt)[:, None]
    t = np.array([[1, 2, 3, 4, 5]], dtype=dt)
    sizes = []

    def fn(a, v, tile, shared):
        sizes.append(a.shape[0])
        assert tile.shape == a.shape and v.shape == (a.shape[0], 1)
        return a * tile + v + shared, a.sum(axis=0), v[:, 0]

    per = _compat.row_block_size(xp, [x, x], 5)
    assert per is not None and per <= per_block
    kinds = ("rows", "sum", "rows")
    y, s, back = _compat.row_blocks(xp, fn, kinds, per, [x], [r], [t], [dt.type(1)])
    np.testing.assert_array_equal(y, x * t + r + 1)
    np.testing.assert_array_equal(s, x.sum(axis=0))
    np.testing.assert_array_equal(back, r[:, 0])
    assert sum(sizes) == rows and len(sizes) >= 32
    assert set(sizes[:-1]) == {per} and 0 < sizes[-1] <= per
    assert (y.dtype, s.dtype, back.shape) == (dt, dt, (rows,))
    assert _compat.row_block_size(array_api_strict, [array_api_strict.asarray(x)], 5) is None
    for declined in (
        [x[::2]],  # strided
        [np.ones((64, 65), dt)],  # rows longer than a block
        [x[: 31 * per_block]],  # 31 blocks
        [x, x[1:]],  # two shapes
    ):
        assert _compat.row_block_size(xp, declined, declined[0].shape[-1]) is None
    u = np.array([[1.5], [-2.0], [np.inf]], dtype=dt)
    v = np.array([0.25, -3.0, 0.0, 7.0], dtype=dt)
    with np.errstate(invalid="ignore"):  # inf·0 is NaN in both
        got = _compat.row_outer(xp, u, np.stack([v, np.zeros_like(v)]))
        want = u * v
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[2, 2]) and got.dtype == dt


#: name -> (layer maker, torch functional, input shape, channels_last, features): the
#: per-group layers whose float16 input NumPy casts chunk by chunk along axis 0
CAST_CHUNK_CASES = {
    "BatchNorm NCHW": ("BatchNorm", 1, (7, 6, 5, 4)),
    "BatchNorm NHWC": ("BatchNorm", -1, (7, 5, 4, 6)),
    "BatchNorm 2-D": ("BatchNorm", 1, (50, 6)),
    "BatchNorm NCHW eval": ("BatchNorm eval", 1, (7, 6, 5, 4)),
    "GroupNorm NCHW": ("GroupNorm", 1, (7, 6, 5, 4)),
    "GroupNorm NHWC": ("GroupNorm", -1, (7, 5, 4, 6)),
    "InstanceNorm NCHW": ("InstanceNorm", 1, (7, 6, 5, 4)),
    "InstanceNorm NHWC": ("InstanceNorm", -1, (7, 5, 4, 6)),
    "L2Norm NCHW": ("L2Norm", 1, (7, 6, 5, 4)),
    "L1Norm NHWC": ("L1Norm", -1, (7, 5, 4, 6)),
    "L2Norm over axis 0": ("L2Norm", 0, (7, 6)),
    # below the row-block size: chunked statistics and y (istd and γ applied separately)
    "LayerNorm": ("LayerNorm", -1, (7, 5, 4, 6)),
}


@pytest.mark.backends("numpy")
@pytest.mark.dtypes("float16")
@pytest.mark.parametrize("case", list(CAST_CHUNK_CASES))
def test_float16_cast_chunks_match_torch(bk, rng, torch_oracle, monkeypatch, case):
    """float16 input of the per-group layers (BatchNorm, GroupNorm, InstanceNorm; training
    and BatchNorm's evaluation mode) and of L1/L2 (also over axis 0, where the chunk sums
    add up) cast to float32 chunk by chunk along axis 0
    (``_moments._chunks``, ``_chunk_moments``): chunks of 2 samples, the last one shorter,
    for the statistics, ``y``, the sums of the backward and ``dx``, against torch's float64
    autograd with random parameters and upstream gradient (namespace, dtype, device, shape,
    inputs unchanged). A spy proves the chunked path ran."""
    from anynorm.functional import _moments

    F = torch_oracle.nn.functional
    name, axis, shape = CAST_CHUNK_CASES[case]
    c = shape[axis]
    row = math.prod(shape[1:]) * 4
    monkeypatch.setattr(_moments, "_CAST_CHUNK_BYTES", 2 * row)
    calls = []
    real_chunks, real_moments = _moments._chunks, _moments._chunk_moments

    def spy_chunks(*args, **kwargs):
        calls.append(args[-1])
        return real_chunks(*args, **kwargs)

    def spy_moments(*args, **kwargs):
        calls.append("moments")
        return real_moments(*args, **kwargs)

    from anynorm.functional import _lp

    monkeypatch.setattr(_moments, "_chunks", spy_chunks)
    monkeypatch.setattr(_lp, "_chunks", spy_chunks)
    monkeypatch.setattr(_moments, "_chunk_moments", spy_moments)
    x_np, g_np = _data(rng, shape), rng.standard_normal(shape)
    x, g = bk.asarray(x_np), bk.asarray(g_np)
    if name.startswith("BatchNorm"):
        layer = an.BatchNorm(c, axis=axis, eps=EPS)

        def tfn(t, weight, bias):
            return F.batch_norm(t, None, None, weight, bias, True, 0.1, EPS)

    elif name == "GroupNorm":
        layer = an.GroupNorm(3, c, axis=axis, eps=EPS)

        def tfn(t, weight, bias):
            return F.group_norm(t, 3, weight, bias, EPS)

    elif name == "LayerNorm":
        layer = an.LayerNorm(c, eps=EPS)

        def tfn(t, weight, bias):
            return F.layer_norm(t, (c,), weight, bias, EPS)

    elif name in ("L2Norm", "L1Norm"):
        p = 2.0 if name == "L2Norm" else 1.0
        layer = an.L2Norm(axis=axis) if name == "L2Norm" else an.L1Norm(axis=axis)
        dim = 1 if axis == -1 else axis  # torch sees channels-last input channels-first

        def tfn(t):
            return F.normalize(t, p, dim)

    else:
        layer = an.InstanceNorm(c, affine=True, axis=axis, eps=EPS)

        def tfn(t, weight, bias):
            return F.instance_norm(t, weight=weight, bias=bias, eps=EPS)

    if name in ("L2Norm", "L1Norm"):
        p64 = {}
    else:
        p64 = _load_random_params(bk, rng, layer, x, name.split()[0], c)
    if name == "BatchNorm eval":
        mean64, var64 = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
        layer.load_state_dict(
            {"running_mean": bk.asarray(mean64), "running_var": bk.asarray(var64)}, strict=False
        )
        layer.eval()
        m_t = torch_oracle.tensor(bk.round(mean64).astype(np.float64))
        v_t = torch_oracle.tensor(bk.round(var64).astype(np.float64))

        def tfn(t, weight, bias):
            return F.batch_norm(t, m_t, v_t, weight, bias, False, 0.1, EPS)

    calls.clear()
    channels_last = axis == -1 and name != "LayerNorm"
    _layer_vs_torch(bk, torch_oracle, layer, tfn, p64, (x_np, g_np, x, g), channels_last)
    # statistics (training), y, the backward's sums and dx, each chunk by chunk
    if name in ("L2Norm", "L1Norm"):  # the norms, y, Σ dy·x, dx
        how = "sum" if axis == 0 else "concat"
        want_calls = [how, "concat", how, "concat"]
    elif name == "LayerNorm":  # statistics and y; the row-form backward casts whole
        want_calls = ["concat"]
    else:
        want_calls = ["concat", "sum" if name.startswith("BatchNorm") else "concat", "concat"]
    if name.endswith("Norm") and name not in ("L2Norm", "L1Norm"):
        # the statistics: the moments' own chunk loop (per-chunk moments combined by
        # Chan's update for BatchNorm, per-sample ones written in place otherwise)
        want_calls[:0] = ["moments", "list" if name == "BatchNorm" else "concat"]
    assert calls == want_calls, calls


@pytest.mark.backends("numpy")
@pytest.mark.dtypes("float16")
@pytest.mark.parametrize("name", ["BatchNorm", "GroupNorm", "InstanceNorm", "L2Norm", "L1Norm"])
def test_float16_cast_chunks_memory(bk, rng, monkeypatch, name):
    """The chunked float16 path keeps no full-size float32 copy: the tracemalloc peak of a
    forward and a backward stays under 1.6× the float16 input (``dx`` or ``y`` itself is
    1×; whole-array float32 copies of ``x`` and ``dy`` alone would be 4×)."""
    import tracemalloc

    from anynorm.functional import _moments

    shape = (64, 16, 16, 16)
    monkeypatch.setattr(_moments, "_CAST_CHUNK_BYTES", 16 * 16 * 16 * 4)  # one sample
    x = bk.asarray(_data(rng, shape))
    g = bk.asarray(rng.standard_normal(shape))
    layer = {
        "BatchNorm": lambda: an.BatchNorm(16),
        "GroupNorm": lambda: an.GroupNorm(4, 16),
        "InstanceNorm": lambda: an.InstanceNorm(16, affine=True),
        "L2Norm": lambda: an.L2Norm(axis=1),
        "L1Norm": lambda: an.L1Norm(axis=1),
    }[name]()
    layer.forward(x)
    layer.backward(g)
    for phase in ("forward", "backward"):
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            out = layer.forward(x) if phase == "forward" else layer.backward(g)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        bk.check(out, shape, what=phase)
        assert peak < 1.6 * x.nbytes, (phase, peak, x.nbytes)


@pytest.mark.backends("numpy")
@pytest.mark.dtypes("float16")
@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm"])
def test_row_blocks_float16_backward_memory(bk, rng, torch_oracle, monkeypatch, name):
    """float16 input on the row-block backward: ``x`` and ``dy`` are cast to float32 block
    by block and ``dx`` written back in float16 per block, so the backward's peak
    allocation is the float16 ``dx`` plus blocks (under 1.5× the float16 input; full
    float32 copies of ``x`` and ``dy`` alone would be 4×). Values against torch's float64
    autograd, random parameters and upstream gradient."""
    import tracemalloc

    from anynorm import _compat

    monkeypatch.setattr(_compat, "_ROW_BLOCK_BYTES", 16384)  # 32 blocks of 64 rows
    shape = (2048, 64)
    x_np, g_np = _data(rng, shape), rng.standard_normal(shape)
    x, g = bk.asarray(x_np), bk.asarray(g_np)
    layer = an.LayerNorm(64, eps=EPS) if name == "LayerNorm" else an.RMSNorm(64, eps=EPS)
    p64 = _load_random_params(bk, rng, layer, x, name, 64)
    y = layer.forward(x)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        dx = layer.backward(g)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * x.nbytes, (peak, x.nbytes)
    bk.check(dx, shape, what="dx")
    F = torch_oracle.nn.functional
    if name == "LayerNorm":
        tfn = lambda t, weight, bias: F.layer_norm(t, (64,), weight, bias, EPS)  # noqa: E731
    else:
        tfn = lambda t, weight: F.rms_norm(t, (64,), weight, EPS)  # noqa: E731
    want = _torch_fn_vjp(bk, torch_oracle, tfn, p64, x_np, g_np, False)
    _compare(bk, (y, dx, dict(layer.grads)), want)


@pytest.mark.backends("numpy")
@pytest.mark.dtypes("float32")
@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm"])
def test_row_blocks_tiny_variance_eps_zero(bk, rng, torch_oracle, monkeypatch, name):
    """Rows with a standard deviation of 1e-14 and ``eps=0`` (allowed): ``istd`` is about
    1e14, so ``istd³`` alone overflows float32; the block backward must stay finite and
    match torch's float64 autograd like the whole-array path does."""
    from anynorm import _compat

    torch = torch_oracle
    monkeypatch.setattr(_compat, "_ROW_BLOCK_BYTES", 1024)
    x_np = bk.round(1e-14 * rng.standard_normal((400, 64)))
    g_np = bk.round(rng.standard_normal((400, 64)))
    x, g = bk.asarray(x_np), bk.asarray(g_np)
    t = torch.tensor(x_np, requires_grad=True)
    if name == "LayerNorm":
        dx = AF.layer_norm_backward(g, x, eps=0.0)[0]
        y_t = torch.nn.functional.layer_norm(t, (64,), eps=0.0)
    else:
        dx = AF.rms_norm_backward(g, x, eps=0.0)[0]
        y_t = torch.nn.functional.rms_norm(t, (64,), eps=0.0)
    y_t.backward(torch.tensor(g_np))
    bk.check(dx, x_np.shape, what="dx")
    want = t.grad.numpy()
    assert np.isfinite(bk.to_numpy(dx)).all()
    bk.close(dx, want, what="dx")
