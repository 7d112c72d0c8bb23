""" `python -m timm_rc.eval`: evaluate a trained (or untrained) model on a dataset's test split.

One evaluation for every caller: the trainer's end-of-epoch test (`timm_rc.train.loop`) and this command
call the same `evaluate`, so a finished run evaluated here gives exactly the test error its summary.json
holds (same examples, batch size, precision and memory format: the run's own, read from run_config.json).

    python -m timm_rc.eval runs/rc4_cifar10/seed0                      # a run folder
    python -m timm_rc.eval runs/rc4_cifar10/seed0 --json               # one JSON object for scripts
    python -m timm_rc.eval weights.safetensors --model rc4_cifar --model_kwargs '{"width": 16}' \\
        --data_dir ../shared/data/cifar10
    python -m timm_rc.eval --model rc4_cifar --data_dir ../shared/data/cifar10   # untrained
    python -m timm_rc.eval RUN [RUN ...] --steps 1,2,3,4,6,8 [--plot steps.png]  # cost-adjustable inference

`--steps`: each RC network runs k' unrolled steps per cell (`RCNet.set_steps`) for every k' listed; the
command prints the test error and the FLOPs per image of each (one multiply-add counts 2 FLOPs), and
`--plot` draws error against FLOPs per image, one line per run. With `--json` it prints a list, one
object per run, whose 'steps' holds a row per k': {steps, top1_error, top5_error, loss, examples,
flops_per_image}.

Library: `evaluate(model, loader, mean=..., std=...) -> EvalResult`, `load_model(source, model, model_kwargs)`,
`evaluate_over_steps(model, loader, steps, mean=..., std=...) -> rows`, `flops_per_image(model)`.
"""
import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .train.config import UserError
from .train.data import BatchedTensorDataset, ImageSplit, TimmImageDataset, collate_batch, decode_split, \
    load_dataset_splits, normalize, small_uniform_images, timm_transforms

__all__ = ['EvalResult', 'evaluate', 'evaluate_over_steps', 'flops_per_image', 'load_model', 'find_run', 'read_run',
           'model_mean_std', 'run_dataset', 'load_split', 'split_loader', 'main']

WEIGHTS = 'model.safetensors'  # what the trainer (timm's save_for_hf) and accelerate's save_state write
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
        **evaluate_kwargs,
) -> List[Dict[str, Any]]:
    """ Cost-adjustable inference: `evaluate` the model run at each k' in `steps` (`model.set_steps(k',
    bn_policy)`, e.g. `RCNet`), one row per k': {steps, top1_error, top5_error, loss, examples,
    flops_per_image}. The model runs its trained steps again afterwards. `evaluate_kwargs` go to
    `evaluate` (mean, std, device, ...). """
    if not callable(getattr(model, 'set_steps', None)):
        raise ValueError(f'{type(model).__name__} cannot change its number of steps (it has no set_steps); '
                         f'evaluating over steps needs an RC network such as RCNet')
    rows = []
    try:
        for k in steps:
            model.set_steps(k, bn_policy)
            flops = flops_per_image(model, input_size)
            r = evaluate(model, loader, **evaluate_kwargs)
            rows.append(dict(steps=k, top1_error=r.top1_error, top5_error=r.top5_error,
                             loss=r.loss if math.isfinite(r.loss) else None, examples=r.examples,
                             flops_per_image=flops))
    finally:  # the trained steps: RCNet.steps, Unrolled.num_steps
        model.set_steps(model.steps if isinstance(getattr(model, 'steps', None), int) else model.num_steps)
    return rows


def model_mean_std(model: nn.Module, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """ The model's `pretrained_cfg` mean and std, x 255, shaped (1, C, 1, 1), as `evaluate` takes them. """
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg['mean'], device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(cfg['std'], device=device).view(1, -1, 1, 1) * 255
    return mean, std


# ---- what to evaluate ------------------------------------------------------------------------


def find_run(path: Union[str, Path]) -> Optional[Path]:
    """ The run folder (holding run_config.json) that `path` is, or that a weights file lies in: the run's
    own model.safetensors, or a checkpoint's (run/checkpoints/epoch_0002/model.safetensors). """
    path = Path(path)
    for d in ([path] if path.is_dir() else []) + list(path.parents)[:3]:
        if (d / 'run_config.json').is_file():
            return d
    return None


def _legacy_block(path: Path) -> Dict[str, Any]:
    """ {'block': 'preact'} for an RC run trained before timm_rc 0.2.0 without an explicit block: its
    default was 'preact' then ('postact' since), and both load the same weights, so only the run's
    version tells them apart. """
    run_dir = path if path.is_dir() else find_run(path)
    if run_dir is None:
        return {}
    run = read_run(run_dir)
    config = run_dir / 'config.json'
    args = {}
    if config.is_file():
        try:
            args = json.loads(config.read_text()).get('model_args') or {}
        except json.JSONDecodeError:
            pass
    version = (run.get('summary') or {}).get('versions', {}).get('timm_rc', '')
    model = str(run.get('model', '')).split('.')[0]
    if not version or model not in ('rc1_cifar', 'rc2_cifar', 'rc4_cifar', 'rc2_unshared_cifar', 'rc4_unshared_cifar'):
        return {}
    old = tuple(int(x) for x in version.split('.')[:2] if x.isdigit()) < (0, 2)
    if old and 'block' not in args and 'block' not in (run.get('model_kwargs') or {}):
        return {'block': 'preact'}
    return {}


def read_run(run_dir: Union[str, Path]) -> Dict[str, Any]:
    """ A run's run_config.json, with its summary.json (if written) under 'summary'. """
    run_dir = Path(run_dir)
    run: Dict[str, Any] = {}
    for name in ('run_config.json', 'summary.json'):
        f = run_dir / name
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f'{f} is not valid JSON: {e}') from None
            if name == 'summary.json':
                run['summary'] = data
            else:
                run.update(data)
    return run


def _similar_models(name: str) -> str:
    import timm
    close = timm.list_models(f'*{name.split("_")[0]}*')[:10] or timm.list_models('rc*_cifar')
    return ', '.join(close)


def _create(name: str, kwargs: Dict[str, Any]) -> nn.Module:
    import timm
    import timm_rc  # noqa: F401  registers the RC models
    if not name.startswith('local-dir:') and not timm.is_model(name.split('.')[0]):
        raise UserError(f'unknown model {name!r}; similar names: {_similar_models(name)}')
    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, ValueError, RuntimeError, KeyError, AssertionError) as e:
        shown = name.removeprefix('local-dir:')
        raise UserError(f'cannot build {shown} with model_kwargs {kwargs}: {e}') from None


def _load_weights(model: nn.Module, weights: Path, what: str) -> None:
    """ timm's own checkpoint loading: strict, and it drops DDP / torch.compile key prefixes. """
    from timm.models import load_checkpoint
    try:
        load_checkpoint(model, str(weights), strict=True)
    except RuntimeError as e:
        text = str(e)
        if 'Error(s) in loading state_dict' not in text:
            raise UserError(f'cannot read weights {weights}: {text.splitlines()[0]}') from None
        problems = [line.strip() for line in text.splitlines()[1:] if line.strip()]
        first = problems[0] if problems else text
        more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
        raise UserError(f'weights {weights} do not fit {what}: {first[:300]}{more}; pass the --model and '
                        f'--model_kwargs the weights were trained with') from None
    except Exception as e:  # safetensors, pickle and OS errors for a file that is no checkpoint
        raise UserError(f'cannot read weights {weights}: {type(e).__name__}: {str(e)[:300]}') from None


def _describe(name: str, kwargs: Dict[str, Any]) -> str:
    return f'{name} with model_kwargs {json.dumps(kwargs)}' if kwargs else name


def _is_quantized(weights: Path) -> bool:
    from safetensors import safe_open
    from .compress import FORMAT
    try:
        with safe_open(str(weights), framework='pt') as f:
            return (f.metadata() or {}).get('format') == FORMAT
    except Exception:  # not a safetensors file: timm's loader says what it is
        return False


def load_model(
        source: Optional[Union[str, Path]] = None,
        model: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
) -> nn.Module:
    """ The model to evaluate, on the CPU in eval mode, with its `pretrained_cfg` (mean/std).

    * `source` a folder written by the trainer or timm's `save_for_hf` (config.json + model.safetensors):
      built from its config.json (`local-dir:`), `model_kwargs` on top; a run folder without config.json
      is built from its run_config.json. `model` builds that timm model instead, with the folder's weights.
    * `source` a weights file (model.safetensors, or a checkpoint's): needs `model` (and the
      `model_kwargs` it was trained with), unless the file lies in a run folder, whose model is then used.
    * `source` a weight-quantized file (`python -m timm_rc.compress quantize`): its dequantized weights in
      the model its metadata names, or in `model`.
    * no `source`: the timm model `model` as created (untrained, or timm's pretrained tag).

    Weights load strictly through timm (`timm.models.load_checkpoint`), so weights that do not fit are an
    error, never a silently re-initialised classifier (which `pretrained=True` does when the class count
    differs from the pretrained_cfg's). Problems are `UserError`s that name them.
    """
    kwargs = dict(model_kwargs or {})
    if source is None:
        if model is None:
            raise UserError('nothing to evaluate: give a run folder or a weights file, or --model NAME for an '
                            'untrained model')
        return _create(model, kwargs).eval()
    path = Path(source)
    if not path.exists():
        raise UserError(f'{source} does not exist; give a run folder (holding {WEIGHTS}) or a weights file')
    weights = path / WEIGHTS if path.is_dir() else path
    if path.is_dir() and not weights.is_file():
        hint = ''
        ckpts = sorted((path / 'checkpoints').glob(f'epoch_*/{WEIGHTS}'))
        if ckpts:
            hint = f'; the run is not finished: evaluate its newest checkpoint with {ckpts[-1]}'
        raise UserError(f'{source} holds no {WEIGHTS}; give a run folder written by the trainer (or timm\'s '
                        f'save_for_hf) or a weights file{hint}')
    if weights.suffix == '.safetensors' and _is_quantized(weights):  # python -m timm_rc.compress quantize wrote it
        from .compress import load_quantized, quantized_metadata
        if model is None and kwargs:  # the file's model, with the kwargs given on top: must still fit
            name, file_kwargs = quantized_metadata(weights)
            return load_quantized(weights, _create(name, {**file_kwargs, **kwargs}))
        return load_quantized(weights, _create(model, kwargs) if model is not None else None)
    if model is None:
        kwargs = {**_legacy_block(path), **kwargs}
    if model is None and path.is_dir() and (path / 'config.json').is_file():
        net = _create(f'local-dir:{path}', kwargs)
        what = f'the model of {path / "config.json"}' + (f' with model_kwargs {json.dumps(kwargs)}' if kwargs else '')
    else:
        if model is None:
            run_dir = find_run(path)
            run = read_run(run_dir) if run_dir is not None else {}
            if 'model' not in run:
                raise UserError(f'{source} is a weights file outside a run folder: name its model with --model '
                                f'(and --model_kwargs), e.g. --model rc4_cifar --model_kwargs \'{{"width": 16}}\'')
            model, kwargs = run['model'], {**run.get('model_kwargs', {}), **kwargs}
        net = _create(model, kwargs)
        what = _describe(model, kwargs)
    _load_weights(net, weights, what)
    return net.eval()


# ---- the command -----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, as every other bad input
        raise UserError(f'{message} (see python -m timm_rc.eval --help)')


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog='python -m timm_rc.eval', description=__doc__.split('\n\n')[0].split(': ', 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('sources', nargs='*', metavar='RUN_OR_WEIGHTS',
                   help='a run folder (model.safetensors + config.json), or a weights file; none: --model untrained; '
                        'several with --steps')
    p.add_argument('--model', help='timm name (e.g. rc4_cifar, rc4_cifar.cifar100); default: the run\'s')
    p.add_argument('--model_kwargs', help='JSON object passed to timm.create_model, e.g. \'{"width": 16}\'')
    p.add_argument('--dataset', help='cifar10, cifar100 or a hub id; default: the run\'s, else cifar10')
    p.add_argument('--data_dir', help='local folder in the hub\'s parquet schema; default: the run\'s')
    p.add_argument('--split', default='test', choices=('test', 'train'))
    p.add_argument('--batch_size', type=int, help='default: the run\'s eval_batch_size, else 1024')
    p.add_argument('--max_samples', type=int, help='first N examples; default: the run\'s max_eval_samples (test)')
    p.add_argument('--device', help='cpu, cuda, cuda:N; default: cuda if available')
    p.add_argument('--mixed_precision', choices=tuple(PRECISIONS),
                   help='autocast dtype; default: the run\'s, else no')
    p.add_argument('--json', action='store_true', help='print one JSON object (with top1_error) instead of a table')
    p.add_argument('--steps', help="comma list of unrolled steps k' per cell to run each RC network with, e.g. "
                                   "1,2,3,4,6,8: test error and FLOPs per image for each")
    p.add_argument('--bn_policy', help="with --steps: which trained step's BN layers serve each executed step, "
                                       "'spread' or 'first' (default: the model's bn_policy)")
    p.add_argument('--plot', help='with --steps: write a PNG of test error against FLOPs per image, one line per run')
    return p


def _parse_steps(text: str) -> List[int]:
    try:
        steps = [int(t) for t in text.split(',') if t.strip()]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise UserError(f'--steps needs a comma list of step counts >= 1, e.g. 1,2,3,4,6,8; got {text!r}')
    return steps


def _parse_kwargs(text: Optional[str]) -> Optional[Dict[str, Any]]:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f'--model_kwargs needs a JSON object, e.g. \'{{"width": 16}}\'; {text!r} is not valid '
                        f'JSON ({e})') from None
    if not isinstance(value, dict):
        raise UserError(f'--model_kwargs needs a JSON object, e.g. \'{{"width": 16}}\'; got {text!r}')
    return value


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f'--device {name!r} is not a device; use cpu, cuda or cuda:N') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device {name}: CUDA is not available here; use --device cpu')
    return device


def _run_data_dir(run_dir: Path, run: Dict[str, Any]) -> Optional[str]:
    """ The run's data_dir as the run recorded it: relative to the folder it was trained from. That is the
    current folder, or the one the run folder's recorded output_dir (e.g. runs/x/seed0) is relative to. """
    data_dir = run.get('data_dir')
    if data_dir is None or Path(data_dir).is_absolute() or Path(data_dir).is_dir():
        return data_dir
    out = Path(run.get('output_dir') or '')
    here = run_dir.resolve()
    if out.parts and not out.is_absolute() and here.parts[-len(out.parts):] == out.parts:
        candidate = here.parents[len(out.parts) - 1] / data_dir
        if candidate.is_dir():
            return str(candidate)
    raise UserError(f'the run\'s data_dir {data_dir} (relative to where it was trained) does not exist from '
                    f'here ({Path.cwd()}); pass --data_dir DIR')


def run_dataset(run_dir: Optional[Path], dataset: Optional[str] = None,
                data_dir: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """ (dataset, data_dir) to evaluate on: the ones given, else the run's (its data_dir resolved from
    here), else cifar10 from the hub. """
    run = read_run(run_dir) if run_dir is not None else {}
    name = dataset or run.get('dataset') or 'cifar10'
    if data_dir is not None:
        return name, data_dir
    if dataset is None and run_dir is not None:
        return name, _run_data_dir(Path(run_dir), run)
    return name, None


def load_split(dataset: str = 'cifar10', data_dir: Optional[str] = None, split: str = 'test',
               max_samples: Optional[int] = None, model: Optional[nn.Module] = None, loader: Optional[str] = None,
               ) -> Tuple[Union[ImageSplit, TimmImageDataset], int, Optional[List[str]]]:
    """ One split of a dataset (its first `max_samples` examples) with the dataset's class count and class
    names: CIFAR-sized images decoded to uint8 tensors (an `ImageSplit`), other images (or `loader='timm'`,
    as the run was trained) as a `TimmImageDataset` with timm's evaluation transform for `model`. """
    if split not in ('train', 'test'):
        raise UserError(f'split must be train or test, got {split!r}')
    train, test, image_col, label_col, num_classes, class_names = load_dataset_splits(dataset, data_dir)
    chosen = test if split == 'test' else train
    in_chans = model.pretrained_cfg.get('input_size', (3,))[0] if model is not None else 3
    if loader == 'timm' or (loader in (None, 'auto') and
                            not small_uniform_images(train, image_col, in_chans=in_chans, like=test)):
        if model is None:
            raise UserError(f'{data_dir or dataset} needs timm\'s data pipeline (images of any size), which needs the model')
        out = TimmImageDataset(chosen, image_col, label_col, timm_transforms(model)[1], in_chans, max_samples)
    else:
        out = decode_split(chosen, image_col, label_col, max_samples, f'dataset {data_dir or dataset}')
    out.split_name = str(chosen.split) if chosen.split is not None else split  # 'validation' where it stands in for test
    return out, num_classes, class_names


def split_loader(split: Union[ImageSplit, TimmImageDataset], batch_size: int, device: Union[str, torch.device] = 'cpu',
                 num_workers: int = 0):
    """ The batches `evaluate` takes, in order, `batch_size` at a time: (uint8 images, labels) of an
    `ImageSplit`, (normalised float images, labels) of a `TimmImageDataset`. """
    pin = torch.device(device).type == 'cuda'
    if isinstance(split, TimmImageDataset):
        return torch.utils.data.DataLoader(split, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                           pin_memory=pin)
    return torch.utils.data.DataLoader(BatchedTensorDataset(split), batch_size=batch_size, shuffle=False,
                                       collate_fn=collate_batch, pin_memory=pin)


def _run_and_report(args, source: Optional[str], steps: Optional[List[int]] = None) -> Dict[str, Any]:
    kwargs = _parse_kwargs(args.model_kwargs)
    for key in ('batch_size', 'max_samples'):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise UserError(f'--{key} must be >= 1, got {getattr(args, key)}')
    device = _device(args.device)
    run_dir = find_run(source) if source is not None and Path(source).exists() else None
    run = read_run(run_dir) if run_dir is not None else {}
    if source is not None and Path(source).is_file() and Path(source).suffix == '.safetensors' and \
            _is_quantized(Path(source)):  # a quantized file names its own model
        from .compress import quantized_metadata
        name, file_kwargs = quantized_metadata(source)
        run = {**run, 'model': name, 'model_kwargs': file_kwargs}
    net = load_model(source, args.model, kwargs)
    if steps is not None and not callable(getattr(net, 'set_steps', None)):
        raise UserError(f'{source or args.model} is a {type(net).__name__}, which cannot change its number of '
                        f'steps: --steps needs an RC network (e.g. rc4_cifar)')
    if steps is not None and not net.share_weights and max(steps) > net.steps:
        raise UserError(f'{source or args.model} has unshared weights for {net.steps} steps per cell and cannot run '
                        f'{max(steps)}: --steps up to {net.steps}')
    if args.bn_policy is not None:
        from .layers import BN_POLICIES
        if args.bn_policy not in BN_POLICIES:
            raise UserError(f'--bn_policy must be one of {", ".join(BN_POLICIES)}; got {args.bn_policy!r}')

    dataset, data_dir = run_dataset(run_dir, args.dataset, args.data_dir)
    limit = args.max_samples or (run.get('max_eval_samples') if args.split == 'test' else None)
    split, num_classes, class_names = load_split(dataset, data_dir, args.split, limit, net, run.get('loader'))
    if net.num_classes != num_classes:
        raise UserError(
            f'the model has a {net.num_classes}-class head but {data_dir or dataset} has {num_classes} classes; '
            f'evaluate it on its own dataset (--dataset / --data_dir), or pass the --model / --model_kwargs it '
            f'was trained with')

    precision = args.mixed_precision or run.get('mixed_precision') or 'no'
    channels_last = run.get('channels_last', device.type == 'cuda')
    batch_size = args.batch_size or run.get('eval_batch_size') or 1024
    mean, std = model_mean_std(net, device)
    net = net.to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    loader = split_loader(split, batch_size, device)
    common = dict(
        source=source, model=args.model or run.get('model') or net.pretrained_cfg.get('architecture'),
        model_kwargs=(kwargs or {}) if args.model else {**run.get('model_kwargs', {}), **(kwargs or {})},
        params=sum(p.numel() for p in net.parameters()), dataset=dataset, data_dir=data_dir,
        split=getattr(split, 'split_name', args.split),
        batch_size=batch_size, device=str(device), mixed_precision=precision, channels_last=channels_last,
    )
    if steps is not None:
        rows = evaluate_over_steps(
            net, loader, steps, bn_policy=args.bn_policy, mean=mean, std=std, channels_last=channels_last,
            num_classes=num_classes, device=device, autocast_dtype=PRECISIONS[precision])
        return dict(common, trained_steps=net.steps, bn_sharing=net.bn_sharing,
                    bn_policy=args.bn_policy or net.bn_policy, steps=rows)
    result = evaluate(net, loader, mean=mean, std=std, channels_last=channels_last, num_classes=num_classes,
                      device=device, autocast_dtype=PRECISIONS[precision])
    report = dict(
        result.to_dict(),
        source=source, model=args.model or run.get('model') or net.pretrained_cfg.get('architecture'),
        model_kwargs=(kwargs or {}) if args.model else {**run.get('model_kwargs', {}), **(kwargs or {})},
        params=sum(p.numel() for p in net.parameters()), dataset=dataset, data_dir=data_dir,
        split=getattr(split, 'split_name', args.split),
        class_names=class_names, batch_size=batch_size, device=str(device), mixed_precision=precision,
        channels_last=channels_last,
    )
    summary = run.get('summary', {})
    if args.split == 'test' and 'test_top1_error' in summary and summary.get('eval_examples') == result.examples:
        report['run_test_top1_error'] = summary['test_top1_error']  # what the trainer measured, to compare
    return report


def _table(r: Dict[str, Any]) -> str:
    kwargs = f' {json.dumps(r["model_kwargs"])}' if r['model_kwargs'] else ''
    where = r['data_dir'] or r['dataset']
    precision = 'fp32' if r['mixed_precision'] == 'no' else r['mixed_precision']
    lines = [f'{r["source"] or "untrained"}: {r["model"]}{kwargs}, {r["params"]:,} params',
             f'  on {where} ({r["split"]} split), {r["device"]}, {precision}, batch {r["batch_size"]}']
    top5 = f'{r["top5_error"]:.2f}%' if r['top5_error'] is not None else 'n/a (fewer than 5 classes)'
    loss = f'{r["loss"]:.4f}' if r['loss'] is not None else 'n/a'
    rows = [('top-1 error', f'{r["top1_error"]:.2f}%'), ('top-5 error', top5), ('loss', loss),
            ('images/s', f'{r["images_per_sec"]:,.0f}'), ('examples', f'{r["examples"]:,}')]
    if 'run_test_top1_error' in r:
        same = 'the same' if r['run_test_top1_error'] == r['top1_error'] else 'differs'
        rows.append(('run summary', f'top-1 error {r["run_test_top1_error"]:.2f}% ({same})'))
    lines += [f'  {k:<13}{v}' for k, v in rows]
    names = r['class_names'] or [str(i) for i in range(len(r['per_class_accuracy']))]
    cells = [f'{n} {a:.1f}' if a is not None else f'{n} -' for n, a in zip(names, r['per_class_accuracy'])]
    lines.append('  per-class accuracy (%):')
    row = ''
    for cell in cells:  # as many classes a line as fit in 100 columns
        if row and len(row) + 3 + len(cell) > 96:
            lines.append(f'    {row}')
            row = ''
        row = f'{row} | {cell}' if row else cell
    lines.append(f'    {row}')
    return '\n'.join(lines)


def _steps_table(r: Dict[str, Any]) -> str:
    kwargs = f' {json.dumps(r["model_kwargs"])}' if r['model_kwargs'] else ''
    precision = 'fp32' if r['mixed_precision'] == 'no' else r['mixed_precision']
    lines = [f'{r["source"] or "untrained"}: {r["model"]}{kwargs}, {r["params"]:,} params, trained with '
             f'{r["trained_steps"]} steps per cell, bn_sharing {r["bn_sharing"]}, bn_policy {r["bn_policy"]}',
             f'  on {r["data_dir"] or r["dataset"]} ({r["split"]} split), {r["device"]}, {precision}, '
             f'batch {r["batch_size"]}, {r["steps"][0]["examples"]:,} examples' if r['steps'] else '',
             f'  {"steps":>5}  {"top-1 error":>11}  {"top-5 error":>11}  {"MFLOPs/image":>12}']
    for row in r['steps']:
        top5 = f'{row["top5_error"]:.2f}%' if row['top5_error'] is not None else 'n/a'
        mark = ' (trained)' if row['steps'] == r['trained_steps'] else ''
        lines.append(f'  {row["steps"]:>5}  {row["top1_error"]:>10.2f}%  {top5:>11}  '
                     f'{row["flops_per_image"] / 1e6:>12,.2f}{mark}')
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
    """ `python -m timm_rc.eval RUN_OR_WEIGHTS [...]`: prints a table, or one JSON object with --json;
    with --steps, a table per run, or a JSON list of one object per run (its per-k' rows under 'steps').
    Bad input: one line on stderr and exit code 2. Returns the report(s) (for callers in Python). """
    try:
        import datasets
        datasets.disable_progress_bars()
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
        if args.steps is None:
            for option in ('bn_policy', 'plot'):
                if getattr(args, option) is not None:
                    raise UserError(f'--{option} applies to an evaluation over steps: add --steps, e.g. --steps 1,2,4')
            if len(args.sources) > 1:
                raise UserError(f'{len(args.sources)} runs given; evaluate one at a time, or several over steps with '
                                f'--steps 1,2,4')
            report = _run_and_report(args, args.sources[0] if args.sources else None)
            print(json.dumps(report) if args.json else _table(report))
            return report
        steps = _parse_steps(args.steps)
        reports = [_run_and_report(args, source, steps) for source in (args.sources or [None])]
        if args.plot is not None:
            from .plots import plot_steps
            plot_steps(reports, args.plot)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps(reports) if args.json else '\n'.join(map(_steps_table, reports)))
    if args.plot is not None and not args.json:
        print(f'plot: {args.plot}')
    return reports


if __name__ == '__main__':
    from timm_rc._cli import run as run_command
    run_command(main)
