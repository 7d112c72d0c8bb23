""" timm_rc: recurrent-convolution (RC) networks as a timm plugin.

`import timm_rc` registers the RC models with timm (`timm.create_model('rc4_cifar')`) and exposes
`unroll`, the wrapper that turns any shape-preserving residual block into a weight-shared recurrent one,
`convert_to_rc`, which does it for every run of identical blocks of a built network,
and `flops_per_image` (the cost axis of cost-adjustable inference, `RCNet.set_steps`).
"""
from .layers import BN_POLICIES, BN_SHARING, InvertibleDownsample, Unrolled, step_map, unroll
from .models import PreActBasicBlock, RCNet
from .conversion import RCConversion, convert_to_rc, find_runs

__version__ = '0.2.0'


_SUBMODULES = ('compress', 'convert', 'eval', 'plots', 'results', 'sweep', 'train')


def __getattr__(name):
    # the command modules are imported on first use (timm_rc.compress.static_int8 after `import timm_rc`),
    # so that `python -m timm_rc.eval` does not find its own module imported already
    if name == 'flops_per_image':
        from .eval import flops_per_image
        return flops_per_image
    if name in _SUBMODULES:
        import importlib
        return importlib.import_module(f'{__name__}.{name}')
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
