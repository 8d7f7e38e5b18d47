"""The one module that talks to ``array_api_compat`` and to concrete backends.

Everything backend-specific lives here, each item with a comment that names the gap in the
array API standard it papers over. Layer math never imports numpy, torch, cupy, jax or dask.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any

import array_api_compat
from array_api_compat import (
    is_array_api_obj,
    is_array_api_strict_namespace,
    is_cupy_namespace,
    is_dask_namespace,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_array,
    is_torch_namespace,
)

__all__ = [
    "array_namespace",
    "compute_dtype",
    "convert",
    "device",
    "half_dtypes",
    "index_dtype",
    "is_array",
    "is_torch_array",
    "namespace_name",
    "namespace_of",
    "to_numpy",
]

Array = Any
Namespace = Any


def is_array(x: object) -> bool:
    """True for an array of any namespace that array-api-compat recognises."""
    return is_array_api_obj(x)


def array_namespace(*arrays: Array) -> Namespace:
    """The (compat-wrapped) namespace shared by ``arrays``; raises TypeError otherwise."""
    return array_api_compat.array_namespace(*arrays)


def device(x: Array) -> Any:
    """The device of ``x`` (works on NumPy arrays and dask arrays, which lack ``.device``)."""
    return array_api_compat.device(x)


def no_autodiff(xp: Namespace) -> Any:
    """A context in which the framework records no autodiff graph: ``torch.no_grad()`` for
    torch, nothing elsewhere. The explicit backward, the running statistics and the SGD
    update run in it, so a training loop on tensors that require grad keeps no graph (the
    standard has no notion of autodiff)."""
    if is_torch_namespace(xp):
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def inplace_ok(a: Array) -> bool:
    """May anynorm write into ``a``, a temporary it has just allocated itself?

    Not for immutable arrays (JAX) and not for torch tensors that take part in autograd
    (an in-place op there can invalidate a tensor saved for torch's backward). The standard
    has in-place operators but no way to ask whether using them is safe."""
    if is_torch_array(a):
        import torch

        if torch.compiler.is_compiling():  # functionalized by the compiler
            return not a.requires_grad
        return not a.requires_grad and not _RECORDING.get()
    return array_api_compat.is_writeable_array(a)


#: set while a function decorated with :func:`autograd_safe` runs on torch tensors that
#: autograd records: no in-place writes at all then (see :func:`records_autograd`)
_RECORDING = contextvars.ContextVar("anynorm_autograd_recording", default=False)


def autograd_safe(fn):
    """Decorator: while ``fn`` runs on torch tensors that autograd records (grad mode on,
    one argument requires grad), :func:`inplace_ok` says no to every array. A temporary that
    does not require grad itself may still have been saved for the backward of an
    operation with one that does (``g·d`` saves ``d``); writing it afterwards would make
    torch raise at the (double) backward. Costs nothing elsewhere."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        arrays = [a for a in (*args, *kwargs.values()) if is_torch_array(a)]
        if not arrays:
            return fn(*args, **kwargs)
        import torch

        if torch.compiler.is_compiling() or _RECORDING.get() or not records_autograd(*arrays):
            return fn(*args, **kwargs)
        token = _RECORDING.set(True)
        try:
            return fn(*args, **kwargs)
        finally:
            _RECORDING.reset(token)

    return wrapper


def records_autograd(*arrays: Array) -> bool:
    """Does torch's autograd record operations on these arrays (grad mode on and one of them
    requires grad)? Then every operand of such an operation may be saved for its backward,
    even one that does not require grad itself (``g·d`` saves ``d`` for ``∂/∂g``), and must
    not be written in place afterwards: torch would raise at the backward (double
    backward through anynorm's explicit backward). Always False outside torch."""
    tensors = [a for a in arrays if is_torch_array(a)]
    if not tensors:
        return False
    import torch

    return torch.is_grad_enabled() and any(a.requires_grad for a in tensors)


def copy(xp: Namespace, a: Array) -> Array:
    """A copy of ``a`` that never aliases it. On torch ``clone`` (differentiable; torch 2.13's
    ``asarray(copy=True)`` warns about its changed ``requires_grad`` default)."""
    if is_torch_array(a):
        return a.clone()
    return xp.asarray(a, copy=True)


def same_device(a: Any, b: Any) -> bool:
    """Device equality where an unknown device matches anything (JAX tracers inside
    ``jax.jit`` report no concrete device: ``device(tracer)`` is None) and a device given as
    a string matches the device object it names (``"cpu"`` and ``torch.device("cpu")``)."""
    return a is None or b is None or a == b or str(a) == str(b)


def to_device(x: Array, dev: Any) -> Array:
    return array_api_compat.to_device(x, dev)


def namespace_name(xp: Namespace) -> str:
    """A short, user-facing backend name: numpy, cupy, torch, jax, dask or array_api_strict."""
    for name, check in (
        ("numpy", is_numpy_namespace),
        ("cupy", is_cupy_namespace),
        ("torch", is_torch_namespace),
        ("jax", is_jax_namespace),
        ("dask", is_dask_namespace),
        ("array_api_strict", is_array_api_strict_namespace),
    ):
        if check(xp):
            return name
    return getattr(xp, "__name__", repr(xp))


def namespace_of(target: Any) -> Namespace:
    """Resolve an array, an array module (``numpy``, ``torch``, ``cupy``, ``jax.numpy``,
    ``dask.array``, ``array_api_strict``) or a compat namespace to the compat namespace."""
    if is_array(target):
        return array_namespace(target)
    asarray = getattr(target, "asarray", None)
    if asarray is None or not hasattr(target, "__name__"):
        raise TypeError(
            "expected an array namespace (numpy, torch, cupy, jax.numpy, dask.array, "
            f"array_api_strict) or an array, received {type(target).__name__} {target!r}"
        )
    # The standard has no "namespace for this module" query: make a tiny array and ask.
    return array_namespace(asarray([0.0]))


def half_dtypes(xp: Namespace) -> tuple:
    """float16 and bfloat16 where the namespace has them (the standard has neither)."""
    out = []
    for name in ("float16", "bfloat16"):
        dt = getattr(xp, name, None)
        if dt is not None:
            out.append(dt)
    return tuple(out)


def compute_dtype(xp: Namespace, dtype: Any) -> Any:
    """float32 for float16/bfloat16 (statistics and parameters), else ``dtype`` itself."""
    for dt in half_dtypes(xp):
        if dtype == dt:
            return xp.float32
    return dtype


def index_dtype(xp: Namespace, dev: Any) -> Any:
    """The default integer (indexing) dtype on ``dev``: int64, or int32 on JAX without x64."""
    info = getattr(xp, "__array_namespace_info__", None)
    if info is not None:
        try:
            return info().default_dtypes(device=dev)["indexing"]
        except Exception:  # some namespaces reject device=; fall back below
            pass
    return xp.int64


def to_numpy(x: Array) -> Any:
    """A NumPy copy of ``x`` on the host, from any namespace and device (used by save,
    the self-check and tests; never inside forward/backward)."""
    import numpy as np  # lazily: `import anynorm` must not import numpy

    xp = array_namespace(x)
    if is_numpy_namespace(xp):
        return np.array(x, copy=True)
    if is_torch_namespace(xp):
        t = x.detach().cpu()
        # NumPy has no bfloat16: widen to float32 (exact).
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy().copy()
    if is_cupy_namespace(xp):
        return x.get()
    if is_dask_namespace(xp):
        return np.array(x.compute(), copy=True)
    if is_array_api_strict_namespace(xp):
        # array-api-strict refuses host conversion from its fake non-CPU devices.
        cpu = xp.__array_namespace_info__().default_device()
        return np.array(np.from_dlpack(to_device(x, cpu)), copy=True)
    return np.array(x, copy=True)


def convert(x: Array, xp: Namespace, dev: Any = None, dtype: Any = None) -> Array:
    """A copy of ``x`` in namespace ``xp`` on device ``dev`` (DLPack where it works, a host
    round trip otherwise), optionally cast to ``dtype``. The cast happens before the device
    move, so float64 data can land on a device without float64 as float32."""
    copied = False
    if array_namespace(x) is xp:
        out = x
    else:
        try:
            out = xp.from_dlpack(x)  # zero-copy where both sides allow it
        except Exception:  # no DLPack path between these two (dask, cross-device): host copy
            out, copied = xp.asarray(to_numpy(x)), True
    if dtype is not None and out.dtype != dtype:
        out, copied = xp.astype(out, dtype), True
    if dev is not None and device(out) != dev:
        out, copied = to_device(out, dev), True
    if not copied:
        out = xp.asarray(out, copy=True)
    return out


def compat_version() -> str:
    """The installed array-api-compat version (for the self-check's header)."""
    return array_api_compat.__version__


def vecdot_last(xp: Namespace, a: Array, b: Array) -> Array:
    """``Σ a·b`` over the last axis, by the fastest ``vecdot`` of the namespace.

    On torch, array-api-compat's top-level ``vecdot`` is a batched matmul: faster than
    ``torch.linalg.vecdot`` on short rows (56–64 elements: 3.0 vs 6.0 ms on (114688, 56)
    float32) but 5× slower on long ones (0.76 vs 0.14 ms on (64, 4096)); rows of 1024 or
    more go through ``linalg.vecdot`` there, and so do all rows under ``torch.compile`` and
    float32 rows whenever ``torch.set_float32_matmul_precision`` lets matmuls run in
    bfloat16/TF32."""
    if is_torch_namespace(xp) and (int(a.shape[-1]) >= 1024 or _torch_avoid_matmul(a)):
        return xp.linalg.vecdot(a, b, axis=-1)
    return xp.vecdot(a, b, axis=-1)


def _torch_avoid_matmul(a: Array) -> bool:
    """Keep a torch reduction off ``matmul``: while ``torch.compile`` traces (a reduction
    fuses there; and dynamo cannot trace the precision query), or for float32 while
    ``torch.set_float32_matmul_precision`` is not "highest" ("medium": bfloat16 matmuls on
    CPU (oneDNN) and GPU; "high": TF32 on GPU)."""
    import torch

    if torch.compiler.is_compiling():
        return True
    return a.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"


def is_lazy(value: Any) -> bool:
    """A Dask array (asked through the namespace, so no dask import for other arrays)."""
    return namespace_name(array_namespace(value)) == "dask"


def persist_dask(state: list, extras: list, kwargs: dict) -> tuple[list, list]:
    """Dask only (the array API standard has no notion of lazy evaluation). One graph
    execution computes ``state`` and ``extras``.

    ``state`` (layer arrays) comes back computed and re-wrapped as in-memory dask arrays of
    the same chunks: one task per chunk and no history. A bare ``dask.persist`` is not
    enough on a distributed cluster: the scheduler keeps the lineage of every persisted key,
    with the data embedded in it (e.g. every ``da.from_array`` batch), so that it could
    recompute them (dask/distributed#809, dask/dask#4630). ``extras`` come back as
    ``dask.persist`` returns them (futures on a cluster, lineage kept)."""
    import dask
    import dask.array as da

    if extras:
        done = dask.persist(*state, *extras, **kwargs)
        values = dask.compute(*done[: len(state)], **kwargs) if state else ()
        extras = list(done[len(state) :])
    else:
        values = dask.compute(*state, **kwargs)
    fresh = [
        da.from_array(v, chunks=a.chunks, name=False, asarray=False)
        for v, a in zip(values, state, strict=True)
    ]
    return fresh, extras


def blas_sums(xp: Namespace, a: Array) -> bool:
    """Should sums over ``a``'s axes go through ``matmul`` with a ones vector?

    A performance choice the standard cannot express. On NumPy (and array-api-strict, which
    is NumPy underneath) ``sum`` over a short trailing axis or over leading axes runs well
    below memory bandwidth, while ``matmul`` with ones is one BLAS pass: on (100352, 64)
    float32, one thread, 1.1 ms against 3.3–3.8 ms for ``sum(axis=0)``/``sum(axis=-1)``;
    torch CPU gains on leading axes (2.0 → 1.1 ms). Only for C-contiguous arrays (the
    reshape that feeds ``matmul`` would copy otherwise), never while ``torch.compile``
    traces (a reduction fuses there, a BLAS call does not), and not on JAX, Dask or CuPy,
    whose reductions are fused or lazy (unmeasured on CuPy), and not for torch float32 when
    ``torch.set_float32_matmul_precision`` allows reduced-precision matmuls."""
    if is_numpy_namespace(xp):
        return bool(a.flags.c_contiguous)
    if is_torch_namespace(xp):
        if a.device.type != "cpu" or _torch_avoid_matmul(a):
            return False
        return a.is_contiguous()
    if is_array_api_strict_namespace(xp):
        raw = getattr(a, "_array", None)
        return raw is not None and bool(raw.flags.c_contiguous)
    return False


def block_dot_sums(xp: Namespace, a: Array, b: Array, block: int) -> Array | None:
    """Block partial sums of ``a·b`` over axis 1 of ``(B, M, K)`` arrays: shape
    ``(B, ceil(M/block), K)``, each entry the sum over ``block`` consecutive ``M`` values
    (the last block shorter). None where this backend has no fast way.

    The array API standard can only form the product (one full-size temporary) and then
    sum it. NumPy's ``einsum("bnmk,bnmk->bnk")`` fuses the two, reading each operand once:
    on ``(1, 100352, 64)`` float32, one thread, 2.1 ms against 8.3 ms for product plus BLAS
    sum (float64 9 against 23.5 ms). Unblocked, einsum accumulates sequentially along
    ``M`` (relative error 2.9e-5 at ``M = 1e5`` float32); in blocks of 128 it is 4.4e-7,
    better than the product plus BLAS sum (3.4e-6). NumPy C-contiguous float32/float64
    only."""
    if not (is_numpy_namespace(xp) and a.dtype == b.dtype and a.dtype in (xp.float32, xp.float64)):
        return None
    if not (a.flags.c_contiguous and b.flags.c_contiguous):
        return None
    import numpy as np  # only reached with NumPy arrays

    lead, m, k = (int(s) for s in a.shape)
    if m == 0:
        return np.zeros((lead, 0, k), dtype=a.dtype)
    nb = m // block
    parts = []
    if nb:
        full = (lead, nb, block, k)
        head_a, head_b = a[:, : nb * block].reshape(full), b[:, : nb * block].reshape(full)
        parts.append(np.einsum("bnmk,bnmk->bnk", head_a, head_b))
    if m > nb * block:
        parts.append(np.einsum("bmk,bmk->bk", a[:, nb * block :], b[:, nb * block :])[:, None])
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def _loop_core(shape: tuple[int, ...], vshape: tuple[int, ...]) -> int:
    """The length of the innermost run NumPy's iterator can coalesce for ``x ∘ v``: the
    product of the trailing axes of ``shape`` (size-1 axes skipped) over which ``vshape``
    keeps one pattern, broadcast (size 1) or full."""
    if len(vshape) != len(shape):
        return 0
    core, pattern = 1, None
    for s, v in zip(reversed(shape), reversed(vshape), strict=True):
        if s == 1:
            continue
        full = v == s
        if pattern is None:
            pattern = full
        elif full != pattern:
            break
        core *= s
    return core


#: NumPy's default ufunc buffer size (elements)
_NUMPY_BUFSIZE = 8192

_NO_CONTEXT = contextlib.nullcontext()


def numpy_loops(xp: Namespace, shape: Any, *vshapes: Any) -> Any:
    """A context for elementwise work on NumPy arrays of ``shape`` against broadcast
    operands of the keepdims shapes ``vshapes`` (None entries and full shapes ignored).

    A performance choice the standard cannot express. NumPy (2.x, up to at least 2.4)
    buffers a ufunc whose coalesced inner run ("core") is shorter than the ufunc buffer
    size (8192 elements) when an operand is broadcast along it: it copies every operand,
    the broadcast one included, through the buffers (numpy/numpy#13307, #32595). On
    (32, 64, 3136) float32, one thread, ``x *= s`` with a per-channel ``s`` takes 2.4 ms
    buffered against 1.3 ms unbuffered; for cores of 512 to 8191 elements (NumPy's default
    buffer size) a buffer no larger than the core turns the buffering off (measured on
    cores of 784 to 4096). Shorter cores gain nothing (they are slower with small
    buffers), so they are left alone; so are arrays under 65536 values. The buffer size
    is set inside ``numpy.errstate()``, which restores it on exit (NumPy >= 2: a context
    variable, thread- and task-local); nothing on other namespaces or on NumPy 1.x."""
    if not is_numpy_namespace(xp):
        return _NO_CONTEXT
    shape = tuple(shape)  # NumPy shapes: ints
    if math.prod(shape) < _NUMPY_BUFSIZE * 8:
        return _NO_CONTEXT  # small arrays: not worth the context's cost (~5 µs)
    core = min(
        (_loop_core(shape, v) for v in map(tuple, filter(None, vshapes)) if v != shape),
        default=0,
    )
    if not _SHORT_RUN <= core < _NUMPY_BUFSIZE:
        return _NO_CONTEXT
    return _numpy_bufsize(1 << (core.bit_length() - 1))


def long_row_views(xp: Namespace, full: Any, vectors: list) -> tuple | None:
    """``(full views, tiled vectors)`` for an elementwise operation of the C-contiguous
    NumPy arrays ``full`` (one shape) with keepdims ``vectors`` that all vary along the
    same short trailing run only (channels-last per-channel vectors), or None.

    A performance choice the standard cannot express. NumPy buffers such an operation (see
    :func:`numpy_loops`); on rows of at least its buffer size it runs unbuffered: ``y *= s``
    on (100352, 64) float32 with a (64,) ``s``, one thread, 2.2 ms against 1.3 ms on the
    (784, 8192) view with ``s`` tiled 128 times. With a trailing run of ``c < 512`` values
    (longer runs are left to :func:`numpy_loops`) after a run of ``mid`` values along which
    every vector is broadcast, the full arrays are viewed as ``(*lead, mid/T, c·T)`` and the
    vectors as ``(*lead_v, 1, c)`` tiled ``T`` times, ``T`` the smallest divisor of ``mid``
    with ``8192 <= c·T < 32768 + 4c``. None also when no such ``T`` exists or the tiled
    vectors would exceed 1/16 of the array."""
    if not (is_numpy_namespace(xp) and all(a.flags.c_contiguous for a in full)):
        return None
    shape = tuple(full[0].shape)
    plans = {tuple(v.shape): None for v in vectors if v.ndim == len(shape)}
    if not plans or len(plans) < len({tuple(v.shape) for v in vectors}):
        return None
    for vshape in plans:
        plans[vshape] = _row_plan(shape, vshape)
        if plans[vshape] is None:
            return None
    if len({p[0] for p in plans.values()}) != 1:
        return None
    view, _, reps = next(iter(plans.values()))
    return (
        [a.reshape(view) for a in full],
        [xp.tile(v.reshape(plans[tuple(v.shape)][1]), reps) for v in vectors],
    )


#: inner runs shorter than this gain nothing from a smaller ufunc buffer
#: (:func:`numpy_loops`); channels-last vectors that vary along them are tiled instead
#: (:func:`long_row_views`)
_SHORT_RUN = 512


def _row_plan(shape: tuple[int, ...], vshape: tuple[int, ...]):
    """``(view, vector view, repetitions)`` for :func:`long_row_views`, or None."""
    nd, t = len(shape), len(shape)
    while t > 0 and (vshape[t - 1] == shape[t - 1] or shape[t - 1] == 1):
        t -= 1
    m = t
    while m > 0 and vshape[m - 1] == 1:
        m -= 1
    c, mid = math.prod(shape[t:]), math.prod(shape[m:t])
    if t == nd or m == t or c >= _SHORT_RUN or c * mid < _NUMPY_BUFSIZE:
        return None
    lo = -(-_NUMPY_BUFSIZE // c)
    hi = min(mid, 4 * lo)
    reps = next((r for r in range(lo, hi + 1) if mid % r == 0), None)
    if reps is None or 16 * c * reps * math.prod(vshape[:m]) > math.prod(shape):
        return None
    return (*shape[:m], mid // reps, c * reps), (*vshape[:m], 1, c), (1,) * (m + 1) + (reps,)


#: bytes per operand block of :func:`blockwise` (a few blocks stay in a core's L2 cache)
_BLOCK_BYTES = 1 << 17


def blockwise(xp: Namespace, fn: Any, full: list, vectors: list, *, out: Array = None) -> Any:
    """``fn(*full, *vectors)`` evaluated block by block on NumPy, or None elsewhere.

    ``full`` are C-contiguous arrays of one shape, ``vectors`` keepdims arrays that
    broadcast against it, and ``fn`` an elementwise chain (several operations, e.g.
    ``k·g − n + m·x``) that returns an array of its operands' broadcast shape. A
    performance choice the standard cannot express: NumPy evaluates every operation of a
    chain over the whole array, one pass over memory each, and each fresh full-size
    temporary costs page faults; on blocks of 128 KiB per operand the temporaries stay in
    the L2 cache and are reused, and only the inputs and the result cross memory. On
    (784, 8192) float32, one thread, ``k·g − n + m·x`` takes 10.8 ms in blocks against
    21.3 ms whole (float64: 31 against 50 ms). The result is written into ``out`` when
    given (``fn`` may then work in place on the block of ``full[0] is out``), else into a
    fresh array. None (the caller evaluates ``fn`` whole) when there are fewer than 32
    blocks (4 MiB): smaller arrays stay in the cache anyway."""
    if not is_numpy_namespace(xp):
        return None
    import numpy as np  # only reached with NumPy arrays

    target = _BLOCK_BYTES // full[0].dtype.itemsize
    if full[0].size < 32 * target:
        return None
    shape = tuple(int(s) for s in full[0].shape)
    if any(tuple(a.shape) != shape or not a.flags.c_contiguous for a in full):
        return None
    if any(v.ndim != len(shape) for v in vectors):
        return None
    ax, trail = len(shape), 1
    while ax > 0 and trail * shape[ax - 1] <= target:
        ax -= 1
        trail *= shape[ax]
    if ax == 0:
        return None
    bax = ax - 1  # blocks of `chunk` indices along this axis, for every index before it
    n = shape[bax]
    chunk = max(1, target // trail)
    chunk = -(-n // -(-n // chunk))  # equal blocks: no sliver at the end
    for idx in np.ndindex(*shape[:bax]):
        for i in range(0, shape[bax], chunk):
            sl = (*idx, slice(i, i + chunk))
            blocks = [a[sl] for a in full]
            vblocks = [_vector_block(v, idx, bax, slice(i, i + chunk)) for v in vectors]
            r = fn(*blocks, *vblocks)
            if out is None:
                out = np.empty(shape, dtype=r.dtype)
            if r is not blocks[0] or full[0] is not out:
                out[sl] = r
    return out


#: bytes per operand of a :func:`row_blocks` block. Measured on LayerNorm f+b of
#: (32, 56, 56, 64) float32, one thread: 16 KiB 126 ms, 64 KiB 62, 128 KiB 49, 256 KiB 40,
#: 512 KiB 42, 1 MiB 83 (per-block Python work below, temporaries that glibc maps and
#: unmaps every block above)
_ROW_BLOCK_BYTES = 1 << 18


def row_block_size(xp: Namespace, full: list, m: int) -> int | None:
    """Rows per block for :func:`row_blocks` on the arrays ``full`` viewed as ``(R, m)``
    rows, or None: not NumPy, not C-contiguous arrays of one shape, a row longer than a
    block (``_ROW_BLOCK_BYTES`` per operand) or fewer than 32 blocks (8 MiB of float32).
    Equal blocks, the last one at most as long as the others. Cheap to decline: it is asked
    before the caller builds anything."""
    if not is_numpy_namespace(xp):
        return None
    shape = full[0].shape
    if any(a.shape != shape or not a.flags.c_contiguous for a in full):
        return None
    n_rows = full[0].size // max(m, 1)
    per = _ROW_BLOCK_BYTES // max(4, *(a.dtype.itemsize for a in full)) // max(m, 1)
    if per < 1 or n_rows < 32 * per:
        return None
    return -(-n_rows // -(-n_rows // per))  # equal blocks: no sliver at the end


def row_blocks(
    xp: Namespace,
    fn: Any,
    kinds: tuple[str, ...],
    per: int,
    full: list,
    rowvecs: list = (),
    tiled: list = (),
    shared: list = (),
) -> tuple:
    """``fn`` evaluated on NumPy arrays block by block of ``per`` whole rows
    (:func:`row_block_size`, which decides whether and how to block).

    ``full`` are C-contiguous ``(R, M)`` arrays, ``rowvecs`` ``(R, 1)`` arrays (per-row
    statistics) sliced with the rows, ``tiled`` ``(1, M)`` arrays (per-column vectors) given
    to every block tiled to its ``(B, M)`` shape, ``shared`` given whole. ``fn(*full,
    *rowvecs, *tiled, *shared)`` returns one array per entry of ``kinds``: ``"rows"``
    results (the block's rows on their first axis) are stacked into ``(R, …)`` arrays,
    ``"sum"`` results are summed over the blocks (in the dtype of the block results).

    A performance choice the standard cannot express, for row-wise computations whose rows
    are short (LayerNorm over 56 or 64 values): NumPy evaluates every operation of the
    chain over the whole array, one pass over memory and often a fresh full-size
    temporary each, and broadcasting a per-row statistic along short rows runs through its
    ufunc buffer. On blocks of 256 KiB per operand everything but the inputs and results
    stays in the L2 cache, and a tiled per-column vector is a plain elementwise operand.
    LayerNorm f+b on (32, 56, 56, 64) float32, one thread: 0.60–0.69 of the whole-array
    time. ``fn`` is only ever called here, on fresh NumPy blocks: it may update its own
    temporaries in place."""
    import numpy as np  # only reached with NumPy arrays

    n_rows = int(full[0].shape[0])
    tiles = [np.tile(t, (per, 1)) for t in tiled]
    outs: list = [None] * len(kinds)
    parts: list = [[] for _ in kinds]
    for i in range(0, n_rows, per):
        sl = slice(i, i + per)
        b = min(per, n_rows - i)
        res = fn(
            *(a[sl] for a in full),
            *(v[sl] for v in rowvecs),
            *(t if b == per else t[:b] for t in tiles),
            *shared,
        )
        for j, (kind, r) in enumerate(zip(kinds, res, strict=True)):
            if kind == "sum":
                parts[j].append(r)
                continue
            if outs[j] is None:
                outs[j] = np.empty((n_rows, *r.shape[1:]), dtype=r.dtype)
            outs[j][sl] = r
    for j, kind in enumerate(kinds):
        if kind == "sum":
            outs[j] = np.sum(np.stack(parts[j]), axis=0)
    return tuple(outs)


def row_outer(xp: Namespace, u: Array, pair: Array) -> Array:
    """``u·v``, shape ``(B, M)``, for NumPy arrays: a per-row column ``u`` ``(B, 1)`` and
    ``pair = [v; 0]`` ``(2, M)``, as the matrix product ``[u, 0] @ [v; 0]``. Exact: each
    entry is the one product ``u_i·v_j`` plus ``0·0`` (a ``−0`` product comes out ``+0``).

    A performance choice for the blocks of :func:`row_blocks`, which the standard cannot
    express: NumPy broadcasts ``u`` along rows of 64 values through its ufunc buffer
    (17.5 µs for a 512×64 float32 multiply in cache, against 6.1 µs for two full operands),
    while this product is one BLAS call (4.4 µs; NumPy's ``matmul`` with an inner dimension
    of 1 is far slower, 66 µs) and gives a full-size operand."""
    import numpy as np  # NumPy blocks only; the namespace wrappers cost more than the product

    left = np.zeros((u.shape[0], 2), dtype=u.dtype)
    left[:, :1] = u
    return left @ pair


def _vector_block(v: Array, idx: tuple, bax: int, rows: slice) -> Array:
    """The part of the keepdims vector ``v`` that meets the block ``(*idx, rows)``."""
    lead = tuple(j if int(v.shape[d]) > 1 else 0 for d, j in enumerate(idx))
    return v[(*lead, rows if int(v.shape[bax]) > 1 else slice(None))]


@functools.cache
def _numpy2() -> bool:
    import numpy as np

    return int(np.__version__.split(".")[0]) >= 2


@contextlib.contextmanager
def _numpy_bufsize(size: int):
    import numpy as np

    if not _numpy2():  # errstate does not scope the buffer size
        yield
        return
    with np.errstate():
        if size < np.getbufsize():
            np.setbufsize(size)
        yield


def _torch_fused_ok(a: Array, *others: Array) -> bool:
    """May ``a`` (a torch tensor) be updated in place by a fused elementwise op on
    ``others`` (``a.addcmul_(...)``)? When :func:`inplace_ok` says so, outside
    ``torch.compile`` (which fuses on its own), and when ``a`` already has the broadcast
    shape."""
    import torch

    if torch.compiler.is_compiling() or not inplace_ok(a):
        return False
    shapes = [o.shape for o in others if is_torch_array(o)]
    return tuple(torch.broadcast_shapes(a.shape, *shapes)) == tuple(a.shape)


def add_product(xp: Namespace, acc: Array, a: Array, b: Array, *, scratch: bool = False) -> Array:
    """``acc + a·b`` for arrays of one (the compute) dtype, written into ``acc`` (a fresh
    temporary) where :func:`inplace_ok` allows.

    The standard has no fused multiply-add: the product is a full-size temporary, then it
    is added. torch has one: ``acc.addcmul_(a, b)`` reads ``a`` and ``acc`` once and
    writes ``acc`` once (5.2 against 7.8 ms for ``acc += a·b`` on (100352, 64) float32 with
    a per-column ``b``, one thread; 3.0 against 6.7 ms on NCHW with a per-channel ``b``).
    torch's ``addcmul`` is not faster for ``a·b + c`` with two broadcast operands, fresh or
    in place, so only this form is fused. Elsewhere the product is taken in ``a``'s own
    buffer when ``scratch`` says ``a`` is a fresh temporary the caller no longer needs,
    then added in place."""
    if is_torch_array(acc):
        import torch

        if _torch_fused_ok(acc, a, b):
            return acc.addcmul_(a, b)
        return torch.addcmul(acc, a, b)
    prod = _product(a, b, scratch and tuple(a.shape) == tuple(acc.shape))
    if inplace_ok(acc) and tuple(acc.shape) == tuple(prod.shape):
        acc += prod
        return acc
    return acc + prod


def product_plus(xp: Namespace, a: Array, b: Array, c: Array, *, scratch: bool = False) -> Array:
    """``a·b + c`` for arrays of one (the compute) dtype, ``c`` of the result's shape;
    ``b`` and ``c`` are never written. torch: one fused pass (``addcmul(c, a, b)``, fresh).
    Elsewhere the product, in ``a``'s own buffer when ``scratch`` says ``a`` is a fresh
    temporary the caller no longer needs, then ``c`` added in place: one fresh array
    fewer than ``c + a·b`` when ``c`` is the caller's (Lp backward:
    ``dx = (g − x·Σ(g·x)/N²)/N``)."""
    if is_torch_array(a):
        import torch

        return torch.addcmul(c, a, b)
    out = _product(a, b, scratch)
    if inplace_ok(out) and tuple(out.shape) == tuple(c.shape):
        out += c
        return out
    return out + c


def _product(a: Array, b: Array, scratch: bool) -> Array:
    """``a·b``, written into ``a`` when ``scratch`` (a fresh temporary of the result's
    shape) and :func:`inplace_ok` allow."""
    if scratch and inplace_ok(a):
        a *= b
        return a
    return a * b
