""" One evaluation for every caller: the trainer's end-of-epoch test and every command.

`evaluate` measures a model over a loader (top-1/top-5 error, loss, per-class accuracy); the trainer
calls it with its accelerator, `python -m timm_rc eval` through `evaluate_source`, `python -m timm_rc
compress` through `test_error_fn`, so a finished run evaluated again gives exactly the test
error its summary.json holds (same examples, batch size, precision and memory format: the run's own).
`evaluate_over_steps` runs an RC network at other step counts (cost-adjustable inference, with
`flops_per_image` as the cost axis).
"""
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..data import load_split, normalize, split_loader
from ..errors import UserError
from ..layers import BN_POLICIES
from ..runs.source import ModelSource
from .recalibration import DEFAULT_RECALIBRATION_BATCH, recalibrate_from_split
from ..runs import Run

__all__ = ['EvalResult', 'evaluate', 'evaluate_over_steps', 'flops_per_image', 'model_mean_std', 'evaluate_source',
           'test_error_fn', 'run_dataset', 'resolve_device', 'PRECISIONS', 'recalibrator',
           'auto_precision', 'auto_channels_last']

PRECISIONS = {'no': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


@dataclass
class EvalResult:
    top1_error: float  # percent
    top5_error: Optional[float]  # percent; None when the model has fewer than 5 classes
    loss: float  # mean cross-entropy (no label smoothing); nan without examples
    per_class_accuracy: List[Optional[float]]  # percent, per class index; None for a class without examples
    per_class_examples: List[int]
    examples: int
    top1_correct: int
    top5_correct: Optional[int]
    images_per_sec: float  # examples / seconds of the whole evaluation (forward, metrics, one host sync)

    @property
    def top1_acc(self) -> float:
        """ Fraction of examples classified right (the trainer's `test/top1_acc`). """
        return self.top1_correct / max(self.examples, 1)

    def to_dict(self) -> Dict[str, Any]:
        """ Plain JSON-able values (a non-finite loss becomes None). """
        d = dataclasses.asdict(self)
        if not math.isfinite(d['loss']):
            d['loss'] = None
        return d


def evaluate(
        model: nn.Module,
        loader,
        *,
        mean: torch.Tensor,
        std: torch.Tensor,
        channels_last: bool = False,
        num_classes: Optional[int] = None,
        accelerator=None,
        device: Optional[Union[str, torch.device]] = None,
        autocast_dtype: Optional[torch.dtype] = None,
) -> EvalResult:
    """ Top-1/top-5 error, mean cross-entropy and per-class accuracy of `model` over `loader`.

    `loader` yields (uint8 images (N, C, H, W), int64 labels); `mean`/`std` hold 255 x the per-channel
    values, shaped (1, C, 1, 1) (`model_mean_std`). With an `accelerator` (the trainer, one or many
    processes) the loader is a prepared one and per-example results are gathered with
    `gather_for_metrics`, which drops the duplicates that pad the last batch: every example counts once.
    Counts stay on the device; the one host sync is at the end. `autocast_dtype` runs the forward under
    `torch.autocast` (a model prepared by Accelerate already autocasts). The model's train/eval mode
    is restored afterwards.
    """
    if device is None:
        device = accelerator.device if accelerator is not None else next(model.parameters()).device
    device = torch.device(device)
    mean, std = mean.to(device), std.to(device)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    total_dtype = torch.float32 if device.type == 'mps' else torch.float64
    counts = None  # lazily sized from the first logits when num_classes is not given
    loss_sum = torch.zeros((), dtype=total_dtype, device=device)
    top1 = torch.zeros((), dtype=torch.int64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                if images.is_floating_point():  # timm's pipeline normalised them already
                    x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
                else:
                    x = normalize(images, mean, std, channels_last)
                logits = model(x)
            if counts is None:
                num_classes = num_classes or logits.shape[-1]
                counts = torch.zeros(2, num_classes, dtype=torch.int64, device=device)  # examples, correct
            k = min(5, logits.shape[-1])
            hit1 = logits.argmax(-1) == labels  # argmax: the first of tied maxima, as timm's accuracy
            hit5 = (logits.topk(k, dim=-1).indices == labels[:, None]).any(-1)
            losses = F.cross_entropy(logits.float(), labels, reduction='none')
            if accelerator is not None:
                labels, hit1, hit5, losses = accelerator.gather_for_metrics((labels, hit1, hit5, losses))
            top1 += hit1.sum()
            top5 += hit5.sum()
            loss_sum += losses.sum(dtype=total_dtype)
            counts[0].index_add_(0, labels, torch.ones_like(labels))
            counts[1].index_add_(0, labels, hit1.long())
    model.train(was_training)
    if counts is None:  # an empty loader
        counts = torch.zeros(2, num_classes or 0, dtype=torch.int64)
    per_class_examples, per_class_correct = counts.tolist()  # the host sync
    top1, top5, loss_sum = top1.item(), top5.item(), loss_sum.item()
    seconds = time.perf_counter() - t0
    n = sum(per_class_examples)
    top1_acc = top1 / max(n, 1)
    has_top5 = len(per_class_examples) >= 5
    return EvalResult(
        top1_error=100.0 * (1.0 - top1_acc),
        top5_error=100.0 * (1.0 - top5 / max(n, 1)) if has_top5 else None,
        loss=loss_sum / n if n else float('nan'),
        per_class_accuracy=[100.0 * c / e if e else None for c, e in zip(per_class_correct, per_class_examples)],
        per_class_examples=per_class_examples,
        examples=n,
        top1_correct=top1,
        top5_correct=top5 if has_top5 else None,
        images_per_sec=n / max(seconds, 1e-9),
    )


def flops_per_image(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> int:
    """ FLOPs of one forward pass of one image (C, H, W), counted by `torch.utils.flop_counter.FlopCounterMode`
    (convolutions and matrix products; one multiply-add is 2 FLOPs; BN, activations and pooling are not
    counted). `input_size` defaults to the model's `pretrained_cfg['input_size']`. Runs the model once in
    eval mode (BN running statistics untouched) and restores its mode. """
    from torch.utils.flop_counter import FlopCounterMode
    if input_size is None:
        input_size = getattr(model, 'pretrained_cfg', {}).get('input_size')
        if input_size is None:
            raise ValueError('flops_per_image() needs input_size (C, H, W): the model has no pretrained_cfg input_size')
    ref = next(model.parameters())
    x = torch.zeros(1, *input_size, device=ref.device, dtype=ref.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def evaluate_over_steps(
        model: nn.Module,
        loader,
        steps: Sequence[int],
        *,
        bn_policy: Optional[str] = None,
        input_size: Optional[Sequence[int]] = None,
        prepare: Optional[Callable[[nn.Module], Any]] = None,
        **evaluate_kwargs,
) -> List[Dict[str, Any]]:
    """ Cost-adjustable inference: `evaluate` the model run at each k' in `steps` (`model.set_steps(k',
    bn_policy)`, e.g. `RCNet`), one row per k': {steps, top1_error, top5_error, loss, examples,
    flops_per_image}. The model runs its trained steps again afterwards. `evaluate_kwargs` go to
    `evaluate` (mean, std, device, ...). `prepare(model)` runs after each `set_steps` (e.g. BN re-estimation:
    the row then also holds `top1_error_before`, the error before it); every buffer it changes is restored
    before the next k'. """
    if not callable(getattr(model, 'set_steps', None)):
        raise ValueError(f'{type(model).__name__} cannot change its number of steps (it has no set_steps); '
                         f'evaluating over steps needs an RC network such as RCNet')
    rows = []
    try:
        for k in steps:
            model.set_steps(k, bn_policy)
            flops = flops_per_image(model, input_size)
            before = None
            if prepare is not None:
                saved = {name: b.detach().clone() for name, b in model.named_buffers()}
                before = evaluate(model, loader, **evaluate_kwargs).top1_error
                prepare(model)
            r = evaluate(model, loader, **evaluate_kwargs)
            rows.append(dict(steps=k, top1_error=r.top1_error, top5_error=r.top5_error,
                             loss=r.loss if math.isfinite(r.loss) else None, examples=r.examples,
                             flops_per_image=flops, **({'top1_error_before': before} if prepare is not None else {})))
            if prepare is not None:
                with torch.no_grad():
                    for name, b in model.named_buffers():
                        b.copy_(saved[name])
    finally:  # the trained steps: RCNet.steps, Unrolled.num_steps
        model.set_steps(model.steps if isinstance(getattr(model, 'steps', None), int) else model.num_steps)
    return rows


def model_mean_std(model: nn.Module, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """ The model's `pretrained_cfg` mean and std, x 255, shaped (1, C, 1, 1), as `evaluate` takes them. """
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg['mean'], device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(cfg['std'], device=device).view(1, -1, 1, 1) * 255
    return mean, std


def run_dataset(run: Optional[Run], dataset: Optional[str] = None,
                data_dir: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """ (dataset, data_dir) to evaluate on: the ones given, else the run's (its data_dir resolved from
    here), else cifar10 from the hub. """
    name = dataset or (run.config().get('dataset') if run is not None else None) or 'cifar10'
    if data_dir is not None:
        return name, data_dir
    if dataset is None and run is not None:
        return run.data()
    return name, None


def auto_precision(device_type: str) -> str:
    """ What mixed_precision 'auto' means on a device: bf16 on CUDA, and on a CPU whose oneDNN computes in
    bf16 (AVX512-BF16 or AMX: 1.6x fp32 at width 8, 1.9x at width 16 on this project's 2-core machine,
    benchmarks/bench_cpu.py), else 'no' (fp32). """
    if device_type == 'cuda':
        return 'bf16'
    supported = getattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', None)
    return 'bf16' if device_type == 'cpu' and supported is not None and supported() else 'no'


def auto_channels_last(device_type: str) -> bool:
    """ What channels_last None means: on for CUDA and the CPU (oneDNN's convolutions run NHWC natively). """
    return device_type in ('cuda', 'cpu')


def resolve_device(name: Optional[str]) -> torch.device:
    """ The device called `name` ('cpu', 'cuda', 'cuda:1'); None: CUDA where there is one. """
    if name is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f'--device {name!r} is not a device; use cpu, cuda or cuda:N') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device {name}: CUDA is not available here; use --device cpu')
    return device


def evaluate_source(
        source: Optional[Union[str, Path]] = None,
        *,
        model: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        dataset: Optional[str] = None,
        data_dir: Optional[str] = None,
        split: str = 'test',
        batch_size: Optional[int] = None,
        max_samples: Optional[int] = None,
        device: Optional[str] = None,
        mixed_precision: Optional[str] = None,
        steps: Optional[Sequence[int]] = None,
        bn_policy: Optional[str] = None,
        recalibrate: Optional[int] = None,
        recalibrate_augment: bool = False,
) -> Dict[str, Any]:
    """ What `python -m timm_rc eval` reports for one source (a run folder, a weights file, a quantized
    file, a timm name, or None with `model` for an untrained one): `ModelSource.parse(...).load()`, then `evaluate` on the run's own test
    examples with the run's batch size, precision and memory format (each overridable), as a dict of
    plain values (`EvalResult.to_dict()` plus what was evaluated, and `run_test_top1_error`, the run
    summary's test error, where the same examples were evaluated). With `steps`, `evaluate_over_steps`
    instead: the dict holds one row per k' under 'steps'. `recalibrate` N: re-estimate the BN statistics from
    N training batches (`timm_rc.recalibrate_bn`; per k' with `steps`) before evaluating; the report then
    holds the error before it too (`top1_error_before`). """
    for key, value in (('batch_size', batch_size), ('max_samples', max_samples)):
        if value is not None and value < 1:
            raise UserError(f'--{key} must be >= 1, got {value}')
    if split not in ('test', 'train'):
        raise UserError(f'split must be test or train, got {split!r}')
    if mixed_precision is not None and mixed_precision not in PRECISIONS:
        raise UserError(f'mixed_precision must be one of {", ".join(PRECISIONS)}; got {mixed_precision!r}')
    dev = resolve_device(device)
    src = ModelSource.parse(source, model, model_kwargs)
    run = src.run
    cfg = run.config() if run is not None else {}
    net = src.load()
    what = src.model if src.kind == 'timm' else source
    if steps is not None:
        if not callable(getattr(net, 'set_steps', None)):
            raise UserError(f'{what} is a {type(net).__name__}, which cannot change its number of '
                            f'steps: --steps needs an RC network (e.g. rc4_cifar)')
        if not net.share_weights and max(steps) > net.steps:
            raise UserError(f'{what} has unshared weights for {net.steps} step{"s" * (net.steps != 1)} per cell and cannot run '
                            f'{max(steps)}: --steps up to {net.steps}')
    if recalibrate is not None and (isinstance(recalibrate, bool) or not isinstance(recalibrate, int) or recalibrate < 1):
        raise UserError(f'--recalibrate takes a number of training batches >= 1, got {recalibrate!r}')
    if bn_policy is not None and bn_policy not in BN_POLICIES:
        raise UserError(f'--bn_policy must be one of {", ".join(BN_POLICIES)}; got {bn_policy!r}')

    dataset, data_dir = run_dataset(run, dataset, data_dir)
    limit = max_samples or (cfg.get('max_eval_samples') if split == 'test' else None)
    data, num_classes, class_names = load_split(dataset, data_dir, split, limit, net, cfg.get('loader'))
    if net.num_classes != num_classes:
        raise UserError(
            f'the model has a {net.num_classes}-class head but {data_dir or dataset} has {num_classes} classes; '
            f'evaluate it on its own dataset (--dataset / --data_dir), or pass the --model / --model_kwargs it '
            f'was trained with')

    precision = mixed_precision or cfg.get('mixed_precision') or 'no'
    channels_last = cfg.get('channels_last', auto_channels_last(dev.type))
    batch_size = batch_size or cfg.get('eval_batch_size') or 1024
    mean, std = model_mean_std(net, dev)
    net = net.to(dev)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    loader = split_loader(data, batch_size, dev)
    name, kwargs = src.identity()
    report = dict(
        source=None if src.path is None else str(source),
        model=name or net.pretrained_cfg.get('architecture'), model_kwargs=kwargs,
        params=sum(p.numel() for p in net.parameters()), dataset=dataset, data_dir=data_dir,
        split=getattr(data, 'split_name', split), batch_size=batch_size, device=str(dev), mixed_precision=precision,
        channels_last=channels_last, quantized=src.kind == 'quantized')
    common = dict(mean=mean, std=std, channels_last=channels_last, num_classes=num_classes, device=dev,
                  autocast_dtype=PRECISIONS[precision])
    recal = None
    if recalibrate is not None:
        recal_batch = cfg.get('batch_size') or DEFAULT_RECALIBRATION_BATCH
        recal = recalibrator(net, dataset, data_dir, recalibrate, recal_batch, recalibrate_augment, dev)
        report['recalibration'] = dict(batches=recalibrate, batch_size=recal_batch, augmented=recalibrate_augment)
    if steps is not None:
        rows = evaluate_over_steps(net, loader, steps, bn_policy=bn_policy, prepare=recal, **common)
        return dict(report, trained_steps=net.steps, bn_sharing=net.bn_sharing,
                    bn_policy=bn_policy or net.bn_policy, steps=rows)
    before = None
    if recal is not None:
        before = evaluate(net, loader, **common).top1_error
        recal(net)
    result = evaluate(net, loader, **common)
    report = dict(result.to_dict(), **report, class_names=class_names)
    if before is not None:
        report['top1_error_before'] = before
    summary = (run.summary() if run is not None else None) or {}
    if split == 'test' and 'test_top1_error' in summary and summary.get('eval_examples') == result.examples:
        report['run_test_top1_error'] = summary['test_top1_error']  # what the trainer measured, to compare
    return report


def recalibrator(model: nn.Module, dataset: str, data_dir: Optional[str], num_batches: int, batch_size: int,
                 augmented: bool = False, device=None) -> Callable[[nn.Module], int]:
    """ net -> `recalibrate_bn` of net from the first `num_batches` x `batch_size` training examples of the dataset
    (shuffled with a fixed seed; `augmented`: the trainer's crop and flip). The training split is read once. """
    try:
        split, _, _ = load_split(dataset, data_dir, 'train', num_batches * batch_size, model, 'dataloader')
    except UserError as e:
        raise UserError(f'BN re-estimation reads the training split: {e}') from None
    if len(split) < batch_size:
        raise UserError(f'BN re-estimation needs a batch of {batch_size} training examples; '
                        f'{data_dir or dataset} has {len(split)}')
    mean, std = model_mean_std(model)

    def recal(net: nn.Module) -> int:
        return recalibrate_from_split(net, split, num_batches, batch_size, mean, std, augmented, device=device)
    return recal


def test_error_fn(run: Optional[Run], model: nn.Module, dataset: Optional[str] = None, data_dir: Optional[str] = None,
                  max_samples: Optional[int] = None, batch_size: int = 256
                  ) -> Tuple[Callable[[nn.Module], float], int]:
    """ (model -> top-1 error % on the CPU, examples): the test split the run was measured on (its own
    dataset and max_eval_samples), or the one given. For comparing a model with its compressed forms. """
    cfg = run.config() if run is not None else {}
    try:
        dataset, data_dir = run_dataset(run, dataset, data_dir)
        # the run's own test examples (its max_eval_samples), as python -m timm_rc eval and the trainer use
        limit = max_samples or cfg.get('max_eval_samples')
        split, num_classes, _ = load_split(dataset, data_dir, 'test', limit, model, cfg.get('loader'))
    except UserError as e:
        text = str(e) if '--data_dir' in str(e) else f'{e}; pass --data_dir DIR (the test data the error is measured on)'
        raise UserError(text) from None
    if model.num_classes != num_classes:
        raise UserError(f'the model has a {model.num_classes}-class head but {data_dir or dataset} has {num_classes} '
                        f'classes; give the dataset it was trained on (--dataset / --data_dir)')
    mean, std = model_mean_std(model)
    loader = split_loader(split, batch_size)

    def error(net: nn.Module) -> float:
        return evaluate(net, loader, mean=mean, std=std, device='cpu', num_classes=num_classes).top1_error
    return error, len(split)
