"""Framework autodiff through anynorm's forward equals anynorm's explicit backward.

On torch: torch.autograd through the functional forms and layers. On JAX: jax.grad and
jax.jit through the functional forms (stateful layers are Python objects and are not meant to
run under jax.jit).
"""

from __future__ import annotations

import numpy as np
import pytest

from anynorm import functional as F

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
