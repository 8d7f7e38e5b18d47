"""Pure functional forms of every anynorm layer and their explicit backward passes.

Every function takes arrays of any array-API namespace and returns arrays of the same
namespace, device and dtype; nothing passed in is modified.
"""

from ._batch_norm import batch_norm, batch_norm_backward, batch_norm_stats, update_running_stats
from ._lp import (
    l1_normalize,
    l1_normalize_backward,
    l2_normalize,
    l2_normalize_backward,
    lp_normalize,
    lp_normalize_backward,
)

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_stats",
    "l1_normalize",
    "l1_normalize_backward",
    "l2_normalize",
    "l2_normalize_backward",
    "lp_normalize",
    "lp_normalize_backward",
    "update_running_stats",
]
