"""``python -m anynorm bench``: anynorm against torch's native kernels and the copy floor.

For every layer, shape, dtype and installed backend it times forward, backward and
forward+backward of anynorm's layer; the same data through torch's native function with
autograd (one thread and torch's default thread count); a NumPyNet-style naive NumPy
implementation (cached ``x̂`` copies, per-step temporaries) of the same math; and the copy
floor (``copyto`` of the same array), all measured in the same run with interleaved
repetitions after a warm-up. It prints a markdown table (median ms with spread, ratio to
torch, ratio to the copy floor, peak extra memory as a multiple of the input) and writes the
table and a PNG plot under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import _compat

Array = Any

SHAPES_FULL = {
    "(64, 4096)": (64, 4096),
    "NCHW (32, 64, 56, 56)": (32, 64, 56, 56),
    "NHWC (32, 56, 56, 64)": (32, 56, 56, 64),
    "NCHW (64, 64, 128, 128) 256MB": (64, 64, 128, 128),
}
SHAPES_QUICK = {
    "(64, 4096)": (64, 4096),
    "NCHW (8, 64, 56, 56)": (8, 64, 56, 56),
    "NHWC (8, 56, 56, 64)": (8, 56, 56, 64),
}
LAYERS = (
    "BatchNorm",
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm",
    "RMSNorm",
    "L2Norm",
    "L1Norm",
    "LocalResponseNorm",
)
#: layers run on the >= 256 MB case, in float32 only (more would make the full run take
#: too long on a 2-core machine)
BIG_LAYERS = ("BatchNorm", "L2Norm")


def _layout(shape: tuple[int, ...], label: str) -> str:
    if len(shape) == 2:
        return "NC"
    return "NHWC" if label.startswith("NHWC") else "NCHW"


def _make_layer(name: str, shape: tuple[int, ...], layout: str):
    """The anynorm layer and the torch native callable ``f(x, params) -> y`` for ``name``
    on ``shape``; None where the layer does not apply (e.g. instance norm on 2-D input)."""
    import anynorm

    c_ax = -1 if layout == "NHWC" else 1
    c = shape[c_ax]
    if name == "BatchNorm":
        return anynorm.BatchNorm(c, axis=c_ax), ("batch_norm", c)
    if name == "LayerNorm":
        return anynorm.LayerNorm(shape[-1]), ("layer_norm", shape[-1])
    if name == "GroupNorm":
        return anynorm.GroupNorm(32, c, axis=c_ax), ("group_norm", c)
    if name == "InstanceNorm":
        if len(shape) < 3:
            return None
        return anynorm.InstanceNorm(c, affine=True, axis=c_ax), ("instance_norm", c)
    if name == "RMSNorm":
        return anynorm.RMSNorm(shape[-1]), ("rms_norm", shape[-1])
    if name == "L2Norm":
        return anynorm.L2Norm(axis=c_ax), ("l2", None)
    if name == "L1Norm":
        return anynorm.L1Norm(axis=c_ax), ("l1", None)
    if name == "LocalResponseNorm":
        if len(shape) < 3:
            return None
        return anynorm.LocalResponseNorm(5, axis=c_ax), ("lrn", None)
    raise ValueError(name)


def _functional(name: str, shape: tuple[int, ...], layout: str, xp: Any, dtype: Any, dev: Any):
    """``(forward(x), backward(g, x))``: the layer's functional forms (parameters bound, as
    arrays of ``xp``), for ``torch.compile``; the backward recomputes the statistics."""
    from . import functional as F

    c_ax = -1 if layout == "NHWC" else 1
    c = shape[c_ax]
    n = shape[-1] if name in ("LayerNorm", "RMSNorm") else c
    w = xp.ones(n, dtype=dtype, device=dev)
    b = xp.zeros(n, dtype=dtype, device=dev)
    spec = {  # name -> (forward, backward, arguments after x, after (g, x), keywords)
        "BatchNorm": (F.batch_norm, F.batch_norm_backward, (w, b), (w,), {"axis": c_ax}),
        "LayerNorm": (F.layer_norm, F.layer_norm_backward, (w, b), (w,), {"axis": -1}),
        "GroupNorm": (F.group_norm, F.group_norm_backward, (32, w, b), (32, w), {"axis": c_ax}),
        "InstanceNorm": (F.instance_norm, F.instance_norm_backward, (w, b), (w,), {"axis": c_ax}),
        "RMSNorm": (F.rms_norm, F.rms_norm_backward, (w,), (w,), {"axis": -1}),
        "L2Norm": (F.l2_normalize, F.l2_normalize_backward, (), (), {"axis": c_ax}),
        "L1Norm": (F.l1_normalize, F.l1_normalize_backward, (), (), {"axis": c_ax}),
        "LocalResponseNorm": (
            F.local_response_norm,
            F.local_response_norm_backward,
            (5,),
            (5,),
            {"axis": c_ax},
        ),
    }
    if name not in spec:
        raise ValueError(name)
    fwd, bwd, fargs, bargs, kw = spec[name]
    return (lambda x: fwd(x, *fargs, **kw)), (lambda g, x: bwd(g, x, *bargs, **kw))


def _blocking(phases: dict[str, Callable[[], Any]]) -> dict[str, Callable[[], Any]]:
    """JAX dispatches asynchronously and has no global sync: wait for each result."""
    import jax

    return {k: (lambda f=f: jax.block_until_ready(f())) for k, f in phases.items()}


def _compiled(name, shape, layout, backend, xp, x, g):
    """The ``anynorm[<backend>+compile]`` contender: the functional forms under
    ``torch.compile(fullgraph=True)`` (inductor), or ``anynorm[jax+jit]`` under
    ``jax.jit``; compiled (and run once) here, untimed."""
    import warnings

    fwd, bwd = _functional(name, shape, layout, xp, x.dtype, _compat.device(x))
    if backend == "jax":
        import jax

        jf, jb = jax.jit(fwd), jax.jit(bwd)
        jax.block_until_ready((jf(x), jb(g, x)))

        def jfb():  # both results: the forward is an independent asynchronous call
            return jf(x), jb(g, x)

        return _blocking({"fwd": lambda: jf(x), "bwd": lambda: jb(g, x), "f+b": jfb})
    import torch

    with warnings.catch_warnings():
        # array-api-compat's namespace lookup calls lru_cache-wrapped helpers; dynamo
        # warns that it traces through the cache (about array-api-compat, not anynorm)
        warnings.filterwarnings("ignore", message=".*functools.lru_cache", category=UserWarning)
        # torch warns about its own deprecated torch.jit while inductor imports
        warnings.filterwarnings(
            "ignore", message=".*torch.jit.script_method", category=DeprecationWarning
        )
        # every case compiles the same lambdas anew (dynamo would count each case as a
        # recompile of one function, up to its limit of 8), under the thread count it is
        # timed with (dynamo guards on it)
        torch.compiler.reset()
        threads = torch.get_num_threads()
        if backend == "torch":
            torch.set_num_threads(1)
        try:
            cf = torch.compile(fwd, fullgraph=True, dynamic=False)
            cb = torch.compile(bwd, fullgraph=True, dynamic=False)
            cf(x)
            cb(g, x)
        finally:
            torch.set_num_threads(threads)

    def fb():
        cf(x)
        return cb(g, x)

    phases = {"fwd": lambda: cf(x), "bwd": lambda: cb(g, x), "f+b": fb}
    return phases if backend != "torch" else {k: _one_thread(f) for k, f in phases.items()}


def _torch_fn(kind: str, n: int | None, layout: str, torch: Any, dtype: Any):
    """torch's native op with autograd on the torch-layout view of the data."""
    F = torch.nn.functional
    w = b = None
    if n is not None:
        w = torch.ones(n, dtype=dtype, requires_grad=True)
        b = torch.zeros(n, dtype=dtype, requires_grad=True)

    def to_native(x):  # NHWC data as a channels-last NCHW view: torch's native NHWC kernels
        return x.permute(0, 3, 1, 2) if layout == "NHWC" else x

    def run(x):
        xn = to_native(x)
        if kind == "batch_norm":
            return F.batch_norm(xn, None, None, w, b, training=True)
        if kind == "layer_norm":
            return F.layer_norm(x, (n,), w, b)
        if kind == "group_norm":
            return F.group_norm(xn, 32, w, b)
        if kind == "instance_norm":
            return F.instance_norm(xn, weight=w, bias=b)
        if kind == "rms_norm":
            return F.rms_norm(x, (n,), w)
        if kind == "l2":
            return F.normalize(xn, p=2.0, dim=1)
        if kind == "l1":
            return F.normalize(xn, p=1.0, dim=1)
        if kind == "lrn":
            return F.local_response_norm(xn, 5)
        raise ValueError(kind)

    return run, [p for p in (w, b) if p is not None]


# ----------------------------------------------------------------------------- naive NumPy
def _naive(name: str, layout: str, np: Any):
    """NumPyNet-style implementations: the math right, the habits naive (cached x̂, mean and
    centred copies, fresh temporaries in every step, statistics via np.mean/np.var)."""
    c_ax = -1 if layout == "NHWC" else 1

    class Naive:
        def forward(self, x):
            self.x = x.copy()
            if name in ("BatchNorm", "LayerNorm", "InstanceNorm", "GroupNorm", "RMSNorm"):
                if name == "BatchNorm":
                    ax = tuple(a for a in range(x.ndim) if a != c_ax % x.ndim)
                elif name == "InstanceNorm":
                    ax = tuple(a for a in range(1, x.ndim) if a != c_ax % x.ndim)
                elif name == "GroupNorm":
                    ax = None
                else:
                    ax = (-1,)
                if name == "GroupNorm":
                    xm = np.moveaxis(x, c_ax, 1)
                    g = xm.reshape(xm.shape[0], 32, -1)
                    self.mean = g.mean(axis=2, keepdims=True)
                    self.var = g.var(axis=2, keepdims=True)
                    self.xc = g - self.mean
                    self.xhat = self.xc / np.sqrt(self.var + 1e-5)
                    y = np.moveaxis(self.xhat.reshape(xm.shape), 1, c_ax)
                    return y.copy()
                if name == "RMSNorm":
                    self.ms = np.mean(x**2, axis=ax, keepdims=True)
                    self.xhat = x / np.sqrt(self.ms + 1e-6)
                    return self.xhat.copy()
                self.mean = x.mean(axis=ax, keepdims=True)
                self.var = x.var(axis=ax, keepdims=True)
                self.xc = x - self.mean
                self.xhat = self.xc / np.sqrt(self.var + 1e-5)
                self.ax = ax
                return self.xhat * 1.0 + 0.0
            if name in ("L2Norm", "L1Norm"):
                p = 2 if name == "L2Norm" else 1
                self.norm = (
                    np.linalg.norm(x, ord=p, axis=c_ax, keepdims=True)
                    if p == 2
                    else np.sum(np.abs(x), axis=c_ax, keepdims=True)
                )
                self.y = x / np.maximum(self.norm, 1e-12)
                return self.y.copy()
            sq = x**2
            pad = [(0, 0)] * x.ndim
            pad[c_ax % x.ndim] = (2, 2)
            sp = np.pad(sq, pad)
            s = sum(np.take(sp, range(o, o + x.shape[c_ax]), axis=c_ax) for o in range(5))
            self.d = 1.0 + 1e-4 / 5 * s
            return x * self.d**-0.75

        def backward(self, g):
            if name in ("BatchNorm", "LayerNorm", "InstanceNorm"):
                m = np.prod([self.x.shape[a] for a in self.ax])
                istd = 1.0 / np.sqrt(self.var + 1e-5)
                dxhat = g * 1.0
                return (
                    istd
                    / m
                    * (
                        m * dxhat
                        - dxhat.sum(axis=self.ax, keepdims=True)
                        - self.xhat * (dxhat * self.xhat).sum(axis=self.ax, keepdims=True)
                    )
                )
            if name == "GroupNorm":
                gm = np.moveaxis(g, c_ax, 1).reshape(self.xhat.shape)
                m = gm.shape[2]
                istd = 1.0 / np.sqrt(self.var + 1e-5)
                dx = (
                    istd
                    / m
                    * (
                        m * gm
                        - gm.sum(axis=2, keepdims=True)
                        - self.xhat * (gm * self.xhat).sum(axis=2, keepdims=True)
                    )
                )
                return np.moveaxis(dx.reshape(np.moveaxis(g, c_ax, 1).shape), 1, c_ax)
            if name == "RMSNorm":
                r = 1.0 / np.sqrt(self.ms + 1e-6)
                return r * (g - self.xhat * np.mean(g * self.xhat, axis=-1, keepdims=True))
            if name == "L2Norm":
                n = np.maximum(self.norm, 1e-12)
                return (g - self.y * np.sum(g * self.y, axis=c_ax, keepdims=True)) / n
            if name == "L1Norm":
                n = np.maximum(self.norm, 1e-12)
                return g / n - np.sign(self.x) * np.sum(g * self.x, axis=c_ax, keepdims=True) / n**2
            t = g * self.x * self.d**-1.75
            pad = [(0, 0)] * t.ndim
            pad[c_ax % t.ndim] = (2, 2)
            tp = np.pad(t, pad)
            back = sum(np.take(tp, range(o, o + t.shape[c_ax]), axis=c_ax) for o in range(5))
            return g * self.d**-0.75 - 2 * 1e-4 * 0.75 / 5 * self.x * back

    return Naive()


# ----------------------------------------------------------------------------- timing
@dataclass
class Row:
    layer: str
    shape: str
    dtype: str
    contender: str
    ms: dict[str, float] = field(default_factory=dict)  # phase -> median ms
    spread: dict[str, float] = field(default_factory=dict)  # phase -> (max-min)/median
    mem: float | None = None


class _Timed:
    """Returned by a setup callable: only ``run`` is timed (e.g. torch's backward alone)."""

    def __init__(self, run: Callable[[], Any]) -> None:
        self.run = run


def _one_thread(f: Callable[[], Any]) -> Callable[[], Any]:
    def call():
        import torch

        torch.set_num_threads(1)
        return f()

    return call


def _time(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    out = fn()
    if isinstance(out, _Timed):
        sync()
        t0 = time.perf_counter()
        out.run()
    sync()
    return (time.perf_counter() - t0) * 1e3


def _peak_extra(fn: Callable[[], Any], nbytes: int) -> float:
    """Peak bytes allocated (tracemalloc sees NumPy's buffers) during ``fn`` / input size."""
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    out = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del out
    return (peak - base) / nbytes


class _Progress:
    def __init__(self, total: int, quiet: bool) -> None:
        self.bar = None
        self.n, self.total, self.quiet = 0, total, quiet
        if not quiet:
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="case", file=sys.stderr)

    def step(self, text: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        elif not self.quiet:
            print(f"\r[{self.n}/{self.total}] {text:<60}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif not self.quiet:
            print(file=sys.stderr)


def _case(args, np, torch, default_threads, rng, label, shape, dname, lname) -> list[Row]:
    """Time every contender on one (layer, shape, dtype) case."""
    rows: list[Row] = []
    backends = [b for b in args.backends if b != "torch" or torch is not None]
    reps = args.reps
    layout = _layout(shape, label)
    made = _make_layer(lname, shape, layout)
    if made is None:
        return rows
    x_np = rng.standard_normal(shape).astype(dname)
    g_np = rng.standard_normal(shape).astype(dname)
    contenders: dict[str, dict[str, Callable[[], Any]]] = {}
    syncs: dict[str, Callable[[], None]] = {}
    mems: dict[str, float | None] = {}
    for backend in backends:
        xp, x, g, sync = _backend_arrays(backend, x_np, g_np)
        layer, _ = _make_layer(lname, shape, layout)
        layer(x)
        layer.backward(g)

        def fwd(layer=layer, x=x):
            return layer(x)

        def bwd(layer=layer, g=g):
            return layer.backward(g)

        def fb(layer=layer, x=x, g=g):
            layer(x)
            return layer.backward(g)

        key = f"anynorm[{backend}]"
        contenders[key] = {"fwd": fwd, "bwd": bwd, "f+b": fb}
        if backend == "torch":  # compared with torch's native kernels on one thread
            contenders[key] = {k: _one_thread(f) for k, f in contenders[key].items()}
        if backend == "jax":
            contenders[key] = _blocking(contenders[key])
        syncs[key] = sync
        mems[key] = _peak_extra(fb, x_np.nbytes) if backend == "numpy" else None
        if args.compile and backend in ("torch", "torch-cuda", "jax"):
            ckey = f"anynorm[{backend}+{'jit' if backend == 'jax' else 'compile'}]"
            contenders[ckey] = _compiled(lname, shape, layout, backend, xp, x, g)
            syncs[ckey] = sync
            mems[ckey] = None
        buf = np.empty_like(x_np) if backend == "numpy" else None
        if backend == "numpy":
            contenders["copy floor"] = {"fwd": lambda b=buf: np.copyto(b, x_np)}
            syncs["copy floor"] = lambda: None
            mems["copy floor"] = None
    if ("numpy" in backends and not args.quick) or args.naive:
        naive = _naive(lname, layout, np)
        naive.forward(x_np)

        def nfb(naive=naive):
            naive.forward(x_np)
            return naive.backward(g_np)

        contenders["naive numpy"] = {
            "fwd": lambda n=naive: n.forward(x_np),
            "bwd": lambda n=naive: n.backward(g_np),
            "f+b": nfb,
        }
        syncs["naive numpy"] = lambda: None
        mems["naive numpy"] = _peak_extra(nfb, x_np.nbytes)
    if torch is not None:
        kind, n = made[1]
        tdtype = getattr(torch, dname)
        xt = torch.from_numpy(x_np).requires_grad_(True)
        gt = torch.from_numpy(g_np)
        fn, params = _torch_fn(kind, n, layout, torch, tdtype)
        gview = (
            gt.permute(0, 3, 1, 2)
            if layout == "NHWC" and kind not in ("layer_norm", "rms_norm")
            else gt
        )

        def tf(fn=fn, xt=xt):
            return fn(xt)

        def tb(fn=fn, xt=xt, gview=gview, params=params):
            y = fn(xt)
            xt.grad = None
            for p in params:
                p.grad = None
            y.backward(gview)

        def tback(fn=fn, xt=xt, gview=gview, params=params):
            y = fn(xt)  # untimed: _Timed runs only the part after setup()
            xt.grad = None
            for p in params:
                p.grad = None
            return _Timed(lambda: y.backward(gview))

        for threads, key in ((1, "torch 1 thread"), (default_threads, "torch default")):
            if key == "torch default" and threads == 1:
                continue  # the same contender as "torch 1 thread" (one core)

            def with_threads(f, threads=threads):
                def call():
                    torch.set_num_threads(threads)
                    return f()

                return call

            contenders[key] = {
                "fwd": with_threads(tf),
                "bwd": with_threads(tback),
                "f+b": with_threads(tb),
            }
            syncs[key] = lambda: None
            mems[key] = None
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.warmup):
        for key, phases in contenders.items():
            for fn in phases.values():
                _time(fn, syncs[key])
    for _ in range(reps):  # interleaved: every contender once per repetition
        for key, phases in contenders.items():
            for phase, fn in phases.items():
                times.setdefault((key, phase), []).append(_time(fn, syncs[key]))
    if torch is not None:
        torch.set_num_threads(default_threads)
    for key, phases in contenders.items():
        row = Row(lname, label, dname, key, mem=mems.get(key))
        for phase in phases:
            ts = times[(key, phase)]
            med = statistics.median(ts)
            row.ms[phase] = med
            row.spread[phase] = (max(ts) - min(ts)) / med if med > 0 else 0.0
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> list[Row]:
    import numpy as np

    try:
        import torch
    except ImportError:
        torch = None
    shapes = SHAPES_QUICK if args.quick else SHAPES_FULL
    if args.shapes:
        shapes = {k: v for k, v in shapes.items() if args.shapes in k}
    dtypes = ("float32",) if args.quick else ("float32", "float64")
    layers = [name for name in LAYERS if args.layers is None or name in args.layers]
    cases = [
        (lab, sh, dt, ly)
        for lab, sh in shapes.items()
        for dt in dtypes
        for ly in layers
        if "256MB" not in lab or (ly in BIG_LAYERS and dt == "float32")
    ]
    rows: list[Row] = []
    progress = _Progress(len(cases), args.quiet)
    rng = np.random.default_rng(0)
    default_threads = torch.get_num_threads() if torch is not None else 1
    x64 = _jax_x64()
    try:
        for label, shape, dname, lname in cases:
            progress.step(f"{lname} {label} {dname}")
            rows += _case(args, np, torch, default_threads, rng, label, shape, dname, lname)
    finally:
        x64()
    progress.close()
    return rows


def _jax_x64() -> Callable[[], None]:
    """A function that puts JAX's ``jax_enable_x64`` back as it is now (the jax cases turn
    it on, a process-wide setting, so that float64 stays float64)."""
    import os

    jax = sys.modules.get("jax")
    if jax is None:  # the value jax will start with when the bench imports it
        env = os.environ.get("JAX_ENABLE_X64", "").strip().lower()
        before = env in ("1", "true", "t", "yes", "y", "on")
    else:
        before = bool(jax.config.read("jax_enable_x64"))

    def restore() -> None:
        now = sys.modules.get("jax")
        if now is not None:
            now.config.update("jax_enable_x64", before)

    return restore


def _backend_arrays(backend: str, x_np: Any, g_np: Any):
    """``(xp, x, g, sync)`` for a backend; ``sync`` waits for queued device work."""
    if backend == "numpy":
        import numpy as np

        return _compat.namespace_of(np), x_np, g_np, lambda: None
    if backend == "torch":
        import torch

        return (
            _compat.namespace_of(torch),
            torch.from_numpy(x_np),
            torch.from_numpy(g_np),
            lambda: None,
        )
    if backend == "cupy":
        import cupy

        return (
            _compat.namespace_of(cupy),
            cupy.asarray(x_np),
            cupy.asarray(g_np),
            cupy.cuda.Device().synchronize,
        )
    if backend == "torch-cuda":
        import torch

        dev = torch.device("cuda")
        return (
            _compat.namespace_of(torch),
            torch.from_numpy(x_np).to(dev),
            torch.from_numpy(g_np).to(dev),
            torch.cuda.synchronize,
        )
    if backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)  # else float64 cases would run in float32
        return (
            _compat.namespace_of(jax.numpy),
            jax.device_put(x_np),
            jax.device_put(g_np),
            lambda: None,  # the jax contenders block on their results (_blocking)
        )
    raise ValueError(
        f"bench: unsupported backend {backend!r} (numpy, torch, cupy, torch-cuda, jax)"
    )


# ----------------------------------------------------------------------------- output
def table(rows: list[Row]) -> str:
    """Markdown: one line per (layer, shape, dtype, contender), f+b ratio columns."""
    ref: dict[tuple, Row] = {}
    floor: dict[tuple, float] = {}
    for r in rows:
        k = (r.layer, r.shape, r.dtype)
        if r.contender == "torch 1 thread":
            ref[k] = r
        if r.contender == "copy floor":
            floor[k] = r.ms["fwd"]
    out = [
        "| layer | shape | dtype | contender | fwd ms | bwd ms | f+b ms (spread) "
        "| f+b / torch 1T | f+b / copy | peak extra mem |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.contender == "copy floor":
            continue
        k = (r.layer, r.shape, r.dtype)
        fb = r.ms.get("f+b")
        t = ref.get(k)
        ratio = f"{fb / t.ms['f+b']:.2f}" if fb and t else "-"
        cf = f"{fb / floor[k]:.1f}" if fb and k in floor else "-"
        mem = f"{r.mem:.2f}x" if r.mem is not None else "-"
        out.append(
            f"| {r.layer} | {r.shape} | {r.dtype} | {r.contender} | {r.ms.get('fwd', 0):.2f} "
            f"| {r.ms.get('bwd', 0):.2f} | {fb or 0:.2f} (±{100 * r.spread.get('f+b', 0) / 2:.0f}%)"
            f" | {ratio} | {cf} | {mem} |"
        )
    return "\n".join(out)


def _short(label: str) -> str:
    """A compact shape label for the plot: 2-D, NCHW, NHWC, NCHW-256MB."""
    if label.startswith("("):
        return "2-D"
    return label.split(" ")[0] + ("-256MB" if "256MB" in label else "")


def plot(rows: list[Row], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ref = {
        (r.layer, r.shape, r.dtype): r.ms["f+b"] for r in rows if r.contender == "torch 1 thread"
    }
    series: dict[str, list[tuple[str, float]]] = {}
    for r in rows:
        k = (r.layer, r.shape, r.dtype)
        if r.contender in ("copy floor", "torch 1 thread") or k not in ref or "f+b" not in r.ms:
            continue
        series.setdefault(r.contender, []).append(
            (f"{r.layer}\n{_short(r.shape)} {r.dtype[-2:]}", r.ms["f+b"] / ref[k])
        )
    labels = sorted({lab for s in series.values() for lab, _ in s})
    if not labels:
        return False
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(labels)), 5))
    width = 0.8 / max(1, len(series))
    for i, (name, pts) in enumerate(sorted(series.items())):
        d = dict(pts)
        xs = [j + i * width for j, lab in enumerate(labels) if lab in d]
        ax.bar(xs, [d[lab] for lab in labels if lab in d], width=width, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("forward+backward time / torch native (1 thread)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.legend(fontsize=8)
    ax.set_title("anynorm vs torch native (lower is faster; 1.0 = torch, 1 thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _pin_numpy_blas() -> Callable[[], tuple[str, Callable[[], None]]]:
    """Run NumPy's BLAS on one thread, as torch's "1 thread" contender runs.

    The targets compare single-threaded kernels, and anynorm's NumPy sums go through
    ``matmul`` (BLAS), which would otherwise use every core. Call before NumPy is imported:
    it sets ``OPENBLAS_NUM_THREADS=1`` (NumPy's wheels use OpenBLAS). The returned callable,
    called after the import, also limits the BLAS through ``threadpoolctl`` when that is
    installed (MKL builds, NumPy imported already), and returns what is in effect (read
    back from the libraries when it can) and a callable that restores the previous limits
    and environment. A caller's own ``OPENBLAS_NUM_THREADS`` is respected (and reported).
    ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` are left alone: torch reads them for its
    default thread count, which is a contender of its own.
    """
    import os

    preset = os.environ.get("OPENBLAS_NUM_THREADS")
    imported = "numpy" in sys.modules
    if preset is None:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"

    def restore_env() -> None:
        if preset is None:
            os.environ.pop("OPENBLAS_NUM_THREADS", None)

    def after() -> tuple[str, Callable[[], None]]:
        try:
            from threadpoolctl import threadpool_info, threadpool_limits
        except ImportError:
            if preset is not None:
                text = f"NumPy BLAS: OPENBLAS_NUM_THREADS={preset} (set by the caller)"
            elif imported:
                text = "NumPy BLAS threads NOT pinned (install threadpoolctl)"
            else:
                text = "NumPy BLAS: 1 thread (OPENBLAS_NUM_THREADS=1)"
            return text, restore_env
        limits = None if preset is not None else threadpool_limits(limits=1, user_api="blas")
        libs = [
            f"{i['internal_api']} {i['num_threads']}"
            for i in threadpool_info()
            if i["user_api"] == "blas"
        ]
        text = "NumPy BLAS threads: " + (", ".join(libs) or "no BLAS loaded")
        if preset is not None:
            text += f" (OPENBLAS_NUM_THREADS={preset} set by the caller)"

        def restore() -> None:
            if limits is not None:
                limits.restore_original_limits()
            restore_env()

        return text, restore

    return after


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m anynorm bench``."""
    import os

    parser = argparse.ArgumentParser(prog="python -m anynorm bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small shapes, float32: ~30 s")
    parser.add_argument(
        "--backends",
        default="numpy,torch",
        help="anynorm backends to time (numpy, torch, cupy, torch-cuda, jax)",
    )
    parser.add_argument("--layers", default=None, help="comma-separated layer names")
    parser.add_argument(
        "--shapes", default=None, help="only the shapes whose label contains this text, e.g. 4096"
    )
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (>= 7)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--naive", action="store_true", help="include the naive NumPy implementation in --quick too"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the functional forms under torch.compile on the torch backends "
        "(inductor; needs a C++ compiler on CPU; each case compiles for ~10-30 s first) "
        "and under jax.jit on jax; their backward recomputes the statistics",
    )
    parser.add_argument("--out", default=os.path.join("benchmarks", "out"))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    pinned = _pin_numpy_blas()
    try:
        import numpy  # noqa: F401
    except ImportError:
        pinned()[1]()
        print('anynorm bench needs NumPy: pip install "anynorm[numpy]"', file=sys.stderr)
        return 2
    blas, restore = pinned()
    try:
        return _main(args, blas)
    finally:
        restore()


def _main(args: argparse.Namespace, blas: str) -> int:
    import os

    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.layers = None if args.layers is None else [s.strip() for s in args.layers.split(",")]
    if args.reps is None:
        args.reps = 5 if args.quick else 7
    t0 = time.perf_counter()
    rows = run(args)
    md = table(rows)
    os.makedirs(args.out, exist_ok=True)
    head = (
        f"anynorm bench ({'quick' if args.quick else 'full'}), {platform.platform()}, "
        f"{os.cpu_count()} CPUs, median of {args.reps} interleaved runs after "
        f"{args.warmup} warm-ups, {time.perf_counter() - t0:.0f} s; {blas}"
    )
    print(head)
    print()
    print(md)
    with open(os.path.join(args.out, "bench.md"), "w") as fh:
        fh.write(head + "\n\n" + md + "\n")
    png = os.path.join(args.out, "bench.png")
    if plot(rows, png):
        print(f"\nwrote {os.path.join(args.out, 'bench.md')} and {png}")
    else:
        print(f"\nwrote {os.path.join(args.out, 'bench.md')} (no plot: matplotlib missing)")
    return 0
