""" Unrolled (recurrent) residual blocks with per-step BatchNorm

`unroll(block, steps)` turns any shape-preserving residual block into a recurrent-convolution (RC)
cell: the block is applied `steps` times in a row, h_{i+1} = f_w(h_i), with one set of weights.
What happens to the block's normalisation layers (BatchNorm, and every other norm: GroupNorm, LayerNorm,
InstanceNorm, RMSNorm, timm's norm layers; `is_norm`) is chosen with `bn_sharing`:

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

Running k' steps (the extended version's cost-adjustable inference): ``cell.set_steps(k')`` makes a
cell built with k steps run k' steps. The BN layers of the executed steps come from the trained steps
by ``bn_policy`` (see `step_map`): ``"first"`` runs trained step min(j, k-1) as step j (the first k'
when fewer, the last one again when more, as recurrent BN does for longer sequences) and ``"spread"``
runs trained step round(j (k-1) / (k'-1)) (the first and the last trained step always serve, the
others evenly in between). ``set_steps(k)`` gives back the trained cell exactly. A cell with unshared
weights cannot run more steps than it has.

Relaxed sharing (``rank=r``): every convolution and linear layer the steps share gets, at each step, its
own rank-r correction in convolution form, ``W x + B_i(A_i(x))`` (`LowRankCorrected`; Bae et al., "Relaxed
Recursive Transformers", ICLR 2025, for convolutions): A_i is a k x k convolution from C_in to r channels
with the layer's stride, padding and dilation, B_i a 1 x 1 convolution from r to C_out, no bias, so
r (C_in k^2 + C_out) parameters and as many multiply-adds per output pixel per step (a linear layer:
r (in + out)). r is capped at the layer's full rank, min(C_out, C_in k^2); grouped (depthwise)
convolutions get no correction. From scratch B_i starts at zero (LoRA's rule): the cell starts as the
strictly shared one. The base weight stays one shared tensor; the corrections follow the steps exactly
as the BN layers do (`set_steps`, `bn_policy`, BN groups share step i's correction). `merge_corrections`
folds each step's correction into a plain per-step weight (an unshared cell) for export.

Reference: Zhang & Jung, "Recurrent Convolutions: A Model Compression Point of View", NeurIPS 2018
workshop on compact deep networks (extended: arXiv 1902.09809).
"""
import copy
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from timm.layers import DropPath

__all__ = ['BN_SHARING', 'BN_POLICIES', 'DEFAULT_BN_POLICY', 'Unrolled', 'unroll', 'step_map', 'is_norm', 'NORM_LAYERS',
           'register_norm_layer', 'LowRankCorrected', 'correctable', 'correction_rank', 'merge_corrections']

BN_SHARING = ('independent', 'shared', 'none')
BN_POLICIES = ('first', 'spread')
# Chosen by measurement (issue 8; width-8 RC-4 and RC-2 trained 8 epochs on 10,000 CIFAR-10 images,
# top-1 error on 5,000 test images, 'first' / 'spread'): with more steps than trained 'spread' wins at
# every k' (RC-2 at k'=4: 78.9 / 68.0 %, k'=8: 90.2 / 85.9 %; RC-4 at k'=6: 56.0 / 54.7 %, k'=8: 63.7 /
# 61.6 %); with fewer neither wins everywhere (RC-4 at k'=2: 67.5 / 63.8 %, k'=3: 57.9 / 63.4 %).
DEFAULT_BN_POLICY = 'spread'


def _norm_layers() -> Tuple[type, ...]:
    from timm.layers import norm, norm_act
    from torch.nn.modules.instancenorm import _InstanceNorm
    layers = [_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.LocalResponseNorm,
              norm.RmsNorm, norm.RmsNorm2d, norm.SimpleNorm, norm.SimpleNorm2d, norm_act.FrozenBatchNorm2d,
              norm_act.FrozenBatchNormAct2d]
    try:
        from torchvision.ops import FrozenBatchNorm2d
        layers.append(FrozenBatchNorm2d)
    except ImportError:  # torchvision is optional here
        pass
    return layers


# The normalisation layers `bn_sharing` applies to: the paper's argument (each step's statistics and affine
# parameters differ) holds for the affine parameters of any norm, so each step gets its own copy of every one
NORM_LAYERS = _norm_layers()


def register_norm_layer(cls: type) -> type:
    """ Make `unroll` (and `convert_to_rc`) treat `cls` as a norm layer: one copy per step with
    bn_sharing='independent', one for all with 'shared', removed with 'none'. Usable as a decorator. """
    if cls not in NORM_LAYERS:
        NORM_LAYERS.append(cls)
    return cls


def is_norm(module: nn.Module) -> bool:
    """ Whether `module` is a normalisation layer that `bn_sharing` applies to (`NORM_LAYERS`: torch's
    BatchNorm/SyncBatchNorm/InstanceNorm/GroupNorm/LayerNorm/RMSNorm, timm's norm and norm-act layers,
    frozen BN). """
    return isinstance(module, tuple(NORM_LAYERS))


_is_bn = is_norm  # the name the rest of this module uses


def _unknown_norms(block: nn.Module) -> List[str]:
    """ Modules that look like norm layers (a class name with 'Norm', tensors of their own) but are not
    `NORM_LAYERS`: unroll cannot tell which of their tensors are per step. """
    return [f'{name or "(the block)"} ({type(m).__name__})' for name, m in block.named_modules()
            if 'Norm' in type(m).__name__ and not is_norm(m)
            and (any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)))]


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


def _without_norm(norm_layer: nn.Module) -> nn.Module:
    """ What stands in for a removed norm layer: nn.Identity, or for a norm-act layer (timm's BatchNormAct2d,
    GroupNormAct, ...) its dropout and activation, which are not normalisation. """
    parts = [m for m in (getattr(norm_layer, 'drop', None), getattr(norm_layer, 'act', None))
             if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    return nn.Sequential(*parts) if len(parts) > 1 else parts[0] if parts else nn.Identity()


def _replace_bn(module: nn.Module) -> int:
    """ Replace every norm layer below `module` (`_without_norm`), in place. Returns how many. """
    count = 0
    for name, child in module.named_children():
        if _is_bn(child):
            setattr(module, name, _without_norm(child))
            count += 1
        else:
            count += _replace_bn(child)
    return count


def _reset_parameters(module: nn.Module) -> None:
    for m in module.modules():
        if not _is_bn(m) and callable(getattr(m, 'reset_parameters', None)):
            m.reset_parameters()


def step_map(run_steps: int, trained_steps: int, bn_policy: Union[str, Sequence[int]] = 'spread') -> List[int]:
    """ The trained step (0-based) whose BN layers serve each of `run_steps` executed steps.

    ``"first"``: step j runs trained step min(j, k - 1): the first k' steps when k' < k, the last
    trained step again for the extra steps when k' > k (recurrent BN's rule, Cooijmans et al. 2016).
    ``"spread"``: step j runs trained step round(j (k - 1) / (k' - 1)) (halves up; k' = 1 runs step
    0): the first and the last trained steps always serve and the others are spread evenly, so for
    k' > k each trained step serves a run of consecutive steps. Both give 0..k-1 for k' = k. A
    sequence of k' indices is taken as the map itself.
    """
    k, n = trained_steps, run_steps
    if isinstance(bn_policy, str):
        if bn_policy == 'first':
            return [min(j, k - 1) for j in range(n)]
        if bn_policy == 'spread':
            return [0] * n if n == 1 else [(2 * j * (k - 1) + n - 1) // (2 * (n - 1)) for j in range(n)]
        raise ValueError(f'unknown bn_policy {bn_policy!r}; valid values: {", ".join(map(repr, BN_POLICIES))}, '
                         f'or a list of {n} trained step indices')
    indices = list(bn_policy)
    if len(indices) != n or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < k for i in indices):
        raise ValueError(f'bn_policy as a list needs {n} trained step indices in [0, {k - 1}] (one per executed '
                         f'step), got {bn_policy!r}')
    return indices


class Unrolled(nn.Module):
    """ A block applied `num_steps` times in a row (`active_steps` after `set_steps`); build it with `unroll()`.

    Attributes:
        steps: one module per trained step; step 0 is the original block, later steps share its
            non-BN modules (or everything, for ``bn_sharing`` "shared"/"none"). With ``bn_groups``
            G > 1 it holds G groups of `num_steps` modules: module g * num_steps + i is step i of
            BN group g (all groups share step i's non-BN modules).
        before_step: modules applied to the input of the step of the same index (nn.Identity
            where nothing is), for example the RC cells' AvgPool between two steps.
        plan: what `forward` runs (set by `set_steps`): per executed step, the indices of the
            `before_step` modules applied to its input and the index of its module in `steps`.
    """
    __jit_unused_properties__ = ['num_steps', 'active_steps']

    def __init__(
            self,
            steps: List[nn.Module],
            before_step: List[nn.Module],
            bn_sharing: str,
            share_weights: bool,
            bn_groups: int = 1,
    ):
        super().__init__()
        self.bn_sharing = bn_sharing
        self.share_weights = share_weights
        self.bn_groups = bn_groups
        self.steps = nn.ModuleList(steps)
        self.before_step = nn.ModuleList(before_step)
        self.plan = []  # [(before_step indices, steps index)] per executed step; set_steps fills it
        self.bn_group = 0
        self.rank = 0  # per-step low-rank corrections of the shared layers (unroll's rank)
        self.register_state_dict_post_hook(_drop_aliases)
        self.register_load_state_dict_pre_hook(_fill_aliases)
        self.set_steps(self.num_steps)

    @property
    def num_steps(self) -> int:
        """ Trained steps k: the cell's own graph (BN layers for k steps per group). """
        return len(self.before_step)

    @property
    def active_steps(self) -> int:
        """ Steps `forward` runs now (`set_steps`); `num_steps` unless changed. """
        return len(self.plan)

    def set_steps(
            self,
            steps: int,
            bn_policy: Optional[Union[str, Sequence[int]]] = None,
            group: int = 0,
            before_step: Optional[Mapping[int, int]] = None,
    ) -> 'Unrolled':
        """ Run `steps` (k') steps from now on; `set_steps(num_steps)` gives back the trained cell exactly.

        Args:
            steps: executed steps k' >= 1; with unshared weights at most `num_steps`.
            bn_policy: which trained step's modules (BN layers, and weights when unshared) serve each
                executed step: 'spread' or 'first' (see `step_map`), or a list of k' trained indices;
                None: `DEFAULT_BN_POLICY`.
            group: the BN group (``bn_groups`` > 1) whose steps serve.
            before_step: {executed step: trained index of the `before_step` module applied to its
                input}. Default: the module at trained index i goes before executed step
                floor(i k' / k) (the RC cells pass their own rule, floor(k'/2)).
        Returns self.
        """
        k = self.num_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f'set_steps() needs steps >= 1 (an int), got {steps!r}')
        if not self.share_weights and steps > k:
            raise ValueError(f'this cell has unshared weights for {k} steps and cannot run {steps}: with unshared '
                             f'weights every step needs its own weights; run at most {k} steps')
        if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < self.bn_groups:
            raise ValueError(f'group must be a BN group index in [0, {self.bn_groups - 1}], got {group!r}')
        indices = step_map(steps, k, DEFAULT_BN_POLICY if bn_policy is None else bn_policy)
        if before_step is None:
            before_step = {i * steps // k: i for i, m in enumerate(self.before_step) if not isinstance(m, nn.Identity)}
        bad = {j: i for j, i in before_step.items() if not (0 <= j < steps and 0 <= i < k)}
        if bad:
            raise ValueError(f'before_step maps executed steps in [0, {steps - 1}] to trained indices in '
                             f'[0, {k - 1}], got {bad}')
        pres = [[] for _ in range(steps)]
        for j, i in sorted(before_step.items()):
            pres[j].append(i)
        self.plan = [(pres[j], group * k + indices[j]) for j in range(steps)]
        self.bn_group = group
        return self

    def step_map(self) -> List[int]:
        """ The trained step (within the BN group) each executed step runs, e.g. [0, 3] for 2 of 4 spread. """
        k = self.num_steps
        return [s % k for _, s in self.plan]

    def executed(self) -> List[Tuple[List[nn.Module], nn.Module]]:
        """ (modules before it, step module) for every step `forward` runs, in order. """
        return [([self.before_step[b] for b in pres], self.steps[s]) for pres, s in self.plan]

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
        if torch.jit.is_scripting():
            # TorchScript cannot index a ModuleList at run time: a scripted cell runs its trained steps
            for pre, step in zip(self.before_step, self.steps):
                x = step(pre(x))
        else:
            for i, (pres, step) in enumerate(self.executed()):
                for pre in pres:
                    x = pre(x)
                y = step(x)
                _check_shape(x, y, i)
                x = y
        return x

    def extra_repr(self) -> str:
        text = f'num_steps={self.num_steps}, bn_sharing={self.bn_sharing!r}, share_weights={self.share_weights}'
        if self.bn_groups > 1:
            text += f', bn_groups={self.bn_groups}'
        if self.rank:
            text += f', rank={self.rank}'
        if self.active_steps != self.num_steps or self.bn_group or self.step_map() != list(range(self.num_steps)):
            text += f', active_steps={self.active_steps}, step_map={self.step_map()}, bn_group={self.bn_group}'
        return text


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
    # a weights file lists each shared tensor once (under its first step); one that holds other values for a
    # later step's copy is a network with unshared weights, whose tensors would overwrite one another here
    differing = []
    for alias, source in module.aliases().items():
        if prefix + alias not in state_dict:
            if prefix + source in state_dict:
                state_dict[prefix + alias] = state_dict[prefix + source]
        elif prefix + source in state_dict and not _same_tensor(state_dict[prefix + alias], state_dict[prefix + source]):
            differing.append(prefix + alias)
    if differing:
        error_msgs.append(
            f'{len(differing)} tensor(s) such as {differing[0]} hold other values than the weights that '
            f'{prefix.rstrip(".") or "the cell"} shares across its steps (under {prefix}steps.0): these weights are of a network '
            f'with unshared weights (e.g. rc4_unshared_cifar); load them into that network, or convert them with '
            f'timm_rc.convert_to_rc / python -m timm_rc convert')


def _same_tensor(a, b) -> bool:
    return a.shape == b.shape and (a is b or torch.equal(a.detach().cpu(), b.detach().cpu()))


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
        bn_groups: int = 1,
        rank: Optional[int] = None,
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
        bn_groups: G > 1 (with "independent" only) keeps G independent sets of per-step BN layers,
            chosen at run time with ``set_steps(k, group=g)``; the groups share every non-BN module
            of each step (the RC cells' "double independent" BN, indexed by the upstream cell's
            step count). In the state_dict, step i of group g is ``steps.{g * steps + i}``.
        rank: r > 0 gives every shared convolution and linear layer of the block a rank-r correction per step
            (relaxed sharing, see the module docstring): in the state_dict the shared weight is
            ``steps.0.<layer>.base.weight`` and step i's correction ``steps.{i}.<layer>.lora_a.weight`` /
            ``lora_b.weight``. None or 0: strict sharing (the same network, keys and outputs as without it).

    Every normalisation layer anywhere in the block counts as a "BN layer" here (`is_norm`: torch's
    BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm, timm's norm and norm-act
    layers such as BatchNormAct2d, LayerNorm2d, GroupNormAct, frozen BN); a module that looks like a norm
    layer but is none of these is refused. With "none" a norm-act layer keeps its activation (and
    dropout), the normalisation goes. With "none", an in-place op right
    after a BN layer then acts on that layer's input: in a pre-activation block (BN-ReLU first) make
    that first activation not in place, or it overwrites the shortcut.
    """
    if not isinstance(block, nn.Module):
        raise TypeError(f'unroll() takes an nn.Module block, got {type(block).__name__}')
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f'unroll() needs steps >= 1 (an int), got {steps!r}')
    if bn_sharing not in BN_SHARING:
        raise ValueError(f'unknown bn_sharing {bn_sharing!r}; valid values: {", ".join(map(repr, BN_SHARING))}')
    if isinstance(bn_groups, bool) or not isinstance(bn_groups, int) or bn_groups < 1:
        raise ValueError(f'unroll() needs bn_groups >= 1 (an int), got {bn_groups!r}')
    if bn_groups > 1 and bn_sharing != 'independent':
        raise ValueError(f"bn_groups > 1 keeps several sets of per-step BN layers and needs bn_sharing='independent', "
                         f"got {bn_sharing!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
        raise ValueError(f'unroll() needs rank >= 0 (an int; 0 or None: no correction), got {rank!r}')
    rank = rank or 0
    if rank and not share_weights:
        raise ValueError('rank > 0 adds per-step corrections to shared weights; with share_weights=False every step '
                         'has its own weights already: drop rank')
    unknown = _unknown_norms(block)
    if unknown:
        raise ValueError(f'unroll() does not know the norm layer(s) {", ".join(unknown)}: bn_sharing gives each step its '
                         f'own copy of every norm layer (or shares or removes them), and applies to torch\'s BatchNorm, '
                         f'InstanceNorm, GroupNorm, LayerNorm, RMSNorm and timm\'s norm layers; build the block with one '
                         f'of those, or register its class with timm_rc.layers.register_norm_layer')
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

    targets = [layer for _, _, layer in _correctable_children(block)] if rank else []
    if share_weights and (bn_sharing != 'independent' or not has_bn) and rates is None and not targets:
        step_modules = [block] * steps  # one module applied `steps` times
    else:
        # deepcopy with a memo that maps the shared objects to themselves: those are referenced,
        # everything else (the BN layers, and the containers above them) is copied; the block
        # itself is always copied, so that every step can hold its own drop_path
        shared = []
        if share_weights:
            # with corrections the containers of the corrected layers are copied per step (each holds its own
            # correction); the layers themselves stay shared
            holds_target = {id(m) for m in block.modules()
                            if any(t is not m and any(t is d for d in m.modules()) for t in targets)}
            shared += [m for m in _bn_free_modules(block) if m is not block and id(m) not in holds_target]
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
        if targets:
            for step in step_modules:
                _add_corrections(step, rank)

    if bn_groups > 1:
        # further BN groups: copies of each step that share everything of it but its BN layers
        groups = []
        for _ in range(bn_groups - 1):
            groups += [copy.deepcopy(step, {id(o): o for o in _shared_objects(step)}) for step in step_modules]
        step_modules = step_modules + groups

    before = [before_step.get(i, nn.Identity()) for i in range(steps)]
    cell = Unrolled(step_modules, before, bn_sharing=bn_sharing, share_weights=share_weights, bn_groups=bn_groups)
    cell.rank = rank
    return cell


# ---- relaxed sharing: per-step low-rank corrections ------------------------------------------


def correctable(module: nn.Module) -> bool:
    """ Whether `module` gets a per-step correction with rank > 0: a 1-3-D convolution of one group, or a
    linear layer. """
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.groups == 1 and not module.transposed
    return isinstance(module, nn.Linear)


def correction_rank(module: nn.Module, rank: int) -> int:
    """ `rank` capped at the layer's full rank: min(C_out, C_in k^2) for a convolution, min(out, in) for a
    linear layer. """
    if isinstance(module, nn.Linear):
        return min(rank, module.in_features, module.out_features)
    fan_in = module.in_channels * math.prod(module.kernel_size)
    return min(rank, module.out_channels, fan_in)


class LowRankCorrected(nn.Module):
    """ A shared layer (`base`, the same module in every step) plus this step's rank-r correction:
    ``base(x) + lora_b(lora_a(x))``. For a convolution `lora_a` is a convolution of the base's kernel, stride,
    padding and dilation from C_in to r channels and `lora_b` a 1 x 1 convolution from r to C_out; for a
    linear layer two linear layers; neither has a bias. `lora_b` starts at zero. """

    def __init__(self, base: nn.Module, rank: int):
        super().__init__()
        if not correctable(base):
            raise ValueError(f'LowRankCorrected takes a convolution of one group or a linear layer, got {_describe(base)}')
        r = correction_rank(base, rank)
        if r < 1:
            raise ValueError(f'LowRankCorrected needs rank >= 1, got {rank}')
        self.base = base
        self.rank = r
        w = base.weight
        factory = dict(device=w.device, dtype=w.dtype)
        if isinstance(base, nn.Linear):
            self.lora_a = nn.Linear(base.in_features, r, bias=False, **factory)
            self.lora_b = nn.Linear(r, base.out_features, bias=False, **factory)
        else:
            conv = type(base)
            self.lora_a = conv(base.in_channels, r, base.kernel_size, stride=base.stride, padding=base.padding,
                               dilation=base.dilation, bias=False, padding_mode=base.padding_mode, **factory)
            self.lora_b = conv(r, base.out_channels, 1, bias=False, **factory)
        nn.init.zeros_(self.lora_b.weight)

    def delta_weight(self) -> torch.Tensor:
        """ The correction as a weight of the base's shape: B A (per kernel position for a convolution). """
        b = self.lora_b.weight.reshape(self.lora_b.weight.shape[0], self.rank)
        a = self.lora_a.weight
        return (b @ a.reshape(self.rank, -1)).reshape(self.base.weight.shape)

    def set_delta(self, delta: torch.Tensor) -> None:
        """ Set A and B to the best rank-r approximation of `delta` (a weight of the base's shape), from its
        truncated SVD: B = U_r S_r^(1/2), A = S_r^(1/2) V_r^T. Exact when r is the layer's full rank. """
        out = delta.shape[0]
        matrix = delta.detach().reshape(out, -1).double()
        u, sv, vh = torch.linalg.svd(matrix, full_matrices=False)
        root = sv[:self.rank].sqrt()
        with torch.no_grad():
            self.lora_b.weight.copy_((u[:, :self.rank] * root).reshape(self.lora_b.weight.shape))
            self.lora_a.weight.copy_((root[:, None] * vh[:self.rank]).reshape(self.lora_a.weight.shape))

    def merged(self) -> nn.Module:
        """ A plain layer like `base` (a copy) whose weight is the base's plus this step's correction. """
        layer = copy.deepcopy(self.base)
        with torch.no_grad():
            layer.weight.add_(self.delta_weight())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x))

    def extra_repr(self) -> str:
        return f'rank={self.rank}'


def _correctable_children(module: nn.Module) -> List[Tuple[nn.Module, str, nn.Module]]:
    """ (parent, attribute, layer) of every correctable layer below `module`, outside its norm layers. """
    out = []
    for parent in module.modules():
        if _is_bn(parent) or isinstance(parent, LowRankCorrected):
            continue
        for name, child in parent.named_children():
            if correctable(child):
                out.append((parent, name, child))
    return out


def _add_corrections(step: nn.Module, rank: int) -> None:
    for parent, name, layer in _correctable_children(step):
        setattr(parent, name, LowRankCorrected(layer, rank))


def merge_corrections(model: nn.Module) -> nn.Module:
    """ Fold every step's low-rank correction into a plain per-step weight, in place: each `Unrolled` cell with
    corrections becomes a cell with unshared weights (step i's layer: base + B_i A_i), whose state_dict is that
    of the unshared network of the same graph (e.g. rc4_unshared_cifar for rc4_cifar with rank > 0). The
    outputs stay the same (to float rounding). Returns `model`. """
    for cell in [m for m in model.modules() if isinstance(m, Unrolled)]:
        merged = False
        for step in cell.steps:
            for parent in list(step.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, LowRankCorrected):
                        setattr(parent, name, child.merged())
                        merged = True
        if merged:
            cell.share_weights = False
            cell.rank = 0
    if hasattr(model, 'rank') and not isinstance(model, Unrolled):
        model.rank = 0
        if hasattr(model, 'share_weights'):
            model.share_weights = False
    return model


def _shared_objects(block: nn.Module) -> List[object]:
    """ What copies of `block` that differ only in their BN layers share with it: the BN-free
    submodules and the tensors held directly by the containers above the BN layers. """
    shared: List[object] = [m for m in _bn_free_modules(block) if m is not block]
    shared += [t for m in block.modules() if not _is_bn(m) for t in m._parameters.values() if t is not None]
    shared += [t for m in block.modules() if not _is_bn(m) for t in m._buffers.values() if t is not None]
    return shared
