"""Synchronized batch norm across processes, with NumPy arrays and no GPU.

Each process holds a slice of every batch (the slices may differ in size); ``BatchNorm`` with
``sync=`` normalizes with the statistics of the whole batch and returns the exact
full-batch gradients. Every rank also runs an ordinary single-process ``BatchNorm`` on the
whole batch and prints the largest difference, which is at rounding level (exit status 1 if
it exceeds 1e-10).

    torchrun --standalone --nproc-per-node 2 examples/sync_batch_norm.py          # gloo
    mpiexec -n 3 python examples/sync_batch_norm.py --mpi                         # mpi4py

(``pip install ".[numpy]" torch==2.13.0`` for the first, ``pip install ".[mpi]" mpich`` for
the second.)
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import anynorm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mpi", action="store_true", help="mpi4py instead of torch.distributed")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    if args.mpi:
        from mpi4py import MPI

        from anynorm.distributed import all_reduce_mpi

        rank, world, sync = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size(), all_reduce_mpi()
    else:
        import torch.distributed as dist

        from anynorm.distributed import all_reduce_torch

        dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...
        rank, world, sync = dist.get_rank(), dist.get_world_size(), all_reduce_torch()

    sizes = [3 + r for r in range(world)]  # unequal slices: 3, 4, 5, ... samples
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    rng = np.random.default_rng(0)  # the same global batches on every rank
    bn = anynorm.BatchNorm(16, sync=sync)
    full = anynorm.BatchNorm(16)  # the single-process reference on the whole batch
    worst = 0.0
    for _ in range(args.steps):
        x = rng.standard_normal((sum(sizes), 16, 8, 8)) * 3.0 + 1.0
        dy = rng.standard_normal(x.shape)
        y = bn.forward(x[lo:hi])
        dx = bn.backward(dy[lo:hi])
        bn.update(lr=0.1, momentum=0.9)
        y_full, dx_full = full.forward(x), full.backward(dy)
        full.update(lr=0.1, momentum=0.9)
        worst = max(
            worst,
            float(np.max(np.abs(y - y_full[lo:hi]))),
            float(np.max(np.abs(dx - dx_full[lo:hi]))),
            *(float(np.max(np.abs(bn.params[k] - full.params[k]))) for k in bn.params),
            *(float(np.max(np.abs(bn.buffers[k] - full.buffers[k]))) for k in bn.buffers),
        )
    report = (
        f"rank {rank}/{world}: {hi - lo} of {sum(sizes)} samples per step; "
        f"max |synced - full batch| over {args.steps} steps = {worst:.1e}\n"
    )
    sys.stdout.write(report)  # one write per rank, so concurrent ranks' lines stay whole
    sys.stdout.flush()
    if not args.mpi:
        dist.destroy_process_group()
    return 0 if worst < 1e-10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
