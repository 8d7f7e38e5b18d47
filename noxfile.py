"""nox sessions: `nox` runs lint and the tests on every CPU backend, each in its own venv.

Each `tests-<backend>` session installs anynorm with that backend plus the test tools and
torch (the float64 oracle), then runs `pytest --backend=<backend>`; `tests-distributed` runs
the multi-process synchronized batch norm tests (torch.distributed gloo, mpi4py/mpich). Every
session also works
with `nox --no-venv` in an environment that already has the packages (e.g. a GPU machine
without network): installs are then skipped.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = [
    "lint",
    "tests-numpy",
    "tests-array_api_strict",
    "tests-torch",
    "tests-jax",
    "tests-dask",
    "tests-distributed",
]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"  # CPU wheel on these machines; the oracle of every test session
EXTRAS = {
    "numpy": "numpy",
    "array_api_strict": "strict",
    "torch": "torch",
    "jax": "jax",
    "dask": "dask",
    "cupy": "cupy",
}


def _install(session: nox.Session, *args: str) -> None:
    if session.venv_backend == "none":
        session.log("no virtualenv (--no-venv): using the installed packages")
        return
    session.install(*args)


def _pytest(session: nox.Session, backend: str) -> None:
    _install(session, "-e", f".[test,{EXTRAS[backend]}]", TORCH)
    session.run("python", "-m", "pytest", f"--backend={backend}", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    _install(session, "ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(name="tests-numpy")
def tests_numpy(session: nox.Session) -> None:
    _pytest(session, "numpy")


@nox.session(name="tests-array_api_strict")
def tests_array_api_strict(session: nox.Session) -> None:
    _pytest(session, "array_api_strict")


@nox.session(name="tests-torch")
def tests_torch(session: nox.Session) -> None:
    """torch on the CPU (and on CUDA too when a device is visible)."""
    _pytest(session, "torch")


@nox.session(name="tests-jax")
def tests_jax(session: nox.Session) -> None:
    _pytest(session, "jax")


@nox.session(name="tests-dask")
def tests_dask(session: nox.Session) -> None:
    _pytest(session, "dask")


@nox.session(name="tests-distributed")
def tests_distributed(session: nox.Session) -> None:
    """Synchronized batch norm over processes: torch.distributed (gloo, loopback) with 2 and
    3 ranks, and mpi4py under the mpiexec of the `mpich` wheel."""
    _install(session, "-e", ".[test,numpy,mpi]", TORCH, "mpich")
    session.run(
        "python",
        "-m",
        "pytest",
        "-m",
        "distributed",
        "--distributed",
        "--backend=numpy",
        "tests/test_distributed.py",
        *session.posargs,
    )


def _cuda_visible() -> bool:
    """A CUDA device is visible to this process (checked without importing cupy)."""
    import shutil
    import subprocess

    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return os.path.exists("/dev/nvidia0")
    out = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False)
    return out.returncode == 0 and "GPU" in out.stdout


@nox.session(name="tests-cupy")
def tests_cupy(session: nox.Session) -> None:
    """CuPy on a CUDA device; skips (exit 0) when no CUDA device is visible."""
    if not _cuda_visible():
        session.skip("no CUDA device visible: nothing to test with CuPy on this machine")
    _pytest(session, "cupy")
