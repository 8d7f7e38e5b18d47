"""Stateful layers over :mod:`anynorm.functional`."""

from ._base import Layer, LoadResult, load
from ._batch_norm import BatchNorm
from ._lp import L1Norm, L2Norm, LpNorm

__all__ = ["BatchNorm", "L1Norm", "L2Norm", "Layer", "LoadResult", "LpNorm", "load"]
