"""Every user-facing error of anynorm, pinned by type and message on every backend case.

``ERRORS`` is the table: ``(id, call(bk) -> None, exception type, message regex)``. Each row
runs once per backend case (``bk``), so a check that a backend slips past (a dask array
without ``.device``, a JAX array that refuses ``bool()``, a torch tensor on another device)
shows up as a failure of that row on that backend. Messages come from
``anynorm/_validation.py`` (and the layer protocol); each one names the function and the
argument, quotes what was received, and says how to fix it, and the regexes pin those parts.

Decisions pinned here (see tests/NUMERICS.md for the reasoning):

- A mean-type statistic over zero values (a dimension of size 0 among the reduced axes of
  training-mode batch norm, layer, group, instance or RMS norm, or an empty batch that would
  update instance norm's running statistics) is a ValueError on every backend: it would be
  NaN and leak into running statistics and parameter gradients. Inputs that are empty
  elsewhere (an empty batch, no features) give empty outputs, and so do Lp norms (the sum of
  nothing is 0) and local response norm (tests/test_numerics.py::test_empty_inputs).
- Integer, boolean and complex inputs, parameters and gradients are TypeErrors, as are
  gradients of another dtype than the output (functional backward passes included).
- Devices: only array-api-strict (``device1``/``device2``) and torch (``meta``) can hold two
  devices on a CPU-only machine; the device rows run there only (DEVICE_ERRORS).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import anynorm
from anynorm import functional as F
from anynorm.layers._base import CONFIG_KEY

SHAPE = (4, 6, 5)  # (N, C, L): one shape for every row, so JAX compiles each primitive once


# ----------------------------------------------------------------------------- helpers
def _data(shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(7).standard_normal(shape)


def _x(bk, shape=SHAPE):
    """Floating input of the case."""
    return bk.asarray(_data(shape))


def _raw(bk, a: np.ndarray):
    """``a`` as an array of the case's backend and device in ``a``'s own dtype (integer,
    boolean or complex: what ``bk.asarray`` cannot make)."""
    if bk.backend == "numpy":
        return np.asarray(a)
    if bk.backend == "torch":
        import torch

        return torch.asarray(a, device=bk.device)
    if bk.backend == "jax":
        import jax

        return jax.device_put(jax.numpy.asarray(a), bk.device)
    if bk.backend == "dask":
        import dask.array as da

        return da.from_array(a)
    if bk.backend == "cupy":
        import cupy

        return cupy.asarray(a)
    return bk.xp.asarray(a, device=bk.device)


def _other_namespace(bk, a: np.ndarray):
    """``a`` (float64 NumPy data) in the case's dtype but from another namespace: NumPy, or
    array-api-strict when the case itself is NumPy."""
    if bk.backend == "numpy":
        import array_api_strict as xps

        return xps.asarray(a.astype(np.float32 if bk.half else bk.dtype))
    name = "float32" if bk.dtype_name == "bfloat16" else bk.dtype_name
    return np.asarray(a, dtype=name)


def _other_module(bk):
    """A namespace (module) other than the case's."""
    if bk.backend == "numpy":
        import array_api_strict

        return array_api_strict
    return np


def _other_device(bk, arr):
    """``arr`` moved to a second device of the same backend (array-api-strict's other
    device, torch's ``meta``); the device rows run only on those two backends."""
    if bk.backend == "array_api_strict":
        other = "device2" if bk.device_name != "device2" else "device1"
        return arr.to_device(bk.xp.Device(other))
    if bk.backend == "torch":
        return arr.to("meta")
    raise AssertionError(f"{bk.backend} has no second device here")  # not generated there


def _other_dtype(bk):
    """A dtype of the case's namespace other than its own (floating where the device has one,
    int32 on array-api-strict's ``no_float64`` device, which has no second float dtype)."""
    if bk.device_name == "no_float64":
        return bk.xp.int32
    return bk.xp.float64 if bk.dtype_name != "float64" else bk.xp.float32


def _int_dtype(bk):
    return bk.xp.int32


def _trained(bk, layer, shape=SHAPE):
    """``layer`` after one forward on the case (so it holds arrays and a cache)."""
    layer.forward(_x(bk, shape))
    return layer


def _bn_state(bk, **changes):
    """A BatchNorm(6) state dict of the case with ``changes`` applied (None deletes)."""
    state = dict(_trained(bk, anynorm.BatchNorm(6)).state_dict())
    for k, v in changes.items():
        if v is None:
            state.pop(k)
        else:
            state[k] = v
    return state


def _load_into_fresh(bk, state):
    _trained(bk, anynorm.BatchNorm(6)).load_state_dict(state)


def _checkpoint(bk, write: Callable[[str], None], **load_kwargs: Any) -> None:
    """Write a file with ``write(path)`` and load it into the case's namespace and device."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ckpt.npz")
        write(path)
        kwargs = {"xp": bk.xp, "device": bk.device, **load_kwargs}
        anynorm.load(path, **kwargs)


def _npz(**arrays):
    def write(path):
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)

    return write


def _config(cls="BatchNorm", **config):
    meta = {"format": "anynorm", "format_version": 1, "class": cls, "config": config}
    return np.asarray(json.dumps(meta))


_BN2 = {
    "weight": np.ones(2),
    "bias": np.zeros(2),
    "running_mean": np.zeros(2),
    "running_var": np.ones(2),
    "num_batches_tracked": np.asarray(0),
}


def _truncated(path):
    anynorm.BatchNorm(64, xp=np).save(path)
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])


def _text(path):
    with open(path, "w") as fh:
        fh.write("weight,bias\n1,0\n")


def _object_array(path):
    obj = np.empty((), dtype=object)
    obj[()] = {"not": "an array"}
    with open(path, "wb") as fh:
        np.savez(fh, **{**_BN2, "weight": obj, CONFIG_KEY: _config(num_features=2)})


def _backward_with(bk, make_dy, layer=None):
    layer = layer or anynorm.BatchNorm(6)
    _trained(bk, layer)
    layer.backward(make_dy(bk))


def _dy_other_device(bk):
    layer = _trained(bk, anynorm.LayerNorm(5))
    layer.backward(_other_device(bk, _x(bk)))


def _x_other_device(bk):
    layer = anynorm.BatchNorm(6, xp=bk.xp, device=bk.device, dtype=bk.param_dtype)
    layer.forward(_other_device(bk, _x(bk)))


def _weight_other_device(bk):
    F.batch_norm(_x(bk), _other_device(bk, bk.asarray(np.ones(6), dtype=bk.param_dtype)))


def _backward_after_to(bk):
    layer = _trained(bk, anynorm.GroupNorm(3, 6))
    layer.to(bk.xp, device=bk.device)
    layer.backward(_x(bk))


def _instance_norm_empty_batch_tracking(bk):
    anynorm.InstanceNorm(6, track_running_stats=True).forward(_x(bk, (0, 6, 5)))


# ----------------------------------------------------------------------------- the table
#: (id, call(bk), exception type, message regex)
ERRORS: list[tuple[str, Callable[[Any], None], type[Exception], str]] = [
    # -- not an array, two namespaces, two devices --------------------------------------
    (
        "functional-x-is-a-list",
        lambda bk: F.l2_normalize([[3.0, 4.0]]),
        TypeError,
        r"^anynorm\.functional\.l2_normalize: `x` must be an array .*received \[\[3\.0, 4\.0\]\] "
        r"\(list\)\. Convert it first",
    ),
    (
        "layer-x-is-a-float",
        lambda bk: anynorm.BatchNorm()(1.5),
        TypeError,
        r"BatchNorm\.forward: `x` must be an array .*received 1\.5 \(float\)",
    ),
    (
        "functional-weight-is-a-list",
        lambda bk: F.batch_norm(_x(bk), [1.0] * 6),
        TypeError,
        r"batch_norm: `weight` must be an array .*received \[1\.0, 1\.0",
    ),
    (
        "functional-weight-from-another-namespace",
        lambda bk: F.layer_norm(_x(bk), _other_namespace(bk, np.ones(5))),
        TypeError,
        r"layer_norm: all arrays must come from one namespace; `x` is \w+ but `weight` is "
        r"\w+\. Convert `weight` to \w+ first",
    ),
    (
        "functional-dy-from-another-namespace",
        lambda bk: F.rms_norm_backward(_other_namespace(bk, _data()), _x(bk)),
        TypeError,
        r"rms_norm_backward: all arrays must come from one namespace; `x` is \w+ but `dy`",
    ),
    (
        "layer-bound-to-another-namespace",
        lambda bk: anynorm.BatchNorm(6, xp=_other_module(bk))(_x(bk)),
        TypeError,
        r"BatchNorm\.forward: the layer's parameters/buffers are \w+ arrays but `x` is a \w+ "
        r"array\. Move the layer first: layer\.to\(",
    ),
    # -- integer, boolean, complex dtypes -------------------------------------------------
    (
        "functional-int-x",
        lambda bk: F.l2_normalize(_raw(bk, np.ones((2, 3), dtype=np.int32))),
        TypeError,
        r"^anynorm\.functional\.l2_normalize: `x` must have a real floating dtype .*"
        r"received dtype \S*int32\. Cast it first",
    ),
    (
        "layer-bool-x",
        lambda bk: anynorm.BatchNorm()(_raw(bk, np.ones((4, 3), dtype=bool))),
        TypeError,
        r"BatchNorm\.forward: `x` must have a real floating dtype .*received dtype \S*bool",
    ),
    (
        "functional-complex-x",
        lambda bk: F.layer_norm(_raw(bk, np.ones((4, 3), dtype=np.complex64))),
        TypeError,
        r"layer_norm: `x` must have a real floating dtype .*received dtype \S*complex64",
    ),
    (
        "layer-int-x-lrn",
        lambda bk: anynorm.LocalResponseNorm(3)(_raw(bk, np.ones(SHAPE, dtype=np.int32))),
        TypeError,
        r"LocalResponseNorm\.forward: `x` must have a real floating dtype",
    ),
    (
        "functional-int-weight",
        lambda bk: F.batch_norm(_x(bk), _raw(bk, np.ones(6, dtype=np.int32))),
        TypeError,
        r"batch_norm: `weight` must have a real floating dtype .*received dtype \S*int32",
    ),
    (
        "functional-bool-var",
        lambda bk: F.instance_norm(
            _x(bk), mean=bk.asarray(np.zeros(6)), var=_raw(bk, np.ones(6, dtype=bool))
        ),
        TypeError,
        r"instance_norm: `var` must have a real floating dtype",
    ),
    (
        "functional-int-dy",
        lambda bk: F.lp_normalize_backward(_raw(bk, np.ones(SHAPE, dtype=np.int32)), _x(bk)),
        TypeError,
        r"lp_normalize_backward: `dy` must have a real floating dtype",
    ),
    # -- rank, axis -------------------------------------------------------------------------
    (
        "batch-norm-1d-input",
        lambda bk: F.batch_norm(_x(bk, (5,))),
        ValueError,
        r"batch_norm: `x` must have at least 2 dimensions; received shape \(5,\) \(1-D\)\. "
        r"Batch norm needs a batch axis",
    ),
    (
        "instance-norm-2d-input",
        lambda bk: anynorm.InstanceNorm(6)(_x(bk, (4, 6))),
        ValueError,
        r"InstanceNorm\.forward: `x` must have at least 3 dimensions; received shape \(4, 6\)"
        r".*add a batch axis",
    ),
    (
        "group-norm-1d-input",
        lambda bk: F.group_norm(_x(bk, (6,)), 3),
        ValueError,
        r"group_norm: `x` must have at least 2 dimensions; received shape \(6,\)",
    ),
    (
        "lrn-layer-0d-input",
        lambda bk: anynorm.LocalResponseNorm(3)(_x(bk, ())),
        ValueError,
        r"LocalResponseNorm\.forward: `axis`=1 is out of range for a 0-D input",
    ),
    (
        "axis-out-of-range",
        lambda bk: F.l2_normalize(_x(bk), axis=3),
        ValueError,
        r"^anynorm\.functional\.l2_normalize: `axis`=3 is out of range for a 3-D input "
        r"\(valid axes are -3\.\.2\)",
    ),
    (
        "axis-repeated-functional",
        lambda bk: F.layer_norm(_x(bk), axis=(1, -2)),
        ValueError,
        r"layer_norm: `axis`=\(1, -2\) repeats an axis; list each axis once",
    ),
    (
        "axis-repeated-constructor",
        lambda bk: anynorm.L2Norm(axis=(2, 2)),
        ValueError,
        r"L2Norm: `axis`=\(2, 2\) repeats an axis",
    ),
    (
        "axis-not-an-int",
        lambda bk: F.rms_norm(_x(bk), axis=1.0),
        TypeError,
        r"rms_norm: `axis` must be an int, a tuple of ints or None; received 1\.0 \(float\)\. "
        r"Pass e\.g\. axis=-1",
    ),
    (
        "axis-names-no-axis",
        lambda bk: F.layer_norm(_x(bk), axis=()),
        ValueError,
        r"layer_norm: `axis` must name at least one axis; received \(\)",
    ),
    (
        "batch-norm-axis-is-the-batch-axis",
        lambda bk: anynorm.BatchNorm(axis=0)(_x(bk)),
        ValueError,
        r"BatchNorm\.forward: `axis`=0 includes the batch axis 0 .*axis=-1 for NHWC",
    ),
    (
        "group-norm-axis-is-the-batch-axis",
        lambda bk: anynorm.GroupNorm(2, 4, axis=0)(_x(bk)),
        ValueError,
        r"GroupNorm\.forward: `axis`=0 is the batch axis 0; the channel axis must be",
    ),
    # -- feature sizes against the layer / the parameters ------------------------------------
    (
        "batch-norm-num-features-mismatch",
        lambda bk: anynorm.BatchNorm(4)(_x(bk)),
        ValueError,
        r"BatchNorm\.forward: the layer has num_features=4 .* but `x` of shape \(4, 6, 5\) "
        r"has feature shape \(6,\)",
    ),
    (
        "batch-norm-weight-shape",
        lambda bk: F.batch_norm(_x(bk), bk.asarray(np.ones(5), dtype=bk.param_dtype)),
        ValueError,
        r"batch_norm: `weight` must have shape \(6,\) .*received shape \(5,\)",
    ),
    (
        "batch-norm-var-shape",
        lambda bk: F.batch_norm(
            _x(bk), mean=bk.asarray(np.zeros(6)), var=bk.asarray(np.ones((6, 1)))
        ),
        ValueError,
        r"batch_norm: `var` must have shape \(6,\) .*received shape \(6, 1\)",
    ),
    (
        "batch-norm-mean-without-var",
        lambda bk: F.batch_norm(_x(bk), mean=bk.asarray(np.zeros(6))),
        ValueError,
        r"batch_norm: pass both `mean` and `var`",
    ),
    (
        "layer-norm-weight-shape",
        lambda bk: F.layer_norm(_x(bk), bk.asarray(np.ones(6), dtype=bk.param_dtype)),
        ValueError,
        r"layer_norm: `weight` must have shape \(5,\) .*received shape \(6,\)",
    ),
    (
        "layer-norm-normalized-shape-mismatch",
        lambda bk: anynorm.LayerNorm(6)(_x(bk)),
        ValueError,
        r"LayerNorm\.forward: normalized_shape=\(6,\) must equal the trailing axes of `x`, "
        r"but x has shape \(4, 6, 5\)\..*LayerNorm\(\(5,\)\)",
    ),
    (
        "rms-norm-normalized-shape-longer-than-input",
        lambda bk: anynorm.RMSNorm((3, 4, 6, 5))(_x(bk)),
        ValueError,
        r"RMSNorm\.forward: normalized_shape=\(3, 4, 6, 5\) must equal the trailing axes",
    ),
    (
        "group-norm-groups-do-not-divide-constructor",
        lambda bk: anynorm.GroupNorm(4, 6),
        ValueError,
        r"GroupNorm: `num_groups`=4 must divide `num_channels`=6",
    ),
    (
        "group-norm-groups-do-not-divide-functional",
        lambda bk: F.group_norm(_x(bk), 4),
        ValueError,
        r"group_norm: `num_groups`=4 must divide the number of channels 6",
    ),
    (
        "group-norm-num-channels-mismatch",
        lambda bk: anynorm.GroupNorm(3, 9)(_x(bk)),
        ValueError,
        r"GroupNorm\.forward: the layer has num_channels=9 but `x` of shape \(4, 6, 5\) has "
        r"6 channels",
    ),
    (
        "instance-norm-num-features-mismatch",
        lambda bk: anynorm.InstanceNorm(5)(_x(bk)),
        ValueError,
        r"InstanceNorm\.forward: the layer has num_features=5 but `x` .* has 6 channels",
    ),
    (
        "batch-norm-one-value-per-feature",
        lambda bk: anynorm.BatchNorm(6)(_x(bk, (1, 6))),
        ValueError,
        r"BatchNorm\.forward: expected more than 1 value per feature when using batch "
        r"statistics, got input of shape \(1, 6\); use a batch of at least 2",
    ),
    (
        "instance-norm-one-spatial-element",
        lambda bk: F.instance_norm(_x(bk, (4, 6, 1))),
        ValueError,
        r"instance_norm: expected more than 1 spatial element per channel",
    ),
    # -- hyper-parameters at construction ---------------------------------------------------
    (
        "eps-negative",
        lambda bk: anynorm.BatchNorm(eps=-1e-5),
        ValueError,
        r"BatchNorm: `eps` must be in \[0\.0, inf\); received -1e-05\. Use e\.g\. eps=1e-5",
    ),
    (
        "eps-nan",
        lambda bk: anynorm.LayerNorm(5, eps=float("nan")),
        ValueError,
        r"LayerNorm: `eps` must be in .*received nan",
    ),
    (
        "eps-a-string",
        lambda bk: anynorm.RMSNorm(5, eps="1e-6"),
        TypeError,
        r"RMSNorm: `eps` must be a real number; received '1e-6' \(str\)",
    ),
    (
        "momentum-above-one",
        lambda bk: anynorm.BatchNorm(momentum=1.5),
        ValueError,
        r"BatchNorm: `momentum` must be in \[0\.0, 1\.0\]; received 1\.5\. .*Keras "
        r"momentum=0\.99 is momentum=0\.01 here",
    ),
    (
        "momentum-negative",
        lambda bk: anynorm.InstanceNorm(6, momentum=-0.1),
        ValueError,
        r"InstanceNorm: `momentum` must be in \[0\.0, 1\.0\]; received -0\.1",
    ),
    (
        "momentum-a-bool",
        lambda bk: anynorm.BatchNorm(momentum=True),
        TypeError,
        r"BatchNorm: `momentum` must be a real number; received True \(bool\)",
    ),
    (
        "p-below-one",
        lambda bk: anynorm.LpNorm(0.5),
        ValueError,
        r"LpNorm: `p` must be in \[1\.0, inf\]; received 0\.5\. Use p=2",
    ),
    (
        "p-a-string",
        lambda bk: anynorm.LpNorm("inf"),
        TypeError,
        r"LpNorm: `p` must be a real number; received 'inf' \(str\)",
    ),
    (
        "p-nan-functional",
        lambda bk: F.lp_normalize(_x(bk), float("nan")),
        ValueError,
        r"lp_normalize: `p` must be a real number >= 1 or math\.inf; received nan",
    ),
    (
        "lrn-size-zero",
        lambda bk: anynorm.LocalResponseNorm(0),
        ValueError,
        r"LocalResponseNorm: `size` must be >= 1; received 0\. Pass size=1 or more",
    ),
    (
        "lrn-size-not-an-int",
        lambda bk: F.local_response_norm(_x(bk), 2.0),
        TypeError,
        r"local_response_norm: `size` must be an int; received 2\.0 \(float\)\. Pass a whole "
        r"number",
    ),
    (
        "lrn-alpha-nan",
        lambda bk: anynorm.LocalResponseNorm(3, alpha=float("nan")),
        ValueError,
        r"LocalResponseNorm: `alpha` must be in \(-inf, inf\); received nan",
    ),
    (
        "group-norm-num-groups-not-an-int",
        lambda bk: anynorm.GroupNorm(2.5, 5),
        TypeError,
        r"GroupNorm: `num_groups` must be an int; received 2\.5 \(float\)",
    ),
    (
        "group-norm-num-groups-a-bool",
        lambda bk: anynorm.GroupNorm(True, 6),
        TypeError,
        r"GroupNorm: `num_groups` must be an int; received True \(bool\)",
    ),
    (
        "instance-norm-zero-features",
        lambda bk: anynorm.InstanceNorm(0),
        ValueError,
        r"InstanceNorm: `num_features` must be >= 1; received 0",
    ),
    (
        "batch-norm-num-features-a-float",
        lambda bk: anynorm.BatchNorm(6.0),
        TypeError,
        r"BatchNorm: `num_features` must be an int or a tuple of ints; received 6\.0 "
        r"\(float\)\. Pass e\.g\. num_features=64",
    ),
    (
        "layer-norm-shape-with-zero",
        lambda bk: anynorm.LayerNorm((5, 0)),
        ValueError,
        r"LayerNorm: `normalized_shape` must be a non-empty tuple of positive ints; received "
        r"\(5, 0\)\. Every size must be at least 1",
    ),
    (
        "affine-not-a-bool",
        lambda bk: anynorm.BatchNorm(affine=1),
        TypeError,
        r"BatchNorm: `affine` must be True or False; received 1 \(int\)\. Pass affine=True",
    ),
    (
        "train-mode-not-a-bool",
        lambda bk: anynorm.L2Norm().train("eval"),
        TypeError,
        r"L2Norm\.train: `mode` must be True or False; received 'eval' \(str\)",
    ),
    (
        "constructor-integer-dtype",
        lambda bk: anynorm.BatchNorm(6, xp=bk.xp, device=bk.device, dtype=_int_dtype(bk)),
        TypeError,
        r"BatchNorm: `dtype` for the parameters and buffers must be a real floating "
        r"dtype of the layer's namespace; received .*int32.*dtype=xp\.float32",
    ),
    (
        "to-integer-dtype",
        lambda bk: _trained(bk, anynorm.LayerNorm(5)).to(bk.xp, dtype=_int_dtype(bk)),
        TypeError,
        r"LayerNorm\.to: `dtype` for the parameters and buffers must be a real floating dtype",
    ),
    # -- backward -------------------------------------------------------------------------------
    (
        "backward-before-forward",
        lambda bk: anynorm.InstanceNorm(6).backward(_x(bk)),
        RuntimeError,
        r"InstanceNorm\.backward: backward\(\) was called before forward\(\); run "
        r"y = layer\.forward\(x\) first",
    ),
    (
        "backward-after-to-drops-the-cache",
        _backward_after_to,
        RuntimeError,
        r"GroupNorm\.backward: backward\(\) was called before forward\(\)",
    ),
    (
        "backward-dy-broadcastable-shape",
        lambda bk: _backward_with(bk, lambda bk: _x(bk, (1, 6, 5))),
        ValueError,
        r"BatchNorm\.backward: `dy` must have the shape of the last output \(4, 6, 5\); "
        r"received \(1, 6, 5\) \(broadcasting is not applied",
    ),
    (
        "backward-dy-other-dtype",
        lambda bk: _backward_with(
            bk, lambda bk: bk.xp.astype(_x(bk), _other_dtype(bk)), anynorm.L1Norm()
        ),
        TypeError,
        r"L1Norm\.backward: `dy` has dtype \S+ but the last output has dtype \S+; cast dy",
    ),
    (
        "backward-dy-other-namespace",
        lambda bk: _backward_with(bk, lambda bk: _other_namespace(bk, _data())),
        TypeError,
        r"BatchNorm\.backward: `dy` is a \w+ array but the last forward returned a \w+ array",
    ),
    (
        "backward-dy-not-an-array",
        lambda bk: _backward_with(bk, lambda bk: 1.0, anynorm.RMSNorm(5)),
        TypeError,
        r"RMSNorm\.backward: `dy` must be an array .*received 1\.0 \(float\)",
    ),
    (
        "functional-backward-dy-other-dtype",
        lambda bk: F.batch_norm_backward(bk.xp.astype(_x(bk), _other_dtype(bk)), _x(bk)),
        TypeError,
        r"batch_norm_backward: `dy` (has dtype \S+ but `x` has dtype \S+; cast dy|must have "
        r"a real floating dtype)",
    ),
    (
        "functional-backward-dy-other-shape",
        lambda bk: F.group_norm_backward(_x(bk, (4, 6)), _x(bk), 3),
        ValueError,
        r"group_norm_backward: `dy` must have the shape and dtype of `x` \(4, 6, 5\), .*"
        r"received \(4, 6\)",
    ),
    # -- state dicts and checkpoint files ----------------------------------------------------
    (
        "load-state-dict-missing-key",
        lambda bk: _load_into_fresh(bk, _bn_state(bk, running_var=None)),
        ValueError,
        r"BatchNorm\.load_state_dict: the state does not match BatchNorm\(.*\): missing keys "
        r"\['running_var'\], unexpected keys \[\]\. Expected exactly \['weight'",
    ),
    (
        "load-state-dict-unexpected-key",
        lambda bk: _load_into_fresh(bk, _bn_state(bk, momentum=bk.asarray(np.ones(1)))),
        ValueError,
        r"load_state_dict: .*missing keys \[\], unexpected keys \['momentum'\]",
    ),
    (
        "load-state-dict-mis-shaped",
        lambda bk: _load_into_fresh(bk, _bn_state(bk, running_mean=bk.asarray(np.zeros(5)))),
        ValueError,
        r"load_state_dict: mis-shaped entries: running_mean: expected \(6,\), received \(5,\)",
    ),
    (
        "load-state-dict-counter-mis-shaped",
        lambda bk: _load_into_fresh(
            bk, _bn_state(bk, num_batches_tracked=_raw(bk, np.zeros(2, dtype=np.int32)))
        ),
        ValueError,
        r"mis-shaped entries: num_batches_tracked: expected \(\), received \(2,\)",
    ),
    (
        "load-state-dict-entry-a-string",
        lambda bk: _load_into_fresh(bk, _bn_state(bk, bias="zeros")),
        TypeError,
        r"load_state_dict: entry 'bias' must be an array or a number; received str",
    ),
    (
        "load-state-dict-integer-entry",
        lambda bk: _load_into_fresh(bk, _bn_state(bk, weight=_raw(bk, np.ones(6, np.int32)))),
        TypeError,
        r"load_state_dict: entry 'weight' must have a real floating dtype; received \S*int32",
    ),
    (
        "load-state-dict-not-a-mapping",
        lambda bk: _load_into_fresh(bk, [("weight", _x(bk, (6,)))]),
        TypeError,
        r"load_state_dict: `state` must be a mapping of names to arrays .*received list",
    ),
    (
        "load-file-without-config",
        lambda bk: _checkpoint(bk, _npz(**_BN2)),
        ValueError,
        r"anynorm\.load: '.*ckpt\.npz' is not an anynorm checkpoint \(no '__anynorm_config__' "
        r"entry\); save layers with layer\.save\(path\)",
    ),
    (
        "load-truncated-file",
        lambda bk: _checkpoint(bk, _truncated),
        ValueError,
        r"anynorm\.load: ('.*ckpt\.npz' is not a readable anynorm checkpoint \(truncated|"
        r"entry '\w+' of '.*ckpt\.npz' is truncated or corrupt)",
    ),
    (
        "load-text-file",
        lambda bk: _checkpoint(bk, _text),
        ValueError,
        r"anynorm\.load: '.*ckpt\.npz' is not a readable anynorm checkpoint \(truncated or "
        r"not an \.npz file\)",
    ),
    (
        "load-object-array",
        lambda bk: _checkpoint(bk, _object_array),
        ValueError,
        r"anynorm\.load: entry 'weight' of '.*' cannot be loaded without pickle \(object "
        r"array\?\); anynorm never unpickles",
    ),
    (
        "load-unknown-class",
        lambda bk: _checkpoint(bk, _npz(**_BN2, **{CONFIG_KEY: _config("BatchNorm9d")})),
        ValueError,
        r"anynorm\.load: .* holds unknown layer class 'BatchNorm9d'; known classes: "
        r"\[.*'BatchNorm'",
    ),
    (
        "load-mis-shaped-entry",
        lambda bk: _checkpoint(
            bk, _npz(**{**_BN2, "bias": np.zeros(3), CONFIG_KEY: _config(num_features=2)})
        ),
        ValueError,
        r"BatchNorm\.load_state_dict: mis-shaped entries: bias: expected \(2,\), received \(3,\)",
    ),
    (
        "load-device-without-xp",
        lambda bk: _checkpoint(
            bk, _npz(**_BN2, **{CONFIG_KEY: _config(num_features=2)}), xp=None, device=bk.device
        ),
        ValueError,
        r"anynorm\.load: pass `xp` together with `device`",
    ),
    # -- empty arrays: statistics over zero values --------------------------------------------
    (
        "empty-batch-batch-norm-training",
        lambda bk: anynorm.BatchNorm(6)(_x(bk, (0, 6, 5))),
        ValueError,
        r"BatchNorm\.forward: `x` of shape \(0, 6, 5\) has 0 values per feature to compute "
        r"statistics from \(a dimension of size 0\); .*eval",
    ),
    (
        "empty-spatial-batch-norm-functional",
        lambda bk: F.batch_norm(_x(bk, (4, 6, 0))),
        ValueError,
        r"batch_norm: `x` of shape \(4, 6, 0\) has 0 values per feature .*`mean` and `var`",
    ),
    (
        "empty-spatial-instance-norm",
        lambda bk: anynorm.InstanceNorm(6)(_x(bk, (4, 6, 0))),
        ValueError,
        r"InstanceNorm\.forward: `x` of shape \(4, 6, 0\) has 0 values per channel of each "
        r"sample",
    ),
    (
        "empty-axis-layer-norm-functional",
        lambda bk: F.layer_norm(_x(bk, (4, 0))),
        ValueError,
        r"layer_norm: `x` of shape \(4, 0\) has 0 values per normalized slice \(axis=-1\)",
    ),
    (
        "empty-axis-rms-norm-backward",
        lambda bk: F.rms_norm_backward(_x(bk, (3, 0)), _x(bk, (3, 0))),
        ValueError,
        r"rms_norm_backward: `x` of shape \(3, 0\) has 0 values per normalized slice",
    ),
    (
        "empty-spatial-group-norm-layer",
        lambda bk: anynorm.GroupNorm(3, 6)(_x(bk, (4, 6, 0))),
        ValueError,
        r"GroupNorm\.forward: `x` of shape \(4, 6, 0\) has 0 values per group .*an empty "
        r"batch is fine",
    ),
    (
        "empty-batch-instance-norm-running-stats",
        _instance_norm_empty_batch_tracking,
        ValueError,
        r"InstanceNorm\.forward: `x` of shape \(0, 6, 5\) has 0 values per channel across the "
        r"batch .*running statistics",
    ),
]


DEVICE_ERRORS = [
    (
        "functional-weight-on-another-device",
        _weight_other_device,
        ValueError,
        r"batch_norm: all arrays must be on one device; `x` is on .* but `weight` is on .*"
        r"Move `weight` to",
    ),
    (
        "layer-x-on-another-device",
        _x_other_device,
        ValueError,
        r"BatchNorm\.forward: the layer's arrays are on device .* but `x` is on .*layer\.to",
    ),
    (
        "layer-dy-on-another-device",
        _dy_other_device,
        ValueError,
        r"LayerNorm\.backward: `dy` is on device .* but the last output is on .*move dy there",
    ),
]


def test_the_table_is_large_and_its_ids_unique():
    ids = [row[0] for row in ERRORS + DEVICE_ERRORS]
    assert len(ids) >= 40
    assert len(set(ids)) == len(ids), "duplicate ids in ERRORS"


@pytest.mark.parametrize(
    ("call", "exc", "match"), [r[1:] for r in ERRORS], ids=[r[0] for r in ERRORS]
)
def test_error(bk, call, exc, match):
    with pytest.raises(exc, match=match) as info:
        call(bk)
    # the exact type, not a subclass that merely inherits (e.g. FileNotFoundError is an OSError)
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert message.startswith("anynorm."), f"the message does not name the function: {message}"
    assert len(message) < 600, f"the message is too long to read: {message}"


# numpy, JAX (CPU) and Dask have one device on a CPU-only machine: these rows cannot apply
@pytest.mark.backends("array_api_strict", "torch")
@pytest.mark.parametrize(
    ("call", "exc", "match"), [r[1:] for r in DEVICE_ERRORS], ids=[r[0] for r in DEVICE_ERRORS]
)
def test_device_error(bk, call, exc, match):
    test_error(bk, call, exc, match)


def test_a_refused_state_leaves_the_layer_unchanged(bk):
    """load_state_dict checks every entry (keys, types, dtypes, shapes) before it loads any:
    a refused state changes nothing, and a fresh layer stays without arrays."""
    layer = _trained(bk, anynorm.BatchNorm(6))
    before = {k: bk.to_numpy(v).copy() for k, v in layer.state_dict().items()}
    new_weight = bk.asarray(np.full(6, 3.0), dtype=bk.param_dtype)
    with pytest.raises(TypeError, match="entry 'bias' must have a real floating dtype"):
        layer.load_state_dict(
            {**layer.state_dict(), "weight": new_weight, "bias": _raw(bk, np.zeros(6, np.int32))}
        )
    with pytest.raises(ValueError, match="mis-shaped entries: bias"):
        layer.load_state_dict(
            {**layer.state_dict(), "weight": new_weight, "bias": bk.asarray(np.zeros(2))}
        )
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(bk.to_numpy(v), before[k], err_msg=f"{k} changed")
    fresh = anynorm.BatchNorm(6)
    with pytest.raises(TypeError, match="entry 'weight' must have a real floating dtype"):
        fresh.load_state_dict({"weight": _raw(bk, np.ones(6, np.int32))}, strict=False)
    assert fresh.params == {} and fresh.buffers == {}
