"""The shared core of batch, layer, instance, group and RMS normalization.

They differ only in which axes the statistics reduce over (``axes``) and which axes the
affine parameters vary along. This module computes the statistics (two-pass: mean, then the
centred second moment), applies ``x̂ = (x − μ)·istd`` with the affine map, and holds the one
backward every member of the family uses:

    x̂  = (x − μ)·istd,   y = γ·x̂ + β,   dx̂ = γ·g
    dx = istd/M · (M·dx̂ − Σ_R dx̂ − x̂·Σ_R(dx̂·x̂))          (training statistics)
    dx = istd·dx̂                                             (frozen statistics)
    dγ = Σ_P g·x̂,   dβ = Σ_P g

with ``R`` the statistics axes (``M`` elements) and ``P`` the axes the parameters are
broadcast over. RMS norm is the uncentred case (``μ = 0``, no ``Σ_R dx̂`` term). Arrays are in
the compute dtype (float32 for float16/bfloat16 input).

Speed: the kernels make as few passes over memory as they can. Sums of products go through
``vecdot`` when the reduced axes end in a trailing run of at least 16 values (no product
temporary), and on NumPy over leading or middle axes through a blocked ``einsum``
(:func:`_blocked_sum_prod`: no product temporary, 3-4× faster and more accurate than the
product plus a sum); plain sums of C-contiguous NumPy/torch-CPU arrays go through
``matmul`` with a ones vector (:func:`_sum`); full-size temporaries the function has just
allocated are updated in place where that is safe (:func:`anynorm._compat.inplace_ok`);
inputs and cached arrays are never written. On NumPy the elementwise chains (scale and
shift, ``k·g + m·x − n``) run without NumPy's ufunc buffering (a buffer no longer than
the inner run: :func:`anynorm._compat.numpy_loops`; channels-last vectors tiled on a
long-row view: :func:`_elementwise`) and block by block in cache
(:func:`anynorm._compat.blockwise`). When the weight varies inside a statistics
group (GroupNorm: the group's channels) the backward still runs on small sums: per
sub-group (sample and channel) over the other reduced axes, then ``S_A = Σ γ·A`` and
``S_C = Σ γ·C`` per group, and ``dx = k·g + m·x + n`` with per-sample-and-channel
``k, m, n``. LayerNorm and RMSNorm (weight over the whole trailing normalized slice) on
BLAS namespaces take the row form of :func:`_rows_backward`: every sum a matrix-vector
product on the ``(rows, M)`` view. On large NumPy inputs the row form runs block by block
of whole rows (:func:`rows_standardize`, :func:`_rows_backward_blocked`,
:func:`anynorm._compat.row_blocks`), forward and backward, each block's work in cache.
Inputs of fewer than ``_SMALL`` values skip all of this planning and run the plain
operations (:func:`_small`): at that size the planning is most of a call's cost. float16
input on NumPy is never cast whole where a chunk loop applies: the row blocks cast per
block, the per-group form (and L1/L2) chunk by chunk along axis 0 (:func:`_cast_step`,
:func:`_chunks`, :func:`_chunk_moments`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

from .._compat import (
    add_product,
    autograd_safe,
    blas_sums,
    block_dot_sums,
    blockwise,
    copy,
    device,
    inplace_ok,
    is_numpy_namespace,
    long_row_views,
    numpy_loops,
    row_block_size,
    row_blocks,
    row_outer,
    vecdot_last,
)

Array = Any


def _size(x: Array, axes: tuple[int, ...]) -> int:
    return math.prod([int(x.shape[a]) for a in axes])


def _main_run(shape: list[int], axes: tuple[int, ...]) -> tuple[int, int]:
    """``(start, stop)`` of the largest run of consecutive axes among ``axes`` (sorted,
    non-negative)."""
    runs, i = [], 0
    while i < len(shape):
        if i in axes:
            j = i
            while j + 1 in axes:
                j += 1
            runs.append((i, j + 1))
            i = j + 1
        else:
            i += 1
    return max(runs, key=lambda r: math.prod(shape[r[0] : r[1]]))


def _run_shape(shape: list[int], start: int, stop: int) -> tuple[int, ...]:
    """``shape`` with the axes ``start:stop`` reduced to 1 (keepdims)."""
    return tuple(1 if start <= ax < stop else s for ax, s in enumerate(shape))


#: arrays with fewer values than this skip the planning of the fast paths (BLAS sums,
#: blocked sums of products, long-row views, blocks): at this size the plain operation is
#: as fast and the planning (tens of microseconds per call) is what a call costs
_SMALL = 1 << 16


def _small(a: Array) -> bool:
    """Fewer than ``_SMALL`` values: plain sums and operations, no fast-path planning.
    (BatchNorm f+b on (32, 128) float32, NumPy: 248 against 397 µs with the planning.)"""
    return math.prod([int(s) for s in a.shape]) < _SMALL


#: bytes of the compute dtype per chunk when float16 input is cast piece by piece
#: (:func:`_cast_step`)
_CAST_CHUNK_BYTES = 1 << 20


def _cast_step(xp: Any, x: Array, cdt: Any) -> int | None:
    """Chunk length along axis 0 for casting float16 ``x`` to the compute dtype ``cdt``
    piece by piece (:func:`_chunks`), or None: the whole-array cast. NumPy only (the
    per-chunk calls would cost more than the copy on the other namespaces), not for small
    inputs, and only when there are at least two chunks of ``_CAST_CHUNK_BYTES``.
    A float32 copy of the whole input is twice its float16 size; per chunk, the peak stays
    at the float16 result plus a chunk."""
    if x.dtype == cdt or not is_numpy_namespace(xp) or len(x.shape) == 0 or _small(x):
        return None
    n = int(x.shape[0])
    row = math.prod([int(s) for s in x.shape[1:]]) * xp.empty(0, dtype=cdt).itemsize
    step = max(1, _CAST_CHUNK_BYTES // max(row, 1))
    return step if n > step else None


def _chunks(xp: Any, fn: Any, full: list, vectors: list, cdt: Any, step: int, combine: str):
    """``fn(*chunks, *vector_chunks)`` over chunks of ``step`` along axis 0 of the arrays
    ``full`` (one shape), each chunk cast to ``cdt``; keepdims ``vectors`` are sliced with
    the chunk where they vary along axis 0. ``combine``: ``"sum"`` adds the chunk results
    (sums over axes that include 0), ``"concat"`` writes them into one array along axis 0
    (NumPy arrays: item assignment, no list of parts and no concatenated copy), ``"list"``
    returns them as a list."""
    n = int(full[0].shape[0])
    total = None
    parts = []
    for i in range(0, n, step):
        sl = slice(i, i + step)
        r = fn(
            *[as_compute(a[sl], cdt, xp=xp) for a in full],
            *[v[sl] if int(v.shape[0]) > 1 else v for v in vectors],
        )
        if combine == "list":
            parts.append(r)
        elif combine == "sum":
            total = r if total is None else total + r
        else:
            if total is None:
                total = xp.empty((n, *r.shape[1:]), dtype=r.dtype, device=device(r))
            total[sl] = r
    return parts if combine == "list" else total


def _sum(a: Array, axes: tuple[int, ...], *, xp: Any) -> Array:
    """``Σ_axes a`` with keepdims.

    An empty axis tuple means "no reduction" (``torch.sum(dim=())`` would sum everything):
    a copy then, so a gradient never aliases the caller's ``dy``. Where
    :func:`anynorm._compat.blas_sums` says so, the largest run of consecutive reduced axes is
    summed by ``matmul`` with a ones vector (``(B, M) @ 1`` or ``1ᵀ @ (B, M, K)``: one BLAS
    pass, no temporaries) and the small remainder by ``sum``."""
    if not axes:
        return copy(xp, a)
    if _small(a):
        return xp.sum(a, axis=axes, keepdims=True)
    shape = [int(s) for s in a.shape]
    axes = tuple(sorted(ax % len(shape) for ax in axes))
    if a.dtype not in (xp.float32, xp.float64) or not blas_sums(xp, a):
        return _staged_sum(a, shape, axes, xp=xp)
    start, stop = _main_run(shape, axes)
    m = math.prod(shape[start:stop])
    if m < 8:
        return xp.sum(a, axis=axes, keepdims=True)
    b, k = math.prod(shape[:start]), math.prod(shape[stop:])
    ones = xp.ones(m, dtype=a.dtype, device=device(a))
    if k == 1:
        r = xp.reshape(a, (b, m)) @ ones
    else:
        r = xp.reshape(ones, (1, m)) @ xp.reshape(a, (b, m, k))
    r = xp.reshape(r, _run_shape(shape, start, stop))
    rest = tuple(ax for ax in axes if not start <= ax < stop)
    return xp.sum(r, axis=rest, keepdims=True) if rest else r


def _staged_sum(a: Array, shape: list[int], axes: tuple[int, ...], *, xp: Any) -> Array:
    """``sum`` over ``axes`` (sorted, keepdims), the largest run of consecutive axes first
    when they are not one run. GroupNorm channels-last reduces ``(H, W)`` and ``C/G`` of
    ``(N, H, W, G, C/G)`` at once; ``torch.compile`` then loops per group over ``H·W``
    strips of ``C/G`` (2) values (48.8 ms for the forward of (32, 56, 56, 64) float32, one
    thread); summed over ``(H, W)`` first, every pass reads whole contiguous rows."""
    if len(axes) < 2 or axes[-1] - axes[0] == len(axes) - 1:
        return xp.sum(a, axis=axes, keepdims=True)
    start, stop = _main_run(shape, axes)
    r = xp.sum(a, axis=tuple(range(start, stop)), keepdims=True)
    rest = tuple(ax for ax in axes if not start <= ax < stop)
    return xp.sum(r, axis=rest, keepdims=True)


def _blocked_sum_prod(a: Array, b: Array, axes: tuple[int, ...], *, xp: Any) -> Array | None:
    """``Σ_axes a·b`` (keepdims) without a product temporary, where the largest run ``M`` of
    reduced axes is followed by at least ``_SHORT`` values (``K``, the axes after it:
    BatchNorm channels-last and 2-D, Group/InstanceNorm channels-last) and
    :func:`anynorm._compat.block_dot_sums` can: on the ``(B, M, K)`` view of C-contiguous
    operands, in blocks of ``_BLOCK`` along ``M``, then the block partials summed by
    :func:`_sum`. None where it cannot."""
    if a.shape != b.shape or not (blas_sums(xp, a) and blas_sums(xp, b)):
        return None  # the (B, M, K) view of a strided array would be a copy
    shape = [int(s) for s in a.shape]
    axes = tuple(sorted(ax % len(shape) for ax in axes))
    start, stop = _main_run(shape, axes)
    lead, m, k = math.prod(shape[:start]), math.prod(shape[start:stop]), math.prod(shape[stop:])
    if k < _SHORT or m < 2:
        return None
    view = (lead, m, k)
    parts = block_dot_sums(xp, xp.reshape(a, view), xp.reshape(b, view), _BLOCK)
    if parts is None:
        return None
    r = xp.reshape(_sum(parts, (1,), xp=xp), _run_shape(shape, start, stop))
    rest = tuple(ax for ax in axes if not start <= ax < stop)
    return _sum(r, rest, xp=xp) if rest else r


def sum_prod(a: Array, b: Array, axes: tuple[int, ...], *, xp: Any) -> Array:
    """``Σ_axes a·b`` with keepdims. When the reduced axes end with a run of trailing axes,
    that run goes through ``vecdot`` (one read of each operand, no product temporary); when
    the last axis is not reduced, through :func:`_blocked_sum_prod` where it applies
    (NumPy, C-contiguous); otherwise the product is formed and summed."""
    if not axes:
        return a * b
    if _small(a) and a.shape == b.shape:
        return xp.sum(a * b, axis=axes, keepdims=True)
    nd = a.ndim
    if axes[-1] != nd - 1 or a.shape != b.shape:
        r = None if axes[-1] == nd - 1 else _blocked_sum_prod(a, b, axes, xp=xp)
        return _sum(a * b, axes, xp=xp) if r is None else r
    start = nd - 1
    while start - 1 in axes:
        start -= 1
    if _size(a, tuple(range(start, nd))) < _SHORT:  # vecdot over rows of 2 is slow
        return _sum(a * b, axes, xp=xp)
    lead = tuple(int(s) for s in a.shape[:start])
    flat = (*lead, _size(a, tuple(range(start, nd))))
    r = vecdot_last(xp, xp.reshape(a, flat), xp.reshape(b, flat))
    r = xp.reshape(r, (*lead, *([1] * (nd - start))))
    rest = tuple(ax for ax in axes if ax < start)
    return _sum(r, rest, xp=xp) if rest else r


#: trailing runs shorter than this make per-row work (``vecdot`` rows, broadcasting inner
#: loops) slow on NumPy
_SHORT = 16

#: rows per block of :func:`_blocked_sum_prod`: each block's sum runs sequentially (error
#: ~ ``_BLOCK·ε`` at worst), the block partials are summed by BLAS
_BLOCK = 128


def widen(v: Array, x: Array, *, xp: Any) -> Array:
    """``v`` (a keepdims statistic) materialized along the trailing axes of ``x`` it
    broadcasts over, when those form a short run and the result stays small.

    NumPy's broadcasting inner loop runs over the trailing axes the operands share; a
    per-group statistic of GroupNorm channels-last, shape ``(N, 1, 1, G, 1)`` against
    ``(N, H, W, G, C/G)``, leaves it rows of ``C/G`` (often 2) elements. Spread to
    ``(N, 1, 1, G, C/G)`` (``N·C`` values), the loop runs over whole ``G·C/G`` rows."""
    nd, t = len(x.shape), len(x.shape)
    while t > 0 and int(v.shape[t - 1]) == 1 and int(x.shape[t - 1]) != 1:
        t -= 1
    if t == nd or _size(x, tuple(range(t, nd))) >= _SHORT:
        return v
    shape = (*(int(s) for s in v.shape[:t]), *(int(s) for s in x.shape[t:]))
    if 8 * math.prod(shape) > _size(x, tuple(range(nd))):
        return v
    return v * xp.ones((1,) * t + shape[t:], dtype=v.dtype, device=device(v))


def _elementwise(
    xp: Any, op: Any, vectors: list, *full: Array, chain: bool = False, inplace: bool = False
) -> Array:
    """``op(*full, *vectors)`` for full-size arrays ``full`` (one shape) and keepdims
    ``vectors``, in the full shape. On NumPy:

    - when every vector varies along the same short trailing run only (channels-last
      per-feature vectors), on long-row views with the vectors tiled to match
      (:func:`anynorm._compat.long_row_views`: unbuffered ufunc loops);
    - a ``chain`` of several operations block by block
      (:func:`anynorm._compat.blockwise`): into ``full[0]`` itself when ``inplace`` (``op``
      then updates its first operand in place) and :func:`inplace_ok` allows, else into a
      fresh array."""
    if _small(full[0]):
        return op(*full, *vectors)
    shape = full[0].shape
    views = long_row_views(xp, full, vectors)
    if views is not None:
        full, vectors = views
    r = None
    if chain:
        out = full[0] if inplace and inplace_ok(full[0]) else None
        r = blockwise(xp, op, list(full), list(vectors), out=out)
    if r is None:
        r = op(*full, *vectors)
    return r if views is None else xp.reshape(r, shape)


def _mul(a: Array, b: Array) -> Array:
    return a * b


def _k_g_m_x_n(xp: Any, g: Array, x: Array, k: Array, m: Array, n: Array = None) -> Array:
    """``k·g + m·x − n`` (no ``n`` for RMS), a fresh result."""
    dx = g * k
    if n is not None:
        dx = _isub(dx, n)
    return add_product(xp, dx, x, m)


def _affine(a: Array, *vectors: Array, factors: int, fresh: bool) -> Array:
    """``a·v₁···v_factors (+ v_last)``: the first ``factors`` vectors multiply, a further
    one (the bias) is added. In ``a``'s own buffer unless ``fresh``."""
    if fresh:
        a = a * vectors[0]
        vectors = vectors[1:]
        factors -= 1
    for v in vectors[:factors]:
        a = _imul(a, v)
    return a if len(vectors) == factors else _iadd(a, vectors[factors])


def _sub(a: Array, b: Array) -> Array:
    return a - b


def _imul(a: Array, b: Any) -> Array:
    """``a·b``, written into ``a`` when ``a`` is a fresh temporary that may be written."""
    if inplace_ok(a):
        a *= b
        return a
    return a * b


def _iadd(a: Array, b: Any) -> Array:
    if inplace_ok(a):
        a += b
        return a
    return a + b


def _isub(a: Array, b: Any) -> Array:
    if inplace_ok(a):
        a -= b
        return a
    return a - b


def as_compute(a: Array, cdt: Any, *, xp: Any) -> Array:
    return a if a.dtype == cdt else xp.astype(a, cdt)


def centered_moments(
    x: Array, axes: tuple[int, ...], cdt: Any, *, xp: Any
) -> tuple[Array, Array, Array | None]:
    """``(mean, var, x − mean)``: mean and biased variance over ``axes`` (keepdims) in
    ``cdt``, two-pass, plus the centred array (a fresh temporary the caller may consume),
    or None for float16 NumPy input cast chunk by chunk (:func:`_cast_step`): then
    :func:`standardize` centres chunk by chunk too."""
    count = _size(x, axes)
    step = None if count == 0 else _cast_step(xp, x, cdt)
    if step is not None:  # float16 on NumPy: cast chunk by chunk, no centred array
        return (*_chunk_moments(xp, x, axes, cdt, step, count), None)
    xc = as_compute(x, cdt, xp=xp)
    if count == 0:  # empty reduction: NaN statistics, as the mean of nothing
        mean = xp.mean(xc, axis=axes, keepdims=True)
        return mean, mean, xc - mean
    mean = _sum(xc, axes, xp=xp) / count
    wide = widen(mean, xc, xp=xp)
    with numpy_loops(xp, xc.shape, wide.shape):
        d = _elementwise(xp, _sub, [wide], xc)
    var = sum_prod(d, d, axes, xp=xp) / count
    return mean, var, d


def _chunk_moments(xp, x, axes, cdt, step, count):
    """``(mean, var)`` of float16 ``x`` from one cast of each chunk along axis 0: each chunk's
    own two-pass centred moments (mean ``μ_c`` and ``M2_c = Σ (x − μ_c)²`` over its
    ``n_c`` values). When axis 0 is not reduced (GroupNorm, InstanceNorm) a chunk holds
    whole groups and these are the results; when it is (BatchNorm) they are combined
    exactly as Chan, Golub and LeVeque's pairwise update does:
    ``M2 = Σ M2_c + Σ n_c·(μ_c − μ)²`` with ``μ = Σ n_c·μ_c / N``."""
    n_other = count // int(x.shape[0]) if 0 in axes else count

    def moments_of(a):
        n_c = n_other * int(a.shape[0]) if 0 in axes else count
        mu = _sum(a, axes, xp=xp) / n_c
        d = a - mu
        return xp.stack([mu, sum_prod(d, d, axes, xp=xp)], axis=1)

    if 0 not in axes:
        r = _chunks(xp, moments_of, [x], [], cdt, step, "concat")
        return r[:, 0], r[:, 1] / count
    n = int(x.shape[0])
    parts = _chunks(xp, moments_of, [x], [], cdt, step, "list")
    sizes = [n_other * min(step, n - i) for i in range(0, n, step)]
    mean = sum(p[:, 0] * s for p, s in zip(parts, sizes, strict=True)) / count
    m2 = sum(p[:, 1] + s * (p[:, 0] - mean) ** 2 for p, s in zip(parts, sizes, strict=True))
    return mean, m2 / count


def batch_or_frozen(
    x: Array,
    axes: tuple[int, ...],
    cdt: Any,
    eps: float,
    mean: Array | None,
    var: Array | None,
    *,
    xp: Any,
) -> tuple[Array, Array, Array | None]:
    """``(mean, istd, centred)``: the statistics of ``x`` over ``axes`` with the centred array
    (for :func:`standardize`), or the given frozen ``mean``/``var`` (keepdims shapes, compute
    dtype) with ``centred=None``."""
    if mean is None:
        mu, v, d = centered_moments(x, axes, cdt, xp=xp)
        return mu, inv_std(v, eps, xp=xp), d
    return mean, inv_std(var, eps, xp=xp), None


def moments(x: Array, axes: tuple[int, ...], cdt: Any, *, xp: Any) -> tuple[Array, Array]:
    """Mean and biased variance over ``axes`` (keepdims) in ``cdt``, two-pass."""
    mean, var, _ = centered_moments(x, axes, cdt, xp=xp)
    return mean, var


def mean_square(x: Array, axes: tuple[int, ...], cdt: Any, *, xp: Any) -> Array:
    """Mean of ``x²`` over ``axes`` (keepdims) in ``cdt``: the RMS statistic."""
    xc = as_compute(x, cdt, xp=xp)
    count = _size(x, axes)
    if count == 0:
        return xp.mean(xc, axis=axes, keepdims=True)
    return sum_prod(xc, xc, axes, xp=xp) / count


def inv_std(var: Array, eps: float, *, xp: Any) -> Array:
    return 1.0 / xp.sqrt(var + eps)


def _constant_over(weight: Array | None, axes: tuple[int, ...]) -> bool:
    return weight is None or all(int(weight.shape[a]) == 1 for a in axes)


def _varying(weight: Array | None, axes: tuple[int, ...]) -> tuple[int, ...]:
    """The axes of ``axes`` along which ``weight`` varies (GroupNorm: the channels of a
    group; LayerNorm: all of them)."""
    return () if weight is None else tuple(a for a in axes if int(weight.shape[a]) != 1)


def _small_product(x: Array, *vectors: Array) -> bool:
    """Is the broadcast product of ``vectors`` (keepdims shapes) at most 1/8 of ``x``? Then
    a fused per-element scale is cheap to build (GroupNorm: per sample and channel)."""
    size = 1
    for ax in range(len(x.shape)):
        size *= max(int(v.shape[ax]) for v in vectors)
    return 8 * size <= _size(x, tuple(range(len(x.shape))))


@autograd_safe
def standardize(
    x: Array,
    mean: Array | None,
    istd: Array,
    weight: Array | None,
    bias: Array | None,
    axes: tuple[int, ...],
    *,
    xp: Any,
    centered: Array | None = None,
) -> Array:
    """``y = γ·(x − μ)·istd + β`` cast back to ``x.dtype``.

    ``mean``, ``istd``, ``weight`` and ``bias`` broadcast against ``x`` (keepdims shapes) and
    are in the compute dtype. ``centered`` is ``x − mean`` from :func:`centered_moments`,
    consumed (written into) to become ``y``. ``mean=None`` is the uncentred (RMS) form
    ``y = γ·x·istd + β``."""
    with numpy_loops(xp, x.shape, *_shapes(mean, istd, weight, bias)):
        return _standardize(x, mean, istd, weight, bias, axes, xp=xp, centered=centered)


def _shapes(*arrays: Array | None) -> list:
    return [None if a is None else a.shape for a in arrays]


def _standardize(x, mean, istd, weight, bias, axes, *, xp, centered):
    cdt = istd.dtype
    if _constant_over(weight, axes) or _small_product(x, istd, weight):
        # one fused per-group (GroupNorm: per sample and channel) scale
        vectors = [widen(istd if weight is None else istd * weight, x, xp=xp)]
    else:
        vectors = [istd, weight]
    factors = len(vectors)
    if bias is not None:
        vectors.append(bias)
    step = None if centered is not None or mean is None else _cast_step(xp, x, cdt)
    if step is not None:  # float16 on NumPy: (x − μ)·istd·γ + β chunk by chunk
        op = functools.partial(_chunk_affine, factors=factors, xp=xp, dtype=x.dtype)
        return _chunks(xp, op, [x], [mean, *vectors], cdt, step, "concat")
    if centered is not None:
        y = centered
    elif mean is None:
        y = None
    else:
        y = _elementwise(xp, _sub, [widen(mean, x, xp=xp)], as_compute(x, cdt, xp=xp))
    op = functools.partial(_affine, factors=factors, fresh=y is None)
    if y is None:
        y = _elementwise(xp, op, vectors, as_compute(x, cdt, xp=xp), chain=True)
    else:
        y = _elementwise(xp, op, vectors, y, chain=True, inplace=True)
    return as_compute(y, x.dtype, xp=xp)


@autograd_safe
def standardize_backward(
    dy: Array,
    x: Array,
    mean: Array | None,
    istd: Array,
    weight: Array | None,
    axes: tuple[int, ...],
    param_axes: tuple[int, ...] | None,
    *,
    frozen: bool = False,
    xp: Any,
    reduce: Any = None,
    count: Any = None,
) -> tuple[Array, Array | None, Array | None]:
    """Gradients of :func:`standardize` (statistics from ``x`` unless ``frozen``).

    Returns ``(dx, dweight, dbias)``; ``dweight``/``dbias`` are summed over ``param_axes``
    with keepdims (``None`` when ``param_axes`` is None). ``dx`` has ``x.dtype``.

    ``mean=None`` is the uncentred (RMS) form: ``x̂ = x·istd`` and the ``Σ_R dx̂`` term, which
    comes from differentiating the mean, is absent.

    ``reduce`` (synchronized batch norm) sums the two per-group sums over processes
    (``reduce([A, Σg·x]) -> [A, Σg·x]``) and ``count`` is then the global number of values
    per group (an array); both need the per-group form (weight constant over ``axes``)."""
    with numpy_loops(xp, x.shape, *_shapes(mean, istd, weight)):
        return _standardize_backward(
            dy, x, mean, istd, weight, axes, param_axes, frozen, xp, reduce, count
        )


def _chunk_sums(xp, g, x, axes, cdt, step):
    """``(Σ_axes g, Σ_axes g·x)`` of float16 ``g`` and ``x`` cast chunk by chunk, both
    from one cast of each chunk (stacked as one array along a new leading axis)."""
    how = "sum" if 0 in axes else "concat"

    def both(a, b):
        return xp.stack([_sum(a, axes, xp=xp), sum_prod(a, b, axes, xp=xp)], axis=1)

    r = _chunks(xp, both, [g, x], [], cdt, step, how)
    return r[:, 0], r[:, 1]


def _dx_elementwise(xp, op, vectors, full, cdt, step, dtype):
    """The input gradient ``op(*full, *vectors)``: whole (``step`` None) or chunk by chunk
    of float16 input, each chunk cast to ``cdt`` and its result back to ``dtype``."""
    if step is None:
        return _elementwise(xp, op, vectors, *full, chain=len(full) > 1)

    def chunk(*args):
        r = _elementwise(xp, op, list(args[len(full) :]), *args[: len(full)], chain=True)
        return as_compute(r, dtype, xp=xp)

    return _chunks(xp, chunk, full, vectors, cdt, step, "concat")


def _chunk_affine(a, mean, *vectors, factors, xp, dtype):
    """``(a − mean)·v₁···v_factors (+ bias)`` of a chunk (:func:`_affine`), cast to
    ``dtype``."""
    op = functools.partial(_centred_affine, factors=factors)
    y = _elementwise(xp, op, [mean, *vectors], a, chain=True)
    return as_compute(y, dtype, xp=xp)


def _centred_affine(a, mean, *vectors, factors):
    return _affine(a - mean, *vectors, factors=factors, fresh=False)


def _standardize_backward(dy, x, mean, istd, weight, axes, param_axes, frozen, xp, reduce, count):
    cdt = istd.dtype
    if not frozen and reduce is None and count is None:
        # before any cast: the blocks cast float16 input themselves
        blocked = _rows_backward_blocked(dy, x, mean, istd, weight, axes, param_axes, xp=xp)
        if blocked is not None:
            return blocked
    m_count = _size(x, axes) if count is None else count
    dweight = dbias = None
    # Axes along which the weight varies inside a statistics group (GroupNorm: the group's
    # channels); the rest of the reduced axes ("sub") are summed first.
    vary = _varying(weight, axes)
    sub = tuple(a for a in axes if a not in vary)
    per_group = (not vary or (sub and _small_product(x, istd, weight))) and (
        param_axes is None or set(sub) <= set(param_axes)
    )
    if reduce is not None and (vary or not per_group):
        raise RuntimeError("standardize_backward: `reduce` needs per-group parameters")
    # float16 on NumPy, per-group form: dy and x are cast chunk by chunk below
    step = _cast_step(xp, x, cdt) if per_group and dy.dtype == x.dtype else None
    if step is None:
        g = as_compute(dy, cdt, xp=xp)
        xc = as_compute(x, cdt, xp=xp)
    else:
        g, xc = dy, x
    if not per_group and not frozen and _row_form(g, xc, weight, axes, param_axes, xp):
        dx, dweight, dbias = _rows_backward(g, xc, mean, istd, weight, axes, param_axes, xp=xp)
        return as_compute(dx, x.dtype, xp=xp), dweight, dbias
    if per_group:
        # Everything follows from two sums per sub-group (per group when the weight is
        # constant over it): A = Σ_sub g, C = Σ_sub g·x̂. With S_A = Σ_vary γ·A and
        # S_C = Σ_vary γ·C per group, dx = k·g + m·x + n with k = istd·γ,
        # m = −istd·S_C·istd/M and n = −istd·S_A/M − m·μ.
        if step is None:
            a_sum = _sum(g, sub, xp=xp)
            gx = sum_prod(g, xc, sub, xp=xp)
        else:
            a_sum, gx = _chunk_sums(xp, g, xc, sub, cdt, step)
        if reduce is not None and (param_axes is not None or not frozen):
            a_sum, gx = reduce([a_sum, gx])
        c_sum = istd * (gx if mean is None else gx - mean * a_sum)
        k = widen(istd if weight is None else istd * weight, xc, xp=xp)
        if frozen:
            dx = _dx_elementwise(xp, _mul, [k], [g], cdt, step, x.dtype)
        else:
            s_a = a_sum if weight is None else weight * a_sum
            s_c = c_sum if weight is None else weight * c_sum
            if vary:
                s_a, s_c = _sum(s_a, vary, xp=xp), _sum(s_c, vary, xp=xp)
            m = -(istd * istd * s_c) / m_count
            n = istd * s_a / m_count
            vectors = [k, widen(m, xc, xp=xp)]
            if mean is not None:
                vectors.append(widen(n + m * mean, xc, xp=xp))
            op = functools.partial(_k_g_m_x_n, xp)
            dx = _dx_elementwise(xp, op, vectors, [g, xc], cdt, step, x.dtype)
        if param_axes is not None:
            rest = tuple(a for a in param_axes if a not in sub)
            dweight = _sum(c_sum, rest, xp=xp)
            dbias = _sum(a_sum, rest, xp=xp)
    else:
        xhat = xc * istd if mean is None else _imul(xc - mean, istd)
        # Sums that need a product temporary are taken before dx̂ exists, so that at most
        # two input-sized arrays are alive (peak 2× the input, not 3×). Reduced axes that
        # are not one trailing run (GroupNorm channels-last: (H, W, C/G) of the grouped
        # (N, H, W, G, C/G)) would leave vecdot a partial sum of input/(C/G) elements: there
        # Σ_R dx̂·x̂ = Σ_R g·x̂·γ comes from the product dweight needs anyway.
        s2 = None
        kept = [a for a in range(len(xhat.shape)) if a not in axes]
        last_kept = kept[-1] if kept else -1
        if not frozen and param_axes and any(a < last_kept for a in axes):
            prod = g * xhat
            dweight = _sum(prod, param_axes, xp=xp)
            prod = prod if weight is None else _imul(prod, weight)
            # the reduced axes before the last kept one first (the partial sum is small),
            # then the trailing ones
            s2 = _sum(prod, tuple(a for a in axes if a < last_kept), xp=xp)
            trail = tuple(a for a in axes if a > last_kept)
            s2 = (_sum(s2, trail, xp=xp) if trail else s2) / m_count
            del prod
        elif param_axes is not None:
            dweight = sum_prod(g, xhat, param_axes, xp=xp)
        if param_axes is not None:
            dbias = _sum(g, param_axes, xp=xp)
        dxh = g * weight if weight is not None else g
        if frozen:
            dx = dxh * istd if dxh is g else _imul(dxh, istd)
        else:
            if s2 is None:
                s2 = sum_prod(dxh, xhat, axes, xp=xp) / m_count
            corr = _imul(xhat, s2)  # x̂ is not needed after this: reuse it
            if mean is not None:
                corr = _iadd(corr, _sum(dxh, axes, xp=xp) / m_count)
            dx = _imul(dxh - corr if dxh is g else _isub(dxh, corr), istd)
    return as_compute(dx, x.dtype, xp=xp), dweight, dbias


def _row_form(g, xc, weight, axes, param_axes, xp) -> bool:
    """Can :func:`_rows_backward` take this case? LayerNorm/RMSNorm: the weight spans the
    trailing statistics axes (:func:`_row_layout`), the parameter gradients sum over the
    leading axes, and the sums may go through BLAS."""
    lead = tuple(range(len(xc.shape) - len(axes)))
    return (
        weight is not None
        and _row_layout(xc, axes, weight) is not None
        and (param_axes is None or tuple(sorted(param_axes)) == lead)
        and blas_sums(xp, xc)
        and blas_sums(xp, g)
    )


def _rows_backward(
    g: Array,
    xc: Array,
    mean: Array | None,
    istd: Array,
    weight: Array,
    axes: tuple[int, ...],
    param_axes: tuple[int, ...] | None,
    *,
    xp: Any,
) -> tuple[Array, Array | None, Array | None]:
    """LayerNorm/RMSNorm backward (training statistics, weight over the whole normalized
    slice) on the ``(R, M)`` row view, every sum a BLAS matrix-vector product. With
    ``d = x − μ`` (``x`` for RMS) and ``p = g·d``:

        S = Σ γ·g·x̂ = istd·(p @ γ),   a = Σ γ·g = g @ γ
        dγ = istd @ p,   dβ = 1 @ g
        dx = istd·γ·g + m·d + n,   m = −istd³·(p @ γ)/M,   n = −istd·a/M

    (no ``a`` term for RMS). Two product temporaries (``d``, then ``d·g``; ``d`` becomes
    ``m·d``) and ``γ·g``, which becomes ``dx``: 7 full-size writes instead of 8, and no
    short-row reductions. Everything stays centred (``d``, not ``x``): summing ``g·x``
    uncentred, as torch's kernel does, loses ``|μ|/σ·ε`` of relative accuracy (5–10×
    torch's float32 ``dweight`` error at ``x ≈ 1e4 + N(0, 1)``)."""
    shape = tuple(int(s) for s in xc.shape)
    lead = shape[: len(shape) - len(axes)]
    rows, m_count = math.prod(lead), math.prod(shape[len(lead) :])
    g2 = xp.reshape(g, (rows, m_count))
    x2 = xp.reshape(xc, (rows, m_count))
    gam = xp.reshape(weight, (m_count,))
    s = xp.reshape(istd, (rows,))
    d = x2 if mean is None else x2 - xp.reshape(mean, (rows, 1))
    p = g2 * d
    s_c = s * (p @ gam)
    dweight = dbias = None
    if param_axes is not None:
        dweight = xp.reshape(s @ p, tuple(weight.shape))
        ones = xp.ones(rows, dtype=g2.dtype, device=device(g2))
        dbias = xp.reshape(ones @ g2, tuple(weight.shape))
    del p
    m = -(s * s * s_c) / m_count
    vectors = [xp.reshape(gam, (1, m_count)), s[:, None], m[:, None]]
    if mean is not None:
        vectors.append((s * (g2 @ gam) / m_count)[:, None])
    # d is x for RMS: its buffer takes the product only when it is a temporary
    op = functools.partial(_rows_dx, xp, scratch=mean is not None)
    dx = _elementwise(xp, op, vectors, g2, d, chain=True)
    return xp.reshape(dx, shape), dweight, dbias


def _row_layout(x: Array, axes: tuple[int, ...], *vectors: Array | None) -> tuple | None:
    """``(rows, M)`` when ``axes`` are the trailing axes of ``x`` and every given keepdims
    vector (weight, bias) varies over all of them and nowhere else: the row view of
    LayerNorm and RMSNorm. None otherwise. (Lists and loops, no generator expressions:
    ``torch.compile(fullgraph=True)`` traces this.)"""
    nd = len(x.shape)
    if sorted([a % nd for a in axes]) != list(range(nd - len(axes), nd)):
        return None
    k = nd - len(axes)
    row = [1] * k + [int(s) for s in x.shape[k:]]
    for v in vectors:
        if v is not None and [int(s) for s in v.shape] != row:
            return None
    return _size(x, tuple(range(k))), _size(x, tuple(range(k, nd)))


def rows_standardize(
    x: Array,
    axes: tuple[int, ...],
    weight: Array | None,
    bias: Array | None,
    cdt: Any,
    eps: float,
    *,
    xp: Any,
    rms: bool = False,
    want_y: bool = True,
) -> tuple[Array | None, Array | None, Array] | None:
    """``(y, mean, istd)`` of LayerNorm (or of RMSNorm: ``rms``) over the trailing ``axes``,
    computed block by block of whole rows where :func:`anynorm._compat.row_block_size`
    allows (NumPy, at least 32 blocks); None elsewhere (the caller takes the whole-array
    path).

    Each block is read once and its work stays in cache: the row mean by a matrix-vector
    product, the centred rows ``d``, ``σ² = d·d/M`` by ``vecdot`` (the same two-pass,
    centred numerics as the whole-array path), then ``y = d·(istd·γ) + β`` in ``d``'s own
    buffer, with the per-row factors spread over the row by
    :func:`anynorm._compat.row_outer`. ``mean`` (None for RMS) and ``istd`` come back with
    keepdims shapes; ``want_y=False`` returns the statistics only (``y`` None)."""
    per = row_block_size(xp, [x], _size(x, axes))
    shape = None if per is None else _row_layout(x, axes, weight, bias)
    if shape is None:
        return None
    rows, m_count = shape
    x2 = xp.reshape(x, (rows, m_count))
    lead = tuple(int(s) for s in x.shape[: len(x.shape) - len(axes)])
    ones = xp.ones(m_count, dtype=cdt, device=device(x))
    gam = ones if weight is None else xp.reshape(weight, (m_count,))
    tiled = [xp.reshape(bias, (1, m_count))] if want_y and bias is not None else []
    fn = functools.partial(
        _rows_forward_block, xp=xp, cdt=cdt, eps=eps, centred=not rms, want_y=want_y
    )
    kinds = ("rows",) * (int(want_y) + int(not rms) + 1)
    shared = [ones, _pair(xp, ones), _pair(xp, gam)]
    res = list(row_blocks(xp, fn, kinds, per, [x2], tiled=tiled, shared=shared))
    y = xp.reshape(res.pop(0), tuple(x.shape)) if want_y else None
    keep = (*lead, *([1] * len(axes)))
    mean = None if rms else xp.reshape(res.pop(0), keep)
    return y, mean, xp.reshape(res.pop(0), keep)


def normalize(
    x: Array,
    axes: tuple[int, ...],
    weight: Array | None,
    bias: Array | None,
    cdt: Any,
    eps: float,
    *,
    xp: Any,
    rms: bool = False,
) -> tuple[Array, Array | None, Array]:
    """``(y, mean, istd)``: standardize ``x`` over ``axes`` with its own statistics (RMS:
    uncentred, ``mean`` None), then the affine map. Row blocks where
    :func:`rows_standardize` takes the case, else the whole-array path."""
    rows = rows_standardize(x, axes, weight, bias, cdt, eps, xp=xp, rms=rms)
    if rows is not None:
        return rows
    if rms:
        istd = inv_std(mean_square(x, axes, cdt, xp=xp), eps, xp=xp)
        return standardize(x, None, istd, weight, bias, axes, xp=xp), None, istd
    mean, var, d = centered_moments(x, axes, cdt, xp=xp)
    istd = inv_std(var, eps, xp=xp)
    return standardize(x, mean, istd, weight, bias, axes, xp=xp, centered=d), mean, istd


def _pair(xp: Any, v: Array) -> Array:
    """``[v; 0]``, shape ``(2, M)``: the right operand of :func:`anynorm._compat.row_outer`."""
    return xp.stack([v, xp.zeros_like(v)])


def _rows_forward_block(x, *args, xp, cdt, eps, centred, want_y):
    """One block of :func:`rows_standardize`; ``args`` are the tiled bias block (when there
    is one), the ones vector and the pairs ``[1; 0]`` and ``[γ; 0]``. Only called by
    ``row_blocks``, on NumPy blocks: its fresh temporaries are updated in place."""
    ones, ones0, gam0 = args[-3:]
    xc = as_compute(x, cdt, xp=xp)
    m_count = int(x.shape[1])
    out = []
    if centred:
        mean = (xc @ ones)[:, None] / m_count
        d = row_outer(xp, -mean, ones0)
        d += xc  # x − μ, exactly: each entry of the outer product is −μ
    else:
        d = xc
    istd = (1.0 / xp.sqrt(vecdot_last(xp, d, d) / m_count + eps))[:, None]
    if want_y:
        scale = row_outer(xp, istd, gam0)
        if centred:
            d *= scale
        else:
            d = d * scale
        if len(args) == 4:
            d += args[0]
        out.append(as_compute(d, x.dtype, xp=xp))
    if centred:
        out.append(mean)
    out.append(istd)
    return out


def _rows_backward_blocked(dy, x, mean, istd, weight, axes, param_axes, *, xp):
    """The training-statistics backward of LayerNorm/RMSNorm (and of the GroupNorm and
    InstanceNorm layers without a weight, whose statistics axes are the trailing ones on
    channels-first input and which want no parameter gradients) block by block of whole
    rows (:func:`row_blocks`, the sums of :func:`_rows_backward`), or None where the layout
    is not the row view or :func:`row_block_size` declines. ``(dx, dweight, dbias)``:
    ``dx`` in ``x.dtype``, keepdims parameter gradients in the compute dtype. ``dy`` and
    ``x`` come as the caller gave them: float16 is cast to the compute dtype block by
    block, and ``dx`` cast back per block (no full-size float32 copy)."""
    per = row_block_size(xp, [dy, x], _size(x, axes))
    layout = None if per is None else _row_layout(x, axes, weight)
    lead = len(x.shape) - len(axes)
    if layout is None or (param_axes is not None and set(param_axes) != set(range(lead))):
        return None
    if dy.dtype != x.dtype:
        return None
    rows, m_count = layout
    g2, x2 = xp.reshape(dy, (rows, m_count)), xp.reshape(x, (rows, m_count))
    pshape = (*([1] * lead), *(int(s) for s in x.shape[lead:]))
    if weight is None:
        gam = xp.ones(m_count, dtype=istd.dtype, device=device(x2))
    else:
        gam = xp.reshape(weight, (m_count,))
    fn = functools.partial(
        _rows_backward_block, xp=xp, centred=mean is not None, params=param_axes is not None
    )
    kinds = ("rows", "sum", "sum") if param_axes is not None else ("rows",)
    rowvecs = [xp.reshape(istd, (rows, 1))]
    if mean is not None:
        rowvecs.insert(0, xp.reshape(mean, (rows, 1)))
    shared = [gam, _pair(xp, xp.ones_like(gam)), _pair(xp, gam)]
    res = row_blocks(xp, fn, kinds, per, [g2, x2], rowvecs, shared=shared)
    dx = xp.reshape(res[0], tuple(x.shape))
    if param_axes is None:
        return dx, None, None
    return dx, xp.reshape(res[1], pshape), xp.reshape(res[2], pshape)


def _rows_backward_block(g, x, *args, xp, centred, params):
    """One block of :func:`_rows_backward`: ``(dx, Σ istd·g·d, Σ g)`` with the sums over
    the block's rows; ``args`` are ``mean`` (when ``centred``) and ``istd`` of the block's
    rows, ``γ`` and the pairs ``[1; 0]`` and ``[γ; 0]``. ``g`` and ``x`` are blocks of the
    caller's arrays, cast here to the compute dtype (``istd``'s); ``dx`` comes back in
    ``x``'s own dtype. Only called by ``row_blocks``, on NumPy blocks: its fresh
    temporaries are updated in place (never ``g`` or ``x``)."""
    istd, gam, ones0, gam0 = args[-4:]
    out_dtype = x.dtype
    g, x = as_compute(g, istd.dtype, xp=xp), as_compute(x, istd.dtype, xp=xp)
    m_count = int(x.shape[1])
    if centred:
        d = row_outer(xp, -args[0], ones0)
        d += x
    else:
        d = x
    p = g * d
    s = istd[:, 0]
    m = (-(s * s * (s * (p @ gam))) / m_count)[:, None]  # istd³ alone overflows at eps=0
    out = [None]
    if params:
        out += [s @ p, xp.ones(int(x.shape[0]), dtype=x.dtype, device=device(x)) @ g]
    del p
    dx = g * row_outer(xp, istd, gam0)
    if centred:
        dx -= row_outer(xp, (s * (g @ gam) / m_count)[:, None], ones0)
        d *= row_outer(xp, m, ones0)
        dx += d
    else:
        dx += d * row_outer(xp, m, ones0)
    out[0] = as_compute(dx, out_dtype, xp=xp)
    return out


def _rows_dx(xp, g, d, gam, s, m, n=None, *, scratch):
    """``γ·g·s + m·d − n`` of :func:`_rows_backward` (no ``n`` for RMS), a fresh result."""
    dx = _imul(g * gam, s)
    if n is not None:
        dx = _isub(dx, n)
    return add_product(xp, dx, d, m, scratch=scratch)
