""" Recurrent-convolution (RC) networks for CIFAR

Paper: "Recurrent Convolutions: A Model Compression Point of View", Zhendong Zhang and Cheolkon Jung,
NeurIPS 2018 workshop on compact deep networks. Extended version: "Recurrent Convolution for Compact
and Cost-Adjustable Neural Networks: An Empirical Study", arXiv 1902.09809.

An RC network reuses one residual block's weights for k unrolled steps. Its BatchNorm layers stay
independent per step (own running statistics, own gamma/beta): that is what closes most of the gap
to the plain network of the same depth. RC-k (Appendix A):

    Conv3x3(3->w) -> BN -> ReLU
    cell 1: Block(w) unrolled k steps, AvgPool(2) before step floor(k/2)+1     # 32x32 -> 16x16
    InvPool(2)                                                                 # w -> 4w ch, 8x8
    cell 2: Block(4w) unrolled k steps, AvgPool(2) before step floor(k/2)+1    # 8x8 -> 4x4
    GlobalAvgPool -> Dense

The paper's "ResNet-10" / "ResNet-18" are the RC-2 / RC-4 graphs without weight sharing.
Every variant here is a config of the one `RCNet` class; both cells are built by `timm_rc.unroll`.
"""
from typing import Any, Dict, Optional, Type, Union

import torch
from torch import nn

from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock

from ..layers import BN_SHARING, InvertibleDownsample, unroll

__all__ = ['RCNet', 'PreActBasicBlock']

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

BLOCK_STYLES = ('preact', 'postact')


class PreActBasicBlock(nn.Module):
    """ Pre-activation basic block (He et al., "Identity Mappings in Deep Residual Networks", 2016):
    x + conv(act(bn(conv(act(bn(x)))))), bias-free 3x3 convolutions, shape-preserving.
    """

    def __init__(
            self,
            channels: int,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.bn1 = norm_layer(channels, **dd)
        # not in place: with bn_sharing='none' bn1 is an Identity, and an in-place act1 would
        # overwrite the block's input, which is also the shortcut
        self.act1 = act_layer(inplace=False)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False, **dd)
        self.bn2 = norm_layer(channels, **dd)
        self.act2 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1(self.act1(self.bn1(x)))
        x = self.conv2(self.act2(self.bn2(x)))
        return x + shortcut


def _make_block(style: str, channels: int, act_layer, norm_layer, dd) -> nn.Module:
    if style == 'preact':
        return PreActBasicBlock(channels, act_layer=act_layer, norm_layer=norm_layer, **dd)
    # post-activation: timm's own ResNet BasicBlock, conv-bn-act-conv-bn, add, act
    return BasicBlock(channels, channels, act_layer=act_layer, norm_layer=norm_layer, **dd)


class RCNet(nn.Module):
    """ RC-k network for 32x32 images: two unrolled residual cells (see the module docstring). """

    def __init__(
            self,
            steps: int = 4,
            bn_sharing: str = 'independent',
            share_weights: bool = True,
            width: int = 64,
            block: str = 'preact',
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        """
        Args:
            steps: unrolled steps k of each cell (RC-k); the AvgPool sits before step floor(k/2)+1.
            bn_sharing: BN layers of the cells per step: 'independent', 'shared' or 'none'.
            share_weights: False gives every step its own weights (the paper's ResNet-10/18).
            width: channels of the first cell; the second cell has 4x as many.
            block: 'preact' (BN-ReLU-conv x2, the default) or 'postact' (conv-BN-ReLU, timm's BasicBlock).
            num_classes: classifier outputs, 0 for none.
            in_chans: input channels.
            global_pool: timm global pool type ('' for none).
            drop_rate: dropout before the classifier.
            act_layer: activation class.
            norm_layer: norm class of the stem and the blocks.
        """
        super().__init__()
        if block not in BLOCK_STYLES:
            raise ValueError(f'unknown block {block!r}; valid values: {", ".join(map(repr, BLOCK_STYLES))}')
        if bn_sharing not in BN_SHARING:
            raise ValueError(f'unknown bn_sharing {bn_sharing!r}; valid values: {", ".join(map(repr, BN_SHARING))}')
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f'steps must be an int >= 1, got {steps!r}')
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f'width must be an int >= 1, got {width!r}')
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.steps = steps
        self.bn_sharing = bn_sharing
        self.share_weights = share_weights

        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False, **dd)
        self.bn1 = norm_layer(width, **dd)
        self.act1 = act_layer(inplace=True)

        def cell(channels):
            return unroll(
                _make_block(block, channels, act_layer, norm_layer, dd),
                steps,
                bn_sharing=bn_sharing,
                share_weights=share_weights,
                before_step={steps // 2: nn.AvgPool2d(2)},
            )

        self.cell1 = cell(width)
        self.downsample = InvertibleDownsample(2)
        self.cell2 = cell(4 * width)
        self.num_features = self.head_hidden_size = 4 * width
        self.feature_info = [
            dict(num_chs=width, reduction=1, module='act1'),
            dict(num_chs=width, reduction=2, module='cell1'),
            dict(num_chs=4 * width, reduction=8, module='cell2'),
        ]
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1|bn1', blocks=r'^cell(\d+)')

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        ref = self.conv1.weight
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, device=ref.device, dtype=ref.dtype)
        self.global_pool.train(self.training)
        self.fc.train(self.training)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.cell1(x)
        x = self.downsample(x)
        x = self.cell2(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_rcnet(variant: str, pretrained: bool = False, **kwargs) -> RCNet:
    return build_model_with_cfg(
        RCNet, variant, pretrained, feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2)), **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (4, 4),
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': 'conv1', 'classifier': 'fc', 'license': 'apache-2.0',
        **kwargs,
    }


def _cfgs(name: str, paper: str) -> Dict[str, Dict[str, Any]]:
    # '.cifar10' (default) and '.cifar100' tags: the class count and normalisation of each dataset
    meta = dict(
        description=f"the paper's {paper}", paper_ids='arXiv:1902.09809',
        paper_name='Recurrent Convolutions: A Model Compression Point of View')
    return {
        f'{name}.cifar10': _cfg(**meta),
        f'{name}.cifar100': _cfg(**meta, num_classes=100, mean=CIFAR100_MEAN, std=CIFAR100_STD),
    }


default_cfgs = generate_default_cfgs({
    **_cfgs('rc1_cifar', 'RC-1'),
    **_cfgs('rc2_cifar', 'RC-2'),
    **_cfgs('rc4_cifar', 'RC-4'),
    **_cfgs('rc2_unshared_cifar', 'ResNet-10'),
    **_cfgs('rc4_unshared_cifar', 'ResNet-18'),
})


@register_model
def rc1_cifar(pretrained: bool = False, **kwargs) -> RCNet:
    """ RC-1 (paper, Table 2): each cell one step, 1,259,082 params with 10 classes. """
    model_args = dict(steps=1)
    return _create_rcnet('rc1_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def rc2_cifar(pretrained: bool = False, **kwargs) -> RCNet:
    """ RC-2 (paper, Table 2): each cell unrolled 2 steps, independent BN, 1,260,362 params. """
    model_args = dict(steps=2)
    return _create_rcnet('rc2_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def rc4_cifar(pretrained: bool = False, **kwargs) -> RCNet:
    """ RC-4 (paper, Tables 1 and 2): each cell unrolled 4 steps, independent BN, 1,262,922 params. """
    model_args = dict(steps=4)
    return _create_rcnet('rc4_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def rc2_unshared_cifar(pretrained: bool = False, **kwargs) -> RCNet:
    """ The paper's "ResNet-10": RC-2's graph with unshared weights, 2,513,738 params. """
    model_args = dict(steps=2, share_weights=False)
    return _create_rcnet('rc2_unshared_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def rc4_unshared_cifar(pretrained: bool = False, **kwargs) -> RCNet:
    """ The paper's "ResNet-18": RC-4's graph with unshared weights, 5,023,050 params. """
    model_args = dict(steps=4, share_weights=False)
    return _create_rcnet('rc4_unshared_cifar', pretrained, **dict(model_args, **kwargs))
