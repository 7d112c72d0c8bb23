""" timm_rc: recurrent-convolution (RC) networks as a timm plugin.

`import timm_rc` registers the RC models with timm (`timm.create_model('rc4_cifar')`) and exposes
`unroll`, the wrapper that turns any shape-preserving residual block into a weight-shared recurrent one,
`convert_to_rc`, which does it for every run of identical blocks of a built network (`init`, `rank`),
`merge_corrections` (relaxed sharing's per-step corrections folded into plain weights), `recalibrate_bn`
(per-step BN statistics re-estimated after the weights change), `load_teacher` (distillation),
and `flops_per_image` (the cost axis of cost-adjustable inference, `RCNet.set_steps`).

The library, below the commands (`python -m timm_rc.<verb>`, in `timm_rc.cli`):
`runs` (a run folder), `data`, `loading`, `evaluation`, `recalibration`, `distillation`, `compression`, `quantize`, `tables`,
`figures`, `sweep_runner`, `train`.
"""
__version__ = '0.3.0.dev0'

from .layers import BN_POLICIES, BN_SHARING, InvertibleDownsample, LowRankCorrected, Unrolled, merge_corrections, \
    step_map, unroll
from .models import PreActBasicBlock, RCNet
from .conversion import RCConversion, convert_to_rc, find_runs
from .errors import UserError
from .evaluation import flops_per_image
from .recalibration import recalibrate_bn
from .distillation import load_teacher
from . import compression, data, distillation, evaluation, loading, quantize, recalibration, runs  # noqa: F401  (timm_rc.quantize.static_int8, ...)

__all__ = ['BN_POLICIES', 'BN_SHARING', 'InvertibleDownsample', 'Unrolled', 'step_map', 'unroll', 'PreActBasicBlock',
           'RCNet', 'RCConversion', 'convert_to_rc', 'find_runs', 'flops_per_image', 'UserError', '__version__',
           'LowRankCorrected', 'merge_corrections', 'recalibrate_bn', 'load_teacher']
