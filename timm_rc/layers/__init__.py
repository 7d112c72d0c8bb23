from .invertible_downsample import InvertibleDownsample
from .unroll import BN_POLICIES, BN_SHARING, Unrolled, step_map, unroll
