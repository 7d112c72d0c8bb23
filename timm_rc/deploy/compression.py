""" How small an RC network is, how fast, and how much quantization on top of it costs.

The paper's thesis is that RC compresses a network (one block's weights serve k unrolled steps) and that
an RC network can then be compressed further by existing methods such as weight quantization
(`timm_rc.quantize`). `compression_report` measures one model: unique params, weights file bytes,
FLOPs, training activation memory, CPU latency and, given an evaluation, the test error, also of its
weight-quantized forms. `report_models`, `quantize_run` and `int8_run` are what the three
`python -m timm_rc compress` commands (report, quantize, int8) do, on run folders or registered names.
"""
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..data import load_split, normalize, split_loader
from ..errors import UserError
from ..evaluation import flops_per_image, model_mean_std, recalibrator, run_dataset, test_error_fn
from ..runs.source import load_spec
from ..models.create import create_model
from ..quantize import DEFAULT_GROUP_SIZE, config_for_bits, dequantize_state_dict, load_quantized, quantized_file_bytes, \
    quantized_name, save_quantized, static_int8, unique_tensors
from ..runs import Run

__all__ = ['model_size', 'weights_bytes', 'activation_bytes', 'cpu_latency_ms', 'compression_report', 'plain_network',
           'report_models', 'quantize_run', 'int8_run']


def model_size(model: nn.Module) -> int:
    """ Unique parameters: a weight shared by several steps counts once. """
    return sum(p.numel() for p in model.parameters())  # parameters() yields each Parameter object once


def weights_bytes(model: nn.Module) -> int:
    """ Bytes of the model's weights as a safetensors file (what `model.safetensors` takes on disk). """
    from safetensors.torch import save
    return len(save({k: v.detach().contiguous() for k, v in unique_tensors(model).items()}))


def activation_bytes(model: nn.Module, batch_size: int, input_size: Optional[Sequence[int]] = None) -> int:
    """ Bytes the autograd graph keeps for the backward pass of one training step at `batch_size` (every
    tensor saved for backward, each storage once, parameters and buffers excluded): the activation memory of training.
    Weight sharing does not reduce it: RC-4 keeps what the ResNet-18 graph keeps. Runs a copy of the model. """
    input_size = input_size or model.pretrained_cfg['input_size']
    net = copy.deepcopy(model).train()
    params = {t.untyped_storage().data_ptr() for t in (*net.parameters(), *net.buffers())}
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    ref = next(net.parameters())
    x = torch.randn(batch_size, *input_size, device=ref.device, dtype=ref.dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x).sum()
    return sum(saved.values())


def cpu_latency_ms(model, batch_size: int, input_size: Sequence[int], min_time_s: float = 1.0,
                   min_runs: int = 5) -> float:
    """ Median wall time of one forward pass at `batch_size` on the CPU, in milliseconds (after two
    warm-up passes; at least `min_runs` passes and `min_time_s` seconds). """
    x = torch.randn(batch_size, *input_size)
    times = []
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        start = time.perf_counter()
        while len(times) < min_runs or time.perf_counter() - start < min_time_s:
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
            if len(times) >= 1000:
                break
    return 1000 * statistics.median(times)


def plain_network(model: nn.Module, name: str, kwargs: Dict[str, Any]) -> Optional[Tuple[str, Dict[str, Any]]]:
    """ (timm name, kwargs) of the plain network of `model`'s graph, or None: an RCNet's with
    share_weights=False, a registered rc_* family's base model. """
    if bool(getattr(model, 'share_weights', False)) and getattr(model, 'steps', 1) != 1:
        return name, {**{k: v for k, v in kwargs.items() if k != 'rank'}, 'share_weights': False}
    conversion = getattr(model, 'rc_conversion', None)
    if conversion is not None and conversion.runs and name.startswith('rc_'):
        return name.removeprefix('rc_'), {k: v for k, v in kwargs.items()
                                          if k not in ('bn_sharing', 'steps', 'bn_policy', 'rank', 'init')}
    return None


def compression_report(
        model: nn.Module,
        *,
        name: str,
        batch_size: int = 128,
        latency_batches: Sequence[int] = (1, 64),
        evaluate_fn=None,
        bits: Sequence[int] = (),
        group_size: int = DEFAULT_GROUP_SIZE,
) -> Dict[str, Any]:
    """ One row of the compression report for `model`: params (unique), weights_bytes (its safetensors
    file), flops_per_image, activation_bytes (training, at `batch_size`), latency_ms_b{N} (CPU, fp32
    eager), and with `evaluate_fn` (model -> top-1 error %) the test error; for each of `bits` the bytes
    of the weight-quantized file (int{b}_bytes) and, with `evaluate_fn`, its error (int{b}_top1_error). """
    input_size = model.pretrained_cfg['input_size']
    row: Dict[str, Any] = dict(
        name=name, params=model_size(model), weights_bytes=weights_bytes(model),
        flops_per_image=flops_per_image(model, input_size),
        activation_bytes=activation_bytes(model, batch_size, input_size), activation_batch=batch_size)
    for b in latency_batches:
        row[f'latency_ms_b{b}'] = cpu_latency_ms(model.eval(), b, input_size)
    if evaluate_fn is not None:
        row['top1_error'] = evaluate_fn(model)
    for b in bits:
        config = config_for_bits(b, group_size)
        data, tensors, shapes = quantized_file_bytes(model, config)
        row[f'int{b}_bytes'] = len(data)
        if evaluate_fn is not None:
            quantized = copy.deepcopy(model)
            quantized.load_state_dict(dequantize_state_dict(tensors, shapes, config), strict=True)
            row[f'int{b}_top1_error'] = evaluate_fn(quantized.eval())
    return row


def report_models(specs: Sequence[str], *, model_kwargs: Optional[Dict[str, Any]] = None, bits: Sequence[int] = (),
                  group_size: int = DEFAULT_GROUP_SIZE, batch_size: int = 128, plain: bool = True,
                  dataset: Optional[str] = None, data_dir: Optional[str] = None,
                  max_samples: Optional[int] = None) -> List[Dict[str, Any]]:
    """ `compression_report` rows for run folders and registered names (`model_kwargs` for the names): a
    trained run's rows carry its test error on its own test examples (or `data_dir`'s); with `plain`,
    each RC model is followed by the plain network of its graph. """
    for b in bits:
        config_for_bits(b, group_size)  # a bad count is an error before any work
    if model_kwargs and specs and all(Path(spec).is_dir() for spec in specs):
        raise UserError(f'--model_kwargs applies to registered names (e.g. rc4_cifar); a run folder builds the model '
                        f'it was trained with, so {json.dumps(model_kwargs)} would be ignored: leave it out, or '
                        f'give a name')
    rows = []
    for spec in specs:
        net, run, name, kwargs = load_spec(spec, model_kwargs)
        evaluate_fn, examples = test_error_fn(run, net, dataset, data_dir, max_samples) if run is not None else (None, 0)
        row = compression_report(net, name=spec, batch_size=batch_size, evaluate_fn=evaluate_fn, bits=bits,
                                 group_size=group_size)
        row.update(model=name, model_kwargs=kwargs, trained=run is not None)
        if evaluate_fn is not None:
            row['eval_examples'] = examples
        rows.append(row)
        plain_of = plain_network(net, name, kwargs)
        if plain_of is not None and plain:
            plain_name, plain_kwargs = plain_of
            other = create_model(plain_name, plain_kwargs).eval()
            plain_row = compression_report(other, name=f'plain graph of {spec}', batch_size=batch_size, bits=bits,
                                           group_size=group_size)
            plain_row.update(model=plain_name, model_kwargs=plain_kwargs, trained=False)
            row['plain_params'] = plain_row['params']
            row['compression'] = plain_row['params'] / row['params']
            rows.append(plain_row)
    return rows


def _need_run_folder(run: str, command: str) -> None:
    if Path(run).is_file():
        raise UserError(f'{command} takes a run folder (holding model.safetensors); {run} is a file; give the run folder '
                        f'that holds it')
    if not Path(run).exists():
        raise UserError(f'{command} takes a run folder (holding model.safetensors); {run} does not exist (registered '
                        f'model names go to python -m timm_rc compress report)')


def quantize_run(run_dir: str, bits: int, *, group_size: int = DEFAULT_GROUP_SIZE, dataset: Optional[str] = None,
                 data_dir: Optional[str] = None, max_samples: Optional[int] = None,
                 recalibrate: Optional[int] = None, recalibrate_augment: bool = True,
                 overwrite: bool = False) -> Dict[str, Any]:
    """ Write RUN/model.int{bits}.safetensors (never touching model.safetensors) and measure both: file
    bytes and, where there is test data, the fp32 and quantized test error. A file written before is kept (a
    `UserError` naming it) unless `overwrite`. `recalibrate` N: re-estimate the
    BN statistics of the quantized network from N training batches (`timm_rc.recalibrate_bn`; augmented by
    default, the better measured, docs/compression.md) and write those into the file (the BN buffers stay fp32);
    the result then also holds the error before it. """
    if bits not in (8, 4):
        raise UserError(f'--bits must be 8 or 4, got {bits}')
    if group_size < 1:
        raise UserError(f'--group_size must be >= 1, got {group_size}')
    config = config_for_bits(bits, group_size)
    if recalibrate is not None and recalibrate < 1:
        raise UserError(f'--recalibrate takes a number of training batches >= 1, got {recalibrate}')
    _need_run_folder(run_dir, 'quantize')
    folder = Path(run_dir)
    out = folder / quantized_name(config)
    if out.exists() and not overwrite:
        raise UserError(f'{out} exists (written by an earlier quantize, perhaps with other options); '
                        f'pass --overwrite to replace it, or move it away first')
    net, run, name, kwargs = load_spec(run_dir)
    recal = None
    if recalibrate is not None:
        ds, dd = run_dataset(run, dataset, data_dir)
        batch = (run.config().get('batch_size') if run is not None else None) or 128
        recal = recalibrator(net, ds, dd, recalibrate, batch, recalibrate_augment)
    evaluate_fn = None
    if run is not None or data_dir or dataset:
        evaluate_fn, examples = test_error_fn(run, net, dataset, data_dir, max_samples)
    before = None
    if recal is not None:  # the quantized weights' own BN statistics, written into the file beside them
        _, tensors, shapes = quantized_file_bytes(net, config)
        quantized = copy.deepcopy(net)
        quantized.load_state_dict(dequantize_state_dict(tensors, shapes, config), strict=True)
        if evaluate_fn is not None:
            before = evaluate_fn(quantized.eval())
        recal(quantized)
        written = copy.deepcopy(net)  # the fp32 weights with the quantized network's BN statistics
        with torch.no_grad():
            for buffer_name, buffer in quantized.named_buffers():
                written.get_buffer(buffer_name).copy_(buffer)
    else:
        written = net
    size = save_quantized(written, out, config, model_name=name, model_kwargs=kwargs)
    result = dict(run=str(folder), path=str(out), model=name, model_kwargs=kwargs, bits=bits,
                  group_size=group_size if bits == 4 else None, params=model_size(net),
                  fp32_bytes=(folder / Run.WEIGHTS).stat().st_size, quantized_bytes=size)
    if evaluate_fn is not None:
        result['fp32_top1_error'] = evaluate_fn(net)
        result['quantized_top1_error'] = evaluate_fn(load_quantized(out))
        result['eval_examples'] = examples
    if recal is not None:
        result['recalibration'] = dict(batches=recalibrate, batch_size=batch, augmented=recalibrate_augment)
        if before is not None:
            result['quantized_top1_error_before'] = before
    return result


def int8_run(run_dir: str, *, calibration_batches: int = 8, batch_size: int = 64, compile: bool = True,
             dataset: Optional[str] = None, data_dir: Optional[str] = None,
             max_samples: Optional[int] = None) -> Dict[str, Any]:
    """ Static int8 (PT2E) of a run against its fp32 model: test error and CPU latency of both (and of
    fp32 through torch.compile, the fair baseline, when compiled), calibrated on training images. """
    for key, value in (('calibration_batches', calibration_batches), ('batch_size', batch_size),
                       ('max_samples', max_samples)):
        if value is not None and value < 1:
            raise UserError(f'--{key} must be >= 1, got {value}')
    _need_run_folder(run_dir, 'int8')
    net, run, name, kwargs = load_spec(run_dir)
    ds, dd = run_dataset(run, dataset, data_dir)
    loader = run.config().get('loader') if run is not None else None
    train, _, _ = load_split(ds, dd, 'train', calibration_batches * batch_size, net, loader)
    mean, std = model_mean_std(net)
    # calibration on training images, as the model sees them at test time (no augmentation)
    batches = [x if x.is_floating_point() else normalize(x, mean, std) for x, _ in split_loader(train, batch_size)]
    int8 = static_int8(net, batches, compile=compile)
    evaluate_fn, examples = test_error_fn(run, net, dataset, data_dir, max_samples)
    input_size = net.pretrained_cfg['input_size']
    result = dict(run=str(run_dir), model=name, model_kwargs=kwargs, compiled=int8.compiled,
                  calibration_images=sum(len(b) for b in batches), untied_calls=int8.untied,
                  fp32_weight_elements=int8.shared_weight_elements, int8_weight_elements=int8.int8_weight_elements,
                  threads=torch.get_num_threads())
    result['fp32_top1_error'] = evaluate_fn(net)
    result['int8_top1_error'] = evaluate_fn(int8)
    result['eval_examples'] = examples
    for b in (1, 64):
        result[f'fp32_latency_ms_b{b}'] = cpu_latency_ms(net, b, input_size)
        result[f'int8_latency_ms_b{b}'] = cpu_latency_ms(int8, b, input_size)
    if int8.compiled:  # the fair baseline: fp32 through the same compiler
        compiled = torch.compile(net)
        for b in (1, 64):
            result[f'fp32_compiled_latency_ms_b{b}'] = cpu_latency_ms(compiled, b, input_size)
    return result
