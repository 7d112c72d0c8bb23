""" Unrolled (recurrent) residual blocks with per-step BatchNorm

`unroll(block, steps)` turns any shape-preserving residual block into a recurrent-convolution (RC)
cell: the block is applied `steps` times in a row, h_{i+1} = f_w(h_i), with one set of weights.
What happens to the block's BatchNorm layers is chosen with `bn_sharing`:

* ``"independent"`` (the paper's fix): every step has its own BN layers (own running statistics,
  own gamma/beta). Only the rest of the block is shared.
* ``"shared"``: one set of BN layers serves every step (plain RC).
* ``"none"``: the BN layers are replaced by ``nn.Identity``.

How it works: step 0 *is* the block. Each further step is a shallow copy of it in which every
module that holds no BN is the very same module object as in step 0 (so convolutions, their
parameters and any hooks on them are shared), while the BN layers are fresh copies, the same
objects, or gone. The forward pass is a plain loop over real modules, so it works with hooks,
SyncBatchNorm conversion, DDP, FX, TorchScript and ``torch.compile(fullgraph=True)`` without special
cases. ``state_dict()`` lists every shared tensor once, under ``steps.0``, so safetensors can save it
and the file size reflects the sharing; loading fills the aliases back in.

Reference: Zhang & Jung, "Recurrent Convolutions: A Model Compression Point of View", NeurIPS 2018
workshop on compact deep networks (extended: arXiv 1902.09809).
"""
import copy
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from timm.layers import DropPath

__all__ = ['BN_SHARING', 'Unrolled', 'unroll']

BN_SHARING = ('independent', 'shared', 'none')


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm)


def _bn_free_modules(block: nn.Module) -> List[nn.Module]:
    """ Modules of `block` with no BN layer at or below them (shareable as whole objects). """
    has_bn = {}

    def visit(m: nn.Module) -> bool:
        if id(m) not in has_bn:
            has_bn[id(m)] = _is_bn(m) | any([visit(c) for c in m.children()])
        return has_bn[id(m)]

    visit(block)
    return [m for m in block.modules() if not has_bn[id(m)]]


def _is_identity_shortcut(downsample) -> bool:
    """ A `downsample` attribute that leaves the shortcut as it is: None, False (a flag, as in some
    timm blocks), nn.Identity, or a container holding only such modules (an empty nn.Sequential). """
    if downsample is None or downsample is False or isinstance(downsample, nn.Identity):
        return True
    if isinstance(downsample, (nn.Sequential, nn.ModuleList)):
        return all(_is_identity_shortcut(m) for m in downsample)
    return False


def _describe(module) -> str:
    if not isinstance(module, nn.Module):
        return repr(module)
    children = [type(c).__name__ for c in module.children()]
    return type(module).__name__ + (f'({", ".join(children)})' if children else '')


def _drop_path_rates(drop_path, steps: int) -> Optional[List[float]]:
    if drop_path is None:
        return None
    rates = [drop_path] * steps if isinstance(drop_path, (int, float)) else list(drop_path)
    if len(rates) != steps or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r < 1 for r in rates):
        raise ValueError(f'drop_path must be a rate in [0, 1) or {steps} of them (one per step), got {drop_path!r}')
    return [float(r) for r in rates]


def _replace_bn(module: nn.Module) -> int:
    """ Replace every BN layer below `module` with nn.Identity, in place. Returns how many. """
    count = 0
    for name, child in module.named_children():
        if _is_bn(child):
            setattr(module, name, nn.Identity())
            count += 1
        else:
            count += _replace_bn(child)
    return count


def _reset_parameters(module: nn.Module) -> None:
    for m in module.modules():
        if not _is_bn(m) and callable(getattr(m, 'reset_parameters', None)):
            m.reset_parameters()


class Unrolled(nn.Module):
    """ A block applied `len(steps)` times in a row; build it with `unroll()`.

    Attributes:
        steps: one module per step; step 0 is the original block, later steps share its non-BN
            modules (or everything, for ``bn_sharing`` "shared"/"none").
        before_step: modules applied to the input of the step of the same index (nn.Identity
            where nothing is), for example the RC cells' AvgPool between two steps.
    """
    __jit_unused_properties__ = ['num_steps']

    def __init__(
            self,
            steps: List[nn.Module],
            before_step: List[nn.Module],
            bn_sharing: str,
            share_weights: bool,
    ):
        super().__init__()
        self.bn_sharing = bn_sharing
        self.share_weights = share_weights
        self.steps = nn.ModuleList(steps)
        self.before_step = nn.ModuleList(before_step)
        self.register_state_dict_post_hook(_drop_aliases)
        self.register_load_state_dict_pre_hook(_fill_aliases)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def aliases(self) -> Dict[str, str]:
        """ Local state_dict key -> the earlier key holding the very same tensor. """
        first: Dict[int, str] = {}
        out: Dict[str, str] = {}
        for name, t in _named_tensors(self.steps):
            key = f'steps.{name}'
            if id(t) in first:
                out[key] = first[id(t)]
            else:
                first[id(t)] = key
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = 0
        for pre, step in zip(self.before_step, self.steps):
            x = pre(x)
            y = step(x)
            if not torch.jit.is_scripting():
                _check_shape(x, y, i)
            x = y
            i += 1
        return x

    def extra_repr(self) -> str:
        return f'num_steps={self.num_steps}, bn_sharing={self.bn_sharing!r}, share_weights={self.share_weights}'


def _named_tensors(module: nn.Module):
    # like state_dict(): every path, aliases included (remove_duplicate=False), buffers that are
    # not persistent left out
    for name, p in module.named_parameters(remove_duplicate=False):
        yield name, p
    for mod_name, m in module.named_modules(remove_duplicate=False):
        for b_name, b in m._buffers.items():
            if b is not None and b_name not in m._non_persistent_buffers_set:
                yield f'{mod_name}.{b_name}' if mod_name else b_name, b


def _drop_aliases(module: Unrolled, state_dict, prefix: str, local_metadata) -> None:
    for alias in module.aliases():
        state_dict.pop(prefix + alias, None)


def _fill_aliases(module: Unrolled, state_dict, prefix: str, local_metadata, strict, missing_keys,
                  unexpected_keys, error_msgs) -> None:
    for alias, source in module.aliases().items():
        if prefix + alias not in state_dict and prefix + source in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + source]


def _check_shape(x, y, step: int) -> None:
    # FX proxies are not tensors: skip while tracing; under torch.compile shapes are static
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape != y.shape:
        raise ValueError(
            f'unroll() needs a shape-preserving block, but step {step} turned an input of shape '
            f'{tuple(x.shape)} into {tuple(y.shape)}. A block with a stride or a downsample shortcut '
            f'cannot be unrolled; put the downsampling outside the unrolled block.')


def unroll(
        block: nn.Module,
        steps: int,
        bn_sharing: str = 'independent',
        share_weights: bool = True,
        before_step: Optional[Mapping[int, nn.Module]] = None,
        drop_path: Optional[Union[float, Sequence[float]]] = None,
) -> Unrolled:
    """ Turn a shape-preserving residual block into a recurrent one applied `steps` times.

    Args:
        block: any module whose output has its input's shape (timm's or torchvision's BasicBlock or
            Bottleneck without downsample, a user's own). It becomes step 0 and is modified in place
            for ``bn_sharing="none"`` (its BN layers are replaced by nn.Identity).
        steps: number of unrolled steps, >= 1.
        bn_sharing: "independent" (own BN layers per step, the paper's choice), "shared" (one set of
            BN layers for all steps) or "none" (BN layers removed).
        share_weights: False gives every step its own, freshly initialised, weights: the plain
            network with the same computational graph (the paper's ResNet-10/18).
        before_step: {step index: module} applied to the input of that (0-based) step, e.g.
            ``{2: nn.AvgPool2d(2)}`` pools between the 2nd and 3rd step.
        drop_path: stochastic depth per step: one rate for all steps or a sequence of `steps` rates.
            Step i's `drop_path` attribute (timm's convention: ``BasicBlock``, ``Bottleneck``,
            ``PreActBasicBlock`` apply it to the residual branch) becomes its own ``DropPath(rate_i)``
            (where the rate is 0: None if the block's was None, else nn.Identity), so each step drops
            its branch independently. Every step is then its own shallow copy of the block, whatever
            `bn_sharing`; DropPath holds no tensors, so the parameters and the state_dict are those
            without it. None (the default) leaves the block's `drop_path` as it is.

    Every torch.nn BatchNorm (BatchNorm1d/2d/3d, SyncBatchNorm, subclasses such as timm's
    BatchNormAct2d) anywhere in the block counts as a BN layer. With "none", an in-place op right
    after a BN layer then acts on that layer's input: in a pre-activation block (BN-ReLU first) make
    that first activation not in place, or it overwrites the shortcut.
    """
    if not isinstance(block, nn.Module):
        raise TypeError(f'unroll() takes an nn.Module block, got {type(block).__name__}')
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f'unroll() needs steps >= 1 (an int), got {steps!r}')
    if bn_sharing not in BN_SHARING:
        raise ValueError(f'unknown bn_sharing {bn_sharing!r}; valid values: {", ".join(map(repr, BN_SHARING))}')
    downsample = getattr(block, 'downsample', None)
    if not _is_identity_shortcut(downsample):
        raise ValueError(
            f'unroll() needs a shape-preserving block with an identity shortcut, but this '
            f'{type(block).__name__} has a downsample shortcut ({_describe(downsample)}): it was built with '
            f'a stride or a change of channels. Unroll a block built with stride 1 and as many output as '
            f'input channels (its downsample then is None or nn.Identity).')
    rates = _drop_path_rates(drop_path, steps)
    if rates is not None and not hasattr(block, 'drop_path'):
        raise ValueError(
            f'unroll(drop_path=...) sets each step\'s `drop_path` module, but this {type(block).__name__} '
            f'has no `drop_path` attribute; build the block with one (timm\'s blocks and '
            f'timm_rc.PreActBasicBlock take drop_path=) or leave drop_path=None.')
    before_step = dict(before_step or {})
    bad = [k for k in before_step if not isinstance(k, int) or not 0 <= k < steps]
    if bad:
        raise ValueError(f'before_step keys must be step indices in [0, {steps - 1}], got {bad}')

    if bn_sharing == 'none':
        _replace_bn(block)
    has_bn = any(_is_bn(m) for m in block.modules())

    if share_weights and (bn_sharing != 'independent' or not has_bn) and rates is None:
        step_modules = [block] * steps  # one module applied `steps` times
    else:
        # deepcopy with a memo that maps the shared objects to themselves: those are referenced,
        # everything else (the BN layers, and the containers above them) is copied; the block
        # itself is always copied, so that every step can hold its own drop_path
        shared = []
        if share_weights:
            shared += [m for m in _bn_free_modules(block) if m is not block]
            # tensors held directly by containers that also hold BN (e.g. a layer-scale gamma)
            shared += [t for m in block.modules() if not _is_bn(m) for t in m._parameters.values()]
            shared += [t for m in block.modules() if not _is_bn(m) for t in m._buffers.values()]
        if bn_sharing == 'shared':
            shared += [m for m in block.modules() if _is_bn(m)]
        step_modules = [block]
        for _ in range(steps - 1):
            memo = {id(o): o for o in shared if o is not None}
            step = copy.deepcopy(block, memo)
            if not share_weights:
                _reset_parameters(step)
            step_modules.append(step)
        if rates is not None:
            # rate 0: what the block had without drop path (None in timm's ResNet blocks, which test
            # for None; nn.Identity in blocks that call drop_path unconditionally, e.g. ConvNeXt's)
            off = None if block.drop_path is None else nn.Identity
            for step, rate in zip(step_modules, rates):
                step.drop_path = DropPath(rate) if rate > 0 else (off() if off else None)

    before = [before_step.get(i, nn.Identity()) for i in range(steps)]
    return Unrolled(step_modules, before, bn_sharing=bn_sharing, share_weights=share_weights)
