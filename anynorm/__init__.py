"""anynorm: normalization layers with explicit, verified gradients on any array backend.

Forward pass, backward pass and parameter update are written once against the Python array
API standard and run on NumPy, CuPy, PyTorch, JAX, Dask and array-api-strict arrays.
"""

from . import functional
from .layers import BatchNorm, L1Norm, L2Norm, Layer, LpNorm, load

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "L1Norm",
    "L2Norm",
    "Layer",
    "LpNorm",
    "__version__",
    "functional",
    "load",
]
