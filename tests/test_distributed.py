"""Synchronized batch norm over real processes: torch.distributed (gloo, loopback) with 2 and 3
ranks, and mpi4py under ``mpiexec`` where it is installed.

Each rank (tests/_dist_worker.py) runs ``BatchNorm(sync=...)`` on its slice of shared
batches (unequal per-rank sizes) on NumPy and torch, float64 and float32; the parent compares
every rank's output and input gradient slice, parameter gradients, parameters after SGD and
running statistics with ``torch.nn.BatchNorm2d`` in float64 on the concatenated batch.

These tests start processes, so they run in the ``tests-distributed`` nox session
(``pytest -m distributed --distributed``) and are deselected elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _dist_worker import global_data

from conftest import TOLERANCES, rel_err

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_dist_worker.py"
CHANNELS, STEPS, SEED = 3, 3, 1122
LAUNCH_TIMEOUT = 300


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _common(sizes, out) -> list[str]:
    return [
        "--sizes",
        ",".join(map(str, sizes)),
        "--channels",
        str(CHANNELS),
        "--steps",
        str(STEPS),
        "--seed",
        str(SEED),
        "--out",
        str(out),
    ]


def _finish(procs, what: str) -> None:
    failed = []
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{what}: a rank did not finish in {LAUNCH_TIMEOUT} s")
        if p.returncode != 0:
            failed.append(stdout.decode(errors="replace")[-3000:])
    assert not failed, f"{what}: rank(s) failed:\n" + "\n----\n".join(failed)


def _launch_torch(sizes, tmp_path) -> list[dict]:
    world = len(sizes)
    init = f"file://{tmp_path / 'store'}"
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, str(WORKER), "--launcher", "torch", "--rank", str(r)),
                *("--world", str(world), "--init", init, *_common(sizes, tmp_path)),
            ],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    _finish(procs, f"torch.distributed with {world} ranks")
    return [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(world)]


def _mpiexec() -> str | None:
    found = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    return found


def _launch_mpi(sizes, tmp_path) -> list[dict]:
    world = len(sizes)
    cmd = [_mpiexec(), "-n", str(world), sys.executable, str(WORKER), "--launcher", "mpi"]
    proc = subprocess.Popen(
        [*cmd, *_common(sizes, tmp_path)],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    _finish([proc], f"mpiexec -n {world}")
    return [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(world)]


def _oracle(sizes):
    """Full-batch torch.nn.BatchNorm2d in float64: per step y, dx, grads, params, buffers."""
    torch = pytest.importorskip("torch", reason="torch (the float64 oracle) is not installed")
    weight, bias, xs, gs = global_data(SEED, sum(sizes), CHANNELS, STEPS + 1)
    module = torch.nn.BatchNorm2d(CHANNELS).double()
    with torch.no_grad():
        module.weight.copy_(torch.tensor(weight))
        module.bias.copy_(torch.tensor(bias))
    steps = []
    for step in range(STEPS + 1):
        if step == STEPS:
            module.eval()
        x = torch.tensor(xs[step], requires_grad=True)
        y = module(x)
        y.backward(torch.tensor(gs[step]))
        rec = {"y": y.detach().numpy(), "dx": x.grad.numpy()}
        rec["grad/weight"] = module.weight.grad.numpy().copy()
        rec["grad/bias"] = module.bias.grad.numpy().copy()
        with torch.no_grad():
            for p in module.parameters():
                if step < STEPS:
                    p -= 0.1 * p.grad
                p.grad = None
        rec["weight"] = module.weight.detach().numpy().copy()
        rec["bias"] = module.bias.detach().numpy().copy()
        rec["running_mean"] = module.running_mean.numpy().copy()
        rec["running_var"] = module.running_var.numpy().copy()
        rec["num_batches_tracked"] = int(module.num_batches_tracked)
        steps.append(rec)
    return steps


def _compare(results: list[dict], sizes, backends=("numpy", "torch"), autograd=True) -> None:
    oracle = _oracle(sizes)
    for backend in backends:
        for dname in ("float64", "float32"):
            tol = TOLERANCES[dname]
            for step, ref in enumerate(oracle):
                key = f"{backend}/{dname}/{step}"
                for name in ("y", "dx"):
                    parts = [res[f"{key}/{name}"] for res in results]
                    assert all(p.dtype == np.dtype(dname) for p in parts), (key, name)
                    assert [p.shape[0] for p in parts] == list(sizes), (key, name)
                    err = rel_err(np.concatenate(parts), ref[name])
                    assert err <= tol, f"{key} {name}: relative error {err:.3g} > {tol}"
                for r, res in enumerate(results):
                    for name in ("grad/weight", "grad/bias", "weight", "bias"):
                        err = rel_err(res[f"{key}/{name}"], ref[name])
                        assert err <= tol, f"{key} rank {r} {name}: {err:.3g} > {tol}"
                    for name in ("running_mean", "running_var"):
                        err = rel_err(res[f"{key}/{name}"], ref[name])
                        assert err <= tol, f"{key} rank {r} {name}: {err:.3g} > {tol}"
                    assert int(res[f"{key}/num_batches_tracked"]) == ref["num_batches_tracked"]
            if backend == "torch":
                for r, res in enumerate(results):
                    explicit = res[f"torch/{dname}/explicit_dx"]
                    ref0 = oracle[0]["dx"][sum(sizes[:r]) : sum(sizes[: r + 1])]
                    assert rel_err(explicit, ref0) <= tol
                    if autograd:
                        err = rel_err(res[f"torch/{dname}/autograd_dx"], explicit)
                        assert err <= tol, f"rank {r} autograd vs explicit dx: {err:.3g}"


@pytest.mark.parametrize("sizes", [(3, 5), (2, 1, 4)], ids=["2ranks-3+5", "3ranks-2+1+4"])
def test_torch_distributed_gloo_equals_full_batch(sizes, tmp_path):
    pytest.importorskip("torch", reason="torch is not installed")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no torch.distributed gloo backend")
    _compare(_launch_torch(sizes, tmp_path), sizes)


@pytest.mark.parametrize("sizes", [(4, 2), (1, 3, 2)], ids=["2ranks-4+2", "3ranks-1+3+2"])
def test_mpi4py_equals_full_batch(sizes, tmp_path):
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install mpi4py mpich)")
    if _mpiexec() is None:
        pytest.skip("no mpiexec on PATH or next to this Python (pip install mpich)")
    _compare(_launch_mpi(sizes, tmp_path), sizes, autograd=False)


def _run_example(cmd: list[str], ranks: int, *args: str) -> None:
    """Run examples/sync_batch_norm.py under a launcher; every rank reports and passes."""
    out = subprocess.run(
        [*cmd, str(ROOT / "examples" / "sync_batch_norm.py"), *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # ranks share stdout, so their lines may interleave: count the reports, not the lines
    assert out.stdout.count("max |synced - full batch|") == ranks, out.stdout


def test_example_under_torchrun():
    """examples/sync_batch_norm.py as the README runs it: torchrun, 2 processes, gloo."""
    pytest.importorskip("torch", reason="torch is not installed")
    _run_example(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"], 2
    )


def test_example_under_mpiexec():
    """examples/sync_batch_norm.py --mpi under mpiexec with 3 processes."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install mpi4py mpich)")
    if _mpiexec() is None:
        pytest.skip("no mpiexec on PATH or next to this Python (pip install mpich)")
    _run_example([_mpiexec(), "-n", "3", sys.executable], 3, "--mpi")
