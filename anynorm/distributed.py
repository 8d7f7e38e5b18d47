"""Ready-made reduction hooks for synchronized batch norm (``BatchNorm(sync=...)``).

A hook is a callable ``hook(a) -> array``: every process calls it with a 1-D array of
per-feature partial sums, and it returns their elementwise sum over all processes as an
array of the same namespace, device, shape and dtype. Any callable with that contract works
(Horovod, a custom collective); this module has the two common ones. Neither imports its
framework until it is first called, so ``import anynorm`` stays light.

Example (2 processes, gloo on the CPU, NumPy arrays; run with ``torchrun --nproc-per-node 2``)::

    import numpy as np, torch.distributed as dist, anynorm
    from anynorm.distributed import all_reduce_torch

    dist.init_process_group("gloo")
    bn = anynorm.BatchNorm(64, sync=all_reduce_torch())
    y = bn.forward(x_local)            # statistics of the batches of all processes
    dx = bn.backward(dy_local)         # exact full-batch gradient, this process's slice
    bn.update(lr=0.1)                  # identical weight/bias on every process
"""

from __future__ import annotations

from typing import Any

from . import _compat

Array = Any

__all__ = ["all_reduce_mpi", "all_reduce_torch"]


class _Hook:
    """Base of the ready-made hooks: a readable repr for error messages."""

    def __repr__(self) -> str:
        return f"anynorm.distributed.{self._name}({self._where})"

    _name = ""
    _where = ""


def all_reduce_torch(group: Any = None) -> _Hook:
    """A hook that sums over the processes of a ``torch.distributed`` group (any backend:
    gloo on the CPU, NCCL on CUDA).

    Parameters
    ----------
    group : ProcessGroup, optional
        The group to reduce over; default the world group. The process group must be
        initialized (``torch.distributed.init_process_group``) before the first forward.

    Notes
    -----
    torch tensors are reduced where they live (a copy: the caller's tensor is never
    written); tensors that require grad go through the differentiable
    ``torch.distributed.nn.functional.all_reduce``, so torch autograd through a synchronized
    forward is also correct. Arrays of other namespaces (NumPy, JAX, CuPy,
    array-api-strict, Dask) travel through a CPU tensor and back: a host round trip of
    ``2C``–``C + 1`` values, which for Dask computes the partial sums (use Dask's own
    scheduler to spread one Dask array over machines instead).
    """
    return _TorchSum(group)


class _TorchSum(_Hook):
    _name = "all_reduce_torch"

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self._where = "" if group is None else f"group={group!r}"

    def __call__(self, a: Array) -> Array:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "anynorm.distributed.all_reduce_torch: torch.distributed is not initialized; "
                "call torch.distributed.init_process_group(...) in every process before the "
                "first forward (or pass sync=None for single-process batch norm)."
            )
        if isinstance(a, torch.Tensor):
            if a.requires_grad:
                from torch.distributed.nn.functional import all_reduce

                return all_reduce(a, op=dist.ReduceOp.SUM, group=self.group)
            t = a.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
            return t
        xp = _compat.array_namespace(a)
        t = torch.from_numpy(_compat.to_numpy(a))
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return _compat.convert(t.numpy(), xp, _compat.device(a), a.dtype)


def all_reduce_mpi(comm: Any = None) -> _Hook:
    """A hook that sums over the processes of an MPI communicator (``mpi4py``).

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``.

    Notes
    -----
    The partial sums go through host memory (a NumPy buffer) whatever the array's
    namespace, so any MPI build works (CUDA-aware or not).
    """
    return _MPISum(comm)


class _MPISum(_Hook):
    _name = "all_reduce_mpi"

    def __init__(self, comm: Any = None) -> None:
        self.comm = comm
        self._where = "" if comm is None else f"comm={comm!r}"

    def __call__(self, a: Array) -> Array:
        try:
            from mpi4py import MPI
        except ImportError as err:
            raise RuntimeError(
                "anynorm.distributed.all_reduce_mpi: mpi4py is not installed; "
                "`pip install mpi4py` (with an MPI library, e.g. `pip install mpich`)."
            ) from err
        import numpy as np

        comm = MPI.COMM_WORLD if self.comm is None else self.comm
        send = np.ascontiguousarray(_compat.to_numpy(a))
        recv = np.empty_like(send)
        comm.Allreduce(send, recv, op=MPI.SUM)
        return _compat.convert(recv, _compat.array_namespace(a), _compat.device(a), a.dtype)
