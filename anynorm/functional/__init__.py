"""Pure functional forms of every anynorm layer and their explicit backward passes.

Every function takes arrays of any array-API namespace and returns arrays of the same
namespace, device and dtype; nothing passed in is modified.
"""

from ._batch_norm import batch_norm, batch_norm_backward, batch_norm_stats, update_running_stats
from ._layer_norm import (
    group_norm,
    group_norm_backward,
    instance_norm,
    instance_norm_backward,
    layer_norm,
    layer_norm_backward,
)
from ._lp import (
    l1_normalize,
    l1_normalize_backward,
    l2_normalize,
    l2_normalize_backward,
    lp_normalize,
    lp_normalize_backward,
)
from ._lrn import local_response_norm, local_response_norm_backward
from ._rms_norm import rms_norm, rms_norm_backward

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_stats",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "l1_normalize",
    "l1_normalize_backward",
    "l2_normalize",
    "l2_normalize_backward",
    "layer_norm",
    "layer_norm_backward",
    "local_response_norm",
    "local_response_norm_backward",
    "lp_normalize",
    "lp_normalize_backward",
    "rms_norm",
    "rms_norm_backward",
    "update_running_stats",
]
