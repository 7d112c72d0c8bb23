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

Feature indices (`feature_info`, `forward_intermediates`, `features_only=True` with `out_indices`):
0 is the stem's output, 1..k the output of each unrolled step of cell 1, k+1..2k those of cell 2,
so every step's features can be taken. `features_only=True` returns (0, k, 2k) by default: the stem
and the output of each cell.

Cost-adjustable inference (the extended version): `model.set_steps(k')` runs each cell k' steps (or
`set_steps((k1, k2))` per cell), with the AvgPool before step floor(k'/2)+1, so the graph and its
cost are exactly RC-k''s; `set_steps(model.steps)` gives back the trained network exactly. Which
trained step's BN layers serve each executed step follows `bn_policy` (`timm_rc.step_map`).
`bn_sharing='double'` (the extension's "double independent" BN) keeps cell 2's per-step BN layers
once per step count of cell 1: a network trained with sampled step counts (the trainer's
`sample_steps`) then normalises cell 2 with the statistics of the cell-1 depth that produced its
input. In the state_dict, cell 2's step i for cell 1 run n steps is `cell2.steps.{(n - 1) * k + i}`.
"""
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import torch
from torch import nn

from timm.layers import create_classifier, get_act_layer, get_norm_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._pretrained import PretrainedCfg
from timm.models._registry import get_pretrained_cfg
from timm.models.resnet import BasicBlock

from ..layers import BN_POLICIES, BN_SHARING, InvertibleDownsample, Unrolled, unroll

__all__ = ['RCNet', 'PreActBasicBlock']

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

BLOCK_STYLES = ('preact', 'postact')
RC_BN_SHARING = BN_SHARING + ('double',)


class PreActBasicBlock(nn.Module):
    """ Pre-activation basic block (He et al., "Identity Mappings in Deep Residual Networks", 2016):
    x + drop_path(conv(act(bn(conv(act(bn(x))))))), bias-free 3x3 convolutions, shape-preserving.
    `drop_path` is an optional DropPath module on the residual branch, as in timm's BasicBlock.
    """

    def __init__(
            self,
            channels: int,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            drop_path: Optional[nn.Module] = None,
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
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1(self.act1(self.bn1(x)))
        x = self.conv2(self.act2(self.bn2(x)))
        if self.drop_path is not None:
            x = self.drop_path(x)
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
            block: str = 'postact',
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            drop_block_rate: float = 0.,
            bn_policy: str = 'spread',
            rank: int = 0,
            act_layer: Union[str, Type[nn.Module]] = nn.ReLU,
            norm_layer: Union[str, Type[nn.Module]] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        """
        Args:
            steps: unrolled steps k of each cell (RC-k); the AvgPool sits before step floor(k/2)+1.
            bn_sharing: BN layers of the cells per step: 'independent', 'shared', 'none', or 'double'
                (independent, and cell 2's also per step count of cell 1: the extension's double
                independent BN, for networks trained with sampled step counts).
            share_weights: False gives every step its own weights (the paper's ResNet-10/18).
            width: channels of the first cell; the second cell has 4x as many.
            block: 'postact' (timm's BasicBlock: conv-BN-ReLU-conv-BN, add, ReLU; the default, chosen by
                experiment, README) or 'preact' (BN-ReLU-conv x2 + x, He et al. 2016).
            num_classes: classifier outputs, 0 for none.
            in_chans: input channels.
            global_pool: timm global pool type ('' for none).
            drop_rate: dropout before the classifier.
            drop_path_rate: stochastic depth: each unrolled step drops its residual branch with a rate
                growing linearly over the 2k steps of both cells, from 0 to drop_path_rate (timm's rule).
            drop_block_rate: only 0 (DropBlock is not implemented; accepted because timm passes it).
            bn_policy: `set_steps`'s default rule for which trained step's BN layers serve each of k'
                executed steps: 'spread' or 'first' (`timm_rc.step_map`); trained with sampled step
                counts, a network runs every k' it was trained at with 'first'.
            rank: relaxed sharing: each step's convolutions get their own rank-r correction (`timm_rc.unroll`'s
                rank; r (C_in 9 + C_out) parameters per 3x3 convolution per step). 0: strict sharing.
            act_layer: activation class or timm name ('relu', 'silu', ...).
            norm_layer: norm class of the stem and the blocks, or timm name ('batchnorm2d', ...).
        """
        super().__init__()
        if block not in BLOCK_STYLES:
            raise ValueError(f'unknown block {block!r}; valid values: {", ".join(map(repr, BLOCK_STYLES))}')
        if bn_sharing not in RC_BN_SHARING:
            raise ValueError(f'unknown bn_sharing {bn_sharing!r}; valid values: {", ".join(map(repr, RC_BN_SHARING))}')
        if bn_policy not in BN_POLICIES:
            raise ValueError(f'unknown bn_policy {bn_policy!r}; valid values: {", ".join(map(repr, BN_POLICIES))}')
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f'steps must be an int >= 1, got {steps!r}')
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f'rank must be an int >= 0 (0: strict sharing), got {rank!r}')
        if rank and not share_weights:
            raise ValueError('rank > 0 adds per-step corrections to shared weights; a network with unshared weights '
                             '(rc2_unshared_cifar, rc4_unshared_cifar) has its own weights per step already: drop rank')
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f'width must be an int >= 1, got {width!r}')
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f'drop_path_rate must be in [0, 1), got {drop_path_rate!r}')
        if drop_block_rate:
            raise ValueError(
                f'RCNet has no DropBlock (drop_block_rate={drop_block_rate!r}); use drop_path_rate '
                f'(stochastic depth per unrolled step) or drop_rate (dropout before the classifier)')
        if not global_pool and num_classes:
            raise ValueError(
                f"global_pool='' (no pooling) leaves a feature map that the classifier cannot take; "
                f"pass num_classes=0 with it, or a pool type ('avg', 'max', 'avgmax', 'catavgmax')")
        act_layer = get_act_layer(act_layer)
        norm_layer = get_norm_layer(norm_layer)
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.drop_path_rate = drop_path_rate
        self.steps = steps
        self.bn_sharing = bn_sharing
        self.bn_policy = bn_policy
        self.share_weights = share_weights
        self.rank = rank
        self.block = block  # timm's save_for_hf records it in config.json (the default changed in 0.2.0)
        self.width = width

        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False, **dd)
        self.bn1 = norm_layer(width, **dd)
        self.act1 = act_layer(inplace=True)

        # timm's stochastic depth rule: rate i / (n - 1) * drop_path_rate over all n = 2k steps
        dpr = [drop_path_rate * i / (2 * steps - 1) for i in range(2 * steps)]

        def cell(channels, rates, bn_groups=1):
            return unroll(
                _make_block(block, channels, act_layer, norm_layer, dd),
                steps,
                bn_sharing='independent' if bn_sharing == 'double' else bn_sharing,
                share_weights=share_weights,
                before_step={steps // 2: nn.AvgPool2d(2)},
                drop_path=rates if drop_path_rate > 0 else None,
                bn_groups=bn_groups,
                rank=rank,
            )

        self.cell1 = cell(width, dpr[:steps])
        self.downsample = InvertibleDownsample(2)
        # double independent BN: one group of per-step BN layers per step count of cell 1
        self.cell2 = cell(4 * width, dpr[steps:], bn_groups=steps if bn_sharing == 'double' else 1)
        self.num_features = 4 * width
        self.set_steps(steps)
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def set_steps(self, steps: Union[int, Tuple[int, int]], bn_policy: Optional[str] = None) -> 'RCNet':
        """ Run each cell `steps` (k') unrolled steps from now on, or (k1, k2) for cell 1 and cell 2.

        The AvgPool of a cell run k' steps sits before its step floor(k'/2)+1, so the graph and its
        FLOPs are exactly those of the network built with `steps=k'`; `set_steps(self.steps)` gives
        back the trained network exactly. Executed step j runs the trained step that `bn_policy`
        (default: the model's `bn_policy`) names, see `timm_rc.step_map`; with double BN, cell 2
        uses the BN group of cell 1's step count (the largest one trained when k1 is larger) with
        'first' (a group holds the BN layers of the step counts it was trained at). A network with unshared weights runs at most `self.steps` steps. `feature_info` follows (one
        entry per executed step; hook-based feature extractors need the trained steps). Returns self.
        """
        pair = (steps, steps) if isinstance(steps, int) and not isinstance(steps, bool) else tuple(steps)
        if len(pair) != 2 or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in pair):
            raise ValueError(f'set_steps() takes an int >= 1 (both cells) or a pair (cell 1, cell 2), got {steps!r}')
        if not self.share_weights and max(pair) > self.steps:
            raise ValueError(f'this network has unshared weights for {self.steps} step{"s" * (self.steps != 1)} per cell and cannot run '
                             f'{max(pair)}: every step needs its own weights; run at most {self.steps} steps')
        if not (isinstance(self.cell1, Unrolled) and isinstance(self.cell2, Unrolled)):
            raise ValueError('set_steps() needs both cells; prune_intermediate_layers() removed one')
        policy = self.bn_policy if bn_policy is None else bn_policy
        k1, k2 = pair
        self.cell1.set_steps(k1, policy, before_step={k1 // 2: self.steps // 2})
        group = min(k1, self.steps) - 1 if self.bn_sharing == 'double' else 0
        self.cell2.set_steps(k2, 'first' if self.bn_sharing == 'double' else policy, group=group,
                             before_step={k2 // 2: self.steps // 2})
        self.active_steps = pair
        # one entry per feature index: the stem, then every executed step of cell 1 and of cell 2
        # (the AvgPool before step k // 2 halves the resolution inside each cell); a cell's last
        # step is the cell's output, named by the cell, so that the hook and list extractors find it
        width = self.width
        self.feature_info = [dict(num_chs=width, reduction=1, module='act1')]
        for name, chs, reduction, k in (('cell1', width, 1, k1), ('cell2', 4 * width, 4, k2)):
            cell = getattr(self, name)
            self.feature_info += [
                dict(num_chs=chs, reduction=reduction * (2 if j >= k // 2 else 1),
                     module=name if j == k - 1 else f'{name}.steps.{cell.plan[j][1]}')
                for j in range(k)]
        return self

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

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """ Features and the intermediate features of every unrolled step (timm's interface).

        Args:
            x: input images.
            indices: feature indices (0: stem, 1..k: the steps of cell 1, k+1..2k: those of cell 2);
                an int n takes the last n, None takes all.
            norm: ignored (RCNet has no final norm layer).
            stop_early: stop after the last feature index taken.
            output_fmt: 'NCHW' only.
            intermediates_only: return the intermediates alone.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        feat_idx = 0
        for name in ('cell1', 'cell2'):
            if stop_early and feat_idx >= max_index:
                break
            cell = getattr(self, name)
            if name == 'cell2':
                x = self.downsample(x)
            if isinstance(cell, Unrolled):
                for pres, step in cell.executed():
                    if stop_early and feat_idx >= max_index:
                        break
                    for pre in pres:
                        x = pre(x)
                    x = step(x)
                    feat_idx += 1
                    if feat_idx in take_indices:
                        intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """ Drop the steps (and cells) after the last feature index in `indices`; returns the indices. """
        if self.active_steps != (self.steps, self.steps) or self.bn_sharing == 'double':
            raise ValueError(f'prune_intermediate_layers() works on the trained graph with single BN groups; this '
                             f'network runs {self.active_steps} steps (bn_sharing {self.bn_sharing!r}): '
                             f'set_steps({self.steps}) first')
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        steps = self.steps
        if max_index <= steps:  # nothing of cell 2 is needed
            self.downsample = nn.Identity()
            self.cell2 = nn.Identity()
            _keep_steps(self, 'cell1', max_index)
        else:
            _keep_steps(self, 'cell2', max_index - steps)
        if max_index < 2 * steps:
            # the features now end at the last kept step; the head was sized for the last one
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or max_index < 2 * steps:
            self.reset_classifier(0, '')
        return take_indices

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


def _keep_steps(model: RCNet, name: str, n: int) -> None:
    """ Keep the first n steps of cell `name` (none: the cell becomes an nn.Identity). """
    cell = getattr(model, name)
    if not isinstance(cell, Unrolled):
        return
    if n == 0:
        setattr(model, name, nn.Identity())
    else:
        cell.steps = nn.ModuleList(list(cell.steps)[:n])
        cell.before_step = nn.ModuleList(list(cell.before_step)[:n])
        cell.set_steps(n, 'first')


def _check_pretrained_source(variant: str, kwargs: Dict[str, Any]) -> None:
    """ The registered cfgs hold no weights (url '' and no hf_hub_id): say where weights can come from. """
    cfg = kwargs.get('pretrained_cfg') or get_pretrained_cfg(variant)
    name = variant
    if isinstance(cfg, str):  # a tag: 'rc4_cifar.cifar100'
        name = f'{variant}.{cfg}'
        cfg = get_pretrained_cfg(name)
    cfg = cfg.to_dict() if isinstance(cfg, PretrainedCfg) else dict(cfg or {})
    cfg.update(kwargs.get('pretrained_cfg_overlay') or {})
    if not any(cfg.get(k) for k in ('state_dict', 'file', 'url', 'hf_hub_id')):
        raise RuntimeError(
            f'{name} has no published weights (its pretrained cfg has no url or hf_hub_id). Load a '
            f"weights file with timm.create_model('{name}', pretrained=True, "
            f"pretrained_cfg_overlay=dict(file='model.safetensors')), or a training run's output with "
            f"timm.create_model('local-dir:<run folder>', pretrained=True); or pass pretrained=False.")


def _create_rcnet(variant: str, pretrained: bool = False, **kwargs) -> RCNet:
    if pretrained:
        _check_pretrained_source(variant, kwargs)
    steps = kwargs.get('steps', 4)
    # the default features: the stem and the output of each cell, i.e. indices 0, k and 2k
    feature_cfg = dict(feature_cls='getter', out_indices=(0, steps, 2 * steps))
    return build_model_with_cfg(RCNet, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


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
