""" Per-step BatchNorm statistics of the RC cells (the paper's Figures 1(b), 3 and 4).

Each epoch the trainer saves, for every `Unrolled` cell, step and BN layer, the running mean and
variance and gamma (weight) and beta (bias) per channel to `bn_stats/epoch_NNNN.safetensors`, and logs
their channel means to the trackers. `python -m timm_rc plots` draws the figures from those files. A cell with
several BN groups (`bn_sharing='double'`: group g serves cell 2 after cell 1 ran g + 1 steps) names
them '<cell>.group<g>.step<i>...', which the plots draw as a cell of their own.
"""
from pathlib import Path
from typing import Dict

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..runs.checkpoints import usual_mode
from ..layers import Unrolled

__all__ = ['per_step_bn', 'bn_scalars', 'save_bn_stats', 'STATS']

STATS = ('running_mean', 'running_var', 'weight', 'bias')


def per_step_bn(model: nn.Module) -> Dict[str, torch.Tensor]:
    """ {'<cell>.step<i>.<bn path>.<stat>': float32 CPU tensor} for every per-step BN of every cell
    ('<cell>.group<g>.step<i>...' for a cell with several BN groups). """
    out = {}
    for cell_name, cell in model.named_modules():
        if not isinstance(cell, Unrolled):
            continue
        groups = getattr(cell, 'bn_groups', 1)
        for index, step in enumerate(cell.steps):
            g, i = divmod(index, len(cell.steps) // groups)
            name = f'{cell_name}.group{g}' if groups > 1 else cell_name
            for bn_name, bn in step.named_modules():
                if not isinstance(bn, _BatchNorm):
                    continue
                for stat in STATS:
                    t = getattr(bn, stat, None)
                    if t is not None:
                        out[f'{name}.step{i}.{bn_name}.{stat}'] = t.detach().float().cpu().clone()
    return out


def bn_scalars(stats: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """ Channel means, as tracker keys 'bn/<cell>/step<i>/<bn>/<stat>'. """
    return {'bn/' + k.replace('.', '/'): t.mean().item() for k, t in stats.items()}


def save_bn_stats(stats: Dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file
    if stats:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(stats, str(path))
        usual_mode(path)
