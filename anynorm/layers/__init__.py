"""Stateful layers over :mod:`anynorm.functional`."""

from ._base import Layer, LoadResult, load, persist
from ._batch_norm import BatchNorm
from ._family import GroupNorm, InstanceNorm, LayerNorm, LocalResponseNorm, RMSNorm
from ._lp import L1Norm, L2Norm, LpNorm

__all__ = [
    "BatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "L1Norm",
    "L2Norm",
    "Layer",
    "LayerNorm",
    "LoadResult",
    "LocalResponseNorm",
    "LpNorm",
    "RMSNorm",
    "load",
    "persist",
]
