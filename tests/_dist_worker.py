"""One rank of the multi-process synchronized batch norm test (tests/test_distributed.py).

Launched once per rank by the test (torch.distributed, gloo over loopback) or by
``mpiexec`` (mpi4py). Every rank builds the same global batches from a shared seed, keeps
its own slice (the per-rank sizes may differ), runs ``BatchNorm(sync=...)`` for 3 training
steps with SGD and one evaluation step on each (backend, dtype), and writes what it got to
``<out>/rank<r>.npz`` for the parent to compare with full-batch torch in float64.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def global_data(seed: int, n: int, c: int, steps: int):
    """The same batches, weights and upstream gradients on every rank (and in the parent)."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(c) + 1.0
    bias = rng.standard_normal(c)
    xs = [rng.standard_normal((n, c, 3, 4)) * 2.0 + 3.0 for _ in range(steps)]
    gs = [rng.standard_normal((n, c, 3, 4)) for _ in range(steps)]
    return weight, bias, xs, gs


def run(args: argparse.Namespace, rank: int, sync, backends: list[str]) -> dict:
    import anynorm

    sizes = [int(s) for s in args.sizes.split(",")]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    weight, bias, xs, gs = global_data(args.seed, sum(sizes), args.channels, args.steps + 1)
    out: dict[str, np.ndarray] = {}
    for backend in backends:
        for dname in ("float64", "float32"):
            xp, asarray, tonp = _backend(backend, dname)
            layer = anynorm.BatchNorm(args.channels, sync=sync)
            layer.load_state_dict({"weight": asarray(weight), "bias": asarray(bias)}, strict=False)
            for step in range(args.steps + 1):
                if step == args.steps:
                    layer.eval()
                x, g = asarray(xs[step][lo:hi]), asarray(gs[step][lo:hi])
                y = layer.forward(x)
                dx = layer.backward(g)
                key = f"{backend}/{dname}/{step}"
                grads = [(f"grad/{k}", v) for k, v in layer.grads.items()]
                for name, a in (("y", y), ("dx", dx), *grads):
                    _check(a, xp, name)
                    out[f"{key}/{name}"] = tonp(a)
                if step < args.steps:
                    layer.update(lr=0.1)
                for name, a in (*layer.params.items(), *layer.buffers.items()):
                    out[f"{key}/{name}"] = tonp(a)
            if backend == "torch":
                # torch autograd through the synchronized forward (differentiable all-reduce)
                import torch

                fresh = anynorm.BatchNorm(args.channels, sync=sync)
                fresh.load_state_dict(
                    {"weight": asarray(weight), "bias": asarray(bias)}, strict=False
                )
                x = asarray(xs[0][lo:hi]).requires_grad_(True)
                y = fresh.forward(x)
                if args.launcher == "torch":
                    (y * asarray(gs[0][lo:hi])).sum().backward()
                    out[f"{backend}/{dname}/autograd_dx"] = tonp(x.grad)
                explicit = fresh.backward(asarray(gs[0][lo:hi]))
                out[f"{backend}/{dname}/explicit_dx"] = tonp(explicit)
                del torch
    return out


def _check(a, xp, name: str) -> None:
    import array_api_compat

    if array_api_compat.array_namespace(a) is not xp:
        raise TypeError(f"{name}: namespace {array_api_compat.array_namespace(a)} is not {xp}")


def _backend(backend: str, dname: str):
    if backend == "numpy":
        import array_api_compat.numpy as xp

        return xp, lambda a: np.asarray(a, dtype=dname), lambda a: np.asarray(a)
    import array_api_compat.torch as xp
    import torch

    return (
        xp,
        lambda a: torch.asarray(np.asarray(a, dtype=dname)),
        lambda a: a.detach().numpy().copy(),
    )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--launcher", choices=("torch", "mpi"), required=True)
    p.add_argument("--rank", type=int, default=-1)
    p.add_argument("--world", type=int, default=-1)
    p.add_argument("--init", default="")
    p.add_argument("--sizes", required=True)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=1122)
    p.add_argument("--backends", default="numpy,torch")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    sys.path.insert(0, os.getcwd())
    backends = args.backends.split(",")
    if args.launcher == "torch":
        import torch
        import torch.distributed as dist

        from anynorm.distributed import all_reduce_torch

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=args.init, rank=args.rank, world_size=args.world
        )
        rank, sync = args.rank, all_reduce_torch()
    else:
        from mpi4py import MPI

        from anynorm.distributed import all_reduce_mpi

        rank, sync = MPI.COMM_WORLD.Get_rank(), all_reduce_mpi()
    result = run(args, rank, sync, backends)
    np.savez(os.path.join(args.out, f"rank{rank}.npz"), **result)
    if args.launcher == "torch":
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
