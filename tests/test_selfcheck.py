"""The self-check ``python -m anynorm``: output, exit status and the reserved subcommand."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import anynorm
from anynorm import _selfcheck

ROOT = Path(__file__).resolve().parents[1]


def layer_class_names() -> list[str]:
    return [
        name
        for name in anynorm.__all__
        if isinstance(getattr(anynorm, name), type)
        and issubclass(getattr(anynorm, name), anynorm.Layer)
        and getattr(anynorm, name) is not anynorm.Layer
    ]


def run_module(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "anynorm", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def test_module_runs_and_passes():
    proc = run_module("--quick")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "anynorm self-check" in out
    for name in ("anynorm", "array-api-compat", "python", "platform", "numpy"):
        assert any(line.split()[:1] == [name] for line in out.splitlines()), name
    assert f"anynorm           {anynorm.__version__}" in out
    numpy_rows = [line for line in out.splitlines() if line.startswith("numpy ")]
    for cls in layer_class_names():
        assert any(f" {cls}" in row and row.rstrip().endswith("ok") for row in numpy_rows), cls
    assert "FAIL" not in out
    assert "warning: layers not covered" not in out
    last = [line for line in out.splitlines() if line.strip()][-1]
    assert " checks, 0 failed" in last


def test_broken_gradient_fails(monkeypatch, capsys):
    from anynorm.layers import _lp

    real = _lp.lp_backward

    def wrong(*args, **kwargs):
        return 2.0 * real(*args, **kwargs)

    monkeypatch.setattr(_lp, "lp_backward", wrong)
    assert _selfcheck.main(["--backend", "numpy", "--quick"]) == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.rstrip().endswith("FAIL")]
    assert {line.split()[3] for line in fails} == {"L1Norm", "L2Norm", "LpNorm(p=3)"}
    assert "FAIL numpy cpu float64 L2Norm: input gradient: relative error" in out
    assert "3 failed" in out


def test_broken_weight_handling_fails(monkeypatch, capsys):
    """A layer that ignores a loaded (random) weight shows up in the forward error."""
    from anynorm.layers import _family

    real = _family.LayerNorm._cast

    def ones_weight(self, name, cdt, bshape, xp):
        a = real(self, name, cdt, bshape, xp)
        return xp.ones_like(a) if name == "weight" else a

    monkeypatch.setattr(_family.LayerNorm, "_cast", ones_weight)
    assert _selfcheck.main(["--backend", "numpy", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "FAIL numpy cpu float64 LayerNorm: output: relative error" in out


def test_crash_is_a_failure_not_the_end(monkeypatch, capsys):
    from anynorm.layers import _family

    def boom(self, x, xp):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(_family.GroupNorm, "_forward", boom)
    assert _selfcheck.main(["--backend", "numpy", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "GroupNorm: raised RuntimeError: kaboom" in out
    assert "10 checks, 1 failed" in out


def test_bench_runs_and_writes_table_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the benchmark plot needs matplotlib")
    argv = [
        "bench",
        "--quick",
        "--layers",
        "L2Norm,BatchNorm",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--quiet",
        "--naive",
        "--shapes",
        "4096",
        "--out",
        str(tmp_path),
    ]
    assert _selfcheck.main(argv) == 0
    out = capsys.readouterr().out
    assert "| BatchNorm | (64, 4096) | float32 | anynorm[numpy] |" in out
    assert "naive numpy" in out
    assert (tmp_path / "bench.md").read_text().count("| L2Norm |") >= 3  # ours, naive, torch
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_bench_pins_numpy_blas_to_one_thread(tmp_path, capsys, monkeypatch):
    """NumPy's BLAS (anynorm's matmul sums) runs on one thread during the bench, like
    torch's 1-thread contender, and the process's limits and environment are back after."""
    threadpoolctl = pytest.importorskip("threadpoolctl", reason="sets and reads BLAS threads")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)

    def blas_threads():
        info = threadpoolctl.threadpool_info()
        return {i["filepath"]: i["num_threads"] for i in info if i["user_api"] == "blas"}

    argv = ["bench", "--quick", "--layers", "L2Norm", "--shapes", "4096", "--backends"]
    argv += ["numpy", "--reps", "1", "--warmup", "0", "--quiet", "--out", str(tmp_path)]
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):  # even on 1 core
        before = blas_threads()
        assert before and set(before.values()) == {2}, before
        assert _selfcheck.main(argv) == 0
        assert blas_threads() == before
    assert "OPENBLAS_NUM_THREADS" not in os.environ
    head = capsys.readouterr().out.splitlines()[0]
    assert re.search(r"NumPy BLAS threads: \w+ 1(, \w+ 1)*$", head), head


def test_bench_on_one_torch_thread_still_times(tmp_path, capsys):
    """Where torch's default is one thread (a 1-core machine) the "torch default" contender
    is the "torch 1 thread" one: it is left out, and everything else is still timed (the
    case used to return no rows at all)."""
    torch = pytest.importorskip("torch", reason="the reference contender is torch")
    threads = torch.get_num_threads()
    argv = ["bench", "--quick", "--layers", "L2Norm", "--shapes", "4096", "--reps", "1"]
    argv += ["--warmup", "0", "--quiet", "--out", str(tmp_path)]
    torch.set_num_threads(1)
    try:
        assert _selfcheck.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for contender in ("anynorm[numpy]", "anynorm[torch]", "torch 1 thread"):
        assert f"| L2Norm | (64, 4096) | float32 | {contender} |" in out, contender
    assert "torch default" not in out


def _has_cxx() -> bool:
    return shutil.which("c++") is not None or shutil.which("g++") is not None


@pytest.mark.backends("torch")  # runs once, in the tests-torch session
@pytest.mark.dtypes("float64")
def test_bench_compiled_torch_contender_is_compiled_and_right(bk, monkeypatch):
    """The ``--compile`` contender really runs ``torch.compile(fullgraph=True)`` output,
    and that output equals torch's own layer norm and its autograd gradients (float64)."""
    torch = pytest.importorskip("torch", reason="the compiled contender runs on torch tensors")
    if not _has_cxx():
        pytest.skip("torch.compile's CPU backend (inductor) needs a C++ compiler")
    from anynorm import _bench, _compat

    calls, real = [], torch.compile

    def spy(fn, **options):
        calls.append(options)
        return real(fn, **options)

    monkeypatch.setattr(torch, "compile", spy)
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((8, 64)) * 3 + 1)
    g = torch.from_numpy(rng.standard_normal((8, 64)))
    xp = _compat.namespace_of(torch)
    phases = _bench._compiled("LayerNorm", (8, 64), "NC", "torch", xp, x, g)
    assert [c.get("fullgraph") for c in calls] == [True, True]
    y = phases["fwd"]()
    dx, dw, db = phases["bwd"]()
    xt = x.clone().requires_grad_(True)
    w = torch.ones(64, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(64, dtype=torch.float64, requires_grad=True)
    yt = torch.nn.functional.layer_norm(xt, (64,), w, b)
    yt.backward(g)
    for got, want in ((y, yt), (dx, xt.grad), (dw, w.grad), (db, b.grad)):
        assert got.dtype == torch.float64 and got.shape == want.shape
        np.testing.assert_allclose(got.numpy(), want.detach().numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.backends("jax")  # runs once, in the tests-jax session
@pytest.mark.dtypes("float64")
def test_bench_jitted_jax_contender_is_jitted_and_right(bk, monkeypatch):
    """The ``--compile`` contender on jax runs ``jax.jit`` output, equal to jax.vjp through
    a textbook RMS norm (float64)."""
    jax = pytest.importorskip("jax", reason="the jitted contender runs on jax arrays")
    from anynorm import _bench

    calls, real = [], jax.jit

    def spy(fn, *args, **options):
        calls.append(fn)
        return real(fn, *args, **options)

    monkeypatch.setattr(jax, "jit", spy)
    rng = np.random.default_rng(4)
    xp, x, g, _ = _bench._backend_arrays(
        "jax", rng.standard_normal((8, 64)) + 2, rng.standard_normal((8, 64))
    )
    phases = _bench._compiled("RMSNorm", (8, 64), "NC", "jax", xp, x, g)
    assert len(calls) == 2
    y = phases["fwd"]()
    dx, dw = phases["bwd"]()
    jnp = jax.numpy
    eps = float(np.finfo(np.float64).eps)

    def textbook(x, w):
        return w * x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)

    want_y, vjp = jax.vjp(textbook, x, jnp.ones(64, dtype=jnp.float64))
    want_dx, want_dw = vjp(g)
    for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
        assert got.dtype == jnp.float64 and got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-12)


@pytest.mark.backends("jax")  # runs once, in the tests-jax session
@pytest.mark.dtypes("float32")
def test_bench_leaves_jax_x64_as_it_found_it(bk, tmp_path, capsys):
    """The jax cases switch on ``jax_enable_x64`` (process-wide) for their float64 rows;
    the bench puts it back, whichever way it was."""
    jax = pytest.importorskip("jax", reason="the jax bench backend runs on jax arrays")
    argv = ["bench", "--quick", "--layers", "L2Norm", "--shapes", "4096", "--backends", "jax"]
    argv += ["--reps", "1", "--warmup", "0", "--quiet", "--out", str(tmp_path)]
    start = bool(jax.config.read("jax_enable_x64"))
    try:
        for value in (False, True):
            jax.config.update("jax_enable_x64", value)
            assert _selfcheck.main(argv) == 0
            assert bool(jax.config.read("jax_enable_x64")) is value
            assert "| L2Norm | (64, 4096) | float32 | anynorm[jax] |" in capsys.readouterr().out
    finally:
        jax.config.update("jax_enable_x64", start)


@pytest.mark.backends("torch")
@pytest.mark.dtypes("float32")
def test_bench_compile_contender(bk, tmp_path, capsys):
    """``--compile`` adds the functional forms under torch.compile (inductor) as a row."""
    pytest.importorskip("torch", reason="the compiled contender runs on torch tensors")
    if not _has_cxx():
        pytest.skip("torch.compile's CPU backend (inductor) needs a C++ compiler")
    argv = ["bench", "--quick", "--compile", "--layers", "L2Norm", "--shapes", "4096"]
    argv += ["--backends", "torch", "--reps", "1", "--warmup", "0", "--quiet"]
    assert _selfcheck.main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if "anynorm[torch+compile]" in ln)
    assert row.startswith("| L2Norm | (64, 4096) | float32 | anynorm[torch+compile] |")
    fwd, bwd = (float(c) for c in row.split("|")[5:7])
    assert fwd > 0 and bwd > 0


def test_unknown_backend_is_a_usage_error(capsys):
    assert _selfcheck.main(["--backend", "numpy,tensorflow"]) == 2
    assert "unknown backend(s) 'tensorflow'" in capsys.readouterr().err


def test_timing_column(capsys):
    assert _selfcheck.main(["--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("numpy ")]
    assert len(rows) == 10
    for row in rows:
        assert float(row[-2]) > 0  # ms/call


def test_missing_numpy_is_explained():
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "from anynorm._selfcheck import main\n"
        "sys.exit(main(['--quick']))\n"
    )
    proc = run_module(code=code)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert 'pip install "anynorm[numpy]"' in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("module", ["anynorm", "anynorm._selfcheck"])
def test_import_pulls_in_no_backend(module):
    code = (
        f"import sys, {module}\n"
        "heavy = {'numpy', 'torch', 'jax', 'dask', 'cupy', 'array_api_strict'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    proc = run_module(code=code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
