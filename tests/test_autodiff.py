"""Framework autodiff through anynorm's forward equals anynorm's explicit backward, and the
functional forms compile.

On torch: torch.autograd through the functional forms and layers; every functional form
(forward and backward) under ``torch.compile(fullgraph=True)`` (a graph break, e.g. a
host sync or Python branching on array values, is an error there), and a few with the
default inductor backend. On JAX: jax.grad and jax.jit through the functional forms
(stateful layers are Python objects and are not meant to run under jax.jit). On every
backend: local response norm's blocked path (large inputs) equals the unblocked one.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

import anynorm
from anynorm import functional as F
from anynorm.functional import _lrn

SHAPE = (4, 6, 5)
W6 = np.linspace(0.5, 1.5, 6)
B6 = np.linspace(-0.3, 0.4, 6)
W5 = np.linspace(0.7, 1.3, 5)
B5 = np.linspace(-0.2, 0.2, 5)

# name -> (forward(x, w, b), backward(dy, x, w) -> dx, weight/bias sizes or None)
CASES = {
    "l2": (
        lambda x, w, b: F.l2_normalize(x, axis=1),
        lambda g, x, w: F.l2_normalize_backward(g, x, axis=1),
        None,
    ),
    "l1": (lambda x, w, b: F.l1_normalize(x), lambda g, x, w: F.l1_normalize_backward(g, x), None),
    "lp3": (
        lambda x, w, b: F.lp_normalize(x, 3.0, axis=(1, 2)),
        lambda g, x, w: F.lp_normalize_backward(g, x, 3.0, axis=(1, 2)),
        None,
    ),
    "batch_norm": (
        lambda x, w, b: F.batch_norm(x, w, b),
        lambda g, x, w: F.batch_norm_backward(g, x, w)[0],
        6,
    ),
    "layer_norm": (
        lambda x, w, b: F.layer_norm(x, w, b, axis=-1),
        lambda g, x, w: F.layer_norm_backward(g, x, w, axis=-1)[0],
        5,
    ),
    "group_norm": (
        lambda x, w, b: F.group_norm(x, 3, w, b),
        lambda g, x, w: F.group_norm_backward(g, x, 3, w)[0],
        6,
    ),
    "instance_norm": (
        lambda x, w, b: F.instance_norm(x, w, b),
        lambda g, x, w: F.instance_norm_backward(g, x, w)[0],
        6,
    ),
    "rms_norm": (
        lambda x, w, b: F.rms_norm(x, w, axis=-1),
        lambda g, x, w: F.rms_norm_backward(g, x, w, axis=-1)[0],
        5,
    ),
    "lrn": (
        lambda x, w, b: F.local_response_norm(x, 3, alpha=0.2),
        lambda g, x, w: F.local_response_norm_backward(g, x, 3, alpha=0.2),
        None,
    ),
}


def _params(bk, n):
    if n is None:
        return None, None
    w, b = (W6, B6) if n == 6 else (W5, B5)
    return bk.asarray(w, dtype=bk.param_dtype), bk.asarray(b, dtype=bk.param_dtype)


@pytest.mark.backends("torch")
@pytest.mark.dtypes("float64", "float32")
@pytest.mark.parametrize("name", list(CASES))
def test_torch_autograd_equals_explicit_backward(bk, rng, name):
    fwd, bwd, n = CASES[name]
    w, b = _params(bk, n)
    x = bk.asarray(rng.standard_normal(SHAPE)).requires_grad_(True)
    g = bk.asarray(rng.standard_normal(SHAPE))
    y = fwd(x, w, b)
    (y * g).sum().backward()
    dx = bwd(g, x.detach(), w)
    bk.check(dx, SHAPE, what="dx")
    bk.close(dx, bk.to_numpy(x.grad), what="dx vs autograd")


#: name -> (explicit backward(dy, x, w?) -> tuple, shape of x, weight shape or None): every
#: backward path (batch statistics and frozen, channels-first and channels-last, the
#: LayerNorm/RMSNorm row form and the general form on a non-contiguous input)
DOUBLE = {
    "batch_norm": (lambda g, x, w: F.batch_norm_backward(g, x, w), (4, 6, 5), (6,)),
    "batch_norm_nhwc": (lambda g, x, w: F.batch_norm_backward(g, x, w, axis=-1), (4, 5, 6), (6,)),
    "batch_norm_frozen": (
        lambda g, x, w: F.batch_norm_backward(g, x, w, mean=g[0, :, 0] * 0, var=w * w),
        (4, 6, 5),
        (6,),
    ),
    "group_norm": (lambda g, x, w: F.group_norm_backward(g, x, 3, w), (3, 6, 5), (6,)),
    "group_norm_nhwc": (
        lambda g, x, w: F.group_norm_backward(g, x, 3, w, axis=-1),
        (3, 5, 6),
        (6,),
    ),
    "instance_norm": (lambda g, x, w: F.instance_norm_backward(g, x, w), (3, 6, 5), (6,)),
    "layer_norm_rows": (lambda g, x, w: F.layer_norm_backward(g, x, w), (6, 7), (7,)),
    "layer_norm_2axes": (
        lambda g, x, w: F.layer_norm_backward(g, x, w, axis=(-2, -1)),
        (3, 4, 5),
        (4, 5),
    ),
    "layer_norm_strided": (
        lambda g, x, w: F.layer_norm_backward(g.mT, x.mT, w),
        (3, 7, 4),
        (7,),
    ),
    "rms_norm_rows": (lambda g, x, w: F.rms_norm_backward(g, x, w), (6, 7), (7,)),
    "rms_norm_2axes": (
        lambda g, x, w: F.rms_norm_backward(g, x, w, axis=(-2, -1)),
        (3, 4, 5),
        (4, 5),
    ),
    "l2": (lambda g, x: F.l2_normalize_backward(g, x, axis=1), (4, 6, 5), None),
    "l1": (lambda g, x: F.l1_normalize_backward(g, x), (4, 6, 5), None),
    "lp3": (lambda g, x: F.lp_normalize_backward(g, x, 3.0, axis=(1, 2)), (4, 6, 5), None),
    "lrn": (lambda g, x: F.local_response_norm_backward(g, x, 3, alpha=0.2), (4, 6, 5), None),
}


@pytest.mark.backends("torch")
@pytest.mark.dtypes("float64")
@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("name", list(DOUBLE))
def test_torch_double_backward_matches_finite_differences(bk, rng, name):
    """Autograd through the explicit backward (double backward: gradient penalties,
    Hessian-vector products) equals central finite differences, whichever of ``dy``, ``x``
    and ``weight`` require grad: a tensor that autograd saved must never be written in
    place afterwards (torch raises), and no warning may leak to the user."""
    import itertools

    import torch

    fn, shape, wshape = DOUBLE[name]
    inputs = [rng.standard_normal(shape), rng.standard_normal(shape)]
    if wshape is not None:
        inputs.append(rng.uniform(0.5, 1.5, wshape))
    for mask in itertools.product((False, True), repeat=len(inputs)):
        if not any(mask):
            continue
        args = [bk.asarray(a).requires_grad_(m) for a, m in zip(inputs, mask, strict=True)]
        outs = _as_tuple(fn(*args))
        for out in outs:
            assert out.dtype == torch.float64 and out.device == args[0].device, (name, mask)
        assert tuple(outs[0].shape) == tuple(args[1].mT.shape if "strided" in name else shape)
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-5), (name, mask)
        for a, keep in zip(args, inputs, strict=True):  # nothing the caller passed changed
            np.testing.assert_array_equal(bk.to_numpy(a), keep, err_msg=f"{name} {mask}")


@pytest.mark.backends("torch")
@pytest.mark.dtypes("float64")
@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("name", list(CASES))
def test_torch_forward_gradients_with_any_inputs_requiring_grad(bk, rng, name):
    """Autograd through the forward equals finite differences for every subset of
    ``x``, ``weight`` and ``bias`` requiring grad (temporaries that do not require grad
    themselves are combined with ones that do)."""
    import itertools

    import torch

    fwd, _, n = CASES[name]
    w, b = _params(bk, n)
    base = [bk.asarray(rng.standard_normal(SHAPE))] + ([] if n is None else [w, b])
    for mask in itertools.product((False, True), repeat=len(base)):
        if not any(mask):
            continue
        args = [a.detach().clone().requires_grad_(m) for a, m in zip(base, mask, strict=True)]

        def f(*a):
            return fwd(a[0], *(a[1:] if n is not None else (None, None)))

        out = f(*args)
        bk.check(out, SHAPE, what=f"{name} {mask}")
        assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5), (name, mask)


@pytest.mark.backends("jax")
@pytest.mark.dtypes("float64", "float32")
@pytest.mark.parametrize("name", list(CASES))
def test_jax_grad_and_jit_agree_with_explicit_backward(bk, rng, name):
    import jax

    fwd, bwd, n = CASES[name]
    w, b = _params(bk, n)
    x = bk.asarray(rng.standard_normal(SHAPE))
    g = bk.asarray(rng.standard_normal(SHAPE))
    eager = fwd(x, w, b)
    jitted = jax.jit(fwd)(x, w, b)
    bk.check(jitted, SHAPE)
    bk.close(jitted, bk.to_numpy(eager), what="jit forward")
    auto = jax.grad(lambda z: (fwd(z, w, b) * g).sum())(x)
    dx = bwd(g, x, w)
    bk.check(dx, SHAPE, what="dx")
    bk.close(dx, bk.to_numpy(auto), what="dx vs jax.grad")
    dx_jit = jax.jit(bwd)(g, x, w)
    bk.close(dx_jit, bk.to_numpy(auto), what="jit backward vs jax.grad")


# ----------------------------------------------------------------------------- torch.compile
M6 = np.linspace(-0.1, 0.2, 6)
V6 = np.linspace(0.5, 2.0, 6)

#: name -> f(x, g, p), p the parameters as arrays of the case (see _compile_params): every
#: public functional form, forward and backward (these return tuples), with batch and
#: with frozen statistics
COMPILED = {
    "l2_normalize": lambda x, g, p: F.l2_normalize(x, axis=1),
    "l2_normalize_backward": lambda x, g, p: F.l2_normalize_backward(g, x, axis=1),
    "l1_normalize": lambda x, g, p: F.l1_normalize(x),
    "l1_normalize_backward": lambda x, g, p: F.l1_normalize_backward(g, x),
    "lp_normalize": lambda x, g, p: F.lp_normalize(x, 3.0, axis=(1, 2)),
    "lp_normalize_backward": lambda x, g, p: F.lp_normalize_backward(g, x, 3.0, axis=(1, 2)),
    "lp_normalize_inf": lambda x, g, p: F.lp_normalize(x, math.inf),
    "lp_normalize_inf_backward": lambda x, g, p: F.lp_normalize_backward(g, x, math.inf),
    "batch_norm": lambda x, g, p: F.batch_norm(x, p["w6"], p["b6"]),
    "batch_norm_backward": lambda x, g, p: F.batch_norm_backward(g, x, p["w6"]),
    "batch_norm_frozen": lambda x, g, p: F.batch_norm(
        x, p["w6"], p["b6"], mean=p["m6"], var=p["v6"]
    ),
    "batch_norm_frozen_backward": lambda x, g, p: F.batch_norm_backward(
        g, x, p["w6"], mean=p["m6"], var=p["v6"]
    ),
    "batch_norm_stats": lambda x, g, p: F.batch_norm_stats(x),
    "layer_norm": lambda x, g, p: F.layer_norm(x, p["w5"], p["b5"], axis=-1),
    "layer_norm_backward": lambda x, g, p: F.layer_norm_backward(g, x, p["w5"], axis=-1),
    "group_norm": lambda x, g, p: F.group_norm(x, 3, p["w6"], p["b6"]),
    "group_norm_backward": lambda x, g, p: F.group_norm_backward(g, x, 3, p["w6"]),
    "instance_norm": lambda x, g, p: F.instance_norm(x, p["w6"], p["b6"]),
    "instance_norm_backward": lambda x, g, p: F.instance_norm_backward(g, x, p["w6"]),
    "instance_norm_frozen": lambda x, g, p: F.instance_norm(
        x, p["w6"], p["b6"], mean=p["m6"], var=p["v6"]
    ),
    "instance_norm_frozen_backward": lambda x, g, p: F.instance_norm_backward(
        g, x, p["w6"], mean=p["m6"], var=p["v6"]
    ),
    "rms_norm": lambda x, g, p: F.rms_norm(x, p["w5"], axis=-1),
    "rms_norm_backward": lambda x, g, p: F.rms_norm_backward(g, x, p["w5"], axis=-1),
    "local_response_norm": lambda x, g, p: F.local_response_norm(x, 3, alpha=0.2),
    "local_response_norm_backward": lambda x, g, p: F.local_response_norm_backward(
        g, x, 3, alpha=0.2
    ),
    "update_running_stats": lambda x, g, p: F.update_running_stats(
        p["m6"], p["v6"], *F.batch_norm_stats(x), 20, 0.1, xp=p["xp"]
    ),
}


def _compile_params(bk):
    p = {"w6": W6, "b6": B6, "w5": W5, "b5": B5, "m6": M6, "v6": V6}
    return {"xp": bk.xp, **{k: bk.asarray(v, dtype=bk.param_dtype) for k, v in p.items()}}


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _compiled_fn(torch, fn, **options):
    """``torch.compile(fn, fullgraph=True, **options)``: a graph break is an error."""
    return torch.compile(fn, fullgraph=True, **options)


def _compiled_call(torch, fn, args, **options):
    """``torch.compile(fn, fullgraph=True, **options)(*args)``: any graph break (a host
    sync, Python branching on values, an untraceable call) is an error."""
    return _compiled_fn(torch, fn, **options)(*args)


def _compare_compiled(bk, compiled, eager, what):
    tol = 1e-12 if bk.dtype_name == "float64" else 1e-5
    compiled, eager = _as_tuple(compiled), _as_tuple(eager)
    assert len(compiled) == len(eager), what
    bk.check(compiled[0], tuple(eager[0].shape), what=f"{what}[0]")  # the case's dtype
    for i, (c, e) in enumerate(zip(compiled, eager, strict=True)):
        bk.check(c, tuple(e.shape), dtype=e.dtype, what=f"{what}[{i}]")
        bk.close(c, bk.to_numpy(e), what=f"{what}[{i}] compiled vs eager", tol=tol)


def test_compiled_table_covers_every_functional_form():
    assert set(F.__all__) <= set(COMPILED)


def _quiet_dynamo(test):
    """Dynamo says it traces through array-api-compat's lru_cache'd helpers, and torch.jit
    warns about its own deprecation while torch.compile imports: not about anynorm."""
    for text in (
        "ignore:Dynamo detected a call to a:UserWarning",
        "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",
    ):
        test = pytest.mark.filterwarnings(text)(test)
    return test


@_quiet_dynamo
@pytest.mark.backends("torch")
@pytest.mark.dtypes("float64", "float32")
@pytest.mark.parametrize("name", list(COMPILED))
def test_torch_compile_fullgraph_matches_eager(bk, rng, name):
    """``fullgraph=True`` makes any graph break an error: no host sync (``.item()``,
    ``float()``, ``bool()`` of a tensor), no Python branching on array values. The
    ``aot_eager`` backend also runs AOTAutograd's functionalization of the in-place updates
    of fresh temporaries."""
    import torch

    fn = COMPILED[name]
    p = _compile_params(bk)
    x = bk.asarray(rng.standard_normal(SHAPE))
    g = bk.asarray(rng.standard_normal(SHAPE))
    eager = fn(x, g, p)
    compiled = _compiled_call(torch, fn, (x, g, p), backend="aot_eager")
    _compare_compiled(bk, compiled, eager, name)


@_quiet_dynamo
@pytest.mark.backends("torch")
@pytest.mark.dtypes("float64")
@pytest.mark.parametrize("name", ["layer_norm_rows", "group_norm", "batch_norm_nhwc"])
def test_torch_compiled_double_backward_matches_eager(bk, rng, name):
    """Under ``torch.compile`` anynorm keeps its in-place updates of fresh temporaries even
    while autograd records (AOTAutograd functionalizes them): autograd through the compiled
    explicit backward, with ``dy`` and ``x`` requiring grad, equals autograd through the
    eager one (itself checked against finite differences above)."""
    import torch

    fn, shape, wshape = DOUBLE[name]
    r = bk.asarray(rng.standard_normal(shape))
    w = bk.asarray(rng.uniform(0.5, 1.5, wshape))
    g0, x0 = rng.standard_normal(shape), rng.standard_normal(shape)

    def loss(g, x):
        dx, dw, db = fn(g, x, w)
        return (dx * r).sum() + 0.3 * (dw * dw).sum() + 0.7 * db.sum()

    results = []
    for f in (loss, _compiled_fn(torch, loss, backend="aot_eager")):
        g, x = bk.asarray(g0).requires_grad_(True), bk.asarray(x0).requires_grad_(True)
        out = f(g, x)
        results.append((out, *torch.autograd.grad(out, (g, x))))
    for what, c, e in zip(("loss", "d/d dy", "d/d x"), results[1], results[0], strict=True):
        bk.check(c, tuple(e.shape), what=what)
        bk.close(c, bk.to_numpy(e.detach()), what=f"{what} compiled vs eager", tol=1e-12)


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@_quiet_dynamo
@pytest.mark.backends("torch")
@pytest.mark.dtypes("float32")
@pytest.mark.parametrize("family", ["layer_norm", "local_response_norm"])
def test_torch_compile_inductor(bk, rng, family):
    """The default backend (inductor: generated C++ on the CPU, Triton on CUDA) compiles a
    forward and its backward and agrees with eager execution. On 2 CPU cores with an empty
    inductor cache: ~17 s for layer norm (most of it inductor's one-time start-up), ~8 s
    for local response norm; ~5 s and ~1 s with inductor's on-disk cache warm."""
    import torch

    if bk.device_name == "cpu" and not _has_cxx():
        pytest.skip("torch inductor on the CPU needs a C++ compiler (c++/g++/clang++)")
    p = _compile_params(bk)
    x = bk.asarray(rng.standard_normal(SHAPE))
    g = bk.asarray(rng.standard_normal(SHAPE))
    for name in (family, f"{family}_backward"):
        fn = COMPILED[name]
        compiled = _compiled_call(torch, fn, (x, g, p))
        _compare_compiled(bk, compiled, fn(x, g, p), f"{name} (inductor)")


# ----------------------------------------------------------------------------- blocked LRN
@pytest.mark.dtypes("float64", "float32")
@pytest.mark.parametrize(
    ("shape", "axis"), [((6, 7, 5, 4), 1), ((9, 5, 4, 7), -1)], ids=["NCHW", "NHWC"]
)
def test_lrn_blocked_equals_unblocked(bk, rng, monkeypatch, shape, axis):
    """Inputs above ``_lrn.BLOCK`` elements run block by block where arrays may be written
    (here forced on a small input): forward and backward, functional and layer, equal the
    unblocked path; on torch, autograd through the blocked forward equals the explicit
    backward."""
    lrn = {"alpha": 0.4, "beta": 0.75, "k": 1.2}
    x = bk.asarray(rng.standard_normal(shape) * 1.5)
    g = bk.asarray(rng.standard_normal(shape))
    y0 = bk.to_numpy(F.local_response_norm(x, 5, axis=axis, **lrn))
    dx0 = bk.to_numpy(F.local_response_norm_backward(g, x, 5, axis=axis, **lrn))
    monkeypatch.setattr(_lrn, "BLOCK", 16)
    assert len(_lrn._blocks(shape, axis % len(shape))) >= 6
    y = F.local_response_norm(x, 5, axis=axis, **lrn)
    dx = F.local_response_norm_backward(g, x, 5, axis=axis, **lrn)
    layer = anynorm.LocalResponseNorm(5, axis=axis, **lrn)
    y_layer = layer(x)
    dx_layer = layer.backward(g)
    for what, got, want in (
        ("y", y, y0),
        ("dx", dx, dx0),
        ("layer y", y_layer, y0),
        ("layer dx", dx_layer, dx0),
    ):
        bk.check(got, shape, what=what)
        bk.close(got, want, what=f"blocked {what} vs unblocked")
    if bk.backend == "torch":
        xt = x.clone().requires_grad_(True)
        (F.local_response_norm(xt, 5, axis=axis, **lrn) * g).sum().backward()
        bk.close(xt.grad, dx0, what="autograd through the blocked forward")
