from .invertible_downsample import InvertibleDownsample
from .unroll import BN_POLICIES, BN_SHARING, NORM_LAYERS, LowRankCorrected, Unrolled, correctable, correction_rank, \
    is_norm, merge_corrections, register_norm_layer, step_map, unroll
