"""``python -m anynorm bench-sync``: synchronized batch norm over processes vs one process.

Times one training step of ``BatchNorm`` (forward + backward + SGD update) on a total batch
of ``--shape``: in one process on the whole batch, and in ``--procs`` processes
(torch.distributed, gloo over loopback, one thread each) on equal slices with
``sync=all_reduce_torch()``. Interleaved repetitions after a warm-up, median and spread; the
step time of the distributed run is that of the slowest rank (ranks start each repetition
together at a barrier). It also reports the bytes each rank all-reduces per step, the number
of all-reduce calls and the time spent inside them. Writes ``bench_sync.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any


def _arrays(backend: str, dname: str, shape: tuple[int, ...], seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2.0 + 1.0).astype(dname)
    g = rng.standard_normal(shape).astype(dname)
    if backend == "torch":
        import torch

        return torch.from_numpy(x), torch.from_numpy(g)
    return x, g


class _TimedHook:
    """Wraps a sync hook: counts calls, values sent and seconds spent inside."""

    def __init__(self, hook: Any) -> None:
        self.hook, self.calls, self.values, self.seconds = hook, 0, 0, 0.0

    def __call__(self, a: Any) -> Any:
        t0 = time.perf_counter()
        out = self.hook(a)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.values += int(a.shape[0])
        return out


def _step(layer: Any, x: Any, g: Any) -> None:
    layer.forward(x)
    layer.backward(g)
    layer.update(lr=0.01)


def _worker(rank: int, world: int, init: str, args: argparse.Namespace, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    import anynorm
    from anynorm.distributed import all_reduce_torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    shape = tuple(args.shape)
    local = (shape[0] // world, *shape[1:])
    x, g = _arrays(args.backend, args.dtype, local, seed=rank)
    hook = _TimedHook(all_reduce_torch())
    layer = anynorm.BatchNorm(shape[1], sync=hook)
    for _ in range(args.warmup):
        _step(layer, x, g)
    hook.calls = hook.values = 0
    hook.seconds = 0.0
    times = []
    for _ in range(args.reps):
        dist.barrier()
        t0 = time.perf_counter()
        _step(layer, x, g)
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank ends
        times.append(float(t[0]))
    if rank == 0:
        itemsize = x.dtype.itemsize
        queue.put(
            {
                "times": times,
                "calls": hook.calls / args.reps,
                "bytes": hook.values * itemsize / args.reps,
                "comm_s": hook.seconds / args.reps,
            }
        )
    dist.destroy_process_group()


def _single(args: argparse.Namespace) -> list[float]:
    import anynorm

    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    shape = tuple(args.shape)
    x, g = _arrays(args.backend, args.dtype, shape, seed=0)
    layer = anynorm.BatchNorm(shape[1])
    for _ in range(args.warmup):
        _step(layer, x, g)
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        _step(layer, x, g)
        times.append(time.perf_counter() - t0)
    return times


def _distributed(args: argparse.Namespace) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'store')}"
        procs = [
            ctx.Process(target=_worker, args=(r, args.procs, init, args, queue))
            for r in range(args.procs)
        ]
        for p in procs:
            p.start()
        result = queue.get(timeout=600)
        for p in procs:
            p.join(60)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    return result


def _ms(times: list[float]) -> str:
    med = statistics.median(times) * 1e3
    return f"{med:.2f} (±{(max(times) - min(times)) * 1e3 / 2:.2f})"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m anynorm bench-sync``."""
    parser = argparse.ArgumentParser(prog="python -m anynorm bench-sync", description=__doc__)
    parser.add_argument("--procs", type=int, default=2, help="processes (>= 2)")
    parser.add_argument(
        "--shape", default="32,64,56,56", help="total batch shape N,C,... (NCHW), N divisible"
    )
    parser.add_argument("--backend", choices=("numpy", "torch"), default="numpy")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=os.path.join("benchmarks", "out"))
    args = parser.parse_args(argv)
    args.shape = [int(s) for s in args.shape.split(",")]
    if args.procs < 2 or args.shape[0] % args.procs:
        parser.error("--procs must be >= 2 and divide the batch size (the first of --shape)")
    try:
        import numpy  # noqa: F401
        import torch.distributed as dist
    except ImportError:
        print("bench-sync needs NumPy and torch (torch.distributed)", file=sys.stderr)
        return 2
    if not (dist.is_available() and dist.is_gloo_available()):
        print("bench-sync needs torch.distributed with the gloo backend", file=sys.stderr)
        return 2
    single = _single(args)
    dist_res = _distributed(args)
    c = args.shape[1]
    per_layer = f"{dist_res['bytes']:.0f} B in {dist_res['calls']:.0f} calls"
    lines = [
        f"# bench-sync: BatchNorm train step ({args.backend}, {args.dtype}), total batch "
        f"{tuple(args.shape)}",
        "",
        f"{platform.node()} · {platform.processor() or platform.machine()} · "
        f"{os.cpu_count()} cores · {time.strftime('%Y-%m-%d')} · gloo over loopback, "
        "1 thread per process",
        "",
        "| run | step ms (median ± half-range) | speed-up | all-reduced per rank per step "
        "| time in all-reduce |",
        "|---|---|---|---|---|",
        f"| 1 process, whole batch | {_ms(single)} | 1.00× | — | — |",
        f"| {args.procs} processes, sync=all_reduce_torch() | {_ms(dist_res['times'])} | "
        f"{statistics.median(single) / statistics.median(dist_res['times']):.2f}× | "
        f"{per_layer} | {dist_res['comm_s'] * 1e3:.2f} ms |",
        "",
        f"Per step and layer each rank sums 4C + 1 = {4 * c + 1} values (C + 1 and C in "
        f"forward, 2C in backward, C = {c}).",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_sync.md"), "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    return 0
