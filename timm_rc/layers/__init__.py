from .invertible_downsample import InvertibleDownsample
from .unroll import BN_SHARING, Unrolled, unroll
