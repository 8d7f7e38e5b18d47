"""Package-level promises: light import, version, public API."""

from __future__ import annotations

import subprocess
import sys

import anynorm

HEAVY = ("numpy", "torch", "jax", "jaxlib", "cupy", "dask", "array_api_strict")


def test_import_pulls_in_no_backend():
    code = (
        "import sys, anynorm, anynorm.functional\n"
        f"heavy = {HEAVY!r}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_version_and_public_api():
    assert anynorm.__version__ == "0.1.0"
    for name in (
        "BatchNorm",
        "LayerNorm",
        "GroupNorm",
        "InstanceNorm",
        "RMSNorm",
        "LocalResponseNorm",
        "LpNorm",
        "L1Norm",
        "L2Norm",
        "load",
        "persist",
        "functional",
        "distributed",
    ):
        assert name in anynorm.__all__ and hasattr(anynorm, name)
    for name in anynorm.functional.__all__:
        assert callable(getattr(anynorm.functional, name))
        assert getattr(anynorm.functional, name).__doc__


def test_only_compat_imports_array_api_compat():
    """DESIGN rule: _compat.py is the one module that imports array_api_compat."""
    import pathlib

    root = pathlib.Path(anynorm.__file__).parent
    offenders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if p.name != "_compat.py"
        and any(
            line.lstrip().startswith(("import array_api_compat", "from array_api_compat"))
            for line in p.read_text().splitlines()
        )
    ]
    assert offenders == []
