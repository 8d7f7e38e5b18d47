"""anynorm: normalization layers with explicit, verified gradients on any array backend.

Forward pass, backward pass and parameter update are written once against the Python array
API standard and run on NumPy, CuPy, PyTorch, JAX, Dask and array-api-strict arrays.
"""

from . import distributed, functional
from .layers import (
    BatchNorm,
    GroupNorm,
    InstanceNorm,
    L1Norm,
    L2Norm,
    Layer,
    LayerNorm,
    LocalResponseNorm,
    LpNorm,
    RMSNorm,
    load,
    persist,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "L1Norm",
    "L2Norm",
    "Layer",
    "LayerNorm",
    "LocalResponseNorm",
    "LpNorm",
    "RMSNorm",
    "__version__",
    "distributed",
    "functional",
    "load",
    "persist",
]
