""" timm_rc: recurrent-convolution (RC) networks as a timm plugin.

`import timm_rc` registers the RC models with timm (`timm.create_model('rc4_cifar')`) and exposes
`unroll`, the wrapper that turns any shape-preserving residual block into a weight-shared recurrent one,
`convert_to_rc`, which does it for every run of identical blocks of a built network (`init`, `rank`),
`merge_corrections` (relaxed sharing's per-step corrections folded into plain weights), `recalibrate_bn`
(per-step BN statistics re-estimated after the weights change), `load_teacher` (distillation),
and `flops_per_image` (the cost axis of cost-adjustable inference, `RCNet.set_steps`).

The package by concern, each layer using only those below it:

* `layers` (`unroll`, BN sharing, relaxed sharing), `models` (the RC networks, `create_model`);
* `conversion` (plain network -> RC), `quantize` (weight-only int8/int4, PT2E int8), `data` (CIFAR through
  Hugging Face datasets), `runs` (the run folder, its config, checkpoints, and `ModelSource`: what names a model);
* `evaluation` (one evaluation for every caller, BN re-estimation), `train` (the trainer, distillation,
  the sweep runner), `deploy` (compression reports, converting a run, export), `reports` (tables, figures);
* `cli`: one module per command of `python -m timm_rc <command>`.
"""
__version__ = '0.3.0.dev0'

from .layers import BN_POLICIES, BN_SHARING, InvertibleDownsample, LowRankCorrected, Unrolled, merge_corrections, \
    step_map, unroll
from .models import PreActBasicBlock, RCNet
from .conversion import RCConversion, convert_to_rc, find_runs
from .errors import UserError
from .evaluation import flops_per_image
from .evaluation.recalibration import recalibrate_bn
from .train.distillation import load_teacher
from . import data, evaluation, quantize, runs  # noqa: F401  (timm_rc.quantize.static_int8, ...)
from ._deprecated import MOVED as _MOVED, install as _install

_install()  # the modules that moved in 0.3.0 stay importable from their old paths until 0.4.0


def __getattr__(name: str):
    """ `timm_rc.deploy.compression` and the other moved modules, as attributes of the package (as before 0.3.0). """
    if f'{__name__}.{name}' in _MOVED:
        import importlib
        return importlib.import_module(f'{__name__}.{name}')
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

__all__ = ['BN_POLICIES', 'BN_SHARING', 'InvertibleDownsample', 'Unrolled', 'step_map', 'unroll', 'PreActBasicBlock',
           'RCNet', 'RCConversion', 'convert_to_rc', 'find_runs', 'flops_per_image', 'UserError', '__version__',
           'LowRankCorrected', 'merge_corrections', 'recalibrate_bn', 'load_teacher']
