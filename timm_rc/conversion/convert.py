""" `convert_to_rc`: turn a built network (timm's, torchvision's, a user's own) into an RC network.

Every maximal run of two or more consecutive children of an `nn.Sequential` that are blocks with
parameters, shape-preserving (measured: one forward pass of a zero image records each child's input and
output shapes) and structurally identical (same type, same parameter and buffer names and shapes, same
layer hyper-parameters: the modules' reprs, stochastic-depth rates aside) becomes one `Unrolled` cell:

* its shared weights are those of the run's first block (`init='first'`), or the mean of the run's blocks,
  tensor by tensor (`init='average'`, as Bae et al. 2025 found best for tied transformer layers; measured
  for the RC networks in docs/compression.md);
* step i keeps a copy of block i's BN layers (`bn_sharing="independent"`), so a trained network converts
  with its own per-block statistics; "shared" keeps the first block's BN for every step, "none" drops them;
* `steps` (an int for every run, or one per run) unrolls a run more or fewer times than it had blocks; the
  BN layers of the blocks then serve the steps by `bn_policy` (`timm_rc.step_map`: 'spread' by default);
* a block's stochastic depth (`drop_path`, timm's convention) stays per step.

    model = timm.create_model('resnet50')                 # 25,557,032 params
    model = timm_rc.convert_to_rc(model, return_report=False)   # in place; 16,017,448 params
    print(model.rc_conversion)                            # what was shared

`convert_to_rc` converts in place and sets `model.rc_conversion` (an `RCConversion`). It returns that report
today (as in 0.2.0, with a FutureWarning); from timm_rc 0.4 it returns the model, as timm's model surgery does
(`convert_sync_batchnorm`). `return_report=False` gives the model now, `return_report=True` the report, either
without the warning.

The state_dict then lists each shared tensor once (under the cell's `steps.0`), so safetensors files hold it
once. `RCConversion` says which runs were shared and the parameter counts; a network with nothing to share is
left as it was, with a warning.
"""
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from timm.layers import DropPath

from ..layers.unroll import BN_SHARING, DEFAULT_BN_POLICY, LowRankCorrected, Unrolled, correctable, is_norm, step_map, \
    unroll

__all__ = ['convert_to_rc', 'RCConversion', 'SharedRun', 'find_runs', 'INITS']

# how the shared weights of a cell come from the blocks it replaces
INITS = ('first', 'average')


@dataclass
class SharedRun:
    """ One run of identical blocks that became an `Unrolled` cell. """
    container: str  # the nn.Sequential's name, e.g. 'layer3'
    blocks: List[str]  # the children's names in it, e.g. ['1', '2', '3', '4', '5']
    block_type: str
    steps: int  # unrolled steps of the cell
    params_before: int
    params_after: int

    @property
    def name(self) -> str:
        return f'{self.container}.{self.blocks[0]}' if self.container else self.blocks[0]


@dataclass
class RCConversion:
    """ What `convert_to_rc` did: `runs` (one `SharedRun` per cell), and the parameter counts. """
    runs: List[SharedRun] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    bn_sharing: str = 'independent'
    init: str = 'first'
    rank: int = 0  # per-step low-rank corrections (0: strict sharing)

    @property
    def compression(self) -> float:
        return self.params_before / max(self.params_after, 1)

    def __str__(self) -> str:
        if not self.runs:
            return f'convert_to_rc: nothing to share ({self.params_before:,} params)'
        runs = f'{len(self.runs)} run{"s" * (len(self.runs) != 1)}'
        rank = f', rank={self.rank}' if self.rank else ''
        lines = [f'convert_to_rc (bn_sharing={self.bn_sharing!r}, init={self.init!r}{rank}): {runs} of identical blocks shared, '
                 f'{self.params_before:,} -> {self.params_after:,} params ({self.compression:.2f}x fewer)']
        width = max(len(r.container or '(top)') for r in self.runs)
        spans = [f'{r.blocks[0]}..{r.blocks[-1]}' if len(r.blocks) > 1 else r.blocks[0] for r in self.runs]
        span_width = max(len(b) for b in spans)
        type_width = max(len(r.block_type) for r in self.runs)
        for r, blocks in zip(self.runs, spans):
            lines.append(f'  {(r.container or "(top)"):<{width}}  blocks {blocks:<{span_width}}  {len(r.blocks)} x '
                         f'{r.block_type:<{type_width}}  -> 1 cell, {r.steps} steps  {r.params_before:>12,} -> '
                         f'{r.params_after:,} params')
        return '\n'.join(lines)

    __repr__ = __str__


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_bn(m: nn.Module) -> bool:
    return is_norm(m)  # every norm layer: the one rule of timm_rc.unroll


_DROP = re.compile(r'DropPath\(drop_prob=[0-9.e-]+\)|drop_prob=[0-9.e-]+')


def _signature(block: nn.Module) -> Tuple:
    """ What must be equal for two blocks to share weights: type, tensor names and shapes, hyper-parameters. """
    tensors = tuple((n, tuple(t.shape), t.dtype) for n, t in block.state_dict(keep_vars=True).items())
    return type(block), tensors, _DROP.sub('DropPath', repr(block))


def _probe_shapes(model: nn.Module, input_size: Sequence[int]) -> Dict[int, Tuple[tuple, tuple]]:
    """ id(child) -> (input shape, output shape) for every child of every nn.Sequential, from one forward
    pass of a zero image in eval mode (single-tensor inputs and outputs only). """
    shapes: Dict[int, Tuple[tuple, tuple]] = {}
    handles = []

    def hook(module, args, output):
        if len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            shapes.setdefault(id(module), (tuple(args[0].shape), tuple(output.shape)))

    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            for child in seq.children():
                handles.append(child.register_forward_hook(hook))
    was_training = model.training
    ref = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=ref.device, dtype=ref.dtype))
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f'convert_to_rc() could not run {type(model).__name__} on a zero image of size '
                         f'{tuple(input_size)} to find its shape-preserving blocks ({type(e).__name__}: '
                         f'{str(e).splitlines()[0] if str(e) else ""}); pass the input_size (C, H, W) it takes') from None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def find_runs(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> List[Tuple[str, nn.Sequential, List[str]]]:
    """ (container name, container, child names) of every maximal run of >= 2 consecutive children of an
    nn.Sequential that are shape-preserving, structurally identical blocks with parameters. Runs nested in
    the blocks of an outer run are not listed (the outer run shares them already). """
    input_size = _input_size(model, input_size)
    shapes = _probe_shapes(model, input_size)
    runs = []
    inside: set = set()  # ids of modules within a selected run's blocks
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or id(seq) in inside:
            continue
        current: List[str] = []
        current_sig = None
        children = list(seq.named_children())

        def close():
            if len(current) >= 2:
                runs.append((name, seq, list(current)))
                for child_name in current:
                    inside.update(id(m) for m in seq._modules[child_name].modules())

        for child_name, child in children:
            shape = shapes.get(id(child))
            ok = (shape is not None and shape[0] == shape[1] and _params(child) > 0 and not isinstance(child, Unrolled))
            sig = _signature(child) if ok else None
            if ok and current and sig == current_sig:
                current.append(child_name)
                continue
            close()
            current, current_sig = ([child_name], sig) if ok else ([], None)
        close()
    return runs


DEFAULT_IMAGE_SIDE = 224  # the probe image of a 2-D network without a pretrained_cfg (e.g. torchvision's)


def _input_size(model: nn.Module, input_size: Optional[Sequence[int]]) -> Tuple[int, ...]:
    """ The probe's input: the given size, the model's pretrained_cfg input_size, or, for a network whose first
    layer is a 2-D convolution (torchvision's), a 224 x 224 image of its channels: the probe only finds which
    blocks keep their shape, which does not depend on the image size for a convolutional network. """
    if input_size is None:
        input_size = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size')
    if input_size is None:
        first = next((m for m in model.modules() if any(True for _ in m.parameters(recurse=False))), None)
        if isinstance(first, nn.Conv2d):
            return (first.in_channels, DEFAULT_IMAGE_SIDE, DEFAULT_IMAGE_SIDE)
        raise ValueError('convert_to_rc() needs input_size (C, H, W) to find the shape-preserving blocks: the model '
                         'has no pretrained_cfg input_size and does not start with a 2-D convolution; pass e.g. '
                         'input_size=(3, 224, 224)')
    return tuple(input_size)


def _steps_per_run(steps, n_runs: int) -> List[Optional[int]]:
    if steps is None:
        return [None] * n_runs
    if isinstance(steps, int) and not isinstance(steps, bool):
        per_run = [steps] * n_runs
    else:
        per_run = list(steps)
        if len(per_run) != n_runs:
            raise ValueError(f'steps has {len(per_run)} values but the network has {n_runs} runs of identical blocks '
                             f'to share; give one int for all of them or {n_runs} values (one per run, in order)')
    bad = [s for s in per_run if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if bad:
        raise ValueError(f'steps must be ints >= 1 (one for every run, or one per run), got {steps!r}')
    return per_run


def _drop_rates(blocks: List[nn.Module]) -> Optional[List[float]]:
    if not all(hasattr(b, 'drop_path') for b in blocks):
        return None
    rates = [float(b.drop_path.drop_prob) if isinstance(b.drop_path, DropPath) else 0.0 for b in blocks]
    return rates if any(rates) else None


def convert_to_rc(
        model: nn.Module,
        bn_sharing: str = 'independent',
        steps: Optional[Union[int, Sequence[int]]] = None,
        bn_policy: str = DEFAULT_BN_POLICY,
        input_size: Optional[Sequence[int]] = None,
        init: str = 'first',
        rank: Optional[int] = None,
        return_report: Optional[bool] = None,
) -> Union[RCConversion, nn.Module]:
    """ Turn `model` into an RC network, in place (see the module docstring); `model.rc_conversion` says what
    was shared. Returns the model with `return_report=False`, the report with True; None (today's default)
    returns the report with a FutureWarning: from timm_rc 0.4 the default returns the model.

    Args:
        model: a built network; its runs of identical blocks are found by one forward pass of a zero
            image of `input_size` (default: the model's `pretrained_cfg['input_size']`).
        bn_sharing: 'independent' (each step keeps its block's BN), 'shared' (the first block's BN for all
            steps) or 'none' (BN removed).
        steps: None (each run unrolls as many steps as it had blocks), an int for every run, or one int
            per run in the order `find_runs` lists them.
        bn_policy: with a run unrolled to another number of steps, which block's BN serves each step
            ('spread' or 'first', see `timm_rc.step_map`).
        init: the shared weights: 'first' (the run's first block's) or 'average' (each tensor the mean of that
            tensor over the run's blocks). The BN layers of step i stay those of block i either way.
        rank: r > 0 (relaxed sharing, `timm_rc.unroll`'s rank): step i's convolutions and linear layers get a
            rank-r correction initialised from the truncated SVD of (block i's weight - the shared weight), so
            that at full rank the network computes what it computed before (biases stay shared).
    """
    if return_report is not None and not isinstance(return_report, bool):
        raise TypeError(f'return_report takes True (the report), False (the model) or None, got {return_report!r}')
    if return_report is None:
        warnings.warn('convert_to_rc() returns the converted model from timm_rc 0.4, as timm\'s model surgery does '
                      '(model = convert_to_rc(model); the report is model.rc_conversion); pass return_report=False '
                      'for the model now, or return_report=True to keep the report, without this warning',
                      FutureWarning, stacklevel=2)
    report = _convert(model, bn_sharing, steps, bn_policy, input_size, init, rank)
    model.rc_conversion = report
    return model if return_report is False else report


def _convert(model: nn.Module, bn_sharing: str, steps, bn_policy: str, input_size, init: str,
             rank: Optional[int]) -> RCConversion:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
        raise ValueError(f'rank must be an int >= 0 (0 or None: strict sharing), got {rank!r}')
    if bn_sharing not in BN_SHARING:
        raise ValueError(f'unknown bn_sharing {bn_sharing!r}; valid values: {", ".join(map(repr, BN_SHARING))}')
    if init not in INITS:
        raise ValueError(f'unknown init {init!r}; valid values: {", ".join(map(repr, INITS))}')
    before = _params(model)
    cells = [(name, m) for name, m in model.named_modules()
             if isinstance(m, Unrolled) and not m.share_weights and m.bn_groups == 1]
    runs = find_runs(model, input_size)
    per_run = _steps_per_run(steps, len(cells) + len(runs))
    report = RCConversion(params_before=before, bn_sharing=bn_sharing, init=init, rank=rank or 0)
    for (name, cell), k in zip(cells, per_run[:len(cells)]):
        report.runs.append(_share_cell(model, name, cell, bn_sharing, k, init, rank))
    per_run = per_run[len(cells):]
    if cells and hasattr(model, 'share_weights'):
        model.share_weights = True  # RCNet: the network can now run more steps (set_steps)
        model.bn_sharing = bn_sharing
        if hasattr(model, 'rank'):
            model.rank = rank or 0
        if callable(getattr(model, 'set_steps', None)):
            model.set_steps(model.steps)
    if not runs and not cells:
        warnings.warn(f'convert_to_rc: {type(model).__name__} has no run of two or more identical shape-preserving '
                      f'blocks in an nn.Sequential; the model is unchanged')
        report.params_after = before
        return report
    for (name, seq, child_names), k in zip(runs, per_run):
        blocks = [seq._modules[c] for c in child_names]
        n = len(blocks)
        k = n if k is None else k
        params_before = sum(_params(b) for b in blocks)
        cell = _unroll_blocks(blocks, k, bn_sharing, bn_policy, init=init, rank=rank)
        new = OrderedDict()
        for child_name, child in seq._modules.items():
            if child_name == child_names[0]:
                new[child_name] = cell
            elif child_name not in child_names:
                new[child_name] = child
        seq._modules = new
        report.runs.append(SharedRun(container=name, blocks=child_names, block_type=type(blocks[0]).__name__, steps=k,
                                     params_before=params_before, params_after=_params(cell)))
    report.params_after = _params(model)
    return report


def _shared_tensors(block: nn.Module) -> Dict[str, torch.Tensor]:
    """ The block's parameters and persistent buffers outside its norm layers (what a cell shares), by name. """
    out = {}
    for mod_name, m in block.named_modules():
        if _is_bn(m) or any(_is_bn(parent) for parent in _parents(block, mod_name)):
            continue
        for t_name, t in list(m._parameters.items()) + [(n, b) for n, b in m._buffers.items()
                                                          if n not in m._non_persistent_buffers_set]:
            if t is not None:
                out[f'{mod_name}.{t_name}' if mod_name else t_name] = t
    return out


def _parents(block: nn.Module, name: str) -> List[nn.Module]:
    parts = name.split('.') if name else []
    return [block.get_submodule('.'.join(parts[:i])) for i in range(1, len(parts))]


def _unroll_blocks(blocks: List[nn.Module], k: int, bn_sharing: str, bn_policy: str = DEFAULT_BN_POLICY,
                   before_step: Optional[Dict[int, nn.Module]] = None, init: str = 'first',
                   rank: Optional[int] = None) -> Unrolled:
    """ One cell of `k` steps sharing the first block's weights (or their mean over the blocks, `init`); with
    'independent' BN, step j keeps a copy of the BN layers (and the drop-path rate) of the block
    `step_map(k, len(blocks), bn_policy)` names. """
    sources = step_map(k, len(blocks), bn_policy)
    # each block's own weights of the layers that get corrections, before the shared ones are chosen
    originals = [{name: m.weight.detach().clone() for name, m in b.named_modules() if correctable(m)}
                 for b in blocks] if rank else None
    if init == 'average':
        per_block = [_shared_tensors(b) for b in blocks]
        with torch.no_grad():
            for name, t in per_block[0].items():
                if t.is_floating_point():
                    t.copy_(torch.stack([tensors[name] for tensors in per_block]).mean(0))
    bn_states = [[m.state_dict() for m in b.modules() if _is_bn(m)] for b in blocks]
    rates = _drop_rates(blocks)
    cell = unroll(blocks[0], k, bn_sharing=bn_sharing, before_step=before_step,
                  drop_path=[rates[i] for i in sources] if rates is not None else None, rank=rank)
    if rank:
        for step, source in zip(cell.steps, sources):
            for name, m in step.named_modules():
                if isinstance(m, LowRankCorrected) and name in originals[source]:
                    m.set_delta(originals[source][name] - m.base.weight)
    if bn_sharing == 'independent':
        for step, source in zip(cell.steps, sources):
            for bn, state in zip([m for m in step.modules() if _is_bn(m)], bn_states[source]):
                bn.load_state_dict(state)
    return cell


def _share_cell(model: nn.Module, name: str, cell: Unrolled, bn_sharing: str, k: Optional[int],
                init: str = 'first', rank: Optional[int] = None) -> SharedRun:
    """ An `Unrolled` cell with unshared weights (RCNet's ResNet-10/18 graphs) -> a weight-shared one: step 0's
    weights for every step, each step keeping its own BN layers. """
    n = cell.num_steps
    if k is not None and k != n:
        raise ValueError(f'{name} is an unrolled cell of {n} steps; convert it at {n} steps (steps=None) and choose the '
                         f'steps to run afterwards (set_steps), not steps={k}')
    blocks = list(cell.steps)
    params_before = _params(cell)
    before_step = {i: m for i, m in enumerate(cell.before_step) if not isinstance(m, nn.Identity)}
    new = _unroll_blocks(blocks, n, bn_sharing, before_step=before_step, init=init, rank=rank)
    parent_name, _, attr = name.rpartition('.')
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return SharedRun(container=name, blocks=[f'steps.{i}' for i in range(n)], block_type=type(blocks[0]).__name__,
                     steps=n, params_before=params_before, params_after=_params(new))
