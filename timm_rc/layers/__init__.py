from .invertible_downsample import InvertibleDownsample
from .unroll import BN_POLICIES, BN_SHARING, NORM_LAYERS, Unrolled, is_norm, register_norm_layer, step_map, unroll
