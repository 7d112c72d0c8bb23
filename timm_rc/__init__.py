""" timm_rc: recurrent-convolution (RC) networks as a timm plugin.

`import timm_rc` registers the RC models with timm (`timm.create_model('rc4_cifar')`) and exposes
`unroll`, the wrapper that turns any shape-preserving residual block into a weight-shared recurrent one.
"""
from .layers import BN_SHARING, InvertibleDownsample, Unrolled, unroll
from .models import PreActBasicBlock, RCNet

__version__ = '0.1.0'
