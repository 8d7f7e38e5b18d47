"""Batch statistics over several processes: the reduction hook of synchronized batch norm.

A *sync hook* is a callable ``sync(a) -> array`` that every process calls with a 1-D array of
per-feature partial sums and that returns their elementwise sum over all processes, as an
array of the same namespace, device, shape and dtype (an all-reduce with SUM). Ready-made
hooks for ``torch.distributed`` and ``mpi4py`` are in :mod:`anynorm.distributed`.

Synchronized batch norm is exact, two-pass, over the union of the per-process batches:

* forward, batch statistics: all-reduce ``[Σx, n]`` (``C + 1`` values), giving the global
  count ``N`` and mean ``μ``; then all-reduce ``Σ(x − μ)²`` (``C`` values), giving the biased
  variance. No ``E[x²] − E[x]²`` anywhere.
* backward: all-reduce ``[Σg, Σg·x]`` (``2C`` values); the input gradient uses the global
  sums and count, and ``dweight = istd·(Σg·x − μ·Σg)``, ``dbias = Σg`` are the gradients of
  the full-batch loss, identical on every rank.

Every rank must make the same calls in the same order (same layers, same modes), as with any
collective. The hook runs inside forward/backward, so the counts stay arrays (no host sync).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import _compat
from ._moments import _size, as_compute, sum_prod

Array = Any
SyncHook = Callable[[Array], Array]


def check_sync(func: str, sync: Any) -> SyncHook | None:
    """``sync`` is None or a callable (TypeError otherwise)."""
    if sync is not None and not callable(sync):
        raise TypeError(
            f"{func}: `sync` must be None or a callable that all-reduces (sums) a 1-D array "
            f"over processes; received {type(sync).__name__} {sync!r}. Use e.g. "
            "anynorm.distributed.all_reduce_torch() after "
            "torch.distributed.init_process_group(...)."
        )
    return sync


def all_reduce(func: str, sync: SyncHook, parts: list[Array], *, xp: Any) -> list[Array]:
    """Sum ``parts`` (arrays of one dtype, any shapes) over processes with one call of
    ``sync``; returns arrays of the same shapes."""
    flat = [xp.reshape(p, (-1,)) for p in parts]
    packed = flat[0] if len(flat) == 1 else xp.concat(flat)
    out = sync(packed)
    _check_result(func, sync, packed, out, xp)
    result, start = [], 0
    for p, f in zip(parts, flat, strict=True):
        n = int(f.shape[0])
        result.append(xp.reshape(out[start : start + n], tuple(p.shape)))
        start += n
    return result


def _check_result(func: str, sync: Any, sent: Array, out: Any, xp: Any) -> None:
    what = (
        f"an array of the namespace, device, shape {tuple(sent.shape)} and dtype {sent.dtype} "
        "it was given (the sum over processes)"
    )
    if not _compat.is_array(out) or _compat.array_namespace(out) is not xp:
        got = type(out).__name__
        if _compat.is_array(out):
            got = f"a {_compat.namespace_name(_compat.array_namespace(out))} array"
        raise TypeError(f"{func}: the `sync` hook {sync!r} returned {got}; it must return {what}.")
    if tuple(out.shape) != tuple(sent.shape) or out.dtype != sent.dtype:
        raise ValueError(
            f"{func}: the `sync` hook {sync!r} returned shape {tuple(out.shape)} and dtype "
            f"{out.dtype}; it must return {what}."
        )
    if not _compat.same_device(_compat.device(out), _compat.device(sent)):
        raise ValueError(
            f"{func}: the `sync` hook {sync!r} returned an array on device "
            f"{_compat.device(out)}; it must return {what}."
        )


def synced_moments(
    func: str, x: Array, axes: tuple[int, ...], cdt: Any, sync: SyncHook, *, xp: Any
) -> tuple[Array, Array, Array, Array]:
    """``(mean, var, x − mean, count)`` over ``axes`` and over every process: two-pass, two
    all-reduces. ``count`` is the global number of values per feature, a 0-d array in
    ``cdt``; ``mean``/``var`` have keepdims shape."""
    xc = as_compute(x, cdt, xp=xp)
    local_sum = xp.sum(xc, axis=axes, keepdims=True)
    local_n = xp.asarray([float(_size(x, axes))], dtype=cdt, device=_compat.device(x))
    total, n = all_reduce(func, sync, [local_sum, local_n], xp=xp)
    count = xp.reshape(n, ())
    mean = total / count
    d = xc - mean
    (ss,) = all_reduce(func, sync, [sum_prod(d, d, axes, xp=xp)], xp=xp)
    return mean, ss / count, d, count


def gradient_reducer(func: str, sync: SyncHook, *, xp: Any) -> Callable[[list], list]:
    """The ``reduce`` argument of :func:`standardize_backward` for a sync hook."""

    def reduce(parts: list[Array]) -> list[Array]:
        return all_reduce(func, sync, parts, xp=xp)

    return reduce
