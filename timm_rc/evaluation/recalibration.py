""" Re-estimate the running statistics of every BatchNorm layer a network runs, step by step.

After the weights of an RC network change under its BN layers (`convert_to_rc` sharing one block's
weights, `set_steps` running another step count, quantization), the running mean and variance of step i
no longer describe what step i now sees. `recalibrate_bn` forwards a few batches without gradients, in
eval mode except for the BN layers, and replaces the running statistics of each BN layer that runs with
the plain average over the batches of its batch statistics (momentum None: PyTorch's cumulative average;
the variance is the unbiased batch variance, as BN's running_var). Only BN buffers change: no parameter,
and no BN layer of a step that does not run (`set_steps` to fewer steps leaves the other steps' alone).
A BN layer that serves several executed steps (more steps than trained) averages over all of them.

`torch.optim.swa_utils.update_bn` does the same for a plain network, but resets every BN layer (also the
ones of steps that do not run, whose statistics it then leaves at zero mean and unit variance) and runs
the whole model in train mode (dropout and drop path active).

    batches = recalibration_batches(split, 20, 128, mean, std)       # 20 training batches, not augmented
    recalibrate_bn(model, batches)
"""
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..data import ImageSplit, augment, normalize

__all__ = ['recalibrate_bn', 'recalibration_batches', 'recalibrate_from_split', 'DEFAULT_RECALIBRATION_BATCH']

DEFAULT_RECALIBRATION_BATCH = 128  # the paper's training batch


def recalibrate_bn(model: nn.Module, batches: Iterable, device: Optional[Union[str, torch.device]] = None) -> int:
    """ Replace the running statistics of every BN layer that `model` runs on `batches` (normalised float image
    tensors, or (images, labels) pairs) by their average over the batches. Returns the BN layers updated.
    The model's train/eval mode and every BN layer's momentum are restored afterwards. """
    if device is None:
        device = next(model.parameters()).device
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    seen = set()

    def first_call(module, args):
        if id(module) not in seen:  # a BN layer that runs: forget its old statistics once
            seen.add(id(module))
            module.reset_running_stats()

    was_training = model.training
    modes = {id(m): m.training for m in model.modules()}
    momenta = {id(m): m.momentum for m in bns}
    handles = [m.register_forward_pre_hook(first_call) for m in bns]
    try:
        model.eval()
        for m in bns:
            m.train()
            m.momentum = None  # cumulative average: every batch counts the same
        n = 0
        with torch.no_grad():
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device))
                n += 1
        if n == 0:
            raise ValueError('recalibrate_bn() got no batches')
    finally:
        for h in handles:
            h.remove()
        for m in bns:
            m.momentum = momenta[id(m)]
        for m in model.modules():
            m.training = modes.get(id(m), was_training)
    return len(seen)


def recalibration_batches(split: ImageSplit, num_batches: int, batch_size: int, mean: torch.Tensor, std: torch.Tensor,
                          augmented: bool = False, seed: int = 0, channels_last: bool = False) -> Iterator[torch.Tensor]:
    """ The first `num_batches` batches of `batch_size` of a shuffled uint8 split (a fixed permutation of
    `seed`), normalised with `mean` / `std` (255 x the model's, `model_mean_std`); `augmented`: with the
    trainer's padded crop and flip. """
    if num_batches < 1 or batch_size < 1:
        raise ValueError(f'recalibration needs num_batches >= 1 and batch_size >= 1, got {num_batches}, {batch_size}')
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split), generator=g)[:num_batches * batch_size]
    for i in range(0, len(order), batch_size):
        images = split.images[order[i:i + batch_size]]
        if augmented:
            images = augment(images, g)
        yield normalize(images, mean, std, channels_last)


def recalibrate_from_split(model: nn.Module, split: ImageSplit, num_batches: int, batch_size: int, mean: torch.Tensor,
                           std: torch.Tensor, augmented: bool = False, seed: int = 0,
                           device: Optional[Union[str, torch.device]] = None) -> int:
    """ `recalibrate_bn` on `num_batches` batches of `split` (`recalibration_batches`). Returns the BN layers
    updated. """
    if len(split) < batch_size:
        raise ValueError(f'recalibration needs at least one batch of {batch_size} examples, the split has {len(split)}')
    num_batches = min(num_batches, len(split) // batch_size)
    return recalibrate_bn(model, recalibration_batches(split, num_batches, batch_size, mean, std, augmented, seed),
                          device)
